"""`autofit run --resume` (and init_from = 'resume'): continue a run from <out>/ckpt.pt.

An autofit checkpoint continues with its own config, plan and device, with no probe, so the
continuation is the same run. A nanoGPT checkpoint (model, optimizer, model_args, iter_num,
best_val_loss, config) continues at its iteration with its weights and optimizer state, on a plan
probed now as for a fresh run; what it cannot give back (data position, RNG) is said.

Either way a resume promises the same run: a --set (or config value) that changes what is
trained (the effective batch, the dataset, the schedule, the optimizer) is refused, unless
--allow-changes is given, and then it is said and recorded in the run's metrics.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from autofit.planning import agree
from autofit.devices.opener import reopen_device
from autofit.launch.checks import check_data, check_steps_left, say_config_notes
from autofit.launch.run import Launch, _profile_recorder, prepare_run
from autofit.records import PlanRecord
from autofit.units import fmt_bytes
from trainer.checkpoint.ckpt import MODEL_FIELDS, device_spec, read_checkpoint, resume_changes
from trainer.config.train_config import FIELDS, ConfigError, TrainConfig
from trainer.config.messages import unknown_key_message
from trainer.loop import RunOptions
from trainer.recovery import shrink_policy
from trainer.step import describe_split, split_batch


# The model's shape and architecture, and the optimizer: a resume loads the checkpoint's weights
# and optimizer state, so these come from it (nanoGPT's train.py forces the same keys from the
# checkpoint's model_args); --allow-changes cannot change them (Muon's state does not load into AdamW).
MODEL_SHAPE_FIELDS = MODEL_FIELDS + ("optimizer",)


def _with_changes(saved: TrainConfig, overrides: dict[str, Any], allow_changes: bool, log,
                  sources: dict[str, str] | None = None) -> tuple[TrainConfig, list[str]]:
    """The saved config with `overrides` applied, and the changes to what is trained (refused with
    a ConfigError unless allow_changes; then each is logged). A change of the model's shape is
    refused always, by name, before any value is applied. `sources`: where each override was
    set ('--set', 'c.py:3'), named in the error for a bad value."""
    unknown = [k for k in overrides if k not in FIELDS]
    if unknown:
        raise ConfigError(f"--set: {unknown_key_message(unknown[0], FIELDS)}")
    shape = [f"{k} {getattr(saved, k)!r} -> {v!r}" for k, v in overrides.items()
             if k in MODEL_SHAPE_FIELDS and getattr(saved, k) != v]
    if shape:
        raise ConfigError(f"--resume continues the checkpoint's model and optimizer state, whose shape cannot change "
                          f"({'; '.join(shape)}); "
                          f"drop these from --set or the config (the checkpoint's are used), or start a new run "
                          f"with another --out")
    cfg = saved.model_copy(deep=True)
    cfg._sources = {**saved._sources, **(sources or {})}
    for key, value in overrides.items():
        setattr(cfg, key, value)  # validated: ConfigError for a bad value
    changes = resume_changes(saved, cfg)
    if changes and not allow_changes:
        raise ConfigError(f"--resume continues the same run, and this changes what it trains ({'; '.join(changes)}); "
                          f"drop the change, start a new run with another --out, or pass --allow-changes")
    for c in changes:
        log(f"--resume with --allow-changes: {c}")
    return cfg, changes


def prepare_resume(out_dir: str, overrides: dict[str, Any], *, probe_opts, allow_changes: bool = False,
                   max_steps: int | None, progress: bool, log: Callable[[str], None],
                   sources: dict[str, str] | None = None) -> Launch:
    """The Launch that continues <out_dir>/ckpt.pt. `overrides`: config values asked on the
    command line (or in a config with init_from='resume'); `sources`: where each was set. Raises
    TrainError for a missing or foreign checkpoint, ConfigError for a refused change."""
    path = Path(out_dir) / "ckpt.pt"
    # every field checked (trainer/checkpoint/schema.py) before any work; tensors mapped, not read
    ck = read_checkpoint(path, any_layout=True, mmap=True)
    if not all(k in ck for k in ("config", "sampler")):  # nanoGPT's layout
        return _continue_nanogpt(path, overrides, probe_opts, allow_changes, max_steps, progress, log, sources)
    if probe_opts.search_flags():  # they choose a new plan, and an autofit run goes on with its own
        raise ConfigError(f"{', '.join(probe_opts.search_flags())} with --resume: the run goes on with its own plan, "
                          f"no probe; change its config with --set key=value --allow-changes")
    plan_info = json.loads(ck["plan"]) if ck.get("plan") else {}
    plan = _saved_plan(plan_info, path)
    saved = TrainConfig(**ck["config"])
    note, say_header = header_first(log)  # what is resumed, then the notes that qualify it
    cfg, changes = _with_changes(saved, overrides, allow_changes, note, sources)
    check_steps_left(int(ck["iter_num"]), cfg, max_steps, resuming=True)  # before the device and the model
    say_config_notes(cfg, max_steps, note, resumed_at=int(ck["iter_num"]))
    data_change = check_data(cfg, vocab_fixed_by=str(path), allow_changes=allow_changes, log=note,
                             trained_on=ck["sampler"].get("data") if cfg.dataset == saved.dataset else None)
    changes = changes + [data_change] if data_change else changes  # recorded with the other accepted changes
    cfg.out_dir = str(out_dir)
    spec = device_spec(ck)
    check_same_device(probe_opts, spec, overrides.get("device"), (sources or {}).get("device", "--set"))
    spec = _larger_budget(probe_opts, spec, note)
    device = reopen_device(spec, gpu_index=probe_opts.gpu_index)
    micro = max(ck["micro_batches"])  # the size in use when it stopped, after any OOM shrinks
    if cfg.stages and ck.get("stage_max_tokens"):  # a staged run's are its stage's: the size at block_size
        micro = max(1, ck["stage_max_tokens"] // cfg.block_size)
    # the size that runs: an effective batch made smaller with --allow-changes can hold less than `micro`
    runs = micro if cfg.stages else max(split_batch(agree.rank_batch(cfg), micro))
    _say_not_applied(overrides, saved, cfg, spec, runs, note)  # its notes name that size too
    say_header(f"resuming {out_dir} at step {int(ck['iter_num'])} with its own config and plan "
               f"(micro-batch {runs}); no probe")
    _check_split_change(cfg, int(ck.get("world_size", 1)))  # the trainer's world_size_changed event says it
    info = {**plan_info, "resumed": True, **({"changes": changes} if changes else {})}
    opts = RunOptions(micro_batch=micro, compile_after=plan.compile_after if plan else None,
                      compiled_fit_sizes=list(plan_info.get("compiled_fit_sizes", [])),
                      shrink=shrink_policy(plan_info.get("fit_sizes", [])),
                      plan_info=info if (plan_info or changes) else None,
                      max_steps=max_steps, resume=True, meter=device, device=device.torch_device,
                      progress=progress, on_event=_lessons_to(plan_info, out_dir, log))
    if plan is None:  # a run started with --no-probe: no plan to show
        mbs = split_batch(agree.rank_batch(cfg), micro)  # each rank's share of the effective batch
        plan = PlanRecord(mode="measured", micro_batch=max(mbs), grad_accum=len(mbs), micro_batches=mbs,
                          effective_batch=sum(mbs), block_size=cfg.block_size,
                          **agree.plan_fields(cfg.parallelism == "fsdp2"),
                          dtype=cfg.resolved_dtype(device.torch_device.type, True), compile=cfg.compile,
                          compile_after=cfg.compile_after or 0, checkpointing=cfg.checkpointing,
                          checkpointing_policy=cfg.checkpointing_policy if cfg.checkpointing else "full",
                          loss_impl=cfg.loss_impl, budget_bytes=int(spec.get("budget_bytes") or 0),
                          split=describe_split(mbs), reason="the config as written (--no-probe)")
    return Launch(cfg=cfg, opts=opts, device=device, plan=plan,
                  source=f"resumed from {out_dir}/ckpt.pt (step {int(ck['iter_num'])})")


def header_first(log: Callable[[str], None]) -> tuple[Callable[[str], None], Callable[[str], None]]:
    """(note, say_header) for a resume's lines: `note` holds each note said while the resume is
    checked (a change taken with --allow-changes, --max-steps past max_iters, a --set not applied),
    and say_header(line) says the line naming what is resumed, then the notes held, in order.
    They read as what is resumed, then what qualifies it (they came before it); a refusal raised
    before the header is said alone, as every refusal is, without notes about a resume that does
    not happen."""
    held: list[str] = []

    def say_header(line: str) -> None:
        log(line)
        for text in held:
            log(text)
        held.clear()
    return held.append, say_header


def _lessons_to(plan_info: dict, out_dir: str, log):
    """A resumed `run --profile`'s lessons (OOM shrinks, compile fallbacks) go to its plan in the
    profile, as a fresh run's do (the plan's info names both); None for a run without a profile."""
    if not (plan_info.get("profile") and plan_info.get("fingerprint")):
        return None
    return _profile_recorder(plan_info["profile"], plan_info["fingerprint"], log, str(out_dir))


def _device_kind(spec: dict) -> str:
    """The checkpoint's device as --device names it: 'cpu' (also for 'cpu-budgeted') or 'cuda'."""
    return str(spec.get("kind")).split("-")[0]


