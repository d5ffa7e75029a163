"""The micro-batch search: for one lever combination, the largest micro-batch that fits.

Only sizes a run can use are tried (the largest micro-batch of a balanced split of the batch,
autofit.planning.split.run_sizes). Phases, each a method of MicroBatchSearch:
1. start at the estimate: the largest size the closed-form estimate says fits, run for real;
2. re-anchor: scale the estimate's bytes per sequence by how far it was off at a measured fit, and
   try the size it then predicts (and one past it);
3. bracket: upward (the next run size past the largest fit, then 2, 4, ... sizes further) until
   one fails, or downward (x0.85, then halving) until one fits;
4. bisect between the largest fit and the smallest failure;
5. spill check (CUDA by default): a fit whose time per token is far above a smaller size's is a
   driver paging to host memory, not a fit.
A trial that fails with an error that is not out of memory stops the search (the combination's
fault, not its size's; the plan says so: planning.candidates.error_lines).
Every size the search returns was run. Trials go through a TrialRunner, which caches them by
candidate and keeps every record in the order it ran, for the plan's table.
"""
from __future__ import annotations

import platform
from typing import Callable

from autofit.planning import agree, loss_head
from autofit.planning.candidates import Levers, ckpt_words
from autofit.planning.estimate import ModelShape, estimate_peak, max_micro_batch
from autofit.planning.contest import run_tokens_per_s
from autofit.planning.split import run_size, run_sizes
from autofit.records import Candidate, TrialRecord
from autofit.planning.trials import TrialSettings, run_trial
from autofit.units import fmt_bytes, measured_peak_words

SPILL_SLOWDOWN = 3.0  # time per token more than 3x the next smaller size's: spilled to host RAM
# How far the closed-form estimate may be from a trial's measured peak, by device kind, as a share
# of the budget. CPU: docs/estimator.md's grid (scripts/bench_estimate.py, 37 shapes covering every
# phase being the peak, the chunked loss, checkpointing, dropout, bf16 and today's GPT options)
# measured |estimate - measured| <= 0.12 % on the budgeted CPU device, 0.45 % before its bf16 fix;
# 1 % is twice the worst ever seen there. tests/test_estimate.py pins it on that grid's rows and
# tests/test_contest.py on the probe's own trials. CUDA: the estimate (with its allocator slack)
# against the reserved peak of the GPU self-check's trials on an H200 (GPT-2 124M, bf16, standard
# and chunked loss; docs/gpu-selfcheck.md): from 4.7 % over to 4.3 % under; 10 % is twice that.
# One card and one torch so far, eager, one rank, no F.linear_cross_entropy: TrialRunner.bound_for
# applies it there only. A wrong skip costs a size that would have fit, not an OOM.
ESTIMATE_ERROR_BOUND = {"cpu": 0.01, "cuda": 0.10}


def driver_can_spill() -> bool:
    """Whether the NVIDIA driver here may page GPU memory out to host RAM instead of raising OOM:
    Windows' "CUDA sysmem fallback" (driver 536.40 and newer), which WSL shares. Linux drivers
    raise OOM, so there the spill check would only misfire on timing noise."""
    if platform.system() == "Windows":
        return True
    try:
        with open("/proc/version") as f:
            return "microsoft" in f.read().lower()
    except OSError:
        return False


