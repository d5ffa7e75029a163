"""The one train step: one optimizer step over a batch of sequences, split into micro-batches.

The launcher's trials call exactly this function, and so does the training loop, so memory
measured in a trial is the memory of training (DESIGN.md, rule 1). Everything that changes
memory (micro-batch sizes, dtype, scaler) is an argument, not a global.
"""
from __future__ import annotations

import contextlib
import inspect
import itertools
import os
from dataclasses import dataclass
from typing import Callable

import torch

from trainer.meter import is_oom
from trainer.muon import MuonAdamW, is_block_matrix

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def split_batch(effective_batch: int, micro_batch: int) -> list[int]:
    """Sizes of the micro-batches of one optimizer step, balanced: as few micro-batches of at most
    `micro_batch` sequences as the effective batch needs, sizes differing by at most one (larger
    first), so the sum is exactly the effective batch (never rounded to a multiple) and no step
    ends on a tiny micro-batch (21 at 10 is [7, 7, 7], not [10, 10, 1]).
    Raises ValueError for sizes below 1."""
    if effective_batch < 1 or micro_batch < 1:
        raise ValueError(f"batch sizes must be positive (effective {effective_batch}, micro {micro_batch})")
    n = -(-effective_batch // min(micro_batch, effective_batch))  # ceil
    size, extra = divmod(effective_batch, n)
    return [size + 1] * extra + [size] * (n - extra)


def describe_split(micro_batches: list[int]) -> str:
    """'512 = 27 × 18 + 26' (one short micro-batch) or '512 = 40 × 5 + 39 × 8' text for a list
    of micro-batch sizes, largest first."""
    total = sum(micro_batches)
    sizes = sorted(set(micro_batches), reverse=True)
    parts = [f"{sizes[0]} × {micro_batches.count(sizes[0])}"]
    for s in sizes[1:]:
        k = micro_batches.count(s)
        parts.append(f"{s}" if k == 1 else f"{s} × {k}")
    return f"{total} = " + " + ".join(parts)


def autocast(device_type: str, dtype: str):
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=DTYPES[dtype])


def cuda_bf16_supported(device: torch.device) -> bool:
    """bf16 tensor cores: compute capability 8.0 (Ampere) or newer. torch.cuda.is_bf16_supported()
    answers True on older cards too, where bf16 is emulated and slow, so it is not asked."""
    return tuple(torch.cuda.get_device_capability(device)) >= (8, 0)


def check_dtype(dtype: str, device: torch.device) -> str:
    """The dtype to train in on `device` ('auto' picks as nanoGPT does: bf16 where the card has
    it, else fp16; fp32 on a CPU). Raises ValueError for bfloat16 on a GPU without bf16."""
    cuda = device.type == "cuda"
    bf16 = not cuda or cuda_bf16_supported(device)
    if dtype == "auto":
        return ("bfloat16" if bf16 else "float16") if cuda else "float32"
    if dtype == "bfloat16" and not bf16:
        cc = ".".join(map(str, torch.cuda.get_device_capability(device)))
        raise ValueError(bf16_refusal(cc))
    return dtype


def no_bf16_words(cc: str | None) -> str:
    """Why a GPU of compute capability `cc` ('7.5') runs no bfloat16: its tensor cores lack it."""
    return f"this GPU has no bf16 support (compute capability {cc or '?'} < 8.0)"


def bf16_refusal(cc: str | None) -> str:
    """The one line for bfloat16 asked of a GPU without bf16 tensor cores."""
    return (f"dtype bfloat16: {no_bf16_words(cc)}; use "
            f"dtype = 'float16' (the same memory, with a GradScaler) or 'auto'")


def set_matmul_precision(tf32: bool) -> None:
    """fp32 matmuls on TF32 tensor cores ('high', as nanoGPT sets it) or in full fp32 ('highest').
    torch's switch is process-wide, so trials and training set it the same way before running."""
    torch.set_float32_matmul_precision("high" if tf32 else "highest")


