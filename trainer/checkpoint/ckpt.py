"""Checkpoint I/O: atomic writes, and reads that run no code and check the file is ours.

A checkpoint is a dict saved with torch.save: the model and optimizer state dicts, the step, the
config, both samplers' counters, RNG states, and what `autofit run --resume` needs to continue
the same plan on the same device (the plan, the micro-batches in use, the device spec).
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Mapping

import torch

from trainer.errors import TrainError
from trainer.checkpoint.safe_load import UnsafeOrUnreadable, load_weights_only
from trainer.checkpoint.schema import (CHECKPOINT_FORMAT, FORMAT_KEY, AutofitCheckpoint, CheckpointFieldError,
                                       check_format, validate)
from trainer.model.gpt import model_args_of
from trainer.writes import atomic_write, check_room

# Every key a resume reads: a checkpoint lacking one is refused before any work.
CHECKPOINT_KEYS = ("model", "optimizer", "iter_num", "config", "sampler", "eval_sampler", "rng_cpu",
                   "micro_batches", "best_val_loss")

# The fields that shape the model: a checkpoint of another shape cannot be resumed.
MODEL_FIELDS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "bias", "pos_emb", "norm",
                "qk_norm", "mlp", "n_kv_head", "tie_embeddings")


def atomic_torch_save(obj: Any, path: Path, what: str | None = None) -> None:
    """torch.save through trainer.writes.atomic_write (temp file, fsync, rename): a crash or a full
    disk never leaves a half checkpoint at `path`, nor a temp file (checkpoints can be GBs). Raises
    WriteError (one line: `what`, default 'checkpoint PATH', the reason, and that the previous
    checkpoint is kept as it was, or that there was none)."""
    kept = (f"the previous checkpoint {path} is kept as it was" if path.exists() else
            f"no checkpoint was written (there was none in {path.parent} before)")
    atomic_write(path, lambda f: torch.save(obj, f), what=what or f"checkpoint {path}", kept=kept)


def clear_cut_writes(ckpt: Path) -> str | None:
    """Removes the temp files of checkpoint writes to `ckpt` that were cut short (a kill -9 during
    torch.save leaves one as big as a checkpoint, one more each kill, and the next save needs room
    for another copy); returns the line that says so, or None where there was none. Call it only
    while this run owns the folder (the CLI holds <out>/.autofit.lock): another run's write in
    flight would be removed too. A file that cannot be removed is named, not raised."""
    from trainer.writes import cut_writes
    removed, left, size, where = 0, [], 0, {}  # where: the folders, in order (a link's target's too)
    for tmp in cut_writes(ckpt):
        try:
            n = tmp.stat().st_size
            tmp.unlink()
            removed, size = removed + 1, size + n
            where.setdefault(str(tmp.parent), None)
        except OSError:
            left.append(str(tmp))
    words = [f"removed {removed} checkpoint write{'s' * (removed != 1)} cut short ({size / 2**20:.1f} MiB, measured on disk) in "
             f"{' and '.join(where)}"] if removed else []
    words += [f"could not remove {', '.join(left)} (a checkpoint write cut short)"] if left else []
    return "; ".join(words) or None


def check_out_dir(path: str | Path, what: str = "--out") -> None:
    """Raises TrainError (one line, naming `what`: '--out', 'tensorboard_dir') when `path` cannot
    hold a run's files: a file, FIFO or device on the way, a dangling or looping link, a folder
    this process cannot write in (trainer.paths.output_dir), or a disk with no room
    (trainer.writes.check_room writes a few KiB: a 0-byte test file is still made on a full disk).
    Checked before any expensive work; leaves nothing behind."""
    from trainer.paths import PathProblem, nearest_existing, output_dir
    try:
        output_dir(path, what)
    except PathProblem as e:
        raise TrainError(str(e)) from None
    check_room(nearest_existing(path), f"in {what} {path}")


BEST_STEP_KEY = "best_val_step"


def best_model_step(ck, iter_num: int, best_val_loss: float) -> int | None:
    """`iter_num` where the checkpoint `ck` (a dict as read) holds the model its best_val_loss was
    measured on, else None. always_save_checkpoint=False keeps such a file at a later stop
    (trainer.loop.Trainer.save_last); a file written at a stop before any better evaluation holds
    a model no evaluation measured, and the steps after it must be saved, not thrown away (t7's
    M1: a step-0 evaluation's loss credited to step 20's model). Files without BEST_STEP_KEY
    (nanoGPT's, which saves only at an evaluation, and autofit's before it): saved at the best one."""
    if BEST_STEP_KEY in ck:
        return iter_num if ck[BEST_STEP_KEY] == iter_num else None
    return iter_num if best_val_loss < float("inf") else None


def training_state(trainer) -> dict:
    """Everything a trainer.loop.Trainer needs to continue exactly: weights, optimizer and fp16
    scaler state, step, best validation loss, config, both samplers' counters, RNG states, the
    micro-batches in use and the evaluation's, the plan (JSON text) and the device spec for `autofit run --resume`."""
    t = trainer
    return {  # nanoGPT's sample.py reads model, model_args and config['dataset'] as they are
        FORMAT_KEY: CHECKPOINT_FORMAT,  # what an older autofit reads as 'upgrade', not as corruption
        "model": t.model.state_dict(),
        "optimizer": t.optimizer.state_dict(),
        "scaler": t.scaler.state_dict() if t.scaler is not None else None,
        "iter_num": t.iter_num,
        "best_val_loss": t.best_val_loss,
        # the step whose evaluated model this file holds as the best val loss's (None: saved since, at
        # a stop or the end, a model that no evaluation measured; best_model_step)
        BEST_STEP_KEY: t.best_saved if t.best_saved == t.iter_num else None,
        "last_eval_iter": t.last_eval_iter,
        "config": t.cfg.model_dump(mode="json"),
        "model_args": model_args_of(t.cfg),
        "sampler": t.sampler.state_dict(),
        "eval_sampler": t.evaluator.sampler.state_dict(),
        "compile_failed": t.compile_failed,
        "eval_micro_batch": t.evaluator.micro_batch,
        "micro_batches": list(t.micro_batches),  # a staged run's are its stage's; stage_max_tokens its limit
        **({"stage_max_tokens": t.stages.max_tokens} if getattr(t, "stages", None) is not None else {}),
        "plan": json.dumps(t.opts.plan_info) if t.opts.plan_info else None,
        "device": t.meter.spec(),
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state(t.device) if t.device.type == "cuda" else None,
    }