def _device_words(spec: dict) -> str:
    """The checkpoint's device in words: 'cpu-budgeted, budget 32.0 MiB', 'cuda', 'cpu'."""
    return str(spec.get("kind")) + (f", budget {fmt_bytes(spec['budget_bytes'])}" if spec.get("budget_bytes") else "")


def check_same_device(probe_opts, spec: dict, set_device: str | None = None, set_where: str = "--set") -> None:
    """An autofit checkpoint goes on on the device it trained on (`spec`, its meter's), with its
    own plan: a --device that asks for another would be ignored, so it is refused (ConfigError,
    before any work), as --dtype is; so is a config's `device` (`set_device`, from --set or a
    resume config: `set_where`, or the config a --device came from), which a fresh run would
    open. A --budget is refused unless it is the budgeted CPU checkpoint's own or larger
    (_larger_budget). Why not honour a smaller one: the plan's micro-batch was fitted under the
    old one, and re-fitting means a probe, which a resume promises not to run (the same run, not
    a new plan). A larger one needs no re-fit: what fitted under less fits under more, as on a GPU
    whose other processes freed memory, and it is how a run stopped by an out-of-memory error
    with no smaller micro-batch left goes on (trainer.redo). The same device again is accepted
    (it changes nothing), and so is device 'auto'."""
    asked = []  # (what was asked, what to drop)
    kind = _device_kind(spec)
    if probe_opts.device is not None and probe_opts.device != kind:
        asked.append((f"--device {probe_opts.device}", "--device") if probe_opts.device_source is None
                     else (f"the config's device {probe_opts.device!r}", "device from the config"))
    elif set_device not in (None, "auto") and set_device.partition(":")[0] != kind:
        asked.append((f"device {set_device!r} ({set_where})",
                      "--set device" if set_where == "--set" else f"device from {set_where}"))
    budget = probe_opts.budget_bytes
    if budget is not None and not (spec.get("budget_bytes") and budget >= spec["budget_bytes"]):
        asked.append((f"--budget {fmt_bytes(budget)}", "--budget"))
    if asked:
        larger = (" (a larger --budget is taken: what fitted under the checkpoint's fits under it)"
                  if spec.get("budget_bytes") and any(drop == "--budget" for _, drop in asked) else "")
        raise ConfigError(f"{' and '.join(a for a, _ in asked)} with --resume: an autofit checkpoint goes on on the "
                          f"device it trained on ({_device_words(spec)}) with its own plan, no probe{larger}; drop "
                          f"{'them' if len(asked) > 1 else asked[0][1]}, or start a new run with another "
                          f"--out to fit a plan there")