def make_optimizer(model: torch.nn.Module, *, learning_rate: float, weight_decay: float,
                   betas: tuple[float, float], device_type: str, optimizer: str = "adamw",
                   muon_lr: float = 0.02):
    """nanoGPT's AdamW: weight decay on matrices and embeddings only; fused kernel on CUDA.

    optimizer='muon': torch.optim.Muon (momentum 0.95, Nesterov, weight decay `weight_decay`) for
    the 2-D matrices of the transformer blocks at `muon_lr`, nanoGPT's AdamW for the rest
    (embeddings, head, norms, biases), as nanochat and modded-nanogpt split them; the two are
    stepped as one (trainer.muon.MuonAdamW). A matrix that holds several projections (c_attn's
    Q|K|V, SwiGLU's gate|up: GPT.fused_rows) is orthogonalised block by block, as nanochat's
    separate c_q, c_k, c_v are. The Muon group carries lr_scale = muon_lr / learning_rate, so a
    schedule that sets every group's lr to lr * lr_scale keeps the ratio. Raises ValueError for an
    unknown optimizer or a torch without torch.optim.Muon."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    muon = [(n, p) for n, p in named if optimizer == "muon" and is_block_matrix(n, p)]
    chosen = {id(p) for _, p in muon}
    rest = [p for _, p in named if id(p) not in chosen]
    groups = [{"params": [p for p in rest if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}]
    fused = device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
    adamw = torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **({"fused": True} if fused else {}))
    if optimizer == "adamw":
        return adamw
    if optimizer != "muon":
        raise ValueError(f"optimizer must be 'adamw' or 'muon', not {optimizer!r}")
    if not hasattr(torch.optim, "Muon"):
        raise ValueError(f"optimizer 'muon' needs torch.optim.Muon, which torch {torch.__version__} lacks")
    fused_rows = model.fused_rows() if hasattr(model, "fused_rows") else {}
    return MuonAdamW.over(muon, fused_rows, adamw, lr=muon_lr, lr_scale=muon_lr / learning_rate,
                          weight_decay=weight_decay)


class InjectedOOM(torch.OutOfMemoryError):
    """A real torch.OutOfMemoryError (handled as any other), marked so that a demo or test fault
    is not written into a saved profile as a lesson about the card."""


class UpdateOOM(torch.OutOfMemoryError):
    """Out of memory inside the optimizer update (train_step): part of the update (some parameters,
    some moments) may already be applied, so the step cannot be redone as it was. The trainer
    stops on it (trainer.redo) where it shrinks and redoes an OOM in the micro-batches, adding to
    its line where to go on from (only the trainer knows its checkpoint); a probe's trial records
    it as any OOM."""


class FaultInjector:
    """Raises a real torch.OutOfMemoryError at the first micro-batch of optimizer step `at_step`,
    once, on every rank or only on rank `on_rank`. Read from AUTOFIT_FAULT_OOM_AT_STEP so tests
    and demos can exercise OOM recovery: `3` is step 3 on every rank, `3@1` step 3 on rank 1 only."""

    def __init__(self, at_step: int | None, on_rank: int | None = None, rank: int = 0):
        self.at_step = at_step if on_rank is None or on_rank == rank else None
        self.fired = False

    @classmethod
    def from_env(cls, rank: int = 0, world_size: int | None = None) -> "FaultInjector":
        """Raises ValueError for a value that is not STEP or STEP@RANK (non-negative integers), or
        whose RANK is not one of `world_size` ranks (where given): it would never fire."""
        raw = os.environ.get("AUTOFIT_FAULT_OOM_AT_STEP", "").strip()
        if not raw:
            return cls(None)
        step, at_sign, on = raw.partition("@")
        try:
            at, on_rank = int(step), (int(on) if at_sign else None)  # '3@' names no rank: refused
            if at < 0 or (on_rank is not None and on_rank < 0):
                raise ValueError
        except ValueError:
            raise ValueError(f"AUTOFIT_FAULT_OOM_AT_STEP must be a step, or STEP@RANK for one rank only "
                             f"(e.g. 3 or 3@1), got {raw!r}") from None
        if on_rank is not None and world_size is not None and on_rank >= world_size:
            raise ValueError(f"AUTOFIT_FAULT_OOM_AT_STEP={raw} names rank {on_rank}, but this run has {world_size} "
                             f"rank{'s' * (world_size != 1)}, 0 to {world_size - 1}: it would never fire")
        return cls(at, on_rank, rank)

    def check(self, step: int | None, micro_index: int) -> None:
        if self.at_step is not None and not self.fired and step == self.at_step and micro_index == 0:
            self.fired = True
            raise InjectedOOM(
                f"injected out-of-memory at optimizer step {step} (AUTOFIT_FAULT_OOM_AT_STEP)")


@dataclass
class StepResult:
    """What one optimizer step did. The loss, gradient norm and fp16 skip flag stay on the device
    as tensors until read: reading one waits for the device (a host sync), so the loop reads
    them only on the steps it logs."""
    loss_tensor: torch.Tensor  # 0-dim, mean loss over every target token of the step
    tokens: int  # target tokens processed (= effective batch × block size when none are ignored)
    micro_batches: list[int]
    grad_norm_tensor: torch.Tensor | None = None  # before clipping; None without clipping
    skipped_tensor: torch.Tensor | None = None  # fp16: the scaler found inf/NaN and skipped the update

    @property
    def loss(self) -> float:
        return float(self.loss_tensor)

    @property
    def grad_norm(self) -> float | None:
        return None if self.grad_norm_tensor is None else float(self.grad_norm_tensor)

    @property
    def skipped(self) -> bool:
        return bool(self.skipped_tensor) if self.skipped_tensor is not None else False


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor,
               y: torch.Tensor, micro_batches: list[int], *, dtype: str = "float32",
               scaler: torch.amp.GradScaler | None = None, grad_clip: float = 0.0,
               forward: torch.nn.Module | None = None, step: int | None = None,
               fault: FaultInjector | None = None, sync_grads=None,
               before_update: Callable[[], None] | None = None) -> StepResult:
    """One optimizer step over x, y (B x T int64 token ids, on the host or the device; slices are
    copied to the model's device without blocking, from pinned memory when the caller pinned it).
    With y = None, x is a step batch too large to hold (trainer.data.batches.LazyStepBatch: len(),
    block_size, rows(start, stop) -> host x, y), read one micro-batch at a time.

    Each micro-batch's mean loss is weighted by its share of the step's target tokens, so the
    accumulated gradient equals that of one batch of B sequences whatever the split.
    `forward` is the module to call (e.g. the torch.compile'd model); the optimizer holds the
    parameters of `model`. `sync_grads`: several ranks' wrapper (trainer.distributed.sharding: DDP or FSDP2):
    each micro-batch runs in its `micro_batch(last)` context (gradients sync on the last only),
    and its `finish()` agrees with the other ranks and syncs the gradients before the optimizer
    step; it raises an out-of-memory error when another rank ran out of memory, so every rank
    redoes the step. Several ranks also agree (sync_grads.agreement) just before the optimizer's
    step, so an OOM in unscaling or clipping on one rank is redone by all (nothing has moved yet),
    and just after it, so a rank whose update failed half-way (UpdateOOM, not redone) stops every
    rank before the loop's next collective. `before_update`: called once the micro-batches are done (gradients synced),
    just before the optimizer update: a probe's trial times the update apart there, because a
    run pays it once per optimizer step, not once per trial's micro-batches. No host sync happens
    here (but in what `before_update` does): the result's
    figures are device tensors. On an exception the gradients may be partly accumulated: the
    caller cleans up (zero_grad(set_to_none=True)) before redoing the step.
    Raises ValueError when the micro-batches do not add up to the batch.
    """
    forward = model if forward is None else forward  # a compiled module has no truth value
    device = next(model.parameters()).device
    total_tokens, pieces = _micro_pieces(x, y, micro_batches)
    # several ranks: Muon's block views are linked after the sync, not during backward (trainer.muon)
    paused = getattr(optimizer, "linking_paused", None)
    with paused() if paused is not None and sync_grads is not None else contextlib.nullcontext():
        loss_sum = _accumulate(forward, pieces, len(micro_batches), device, dtype, scaler, fault, step, sync_grads)
    if before_update is not None:
        before_update()
    # no weight has moved before the optimizer's step: an OOM up to there (unscaling, clipping) is
    # redone as one in the micro-batches is; several ranks agree on it before any rank steps
    grad_norm = _ready_grads(model, optimizer, scaler, grad_clip, sync_grads)
    agreement = getattr(sync_grads, "agreement", None)  # several ranks' (trainer.distributed.ranks)
    if agreement is not None:
        agreement.check_in()
    skipped = _apply_update(optimizer, scaler, step)
    if agreement is not None:  # every rank's update applied, before any collective of the loop
        agreement.settle()  # (the logged loss's mean) could meet a failed rank's report instead
    optimizer.zero_grad(set_to_none=sync_grads is None or sync_grads.zero_grad_to_none)
    return StepResult(loss_tensor=loss_sum, tokens=total_tokens, micro_batches=list(micro_batches),
                      grad_norm_tensor=grad_norm, skipped_tensor=skipped)


def _accumulate(forward, pieces, n: int, device: torch.device, dtype: str, scaler, fault, step,
                sync_grads) -> torch.Tensor:
    """Forward and backward of each of the `n` (share, x, y) micro-batches in `pieces`, gradients
    accumulated (and synced across ranks after the last); returns the step's loss, a device tensor."""
    loss_sum = torch.zeros((), device=device)
    for i, (share, xb, yb) in enumerate(pieces):
        if fault is not None:
            fault.check(step, i)
        xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
        sync = contextlib.nullcontext() if sync_grads is None else sync_grads.micro_batch(i == n - 1)
        with sync:
            with autocast(device.type, dtype):
                loss = forward(xb, yb) * share
            (scaler.scale(loss) if scaler is not None else loss).backward()
        loss_sum += loss.detach()
        del loss, xb, yb
    if sync_grads is not None:
        sync_grads.finish()
    return loss_sum


def _micro_pieces(x, y, micro_batches: list[int]):
    """(target tokens of the step, an iterator of (share of them, x rows, y rows) per micro-batch).
    y = None: x is a LazyStepBatch, whose rows are read here one micro-batch at a time (sampled
    windows: every target counts). Raises ValueError when the micro-batches do not add up."""
    n = len(x) if y is None else x.shape[0]
    if sum(micro_batches) != n:
        raise ValueError(f"micro-batches {micro_batches} do not add up to the batch of {n}")
    if y is None:
        total = n * x.block_size
        starts = [0, *itertools.accumulate(micro_batches)]
        return total, ((mb * x.block_size / max(total, 1), *x.rows(a, a + mb)) for a, mb in zip(starts, micro_batches))
    n_valid = (y != -1)
    # token counts come from the host copy of the targets: no device sync
    counts = n_valid.sum(dim=1).tolist() if y.device.type == "cpu" else None
    total = sum(counts) if counts is not None else int(n_valid.sum())

    def pieces():
        start = 0
        for mb in micro_batches:
            got = sum(counts[start:start + mb]) if counts is not None else int(n_valid[start:start + mb].sum())
            yield got / max(total, 1), x[start:start + mb], y[start:start + mb]
            start += mb
    return total, pieces()


def prime_optimizer(model: torch.nn.Module, opt: torch.optim.Optimizer, keep_grads: bool) -> None:
    """Makes AdamW's state (exp_avg, exp_avg_sq, step) and the gradients now, before any timed
    step, by one optimizer step on zero gradients at learning rate 0 (no weight moves: the decay
    is lr x weight_decay = 0 and the update is lr x ... = 0). `keep_grads`: leave the zero
    gradients allocated; training and the probe's trials drop them (set_to_none), so that step 1's
    first backward makes them as every training step's does: under DDP as views of its buckets
    (gradient_as_bucket_view), beside which kept zeros would be a copy; with one process kept zeros
    were a copy a single micro-batch's trial measured and training never holds (7 % of a small
    model's peak). The state's step counters
    are then set back to 0, so the first real step is a fresh optimizer's (its moments and Muon's
    momentum are zeros, as lazily made ones are): training primed so runs nanoGPT's numbers, and
    its optimizer state is made before step 0, not inside its first update (autofit's trials
    prime it too: an OOM in step 1, not at the end of it)."""
    for p in model.parameters():
        if p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)
    lrs = [g["lr"] for g in opt.param_groups]
    for g in opt.param_groups:
        g["lr"] = 0.0
    try:
        opt.step()
    except BaseException:  # an OOM: half-made state (AdamW's step and exp_avg, no exp_avg_sq) breaks a redo
        for st in opt.state.values():
            st.clear()
        raise
    finally:
        for g, lr in zip(opt.param_groups, lrs):
            g["lr"] = lr
    opt.zero_grad(set_to_none=not keep_grads)
    for st in opt.state.values():
        if torch.is_tensor(st.get("step")):
            st["step"].zero_()
        elif "step" in st:
            st["step"] = 0


def _ready_grads(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None,
                 grad_clip: float, sync_grads=None) -> torch.Tensor | None:
    """Unscale (fp16) and clip the accumulated gradients; no weight moves here, so an OOM is
    redone with the step. Returns the gradient norm before clipping (a device tensor, no host
    sync; None without clipping). Several ranks' wrapper may clip its own way (FSDP2's
    `clip_grad_norm`: an agreement round before the norm's all-reduce)."""
    if hasattr(optimizer, "link_grads"):  # Muon's block views see their fused matrices' gradients now,
        optimizer.link_grads()  # so the scaler unscales and checks them (trainer.muon)
    if scaler is not None:
        scaler.unscale_(optimizer)
    if grad_clip <= 0.0:
        return None
    clip = getattr(sync_grads, "clip_grad_norm", None) or torch.nn.utils.clip_grad_norm_
    return clip(model.parameters(), grad_clip)


def _apply_update(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None, step: int | None):
    """The optimizer's step on the ready gradients. Returns `skipped` (see _optimizer_update).
    Raises UpdateOOM for any OOM: part of the update may be applied, so it is not redone."""
    try:
        return _optimizer_update(optimizer, scaler)
    except Exception as e:
        # any OOM, as the loop knows one (trainer.meter.is_oom): torch.OutOfMemoryError, or a
        # RuntimeError told by its message alone (ROCm's "HIP out of memory", cuBLAS's alloc failure)
        if isinstance(e, UpdateOOM) or not is_oom(e):
            raise
        raise UpdateOOM(f"out of memory inside the optimizer update{'' if step is None else f' of step {step}'}: "
                        f"part of it may already be applied, so the step cannot be redone") from e


def _optimizer_update(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None):
    """Apply the ready gradients (fp16: through the scaler, which skips a step with inf/NaN).

    Returns `skipped`: a device tensor (True when fp16's scaler found inf/NaN gradients and
    skipped the step: its scale fell) or None without a scaler; no host sync happens here.
    """
    if scaler is None:
        optimizer.step()
        return None
    # the scale falls when the step is skipped; compared on the device, read only when logged
    scale_before = scaler._scale.clone() if getattr(scaler, "_scale", None) is not None else None
    scaler.step(optimizer)
    scaler.update()
    return scaler._scale < scale_before if scale_before is not None else None
