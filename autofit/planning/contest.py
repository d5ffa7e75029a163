"""Choosing between measured contenders so that noise cannot make the choice.

A machine shared with other work only ever slows a step down, never speeds it up. So a
contender's figure is its fastest step (the least disturbed one), as time per token of the run it
plans (its micro-batches' time per token, plus its optimizer update spread over the run's whole
optimizer step: readings()): CPU time of this process on a CPU device (time other processes take
from free cores is not counted in it; on oversubscribed cores it is, as a thread waiting for a core
spins: autofit.devices.host_load measures and says that), wall time on a GPU. A step slowed by a burst of load
is not the fastest, so it is left out.
Its first readings are those of the search's trial (autofit.planning.search): a contender whose
readings are already more than CLEAR_FIRST slower than the leader's is out before any re-timing.

The contenders (the largest fitting size of every lever combination and a smaller one: autofit.
planning.planner) are re-timed in alternation, A B C A B C, so a burst during one contender's
trials cannot decide; after the first round a contender more than CLEAR_FIRST slower than the
leader is out (each has readings from two trials only), or more than CLEAR_CONSISTENT slower where
its two fastest readings agree; after later rounds one more than twice the pair's tie band
(below) slower, or CLEAR.
Two contenders are tied when their figures are within a band made from their own readings: the
gap between each one's two fastest readings (how far its fastest step may still be from the
undisturbed one), summed, kept within TIE_MIN..TIE_MAX. So a quiet machine separates a 2 %
difference, and a noisy one declares a tie instead of letting noise pick; a difference larger
than TIE_MAX is never a tie. Rounds go on while a contender is neither out nor tied with the
leader by TIE_MIN (more readings for close pairs: they narrow a noisy pair's band), and stop when
one is left, when every one left is within TIE_MIN of the leader after at least two rounds, or
after MAX_ROUNDS; the band is then judged on every reading. A tie goes to the user's own
split where it is among the tied, else to the one with the most headroom (lowest measured peak,
then the smaller micro-batch): deterministic, and never to the larger size for being larger.
A contender whose re-timing does not fit is out; where every re-timing of a round fails, the one
with the most headroom is run once more and planned with, the plan's why saying so if it failed again.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from autofit.planning import agree
from autofit.planning.candidates import ckpt_words
from autofit.planning.trials import TrialSettings, run_trial
from autofit.records import Candidate, TrialRecord, judged_peak
from autofit.units import measured_peak_words
from trainer.errors import counted

# The tie band between two contenders, from their readings' spread (module docstring). 2 %: the
# finest difference the contest claims to see; 5 %: a larger one always counts.
TIE_MIN, TIE_MAX = 0.02, 0.05
TIE = TIE_MAX  # where a fixed band is wanted (the plateau of autofit.planning.planner, estimated mode)
CLEAR = 0.10  # more than 10 % slower than the leader (both their fastest steps): out, however noisy
# After the first round a contender has readings from two trials (the search's and one re-time),
# all of which a stretch of load may have slowed (on this shared 2-core machine a step's CPU time
# varied up to 6x under load 7): only one three times as slow as the leader is out then.
CLEAR_FIRST = 2.0
# ... or a quarter slower when its two fastest readings agree within TIE_MAX (a steady contender,
# not one whose only quiet reading is yet to come)
CLEAR_CONSISTENT = 0.25
# Alternating rounds of re-timing at most (close pairs only need the last one). 5 rounds did not
# make the probe steadier on this shared 2-core machine: there a whole process runs one plan up
# to 10-20 % faster or slower against another (the ratio of two plans' fastest trials, 8 trials
# each, was 0.98-1.18 in four fresh processes: docs/planner-benchmark.md), which no number of
# re-timings inside one process removes; they only cost time.
MAX_ROUNDS = 3
# Optimizer steps per re-timing trial. Each eager step is a reading (the optimizer state is
# primed, so the first step is already training's steady state: autofit.planning.trials);
# a compiled trial runs one step more, its first (the compile) not a reading. Two short trials
# alternated beat one long one: load comes in bursts of seconds, and alternation spreads them.
RETIME_STEPS = 2


def readings(t: TrialRecord, cpu: bool) -> list[float]:
    """Each timed step of `t` as seconds per token of the run it plans (TrialRecord.readings)."""
    return t.readings(cpu)


def seconds_per_token(t: TrialRecord, cpu: bool) -> float | None:
    """The contest's figure of `t`, in seconds per token of the run it plans (lower is faster):
    its fastest reading (readings()); 1 / tokens_per_s for a record without step times. None
    when `t` has no timing."""
    r = readings(t, cpu)
    if r:
        return min(r)
    return 1.0 / t.tokens_per_s if t.tokens_per_s else None


def per_token(cpu: bool) -> str:
    """The contest's clock in words, for its log lines: 'CPU time per token' on a CPU device (the
    search's trial lines print wall-time tok/s, which load halves while CPU time barely moves: t12's
    M2 read the two as a contradiction), else 'time per token' (wall time, as the trial lines)."""
    return "CPU time per token" if cpu else "time per token"


def run_tokens_per_s(t: TrialRecord) -> float | None:
    """Tokens/s the run planned with `t` is expected to reach (TrialRecord.run_tokens_per_s)."""
    return t.run_tokens_per_s


def peak_of(t: TrialRecord) -> int:
    """The measured peak a plan is judged on: reserved where the device has it (CUDA), else allocated."""
    return judged_peak(t) or 0


def label(t: TrialRecord) -> str:
    """A contender in words: 'micro-batch 11, chunked loss, checkpointing every 1 (selective), float32'."""
    ck = f", checkpointing every {ckpt_words(t)}" if t.checkpointing else ""
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
    seen: frozenset[Candidate] = field(default_factory=frozenset)  # their candidates
    # out because a re-timing did not fit (the winner among them only where every re-timing failed
    # and its re-run did too: planned with, and said so)
    unfit: list[TrialRecord] = field(default_factory=list)


def retime(runner, t: TrialRecord) -> bool:
    """One more trial of `t`'s candidate (RETIME_STEPS timed steps; a compiled one a compile step
    more), its timings added to `t`'s (tokens/s from the fastest step of all). False if it did not
    fit this time. Raises KeyboardInterrupt when a stop was asked for (runner.settings.stop) by
    the time the trial ended."""
    s = runner.settings
    longer = TrialSettings(steps=RETIME_STEPS + (1 if t.compile else 0), compile_backend=s.compile_backend,
                           seed=s.seed, spill_check=s.spill_check)
    r = agree.trial(run_trial(runner.cfg, t.candidate(), runner.device, rank_batch=runner.rank_batch,
                              budget_bytes=runner.budget_bytes, settings=longer))
    if agree.stop_wanted(s.stop()):  # a Ctrl-C/SIGTERM during the contest: stop, as after a search trial
        raise KeyboardInterrupt
    if r.status != "fit" or not r.step_seconds:
        return False
    t.step_seconds = t.step_seconds + r.step_seconds
    t.step_cpu_seconds = t.step_cpu_seconds + r.step_cpu_seconds
    if len(t.update_seconds) + len(r.update_seconds) == len(t.step_seconds):  # both measured it
        t.update_seconds = t.update_seconds + r.update_seconds
        t.update_cpu_seconds = t.update_cpu_seconds + r.update_cpu_seconds
    else:
        t.update_seconds, t.update_cpu_seconds = [], []
    t.optimizer_step_tokens = t.optimizer_step_tokens or r.optimizer_step_tokens
    t.steps_run += r.steps_run
    t.retimed_steps += len(r.step_seconds)
    t.tokens_per_step = t.tokens_per_step or r.tokens_per_step
    if t.tokens_per_step:
        t.tokens_per_s = t.tokens_per_step / min(t.step_seconds)
    return True


def spread(t: TrialRecord, cpu: bool) -> float:
    """How far `t`'s fastest reading may be from its undisturbed step time: the gap between its
    two fastest readings, relative to the fastest (TIE_MAX with fewer than two readings)."""
    steps = sorted(readings(t, cpu))
    return (steps[1] - steps[0]) / steps[0] if len(steps) >= 2 and steps[0] > 0 else TIE_MAX


def tie_band(a: TrialRecord, b: TrialRecord, cpu: bool) -> float:
    """The share of time per token within which `a` and `b` are tied: their spreads summed,
    kept within TIE_MIN..TIE_MAX (module docstring)."""
    return min(TIE_MAX, max(TIE_MIN, spread(a, cpu) + spread(b, cpu)))


def _unique(contenders: list[TrialRecord]) -> list[TrialRecord]:
    seen, out = set(), []
    for t in contenders:
        if t.candidate() not in seen and t.status == "fit":
            seen.add(t.candidate())
            out.append(t)
    return out


def _out(t: TrialRecord, lead: TrialRecord, rounds: int, cpu: bool) -> bool:
    """Whether `t` is out after `rounds` rounds (module docstring): past CLEAR_FIRST; after the
    first round also past CLEAR_CONSISTENT when its two fastest readings agree (within TIE_MAX:
    not one quiet reading among bursts); after later rounds past twice the pair's band, or CLEAR."""
    ratio = seconds_per_token(t, cpu) / seconds_per_token(lead, cpu)
    if rounds <= 1:
        return ratio > 1 + CLEAR_FIRST or ratio > 1 + CLEAR_CONSISTENT and spread(t, cpu) <= TIE_MAX
    return ratio > 1 + min(CLEAR, 2 * tie_band(lead, t, cpu))


