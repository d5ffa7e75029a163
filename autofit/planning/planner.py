"""From a config and a device to a plan. The plan is the fastest measured candidate whose measured
peak fits the budget; the effective batch (sequences per optimizer step) is kept exact.

The measured probe (probe_measured), step by step:
1. for each lever combination (dtype x activation checkpointing x loss implementation), the largest
   eager micro-batch that fits (autofit.planning.search.MicroBatchSearch), half of it, and where
   those two read alike, a third size beside them: all are contenders (the rate can be flat,
   fall, or peak beside a flat pair in the micro-batch);
2. before the first recomputing combination, the contenders so far are decided (autofit.planning.
   contest); a recomputing combination is skipped (autofit.planning.prune) when the combinations without it already hold the
   whole batch, the estimate promises no larger size, or their measured rate rises too slowly in
   the micro-batch for that size to pay back recomputation's extra compute (a third for full
   checkpointing, less for selective: autofit.planning.throughput.RECOMPUTE_SHARE); a chunked-loss
   combination is skipped where it does not fit the next run size past the standard loss's largest
   fit (at the same size it is the same work in chunks: autofit.planning.prune.prune_loss);
3. autofit.planning.contest.decide: every contender (and the config's own micro-batch where it
   fits) re-timed in alternation, judged on its fastest step's time per token, until the
   difference is clear or a tie, which goes to the most headroom (or the user's own split);
4. autofit.planning.confirm.confirm_compile: when compile is in the space, run the chosen size compiled (and the next
   smaller fit if the compiled peak is higher) and keep it if it is faster;
5. split the effective batch into micro-batches (balanced, or a divisor when measured faster),
   its largest size run as the plan runs it (autofit.planning.confirm.run_the_split_size).
With no matching GPU here, autofit.planning.estimated answers from the closed-form estimate alone.
"""
from __future__ import annotations

import math
from typing import Callable

from autofit.planning import agree
from autofit.planning.budget import Budget, compute_budget
from autofit.planning.candidates import Levers, PlanError, Space, error_lines, lever_combos
from autofit.planning.confirm import confirm_compile, record_of, run_the_split_size
from autofit.planning.estimate import CUDA_WORKSPACE_BYTES, estimate_peak
from autofit.records import PlanRecord, ProbeResult, TrialRecord, judged_peak
from autofit.planning.own import own_split, own_why
from autofit.planning.prune import prune_loss, prune_recompute, prune_sharding
from autofit.planning.search import MicroBatchSearch, TrialRunner
from autofit.planning.split import choose_split, run_size, run_sizes, split_rates, plan_rates
from autofit.planning.contest import (TIE_MAX, CLEAR_CONSISTENT, decide, label, peak_of, per_token, run_tokens_per_s,
                                      seconds_per_token)
from autofit.planning.trials import TrialSettings, new_objects_only
from autofit.units import fmt_bytes
from trainer.compiler import resolve_compile_after
from trainer.step import describe_split



def probe_measured(cfg, device, budget: Budget, space: Space, *, settings: TrialSettings | None = None,
                   log: Callable[[str], None] = lambda s: None, bound: agree.Binding | None = None) -> ProbeResult:
    """Trials on a real device (CUDA, or the budgeted CPU device); see the module docstring.
    `bound`: with several ranks, the agreement that gave `budget` (agree.bind: every rank's own
    budget, and the device it binds on); None: `budget` is this process's own. The result's device
    is the binding rank's, picked again where the budget is measured again.
    Raises PlanError when nothing fits or --compile cannot be honoured."""
    # A trial above the planning budget fails fast: the device is limited to the budget while
    # probing (the budgeted CPU device's budget lowered, CUDA's allocator capped), so such a trial
    # raises OOM in its first step instead of taking memory others hold, or running every step to
    # be judged 'over budget' at the end.
    info = device.info  # as opened: the limit below is the probe's, not the device's
    bound = bound or agree.Binding(budget, budget, info)
    runner = TrialRunner(cfg, device, budget.budget_bytes, settings or TrialSettings(), log)
    if device.context_bytes is not None:
        # CUDA: cuBLAS, cuDNN and Triton load their workspaces at first use, outside the
        # allocator. Run the smallest trial, measure again, and plan with what is left.
        with device.limited_to(budget.budget_bytes):
            runner.run(lever_combos(space)[0].candidate(1))
        # each rank's own budget again, then the smallest again: it may now be another rank's,
        # whose device the result then names
        bound = agree.bind(_remeasured_budget(device, bound.own, runner), info)
        if bound.words and bound.budget.budget_bytes != budget.budget_bytes:
            runner.log(f"the ranks' budget after the first trial: {fmt_bytes(budget.budget_bytes)} -> "
                       f"{fmt_bytes(bound.budget.budget_bytes)}, {bound.words}")
        budget = bound.budget
        runner.budget_bytes = budget.budget_bytes
        _rejudge(runner)
    with device.limited_to(budget.budget_bytes), new_objects_only():
        result = _plan_from_trials(cfg, runner, budget, space)
    result.device, result.device_ranks = bound.device, bound.words
    return result


