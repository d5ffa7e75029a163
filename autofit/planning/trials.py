"""A trial: the trainer's own train step, run for real on the device for a few optimizer steps
with one candidate. It records peak memory, tokens/s (the fastest step's: load from other
processes only slows a step; a compiled trial's first step, the compile, is not counted), each
timed step's wall and (on a CPU device) CPU time, and how many optimizer steps actually ran; an out-of-memory error is caught and
recorded, and a trial that does not give its memory back is recorded as a leak.

The optimizer's state is made before the first step (AdamW with a learning rate of 0: no weight
moves), and the gradients are left between steps as training leaves them, so the first step
already holds training's steady-state memory and a size that does not fit runs out of memory in
step 1, not at the end of step 1 when AdamW would otherwise allocate its state. Each step's
optimizer update is timed apart (a run pays it once per optimizer step, not per trial).

Every trial builds a fresh model and optimizer and drops them afterwards (compiled graphs too),
so trials leave no trace in each other or in the training run.
"""
from __future__ import annotations

import contextlib
import gc
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

from trainer.data.batches import held_rows

from autofit.planning import agree
from autofit.records import Candidate, TrialRecord, judged_peak
from trainer.compiler import compile_model
from trainer.distributed.ranks import ERROR, OtherRankOOM, RankFailed, first_line, rank_failed
from trainer.model.gpt import GPT, GPTConfig
from trainer.step import make_optimizer, prime_optimizer, set_matmul_precision, train_step

# After a trial, allocated memory must be back at its baseline within this much. cuBLAS keeps a
# workspace per (handle, stream) in the caching allocator (32 MiB each on Hopper; the forward's
# thread and autograd's backward thread each have a handle), but the CUDA device's cleanup frees
# them (trainer.meter.CudaMeter.cleanup), so they are counted in every trial's peak (and in the
# estimate), not tolerated here; what is left is a few small library buffers. The GPU
# self-check judges the trials' baselines by this same table (scripts/selfcheck/figures.py).
LEAK_TOLERANCE_BYTES = {"cuda": 8 * 2**20, "cpu": 64 * 2**10}


@dataclass
class TrialSettings:
    """How trials run: optimizer steps per trial (each one timed, but a compiled candidate's
    first, the compile; two: the primed first step proves the fit, the second is a reading a
    first-use cost did not slow), the compile backend, the seed of the model and batch, and
    whether to treat a large slowdown as a spill."""
    steps: int = 2
    compile_backend: str = "inductor"
    seed: int = 0
    # Treat a >3x jump in time per token as a spill to host memory. None: where a driver can
    # spill instead of raising OOM (Windows' and WSL's sysmem fallback); elsewhere it would only
    # misfire on timing noise.
    spill_check: bool | None = None
    # A stop was asked for (Ctrl-C/SIGTERM, trainer.interrupt.StopFlag): checked after each trial.
    stop: Callable[[], bool] = lambda: False
    # Called with each trial's record as soon as it is made (run or pruned; on rank 0 only), before
    # the next trial starts: `autofit probe`/`run` append it to AUTOFIT_TRIALS_JSONL (launch.probe).
    on_trial: Callable[[TrialRecord], None] = lambda r: None