def _larger_budget(probe_opts, spec: dict, log) -> dict:
    """The device spec a resume reopens: the checkpoint's, with a --budget larger than its budgeted
    CPU's (check_same_device let only that through) in place of its budget, said in one line.
    The plan (its micro-batch, after any shrinks) is kept: it fitted under the smaller budget."""
    budget = probe_opts.budget_bytes
    if budget is None or budget == spec.get("budget_bytes"):
        return spec
    log(f"--resume with --budget {fmt_bytes(budget)}: the run goes on under it (it trained under "
        f"{fmt_bytes(spec['budget_bytes'])}) with its own plan, no probe: what fitted there fits here; a probe for "
        f"the larger budget (a new run with another --out) may choose a larger micro-batch")
    return {**spec, "budget_bytes": budget}


def _say_not_applied(overrides: dict[str, Any], saved: TrainConfig, cfg: TrainConfig, spec: dict, micro: int,
                     log) -> None:
    """A --set that a resume accepts but cannot act on is said, not dropped in silence: the
    checkpoint fixes where it runs and from what, and its own plan splits the effective batch."""
    why = {"init_from": "it starts from the checkpoint",
           "batch_size": f"its plan splits the effective batch (micro-batch {micro})",
           "gradient_accumulation_steps": f"its plan splits the effective batch (micro-batch {micro})"}
    for key, value in overrides.items():  # a device other than the checkpoint's is refused (check_same_device)
        if key in why and getattr(saved, key) != value:
            if key in ("batch_size", "gradient_accumulation_steps") and cfg.effective_batch != saved.effective_batch:
                # --allow-changes took the new effective batch; only its split is the plan's
                log(f"--resume: --set {key}={value!r} counts in the effective batch ({cfg.effective_batch}); its "
                    f"split into micro-batches is the checkpoint's plan's (micro-batch {micro})")
                continue
            log(f"--resume: --set {key}={value!r} is not applied: {why[key]}")


