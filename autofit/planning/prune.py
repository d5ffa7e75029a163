"""Lever combinations not worth a search: recomputation (activation checkpointing) where the
combinations without it already hold the batch, the estimate promises no larger size, or their
measured rate rises too slowly for recomputation's extra compute to pay back; the chunked loss
where it does not fit the next run size past the standard loss's largest fit (prune_loss); FSDP2
sharding where an unsharded combination holds the batch or the estimate promises no larger size.
Each returns a 'pruned' TrialRecord (its note the reason) or None (search it)."""
from __future__ import annotations

import dataclasses
import math

from autofit.planning import agree
from autofit.planning.candidates import Levers
from autofit.planning.contest import per_token, retime, seconds_per_token
from autofit.planning.estimate import max_micro_batch
from autofit.planning.search import TrialRunner
from autofit.planning.split import run_size, run_sizes
from autofit.planning.throughput import RECOMPUTE_SHARE
from autofit.records import TrialRecord


def prune_recompute(runner: TrialRunner, levers: Levers, best_by_levers: dict[Levers, int]) -> TrialRecord | None:
    """Recomputation costs more compute per token (full: a third; selective: less,
    autofit.planning.throughput.RECOMPUTE_SHARE): try it only when the levers without it cannot
    hold the whole batch, the estimate promises a larger size, and the rate measured without it
    rises fast enough in the micro-batch for that size to pay the cost back (cannot_pay_back).
    Returns the 'pruned' record, its note the reason, when it is not worth a search."""
    if levers.checkpointing == 0:
        return None
    E = runner.rank_batch
    base_levers = [lv for lv, v in best_by_levers.items() if lv.dtype == levers.dtype and lv.checkpointing == 0
                   and lv.sharded == levers.sharded and v > 0]
    base = max([best_by_levers[lv] for lv in base_levers] or [0])
    est_ck = max_micro_batch(runner.shape, runner.budget_bytes, **levers.estimate_args(), compile=False,
                             device=runner.kind, ce_chunk_size=runner.cfg.ce_chunk_size, step_batch=E, **agree.layout(levers.sharded))
    est_ck = run_size(E, max(1, min(est_ck, E)))  # what a run capped there runs (autofit.planning.split)
    why = None
    if base >= E:
        why = f"micro-batch {base} (the whole batch) fits without recomputation"
    elif base > 0 and est_ck <= base:
        loss = next(lv.loss_impl for lv in base_levers if best_by_levers[lv] == base)  # t8: 16 fit with chunked only
        why = f"estimated {est_ck} with it, no more than the {base} that fits without ({loss} loss)"
    else:
        # the same loss's curve; where that loss was not searched (prune_loss: it fits no larger
        # size, and at the same size is no faster) the other loss's curve stands for it
        same_loss = [lv for lv in base_levers if lv.loss_impl == levers.loss_impl] or base_levers
        flat = cannot_pay_back(runner, levers, same_loss, best_by_levers, est_ck)
        if flat:
            why = f"cannot pay back its extra compute: without it the rate is already flat or rises too slowly ({flat})"
    if why is None:
        return None
    return TrialRecord(**levers.candidate(est_ck).model_dump(), status="pruned",
                       note=f"not needed: {why}")


