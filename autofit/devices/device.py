"""What every device gives the launcher: its identity and capacity (DeviceInfo) and the Device
protocol (a trainer memory meter plus that identity).

Implementations, one per kind of device:
- CUDA GPU: autofit.devices.cuda.CudaDevice (NVML identity, torch caching-allocator meter);
- budgeted CPU: autofit.devices.cpu_budget.BudgetedCpuDevice (real tensors, a live-bytes tracker that
  raises torch.OutOfMemoryError past a budget);
- plain CPU: autofit.devices.cpu.PlainCpuDevice (nothing measured);
- simulated GPU: SimulatedDevice below (a hardware profile with no hardware: estimates only).
autofit.devices.opener.open_device picks and opens one of them for every caller.
"""
from __future__ import annotations

import contextlib
from typing import ContextManager, Protocol, runtime_checkable

import torch

from autofit.devices.info import ASSUMED_CONTEXT_BYTES, DeviceError, DeviceInfo  # noqa: F401  (their home: info.py, torch-free)
from trainer.meter import MemoryMeter, MeterCapabilities, NullMeter




@runtime_checkable
class Device(MemoryMeter, Protocol):
    """A device the launcher can plan for: a trainer.meter.MemoryMeter (tracking, peak and
    reserved readings, cleanup, OOM classification, declared capabilities) with an identity.

    `info` is a property on every implementation. `runs_trials` is False only for a simulated
    GPU, whose figures are all estimates."""
    torch_device: torch.device
    runs_trials: bool
    context_bytes: int | None  # measured memory outside the allocator (CUDA context); None: not measured


    @property
    def info(self) -> DeviceInfo: ...

    def limited_to(self, limit_bytes: int) -> ContextManager:
        """While active, the device holds at most `limit_bytes` for tensors (the probe's budget),
        so an over-budget trial fails fast; a no-op where nothing can be capped."""
        ...

    def refresh_context(self) -> int | None:
        """Measures context_bytes again (libraries load workspaces at first use); None where
        there is nothing outside an allocator to measure."""
        ...


class NoCap:
    """The Device parts of a device with no memory cap and nothing outside an allocator."""
    context_bytes = None

    def limited_to(self, limit_bytes: int) -> ContextManager:
        return contextlib.nullcontext()

    def refresh_context(self) -> int | None:
        return None


def simulated_info(hw) -> DeviceInfo:
    """DeviceInfo for a hardware profile (an autofit.devices.hardware.HardwareSpec) standing in for a GPU
    that is not here: capacity from the profile, estimates only."""
    return DeviceInfo(kind="simulated", name=hw.gpu, index=None, total_bytes=hw.memory_bytes,
                      free_bytes=hw.memory_bytes, used_by_others_bytes=None,
                      compute_capability=hw.compute_capability, driver_version=None,
                      cuda_version=None, source=f"profile:{hw.name}",
                      note="simulated from a hardware profile: figures are estimates, not measurements")


class SimulatedDevice(NoCap, NullMeter):
    """A GPU that is not here, described by its hardware profile. It measures nothing (the null
    meter's readings are all None) and runs no trials; the planner answers from the estimate alone
    and labels every figure estimated."""
    runs_trials = False
    torch_device = torch.device("meta")

    def __init__(self, hw):
        self.hw = hw
        self._info = simulated_info(hw)

    @property
    def info(self) -> DeviceInfo:
        return self._info

    def spec(self) -> dict:
        return {"kind": "simulated", "profile": self.hw.name}


__all__ = ["Device", "DeviceError", "DeviceInfo", "NoCap", "MeterCapabilities", "SimulatedDevice", "simulated_info"]