def _saved_plan(plan_info: dict, path: Path) -> PlanRecord | None:
    """The plan a checkpoint was trained on (None for a --no-probe run), validated as a probe's
    plan is; TrainError naming the file and the field for one that is not."""
    if not plan_info.get("mode"):
        return None
    from pydantic import ValidationError
    from autofit.profiles.files import first_problem
    from trainer.errors import TrainError
    try:
        return PlanRecord(**{k: v for k, v in plan_info.items() if k in PlanRecord.model_fields})
    except ValidationError as e:
        raise TrainError(f"{path}: plan: {first_problem(e, 'plan')}") from None


def check_resume_ranks(out_dir: str, world_size: int, overrides: dict[str, Any], sources: dict[str, str] | None,
                       allow_changes: bool) -> None:
    """--resume with --nproc-per-node N, in the launcher before any rank starts: the checkpoint is
    read (mapped, not loaded: its fields and shapes) and its config with the --set values a resume
    takes (`overrides`, refused ones refused here) must share its effective batch among the N
    ranks, as each rank checks in prepare_resume. So a batch they cannot share is one line before
    torchrun starts, as a fresh run's is, not rank 0's after every rank started. A nanoGPT
    checkpoint is probed afresh in the ranks, and checked there. Raises TrainError, ConfigError."""
    ck = read_checkpoint(Path(out_dir) / "ckpt.pt", any_layout=True, mmap=True)
    if not all(k in ck for k in ("config", "sampler")):
        return
    cfg, _ = _with_changes(TrainConfig(**ck["config"]), overrides, allow_changes, lambda s: None, sources)
    _check_split_change(cfg, int(ck.get("world_size", 1)), world_size)


def _check_split_change(cfg, before: int, now: int | None = None) -> None:
    """A resume on another number of ranks (`now`: torchrun's, unless given) keeps the effective
    batch; each rank's share changes (the trainer's 'world_size_changed' event says how). Raises
    TrainError, before any work, when the new number does not divide it."""
    now = agree.ranks().world_size if now is None else now
    if before == now:
        return
    from trainer.distributed.shares import check_divisible
    from trainer.errors import TrainError
    try:
        check_divisible(cfg.effective_batch, now, cfg.batch_size, cfg.gradient_accumulation_steps)
    except TrainError as e:  # the --set it names changes what a resume trains: it needs --allow-changes too
        msg = str(e)
        raise TrainError(msg[:-1] + " --allow-changes)" if msg.endswith(")") and "--set" in msg else msg) from None


