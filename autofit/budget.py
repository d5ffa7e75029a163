"""What a plan may use: usable memory on the device, less what is not ours to plan with (the CUDA
context and library workspaces), times (1 - margin). Each term says whether it was measured."""
from __future__ import annotations

from dataclasses import dataclass, field

# Used when the context cannot be measured (a simulated GPU, or before CUDA is initialised):
# a CUDA 12 context with torch's kernels loaded is typically 300-600 MiB, and kernels loaded
# lazily later (cuDNN/SDPA, Triton) add some more outside the caching allocator.
# cuBLAS's workspace (8 MiB per stream, 32 MiB on Hopper) is NOT a budget term: it is allocated
# through the caching allocator, so a trial's measured peak holds it and the estimate counts it
# (estimate.CUDA_WORKSPACE_BYTES). Where the context is measured, the measurement (this process's
# NVML use less torch's reserved bytes) already holds everything outside the allocator, so the
# workspace term is 0 there.
ASSUMED_CONTEXT_BYTES = 512 * 2**20
ASSUMED_WORKSPACE_BYTES = 64 * 2**20


@dataclass
class BudgetTerm:
    label: str
    bytes: int  # signed: what it adds to (+) or takes from (-) the budget
    how: str  # "measured: …" or "assumed: …"


@dataclass
class Budget:
    budget_bytes: int
    usable_bytes: int
    margin: float
    terms: list[BudgetTerm] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"budget_bytes": self.budget_bytes, "usable_bytes": self.usable_bytes, "margin": self.margin,
                "terms": [t.__dict__ for t in self.terms]}


def compute_budget(info, margin: float = 0.10, context_bytes: int | None = None,
                   workspace_bytes: int | None = None, context_how: str | None = None) -> Budget:
    """`info` is a DeviceInfo. On CUDA, free memory already excludes our own context when it was
    read after CUDA initialised; pass context_bytes=0 then."""
    if not 0.0 <= margin < 1.0:
        raise ValueError(f"margin must be in [0, 1), got {margin}")
    terms: list[BudgetTerm] = []
    if info.kind == "cpu":
        free = info.free_bytes
        terms.append(BudgetTerm("CPU memory budget", free,
                                "set: --budget, or half of available RAM without it (budgeted CPU device)"))
        usable = free
    else:
        free = info.free_bytes
        src = "measured: NVML free memory" if info.kind == "cuda" else \
            f"assumed: {info.source} capacity with nothing else on the card"
        terms.append(BudgetTerm("free memory", free, src))
        if info.used_by_others_bytes:
            terms.append(BudgetTerm("(already used by other processes)", 0,
                                    f"measured: NVML, {info.used_by_others_bytes} bytes, excluded from free"))
        if context_bytes is None:
            context_bytes = ASSUMED_CONTEXT_BYTES
            how = "assumed: typical CUDA 12 context with torch loaded"
        else:
            how = context_how or "measured: device memory in use after CUDA init, minus torch's reserved bytes"
        terms.append(BudgetTerm("CUDA context", -context_bytes, how))
        if workspace_bytes is None:
            workspace_bytes = ASSUMED_WORKSPACE_BYTES
            how_ws = "assumed: kernels and workspaces loaded later outside the allocator (cuDNN/SDPA, Triton)"
        else:
            how_ws = "measured: within the CUDA context figure" if workspace_bytes == 0 else "measured"
        terms.append(BudgetTerm("library workspaces", -workspace_bytes, how_ws))
        usable = max(0, free - context_bytes - workspace_bytes)
    budget = int(usable * (1.0 - margin))
    terms.append(BudgetTerm(f"safety margin {margin:.0%}", budget - usable, "chosen: --margin"))
    return Budget(budget_bytes=budget, usable_bytes=usable, margin=margin, terms=terms)


def device_budget(device, margin: float = 0.10) -> Budget:
    """The budget of an opened autofit.device.Device: its DeviceInfo, less the memory it measured
    outside the allocator (`context_bytes`, CUDA only; None means assumed, and then an assumed
    workspace term too), times (1 - margin)."""
    measured = device.context_bytes is not None
    return compute_budget(device.info, margin, context_bytes=device.context_bytes,
                          workspace_bytes=0 if measured else None)