def decide(runner, contenders: list[TrialRecord], *, own: TrialRecord | None = None,
           before: Decision | None = None) -> Decision:
    """The fastest of `contenders` (fitting TrialRecords) by the robust figure above, re-timed in
    alternation until the difference is clear or a tie (module docstring). `own`: the user's own
    split, which wins a tie it is part of. `before`: an earlier contest whose winner is among
    `contenders` (its rounds and contenders count on). The records' timings are extended in place."""
    cpu = runner.kind == "cpu"
    alive = _unique(contenders)
    seen = (before.seen if before is not None else frozenset()) | {t.candidate() for t in alive}
    done = before.rounds if before is not None else 0  # rounds are numbered across the probe's contests
    if before is not None and len(alive) == 1 and alive[0] is before.winner:
        return before
    spt = lambda t: seconds_per_token(t, cpu)  # noqa: E731
    alive = _cut_on_first_readings(runner, alive, spt)
    # out of an earlier contest, or said 'not re-timed' beside a faster larger size (planner.
    # _sizes_to_time: runner.dropped), back in this one
    was_out = (before.seen if before is not None else frozenset()) | getattr(runner, "dropped", set())
    if own is not None and own.candidate() in was_out and len(alive) > 1 \
            and any(t.candidate() == own.candidate() for t in alive):
        # say why, or the log reads as a contradiction (said only where it is re-timed: t7's L13
        # saw it followed by 'not re-timed'; the default run's log said 16 'not re-timed' then re-timed it)
        runner.log(f"contest: {label(own)} is your own split: timed again against the leader, and kept on a tie")
    rounds, unfit = 0, []
    while len(alive) > 1 and rounds < MAX_ROUNDS:
        rounds += 1
        refit = [t for t in alive if retime(runner, t)]  # A B C, then A B C again
        for t in alive:
            if t not in refit:  # fragmentation, or memory another process took: not a plan to trust
                runner.log(f"contest round {done + rounds}: {label(t)} out, its re-timing did not fit this time")
                unfit.append(t)
        alive = refit or [_last_standing(runner, alive, unfit, done + rounds)]
        lead = min(alive, key=spt)
        # out: past CLEAR_FIRST after one round; then past twice the pair's tie band (beyond its
        # readings' noise), at most CLEAR
        out = [t for t in alive if _out(t, lead, rounds, cpu)]
        alive = [t for t in alive if t not in out]
        _say_round(runner, done + rounds, out, alive, lead, spt)
        if rounds >= 2 and all(spt(t) <= (1 + TIE_MIN) * spt(lead) for t in alive):
            break  # every one left is within the finest band of the leader: more readings cannot separate them
    lead = min(alive, key=spt)
    tied = [t for t in alive if spt(t) <= (1 + tie_band(lead, t, cpu)) * spt(lead)]
    for t in alive:
        if t not in tied:
            runner.log(f"contest: {label(t)} lost after {counted(done + rounds, 'round')}: {spt(t) / spt(lead):.2f}x the "
                       f"leader's {per_token(cpu)}, outside their {tie_band(lead, t, cpu):.1%} tie band (leader: "
                       f"{label(lead)})")
    # the band of the tie, against the leader (the leader against itself is no band): one figure for
    # the log line and the plan's why, whichever of the tied wins
    band = max((tie_band(lead, t, cpu) for t in tied if t is not lead), default=0.0)
    if len(tied) > 1:
        runner.log(f"contest: a tie between {'; '.join(label(t) for t in tied)} (within "
                   f"{band:.1%}, the spread of their readings)")
    winner = _tie_winner(runner, tied, own, spt)
    why = _why(winner, alive, tied, done + rounds, len(seen), cpu, own, band) + (UNFIT_WHY if winner in unfit else "")
    return Decision(winner=winner, why=why, rounds=done + rounds, tied=tied, n=len(seen), seen=seen, unfit=unfit)


