"""The records a probe produces: one per trial, and the plan. Shared by the planner, the
saved profiles and the JSON output, so all three agree on names and units (bytes as ints)."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

# fit: ran its optimizer steps and its peak is inside the budget.
# oom: raised out-of-memory. over_budget: ran, but its peak exceeds the budget.
# spill: treated as not fitting because memory beyond capacity or a >3x slowdown shows a
#        host-RAM fallback. pruned: not run, the estimate says it cannot fit. error: crashed.
TrialStatus = Literal["fit", "oom", "over_budget", "spill", "pruned", "error"]
LossImpl = Literal["standard", "chunked"]
DType = Literal["float32", "bfloat16", "float16"]


class Candidate(BaseModel, frozen=True):
    micro_batch: int
    dtype: DType
    compile: bool
    checkpointing: int  # 0 off, k: every k-th block
    loss_impl: LossImpl


class TrialRecord(BaseModel):
    micro_batch: int
    dtype: DType
    compile: bool
    checkpointing: int
    loss_impl: LossImpl
    status: TrialStatus
    estimated_peak_bytes: int | None = None
    measured_peak_bytes: int | None = None
    measured_reserved_bytes: int | None = None
    tokens_per_s: float | None = None
    steps_run: int = 0
    seconds: float = 0.0
    compile_seconds: float | None = None
    note: str = ""

    def candidate(self) -> Candidate:
        return Candidate(micro_batch=self.micro_batch, dtype=self.dtype, compile=self.compile,
                         checkpointing=self.checkpointing, loss_impl=self.loss_impl)


class PlanRecord(BaseModel):
    mode: Literal["measured", "estimated"]
    micro_batch: int
    grad_accum: int
    micro_batches: list[int]  # sizes of the micro-batches of one optimizer step
    effective_batch: int  # sequences per optimizer step (per rank), = sum(micro_batches)
    block_size: int
    dtype: DType
    compile: bool
    compile_after: int
    checkpointing: int
    loss_impl: LossImpl
    estimated_peak_bytes: int | None = None
    measured_peak_bytes: int | None = None
    tokens_per_s: float | None = None
    budget_bytes: int
    split: str  # e.g. "512 = 42 × 12 + 8"
    reason: str = ""