def _rejudge(runner: TrialRunner) -> None:
    """Trials judged against the budget before it was lowered, judged again; a record whose
    status changes is reported again (runner.on_trial: AUTOFIT_TRIALS_JSONL gets its new status,
    the later line of the same candidate)."""
    for t in runner.trials:
        if t.status == "fit" and peak_of(t) > runner.budget_bytes:
            t.status, t.note = "over_budget", "re-judged: its peak is above the budget lowered after the first trial"
            runner.on_trial(t)


def _remeasured_budget(device, own: Budget, runner: TrialRunner) -> Budget:
    """This rank's budget (`own`) again, from the context measured after the first trial; never larger."""
    before = device.context_bytes
    after = device.refresh_context()
    if after is None or before is None or after <= before:
        return own
    new = compute_budget(device.info, own.margin, context_bytes=after, workspace_bytes=0,
                         context_how="measured after the first trial: this process's device memory outside "
                                     "torch's allocator (context, cuBLAS/cuDNN/Triton workspaces)")
    if new.budget_bytes >= own.budget_bytes:
        return own
    whose = "this rank's " if agree.ranks().several else ""  # the ranks' agreed one is said after it
    runner.log(f"memory outside the allocator grew from {fmt_bytes(before)} to {fmt_bytes(after)} after the "
               f"first trial: {whose}budget {fmt_bytes(own.budget_bytes)} -> {fmt_bytes(new.budget_bytes)}")
    return new