class TrialRunner:
    """Runs the trials of one probe on one device: each candidate at most once, every record kept
    in order (`trials`), spills flagged against the next smaller fitting size."""

    def __init__(self, cfg, device, budget_bytes: int, settings: TrialSettings,
                 log: Callable[[str], None] = lambda s: None):
        self.cfg = cfg
        self.device = device
        self.budget_bytes = budget_bytes
        self.settings = settings
        self.log = log
        self.shape = ModelShape.from_config(cfg)
        info = device.info
        self.kind = "cpu" if info.kind == "cpu" else "cuda"
        self.capacity_bytes = info.total_bytes if info.kind == "cuda" else None
        self.spill_check = settings.spill_check if settings.spill_check is not None else \
            info.kind == "cuda" and driver_can_spill()
        # a size whose estimate is above the budget by more than this share is not run (None: all run)
        self.estimate_bound = ESTIMATE_ERROR_BOUND.get(self.kind)
        self.trials: list[TrialRecord] = []
        self._cache: dict[Candidate, TrialRecord] = {}
        # sizes timed only to look beside a flat pair (autofit.planning.planner._sizes_to_time):
        # the contest lets one win when clearly faster, never on a tie
        self.thirds: set[Candidate] = set()
        # smaller sizes dropped before the contest (planner._sizes_to_time): the log says why one
        # that is the user's own split is back in it (contest.decide)
        self.dropped: set[Candidate] = set()
        # with several ranks (torchrun), each rank's share of the effective batch
        self.rank_batch = agree.rank_batch(cfg)
        # only rank 0 speaks and reports records; every rank runs the same trials (autofit.planning.agree)
        self.on_trial = settings.on_trial
        if not agree.ranks().master:
            self.log = lambda s: None
            self.on_trial = lambda r: None

    def estimate(self, cand: Candidate) -> int:
        """Estimated peak bytes of a trial of `cand` (two micro-batches when training accumulates)."""
        n_micro = 2 if self.rank_batch > cand.micro_batch else 1
        return estimate_peak(self.shape, cand.micro_batch, dtype=cand.dtype, checkpointing=cand.checkpointing,
                             loss_impl=cand.loss_impl, compile=cand.compile, device=self.kind,
                             ce_chunk_size=self.cfg.ce_chunk_size, n_micro=n_micro, step_batch=self.rank_batch,
                             checkpointing_policy=cand.checkpointing_policy, **agree.layout(cand.sharded)).peak_bytes

    def run(self, cand: Candidate) -> TrialRecord:
        if cand in self._cache:
            return self._cache[cand]
        est = self.estimate(cand)
        bound = self.bound_for(cand)
        if bound is not None and est > (1 + bound) * self.budget_bytes:
            return self._skip(cand, est, bound)
        self.log(f"trial: micro-batch {cand.micro_batch}, {cand.dtype}, compile={cand.compile}, "
                 f"checkpointing={ckpt_words(cand)}, loss={cand.loss_impl} (estimated peak {fmt_bytes(est)})")
        r = self._trial(cand, est)
        if r.status == "fit" and self.spill_check:
            smaller = self.fits(Levers.of(cand), compile=cand.compile, below=cand.micro_batch)
            if smaller:
                self.flag_spill(r, max(smaller, key=lambda t: t.micro_batch))
        # several ranks: the record is agreed (agree.trial), the largest rank's peak and the slowest rank's rate
        peak_of, rate_of = (" (the largest rank's)", " per rank (the slowest)") if agree.ranks().several else ("", "")
        # the peak it was judged on among them (reserved on CUDA, where that is what runs out)
        self.log(f"  -> {r.status}" + (f", {measured_peak_words(r)}{peak_of}" if r.measured_peak_bytes else "")
                 + (f", {run_tokens_per_s(r):,.0f} tok/s{rate_of} measured by wall time (its update once per optimizer step, as the run)"
                    if r.tokens_per_s and r.status == 'fit' else "")
                 + (f" ({r.note})" if r.note and r.status != 'fit' else ""))
        self._cache[cand] = r
        self.trials.append(r)
        self.on_trial(r)  # out of the process now: a probe killed during the next trial keeps this one
        if agree.stop_wanted(self.settings.stop()):  # a Ctrl-C/SIGTERM is acted on when the trial ends
            raise KeyboardInterrupt
        return r

    def bound_for(self, cand: Candidate) -> float | None:
        """The estimate's proven error bound for `cand` on this device (a share of the budget), or
        None where no measurement backs it and every size is run. CUDA's was measured on one GPU,
        eager, with the losses torch 2.11 has (docs/gpu-selfcheck.md): not for compiled trials,
        several ranks, or torch's F.linear_cross_entropy, whose CUDA term is assumed."""
        if self.kind != "cuda" or self.estimate_bound is None:
            return self.estimate_bound
        lce = loss_head.uses_torch_lce(self.shape, cand.loss_impl)
        several = agree.layout(cand.sharded)["world_size"] > 1
        return None if (lce or cand.compile or several) else self.estimate_bound

    def _skip(self, cand: Candidate, est: int, bound: float) -> TrialRecord:
        """Records `cand` as not run: its estimated peak `est` is over the budget by more than the
        estimate's proven error bound on this device, so its measured peak would be too."""
        r = TrialRecord(**cand.model_dump(), status="pruned", estimated_peak_bytes=est,
                        note=f"not run: estimated peak {fmt_bytes(est)} is over the {fmt_bytes(self.budget_bytes)} "
                             f"budget by more than the estimate's {bound:.0%} error bound on this "
                             f"device (docs/estimator.md; tests/test_estimate.py)")
        self.log(f"skipped: micro-batch {cand.micro_batch}, checkpointing={ckpt_words(cand)}, "
                 f"loss={cand.loss_impl}: {r.note}")
        self._cache[cand] = r
        self.trials.append(r)
        self.on_trial(r)
        return r

    def _trial(self, cand: Candidate, estimated_peak_bytes: int) -> TrialRecord:
        """One trial on this rank's device, agreed with every other rank's (autofit.planning.agree)."""
        return agree.trial(run_trial(self.cfg, cand, self.device, rank_batch=self.rank_batch,
                                     budget_bytes=self.budget_bytes, capacity_bytes=self.capacity_bytes,
                                     estimated_peak_bytes=estimated_peak_bytes, settings=self.settings))

    def fits(self, levers: Levers | None = None, *, compile: bool | None = False,
             below: int | None = None) -> list[TrialRecord]:
        """Fitting trials, optionally of one lever combination, compiled or not (None: both),
        below a micro-batch."""
        return [t for t in self.trials if t.status == "fit"
                and (levers is None or Levers.of(t) == levers)
                and (compile is None or t.compile == compile)
                and (below is None or t.micro_batch < below)]

    @staticmethod
    def flag_spill(r: TrialRecord, ref: TrialRecord) -> bool:
        """Marks `r` a spill when its time per token is over SPILL_SLOWDOWN x that of the smaller
        fitting size `ref`: on a driver that pages to host memory instead of raising OOM
        (Windows' sysmem fallback) that is what running out of memory looks like."""
        if not (r.tokens_per_s and ref.tokens_per_s):
            return False
        slowdown = ref.tokens_per_s / r.tokens_per_s
        if slowdown <= SPILL_SLOWDOWN:
            return False
        r.status = "spill"
        r.note = (f"time per token {slowdown:.1f}x that of micro-batch {ref.micro_batch}: "
                  f"treated as spilling to host memory")
        return True


