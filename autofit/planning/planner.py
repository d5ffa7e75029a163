"""From a config and a device to a plan. The plan is the fastest measured candidate whose measured
peak fits the budget; the effective batch (sequences per optimizer step) is kept exact.

The measured probe (probe_measured), step by step:
1. for each lever combination (dtype x activation checkpointing x loss implementation), the largest
   eager micro-batch that fits (autofit.planning.search.MicroBatchSearch); a recomputing combination is
   pruned when the combinations without recomputation already hold the whole batch, or the
   estimate promises less than twice their size;
2. re-time the close contenders over more steps (a search trial times few steps);
3. choose(): the fastest fitting candidate, ties within NOISE going to the larger micro-batch;
4. confirm_compile(): when compile is in the space, run the chosen size compiled (and the next
   smaller fit if the compiled peak is higher) and keep it if it is faster;
5. split the effective batch into micro-batches (balanced, or a divisor when measured faster).
With no matching GPU here, probe_estimated answers from the closed-form estimate alone.
"""
from __future__ import annotations

import statistics
from typing import Callable

from autofit.planning import agree
from autofit.planning.budget import Budget, compute_budget
from autofit.planning.candidates import Levers, PlanError, Space, lever_combos
from autofit.planning.estimate import ModelShape, estimate_peak, max_micro_batch
from autofit.records import PlanRecord, ProbeResult, TrialRecord
from autofit.planning.search import MicroBatchSearch, TrialRunner
from autofit.planning.throughput import ASSUMED_MFU, estimated_tokens_per_s
from autofit.planning.trials import TrialSettings, run_trial
from autofit.units import fmt_bytes
from trainer.compiler import resolve_compile_after
from trainer.step import describe_split, split_batch

NOISE = 0.05  # relative tokens/s differences below this are treated as measurement noise
RETIME_WITHIN = 0.75  # lever combinations whose best rate is within this share of the top one
RETIME_STEPS = 3  # timed optimizer steps per round when re-timing
RETIME_ROUNDS = 2  # rounds of re-timing, contenders in alternation (A B A B)


def probe_measured(cfg, device, budget: Budget, space: Space, *, settings: TrialSettings | None = None,
                   log: Callable[[str], None] = lambda s: None) -> ProbeResult:
    """Trials on a real device (CUDA, or the budgeted CPU device); see the module docstring.
    Raises PlanError when nothing fits or --compile cannot be honoured."""
    # A trial above the planning budget fails fast: the device is limited to the budget while
    # probing (the budgeted CPU device's budget lowered, CUDA's allocator capped), so such a trial
    # raises OOM in its first step instead of taking memory others hold, or running every step to
    # be judged 'over budget' at the end.
    info = device.info  # as opened: the limit below is the probe's, not the device's
    runner = TrialRunner(cfg, device, budget.budget_bytes, settings or TrialSettings(), log)
    if device.context_bytes is not None:
        # CUDA: cuBLAS, cuDNN and Triton load their workspaces at first use, outside the
        # allocator. Run the smallest trial, measure again, and plan with what is left.
        with device.limited_to(budget.budget_bytes):
            runner.run(lever_combos(space)[0].candidate(1))
        budget = agree.budget(_remeasured_budget(device, budget, runner))
        runner.budget_bytes = budget.budget_bytes
    with device.limited_to(budget.budget_bytes):
        result = _plan_from_trials(cfg, runner, budget, space)
    result.device = info
    return result


def _remeasured_budget(device, budget: Budget, runner: TrialRunner) -> Budget:
    """The budget again, from the context measured after the first trial; never larger."""
    before = device.context_bytes
    after = device.refresh_context()
    if after is None or before is None or after <= before:
        return budget
    new = compute_budget(device.info, budget.margin, context_bytes=after, workspace_bytes=0,
                         context_how="measured after the first trial: this process's device memory outside "
                                     "torch's allocator (context, cuBLAS/cuDNN/Triton workspaces)")
    if new.budget_bytes >= budget.budget_bytes:
        return budget
    runner.log(f"memory outside the allocator grew from {fmt_bytes(before)} to {fmt_bytes(after)} after the "
               f"first trial: budget {fmt_bytes(budget.budget_bytes)} -> {fmt_bytes(new.budget_bytes)}")
    runner.budget_bytes = new.budget_bytes
    return new


