"""Choosing between measured contenders so that noise cannot make the choice.

A machine shared with other work only ever slows a step down, never speeds it up. So a
contender's figure is its fastest step (the least disturbed one), as time per token: CPU time of
this process on a CPU device (time other processes take from the cores is not counted in it),
wall time on a GPU. A step slowed by a burst of load is not the fastest, so it is left out.

The contenders (the largest fitting size of every lever combination and a smaller one: autofit.
planning.planner) are re-timed in alternation, A B C A B C, so a burst during one contender's
trials cannot decide; after each round a contender more than CLEAR slower than the leader is out
(CLEAR_FIRST after the first round, when each has few steps).
The rounds stop when one is left, when all that are left have stayed within TIE of the leader for
two rounds (a tie), or after MAX_ROUNDS. A tie goes to the user's own split where it is among the
tied, else to the one with the most headroom (lowest measured peak), never to the larger size for
being larger.
"""
from __future__ import annotations

from dataclasses import dataclass

from autofit.planning import agree
from autofit.planning.trials import TrialSettings, run_trial
from autofit.records import TrialRecord
from autofit.units import fmt_bytes

TIE = 0.03  # contenders whose time per token is within 3 % of the leader's after the rounds: a tie
CLEAR = 0.10  # more than 10 % slower than the leader (both their fastest steps): out of the contest
# After the first round a contender has only three timed steps (the search's one, the round's two),
# all of which a stretch of load may have slowed: only one this much slower is out then.
CLEAR_FIRST = 0.50
MAX_ROUNDS = 3  # alternating rounds of re-timing at most
RETIME_STEPS = 2  # timed optimizer steps per re-timing trial, after one warm-up step, at least
# Short steps are timed more often, up to this many and about this long in all per trial: a
# scheduler's time slice or a cache flush is a large share of a step of a few tens of ms.
RETIME_MAX_STEPS = 8
RETIME_SECONDS = 0.5


def seconds_per_token(t: TrialRecord, cpu: bool) -> float | None:
    """The contest's figure of `t`, in seconds per token (lower is faster): its fastest timed
    step's CPU time (`cpu`: the device is the CPU and CPU times were measured) or wall time,
    divided by the step's tokens; 1 / tokens_per_s for a record without step times. None when
    `t` has no timing."""
    steps = t.step_cpu_seconds if cpu and t.step_cpu_seconds else t.step_seconds
    if steps and t.tokens_per_step:
        return min(steps) / t.tokens_per_step
    return 1.0 / t.tokens_per_s if t.tokens_per_s else None


def peak_of(t: TrialRecord) -> int:
    """The measured peak a plan is judged on: reserved where the device has it (CUDA), else allocated."""
    return max(t.measured_peak_bytes or 0, t.measured_reserved_bytes or 0)


def label(t: TrialRecord) -> str:
    """A contender in words: 'micro-batch 11, chunked loss, checkpointing 1, float32'."""
    ck = f", checkpointing every {t.checkpointing}" if t.checkpointing else ""
    return (f"micro-batch {t.micro_batch}, {t.loss_impl} loss{ck}, {t.dtype}"
            + (", compiled" if t.compile else "") + (", FSDP2" if t.sharded else ""))


@dataclass
class Decision:
    """What the contest chose and why (`why`: words for the plan's reason); `tied`: the
    contenders that were still within TIE of the fastest at the end (the winner among them);
    `rounds`: alternating rounds of re-timing run."""
    winner: TrialRecord
    why: str
    rounds: int
    tied: list[TrialRecord]
    n: int = 1  # contenders in all (earlier contests' too)


def retime(runner, t: TrialRecord) -> bool:
    """One more trial of `t`'s candidate (a warm-up and RETIME_STEPS timed steps, more for short
    steps: about RETIME_SECONDS in all, at most RETIME_MAX_STEPS), its timings added to `t`'s (tokens/s from the fastest step of all). False if it did not fit this time."""
    s = runner.settings
    fastest = min(t.step_seconds) if t.step_seconds else None
    timed = RETIME_STEPS if not fastest else max(RETIME_STEPS, min(RETIME_MAX_STEPS, int(RETIME_SECONDS / fastest)))
    longer = TrialSettings(steps=timed + 1, compile_backend=s.compile_backend, seed=s.seed,
                           spill_check=s.spill_check)
    r = agree.trial(run_trial(runner.cfg, t.candidate(), runner.device, rank_batch=runner.rank_batch,
                              budget_bytes=runner.budget_bytes, settings=longer))
    if r.status != "fit" or not r.step_seconds:
        return False
    t.step_seconds = t.step_seconds + r.step_seconds
    t.step_cpu_seconds = t.step_cpu_seconds + r.step_cpu_seconds
    t.steps_run += r.steps_run
    t.tokens_per_step = t.tokens_per_step or r.tokens_per_step
    if t.tokens_per_step:
        t.tokens_per_s = t.tokens_per_step / min(t.step_seconds)
    return True


