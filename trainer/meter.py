"""Memory meters and OOM classification, shared by the trainer and the launcher.

A meter is anything with `tracking()` (a context manager that is active while training tensors
live), `reset_peak()`, `peak_bytes()` and `cleanup()`. The trainer ships two: CUDA (torch's
caching-allocator statistics) and a null meter for an unbudgeted CPU. autofit adds the budgeted
CPU device, which implements the same four methods.
"""
from __future__ import annotations

import contextlib
import gc
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


class MemoryMeter(Protocol):
    def tracking(self) -> ContextManager: ...
    def reset_peak(self) -> None: ...
    def peak_bytes(self) -> int | None: ...
    def cleanup(self) -> None: ...


class NullMeter:
    """Plain CPU: nothing is measured (peak_bytes is None, never a made-up number)."""

    def tracking(self) -> ContextManager:
        return contextlib.nullcontext()

    def reset_peak(self) -> None:
        pass

    def peak_bytes(self) -> int | None:
        return None

    def cleanup(self) -> None:
        gc.collect()


class CudaMeter:
    """Peak allocated bytes from torch's CUDA caching allocator."""

    def __init__(self, device: torch.device | int | None = None):
        self.device = torch.device("cuda", torch.cuda.current_device() if device is None else device) \
            if not isinstance(device, torch.device) else device

    def tracking(self) -> ContextManager:
        return contextlib.nullcontext()

    def reset_peak(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak_bytes(self) -> int | None:
        return int(torch.cuda.max_memory_allocated(self.device))

    def peak_reserved_bytes(self) -> int:
        return int(torch.cuda.max_memory_reserved(self.device))

    def alloc_retries(self) -> int:
        return int(torch.cuda.memory_stats(self.device).get("num_alloc_retries", 0))

    def cleanup(self) -> None:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)


def default_meter(device: torch.device) -> MemoryMeter:
    return CudaMeter(device) if device.type == "cuda" else NullMeter()
