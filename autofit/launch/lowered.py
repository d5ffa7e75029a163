"""What a run of a saved plan runs where lessons changed it (a micro-batch lowered after a run-time
OOM, compile off): the plan at that size with the figures of that size's own trial, else the
closed-form estimate. `run --profile` launches it and `profiles show` lists it, from this one place,
so the two never disagree about which plan runs (t6's L5, session 14).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: the planning and trainer helpers below import torch, lazily
    from autofit.records import PlanRecord


def figures_for(plan: "PlanRecord", same: list, cfg, kind: str) -> "PlanRecord":
    """A saved plan changed at run time (a lower micro-batch after an OOM, compile off) with the
    figures of what it now runs: the probe's trial of that size and compile setting (`same`: the
    fitting trials with the plan's levers), else no measured figure and the closed-form estimate."""
    from autofit.planning.contest import run_tokens_per_s
    from autofit.planning import agree
    from autofit.planning.estimate import ModelShape, estimate_peak
    ran = [t for t in same if t.micro_batch == plan.micro_batch and t.compile == plan.compile]
    if ran:
        return plan.model_copy(update={"measured_peak_bytes": ran[0].measured_peak_bytes,
                                       "measured_reserved_bytes": ran[0].measured_reserved_bytes,
                                       "tokens_per_s": ran[0].run_tokens_per_s_median or run_tokens_per_s(ran[0]),  # as a plan's
                                       "fastest_tokens_per_s": run_tokens_per_s(ran[0]),
                                       "timed_steps": len(ran[0].step_seconds) or None})
    est = estimate_peak(ModelShape.from_config(cfg), plan.micro_batch, dtype=plan.dtype,
                        checkpointing=plan.checkpointing, loss_impl=plan.loss_impl, compile=plan.compile,
                        device="cpu" if kind == "cpu" else "cuda", ce_chunk_size=cfg.ce_chunk_size,
                        n_micro=min(2, plan.grad_accum), checkpointing_policy=plan.checkpointing_policy,
                        step_batch=plan.effective_batch, **agree.layout(plan.parallelism == "fsdp2"))
    return plan.model_copy(update={"measured_peak_bytes": None, "measured_reserved_bytes": None, "tokens_per_s": None,
                                   "fastest_tokens_per_s": None, "timed_steps": None,
                                   "estimated_peak_bytes": est.peak_bytes})


def with_micro(plan: "PlanRecord", micro: int) -> "PlanRecord":
    """`plan` at micro-batch `micro`: its effective batch split evenly (trainer.step.split_batch)."""
    from trainer.step import describe_split, split_batch
    mbs = split_batch(plan.effective_batch, micro)
    return plan.model_copy(update={"micro_batch": max(mbs), "micro_batches": mbs, "grad_accum": len(mbs),
                                   "split": describe_split(mbs)})


def run_plan(fitted, cfg, kind: str) -> tuple["PlanRecord", list]:
    """The plan a run of the saved `fitted` (store.FittedPlan) runs: its micro-batch lowered to the
    profile's safe micro-batch and compile off where lessons say so, with the figures of what it then
    runs (figures_for, against `cfg`'s model: a TrainConfig, or any object with its fields); and the
    fitting trials with the plan's own levers (a size that only fitted with recompute or the chunked
    loss is no refuge for this plan). `kind`: 'cpu' or 'cuda', for the estimate where no trial ran."""
    plan = fitted.plan
    changed = False
    if fitted.safe_micro_batch and fitted.safe_micro_batch < plan.micro_batch:
        plan, changed = with_micro(plan, fitted.safe_micro_batch), True
    if fitted.compile_failed and plan.compile:
        plan, changed = plan.model_copy(update={"compile": False}), True
    same = [t for t in fitted.trials if t.status == "fit" and
            (t.dtype, t.checkpointing, t.checkpointing_policy, t.loss_impl)
            == (plan.dtype, plan.checkpointing, plan.checkpointing_policy, plan.loss_impl)]
    if changed:  # the figures of what it runs now, not of the plan as it was saved
        plan = figures_for(plan, same, cfg, kind)
    return plan, same
