"""Checkpoint I/O: atomic writes, and reads that run no code and check the file is ours.

A checkpoint is a dict saved with torch.save: the model and optimizer state dicts, the step, the
config, both samplers' counters, RNG states, and what `autofit run --resume` needs to continue
the same plan on the same device (the plan, the micro-batches in use, the device spec).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from trainer.errors import TrainError

CHECKPOINT_KEYS = ("model", "optimizer", "iter_num", "config", "sampler", "eval_sampler", "rng_cpu")
# The fields that shape the model: a checkpoint of another shape cannot be resumed.
MODEL_FIELDS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "bias")


def atomic_torch_save(obj: Any, path: Path) -> None:
    """Temp file, fsync, rename: a crash mid-write never leaves a half checkpoint at `path`, and a
    failed write leaves no temp file behind (checkpoints can be GBs)."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def training_state(trainer) -> dict:
    """Everything a trainer.loop.Trainer needs to continue exactly: weights, optimizer and fp16
    scaler state, step, best validation loss, config, both samplers' counters, RNG states, the
    micro-batches in use, the plan (JSON text) and the device spec for `autofit run --resume`."""
    t = trainer
    return {
        "model": t.model.state_dict(),
        "optimizer": t.optimizer.state_dict(),
        "scaler": t.scaler.state_dict() if t.scaler is not None else None,
        "iter_num": t.iter_num,
        "best_val_loss": t.best_val_loss,
        "last_eval_iter": t.last_eval_iter,
        "config": t.cfg.model_dump(mode="json"),
        "sampler": t.sampler.state_dict(),
        "eval_sampler": t.evaluator.sampler.state_dict(),
        "compile_failed": t.compile_failed,
        "micro_batches": list(t.micro_batches),
        "plan": json.dumps(t.opts.plan_info) if t.opts.plan_info else None,
        "device": t.meter.spec(),
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state(t.device) if t.device.type == "cuda" else None,
    }


def read_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict:
    """Loads with weights_only=True (no code in a checkpoint runs) and checks it is ours.
    Raises TrainError when the file is missing, unreadable, or lacks an autofit key."""
    if not path.exists():
        raise TrainError(f"--resume: no checkpoint at {path}")
    try:
        ck = torch.load(path, map_location=device, weights_only=True)
    except Exception:  # corrupt, truncated, or a pickle that wants to run code
        raise TrainError(f"{path} is not a valid autofit checkpoint (unreadable with weights_only=True)") from None
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(ck, dict) or k not in ck]
    if missing:
        raise TrainError(f"{path} is not an autofit checkpoint (missing {', '.join(missing)})")
    return ck


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