def _say_round(runner, round_no: int, out: list[TrialRecord], alive: list[TrialRecord], lead: TrialRecord,
               spt) -> None:
    """A round's fate of every contender re-timed in it: a line for each one `out`, naming the
    leader (it may have changed since the last round), then, while several are left (`alive`),
    one line with each of them against the leader: a round that puts no one out is said too (the
    log jumped from round 2 to round 5), and no contender is unnamed from its search trial to the
    tie. (One whose re-timing did not fit has its own line in decide.)"""
    clock = per_token(runner.kind == "cpu")
    for t in out:
        runner.log(f"contest round {round_no}: {label(t)} out, {spt(t) / spt(lead):.2f}x the leader's {clock} "
                   f"(leader: {label(lead)})")
    if len(alive) > 1:
        rest = ", ".join(f"{label(t)} at {spt(t) / spt(lead):.2f}x" for t in sorted(alive, key=spt) if t is not lead)
        runner.log(f"contest round {round_no}: {'still in: ' if out else 'none out; '}{label(lead)} leads, {rest} its "
                   f"{clock}")


def _cut_on_first_readings(runner, alive: list[TrialRecord], spt) -> list[TrialRecord]:
    """The search's readings are the contest's first: a contender more than CLEAR_FIRST slower
    than the leader on them cannot win and is not re-timed (said in the log)."""
    if len(alive) <= 1:
        return alive
    lead = min(alive, key=spt)
    out = [t for t in alive if spt(t) > (1 + CLEAR_FIRST) * spt(lead)]
    for t in out:
        runner.log(f"contest: {label(t)} not re-timed: its readings so far take {spt(t) / spt(lead):.2f}x the "
                   f"{per_token(runner.kind == 'cpu')} of {label(lead)}'s (out past {1 + CLEAR_FIRST:.0f}x)")
    return [t for t in alive if t not in out]


