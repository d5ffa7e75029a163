"""After the contest: the compiled run of the winner confirmed against it (confirm_compile), and
the size the plan's split runs measured (run_the_split_size, record_of)."""
from __future__ import annotations

from autofit.planning.budget import Budget
from autofit.planning.candidates import Levers, PlanError, Space
from autofit.planning.contest import decide
from autofit.planning.search import TrialRunner
from autofit.records import TrialRecord
from autofit.units import fmt_bytes
from trainer.step import split_batch


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
        # the same split, the same timed steps, in alternation: compiled and eager compare; a
        # tie goes to the most headroom (compile has to pay for itself)
        twin = next(t for t in fits if t.candidate() == r.candidate().model_copy(update={"compile": False}))
        if decide(runner, [best, twin, r]).winner is r:
            return r, compiled_fits
    if r.status == "fit" and forced:
        return r, compiled_fits
    if forced:
        raise PlanError(f"--compile: no compiled candidate fits the {fmt_bytes(budget.budget_bytes)} budget "
                        f"(tried micro-batch {c.micro_batch}" + (f" and {r.micro_batch}" if r.micro_batch !=
                        c.micro_batch else "") + "); drop --compile to let an eager plan win")
    return best, compiled_fits


def record_of(runner: TrialRunner, chosen: TrialRecord, micro_batch: int) -> TrialRecord:
    """The trial of the size the plan runs (its largest micro-batch), compiled as `chosen` is:
    its measured tokens/s is the plan's (run_the_split_size ran it; `chosen` itself otherwise)."""
    same = [t for t in runner.fits(Levers.of(chosen), compile=chosen.compile) if t.micro_batch == micro_batch]
    return same[0] if same else chosen


def run_the_split_size(runner: TrialRunner, chosen: TrialRecord, micro_batches: list[int]) -> list[int]:
    """Every size in a plan was run, compiled as the plan is: a balanced split's largest
    micro-batch can be below the chosen size (21 at 10 runs 7s), and a measured divisor below it
    (a compiled plan of 11 at 32 can run 8 x 4); run it if no trial did, so the plan's tokens/s is
    that size's (smaller sizes fit, as memory grows with the micro-batch, so this measures it
    rather than tests it)."""
    largest = max(micro_batches)
    if any(t.micro_batch == largest for t in runner.fits(Levers.of(chosen), compile=chosen.compile)):
        return micro_batches
    r = runner.run(Levers.of(chosen).candidate(largest, compile=chosen.compile))
    if r.status == "fit" or largest == 1:
        return micro_batches
    # memory that did not grow with the micro-batch (fragmentation): balance below it instead
    return run_the_split_size(runner, chosen, split_batch(runner.rank_batch, largest - 1))
