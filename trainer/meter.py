"""Memory meters and OOM classification, shared by the trainer and the launcher.

A meter (the MemoryMeter protocol) is what the trainer asks about memory: a context that is active
while training tensors live (`tracking()`), the peak allocated and reserved bytes since
`reset_peak()`, the allocator's retry count, `cleanup()` after an out-of-memory error, OOM
classification, and a `spec()` that says how to reopen the same device on resume. What a meter can
measure is declared in its `capabilities`, never probed with hasattr. The trainer ships two: CUDA
(torch's caching-allocator statistics) and a null meter for an unbudgeted CPU. autofit's devices
(autofit.device.Device) implement the same protocol, the budgeted CPU device among them.
"""
from __future__ import annotations

import contextlib
import gc
from dataclasses import dataclass
from typing import ContextManager, Protocol

import torch

# Out-of-memory errors that do not arrive as torch.OutOfMemoryError (older builds, cuBLAS/cuDNN
# workspaces failing to allocate, raw CUDA errors). Matched case-insensitively.
OOM_MESSAGES = (
    "out of memory",
    "cublas_status_alloc_failed",
    "cudnn_status_not_supported",  # cuDNN falls back to this when its workspace cannot be allocated
    "cudnn_status_alloc_failed",
    "cuda error: out of memory",
    "hip out of memory",
)


def is_oom(exc: BaseException) -> bool:
    """True when `exc` means the device ran out of memory. torch.compile wraps an OOM raised while
    compiling (BackendCompilerFailed, InductorError), so the chain of causes is searched too."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, torch.OutOfMemoryError):
            return True
        if isinstance(exc, RuntimeError):
            msg = str(exc).lower()
            if any(m in msg for m in OOM_MESSAGES):
                return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


@dataclass(frozen=True)
class MeterCapabilities:
    """What a meter's readings mean, declared by each implementation.

    measures: peak_bytes() is a measurement of this device's memory (False: plain CPU, simulated).
    reserved: peak_reserved_bytes() reads a caching allocator's reserved bytes (CUDA only).
    alloc_retries: alloc_retries() counts the allocator's free-and-retry events (the thrash check).
    compile: torch.compile really compiles while tracking() is active (False on the budgeted CPU
        device: Dynamo traces nothing under its TorchDispatchMode, torch 2.13).
    """
    measures: bool
    reserved: bool
    alloc_retries: bool
    compile: bool


NO_MEASUREMENT = MeterCapabilities(measures=False, reserved=False, alloc_retries=False, compile=True)


class MemoryMeter(Protocol):
    capabilities: MeterCapabilities

    def tracking(self) -> ContextManager: ...
    def reset_peak(self) -> None: ...
    def peak_bytes(self) -> int | None: ...
    def peak_reserved_bytes(self) -> int | None: ...
    def current_bytes(self) -> int | None: ...
    def alloc_retries(self) -> int | None: ...
    def cleanup(self) -> None: ...
    def is_oom(self, exc: BaseException) -> bool: ...
    def spec(self) -> dict: ...
    def limit_bytes(self) -> int | None: ...  # what the allocator may hold at most; None: no limit


class NullMeter:
    """Plain CPU: nothing is measured (peak_bytes is None, never a made-up number)."""
    capabilities = NO_MEASUREMENT

    def tracking(self) -> ContextManager:
        return contextlib.nullcontext()

    def reset_peak(self) -> None:
        pass

    def peak_bytes(self) -> int | None:
        return None

    def peak_reserved_bytes(self) -> int | None:
        return None

    def current_bytes(self) -> int | None:
        return None

    def alloc_retries(self) -> int | None:
        return None

    def cleanup(self) -> None:
        gc.collect()

    def is_oom(self, exc: BaseException) -> bool:
        return is_oom(exc)

    def spec(self) -> dict:
        return {"kind": "cpu"}

    def limit_bytes(self) -> int | None:
        return None


class CudaMeter:
    """Peak allocated and reserved bytes from torch's CUDA caching allocator."""
    capabilities = MeterCapabilities(measures=True, reserved=True, alloc_retries=True, compile=True)

    def __init__(self, device: torch.device | int | None = None):
        self.device = torch.device("cuda", torch.cuda.current_device() if device is None else device) \
            if not isinstance(device, torch.device) else device

    def tracking(self) -> ContextManager:
        return contextlib.nullcontext()

    def reset_peak(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak_bytes(self) -> int | None:
        return int(torch.cuda.max_memory_allocated(self.device))

    def peak_reserved_bytes(self) -> int | None:
        return int(torch.cuda.max_memory_reserved(self.device))

    def current_bytes(self) -> int | None:
        return int(torch.cuda.memory_allocated(self.device))

    def alloc_retries(self) -> int | None:
        return int(torch.cuda.memory_stats(self.device).get("num_alloc_retries", 0))

    def cleanup(self) -> None:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)

    def is_oom(self, exc: BaseException) -> bool:
        return is_oom(exc)

    def spec(self) -> dict:
        return {"kind": "cuda"}

    def limit_bytes(self) -> int | None:
        return int(torch.cuda.get_device_properties(self.device).total_memory)


def default_meter(device: torch.device) -> MemoryMeter:
    return CudaMeter(device) if device.type == "cuda" else NullMeter()