def read_checkpoint(path: Path, device: torch.device | str = "cpu", any_layout: bool = False,
                    mmap: bool = False) -> dict:
    """Loads with weights_only=True (no code in a checkpoint runs) and checks it is ours: every key
    a resume reads (CHECKPOINT_KEYS), each of the right type and range and agreeing with the
    others (trainer/checkpoint/schema.py: weights against the config, AdamW state against the
    weights, RNG sizes). any_layout: a nanoGPT checkpoint (model and model_args) passes too, for
    trainer.checkpoint.nanogpt to read and check. mmap: map the tensors instead of reading them
    (for looking at a checkpoint before the run loads it). Raises TrainError (one line) when the
    file is missing, not a regular file, unreadable, of neither layout, or has a bad field."""
    from trainer.paths import PathProblem, input_file
    try:
        input_file(path, "--resume: checkpoint")
    except PathProblem as e:
        raise TrainError(str(e) if path.exists() or path.is_symlink() else f"--resume: no checkpoint at {path}") \
            from None
    try:
        ck = load_weights_only(path, map_location=device, mmap=mmap)
    except UnsafeOrUnreadable as e:  # corrupt, truncated, or a pickle that wants to run code
        raise TrainError(f"{path} is not a valid autofit checkpoint; unreadable with weights_only=True: {e}") from None
    check_format(ck, path)  # before the fields: a newer format's may look like corruption here
    if any_layout and isinstance(ck, dict) and "model" in ck and "model_args" in ck \
            and not all(k in ck for k in ("config", "sampler")):
        return ck  # nanoGPT's layout: trainer.checkpoint.nanogpt checks it
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(ck, dict) or k not in ck]
    if missing:
        raise TrainError(f"{path} is not an autofit checkpoint (missing {', '.join(missing)}) nor a nanoGPT one "
                         f"(model, model_args, ...)")
    check_autofit_checkpoint(ck, path)
    return ck