def _plan_from_trials(cfg, runner: TrialRunner, budget: Budget, space: Space) -> ProbeResult:
    E = runner.rank_batch  # sequences per step on each rank (the effective batch with one)
    best_by_levers: dict[Levers, int] = {}
    for levers in lever_combos(space):
        pruned = _prune_sharding(runner, levers, best_by_levers) or _prune_recompute(runner, levers, best_by_levers)
        if pruned is not None:
            runner.trials.append(pruned)
            continue
        best_by_levers[levers] = MicroBatchSearch(runner, levers).run()
    fits = runner.fits()
    if not fits:
        _nothing_fits(cfg, runner.trials, budget, runner.kind)
    _retime_contenders(runner, fits)
    best = choose(fits)
    chosen, compiled_fits = confirm_compile(runner, best, fits, space, budget)
    measured_tps = {t.micro_batch: t.tokens_per_s for t in fits
                    if Levers.of(t) == Levers.of(chosen) and t.tokens_per_s}
    micro_batches, why_split = choose_split(E, chosen.micro_batch, split_rates(chosen, measured_tps, runner.trials),
                                            cfg.block_size)
    micro_batches = _run_the_split_size(runner, chosen, micro_batches)
    same = [t for t in runner.fits(Levers.of(chosen))]
    peak = max(t.measured_peak_bytes or 0 for t in same if t.micro_batch == max(micro_batches))
    if chosen.compile:
        peak = max(peak, chosen.measured_peak_bytes or 0)
    est = estimate_peak(runner.shape, max(micro_batches), dtype=chosen.dtype, checkpointing=chosen.checkpointing,
                        loss_impl=chosen.loss_impl, compile=chosen.compile, device=runner.kind,
                        ce_chunk_size=cfg.ce_chunk_size, n_micro=min(2, len(micro_batches)),
                        **agree.layout(chosen.sharded))
    n_fit = len([t for t in runner.trials if t.status == "fit"])
    cpu_compile_note = ("; compile=True in the config is not measured on the budgeted CPU device (its tracker "
                        "keeps Dynamo from compiling), so the plan is eager"
                        if not runner.device.capabilities.compile and cfg.compile else "")
    reason = (f"highest measured tokens/s ({chosen.tokens_per_s:,.0f}; rates within {NOISE:.0%} count as a tie, "
              f"won by the larger micro-batch) of {n_fit} fitting trials; "
              f"measured peak {fmt_bytes(peak)} within the {fmt_bytes(budget.budget_bytes)} budget; {why_split}"
              f"{cpu_compile_note}")
    plan = PlanRecord(mode="measured", micro_batch=max(micro_batches), grad_accum=len(micro_batches),
                      micro_batches=micro_batches, effective_batch=E, block_size=cfg.block_size,
                      dtype=chosen.dtype, compile=chosen.compile,
                      compile_after=resolve_compile_after(cfg) if chosen.compile else 0,
                      checkpointing=chosen.checkpointing, loss_impl=chosen.loss_impl,
                      estimated_peak_bytes=est.peak_bytes, measured_peak_bytes=peak,
                      tokens_per_s=chosen.tokens_per_s, budget_bytes=budget.budget_bytes,
                      split=describe_split(micro_batches), reason=reason, **agree.plan_fields(chosen.sharded))
    return ProbeResult(mode="measured", device=None, budget=budget, effective_batch=cfg.effective_batch,
                       block_size=cfg.block_size, trials=runner.trials, plan=plan, breakdown=est.breakdown,
                       fit_sizes=sorted(measured_tps), compiled_fit_sizes=compiled_fits)


def _run_the_split_size(runner: TrialRunner, chosen: TrialRecord, micro_batches: list[int]) -> list[int]:
    """Every size in a plan was run: a balanced split's largest micro-batch can be below the
    chosen size (21 at 10 runs 7s); run it if no trial did (smaller sizes fit, as memory grows
    with the micro-batch, so this measures it rather than tests it)."""
    largest = max(micro_batches)
    if any(t.micro_batch == largest for t in runner.fits(Levers.of(chosen))):
        return micro_batches
    r = runner.run(Levers.of(chosen).candidate(largest))
    if r.status == "fit" or largest == 1:
        return micro_batches
    # memory that did not grow with the micro-batch (fragmentation): balance below it instead
    return _run_the_split_size(runner, chosen, split_batch(runner.cfg.effective_batch, largest - 1))


