"""The probe report's speed words: the plan's tokens/s, each figure labelled how it was got, and
how the plan compares with the config as written. Every ratio compares like with like and says
which figure it compares."""
from __future__ import annotations


def _key(t) -> tuple:
    """What identifies a trial's or a plan's candidate on one device, for matching them."""
    return (t.micro_batch, t.dtype, t.compile, t.checkpointing, t.loss_impl, t.checkpointing_policy)


def against_plan(res, own) -> str:
    """How the plan compares with the config as written where that fits (measured): it keeps it,
    or it is N x as fast per token by each one's fastest step (the contest's figure, its clock:
    autofit.planning.contest), with the same ratio by their median steps and how many steps each
    had beside it, so a ratio that load made of a few disturbed steps shows as one."""
    from autofit.planning.contest import seconds_per_token
    p = res.plan
    key = _key(p)
    if _key(own) == key:
        return "; the plan keeps it"
    runs = [t for t in res.trials if t.status == "fit" and _key(t) == key]
    cpu = res.device.kind == "cpu"
    a = seconds_per_token(own, cpu)
    b = seconds_per_token(runs[0], cpu) if runs else None
    if not (a and b):
        return ""
    figure = "CPU time" if cpu and own.step_cpu_seconds else "time"
    from statistics import median
    ra, rb = own.readings(cpu), runs[0].readings(cpu)
    mid = f", {median(ra) / median(rb):.2f}x by their median steps ({len(ra)} and {len(rb)} timed)" if ra and rb else ""
    return f"; the plan runs {a / b:.2f}x as fast, by {figure} per token of each one's fastest step{mid}"


def plan_rate_words(p, res=None) -> str:
    """The plan's tokens/s in words, each figure labelled how it was got: measured, the median of
    the plan's size's timed trial steps (what the run should see) with the fastest step's figure
    beside it (the undisturbed one the contest compares); estimated, the roofline's words
    (autofit.planning.throughput.rate_words: `res`'s, naming a sustained rate where used). Several ranks: per rank, and the ranks' sum."""
    from autofit.planning.throughput import RATE_WORDS
    if not p.tokens_per_s:
        return "tokens/s unknown"
    # several ranks: a trial's rate is one rank's (the slowest rank's: autofit.planning.agree)
    def per_rank(rate: float) -> str:  # each figure its own sum (t10's M2: the fastest repeated the median's)
        return f" per rank, ~{rate * p.world_size:,.0f} for the {p.world_size} ranks" if p.world_size > 1 else ""
    per = per_rank(p.tokens_per_s)
    if p.mode == "estimated":
        return f"{p.tokens_per_s:,.0f} tokens/s{per} (estimated: {getattr(res, 'rate_words', '') or RATE_WORDS})"
    not_run = _not_run(res, p) if res is not None else ""
    if p.fastest_tokens_per_s is None:  # a plan saved before the median was kept: one figure
        return f"{p.tokens_per_s:,.0f} tokens/s{per} (measured: trial steps, its update once per optimizer step{not_run})"
    steps = f"{p.timed_steps} trial steps" if p.timed_steps else "the trial steps"
    retimed = _retimed(res, p) if res is not None else 0
    if retimed:  # the trial line printed its fastest step before these: both figures moved since
        steps += f" ({retimed} of them the contest's re-timings, after its trial line)"
    return (f"{p.tokens_per_s:,.0f} tokens/s{per} (measured: median of {steps} at micro-batch {p.micro_batch}, "
            f"its update once per optimizer step{not_run}); fastest step {p.fastest_tokens_per_s:,.0f} tokens/s{per_rank(p.fastest_tokens_per_s)} "
            "(measured: the least disturbed, the figure the contest compares)")


def _retimed(res, p) -> int:
    """Timed steps the contest's re-timings added to the trial of the plan's own size and levers
    (TrialRecord.retimed_steps), 0 where none did or it is not among `res`'s trials."""
    key = _key(p)
    return max((t.retimed_steps for t in getattr(res, "trials", []) if t.status == "fit" and _key(t) == key),
               default=0)


def _not_run(res, p) -> str:
    """'; micro-batch 10 not run: timed at the nearest run size's rate' for a split's sizes that no
    fitting trial of the plan's levers ran (autofit.planning.split.plan_rates), else ''."""
    key = _key(p)[1:]
    ran = {t.micro_batch for t in getattr(res, "trials", []) if t.status == "fit" and t.tokens_per_s and _key(t)[1:] == key}
    missing = sorted(set(p.micro_batches) - ran)
    if not missing or not ran:
        return ""
    return f"; micro-batch {', '.join(map(str, missing))} not run: timed at the nearest run size's rate"
