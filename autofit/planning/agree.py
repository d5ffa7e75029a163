"""One plan for every rank: how `autofit probe` agrees under torchrun.

Each rank measures on its own device (cards can differ, or hold other processes' memory); the
ranks agree with collectives (all_gather_object over the process group, never files), at
every point where the planner would otherwise decide from one rank's figures:
- the budget: the smallest rank's, so the estimate-driven search starts alike everywhere, and
  that rank's device names the plan's device and profile (bind; again after CUDA's re-measure);
- the search space: what every rank can run (bf16 only if every card has it);
- every trial: it fits only if it fitted on every rank; its peak is the largest rank's, its
  tokens/s the slowest rank's (a DDP step waits for the slowest);
- the plan: rank 0's, handed to all (they computed the same one from the same agreed figures).
Because every decision is taken on agreed figures, the ranks run the same trials in the same
order, so the trials themselves can be collective (DDP, FSDP2) like training.
With one process every function returns its argument unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from autofit.records import TrialRecord
from trainer.distributed import ranks as D

STATUS_ORDER = ("error", "leak", "oom", "spill", "over_budget", "pruned", "fit")  # the worst wins


def ranks() -> D.Ranks:
    """The ranks of this probe: torchrun's, once the process group is joined (one otherwise)."""
    import torch.distributed as dist
    r = D.Ranks.from_env()
    return r if r.several and dist.is_available() and dist.is_initialized() else D.Ranks()


def stop_wanted(flag: bool) -> bool:
    """Whether any rank was asked to stop (after a trial): every rank stops after the same one."""
    return D.any_over_ranks(flag, ranks())


def rank_batch(cfg) -> int:
    """Sequences per optimizer step on each rank: the effective batch over the world size."""
    return cfg.effective_batch // ranks().world_size


def _smallest(budgets: list, r: D.Ranks) -> tuple[int, object]:
    """(the rank with the smallest of the ranks' `budgets` (the first of equal ones), its budget with
    a term naming it and every rank's figure)."""
    from autofit.planning.budget import BudgetTerm
    i = min(range(len(budgets)), key=lambda k: budgets[k].budget_bytes)
    note = (f"smallest of {r.world_size} ranks' budgets (rank {i}); each rank: "
            + ", ".join(f"{x.budget_bytes:,}" for x in budgets) + " bytes")
    low = budgets[i]
    return i, replace(low, terms=[*low.terms, BudgetTerm("agreed over the ranks", 0, f"measured: {note}")])


def budget(b):
    """The smallest rank's budget (autofit.planning.budget.Budget), its terms labelled with the rank."""
    r = ranks()
    if not r.several:
        return b
    return _smallest(D.all_gather_objects(b, r), r)[1]


@dataclass(frozen=True)
class Binding:
    """Where the ranks' agreed budget binds. `own`: this rank's budget (autofit.planning.budget.Budget);
    `budget`: the smallest rank's (labelled with the rank: what the plan fits); `device`: that rank's
    DeviceInfo, which the device line, the saved profile's name and its memory come from; `words`:
    naming that rank and this rank's own figures, for the device line ('' with one process)."""
    own: object
    budget: object
    device: object
    words: str = ""


def bind(own, info) -> Binding:
    """The agreed budget and the device it binds on, from every rank's own budget and DeviceInfo
    (one gather). Called again when the budgets are measured again (CUDA, after the first trial:
    autofit.planning.planner), so the binding rank is picked from the budgets the plan fits, not
    kept from before. With one process: Binding(own, own, info). t8's M5: the device line, the
    saved profile's name and its memory came from rank 0's device while the plan fitted a smaller."""
    r = ranks()
    if not r.several:
        return Binding(own, own, info)
    from autofit.units import fmt_bytes
    every = D.all_gather_objects((own, info), r)
    i, low = _smallest([b for b, _ in every], r)
    words = f"rank {i}'s, the smallest budget of {r.world_size} ranks"
    if i != r.rank:
        words += f" (rank {r.rank}'s: {fmt_bytes(info.total_bytes)} total, {fmt_bytes(info.free_bytes)} free)"
    return Binding(own, low, every[i][1], words)