def _unique(contenders: list[TrialRecord]) -> list[TrialRecord]:
    seen, out = set(), []
    for t in contenders:
        if t.candidate() not in seen and t.status == "fit":
            seen.add(t.candidate())
            out.append(t)
    return out


def decide(runner, contenders: list[TrialRecord], *, own: TrialRecord | None = None,
           before: Decision | None = None) -> Decision:
    """The fastest of `contenders` (fitting TrialRecords) by the robust figure above, re-timed in
    alternation until the difference is clear or a tie (module docstring). `own`: the user's own
    split, which wins a tie it is part of. `before`: an earlier contest whose winner is among
    `contenders` (its losers count in the words). The records' timings are extended in place."""
    cpu = runner.kind == "cpu"
    alive = _unique(contenders)
    if before is not None and len(alive) == 1 and alive[0] is before.winner:
        return before
    # rounds are numbered across the probe's contests (the earlier one's rounds came first), so
    # the log reads in order: round 1, 2, 3 of the first contest, then 4, 5 of the next
    done = before.rounds if before is not None else 0
    rounds, tied_rounds = 0, 0
    while len(alive) > 1 and rounds < MAX_ROUNDS:
        rounds += 1
        alive = [t for t in alive if retime(runner, t)] or alive[:1]  # A B C, then A B C again
        best = min(seconds_per_token(t, cpu) for t in alive)
        margin = CLEAR_FIRST if rounds == 1 else CLEAR
        out = [t for t in alive if seconds_per_token(t, cpu) > (1 + margin) * best]
        for t in out:
            runner.log(f"contest round {done + rounds}: {label(t)} out, {seconds_per_token(t, cpu) / best:.2f}x the "
                       f"leader's time per token")
        alive = [t for t in alive if t not in out]
        tied_rounds = tied_rounds + 1 if all(seconds_per_token(t, cpu) <= (1 + TIE) * best for t in alive) else 0
        if tied_rounds >= 2:
            break
    best = min(seconds_per_token(t, cpu) for t in alive)
    tied = [t for t in alive if seconds_per_token(t, cpu) <= (1 + TIE) * best]
    if own is not None and any(t.candidate() == own.candidate() for t in tied):
        winner = next(t for t in tied if t.candidate() == own.candidate())
    else:
        winner = min(tied, key=lambda t: (peak_of(t), t.micro_batch, seconds_per_token(t, cpu)))
    n = len(_unique(contenders)) + (before.n - 1 if before is not None else 0)
    return Decision(winner=winner, why=_why(winner, alive, tied, done + rounds, n, cpu, own),
                    rounds=rounds + (before.rounds if before is not None else 0), tied=tied, n=n)


def _why(winner: TrialRecord, alive: list[TrialRecord], tied: list[TrialRecord], rounds: int, n: int,
         cpu: bool, own: TrialRecord | None) -> str:
    figure = ("CPU time per token of its fastest step (load from other processes is not counted in it)" if cpu
              else "time per token of its fastest step (load only slows a step)")
    if n == 1:
        return f"the only contender, measured by {figure}"
    text = f"fastest of {n} contenders by {figure}, re-timed in {rounds} alternating round(s)"
    if len(tied) > 1:
        others = ", ".join(label(t) for t in tied if t is not winner)
        won_by = ("your own split, kept" if own is not None and winner.candidate() == own.candidate()
                  else f"the most headroom (measured peak {fmt_bytes(peak_of(winner))})")
        text += f"; a tie within {TIE:.0%} with {others}, won by {won_by}"
    else:
        rest = [t for t in alive if t is not winner]
        if rest:
            w = seconds_per_token(winner, cpu)
            runner_up = min(rest, key=lambda t: seconds_per_token(t, cpu))
            text += f"; next: {label(runner_up)} at {seconds_per_token(runner_up, cpu) / w:.2f}x its time per token"
        else:
            text += f"; every other contender was more than {CLEAR:.0%} slower"
    return text