def cannot_pay_back(runner: TrialRunner, levers: Levers, base_levers: list[Levers],
                     best_by_levers: dict[Levers, int], est_ck: int) -> str | None:
    """Words for why recomputation (`levers`) cannot win, or None. Without it, the combination's
    largest fit L and half of it were measured: g = time per token at L/2 over that at L is the
    rate's gain from the last doubling. The rate is concave in log(micro-batch) (a larger batch
    fills the device better by less and less), so from L to the `est_ck` recomputation is
    estimated to reach it gains at most g per doubling, g ** log2(est_ck / L) in all; where that
    is no more than recomputation's cost per token (1 + RECOMPUTE_SHARE[policy] / every, the
    throughput model's, autofit.planning.throughput), the recomputing plan would be slower."""
    cpu = runner.kind == "cpu"
    cost = 1.0 + RECOMPUTE_SHARE[levers.checkpointing_policy] / max(1, levers.checkpointing)
    for lv in base_levers:
        sizes = {t.micro_batch: t for t in runner.fits(lv)}
        big, half = sizes.get(best_by_levers[lv]), sizes.get(run_size(runner.rank_batch, max(1, best_by_levers[lv] // 2)))
        if big is None or half is None or half is big or est_ck <= big.micro_batch:
            continue
        a, b = seconds_per_token(half, cpu), seconds_per_token(big, cpu)
        if a is None or b is None:
            continue
        gain = max(1.0, a / b) ** math.log2(est_ck / big.micro_batch)
        if gain > cost and len(half.step_seconds) <= runner.settings.steps:
            # a steep curve read from the half's search trial alone: one burst of load on it would
            # buy a whole recomputing search (3-4 trials at the largest sizes), so the pair is
            # re-timed once, alternated, before the search is spent (the readings join the contest's)
            runner.log(f"re-timing micro-batch {half.micro_batch} and {big.micro_batch} ({lv.loss_impl} loss) once, alternated: "
                       f"their first readings ({a / b:.2f}x) say activation checkpointing could pay back, which "
                       f"would cost a whole search of it: one burst of load must not decide that")
            if retime(runner, half):
                retime(runner, big)
            a, b = seconds_per_token(half, cpu), seconds_per_token(big, cpu)
            gain = max(1.0, a / b) ** math.log2(est_ck / big.micro_batch)
        if gain <= cost:
            d = 2 if round(gain, 2) < round(cost, 2) else 3  # '1.09x, less than 1.09x' reads as a mistake
            return (f"{lv.loss_impl} loss: micro-batch {half.micro_batch} takes {a / b:.2f}x the {per_token(cpu)} "
                    f"of {big.micro_batch}, so the estimated {est_ck} with recomputation gains at most {gain:.{d}f}x, "
                    f"no more than its {cost:.{d}f}x compute")
    return None


# Statuses of a trial that says a size does not fit (an error that is not out of memory says nothing
# about memory: the combination is searched, and its search stops on the error and says so).
NOT_FIT = ("oom", "over_budget", "pruned", "spill")


def prune_loss(runner: TrialRunner, levers: Levers, best_by_levers: dict[Levers, int]) -> TrialRecord | None:
    """The chunked loss is a memory lever: it computes the same head matmul and cross-entropy in
    chunks so the full logits never exist at once, which at a given micro-batch costs the same
    work or more (torchtitan PR #996: peak -7 GiB on Llama3-8B, 'no throughput loss'; TileGym #65:
    73.3 ms against 47.0 ms unchunked, ../shared/research/field-2026.md; on this CPU 1-4 % slower
    at the tiny preset's 11, docs/planner-benchmark.md). So it can only win by running a larger
    size than the standard loss fits. Where the standard loss with the same other levers fits the
    whole batch, or the chunked loss does not fit the next run size past the standard loss's
    largest fit (one trial, where the estimate does not settle it beyond its error bound either
    way), the chunked combination is not searched: its contest at the standard loss's
    size would be a coin toss between two plans a percent or two apart (issue 18's alternation).
    Not for the config's own loss (its split is a contender: autofit.planning.own). Returns the
    'pruned' record at the size the standard loss fits, its note the reason, or None."""
    if levers.loss_impl != "chunked" or runner.cfg.loss_impl == "chunked":
        return None
    std = dataclasses.replace(levers, loss_impl="standard")
    base = best_by_levers.get(std, 0)
    if base <= 0:  # the standard loss fits nothing here, or was not searched: the chunked loss may
        return None
    E = runner.rank_batch
    if base >= E:
        why = f"the standard loss fits the whole batch ({base}) with these levers"
    else:
        past = min(m for m in run_sizes(E) if m > base)
        cand = levers.candidate(past)
        bound = runner.bound_for(cand)
        if bound is not None and runner.estimate(cand) < (1 - bound) * runner.budget_bytes:
            return None  # it fits there by more than the estimate's error: no trial needed to know
        r = runner.run(cand)
        if r.status not in NOT_FIT:
            return None
        how = {"pruned": "ruled out by the estimate", "oom": "out of memory", "over_budget": "its peak over the budget",
               "spill": "it spilled to host memory"}[r.status]
        why = (f"the chunked loss does not fit micro-batch {past} either ({how}), the next size a run uses past "
               f"the {base} the standard loss fits")
    return TrialRecord(**levers.candidate(min(base, E)).model_dump(), status="pruned",
                       note=f"not needed: {why}; at the same size it does the same work in chunks, no faster "
                            f"(a memory lever: torchtitan PR #996, docs/planner-benchmark.md)")


def prune_sharding(runner: TrialRunner, levers: Levers, best_by_levers: dict[Levers, int]) -> TrialRecord | None:
    """FSDP2 all-gathers every block's weights and reduce-scatters its gradients in every
    micro-batch: try it only when no unsharded combination holds the whole per-rank batch and
    the estimate promises a larger micro-batch than the best of them. Returns the 'pruned'
    record when it is not worth a search."""
    if not levers.sharded:
        return None
    E = runner.rank_batch
    base = max([v for lv, v in best_by_levers.items() if not lv.sharded] or [0])
    est = max_micro_batch(runner.shape, runner.budget_bytes, **levers.estimate_args(), compile=False,
                          device=runner.kind, step_batch=E,
                          ce_chunk_size=runner.cfg.ce_chunk_size, **agree.layout(True))
    if base >= E or (base > 0 and est <= base):
        why = (f"micro-batch {base} fits without sharding" if base >= E else
               f"estimated {est} sharded, no more than {base} without")
        return TrialRecord(**levers.candidate(max(1, min(est, E))).model_dump(), status="pruned",
                           note=f"not needed: {why}")
    return None