def _prune_recompute(runner: TrialRunner, levers: Levers, best_by_levers: dict[Levers, int]) -> TrialRecord | None:
    """Recomputation costs about a third more compute: try it only when the levers without it
    cannot hold the whole batch and the estimate promises a clearly larger size. Returns the
    'pruned' record when it is not worth a search."""
    if levers.checkpointing == 0:
        return None
    E = runner.rank_batch
    base = max([v for lv, v in best_by_levers.items() if lv.dtype == levers.dtype and lv.checkpointing == 0
                and lv.sharded == levers.sharded] or [0])
    est_ck = max_micro_batch(runner.shape, runner.budget_bytes, dtype=levers.dtype,
                             checkpointing=levers.checkpointing, loss_impl=levers.loss_impl, compile=False,
                             device=runner.kind, ce_chunk_size=runner.cfg.ce_chunk_size, **agree.layout(levers.sharded))
    if base >= E or (base > 0 and est_ck < 2 * base):
        rec = levers.candidate(max(1, min(est_ck, E)))
        return TrialRecord(**rec.model_dump(), status="pruned",
                           note=f"not needed: micro-batch {base} fits without recomputation")
    return None


def _prune_sharding(runner: TrialRunner, levers: Levers, best_by_levers: dict[Levers, int]) -> TrialRecord | None:
    """FSDP2 all-gathers every block's weights and reduce-scatters its gradients in every
    micro-batch: try it only when no unsharded combination holds the whole per-rank batch and
    the estimate promises a larger micro-batch than the best of them. Returns the 'pruned'
    record when it is not worth a search."""
    if not levers.sharded:
        return None
    E = runner.rank_batch
    base = max([v for lv, v in best_by_levers.items() if not lv.sharded] or [0])
    est = max_micro_batch(runner.shape, runner.budget_bytes, dtype=levers.dtype, checkpointing=levers.checkpointing,
                          loss_impl=levers.loss_impl, compile=False, device=runner.kind,
                          ce_chunk_size=runner.cfg.ce_chunk_size, **agree.layout(True))
    if base >= E or (base > 0 and est <= base):
        why = (f"micro-batch {base} fits without sharding" if base >= E else
               f"estimated {est} sharded, no more than {base} without")
        return TrialRecord(**levers.candidate(max(1, min(est, E))).model_dump(), status="pruned",
                           note=f"not needed: {why}")
    return None


def choose(fits: list[TrialRecord]) -> TrialRecord:
    """The fastest of the measured fitting candidates. Rates within NOISE of the fastest are a tie
    (a trial times few steps): the largest micro-batch among them wins, the one with the fewest
    accumulation steps."""
    top = max(t.tokens_per_s or 0.0 for t in fits)
    return max((t for t in fits if (t.tokens_per_s or 0.0) >= (1 - NOISE) * top),
               key=lambda t: (t.micro_batch, t.tokens_per_s or 0.0))


def confirm_compile(runner: TrialRunner, best: TrialRecord, fits: list[TrialRecord], space: Space,
                    budget: Budget) -> tuple[TrialRecord, list[int]]:
    """Runs the chosen eager candidate compiled (the compiled peak can be higher: then the next
    smaller eager fit) and returns (the winner, compiled micro-batches that fit). The compiled
    run wins when faster, or always under --compile (then PlanError if none fits)."""
    if True not in space.compile:
        return best, []
    c = best.candidate().model_copy(update={"compile": True})
    r = runner.run(c)
    if r.status != "fit":
        smaller = sorted(t.micro_batch for t in fits if Levers.of(t) == Levers.of(best) and t.micro_batch < best.micro_batch)
        if smaller:
            r = runner.run(c.model_copy(update={"micro_batch": smaller[-1]}))
    compiled_fits = sorted(t.micro_batch for t in runner.trials if t.compile and t.status == "fit")
    forced = False not in space.compile  # --compile: the plan must be compiled
    if r.status == "fit" and not forced:
        # the same split, the same timed steps, in alternation: compiled and eager compare
        twin = next(t for t in fits if t.candidate() == r.candidate().model_copy(update={"compile": False}))
        retime(runner, list({id(t): t for t in (best, twin, r)}.values()))
    if r.status == "fit" and (forced or (r.tokens_per_s or 0) > (best.tokens_per_s or 0)):
        return r, compiled_fits
    if forced:
        raise PlanError(f"--compile: no compiled candidate fits the {fmt_bytes(budget.budget_bytes)} budget "
                        f"(tried micro-batch {c.micro_batch}" + (f" and {r.micro_batch}" if r.micro_batch !=
                        c.micro_batch else "") + "); drop --compile to let an eager plan win")
    return best, compiled_fits