def check_autofit_checkpoint(ck: Mapping, path: str | Path):
    """Every field of an autofit checkpoint, and what ties them together: the config is a valid
    TrainConfig, the weights have the names and shapes of the model it describes, the AdamW state
    lines up with those parameters. Tensors may be memory-mapped: only shapes are looked at.
    Returns the TrainConfig. Raises CheckpointFieldError (one line) before any model is built."""
    from trainer.config.train_config import ConfigError, TrainConfig
    from trainer.checkpoint.nanogpt import CheckpointError, check_model_state, check_optimizer_state, model_args_of
    from trainer.model.gpt import GPT, GPTConfig, clean_state_dict
    fields = validate(AutofitCheckpoint, ck, path)
    try:
        cfg = TrainConfig(**fields.config)
    except ConfigError as e:
        raise CheckpointFieldError(f"{path}: config: {e}") from None
    args = model_args_of(cfg)
    try:
        check_model_state(clean_state_dict(dict(fields.model)), args, path, against="config")
        opt = ck["optimizer"]  # FSDP2 saves it by parameter name, checked by torch's loader; Muon + AdamW's
        if fields.optimizer_keys != "names" and set(opt) != {"muon", "adamw"}:  # is checked by its own loader
            with torch.device("meta"):
                check_optimizer_state(ck["optimizer"], GPT(GPTConfig(**args)), path)
    except CheckpointError as e:
        raise CheckpointFieldError(str(e)) from None
    return cfg


def check_same_model(saved_cfg, cfg, path: Path) -> None:
    """Raises TrainError when the checkpoint's model shape differs from the config's."""
    for key in MODEL_FIELDS:
        if getattr(saved_cfg, key) != getattr(cfg, key):
            raise TrainError(f"checkpoint {path} has {key}={getattr(saved_cfg, key)}, "
                             f"config has {getattr(cfg, key)}")


def device_spec(ck: dict) -> dict:
    """How to reopen the device a checkpoint was trained on (MemoryMeter.spec()); checkpoints of
    autofit 0.1.0 stored the same facts under separate keys."""
    if isinstance(ck.get("device"), dict):
        return ck["device"]
    if ck.get("device_kind") == "cuda":
        return {"kind": "cuda", "memory_cap_bytes": ck.get("cuda_memory_cap_bytes")}
    if ck.get("cpu_budget_bytes"):
        return {"kind": "cpu-budgeted", "budget_bytes": int(ck["cpu_budget_bytes"])}
    return {"kind": "cpu"}


# What a resume may change without changing what is trained: output, logging, evaluation,
# how long, and how the steps run (compile, the device, activation checkpointing, which recomputes
# the same values with the same RNG state). The effective batch may be split differently
# (batch_size x gradient_accumulation_steps), never changed.
RESUME_SAFE_FIELDS = frozenset({
    "max_iters", "eval_interval", "log_interval", "eval_iters", "eval_only", "always_save_checkpoint",
    "wandb_log", "wandb_project", "wandb_run_name", "tensorboard_dir", "out_dir", "device", "backend", "compile",
    "compile_after", "compile_scope", "init_from", "batch_size", "gradient_accumulation_steps",
    "checkpointing", "checkpointing_policy"})


def resume_changes(saved, new) -> list[str]:
    """What `new` (a TrainConfig) changes of the run that `saved` describes, in a resume that
    promises to continue the same run: ['learning_rate 0.0006 -> 0.001', 'effective batch 8 -> 16'].
    Fields in RESUME_SAFE_FIELDS may change; the effective batch may not."""
    from trainer.config.stages import stages_text  # a stage list as the config writes it, not Stage(...) reprs
    text = lambda k, v: stages_text(v) if k == "stages" else repr(v)
    out = [f"{k} {text(k, getattr(saved, k))} -> {text(k, getattr(new, k))}" for k in type(saved).model_fields
           if k not in RESUME_SAFE_FIELDS and getattr(saved, k) != getattr(new, k)]
    # a schedule's batches are its stages' (a change of stages is named above); batch_size x
    # gradient_accumulation_steps is not what it trains
    if saved.effective_batch != new.effective_batch and not (saved.stages or new.stages):
        out.append(f"effective batch {saved.effective_batch} -> {new.effective_batch} sequences")
    return out


