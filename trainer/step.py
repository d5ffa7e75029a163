"""The one train step: one optimizer step over a batch of sequences, split into micro-batches.

The launcher's trials call exactly this function, and so does the training loop, so memory
measured in a trial is the memory of training (DESIGN.md, rule 1). Everything that changes
memory (micro-batch sizes, dtype, scaler) is an argument, not a global.
"""
from __future__ import annotations

import contextlib
import inspect
import os
from dataclasses import dataclass

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def split_batch(effective_batch: int, micro_batch: int) -> list[int]:
    """Sizes of the micro-batches of one optimizer step: as many full ones as fit, then a short
    last one, so the sum is exactly the effective batch (never rounded to a multiple)."""
    if effective_batch < 1 or micro_batch < 1:
        raise ValueError(f"batch sizes must be positive (effective {effective_batch}, micro {micro_batch})")
    micro_batch = min(micro_batch, effective_batch)
    full, rest = divmod(effective_batch, micro_batch)
    return [micro_batch] * full + ([rest] if rest else [])


def describe_split(micro_batches: list[int]) -> str:
    """'512 = 42 × 12 + 8' style text for a list of micro-batch sizes."""
    total = sum(micro_batches)
    full = micro_batches[0]
    n_full = sum(1 for m in micro_batches if m == full)
    text = f"{total} = {full} × {n_full}"
    if len(micro_batches) > n_full:
        text += f" + {micro_batches[-1]}"
    return text


def autocast(device_type: str, dtype: str):
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=DTYPES[dtype])


def make_optimizer(model: torch.nn.Module, *, learning_rate: float, weight_decay: float,
                   betas: tuple[float, float], device_type: str) -> torch.optim.AdamW:
    """nanoGPT's AdamW: weight decay on matrices and embeddings only; fused kernel on CUDA."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    fused = device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **({"fused": True} if fused else {}))


class InjectedOOM(torch.OutOfMemoryError):
    """A real torch.OutOfMemoryError (handled as any other), marked so that a demo or test fault
    is not written into a saved profile as a lesson about the card."""


class FaultInjector:
    """Raises a real torch.OutOfMemoryError at the first micro-batch of optimizer step `at_step`,
    once. Read from AUTOFIT_FAULT_OOM_AT_STEP so tests and demos can exercise OOM recovery."""

    def __init__(self, at_step: int | None):
        self.at_step = at_step
        self.fired = False

    @classmethod
    def from_env(cls) -> "FaultInjector":
        raw = os.environ.get("AUTOFIT_FAULT_OOM_AT_STEP", "").strip()
        if not raw:
            return cls(None)
        try:
            return cls(int(raw))
        except ValueError:
            raise ValueError(f"AUTOFIT_FAULT_OOM_AT_STEP must be an integer step, got {raw!r}") from None

    def check(self, step: int | None, micro_index: int) -> None:
        if self.at_step is not None and not self.fired and step == self.at_step and micro_index == 0:
            self.fired = True
            raise InjectedOOM(
                f"injected out-of-memory at optimizer step {step} (AUTOFIT_FAULT_OOM_AT_STEP)")


@dataclass
class StepResult:
    loss: float  # mean loss over every target token of the step
    tokens: int  # target tokens processed (= effective batch × block size when none are ignored)
    micro_batches: list[int]
    grad_norm: float | None
    skipped: bool = False  # fp16: the scaler found inf/NaN gradients and skipped the update


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor,
               y: torch.Tensor, micro_batches: list[int], *, dtype: str = "float32",
               scaler: torch.amp.GradScaler | None = None, grad_clip: float = 0.0,
               forward: torch.nn.Module | None = None, step: int | None = None,
               fault: FaultInjector | None = None) -> StepResult:
    """One optimizer step over x, y (B x T, any device; slices are moved to the model's device).

    Each micro-batch's mean loss is weighted by its share of the step's target tokens, so the
    accumulated gradient equals that of one batch of B sequences whatever the split.
    `forward` is the module to call (e.g. the torch.compile'd model); the optimizer holds the
    parameters of `model`. On an exception the gradients may be partly accumulated: the caller
    cleans up (zero_grad(set_to_none=True)) before redoing the step.
    """
    if sum(micro_batches) != x.shape[0]:
        raise ValueError(f"micro-batches {micro_batches} do not add up to the batch of {x.shape[0]}")
    forward = model if forward is None else forward  # a compiled module has no truth value
    device = next(model.parameters()).device
    n_valid = (y != -1)
    total_tokens = int(n_valid.sum())
    loss_sum = torch.zeros((), device=device)
    is_ddp = hasattr(model, "require_backward_grad_sync")
    start = 0
    for i, mb in enumerate(micro_batches):
        if fault is not None:
            fault.check(step, i)
        share = int(n_valid[start:start + mb].sum()) / max(total_tokens, 1)
        xb = x[start:start + mb].to(device, non_blocking=True)
        yb = y[start:start + mb].to(device, non_blocking=True)
        start += mb
        if is_ddp:  # only the last micro-batch all-reduces the gradients
            model.require_backward_grad_sync = i == len(micro_batches) - 1
        with autocast(device.type, dtype):
            loss = forward(xb, yb) * share
        (scaler.scale(loss) if scaler is not None else loss).backward()
        loss_sum += loss.detach()
        del loss, xb, yb
    grad_norm = None
    if scaler is not None:
        scaler.unscale_(optimizer)
    if grad_clip > 0.0:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip))
    skipped = False
    if scaler is not None:
        scale_before = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        skipped = scaler.get_scale() < scale_before
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss=float(loss_sum), tokens=total_tokens, micro_batches=list(micro_batches),
                      grad_norm=grad_norm, skipped=skipped)