def _step_seconds(micro_batches: list[int], block_size: int, tps: Callable[[int], float]) -> float:
    return sum(m * block_size / tps(m) for m in micro_batches)


def split_rates(chosen: TrialRecord, eager_tps: dict[int, float], trials: list[TrialRecord]) -> dict[int, float]:
    """Tokens/s by micro-batch for choosing the split of the `chosen` plan. Eager: the measured
    eager rates of its levers (`eager_tps`). Compiled: the compiled rates where a compiled trial of
    its levers was measured, and elsewhere the eager rate times the compile speed-up measured at
    the chosen size, so the split is judged at the speed the plan will run."""
    if not chosen.compile:
        return eager_tps
    eager_at_chosen = eager_tps.get(chosen.micro_batch)
    speedup = (chosen.tokens_per_s or 0) / eager_at_chosen if eager_at_chosen else 1.0
    rates = {m: r * speedup for m, r in eager_tps.items()}
    rates.update({t.micro_batch: t.tokens_per_s for t in trials if t.compile and t.status == "fit"
                  and t.tokens_per_s and Levers.of(t) == Levers.of(chosen)})
    return rates


def choose_split(rank_batch: int, micro: int, measured_tps: dict[int, float], block_size: int) -> tuple[list[int], str]:
    """Between the balanced split (micro-batches of at most `micro`, sizes differing by at most
    one) and the largest measured divisor of the batch, the one with the shorter step time at the
    measured rates. A size that was not measured is timed at the rate of the nearest measured
    size."""
    def tps(m: int) -> float:
        nearest = min(measured_tps, key=lambda s: (abs(s - m), -s))
        return measured_tps[nearest]
    balanced = split_batch(rank_batch, micro)
    if len(set(balanced)) == 1:
        return balanced, f"{balanced[0]} divides {rank_batch}"
    divisors = [d for d in measured_tps if d <= micro and rank_batch % d == 0]
    t_bal = _step_seconds(balanced, block_size, tps)
    if divisors:
        d = max(divisors)
        even = split_batch(rank_batch, d)
        t_even = _step_seconds(even, block_size, tps)
        if t_even < t_bal:
            return even, (f"the divisor {d} ({t_even:.3g} s/step) beats the balanced split "
                          f"{describe_split(balanced)} ({t_bal:.3g} s/step)")
        return balanced, (f"balanced split ({t_bal:.3g} s/step) beats the divisor {d} ({t_even:.3g} s/step); "
                          f"each micro-batch's loss is weighted by its share of tokens")
    return balanced, "balanced split (no measured divisor of the batch); each micro-batch's loss is weighted by its tokens"


def _retime_contenders(runner: TrialRunner, fits: list[TrialRecord]) -> None:
    """A search trial times few steps, which is noisy on a busy machine. When the best sizes of
    different lever combinations come close, time each of them again: RETIME_ROUNDS rounds in
    alternation (A B A B), each over RETIME_STEPS steps after a warm-up, so a machine whose speed
    drifts slows every contender alike; each one's rate becomes the median of its rounds."""
    per_combo: dict[Levers, TrialRecord] = {}
    for t in fits:
        key = Levers.of(t)
        if key not in per_combo or (t.tokens_per_s or 0) > (per_combo[key].tokens_per_s or 0):
            per_combo[key] = t
    top = max((t.tokens_per_s or 0) for t in per_combo.values())
    contenders = [t for t in per_combo.values() if (t.tokens_per_s or 0) >= RETIME_WITHIN * top]
    if len(contenders) >= 2:
        retime(runner, contenders)


