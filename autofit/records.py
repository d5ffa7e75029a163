"""The records a probe produces: one per trial, and the plan. Shared by the planner, the
saved profiles and the JSON output, so all three agree on names and units (bytes as ints)."""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, Field, computed_field, model_validator

# fit: ran its optimizer steps and its peak is inside the budget.
# oom: raised out-of-memory. over_budget: ran, but its peak exceeds the budget.
# spill: treated as not fitting because memory beyond capacity or a >3x slowdown shows a
#        host-RAM fallback. pruned: not run, the estimate says it cannot fit. error: crashed.
# leak: ran, but its memory did not come back afterwards (a failed trial).
TrialStatus = Literal["fit", "oom", "over_budget", "spill", "pruned", "error", "leak"]
LossImpl = Literal["standard", "chunked"]
DType = Literal["float32", "bfloat16", "float16"]
# What a checkpointed block keeps: 'full' only its input (everything recomputed), 'selective' also
# the outputs of trainer.model.sac_ops.SAC_SAVED_OPS (matmuls, attention). Without checkpointing
# (checkpointing 0) it is always 'full'. Records written before the policy was a lever have none:
# they were all 'full', which the default says.
CkptPolicy = Literal["full", "selective"]


class Candidate(BaseModel, frozen=True):
    micro_batch: int
    dtype: DType
    compile: bool
    checkpointing: int  # 0 off, k: every k-th block
    loss_impl: LossImpl
    sharded: bool = False  # several ranks: FSDP2 (weights, gradients, AdamW state sharded); else DDP
    checkpointing_policy: CkptPolicy = "full"


