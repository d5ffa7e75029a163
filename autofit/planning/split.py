"""The split of one optimizer step's batch into micro-batches: balanced (sizes differing by at
most one, each micro-batch's loss weighted by its tokens) or the largest measured divisor,
whichever has the shorter step time at the measured (or estimated) rates."""
from __future__ import annotations

from typing import Callable

from autofit.records import TrialRecord
from autofit.planning.candidates import Levers
from autofit.planning.contest import run_tokens_per_s
from trainer.step import describe_split, split_batch


def run_size(rank_batch: int, micro_batch: int) -> int:
    """The micro-batch a run capped at `micro_batch` really runs: the largest of the balanced split
    of `rank_batch` (trainer.step.split_batch), never above the cap: at 32, a cap of 10 runs
    8 x 4 and 12 runs 11 + 11 + 10. Raises ValueError for sizes below 1."""
    return max(split_batch(rank_batch, micro_batch))


def run_sizes(rank_batch: int) -> list[int]:
    """Every micro-batch a run of `rank_batch` sequences per step can run, ascending (the sizes
    that are their own run_size: at 32, 1-8, 11, 16 and 32). A size between two of them runs as
    the smaller, so it is never worth a trial of its own."""
    # the run sizes are the values of ceil(B / n) over the n micro-batches a step can have: at most
    # 2 sqrt(B) of them, found by jumping from one to the next (n = ceil(B / (v - 1)) is where the
    # size v ends), not by trying all B caps
    sizes, n = set(), 1
    while n <= rank_batch:
        v = -(-rank_batch // n)
        sizes.add(v)
        n = -(-rank_batch // (v - 1)) if v > 1 else rank_batch + 1
    return sorted(sizes)


def _step_seconds(micro_batches: list[int], block_size: int, tps: Callable[[int], float]) -> float:
    return sum(m * block_size / tps(m) for m in micro_batches)


def rate_at(rates: dict[int, float], m: int) -> float:
    """Tokens/s of micro-batch `m` from `rates` (micro-batch -> tokens/s): its own where it was
    measured, else the nearest measured size's (the larger one on a tie)."""
    return rates[min(rates, key=lambda s: (abs(s - m), -s))]


def step_tokens_per_s(micro_batches: list[int], block_size: int, rates: dict[int, float]) -> float:
    """Tokens/s of one optimizer step of `micro_batches` (sequences of `block_size` tokens): its
    tokens over the sum of each micro-batch's time at its rate (rate_at). One size: its rate;
    11 + 11 + 10 with 10 not measured: 11's rate, since 10 is timed at it."""
    return sum(micro_batches) * block_size / _step_seconds(micro_batches, block_size, lambda m: rate_at(rates, m))


def plan_tokens_per_s(micro_batches: list[int], block_size: int, runs: list[TrialRecord]) -> float | None:
    """The plan's undisturbed tokens/s: one optimizer step of `micro_batches` timed at the rates
    measured for the plan's own levers and compile (`runs`, its fitting trials; each the run's
    figure from its fastest step, run_tokens_per_s), a size not run at the nearest run size's rate
    (step_tokens_per_s). None without a timed trial."""
    rates = {t.micro_batch: run_tokens_per_s(t) for t in runs if t.tokens_per_s}
    return step_tokens_per_s(micro_batches, block_size, rates) if rates else None


def plan_rates(micro_batches: list[int], block_size: int, runs: list[TrialRecord]) -> dict:
    """The plan's measured tokens/s as PlanRecord keeps them: `tokens_per_s` from each size's
    median timed step (TrialRecord.run_tokens_per_s_median: what the run should see, load and
    all), `fastest_tokens_per_s` from each size's fastest (plan_tokens_per_s: the undisturbed
    figure the contest compares), and `timed_steps`, the readings of the largest size's trial.
    Every figure is of the sizes the plan runs (a size not run at the nearest run size's rate);
    all None without a timed trial."""
    timed = {t.micro_batch: t for t in runs if t.tokens_per_s}
    if not timed:
        return {"tokens_per_s": None, "fastest_tokens_per_s": None, "timed_steps": None}
    median = {m: t.run_tokens_per_s_median or run_tokens_per_s(t) for m, t in timed.items()}
    top = timed[min(timed, key=lambda s: (abs(s - max(micro_batches)), -s))]
    return {"tokens_per_s": step_tokens_per_s(micro_batches, block_size, median),
            "fastest_tokens_per_s": plan_tokens_per_s(micro_batches, block_size, runs),
            "timed_steps": len(top.step_seconds) or None}


def split_rates(chosen: TrialRecord, eager_tps: dict[int, float], trials: list[TrialRecord]) -> dict[int, float]:
    """Tokens/s by micro-batch for choosing the split of the `chosen` plan (each the run's figure,
    autofit.planning.contest.run_tokens_per_s). Eager: the measured eager rates of its levers
    (`eager_tps`). Compiled: the compiled rates where a compiled trial of
    its levers was measured, and elsewhere the eager rate times the compile speed-up measured at
    the chosen size, so the split is judged at the speed the plan will run."""
    if not chosen.compile:
        return eager_tps
    eager_at_chosen = eager_tps.get(chosen.micro_batch)
    # the same figure as the eager rates: the run's tokens/s, the update once per optimizer step
    speedup = (run_tokens_per_s(chosen) or 0) / eager_at_chosen if eager_at_chosen else 1.0
    rates = {m: r * speedup for m, r in eager_tps.items()}
    rates.update({t.micro_batch: run_tokens_per_s(t) for t in trials if t.compile and t.status == "fit"
                  and t.tokens_per_s and Levers.of(t) == Levers.of(chosen)})
    return rates


def choose_split(rank_batch: int, micro: int, measured_tps: dict[int, float], block_size: int) -> tuple[list[int], str]:
    """Between the balanced split (micro-batches of at most `micro`, sizes differing by at most
    one) and the largest measured divisor of the batch, the one with the shorter step time at the
    measured rates. A size that was not measured is timed at the rate of the nearest measured
    size."""
    def tps(m: int) -> float:
        return rate_at(measured_tps, m)
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
            return even, (f"micro-batch {d}, which divides the batch ({describe_split(even)}, {t_even:.3g} s/step), "
                          f"beats the balanced split {describe_split(balanced)} ({t_bal:.3g} s/step)")
        # t7's L15: 'the divisor 2' read as a number of micro-batches
        return balanced, (f"balanced split ({t_bal:.3g} s/step) beats micro-batch {d}, which divides the batch "
                          f"({describe_split(even)}, {t_even:.3g} s/step); each micro-batch's loss is weighted by its "
                          f"share of tokens")
    return balanced, "balanced split (no measured divisor of the batch); each micro-batch's loss is weighted by its tokens"