@contextlib.contextmanager
def new_objects_only():
    """While probing, Python's cycle collector skips every object that existed before the probe
    (gc.freeze; gc.unfreeze after): each trial's cleanup (one gc.collect) then walks only what the
    trials made, and a trial's garbage is all made by it. A full collection with torch imported
    took 0.12 s on this workplace's 2-core CPU, two thirds of a trial of a small model (0.18 s
    per trial, 0.06 s with the heap frozen: measured on the L2 C64 T64 shape of
    scripts/bench_plan_quality.py --small)."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def trial_split(rank_batch: int, micro_batch: int) -> list[int]:
    """The micro-batches one trial step runs: two of exactly `micro_batch` sequences (one when the
    whole batch fits in one), so the trial measures memory and speed at that size with the first
    micro-batch's gradients alive during the second, as in training. Compiled and eager
    candidates run the same split, so their tokens/s compare. (A run capped at this size uses
    balanced micro-batches of at most it, never more memory.)"""
    return [micro_batch] if rank_batch <= micro_batch else [micro_batch, micro_batch]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _run_steps(state: dict, cfg, cand: Candidate, device, rank_batch: int, settings: TrialSettings,
               rec: TrialRecord) -> None:
    """Runs the steps, keeping every tensor in `state` so the caller can drop them all."""
    tdev = device.torch_device
    model_cfg = GPTConfig.from_train_config(cfg)
    model_cfg.checkpointing = cand.checkpointing
    model_cfg.checkpointing_policy = cand.checkpointing_policy  # the lever's, not the config's
    model_cfg.loss_impl = cand.loss_impl
    torch.manual_seed(settings.seed)
    state["agreement"] = agreement = agree.agreement()  # several ranks: how each attempt ended
    with torch.device(tdev):  # built on the device: no host init of a big model, then a copy
        state["model"] = model = GPT(model_cfg)
    # several ranks: the step runs under the same DDP / FSDP2 wrapper as training, so its buckets
    # and all-gather buffers are measured, and an OOM on one rank is agreed by all
    state["parallel"] = parallel = agree.trial_wrapper(model, tdev, agreement, "fsdp2" if cand.sharded else "ddp")
    state["opt"] = opt = make_optimizer(model, learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                        betas=(cfg.beta1, cfg.beta2), device_type=tdev.type,
                                        optimizer=cfg.optimizer, muon_lr=cfg.muon_lr)
    # steady-state memory from the start: a size that does not fit fails in step 1. The gradients
    # dropped, as training primes (trainer.redo); under DDP the rewrap below gives the reducer zero
    # gradients to make views of its buckets (sharding.DataParallel.rewrap), as training's step 0
    # has them: without it the first step held its no_sync gradients beside the buckets
    prime_optimizer(model, opt, keep_grads=False)
    scaler = state["scaler"] = torch.amp.GradScaler(tdev.type) if cand.dtype == "float16" else None
    # A fresh compile per trial (no graphs cached from the last one), compiled as the trainer
    # compiles it.
    fwd = state["fwd"] = compile_model(model, settings.compile_backend, cfg.compile_scope) if cand.compile else model
    if parallel is not None:
        if cand.compile or parallel.kind == "ddp":  # DDP: gradients as bucket views from step 1, as training's
            parallel.rewrap(fwd)
        fwd = parallel.module if parallel.kind == "ddp" else fwd
    micro = trial_split(rank_batch, cand.micro_batch)
    g = torch.Generator().manual_seed(settings.seed)
    n = sum(micro)
    # Training samples the whole optimizer step's batch on the host (unless it is too large to
    # hold: then one micro-batch at a time, trainer.data.batches). On a GPU that is host memory; on
    # the budgeted CPU device it counts, so hold what training holds here too.
    rows = max(n, held_rows(rank_batch, cfg.block_size)) if tdev.type == "cpu" else n
    state["x"] = x = torch.randint(0, cfg.vocab_size, (rows, cfg.block_size), generator=g)[:n]
    state["y"] = y = torch.randint(0, cfg.vocab_size, (rows, cfg.block_size), generator=g)[:n]
    device.reset_peak()
    wall, cpu = _timed_steps(rec, settings.steps, tdev, lambda mark: train_step(
        model, opt, x, y, micro, dtype=cand.dtype, scaler=scaler, grad_clip=cfg.grad_clip, forward=fwd,
        sync_grads=parallel, before_update=mark))
    rec.measured_peak_bytes = device.peak_bytes()
    rec.measured_reserved_bytes = device.peak_reserved_bytes()
    rec.optimizer_step_tokens = rank_batch * cfg.block_size
    _record_times(rec, cand, n * cfg.block_size, wall, cpu if tdev.type == "cpu" else [])


def _timed_steps(rec: TrialRecord, steps: int, tdev: torch.device, step) -> tuple[list, list]:
    """Runs `steps` optimizer steps, `step(mark)` each (train_step calls `mark` when its
    micro-batches are done and the optimizer update starts). Returns, per step, the wall and the
    CPU clock at its start, at its update's start and at its end (the device synced at each)."""
    wall: list[list[float]] = []
    cpu: list[list[float]] = []

    def mark() -> None:
        _sync(tdev)
        wall[-1].append(time.perf_counter())
        cpu[-1].append(time.process_time())
    for i in range(steps):
        wall.append([time.perf_counter()])
        cpu.append([time.process_time()])
        res = step(mark)
        mark()
        rec.steps_run = i + 1
        if not torch.isfinite(res.loss_tensor):
            rec.note = "loss is not finite"
    return wall, cpu


def _record_times(rec: TrialRecord, cand: Candidate, tokens: int, wall: list[list[float]],
                  cpu: list[list[float]]) -> None:
    """Every eager step is a reading: the optimizer state was primed, so step 1 already runs at
    training's steady state (first-use costs only slow it, and the fastest step is the figure).
    A compiled trial's step 1 traced and compiled: not a reading, reported apart. `wall`, `cpu`:
    per step the clock at its start, when its optimizer update started, and at its end."""
    first = 1 if cand.compile else 0
    times = [c[2] - c[0] for c in wall]
    rec.tokens_per_step = tokens
    rec.step_seconds = times[first:]
    rec.update_seconds = [c[2] - c[1] for c in wall][first:]
    rec.step_cpu_seconds = [c[2] - c[0] for c in cpu][first:]
    rec.update_cpu_seconds = [c[2] - c[1] for c in cpu][first:]
    rec.tokens_per_s = tokens / min(rec.step_seconds)
    if cand.compile:
        rec.compile_seconds = max(0.0, times[0] - statistics.median(times[1:]))