class _Errored(Exception):
    """A search trial failed with an error that is not out of memory (MicroBatchSearch.run)."""

    def __init__(self, record: TrialRecord):
        super().__init__(record.note)
        self.record = record


class MicroBatchSearch:
    """The largest micro-batch (<= the effective batch) a run can use that fits with one lever
    combination. Only run sizes are tried (autofit.planning.split.run_sizes: the largest
    micro-batch of a balanced split of the batch; at 32 they are 1-8, 11, 16 and 32): a run capped
    at 10 runs 8 x 4, so a trial of 9 or 10 would only measure a size no run uses.

    State: `lo`, the largest run size known to fit (0: none), and `hi`, the smallest known not to
    fit (None: none yet). Each phase moves them; `run()` is the algorithm of the module docstring,
    with every step and bisection taken over the run sizes.
    """

    def __init__(self, runner: TrialRunner, levers: Levers):
        self.runner = runner
        self.levers = levers
        self.limit = runner.rank_batch
        self.sizes = run_sizes(self.limit)
        self.lo = 0
        self.hi: int | None = None

    def down(self, m: int) -> int:
        """The largest run size <= `m` (m >= 1)."""
        return run_size(self.limit, min(max(m, 1), self.limit))

    def index(self, m: int) -> int:
        """Position of run size `m` among the run sizes (-1 for 0: nothing)."""
        return self.sizes.index(m) if m else -1

    def fits(self, m: int) -> bool:
        """Whether size `m` fits (one trial). Raises _Errored when the trial failed with an error
        that is not out of memory."""
        r = self.runner.run(self.levers.candidate(m))
        if r.status == "error":
            raise _Errored(r)
        return r.status == "fit"

    def run(self) -> int:
        """Largest fitting run size, or 0 when even micro-batch 1 does not fit. A trial that fails
        with an error that is not out of memory stops the search there (the largest size that fit
        before it, or 0): such an error is the combination's (a bug, an unsupported op), not a size
        too large, and every smaller size would only fail the same way (planning.candidates.error_lines)."""
        try:
            return self._run()
        except _Errored as e:
            self.runner.log(f"search stopped: {e.record.loss_impl} loss, checkpointing={ckpt_words(e.record)}: "
                            f"micro-batch {e.record.micro_batch} failed with an error that is not out of memory")
            return self.lo

    def _run(self) -> int:
        m = self.start_at_estimate()
        if self.fits(m):
            self.lo = m
            self.reanchor()
            self.bracket_up()
        else:
            self.hi = m
            if not self.bracket_down(m):
                return 0
            self.reanchor()
        self.bisect()
        self.check_spill()
        return self.lo

    def start_at_estimate(self) -> int:
        r = self.runner
        start = max_micro_batch(r.shape, r.budget_bytes, **self.levers.estimate_args(),
                                compile=False, device=r.kind, ce_chunk_size=r.cfg.ce_chunk_size,
                                step_batch=r.rank_batch, **agree.layout(self.levers.sharded))
        return self.down(start)

    def predict(self) -> int | None:
        """The largest run size that lo's measured peak, plus the estimate's bytes per sequence
        scaled by how far the estimate was off at lo, leaves within the budget."""
        r = self.runner.run(self.levers.candidate(self.lo))  # cached: lo already ran
        if not (r.measured_peak_bytes and r.estimated_peak_bytes):
            return None
        per_seq = (self.runner.estimate(self.levers.candidate(self.lo + 1)) - r.estimated_peak_bytes) \
            * r.measured_peak_bytes / r.estimated_peak_bytes
        room = self.runner.budget_bytes - max(r.measured_peak_bytes, r.measured_reserved_bytes or 0)
        return self.down(self.lo + int(room // per_seq)) if per_seq > 0 else self.limit

    def reanchor(self) -> None:
        """The estimate may be off on this device: anchor it on the measured fit at lo and try the
        size it then predicts, and the next run size past it."""
        pred = self.predict()
        if pred is None:
            return
        if self.hi is not None:
            pred = min(pred, self.down(self.hi - 1))
        if pred <= self.lo:
            return
        if not self.fits(pred):
            self.hi = pred
            return
        self.lo = pred
        i = self.index(self.lo)
        if i + 1 < len(self.sizes) and (self.hi is None or self.sizes[i + 1] < self.hi):
            nxt = self.sizes[i + 1]
            if self.fits(nxt):
                self.lo = nxt
            else:
                self.hi = nxt

    def bracket_up(self) -> None:
        """The next run size past the largest fit, then 2, 4, ... sizes further, until one
        fails or the limit fits."""
        inc = 1
        while self.hi is None and self.lo < self.limit:
            nxt = self.sizes[min(len(self.sizes) - 1, self.index(self.lo) + inc)]
            inc *= 2
            if self.fits(nxt):
                self.lo = nxt
            else:
                self.hi = nxt

    def bracket_down(self, m: int) -> bool:
        """The estimate was optimistic: x0.85, then halving, until a size fits. False when even
        micro-batch 1 does not."""
        nxt = self.down(int(m * 0.85))
        while self.lo == 0:
            if nxt < self.hi and self.fits(nxt):
                self.lo = nxt
            elif nxt <= 1:
                return False
            else:
                self.hi = min(self.hi, nxt)
                nxt = self.down(nxt // 2)
        return True

    def bisect(self) -> None:
        if self.hi is None:
            return
        while self.index(self.hi) - self.index(self.lo) > 1:
            mid = self.sizes[(self.index(self.lo) + self.index(self.hi)) // 2]
            if self.fits(mid):
                self.lo = mid
            else:
                self.hi = mid

    def check_spill(self) -> None:
        """The spill check needs a smaller size to compare time per token with: run half the size
        if nothing smaller ran, and back off if the found size turns out to be a spill."""
        r = self.runner
        if self.lo <= 1 or not r.spill_check or r.fits(self.levers, below=self.lo):
            return
        ref = self.down(self.lo // 2)
        if not self.fits(ref):
            return
        found = r.run(self.levers.candidate(self.lo))
        if r.flag_spill(found, r.run(self.levers.candidate(ref))):
            self.hi, self.lo = self.lo, ref
            self.bisect()