def _plan_from_trials(cfg, runner: TrialRunner, budget: Budget, space: Space) -> ProbeResult:
    E = runner.rank_batch  # sequences per step on each rank (the effective batch with one)
    best_by_levers: dict[Levers, int] = {}
    pool: list[TrialRecord] = []  # the contenders: each combination's largest fit and a smaller size
    before = None  # the contest of the combinations without recomputation
    for levers in lever_combos(space):
        if levers.checkpointing and before is None and len(pool) > 1:
            # settle the combinations without recomputation first: their robust figures say
            # whether recomputation could pay back at all (prune.prune_recompute)
            before = decide(runner, pool, before=before)
            pool = [before.winner]
        pruned = (prune_sharding(runner, levers, best_by_levers) or prune_recompute(runner, levers, best_by_levers)
                  or prune_loss(runner, levers, best_by_levers))
        if pruned is not None:
            runner.trials.append(pruned)
            runner.on_trial(pruned)  # AUTOFIT_TRIALS_JSONL has every record, run or pruned
            runner.log(f"skipped: {label(pruned)}: {pruned.note}")
            continue
        best_by_levers[levers] = largest = MicroBatchSearch(runner, levers).run()
        pool += _sizes_to_time(runner, levers, largest)
    if not runner.fits():
        _nothing_fits(cfg, runner.trials, budget, runner.kind)
    own = own_split(cfg, runner, best_by_levers)
    decision = decide(runner, pool + ([own] if own else []), own=own, before=before)
    fits = runner.fits()  # again: the own split's trial may have run since
    chosen, compiled_fits, why_compile = confirm_compile(runner, decision.winner, fits, space, budget)
    measured_tps = {t.micro_batch: run_tokens_per_s(t) for t in fits
                    if Levers.of(t) == Levers.of(chosen) and t.tokens_per_s and t.micro_batch <= chosen.micro_batch}
    micro_batches, why_split = choose_split(E, chosen.micro_batch, split_rates(chosen, measured_tps, runner.trials),
                                            cfg.block_size)
    micro_batches, why_split = run_the_split_size(runner, chosen, micro_batches, why_split)
    runs = record_of(runner, chosen, max(micro_batches))
    # a compiled plan's run starts eager (compile_after): the larger of both peaks at its size;
    # an eager plan's is its own trial's, never the compiled one's it did not choose
    at_size = [t for t in runner.fits(Levers.of(chosen), compile=None if chosen.compile else False)
               if t.micro_batch == runs.micro_batch]
    peak = max(t.measured_peak_bytes or 0 for t in at_size)
    reserved = max((t.measured_reserved_bytes for t in at_size if t.measured_reserved_bytes), default=None)
    est = estimate_peak(runner.shape, max(micro_batches), **Levers.of(chosen).estimate_args(),
                        compile=chosen.compile, device=runner.kind,
                        ce_chunk_size=cfg.ce_chunk_size, n_micro=min(2, len(micro_batches)),
                        step_batch=runner.rank_batch, **agree.layout(chosen.sharded))
    why_peak = (f"{'measured reserved peak' if reserved else 'measured peak'} {fmt_bytes(max(peak, reserved or 0))} "
                f"within the {fmt_bytes(budget.budget_bytes)} budget")
    plan = PlanRecord(mode="measured", micro_batch=max(micro_batches), grad_accum=len(micro_batches),
                      micro_batches=micro_batches, effective_batch=E, block_size=cfg.block_size,
                      dtype=chosen.dtype, compile=chosen.compile,
                      compile_after=resolve_compile_after(cfg) if chosen.compile else 0,
                      checkpointing=chosen.checkpointing, loss_impl=chosen.loss_impl,
                      checkpointing_policy=chosen.checkpointing_policy,
                      estimated_peak_bytes=est.peak_bytes, measured_peak_bytes=peak,
                      measured_reserved_bytes=reserved, budget_bytes=budget.budget_bytes,
                      **plan_rates(micro_batches, cfg.block_size, runner.fits(Levers.of(chosen), compile=chosen.compile)),
                      split=describe_split(micro_batches), reason=_reason(cfg, runner, decision, chosen, own, why_peak,
                                                                         why_split, why_compile),
                      **agree.plan_fields(chosen.sharded))
    return ProbeResult(mode="measured", device=None, budget=budget, effective_batch=cfg.effective_batch,
                       block_size=cfg.block_size, trials=runner.trials, plan=plan, breakdown=est.breakdown,
                       fit_sizes=sorted(t.micro_batch for t in runner.fits(Levers.of(chosen))),
                       compiled_fit_sizes=compiled_fits)


def _reason(cfg, runner: TrialRunner, decision, chosen: TrialRecord, own, why_peak: str, why_split: str,
            why_compile: str = "") -> str:
    """The plan's 'why': the contest's words and compile's (confirm_compile), then the smaller
    size's and the user's own split's, the measured peak against the budget, the split, and what
    the CPU device cannot measure, and each combination a non-memory error stopped (error_lines; with no
    '(-v lists it)': the why is shown under -v and in --json, each beside the trials it would point to)."""
    n_fit = len([t for t in runner.trials if t.status == "fit"])
    cpu_compile_note = ("; compile=True in the config is not measured on the budgeted CPU device (its tracker "
                        "keeps Dynamo from compiling), so the plan is eager"
                        if not runner.device.capabilities.compile and cfg.compile else "")
    return (f"{decision.why}{'; ' + why_compile if why_compile else ''}"
            f" ({n_fit} fitting trials){_smaller_why(runner, chosen, decision)}{own_why(runner, chosen, own)}; "
            f"{why_peak}; {why_split}{cpu_compile_note}" + "".join(f"; {e}" for e in error_lines(runner.trials, listed=True)))




# A combination's half size whose search readings already take this much more time per token
# than its largest fit's is not a contender (autofit.planning.contest's CLEAR_CONSISTENT).
SMALLER_CLEAR = CLEAR_CONSISTENT