# The plan's why when it runs a contender whose latest trial did not fit (_last_standing).
UNFIT_WHY = ("; every contender's re-timing failed to fit, and this one, the most headroom, did not fit when run "
             "once more either: memory may be short now (another process, fragmentation)")


def _last_standing(runner, failed: list[TrialRecord], unfit: list[TrialRecord], round_no: int) -> TrialRecord:
    """Every re-timing of a round failed to fit: the contender with the most headroom (lowest
    measured peak, then the smaller micro-batch: the likeliest to fit while memory is short) is
    run once more; it is kept either way, taken off `unfit` when it fits, and the log says which."""
    t = min(failed, key=lambda t: (peak_of(t), t.micro_batch))
    ok = retime(runner, t)
    if ok:
        unfit.remove(t)
    runner.log(f"contest round {round_no}: every re-timing failed to fit; {label(t)}, the most headroom, run once "
               f"more: {'it fits' if ok else 'it did not fit either, planned with it all the same'}")
    return t


def _tie_winner(runner, tied: list[TrialRecord], own: TrialRecord | None, spt) -> TrialRecord:
    """Of the tied contenders: the user's own split where it is among them; else the most
    headroom (lowest measured peak, then the smaller micro-batch), where a size timed only to look
    beside a flat pair (runner.thirds) wins only when clearly faster, never on a tie."""
    if own is not None and any(t.candidate() == own.candidate() for t in tied):
        return next(t for t in tied if t.candidate() == own.candidate())
    settled = [t for t in tied if t.candidate() not in runner.thirds] or tied
    for t in tied:
        if t not in settled:
            runner.log(f"contest: {label(t)} tied, but it was timed only to look beside a flat pair: "
                       f"it wins when clearly faster, not on a tie")
    return min(settled, key=lambda t: (peak_of(t), t.micro_batch, spt(t)))


def _why(winner: TrialRecord, alive: list[TrialRecord], tied: list[TrialRecord], rounds: int, n: int,
         cpu: bool, own: TrialRecord | None, band: float = 0.0) -> str:
    figure = ("CPU time per token of its fastest step (other processes' load is not counted in it while cores are "
               "free)" if cpu
              else "time per token of its fastest step (load only slows a step)")
    if n == 1:
        return f"the only contender, measured by {figure}"
    text = f"fastest of {n} contenders by {figure}, " + (
        f"re-timed in {counted(rounds, 'alternating round')}" if rounds else "the others out on their first readings")
    if len(tied) > 1:
        others = ", ".join(label(t) for t in tied if t is not winner)
        won_by = ("your own split, kept" if own is not None and winner.candidate() == own.candidate()
                  else f"the most headroom ({measured_peak_words(winner)})")
        text += (f"; a tie within {band:.1%} (the spread of their own readings) with {others}, "
                 f"won by {won_by}")
    else:
        rest = [t for t in alive if t is not winner]
        if rest:
            w = seconds_per_token(winner, cpu)
            runner_up = min(rest, key=lambda t: seconds_per_token(t, cpu))
            text += f"; next: {label(runner_up)} at {seconds_per_token(runner_up, cpu) / w:.2f}x its {per_token(cpu)}"
        else:
            text += "; every other contender was out: slower than its readings' noise allows, or it did not fit again"
    return text