def _continue_nanogpt(path: Path, overrides, probe_opts, allow_changes, max_steps, progress, log,
                      sources=None) -> Launch:
    from trainer.errors import TrainError
    from trainer.checkpoint.nanogpt import CheckpointError, nanogpt_checkpoint_from, train_config_of
    try:
        ck = nanogpt_checkpoint_from(read_checkpoint(path, any_layout=True), path)
    except CheckpointError as e:
        raise TrainError(str(e)) from None
    saved, dropped = train_config_of(ck)
    note, say_header = header_first(log)  # what is continued, then the notes that qualify it
    cfg, _ = _with_changes(saved, overrides, allow_changes, note, sources)
    probe_opts, device_note = _nanogpt_device(cfg, probe_opts, "device" in overrides)
    check_steps_left(int(ck.iter_num), cfg, max_steps, resuming=True)  # before the probe
    say_config_notes(cfg, max_steps, note, resumed_at=int(ck.iter_num))
    cfg.out_dir = str(path.parent)
    check_data(cfg, vocab_fixed_by=str(path))  # before the probe: its vocab_size cannot change
    say_header(f"{path} is a nanoGPT checkpoint (step {ck.iter_num}): continuing it with its weights and optimizer "
               f"state on a plan probed now" + (f"; nanoGPT settings autofit does not use: {', '.join(dropped)}"
                                                if dropped else ""))
    for item in ck.not_restored:
        log(f"not restored: {item}")
    if device_note:
        log(device_note)
    if _on_cpu(probe_opts) and cfg.dtype in ("bfloat16", "float16"):  # nanoGPT's CPU runs no autocast
        log(f"dtype {cfg.dtype!r} from the checkpoint's config: nanoGPT trains on the CPU in float32 (its autocast "
            f"context is off there); this run keeps {cfg.dtype} (--set dtype=float32 --allow-changes to match nanoGPT)")
    return prepare_run(cfg, profile=None, emulate=False, probe_opts=probe_opts, max_steps=max_steps,
                       resume=True, progress=progress, log=log)


def _on_cpu(probe_opts) -> bool:
    """Whether the run opens the CPU: asked for, or no device named and no CUDA GPU here."""
    import torch
    return probe_opts.device == "cpu" or (probe_opts.device is None and not torch.cuda.is_available())


def _nanogpt_device(cfg, probe_opts, set_here: bool):
    """(the probe options a nanoGPT checkpoint continues under, a note to log or None). Its config
    names the device it trained on (nanoGPT's default 'cuda'), and a fresh run opens a config's
    device where no flag (--device, --budget) names one; so does this, a --set device too
    (`set_here`: a GPU that is not here is one line now, before any other, as in a fresh run). The
    checkpoint's own 'cuda' on a machine with no CUDA GPU is not the user's choice now: the run
    trains on the CPU, and the note says so and why. Raises DeviceError."""
    import dataclasses
    if probe_opts.device is not None or probe_opts.budget_bytes is not None or cfg.device == "auto":
        return probe_opts, None
    kind, _, index = cfg.device.partition(":")
    if not set_here and kind == "cuda" and _on_cpu(probe_opts):
        return probe_opts, (f"device {cfg.device!r} from the checkpoint's config (where nanoGPT trained it): this "
                            f"machine has no CUDA GPU, so this run trains on the CPU (--device or --budget to choose)")
    where = "--set" if set_here else "the checkpoint's config"
    source = f"device {cfg.device!r} from {where}; --device to choose another"
    if kind == "cuda":
        from autofit.devices.cuda import detect_gpu
        from autofit.devices.info import DeviceError
        try:
            detect_gpu(int(index) if index else 0)  # NVML first: no CUDA context yet
        except DeviceError as e:
            raise DeviceError(f"{e} ({source})") from None
    return dataclasses.replace(probe_opts, device=kind, gpu_index=int(index) if index else probe_opts.gpu_index,
                               device_source=source), None
