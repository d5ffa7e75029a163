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
