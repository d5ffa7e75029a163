"""A trial: the trainer's own train step, run for real on the device for a few optimizer steps
with one candidate. It records peak memory, tokens/s from the steps after the first, and how
many optimizer steps actually ran; an out-of-memory error is caught and recorded.

Every trial builds a fresh model and optimizer and drops them afterwards, so trials leave no
trace in the training run.
"""
from __future__ import annotations

import gc
import time
from dataclasses import dataclass

import torch

from autofit.records import Candidate, TrialRecord
from trainer.compiler import compile_model
from trainer.model import GPT, GPTConfig
from trainer.step import make_optimizer, train_step


@dataclass
class TrialSettings:
    """How trials run: optimizer steps per trial, the compile backend, the seed of the model and
    batch, and whether to treat a large slowdown as a spill."""
    steps: int = 2  # optimizer steps; the first allocates AdamW state, the rest are timed
    compile_backend: str = "inductor"
    seed: int = 0
    # Treat a >3x jump in time per token as a spill to host memory. None: on CUDA only, where
    # drivers (Windows' sysmem fallback) page instead of raising OOM; on a CPU the budget always
    # raises, and timing noise on a busy machine would only cause false alarms.
    spill_check: bool | None = None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _run_steps(state: dict, cfg, cand: Candidate, device, rank_batch: int, settings: TrialSettings,
               rec: TrialRecord) -> None:
    """Runs the steps, keeping every tensor in `state` so the caller can drop them all."""
    tdev = device.torch_device
    model_cfg = GPTConfig.from_train_config(cfg)
    model_cfg.checkpointing = cand.checkpointing
    model_cfg.loss_impl = cand.loss_impl
    torch.manual_seed(settings.seed)
    state["model"] = model = GPT(model_cfg).to(tdev)
    state["opt"] = opt = make_optimizer(model, learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                        betas=(cfg.beta1, cfg.beta2), device_type=tdev.type)
    scaler = state["scaler"] = torch.amp.GradScaler(tdev.type) if cand.dtype == "float16" else None
    # A fresh compile per trial (no graphs cached from the last one), compiled as the trainer
    # compiles it.
    fwd = state["fwd"] = compile_model(model, settings.compile_backend) if cand.compile else model
    # Two micro-batches per step when training will accumulate: the second forward then runs
    # with the first's gradients alive, as in training. Compiled, the second one has the short
    # last size of the ragged split, so that shape's compile is measured too.
    micro = [cand.micro_batch] * (2 if rank_batch > cand.micro_batch else 1)
    if cand.compile and len(micro) == 2 and rank_batch % cand.micro_batch:
        micro[1] = rank_batch % cand.micro_batch
    g = torch.Generator().manual_seed(settings.seed)
    n = sum(micro)
    # Training samples the whole optimizer step's batch on the host. On a GPU that is host
    # memory; on the budgeted CPU device it counts, so hold a batch of that size here too.
    rows = max(n, rank_batch) if tdev.type == "cpu" else n
    state["x"] = x = torch.randint(0, cfg.vocab_size, (rows, cfg.block_size), generator=g)[:n]
    state["y"] = y = torch.randint(0, cfg.vocab_size, (rows, cfg.block_size), generator=g)[:n]
    device.reset_peak()
    times = []
    for i in range(settings.steps):
        t0 = time.perf_counter()
        res = train_step(model, opt, x, y, micro, dtype=cand.dtype, scaler=scaler, grad_clip=cfg.grad_clip,
                         forward=fwd)
        _sync(tdev)
        times.append(time.perf_counter() - t0)
        rec.steps_run = i + 1
        if not torch.isfinite(torch.tensor(res.loss)):
            rec.note = "loss is not finite"
    rec.measured_peak_bytes = device.peak_bytes()
    rec.measured_reserved_bytes = device.peak_reserved_bytes()
    steady = times[1:] or times
    step_s = sum(steady) / len(steady)
    rec.tokens_per_s = n * cfg.block_size / step_s
    if cand.compile:  # the first step traced and compiled; report that apart from step time
        rec.compile_seconds = max(0.0, times[0] - step_s)


def run_trial(cfg, cand: Candidate, device, *, rank_batch: int, budget_bytes: int,
              capacity_bytes: int | None = None, estimated_peak_bytes: int | None = None,
              settings: TrialSettings | None = None) -> TrialRecord:
    """One candidate for `settings.steps` optimizer steps of `rank_batch` sequences on `device`
    (an autofit.device.Device), as the trainer would run them. Returns its TrialRecord: status
    'fit' (ran every step, peak within `budget_bytes`; on CUDA the reserved peak counts), 'oom',
    'over_budget', 'spill' (memory above `capacity_bytes`: the driver paged to host RAM) or
    'error', with measured peak allocated/reserved bytes and tokens/s from the steps after the
    first. Raises ValueError for fewer than 2 steps."""
    settings = settings or TrialSettings()
    if settings.steps < 2:
        raise ValueError("a trial runs at least 2 optimizer steps (the first allocates AdamW state)")
    rec = TrialRecord(**cand.model_dump(), status="error", estimated_peak_bytes=estimated_peak_bytes)
    state: dict = {}
    failure: str | None = None
    kind = "error"
    t0 = time.perf_counter()
    with device.tracking():
        try:
            _run_steps(state, cfg, cand, device, rank_batch, settings, rec)
        except Exception as e:  # classify only; clean up below, outside the except block
            kind = "oom" if device.is_oom(e) else "error"
            failure = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:160] if str(e).strip() else ''}"
        # The traceback (and with it the failed step's activations) is released once the except
        # block has ended; now drop our own references and give the memory back.
        if state.get("opt") is not None:
            state["opt"].zero_grad(set_to_none=True)
        state.clear()
        gc.collect()
        device.cleanup()
    rec.seconds = time.perf_counter() - t0
    if failure is not None:
        rec.status = kind
        rec.note = failure
        return rec
    if rec.steps_run < settings.steps:  # cannot happen without an exception; never call it a fit
        rec.status, rec.note = "error", f"only {rec.steps_run} of {settings.steps} optimizer steps ran"
    elif capacity_bytes is not None and rec.measured_peak_bytes is not None and \
            max(rec.measured_peak_bytes, rec.measured_reserved_bytes or 0) > capacity_bytes:
        rec.status = "spill"
        rec.note = "memory above the card's capacity: the driver spilled to host RAM instead of raising OOM"
    elif rec.measured_peak_bytes is not None and \
            max(rec.measured_peak_bytes, rec.measured_reserved_bytes or 0) > budget_bytes:
        # On CUDA what runs out is reserved memory (the caching allocator's segments), which is
        # never below allocated, so the plan must fit with its reserved peak.
        rec.status = "over_budget"
        rec.note = "ran, but its peak (reserved, on CUDA) is above the budget"
    else:
        rec.status = "fit"
    return rec