class TrialRecord(BaseModel):
    micro_batch: int = Field(ge=1)
    dtype: DType
    compile: bool
    checkpointing: int
    loss_impl: LossImpl
    sharded: bool = False
    checkpointing_policy: CkptPolicy = "full"
    status: TrialStatus
    estimated_peak_bytes: int | None = None
    measured_peak_bytes: int | None = None
    measured_reserved_bytes: int | None = None
    # tokens of one step / the fastest timed step's wall time (after the warm-up step), measured:
    # load from other processes only ever slows a step, so the fastest is the least disturbed
    tokens_per_s: float | None = None
    step_seconds: list[float] = []  # each timed step's wall time, measured (re-timing appends)
    # each timed step's CPU time of this process (all its threads), measured on a CPU device only:
    # time other processes take from free cores is not counted in it (oversubscribed, it is)
    step_cpu_seconds: list[float] = []
    tokens_per_step: int | None = None  # tokens of one timed step (both micro-batches of a trial)
    # of each timed step, the optimizer update's share (clipping, step, zero_grad; measured, wall
    # and, on a CPU device, CPU time): a run pays it once per optimizer step of
    # `optimizer_step_tokens` tokens, a trial once per its two micro-batches (autofit.planning.contest)
    update_seconds: list[float] = []
    update_cpu_seconds: list[float] = []
    optimizer_step_tokens: int | None = None  # tokens of one optimizer step of the run planned (each rank's)
    # allocated bytes after the trial's cleanup less before it (measured; None where the device
    # measures nothing): how far the trial was from giving its memory back
    leaked_bytes: int | None = None
    steps_run: int = 0
    # timed steps the contest's re-timings added (autofit.planning.contest.retime), after the trial's
    # own line was printed with its fastest step then: said where the figures print (its rate moved)
    retimed_steps: int = 0
    seconds: float = 0.0
    compile_seconds: float | None = None
    note: str = ""
    # several ranks: True when the status and note are another rank's failure met on this one
    # (trainer.distributed.ranks.OtherRankOOM / RankFailed), not this rank's own; set by
    # autofit.planning.trials.run_trial, read by autofit.planning.agree.trial. Records written
    # before it was a field have none: False.
    met_other_rank: bool = False

    def candidate(self) -> Candidate:
        return Candidate(micro_batch=self.micro_batch, dtype=self.dtype, compile=self.compile,
                         checkpointing=self.checkpointing, loss_impl=self.loss_impl, sharded=self.sharded,
                         checkpointing_policy=self.checkpointing_policy)

    def readings(self, cpu: bool) -> list[float]:
        """Each timed step as seconds per token of the run it plans: the step's micro-batches' time
        per token, plus its optimizer update spread over the run's optimizer step
        (`optimizer_step_tokens`), not over the trial's two micro-batches; a run of 4 x 8 pays one
        update per 32 sequences, its trial of 2 x 8 one per 16, so unprojected trials favour larger
        micro-batches on a model whose update is a sizeable share of a step. CPU time (`cpu`, where
        CPU times were measured) or wall time. Without update times (records from before they
        were measured): the step as measured."""
        use_cpu = cpu and bool(self.step_cpu_seconds)
        steps = self.step_cpu_seconds if use_cpu else self.step_seconds
        updates = self.update_cpu_seconds if use_cpu else self.update_seconds
        if not (steps and self.tokens_per_step):
            return []
        if len(updates) != len(steps) or not self.optimizer_step_tokens:
            return [s / self.tokens_per_step for s in steps]
        return [(s - u) / self.tokens_per_step + u / self.optimizer_step_tokens for s, u in zip(steps, updates)]

    @computed_field
    @property
    def run_tokens_per_s(self) -> float | None:
        """Tokens/s (wall time, measured) the run planned with this trial is expected to reach: its
        fastest reading, the optimizer update paid once per optimizer step as the run pays it. The
        figure the plan, the trial lines and the -v table print; `tokens_per_s` is the trial's own
        (its update paid per two trial micro-batches). In --json, profiles and AUTOFIT_TRIALS_JSONL."""
        r = self.readings(False)
        return 1.0 / min(r) if r else self.tokens_per_s

    @computed_field
    @property
    def run_tokens_per_s_median(self) -> float | None:
        """Tokens/s (wall time, measured) of the median of the same readings as run_tokens_per_s:
        what the run should see on a machine as busy as the probe's (load slows some steps, and a
        run has them all), where run_tokens_per_s is the undisturbed figure. The plan prints
        both (autofit.planning.split.plan_rates). None without step times."""
        r = self.readings(False)
        return 1.0 / statistics.median(r) if r else None


class PlanRecord(BaseModel):
    """A plan, as the probe makes it and as a saved profile or a checkpoint gives it back: every
    size in range and the micro-batches adding up, so a hand-edited plan (micro_batch = 0) is
    refused on reading, naming the field."""
    mode: Literal["measured", "estimated"]
    micro_batch: int = Field(ge=1)
    grad_accum: int = Field(ge=1)
    micro_batches: list[Annotated[int, Field(ge=1)]] = Field(min_length=1)  # sizes of one optimizer step's micro-batches
    effective_batch: int = Field(ge=1)  # sequences per optimizer step (per rank), = sum(micro_batches)
    block_size: int = Field(ge=1)
    dtype: DType
    compile: bool
    compile_after: int = Field(ge=0)
    checkpointing: int = Field(ge=0)
    checkpointing_policy: CkptPolicy = "full"  # plans saved before it was a lever were 'full'
    loss_impl: LossImpl
    estimated_peak_bytes: int | None = Field(default=None, ge=0)
    measured_peak_bytes: int | None = Field(default=None, ge=0)  # allocated (live tensors)
    # reserved (the caching allocator's segments) where the device has it, CUDA: what runs out
    # there, so what the plan was judged on against the budget (judged_peak); None elsewhere
    measured_reserved_bytes: int | None = Field(default=None, ge=0)
    # measured: the median of the plan's own sizes' timed trial steps, its optimizer update paid
    # once per optimizer step, as the run should see it (estimated mode: the estimate); per rank
    # under torchrun. Plans saved before session 14 hold the fastest step's figure here.
    tokens_per_s: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    # measured only: the same from each size's fastest step (the undisturbed figure the contest
    # compares), and how many timed steps of the plan's largest micro-batch the figures come from
    fastest_tokens_per_s: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    timed_steps: int | None = Field(default=None, ge=1)
    budget_bytes: int = Field(ge=0)
    split: str  # e.g. "512 = 42 × 12 + 8"
    reason: str = ""
    # torchrun: the ranks the plan is for, and how they share the model; micro_batches and
    # effective_batch above are each rank's (the run's effective batch is world_size times it)
    world_size: int = Field(default=1, ge=1)
    parallelism: Literal["single", "ddp", "fsdp2"] = "single"

    @model_validator(mode="after")
    def _adds_up(self) -> "PlanRecord":
        mbs = self.micro_batches
        if sum(mbs) != self.effective_batch or len(mbs) != self.grad_accum or max(mbs) != self.micro_batch:
            raise ValueError(f"micro_batches {mbs[:8]}{'...' if len(mbs) > 8 else ''} must add up to effective_batch "
                             f"({self.effective_batch}), number grad_accum ({self.grad_accum}) and peak at micro_batch "
                             f"({self.micro_batch})")
        return self