def _sizes_to_time(runner: TrialRunner, levers: Levers, largest: int) -> list[TrialRecord]:
    """The contenders of one combination: its largest fit and half of it, and where the half reads
    no more than TIE_MAX slower than the largest per token (alike, or faster: a flat or falling
    rate, where a size beside them can be faster still), one run size more. Where the
    rate is flat or falls with the micro-batch (a compute-bound device; the chunked loss slowing
    as its chunk grows), the smaller size is as fast with more headroom, and the contest says so.
    A flat pair can hide a better size beside it, on this CPU by 4-5 % (docs/planner-benchmark.md,
    fifth pass): so the run size nearest the pair's geometric mean is timed (chunked 11 beat 8
    and 16 on L4 C128 T128 V4096), or, with none between them, the one nearest half / sqrt(2)
    below the half (chunked 11 beat 16 and 32 on L2 C128 T64 V8192). Only for a pair within
    TIE_MAX, and it wins only when clearly faster than every other contender, never a tie
    (runner.thirds, autofit.planning.contest.decide): on the tiny preset a third size 7, 10-12 %
    slower on the grid, read tied with 11 in some processes and won by its headroom (0.88-0.91). A half size more than SMALLER_CLEAR
    slower than the largest already in its search readings is dropped before any re-timing:
    wrongly dropped (a burst of load in its trial), it costs headroom only."""
    if largest == 0:
        return []
    sizes = sorted({largest, run_size(runner.rank_batch, max(1, largest // 2))}, reverse=True)
    out = [r for r in (runner.run(levers.candidate(m)) for m in sizes) if r.status == "fit"]
    if len(out) != 2:
        return out
    big, small = out
    cpu = runner.kind == "cpu"
    ratio = seconds_per_token(small, cpu) / seconds_per_token(big, cpu)
    if ratio > 1 + SMALLER_CLEAR:
        # the rate rises steeply here, so the smaller size is not a faster plan; if a burst of
        # load made it look so, the loss is headroom only (the larger size is as fast)
        runner.log(f"contest: {label(small)} not re-timed: its readings take {ratio:.{2 if round(ratio, 2) > 1 + SMALLER_CLEAR else 3}f}x the {per_token(cpu)} "
                   f"of micro-batch {big.micro_batch} with the same levers (out past {1 + SMALLER_CLEAR:.2f}x)")
        runner.dropped.add(small.candidate())  # the user's own split comes back: contest.decide says so
        return [big]
    third = _third_size(run_sizes(runner.rank_batch), small.micro_batch, big.micro_batch)
    if ratio <= 1 + TIE_MAX and third is not None:
        how = (f"within {TIE_MAX:.0%} of" if ratio >= 1 - TIE_MAX else "faster than")  # a flat or a falling rate
        runner.log(f"contest: {label(small)} reads {how} micro-batch {big.micro_batch}'s {per_token(cpu)} "
                   f"({ratio:.2f}x), so micro-batch {third} with the same levers is timed too")
        r = runner.run(levers.candidate(third))
        if r.status == "fit":
            runner.thirds.add(r.candidate())
            out.append(r)
    return out


def _third_size(sizes: list[int], small: int, big: int) -> int | None:
    """The run size (of `sizes`) nearest the geometric mean of `small` and `big`, or where none is
    between them, nearest small / sqrt(2) below `small`; None where neither exists."""
    between = [m for m in sizes if small < m < big]
    pool, target = (between, math.sqrt(small * big)) if between else ([m for m in sizes if m < small], small / math.sqrt(2))
    return min(pool, key=lambda m: abs(math.log(m / target))) if pool else None


def _smaller_why(runner: TrialRunner, chosen: TrialRecord, decision) -> str:
    """Why the plan does not run the largest size that fits with its levers, if it does not, in
    the contest's own terms: the largest was out because its re-timing did not fit, tied with
    the winner (a tie never goes to the larger size), or read slower (a flat or falling rate);
    and, for a compiled `chosen` below the eager winner, that the compiled peak there did not fit."""
    eager = decision.winner
    largest = max(runner.fits(Levers.of(eager)), key=lambda t: t.micro_batch)
    cpu = runner.kind == "cpu"
    ratio = seconds_per_token(largest, cpu) / seconds_per_token(eager, cpu)
    head = f"; micro-batch {eager.micro_batch}, not the largest fit {largest.micro_batch}: "
    if largest.micro_batch <= eager.micro_batch:
        why = ""
    elif any(t.candidate() == largest.candidate() for t in decision.unfit):
        why = head + f"{largest.micro_batch}'s re-timing did not fit (fragmentation, or memory another process took)"
    elif any(t.candidate() == largest.candidate() for t in decision.tied):
        why = head + (f"tied with it, the rate flat or falling in the micro-batch within the readings' spread "
                      f"({largest.micro_batch} takes {ratio:.2f}x its {per_token(cpu)}), and a tie goes to the headroom")
    elif ratio >= 1:
        why = head + (f"the rate is flat or falling in the micro-batch ({largest.micro_batch} takes {ratio:.2f}x its "
                      f"{per_token(cpu)}), so the smaller size runs as fast with more headroom")
    else:
        why = head + f"{largest.micro_batch} reads {ratio:.2f}x its {per_token(cpu)} but was not among the contest's last"
    if chosen.compile and chosen.micro_batch < eager.micro_batch:
        why += f"; compiled at micro-batch {chosen.micro_batch}: compiled, {eager.micro_batch} did not fit"
    return why


def _nothing_fits(cfg, trials: list[TrialRecord], budget: Budget, kind: str, estimated: bool = False):
    errors = [t for t in trials if t.status == "error"]
    if errors and not any(t.status in ("oom", "over_budget") for t in trials):  # not memory: say what it was
        first = (errors[0].note or "no reason given").strip().splitlines()[0][:300]
        raise PlanError(f"no trial could run: {len(errors)} trial{'s' * (len(errors) != 1)} failed with an error that is not out of "
                        f"memory, the first: {first} (-v lists every trial)")
    measured = [judged_peak(t) for t in trials if t.measured_peak_bytes]  # reserved where the device has it
    ests = [t.estimated_peak_bytes for t in trials if t.estimated_peak_bytes]
    if measured:
        smallest = f"smallest measured peak {fmt_bytes(min(measured))}"
    elif estimated:
        smallest = f"smallest estimated peak {fmt_bytes(min(ests))}" if ests else "no estimate"
    elif ests:
        ran = any(t.status != "pruned" for t in trials)  # pruned: ruled out by the estimate, never run
        smallest = f"smallest estimated peak {fmt_bytes(min(ests))} (" + (
            ("every trial ran out of memory)" if not errors else "every trial ran out of memory or failed: -v "
             "lists them)") if ran else
            "over the budget by more than the estimate's error bound on this device, so no trial ran)")
    else:
        smallest = "no trial could run"
    from autofit.devices.ranks import budget_flag
    bigger = f"a larger {budget_flag()}" if kind == "cpu" else "a bigger GPU"
    head = f"nothing fits: {smallest} against a budget of {fmt_bytes(budget.budget_bytes)}{_why_none(budget)}"
    if kind != "cpu" and budget.budget_bytes <= CUDA_WORKSPACE_BYTES:  # t10's L3: no model knob can help there
        raise PlanError(f"{head}; every CUDA step also holds {fmt_bytes(CUDA_WORKSPACE_BYTES)} of cuBLAS workspaces, "
                        f"so no smaller model fits: only a bigger GPU would help")
    raise PlanError(f"{head}, even at micro-batch 1 with every lever tried; {_what_would_help(cfg)}, or {bigger} would help")


def _why_none(budget: Budget) -> str:
    """Where a card's budget is empty, why (t9's L3: a 1 MiB profile said 'a budget of 0 B' and no
    more): its free memory is less than what the CUDA context and library workspaces take."""
    reserved = -sum(t.bytes for t in budget.terms if t.label in ("CUDA context", "library workspaces"))
    if budget.usable_bytes > 0 or not budget.terms or reserved <= 0:
        return ""
    return (f" (the {fmt_bytes(budget.terms[0].bytes)} free is less than the {fmt_bytes(reserved)} the CUDA "
            f"context and library workspaces take)")


def _what_would_help(cfg) -> str:
    """The model's knobs that shrink its peak, the vocabulary's first where its embedding and head
    are most of the parameters (t8: a 50304 vocabulary at n_embd 64 is ~90 % of them, and the advice
    named block_size and n_layer, which could not help)."""
    from autofit.planning.arch_terms import param_entries
    from autofit.planning.estimate import ModelShape
    entries = param_entries(ModelShape.from_config(cfg))
    vocab = sum(n for n, kind in entries if kind in ("wte", "head")) / max(1, sum(n for n, _ in entries))
    rest = f"a shorter block_size (now {cfg.block_size}), a smaller model than n_layer {cfg.n_layer} / n_embd {cfg.n_embd}"
    if vocab > 0.5:
        return (f"a smaller vocab_size (now {cfg.vocab_size}: its embedding and head are {vocab:.0%} of the "
                f"parameters, with their gradients and optimizer state), {rest}")
    return rest


__all__ = ["PlanError", "ProbeResult", "Space", "choose_split", "confirm_compile", "split_rates",
           "probe_measured"]