def retime(runner: TrialRunner, contenders: list[TrialRecord]) -> None:
    """Re-times `contenders` in alternation and replaces each one's tokens/s by the median of its
    rounds (records that stop fitting keep their first figure)."""
    s = runner.settings
    longer = TrialSettings(steps=RETIME_STEPS + 1, compile_backend=s.compile_backend, seed=s.seed,
                           spill_check=s.spill_check)
    rates: dict[int, list[float]] = {id(t): [] for t in contenders}
    for _ in range(RETIME_ROUNDS):
        for t in contenders:
            r = agree.trial(run_trial(runner.cfg, t.candidate(), runner.device, rank_batch=runner.rank_batch,
                                      budget_bytes=runner.budget_bytes, settings=longer))
            if r.status == "fit" and r.tokens_per_s:
                rates[id(t)].append(r.tokens_per_s)
                t.step_seconds = t.step_seconds + r.step_seconds
                t.steps_run += r.steps_run
    for t in contenders:
        got = rates[id(t)]
        if not got:
            continue
        runner.log(f"re-timed micro-batch {t.micro_batch} {t.dtype} compile={t.compile} ckpt={t.checkpointing} "
                   f"{t.loss_impl}: {t.tokens_per_s:,.0f} -> {statistics.median(got):,.0f} tok/s "
                   f"({len(got)} alternating rounds of {RETIME_STEPS} steps)")
        t.tokens_per_s = statistics.median(got)
        t.note = (t.note + "; " if t.note else "") + \
            f"tokens/s re-timed: median of {len(got)} alternating rounds of {RETIME_STEPS} steps"


def _nothing_fits(cfg, trials: list[TrialRecord], budget: Budget, kind: str, estimated: bool = False):
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


def probe_estimated(cfg, info, hw, budget: Budget, space: Space) -> ProbeResult:
    """No matching GPU here: the estimate is the whole answer, and says so. For each lever
    combination, the largest micro-batch whose estimated peak fits; the one with the highest
    estimated tokens/s (autofit.planning.throughput) wins. Raises PlanError when none fits."""
    shape = ModelShape.from_config(cfg)
    E = cfg.effective_batch
    trials: list[TrialRecord] = []
    best = None
    for lv in lever_combos(space):
        m = min(E, max_micro_batch(shape, budget.budget_bytes, dtype=lv.dtype, checkpointing=lv.checkpointing,
                                   loss_impl=lv.loss_impl, compile=False, device="cuda",
                                   ce_chunk_size=cfg.ce_chunk_size))
        est = estimate_peak(shape, max(m, 1), dtype=lv.dtype, checkpointing=lv.checkpointing,
                            loss_impl=lv.loss_impl, compile=False, device="cuda", ce_chunk_size=cfg.ce_chunk_size)
        if m == 0:
            trials.append(TrialRecord(**lv.candidate(1).model_dump(), status="pruned",
                                      estimated_peak_bytes=est.peak_bytes,
                                      note="estimated not to fit even at micro-batch 1"))
            continue
        tps = estimated_tokens_per_s(shape, m, lv.dtype, lv.checkpointing, hw)
        rec = TrialRecord(**lv.candidate(m).model_dump(), status="fit", estimated_peak_bytes=est.peak_bytes,
                          tokens_per_s=tps,
                          note="estimated: largest micro-batch whose estimated peak fits; tokens/s from "
                               f"peak TFLOP/s x {ASSUMED_MFU:.0%} assumed MFU")
        trials.append(rec)
        if best is None or tps > best.tokens_per_s:
            best = rec
    if best is None:
        _nothing_fits(cfg, trials, budget, "cuda", estimated=True)
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
                      compile=compile_on, compile_after=resolve_compile_after(cfg) if compile_on else 0,
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


__all__ = ["NOISE", "PlanError", "ProbeResult", "Space", "choose", "choose_split", "confirm_compile",
           "probe_estimated", "probe_measured"]
