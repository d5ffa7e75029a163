"""A device's identity and capacity (DeviceInfo) and DeviceError, without torch: the CLI's
start-up (autofit.launch.torchrun, which every command passes through) and `profiles` name them,
and `--help` or `profiles list` must not wait for torch to load. autofit.devices.device
re-exports both."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel


# Used when the context cannot be measured (a simulated GPU, or before CUDA is initialised):
# a CUDA 12 context with torch's kernels loaded is typically 300-600 MiB, and kernels loaded
# lazily later (cuDNN/SDPA, Triton) add some more outside the caching allocator.
# cuBLAS's workspace (8 MiB per stream, 32 MiB on Hopper) is NOT a budget term: it is allocated
# through the caching allocator, so a trial's measured peak holds it and the estimate counts it
# (autofit.planning.estimate.CUDA_WORKSPACE_BYTES). Where the context is measured, the
# measurement (this process's NVML use less torch's reserved bytes) already holds everything
# outside the allocator, so the workspace term is 0 there.
ASSUMED_CONTEXT_BYTES = 512 * 2**20

# One CPU budget per torchrun rank (autofit.devices.ranks reads it); named here, below both ranks.py and
# cpu.py, whose launcher check (check_ranks_fit) counts its sizes
RANK_BUDGETS_ENV = "AUTOFIT_RANK_BUDGETS"


class DeviceError(RuntimeError):
    """A device problem the user can cause or fix (no GPU, bad index, bad budget). One line."""


class DeviceInfo(BaseModel):
    """Identity and capacity of a device, in bytes. Read once when the device is opened (free
    memory is a snapshot); `source` says who answered: 'nvml', 'torch.cuda', 'nvml+torch.cuda',
    'cpu' or 'profile:<slug>'."""
    kind: Literal["cuda", "cpu", "simulated"]
    name: str
    index: int | None
    total_bytes: int
    free_bytes: int
    used_by_others_bytes: int | None  # other processes' GPU memory; None when NVML cannot tell
    compute_capability: tuple[int, int] | None
    driver_version: str | None
    # CUDA version the driver supports (NVML), or that torch was built with (torch.cuda fallback).
    cuda_version: str | None
    mig: bool = False
    source: str
    note: str = ""
    uuid: str | None = None  # NVML's "GPU-..." UUID, when known
    # Memory the driver and firmware keep for themselves (NVML v2 memory info), part of total.
    driver_reserved_bytes: int | None = None
    # How free_bytes was found, when it is not the `source`'s own reading ('' then): under
    # --emulate it is a profile's capacity less driver-reserved memory, not a measurement.
    free_how: str = ""

    @property
    def bf16_supported(self) -> bool:
        """bf16 tensor cores start with Ampere (compute capability 8.0); before that torch
        emulates bf16 slowly, so it counts as unsupported. CPUs run bf16 (slowly, but correctly)."""
        if self.kind == "cpu":
            return True
        return self.compute_capability is not None and tuple(self.compute_capability) >= (8, 0)


def with_details(name: str, details: str) -> str:
    """'NAME (details)'; where the name itself ends in a parenthesis, as some NVML and CPU names do
    ('NVIDIA GeForce RTX 4070 (Laptop)'), the details join it, 'NVIDIA GeForce RTX 4070 (Laptop;
    details)', instead of two parentheses in a row, '(Laptop) (details)'."""
    name = name.rstrip()
    if name.endswith(")") and "(" in name:
        return f"{name[:-1]}; {details})"
    return f"{name} ({details})"
