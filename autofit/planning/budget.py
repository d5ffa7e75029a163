"""What a plan may use: usable memory on the device, less what is not ours to plan with (the CUDA
context and library workspaces), times (1 - margin). Each term's `how` starts with 'measured:',
'assumed:' or 'from a profile:' (a chosen figure, --budget or --margin, is an assumption the user made)."""
from __future__ import annotations

from dataclasses import dataclass, field

# The CUDA context assumed where it cannot be measured is a device figure (devices/info.py, where
# the CUDA device reads it too): see there for its source and why cuBLAS's workspace is no budget term.
from autofit.devices.info import ASSUMED_CONTEXT_BYTES, DeviceError
from autofit.units import fmt_share

ASSUMED_WORKSPACE_BYTES = 64 * 2**20


@dataclass
class BudgetTerm:
    label: str
    bytes: int  # signed: what it adds to (+) or takes from (-) the budget
    how: str  # "measured: …", "assumed: …" or "from a profile: …"


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
    read after CUDA initialised; pass context_bytes=0 then. Raises DeviceError for a CPU budget
    with nothing left after the margin (a GPU's empty budget is the probe's 'nothing fits', which
    names what holds the card)."""
    if not 0.0 <= margin < 1.0:
        raise ValueError(f"margin must be in [0, 1), got {margin}")
    terms: list[BudgetTerm] = []
    if info.kind == "cpu":
        free = info.free_bytes
        # cpu_info says whether --budget gave it or the default share of RAM was assumed
        terms.append(BudgetTerm("CPU memory budget", free, f"{info.free_how or 'given: --budget'} (budgeted CPU device)"))
        usable = free
    else:
        free = info.free_bytes
        if info.free_how:  # e.g. --emulate: a profile's figure, not this GPU's reading
            src = info.free_how
        elif info.kind == "cuda":
            src = f"measured: {'NVML' if info.source.startswith('nvml') else 'torch.cuda.mem_get_info'} free memory"
        else:
            src = f"from a profile: {info.source} capacity, assumed with nothing else on the card"
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
    if info.kind == "cpu" and budget < 1:  # --budget 1 (or a profile's memory_bytes = 1): nothing to plan in
        raise DeviceError(f"a CPU budget of {usable} B leaves {budget} B to plan in after the {fmt_share(margin)} safety "
                          f"margin; give a budget that holds the model, its optimizer state and a micro-batch")
    terms.append(BudgetTerm(f"safety margin {fmt_share(margin)}", budget - usable,
                            "assumed: --margin (default 10%), a share kept free"))
    return Budget(budget_bytes=budget, usable_bytes=usable, margin=margin, terms=terms)


def device_budget(device, margin: float = 0.10) -> Budget:
    """The budget of an opened autofit.devices.device.Device: its DeviceInfo, less the memory it measured
    outside the allocator (`context_bytes`, CUDA only; None means assumed, and then an assumed
    workspace term too), times (1 - margin)."""
    measured = device.context_bytes is not None
    return compute_budget(device.info, margin, context_bytes=device.context_bytes,
                          workspace_bytes=0 if measured else None)
