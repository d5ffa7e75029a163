"""The config as written as a contender: its own micro-batch (and levers) is run and contested
like any other size, wins a tie it is part of (autofit.planning.contest.decide), and the plan
says how it compares (kept, or how much faster the plan is per token)."""
from __future__ import annotations

from statistics import median

from autofit.planning.candidates import Levers
from autofit.planning.contest import seconds_per_token
from autofit.planning.search import TrialRunner
from autofit.planning.split import run_size
from autofit.records import TrialRecord


def own_split(cfg, runner: TrialRunner, best_by_levers: dict[Levers, int]) -> TrialRecord | None:
    """The config as written (its micro-batch, checkpointing and its policy, loss, and dtype where
    that was searched: --dtype can leave it out) as a contender, where its levers were searched and
    its micro-batch fits and is a size a run of this rank's share uses (a run capped at 4 of 6
    sequences runs 3 + 3: a trial of 4 would time a split nobody runs); run if no trial ran it yet."""
    policy = cfg.checkpointing_policy if cfg.checkpointing else "full"
    mine = [lv for lv in best_by_levers if lv.checkpointing == cfg.checkpointing and lv.loss_impl == cfg.loss_impl
            and lv.checkpointing_policy == policy and not lv.sharded]
    dtype = cfg.resolved_dtype(runner.kind, runner.device.info.bf16_supported)
    mine = [lv for lv in mine if lv.dtype == dtype] or mine
    m = cfg.batch_size
    if len(mine) != 1 or not (0 < m <= min(best_by_levers[mine[0]], runner.rank_batch)) \
            or run_size(runner.rank_batch, m) != m:
        return None
    r = runner.run(mine[0].candidate(m))
    return r if r.status == "fit" else None


def own_why(runner: TrialRunner, chosen: TrialRecord, own: TrialRecord | None) -> str:
    """How the plan compares with the config as written, where that fits."""
    if own is None:
        return ""
    if own.candidate() == chosen.candidate():
        return f"; your own micro-batch {own.micro_batch} fits and is as fast as any: kept"
    cpu = runner.kind == "cpu"
    ratio = seconds_per_token(own, cpu) / seconds_per_token(chosen, cpu)
    clock = "CPU time" if cpu and own.step_cpu_seconds else "wall time"
    ra, rb = own.readings(cpu), chosen.readings(cpu)
    # beside the contest's figure, the medians' ratio (t6's L4): on a loaded machine a few
    # undisturbed steps can make the fastest-step ratio several times the typical step's
    mid = f", {median(ra) / median(rb):.2f}x by their median steps" if ra and rb else ""
    return (f"; your own micro-batch {own.micro_batch} ({own.loss_impl} loss) fits too: this plan is "
            f"{ratio:.2f}x as fast per token by {clock} of each one's fastest step (the contest's figure){mid} "
            f"(of {len(ra)} and {len(rb)} timed steps)")
