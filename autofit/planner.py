"""From a config and a device to a plan: which candidates to try, the micro-batch search, and
the choice. The chosen plan is the fastest measured candidate whose measured peak fits the
budget; the effective batch (sequences per optimizer step) is kept exact.

Search, per lever combination (dtype x checkpointing x loss): start at the largest micro-batch
the estimate says fits, confirm it with a trial, step once past it to bracket, then bisect.
Every size in a plan was run. Compile is bracketed eagerly and then confirmed on the chosen
candidate, with its compile time reported apart from step time.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from autofit.budget import Budget
from autofit.estimate import ModelShape, estimate_peak, max_micro_batch
from autofit.records import Candidate, PlanRecord, TrialRecord
from autofit.trials import TrialSettings, run_trial
from autofit.units import fmt_bytes
from trainer.loop import DEFAULT_COMPILE_AFTER
from trainer.step import describe_split, split_batch

NOISE = 0.05  # relative tokens/s differences below this are treated as measurement noise
SPILL_SLOWDOWN = 3.0  # time per token more than 3x the next smaller size's: spilled to host RAM
ASSUMED_MFU = 0.40  # estimated mode only: fraction of the card's peak bf16/fp16 rate reached


class PlanError(RuntimeError):
    """Nothing fits, or the search space is empty."""


@dataclass
class Space:
    dtypes: list[str]
    compile: list[bool]
    checkpointing: list[int]
    loss_impls: list[str]


def candidate_space(cfg, device_kind: str, bf16_supported: bool, *, dtype: str | None = None,
                    compile: bool | None = None, checkpointing: list[int] | None = None,
                    loss_impls: list[str] | None = None) -> Space:
    """The config's choices, widened by the memory levers. `dtype`: None (the config's, 'auto'
    resolved for this device), 'any' (every dtype this device runs), or a comma list."""
    if dtype is None:
        dtypes = [cfg.resolved_dtype(device_kind, bf16_supported)]
    elif dtype == "any":
        dtypes = ["bfloat16", "float16", "float32"] if device_kind != "cpu" else ["float32", "bfloat16"]
        if not bf16_supported:
            dtypes.remove("bfloat16")
    else:
        dtypes = [d.strip() for d in dtype.split(",")]
        for d in dtypes:
            if d not in ("float32", "bfloat16", "float16"):
                raise PlanError(f"--dtype: unknown dtype {d!r} (float32, bfloat16, float16, any)")
            if d == "bfloat16" and not bf16_supported:
                raise PlanError("--dtype bfloat16: this GPU has no bf16 support (compute capability < 8.0); use float16")
    compiles = [compile] if compile is not None else ([False, True] if cfg.compile else [False])
    if device_kind == "cpu":
        # Dynamo compiles nothing while the budgeted CPU device's dispatch-mode tracker is
        # active (torch 2.13), so a compiled trial there would silently measure eager code.
        if compile:
            raise PlanError("--compile: torch.compile cannot be measured on the budgeted CPU device "
                            "(its memory tracker keeps Dynamo from compiling); probe on a GPU, or use --gpu NAME")
        compiles = [False]
    return Space(dtypes=dtypes, compile=compiles,
                 checkpointing=checkpointing if checkpointing is not None else sorted({cfg.checkpointing, 0, 1}),
                 loss_impls=loss_impls or ["standard", "chunked"])


@dataclass
class ProbeResult:
    mode: str  # 'measured' | 'estimated'
    device: object  # DeviceInfo
    budget: Budget
    effective_batch: int
    block_size: int
    trials: list[TrialRecord]
    plan: PlanRecord
    breakdown: dict[str, int]  # estimated bytes by component for the chosen plan
    fit_sizes: list[int] = field(default_factory=list)  # eager sizes known to fit (chosen levers)
    compiled_fit_sizes: list[int] = field(default_factory=list)

    def to_json(self) -> dict:
        d = self.device
        return {
            "mode": self.mode,
            "device": {"name": d.name, "kind": d.kind, "total_bytes": d.total_bytes, "free_bytes": d.free_bytes,
                       "source": d.source},
            "budget_bytes": self.budget.budget_bytes,
            "budget": self.budget.to_json(),
            "target": {"effective_batch": self.effective_batch, "block_size": self.block_size,
                       "tokens_per_step": self.effective_batch * self.block_size},
            "trials": [t.model_dump(mode="json") for t in self.trials],
            "plan": self.plan.model_dump(mode="json"),
            "breakdown_estimated_bytes": self.breakdown,
            "fit_sizes": self.fit_sizes,
            "compiled_fit_sizes": self.compiled_fit_sizes,
        }


def device_info(device):
    """CudaDevice exposes `info` as a property, the budgeted CPU device as a method."""
    info = device.info
    return info() if callable(info) else info


def _combos(space: Space) -> list[tuple[str, int, str]]:
    # cheapest levers first: no recompute, standard loss
    return [(dt, ck, li) for dt in space.dtypes for ck in sorted(space.checkpointing) for li in space.loss_impls]


def _est(shape: ModelShape, cand: Candidate, device_kind: str, cfg) -> int:
    # trials run two micro-batches per step only when training will accumulate
    n_micro = 2 if cfg.effective_batch > cand.micro_batch else 1
    return estimate_peak(shape, cand.micro_batch, dtype=cand.dtype, checkpointing=cand.checkpointing,
                         loss_impl=cand.loss_impl, compile=cand.compile, device=device_kind,
                         ce_chunk_size=cfg.ce_chunk_size, n_micro=n_micro).peak_bytes


def _step_seconds(micro_batches: list[int], block_size: int, tps: Callable[[int], float]) -> float:
    return sum(m * block_size / tps(m) for m in micro_batches)


def choose_split(rank_batch: int, micro: int, measured_tps: dict[int, float], block_size: int) -> tuple[list[int], str]:
    """Between the ragged split (full micro-batches + a short last one) and the largest measured
    divisor of the batch, the one with the shorter estimated step time. A size that was not
    measured is timed at the rate of the nearest measured size (noted in the reason)."""
    def tps(m: int) -> float:
        nearest = min(measured_tps, key=lambda s: (abs(s - m), -s))
        return measured_tps[nearest]
    ragged = split_batch(rank_batch, micro)
    if len(set(ragged)) == 1:
        return ragged, f"{micro} divides {rank_batch}"
    divisors = [d for d in measured_tps if d <= micro and rank_batch % d == 0]
    t_ragged = _step_seconds(ragged, block_size, tps)
    if divisors:
        d = max(divisors)
        even = split_batch(rank_batch, d)
        t_even = _step_seconds(even, block_size, tps)
        if t_even < t_ragged:
            return even, (f"the divisor {d} ({t_even:.3g} s/step) beats the ragged split "
                          f"{describe_split(ragged)} ({t_ragged:.3g} s/step)")
        return ragged, (f"ragged split ({t_ragged:.3g} s/step) beats the divisor {d} ({t_even:.3g} s/step); "
                        f"the short micro-batch's loss is weighted by its share of tokens")
    return ragged, "no measured divisor of the batch; the short last micro-batch is weighted by its tokens"


def probe_measured(cfg, device, budget: Budget, space: Space, *, settings: TrialSettings | None = None,
                   log: Callable[[str], None] = lambda s: None) -> ProbeResult:
    """Trials on a real device (CUDA, or the budgeted CPU device)."""
    # A trial above the planning budget fails fast: on the budgeted CPU device the limit is lowered
    # to the budget while probing, so such a trial raises OOM in its first step instead of
    # running every step to be judged 'over budget' at the end.
    saved_limit = getattr(device, "budget_bytes", None)
    if saved_limit is not None:
        device.budget_bytes = min(saved_limit, budget.budget_bytes)
    try:
        return _search_and_plan(cfg, device, budget, space, settings=settings, log=log)
    finally:
        if saved_limit is not None:
            device.budget_bytes = saved_limit


def _search_and_plan(cfg, device, budget: Budget, space: Space, *, settings: TrialSettings | None,
                     log: Callable[[str], None]) -> ProbeResult:
    settings = settings or TrialSettings()
    info = device_info(device)
    shape = ModelShape.from_config(cfg)
    E = cfg.effective_batch
    trials: list[TrialRecord] = []
    cache: dict[Candidate, TrialRecord] = {}
    kind = "cpu" if info.kind == "cpu" else "cuda"
    spill_check = settings.spill_check if settings.spill_check is not None else info.kind == "cuda"

    def trial(c: Candidate) -> TrialRecord:
        if c in cache:
            return cache[c]
        est = _est(shape, c, kind, cfg)
        log(f"trial: micro-batch {c.micro_batch}, {c.dtype}, compile={c.compile}, checkpointing={c.checkpointing}, "
            f"loss={c.loss_impl} (estimated peak {fmt_bytes(est)})")
        r = run_trial(cfg, c, device, rank_batch=E, budget_bytes=budget.budget_bytes,
                      capacity_bytes=info.total_bytes if info.kind == "cuda" else None,
                      estimated_peak_bytes=est, settings=settings)
        # Time per token far above the next smaller fitting size: a silent spill, not a fit.
        if r.status == "fit" and spill_check:
            smaller = [t for t in trials if t.status == "fit" and t.micro_batch < c.micro_batch
                       and (t.dtype, t.compile, t.checkpointing, t.loss_impl) == (c.dtype, c.compile, c.checkpointing, c.loss_impl)]
            if smaller and r.tokens_per_s:
                ref = max(smaller, key=lambda t: t.micro_batch)
                if ref.tokens_per_s and ref.tokens_per_s / r.tokens_per_s > SPILL_SLOWDOWN:
                    r.status = "spill"
                    r.note = (f"time per token {ref.tokens_per_s / r.tokens_per_s:.1f}x that of micro-batch "
                              f"{ref.micro_batch}: treated as spilling to host memory")
        log(f"  -> {r.status}" + (f", peak {fmt_bytes(r.measured_peak_bytes)}" if r.measured_peak_bytes else "")
            + (f", {r.tokens_per_s:,.0f} tok/s" if r.tokens_per_s and r.status == 'fit' else "")
            + (f" ({r.note})" if r.note and r.status != 'fit' else ""))
        cache[c] = r
        trials.append(r)
        return r

    def search(dt: str, ck: int, li: str) -> int:
        """Largest micro-batch (<= E) that fits with these levers, or 0. Only sizes that ran."""
        cur[:] = [dt, ck, li]
        mk = lambda m: Candidate(micro_batch=m, dtype=dt, compile=False, checkpointing=ck, loss_impl=li)
        fits = lambda m: trial(mk(m)).status == "fit"
        start = max_micro_batch(shape, budget.budget_bytes, dtype=dt, checkpointing=ck, loss_impl=li,
                                compile=False, device=kind, ce_chunk_size=cfg.ce_chunk_size)
        m = min(max(start, 1), E)
        def predict(lo: int) -> int | None:
            """The largest size that lo's measured peak, plus the estimate's bytes per sequence
            scaled by how far the estimate was off at lo, leaves within the budget."""
            r = cache[mk(lo)]
            if not (r.measured_peak_bytes and r.estimated_peak_bytes):
                return None
            per_seq = (_est(shape, mk(lo + 1), kind, cfg) - r.estimated_peak_bytes) \
                * r.measured_peak_bytes / r.estimated_peak_bytes
            room = budget.budget_bytes - max(r.measured_peak_bytes, r.measured_reserved_bytes or 0)
            return min(E, lo + int(room // per_seq)) if per_seq > 0 else E

        def refine(lo: int, hi: int | None) -> tuple[int, int | None]:
            """The estimate may be off on this device: anchor it on a measured fit and try the
            size it then predicts, and the one just past it."""
            pred = predict(lo)
            if pred is None:
                return lo, hi
            if hi is not None:
                pred = min(pred, hi - 1)
            if pred > lo:
                if not fits(pred):
                    return lo, pred
                lo = pred
                if lo < E and (hi is None or lo + 1 < hi):
                    if fits(lo + 1):
                        lo += 1
                    else:
                        hi = lo + 1
            return lo, hi

        if fits(m):
            lo, hi = refine(m, None)
            inc = 1
            while hi is None and lo < E:  # bracket upward: one past, then +2, +4, ...
                nxt = min(E, lo + inc)
                inc *= 2
                if fits(nxt):
                    lo = nxt
                else:
                    hi = nxt
        else:
            hi, lo = m, 0
            nxt = max(1, int(m * 0.85))
            while lo == 0:  # bracket downward: the estimate was optimistic
                if nxt < hi and fits(nxt):
                    lo = nxt
                elif nxt <= 1:
                    return 0
                else:
                    hi = min(hi, nxt)
                    nxt = max(1, nxt // 2)
            lo, hi = refine(lo, hi)
        lo = bisect(lo, hi)
        # The spill check needs a smaller size to compare time per token with: run half the
        # size if nothing smaller ran, and back off if the found size turns out to be a spill.
        while lo > 1 and spill_check:
            smaller = [t.micro_batch for t in trials if t.status == "fit" and t.micro_batch < lo
                       and (t.dtype, t.compile, t.checkpointing, t.loss_impl) == (dt, False, ck, li)]
            if smaller:
                break
            ref = lo // 2
            if not fits(ref):
                break
            r = cache[mk(lo)]
            if r.tokens_per_s and cache[mk(ref)].tokens_per_s / r.tokens_per_s > SPILL_SLOWDOWN:
                r.status = "spill"
                r.note = (f"time per token {cache[mk(ref)].tokens_per_s / r.tokens_per_s:.1f}x that of "
                          f"micro-batch {ref}: treated as spilling to host memory")
                lo = bisect(ref, lo)
            break
        return lo

    def bisect(lo: int, hi: int | None) -> int:
        if hi is None:
            return lo
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if trial(Candidate(micro_batch=mid, dtype=cur[0], compile=False, checkpointing=cur[1],
                               loss_impl=cur[2])).status == "fit":
                lo = mid
            else:
                hi = mid
        return lo

    cur: list = [None, None, None]  # the lever combination being searched
    best_by_combo: dict[tuple, int] = {}
    for dt, ck, li in _combos(space):
        if ck > 0:
            # Recomputation costs about a third more compute: try it only when the levers without
            # it cannot hold the whole batch and the estimate promises a clearly larger size.
            base = max([v for (d, c, _), v in best_by_combo.items() if d == dt and c == 0] or [0])
            est_ck = max_micro_batch(shape, budget.budget_bytes, dtype=dt, checkpointing=ck, loss_impl=li,
                                     compile=False, device=kind, ce_chunk_size=cfg.ce_chunk_size)
            if base >= E or (base > 0 and est_ck < 2 * base):
                trials.append(TrialRecord(micro_batch=max(1, min(est_ck, E)), dtype=dt, compile=False,
                                          checkpointing=ck, loss_impl=li, status="pruned",
                                          note=f"not needed: micro-batch {base} fits without recomputation"))
                continue
        best_by_combo[(dt, ck, li)] = search(dt, ck, li)

    fits = [t for t in trials if t.status == "fit" and not t.compile]
    if not fits:
        _nothing_fits(cfg, trials, budget, shape, kind)
    _retime_contenders(cfg, device, budget, fits, settings, E, log)
    # Rates within NOISE of the fastest are a tie (a trial times few steps): take the largest
    # micro-batch among them, the one with the fewest accumulation steps.
    top = max(t.tokens_per_s or 0.0 for t in fits)
    best = max((t for t in fits if (t.tokens_per_s or 0.0) >= (1 - NOISE) * top),
               key=lambda t: (t.micro_batch, t.tokens_per_s or 0.0))
    chosen = best
    levers = lambda t: (t.dtype, t.checkpointing, t.loss_impl)
    compiled_fits: list[int] = []
    if True in space.compile:
        c = best.candidate().model_copy(update={"compile": True})
        r = trial(c)
        if r.status != "fit":  # compiled peak can be higher: confirm the next smaller eager fit
            smaller = sorted(t.micro_batch for t in fits if levers(t) == levers(best) and t.micro_batch < best.micro_batch)
            if smaller:
                r = trial(c.model_copy(update={"micro_batch": smaller[-1]}))
        compiled_fits = sorted(t.micro_batch for t in trials if t.compile and t.status == "fit")
        forced = False not in space.compile  # --compile: the plan must be compiled
        if r.status == "fit" and (forced or (r.tokens_per_s or 0) > (best.tokens_per_s or 0)):
            chosen = r
        elif forced:
            raise PlanError(f"--compile: no compiled candidate fits the {fmt_bytes(budget.budget_bytes)} budget "
                            f"(tried micro-batch {c.micro_batch}" + (f" and {r.micro_batch}" if r.micro_batch !=
                            c.micro_batch else "") + "); drop --compile to let an eager plan win")
    same = [t for t in fits if levers(t) == levers(chosen)]
    measured_tps = {t.micro_batch: t.tokens_per_s for t in same if t.tokens_per_s}
    micro_batches, why_split = choose_split(E, chosen.micro_batch, measured_tps, cfg.block_size)
    peak = max(t.measured_peak_bytes or 0 for t in same if t.micro_batch == max(micro_batches))
    if chosen.compile:
        peak = max(peak, chosen.measured_peak_bytes or 0)
    est = estimate_peak(shape, max(micro_batches), dtype=chosen.dtype, checkpointing=chosen.checkpointing,
                        loss_impl=chosen.loss_impl, compile=chosen.compile, device=kind,
                        ce_chunk_size=cfg.ce_chunk_size, n_micro=min(2, len(micro_batches)))
    n_fit = len([t for t in trials if t.status == "fit"])
    cpu_compile_note = ("; compile=True in the config is not measured on the budgeted CPU device (its tracker "
                        "keeps Dynamo from compiling), so the plan is eager" if kind == "cpu" and cfg.compile else "")
    reason = (f"highest measured tokens/s ({chosen.tokens_per_s:,.0f}; rates within {NOISE:.0%} count as a tie, "
              f"won by the larger micro-batch) of {n_fit} fitting trials; "
              f"measured peak {fmt_bytes(peak)} within the {fmt_bytes(budget.budget_bytes)} budget; {why_split}"
              f"{cpu_compile_note}")
    plan = PlanRecord(mode="measured", micro_batch=max(micro_batches), grad_accum=len(micro_batches),
                      micro_batches=micro_batches, effective_batch=E, block_size=cfg.block_size,
                      dtype=chosen.dtype, compile=chosen.compile,
                      compile_after=_compile_after(cfg) if chosen.compile else 0,
                      checkpointing=chosen.checkpointing, loss_impl=chosen.loss_impl,
                      estimated_peak_bytes=est.peak_bytes, measured_peak_bytes=peak,
                      tokens_per_s=chosen.tokens_per_s, budget_bytes=budget.budget_bytes,
                      split=describe_split(micro_batches), reason=reason)
    return ProbeResult(mode="measured", device=info, budget=budget, effective_batch=E, block_size=cfg.block_size,
                       trials=trials, plan=plan, breakdown=est.breakdown,
                       fit_sizes=sorted(measured_tps), compiled_fit_sizes=compiled_fits)


RETIME_WITHIN = 0.75  # lever combinations whose best rate is within this share of the top one
RETIME_STEPS = 3  # timed optimizer steps when re-timing


def _retime_contenders(cfg, device, budget: Budget, fits: list[TrialRecord], settings: TrialSettings,
                       rank_batch: int, log: Callable[[str], None]) -> None:
    """A search trial times few steps, which is noisy on a busy machine. When the best sizes of
    different lever combinations come close, time each of them again over more steps, so the
    choice between them rests on a steadier measurement."""
    per_combo: dict[tuple, TrialRecord] = {}
    for t in fits:
        key = (t.dtype, t.checkpointing, t.loss_impl)
        if key not in per_combo or (t.tokens_per_s or 0) > (per_combo[key].tokens_per_s or 0):
            per_combo[key] = t
    top = max((t.tokens_per_s or 0) for t in per_combo.values())
    contenders = [t for t in per_combo.values() if (t.tokens_per_s or 0) >= RETIME_WITHIN * top]
    if len(contenders) < 2:
        return
    longer = TrialSettings(steps=RETIME_STEPS + 1, compile_backend=settings.compile_backend, seed=settings.seed,
                           spill_check=settings.spill_check)
    for t in contenders:
        r = run_trial(cfg, t.candidate(), device, rank_batch=rank_batch, budget_bytes=budget.budget_bytes,
                      settings=longer)
        if r.status == "fit" and r.tokens_per_s:
            log(f"re-timed micro-batch {t.micro_batch} {t.dtype} ckpt={t.checkpointing} {t.loss_impl}: "
                f"{t.tokens_per_s:,.0f} -> {r.tokens_per_s:,.0f} tok/s over {RETIME_STEPS} steps")
            t.tokens_per_s = r.tokens_per_s
            t.steps_run += r.steps_run
            t.note = (t.note + "; " if t.note else "") + f"tokens/s re-timed over {RETIME_STEPS} steps"


def _compile_after(cfg) -> int:
    if cfg.compile_after is not None:
        return cfg.compile_after
    return min(DEFAULT_COMPILE_AFTER, max(1, cfg.max_iters // 10))


def _nothing_fits(cfg, trials: list[TrialRecord], budget: Budget, shape: ModelShape, kind: str,
                  estimated: bool = False):
    measured = [t.measured_peak_bytes for t in trials if t.measured_peak_bytes]
    ests = [t.estimated_peak_bytes for t in trials if t.estimated_peak_bytes]
    if measured:
        smallest = f"smallest measured peak {fmt_bytes(min(measured))}"
    elif estimated:
        smallest = f"smallest estimated peak {fmt_bytes(min(ests))}" if ests else "no estimate"
    else:
        smallest = f"smallest estimated peak {fmt_bytes(min(ests))} (every trial ran out of memory)" if ests \
            else "no trial could run"
    bigger = "a larger --budget" if kind == "cpu" else "a bigger GPU"
    raise PlanError(f"nothing fits: {smallest} against a budget of {fmt_bytes(budget.budget_bytes)}, even at "
                    f"micro-batch 1 with every lever tried; a shorter block_size (now {cfg.block_size}), "
                    f"a smaller model than n_layer {cfg.n_layer} / n_embd {cfg.n_embd}, or {bigger} would help")


def estimated_tokens_per_s(shape: ModelShape, micro_batch: int, dtype: str, checkpointing: int, hw) -> float:
    """Estimated mode only: the card's dense peak x an assumed 40% MFU, over the training FLOPs
    per token (6N + attention), x 3/4 with full recomputation, with small micro-batches
    under-filling the GPU (m / (m + 2))."""
    peak = (hw.peak_bf16_tflops if dtype == "bfloat16" else hw.peak_fp16_tflops if dtype == "float16"
            else hw.peak_fp16_tflops / 4) * 1e12  # fp32 without tensor cores: a rough quarter
    n = estimate_params(shape)
    flops_per_token = 6 * n + 12 * shape.n_layer * shape.n_embd * shape.block_size
    recompute = 1.0 + (1.0 / 3.0) / max(1, checkpointing) if checkpointing else 1.0
    return peak * ASSUMED_MFU / (flops_per_token * recompute) * micro_batch / (micro_batch + 2)


def estimate_params(shape: ModelShape) -> int:
    from autofit.estimate import param_count
    return param_count(shape)


def probe_estimated(cfg, info, hw, budget: Budget, space: Space) -> ProbeResult:
    """No matching GPU here: the estimate is the whole answer, and says so."""
    shape = ModelShape.from_config(cfg)
    E = cfg.effective_batch
    trials: list[TrialRecord] = []
    best = None
    for dt, ck, li in _combos(space):
        m = min(E, max_micro_batch(shape, budget.budget_bytes, dtype=dt, checkpointing=ck, loss_impl=li,
                                   compile=False, device="cuda", ce_chunk_size=cfg.ce_chunk_size))
        size = max(m, 1)
        est = estimate_peak(shape, size, dtype=dt, checkpointing=ck, loss_impl=li, compile=False,
                            device="cuda", ce_chunk_size=cfg.ce_chunk_size)
        if m == 0:
            trials.append(TrialRecord(micro_batch=1, dtype=dt, compile=False, checkpointing=ck, loss_impl=li,
                                      status="pruned", estimated_peak_bytes=est.peak_bytes,
                                      note="estimated not to fit even at micro-batch 1"))
            continue
        tps = estimated_tokens_per_s(shape, m, dt, ck, hw)
        rec = TrialRecord(micro_batch=m, dtype=dt, compile=False, checkpointing=ck, loss_impl=li, status="fit",
                          estimated_peak_bytes=est.peak_bytes, tokens_per_s=tps,
                          note="estimated: largest micro-batch whose estimated peak fits; tokens/s from "
                               f"peak TFLOP/s x {ASSUMED_MFU:.0%} assumed MFU")
        trials.append(rec)
        if best is None or tps > best.tokens_per_s:
            best = rec
    if best is None:
        _nothing_fits(cfg, trials, budget, shape, "cuda", estimated=True)
    est_tps = {m: estimated_tokens_per_s(shape, m, best.dtype, best.checkpointing, hw)
               for m in range(1, best.micro_batch + 1)}
    micro_batches, why_split = choose_split(E, best.micro_batch, est_tps, cfg.block_size)
    best.tokens_per_s = est_tps[max(micro_batches)]  # the rate of the size the plan runs
    est = estimate_peak(shape, max(micro_batches), dtype=best.dtype, checkpointing=best.checkpointing,
                        loss_impl=best.loss_impl, device="cuda", ce_chunk_size=cfg.ce_chunk_size,
                        n_micro=min(2, len(micro_batches)))
    compile_on = True in space.compile
    plan = PlanRecord(mode="estimated", micro_batch=max(micro_batches), grad_accum=len(micro_batches),
                      micro_batches=micro_batches, effective_batch=E, block_size=cfg.block_size, dtype=best.dtype,
                      compile=compile_on, compile_after=_compile_after(cfg) if compile_on else 0,
                      checkpointing=best.checkpointing, loss_impl=best.loss_impl,
                      estimated_peak_bytes=est.peak_bytes, measured_peak_bytes=None,
                      tokens_per_s=best.tokens_per_s, budget_bytes=budget.budget_bytes,
                      split=describe_split(micro_batches),
                      reason=(f"estimated only (no {hw.name} here): highest estimated tokens/s among "
                              f"{len([t for t in trials if t.status == 'fit'])} lever combinations whose "
                              f"estimated peak fits {fmt_bytes(budget.budget_bytes)}; compile kept as configured "
                              f"(its memory effect is measured, never guessed: probe on the card to confirm); "
                              f"split: {why_split} (estimated step times)"))
    return ProbeResult(mode="estimated", device=info, budget=budget, effective_batch=E, block_size=cfg.block_size,
                       trials=trials, plan=plan, breakdown=est.breakdown)