def space(s):
    """The search space every rank can run: each field the values all ranks have, in rank 0's
    order. Raises PlanError when a field is left empty (e.g. --dtype bfloat16 with a card that
    lacks it)."""
    r = ranks()
    if not r.several:
        return s
    from autofit.planning.candidates import PlanError
    every = D.all_gather_objects(s, r)
    out = replace(every[0])
    for name in ("dtypes", "compile", "checkpointing", "checkpointing_policies", "loss_impls", "sharded"):
        common = [v for v in getattr(every[0], name) if all(v in getattr(o, name) for o in every)]
        if not common:
            raise PlanError(f"the ranks have no {name} in common ({[getattr(o, name) for o in every]}): "
                            f"each rank's card allows different choices")
        setattr(out, name, common)
    if len(out.checkpointing_policies) < len(every[0].checkpointing_policies):
        out.notes = [*out.notes, f"checkpointing policies {every[0].checkpointing_policies} on rank 0, "
                                 f"{out.checkpointing_policies} on every rank: only those are searched"]
    return out


def trial(rec: TrialRecord) -> TrialRecord:
    """One candidate's record, agreed over the ranks: fit only when it fitted on every rank,
    else the worst status (with that rank's note: of equal ones, a rank that failed itself, not one
    that only met another rank's OOM or error); the largest peaks, the slowest tokens/s."""
    r = ranks()
    if not r.several:
        return rec
    every = D.all_gather_objects(rec.model_dump(), r)
    recs = [TrialRecord(**d) for d in every]
    # of equal statuses, a rank's own failure before one that only met another's (OtherRankOOM,
    # RankFailed: TrialRecord.met_other_rank), so that 'rank N oom' names the rank that ran out
    worst = min(range(len(recs)), key=lambda k: (STATUS_ORDER.index(recs[k].status), recs[k].met_other_rank))
    out = recs[worst].model_copy(deep=True)

    def most(field):
        vals = [getattr(x, field) for x in recs if getattr(x, field) is not None]
        return max(vals) if vals else None
    out.measured_peak_bytes = most("measured_peak_bytes")
    out.measured_reserved_bytes = most("measured_reserved_bytes")
    out.leaked_bytes = most("leaked_bytes")
    rates = [x.tokens_per_s for x in recs if x.tokens_per_s]
    if rates and out.status == "fit":
        slow = min(range(len(recs)), key=lambda k: recs[k].tokens_per_s or float("inf"))
        out.tokens_per_s, out.step_seconds = recs[slow].tokens_per_s, list(recs[slow].step_seconds)
        out.step_cpu_seconds = list(recs[slow].step_cpu_seconds)
        out.update_seconds = list(recs[slow].update_seconds)
        out.update_cpu_seconds = list(recs[slow].update_cpu_seconds)
    peaks = ", ".join(f"rank {k} {x.measured_peak_bytes:,}" for k, x in enumerate(recs) if x.measured_peak_bytes)
    failed = f"rank {worst} {recs[worst].status}; " if out.status != "fit" else ""
    agreed = (f"agreed over {r.world_size} ranks: {failed}peak is the largest rank's" + (f" ({peaks} bytes)" if peaks else "")
              + ", tokens/s the slowest rank's (per rank)")
    out.note = f"{out.note}; {agreed}" if out.note else agreed
    return out


def plan_fields(sharded: bool) -> dict:
    """The PlanRecord fields that say which ranks a plan is for (none with one process)."""
    r = ranks()
    return {"world_size": r.world_size, "parallelism": "fsdp2" if sharded else "ddp"} if r.several else {}


def fingerprint_fields(cfg) -> dict:
    """What a saved plan is keyed by beyond the config, with several ranks: how many, and the
    parallelism asked for (auto, ddp, fsdp2). Nothing with one process, so one-GPU plans keep
    their fingerprints."""
    r = ranks()
    return {"world_size": r.world_size, "parallelism": cfg.parallelism} if r.several else {}


def layout(sharded: bool) -> dict:
    """estimate_peak's world_size and parallelism for a candidate on these ranks."""
    return {"world_size": ranks().world_size, "parallelism": "fsdp2" if sharded else "ddp"}


def from_rank0(obj):
    """Rank 0's `obj`, on every rank (the plan, or a saved plan rank 0 found)."""
    r = ranks()
    if not r.several:
        return obj
    return D.all_gather_objects(obj, r)[0]


def agreement() -> D.Agreement | None:
    """A trial's agreement among the ranks (None with one process)."""
    r = ranks()
    return D.Agreement(r) if r.several else None


def trial_wrapper(model, device, agreement: D.Agreement | None, parallelism: str = "ddp"):
    """The wrapper training uses (trainer.distributed.sharding), for a trial on several ranks (None with one
    process). A round first, so that a rank whose model did not fit is heard before the others
    wait for it in DDP's or FSDP2's set-up (raises OtherRankOOM then)."""
    if agreement is None:
        return None
    from trainer.distributed.sharding import wrap
    agreement.check_in()
    return wrap(parallelism, model, device, agreement.ranks, agreement)