@dataclass
class ProbeResult:
    """What a probe found: every trial, the plan, and the estimated memory breakdown (bytes by
    component) of the plan. `mode` says whether the figures were measured on this device or
    estimated for a simulated one."""
    mode: Literal["measured", "estimated"]
    device: object  # autofit.devices.device.DeviceInfo
    budget: object  # autofit.planning.budget.Budget
    effective_batch: int
    block_size: int
    trials: list[TrialRecord]
    plan: PlanRecord
    breakdown: dict[str, int]  # estimated bytes by component for the chosen plan
    fit_sizes: list[int] = field(default_factory=list)  # eager sizes known to fit (chosen levers)
    compiled_fit_sizes: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # levers left out of the search, and why
    # UTC time the measured probe started (launch.probe.probe_on): a saved plan's lessons from
    # before it are cleared (profiles.store.save_plan); None for a simulated card's estimates
    started: datetime | None = None
    # an estimate's basis in words (autofit.planning.throughput.rate_words: a card's sustained rate
    # where its profile has one); '' for a measured probe
    rate_words: str = ""
    # several ranks: whose device `device` is (the smallest budget's rank) and this rank's own
    # figures beside it (autofit.planning.agree.bind); '' with one process
    device_ranks: str = ""

    def to_json(self) -> dict:
        d = self.device
        return {
            "mode": self.mode,
            "device": {"name": d.name, "kind": d.kind, "total_bytes": d.total_bytes, "free_bytes": d.free_bytes,
                       "source": d.source, **({"ranks": self.device_ranks} if self.device_ranks else {})},
            "budget_bytes": self.budget.budget_bytes,
            "budget": self.budget.to_json(),
            "target": {"effective_batch": self.effective_batch, "block_size": self.block_size,
                       "tokens_per_step": self.effective_batch * self.block_size},
            "trials": [t.model_dump(mode="json") for t in self.trials],
            "plan": self.plan.model_dump(mode="json"),
            "breakdown_estimated_bytes": self.breakdown,
            "fit_sizes": self.fit_sizes,
            "compiled_fit_sizes": self.compiled_fit_sizes,
            "notes": self.notes,
        }


def judged_peak(r) -> int | None:
    """The measured peak a trial or plan (`r`: a TrialRecord or PlanRecord) is judged on against
    the budget, in bytes: reserved where the device has it (CUDA, where reserved memory is what
    runs out, never below allocated), else allocated. None when nothing was measured."""
    if not r.measured_peak_bytes:
        return None
    return max(r.measured_peak_bytes, r.measured_reserved_bytes or 0)