def restore(trainer, ck: dict) -> None:
    """Puts a checkpoint's state into a trainer.loop.Trainer: autofit's layout exactly (weights,
    AdamW and fp16 scaler, step, samplers, RNG); nanoGPT's (weights, AdamW, step, best loss), with
    what it cannot give back said in a 'resume_partial' event. Raises TrainError for a checkpoint
    of another model."""
    from trainer.config.train_config import TrainConfig
    from trainer.checkpoint.nanogpt import CheckpointError, check_finite, checkpoint_layout, nanogpt_checkpoint_from
    t = trainer
    nanogpt = checkpoint_layout(ck, t.ckpt_path) == "nanogpt"
    try:  # every rank read the whole file: each finds the same answer, before any collective
        nano = nanogpt_checkpoint_from(ck, t.ckpt_path) if nanogpt else None
        check_finite(nano.model if nano else ck["model"], t.ckpt_path)
        check_finite(nano.optimizer if nano else ck["optimizer"], t.ckpt_path, "optimizer")
    except CheckpointError as e:
        raise TrainError(str(e)) from None
    if nano is not None:
        check_same_model(TrainConfig(**{**t.cfg.model_dump(), **nano.model_args}), t.cfg, t.ckpt_path)
        t.model.load_state_dict(nano.model)
        if nano.optimizer is not None:
            with config_hyperparameters(t.optimizer):
                t.optimizer.load_state_dict(nano.optimizer)
        t.iter_num, t.best_val_loss = nano.iter_num, nano.best_val_loss
        t.last_eval_iter = nano.iter_num  # nanoGPT evaluated (and saved) at this step
        t._event("resume_partial", layout="nanogpt", not_restored=nano.not_restored)
        return
    check_same_model(TrainConfig(**ck["config"]), t.cfg, t.ckpt_path)
    with config_hyperparameters(t.optimizer):  # the state is the checkpoint's, the settings this config's
        t.group.load(ck, t.model, t.optimizer)  # one GPU, DDP or FSDP2's shards (trainer/distributed/multirank.py)
    if t.scaler is not None and ck.get("scaler"):
        t.scaler.load_state_dict(ck["scaler"])
    t.iter_num = int(ck["iter_num"])
    t.best_val_loss = float(ck["best_val_loss"])
    t.last_eval_iter = int(ck.get("last_eval_iter", -1))
    t.sampler.load_state_dict(ck["sampler"])
    t.evaluator.sampler.load_state_dict(ck["eval_sampler"])
    t.compile_failed = bool(ck.get("compile_failed", False))
    if ck.get("eval_micro_batch") and not t.opts.eval_micro_batch:  # sized before a shrink: the same evaluation
        t.evaluator.micro_batch = int(ck["eval_micro_batch"])
    rng_cpu, rng_cuda = t.group.rng_state(ck)  # with several ranks, this rank's own
    try:  # the CPU states are checked on reading (checkpoint.schema); a CUDA one only here
        torch.set_rng_state(rng_cpu.cpu())
        if rng_cuda is not None and t.device.type == "cuda":
            torch.cuda.set_rng_state(rng_cuda.cpu(), t.device)
    except RuntimeError as e:
        raise TrainError(f"{t.ckpt_path}: its saved RNG state cannot be restored ({str(e).splitlines()[0]}); "
                         f"the checkpoint is kept as it was") from None
    change = t.group.split_change(ck, t.cfg.effective_batch, t.micro_batches)
    if change:  # resumed on another number of ranks
        t._event("world_size_changed", **change)


@contextlib.contextmanager
def config_hyperparameters(optimizer: torch.optim.Optimizer):
    """Around loading an optimizer's state: afterwards every param group keeps the settings it was
    made with from this run's config (weight_decay, betas, eps, Muon's lr_scale = muon_lr /
    learning_rate, ...), not those saved in the checkpoint, which load_state_dict brings back. The
    checkpoint gives the state (moments, step counts); a change resumed with --allow-changes
    (autofit.launch.resume) then takes effect. 'lr' is set at every step by the schedule."""
    made = [{k: v for k, v in g.items() if k not in ("params", "lr")} for g in optimizer.param_groups]
    yield
    for group, settings in zip(optimizer.param_groups, made):
        group.update(settings)
