"""A device's identity and capacity (DeviceInfo) and DeviceError, without torch: the CLI's
start-up (autofit.launch.torchrun, which every command passes through) and `profiles` name them,
and `--help` or `profiles list` must not wait for torch to load. autofit.devices.device
re-exports both."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel


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

    @property
    def bf16_supported(self) -> bool:
        """bf16 tensor cores start with Ampere (compute capability 8.0); before that torch
        emulates bf16 slowly, so it counts as unsupported. CPUs run bf16 (slowly, but correctly)."""
        if self.kind == "cpu":
            return True
        return self.compute_capability is not None and tuple(self.compute_capability) >= (8, 0)