def run_trial(cfg, cand: Candidate, device, *, rank_batch: int, budget_bytes: int,
              capacity_bytes: int | None = None, estimated_peak_bytes: int | None = None,
              settings: TrialSettings | None = None) -> TrialRecord:
    """One candidate for `settings.steps` optimizer steps of `rank_batch` sequences on `device`
    (an autofit.devices.device.Device), as the trainer would run them. Returns its TrialRecord: status
    'fit' (ran every step, peak within `budget_bytes`; on CUDA the reserved peak counts), 'oom',
    'over_budget', 'spill' (memory above `capacity_bytes`: the driver paged to host RAM), 'leak'
    (allocated memory not back at its baseline afterwards) or 'error', with measured peak
    allocated/reserved bytes and tokens/s. Raises ValueError for fewer than 2 steps."""
    settings = settings or TrialSettings()
    if settings.steps < 2:
        raise ValueError("a trial runs at least 2 optimizer steps (the first allocates AdamW state)")
    rec = TrialRecord(**cand.model_dump(), status="error", estimated_peak_bytes=estimated_peak_bytes)
    state: dict = {}
    failure: str | None = None
    kind = "error"
    set_matmul_precision(cfg.tf32)
    t0 = time.perf_counter()
    with device.tracking():
        baseline = device.current_bytes()
        # several ranks: whether they know how this trial ended; met another rank's OOM; met its OOM or error
        agreed, other, met, reason = True, False, False, ""
        try:
            _run_steps(state, cfg, cand, device, rank_batch, settings, rec)
        except Exception as e:  # classify only; clean up below, outside the except block
            kind = "oom" if device.is_oom(e) else "error"
            failure, reason = _note(e), first_line(e)
            # RankFailed comes out of an agreement round (raise_for): the ranks know already, and a
            # round more would wait for one the failed rank never enters (lost contact, not its line)
            agreed = getattr(e, "agreed", False) or isinstance(e, RankFailed) or state.get("agreement") is None
            other = isinstance(e, OtherRankOOM)  # met in a check-in (FSDP2): not entered as this rank's own
            met = isinstance(e, (OtherRankOOM, RankFailed))  # the record says so (agree.trial)
        # The traceback (and with it the failed step's activations) is released once the except
        # block has ended; now drop our own references and give the memory back.
        if state.get("opt") is not None:
            state["opt"].zero_grad(set_to_none=True)
        agreement = state.get("agreement")
        state.clear()
        if not agreed:  # the other ranks wait in this trial's step: tell them how it ended here
            seen = agreement.outcome(None if other else kind, reason)  # an error's line: the others' notes say it
            # met in a check-in (FSDP2), but another rank's error, not an OOM: RankFailed with that rank's
            # line, as the trainer's RankGroup.after_oom raises it, and recorded as an error
            if other and seen[ERROR]:
                kind, failure = "error", _note(rank_failed(seen, agreement.ranks, agreement.reason))
        if cand.compile:  # no compiled graph of this trial outlives it
            torch._dynamo.reset()
        device.cleanup()  # collects garbage (gc.collect, once per trial: a full collection is not free)
        after = device.current_bytes()
    rec.seconds = time.perf_counter() - t0
    _judge(rec, failure, kind, settings.steps, capacity_bytes, budget_bytes, met=met,
           leaked=(after - baseline) if (after is not None and baseline is not None) else None,
           tolerance=LEAK_TOLERANCE_BYTES["cuda" if device.torch_device.type == "cuda" else "cpu"])
    return rec


def _note(e: BaseException) -> str:
    """A failed trial's note: the exception's type and first line, cut at 160 characters; a RankFailed's at
    360, its own words (about 80) and then the failing rank's line (Agreement.reason, up to 200: first_line)."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:360 if isinstance(e, RankFailed) else 160] if text else ''}"


def _judge(rec: TrialRecord, failure: str | None, kind: str, steps: int, capacity_bytes: int | None,
           budget_bytes: int, leaked: int | None, tolerance: int, met: bool = False) -> None:
    """Sets the trial's status and note from what happened (see run_trial); `met`: the failure was
    another rank's, met on this one (OtherRankOOM, RankFailed), which met_other_rank records."""
    rec.leaked_bytes = leaked
    peak = judged_peak(rec)
    if failure is not None:
        rec.status, rec.note, rec.met_other_rank = kind, failure, met
    elif rec.steps_run < steps:  # cannot happen without an exception; never call it a fit
        rec.status, rec.note = "error", f"only {rec.steps_run} of {steps} optimizer steps ran"
    elif capacity_bytes is not None and peak is not None and peak > capacity_bytes:
        rec.status = "spill"
        rec.note = "memory above the card's capacity: the driver spilled to host RAM instead of raising OOM"
    elif peak is not None and peak > budget_bytes:
        # On CUDA what runs out is reserved memory (the caching allocator's segments), which is
        # never below allocated, so the plan must fit with its reserved peak.
        rec.status = "over_budget"
        rec.note = "ran, but its peak (reserved, on CUDA) is above the budget"
    else:
        rec.status = "fit"
    if leaked is not None and leaked > tolerance:
        rec.status, rec.met_other_rank = "leak", False  # its own memory, whatever had ended it
        rec.note = (f"{leaked:,} bytes still allocated after the trial (tolerance {tolerance:,}): its memory did "
                    f"not come back, so it cannot count as a fit" + (f"; it had ended: {rec.note}" if rec.note else ""))
