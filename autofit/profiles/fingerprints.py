"""Fingerprints of what a fitted plan's memory use depends on, and how two of them differ.

A plan is keyed by the first 12 hex digits of sha256 over canonical JSON of its inputs (the
config summary, torch, CUDA and driver versions), so a plan found for one config or software
stack is never silently reused for another, and `explain_stale` says what changed.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

from trainer.config.model_options import MODERN_DEFAULTS

# The fields a plan's memory use depends on; profiles fingerprint plans by them.
_SUMMARY_FIELDS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "bias", "dropout",
                   "dtype", "compile", "compile_scope", "tf32", "checkpointing", "loss_impl", "ce_chunk_size",
                   "batch_size", "gradient_accumulation_steps")


def config_summary(cfg) -> dict[str, Any]:
    """The memory-relevant fields of `cfg` (trainer.config.train_config.TrainConfig), flat, for
    profile fingerprints."""
    out = {k: getattr(cfg, k) for k in _SUMMARY_FIELDS}
    # today's options only where set, so a GPT-2 config's fingerprint (and saved plans) stay as they were
    out.update({k: getattr(cfg, k) for k, v in MODERN_DEFAULTS.items() if getattr(cfg, k) != v})
    if not cfg.checkpointing:
        # Without checkpointing the config's policy changes no plan: the probe searches the policies
        # itself (autofit.planning.candidates, from its flag, not the config), the config-as-written
        # contender and the estimate read it only with checkpointing on (planning.own, .estimated),
        # and the run takes the plan's policy with its checkpointing (launch.run). t12's L7: a
        # --set checkpointing_policy=selective with checkpointing 0 probed again for nothing.
        out.pop("checkpointing_policy", None)
    out["effective_batch"] = cfg.effective_batch
    out.update({"stages": [s.model_dump(exclude_none=True) for s in cfg.stages]} if cfg.stages else {})
    return out


# Short labels for the non-config fingerprint inputs, as people say them ("torch 2.4 -> 2.5").
_VERSION_LABELS = {"torch_version": "torch", "cuda_version": "cuda", "driver_version": "driver"}


def fingerprint_inputs(config_summary: dict[str, Any], torch_version: str,
                       cuda_version: str | None, driver_version: str | None) -> dict[str, Any]:
    """Everything a plan's memory use depends on, flat, so staleness reads field by field."""
    clash = set(config_summary) & set(_VERSION_LABELS)
    if clash:
        raise ValueError(f"config summary must not contain {sorted(clash)}")
    return {**config_summary, "torch_version": torch_version, "cuda_version": cuda_version,
            "driver_version": driver_version}


def _strip_none(value: Any) -> Any:
    # TOML has no null: None values are dropped on write, so they must also be ignored when
    # hashing, or a plan read back from disk would not match its own fingerprint.
    if isinstance(value, dict):
        return {k: _strip_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_strip_none(v) for v in value]
    return value


def fingerprint(inputs: dict[str, Any]) -> str:
    """First 12 hex digits of sha256 over canonical JSON (sorted keys, None values dropped)."""
    canonical = json.dumps(_strip_none(inputs), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:12]


def explain_stale(old_inputs: dict[str, Any], new_inputs: dict[str, Any]) -> list[str]:
    """What changed between two fingerprint inputs, e.g. ['torch 2.4.0 -> 2.5.1', 'n_embd 576 -> 768'].
    A plan for another number of ranks reads 'ranks 2 -> 1' (one process keys no world_size or
    parallelism: autofit.planning.agree.fingerprint_fields), not 'world_size 2 -> unset'."""
    old, new = _strip_none(old_inputs), _strip_none(new_inputs)
    changes = []
    skip: set[str] = set()
    if old.get("world_size", 1) != new.get("world_size", 1):
        changes.append(f"ranks {old.get('world_size', 1)} -> {new.get('world_size', 1)}")
        skip = {"world_size"} | ({"parallelism"} if "parallelism" not in old or "parallelism" not in new else set())
    for key in sorted((set(old) | set(new)) - skip):
        # a model option at its default is left out of the fingerprint (config_summary): say its value
        before, after = (d.get(key, MODERN_DEFAULTS.get(key)) for d in (old, new))
        if before != after:
            label = _VERSION_LABELS.get(key, key)
            changes.append(f"{label} {_show(before)} -> {_show(after)}")
    return changes


# Fingerprint inputs that are not the model: a plan differing only in these is this model's, stale
_NOT_THE_MODEL = tuple(_VERSION_LABELS.values()) + ("allocator", "emulated_on")


def not_reused_words(changes: list[str]) -> str:
    """Why the nearest saved plan (explain_stale's `changes`) is not this run's: 'saved plans are
    stale (torch 2.4.0 -> 2.5.1)' where only the software, allocator or emulation moved (the same
    model), else 'no saved plan for this model (mlp swiglu -> relu2)': another model's plan is
    kept in the profile and still good for that model, so it is not stale."""
    same_model = all(c.split(" ")[0] in _NOT_THE_MODEL for c in changes)
    return f"{'saved plans are stale' if same_model else 'no saved plan for this model'} ({'; '.join(changes)})"


def _show(value: Any) -> str:
    return "unset" if value is None else str(value)
