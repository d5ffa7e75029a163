"""After the contest: the compiled run of the winner confirmed against it (confirm_compile), and
the size the plan's split runs measured (run_the_split_size, record_of)."""
from __future__ import annotations

from autofit.planning.budget import Budget
from autofit.planning.candidates import Levers, PlanError, Space
from autofit.planning.contest import decide, per_token, seconds_per_token
from autofit.planning.search import TrialRunner
from autofit.records import TrialRecord
from autofit.units import fmt_bytes
from trainer.step import split_batch


def confirm_compile(runner: TrialRunner, best: TrialRecord, fits: list[TrialRecord], space: Space,
                    budget: Budget) -> tuple[TrialRecord, list[int], str]:
    """Runs the chosen eager candidate compiled (the compiled peak can be higher: then the next
    smaller eager fit) and returns (the winner, compiled micro-batches that fit, words on compile
    for the plan's why: '' where compile is not in the space). The compiled run wins only when
    clearly faster than eager (a tie keeps eager: a compiled run starts eager, compile_after, so
    its peak is the larger of both and it has no more headroom), or always under --compile
    (not compared then). Raises PlanError under --compile when no compiled size fits."""
    if True not in space.compile:
        return best, [], ""
    c = best.candidate().model_copy(update={"compile": True})
    r = runner.run(c)
    if r.status not in ("fit", "error"):  # an error is not memory: a smaller size fails the same way
        smaller = sorted(t.micro_batch for t in fits if Levers.of(t) == Levers.of(best) and t.micro_batch < best.micro_batch)
        if smaller:
            r = runner.run(c.model_copy(update={"micro_batch": smaller[-1]}))
    compiled_fits = sorted(t.micro_batch for t in runner.trials if t.compile and t.status == "fit")
    tried = f"micro-batch {c.micro_batch}" + (f" and {r.micro_batch}" if r.micro_batch != c.micro_batch else "")
    if False not in space.compile:  # --compile: the plan must be compiled, whatever eager would do
        if r.status == "fit":
            return r, compiled_fits, "--compile: compiled as asked, not compared with eager"
        raise PlanError(f"--compile: no compiled candidate fits the {fmt_bytes(budget.budget_bytes)} budget "
                        f"(tried {tried}); drop --compile to let an eager plan win")
    if r.status != "fit":
        how = "failed with an error that is not out of memory" if r.status == "error" else "did not fit"
        return best, compiled_fits, f"compiled: {how} ({tried}), so eager runs"
    # the same split, the same timed steps, in alternation: compiled and eager compare
    twin = next(t for t in fits if t.candidate() == r.candidate().model_copy(update={"compile": False}))
    d = decide(runner, [best, twin, r])
    cpu = runner.kind == "cpu"
    eager = min((best, twin), key=lambda t: seconds_per_token(t, cpu))
    ratio = seconds_per_token(eager, cpu) / seconds_per_token(r, cpu)  # > 1: compiled is faster
    won = d.winner is r and len(d.tied) == 1  # clearly faster: a tie is not a win for compile
    if won:
        why = (f"compiled: faster than eager, re-timed in alternation (eager micro-batch {eager.micro_batch} takes "
               f"{ratio:.2f}x compiled {r.micro_batch}'s {per_token(cpu)})")
    elif r in d.tied:
        why = (f"compiled micro-batch {r.micro_batch} tied with eager ({1 / ratio:.2f}x eager's {per_token(cpu)}, within "
               f"the readings' spread), so eager runs: a compiled run starts eager, so it has no more headroom")
    else:
        why = f"compiled micro-batch {r.micro_batch} is slower: {1 / ratio:.2f}x eager's {per_token(cpu)}, so eager runs"
    runner.log(f"compile: {why}")
    return (r if won else best), compiled_fits, why


def record_of(runner: TrialRunner, chosen: TrialRecord, micro_batch: int) -> TrialRecord:
    """The trial of the size the plan runs (its largest micro-batch), compiled as `chosen` is:
    its measured tokens/s is the plan's (run_the_split_size ran it; `chosen` itself otherwise)."""
    same = [t for t in runner.fits(Levers.of(chosen), compile=chosen.compile) if t.micro_batch == micro_batch]
    return same[0] if same else chosen


def run_the_split_size(runner: TrialRunner, chosen: TrialRecord, micro_batches: list[int],
                       why: str) -> tuple[list[int], str]:
    """Every size in a plan was run, compiled as the plan is: a balanced split's largest
    micro-batch can be below the chosen size (21 at 10 runs 7s), and a measured divisor below it
    (a compiled plan of 11 at 32 can run 8 x 4); run it if no trial did, so the plan's tokens/s is
    that size's (smaller sizes fit, as memory grows with the micro-batch, so this measures it
    rather than tests it). Where it does not fit (memory that did not grow with the micro-batch:
    fragmentation), the balanced split below it, down to 1; where none fits, `chosen`'s own
    balanced split (its size fit). Returns (micro_batches, why): `why`, the split's reason,
    rebuilt when the split fell back."""
    failed: list[int] = []
    while True:
        largest = max(micro_batches)
        if any(t.micro_batch == largest for t in runner.fits(Levers.of(chosen), compile=chosen.compile)):
            break
        if runner.run(Levers.of(chosen).candidate(largest, compile=chosen.compile)).status == "fit":
            break
        failed.append(largest)
        if largest == 1:  # nothing below the chosen size fit when run: its own split, which did
            micro_batches = split_batch(runner.rank_batch, chosen.micro_batch)
            break
        micro_batches = split_batch(runner.rank_batch, largest - 1)
    if not failed:
        return micro_batches, why
    why = (f"balanced split of at most {max(micro_batches)}: micro-batch {', '.join(map(str, failed))}"
           f"{' compiled' if chosen.compile else ''} did not fit when run (memory that did not grow with the "
           f"micro-batch); each micro-batch's loss is weighted by its tokens")
    runner.log(f"split: {why}")
    return micro_batches, why
