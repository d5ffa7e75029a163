"""Memory meters and OOM classification, shared by the trainer and the launcher.

A meter (the MemoryMeter protocol) is what the trainer asks about memory: a context that is active
while training tensors live (`tracking()`), the peak allocated and reserved bytes since
`reset_peak()`, the allocator's retry count, `cleanup()` after an out-of-memory error, OOM
classification, and a `spec()` that says how to reopen the same device on resume. What a meter can
measure is declared in its `capabilities`, never probed with hasattr. The trainer ships two: CUDA
(torch's caching-allocator statistics) and a null meter for an unbudgeted CPU. autofit's devices
(autofit.devices.device.Device) implement the same protocol, the budgeted CPU device among them.
"""
from __future__ import annotations

import contextlib
import gc
from dataclasses import dataclass
from typing import ContextManager, Protocol

import torch

# Out-of-memory errors that do not arrive as torch.OutOfMemoryError, matched case-insensitively
# in a RuntimeError's message. Each is an allocation that failed for want of device memory:
OOM_MESSAGES = (
    "cuda out of memory",  # the caching allocator's own text, seen as a plain RuntimeError from TorchScript
    "cuda error: out of memory",  # cudaErrorMemoryAllocation through C10_CUDA_CHECK (c10/cuda/CUDAException.h)
    "cuda driver error: out of memory",  # CUDA_ERROR_OUT_OF_MEMORY through C10_CUDA_DRIVER_CHECK
    "triton error [cuda]: out of memory",  # Triton's launcher loading a compiled kernel (cuModuleLoadData)
    "cublas_status_alloc_failed",  # cuBLAS could not allocate its handle or workspace
    "cudnn_status_alloc_failed",  # cuDNN could not allocate its handle or workspace
    "hip out of memory",  # the same forms on ROCm builds, where CUDA's names are hipified
    "hip error: out of memory",
    # the plain CPU's allocator (c10/core/impl/alloc_cpu.cpp), a RuntimeError: malloc refused (a
    # ulimit, or memory the machine does not have); it was a traceback from `run --no-probe`
    "defaultcpuallocator: can't allocate memory",
)
# Not in the list, on purpose: CUDNN_STATUS_NOT_SUPPORTED (cuDNN declines a shape or layout; cuDNN
# attention is on by default on Hopper, so it is a real error there, and shrinking would hide it),
# and Triton's "out of resource: shared memory" (a kernel's block config, not device memory).


def is_oom(exc: BaseException) -> bool:
    """True when `exc` means the device ran out of memory: a torch.OutOfMemoryError, or a
    RuntimeError whose message holds one of OOM_MESSAGES, found on `exc` itself or along the
    exceptions it explicitly wraps (at most 16, cycles tolerated). Never raises.

    Explicit wrapping is `raise ... from e` (__cause__) and torch.compile's wrappers: Dynamo's
    BackendCompilerFailed and Inductor's InductorError keep the original as `inner_exception`
    and are raised `from None` (torch/_dynamo/output_graph.py, torch/_inductor/compile_fx.py), so
    __cause__ alone would miss an OOM raised while compiling. __context__ is not followed: Python
    sets it on every exception raised while another is being handled, so a cuDNN error raised
    after an OOM was caught would otherwise count as an OOM."""
    todo, seen = [exc], set()
    while todo and len(seen) < 16:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, torch.OutOfMemoryError):
            return True
        if isinstance(e, RuntimeError):
            try:
                msg = str(e).lower()
            except Exception:  # a broken __str__ must not turn one error into another
                msg = ""
            if any(m in msg for m in OOM_MESSAGES):
                return True
        inner = getattr(e, "inner_exception", None)
        if isinstance(inner, BaseException):
            todo.append(inner)
        if e.__cause__ is not None:
            todo.append(e.__cause__)
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
        """After an OOM or a trial: the tensors go, and so do cuBLAS's workspaces (one per handle
        and stream, 32 MiB each on Hopper, held in the caching allocator until cleared: torch's
        CublasHandlePool.cpp); the next matmul makes them again, inside the step's measured peak."""
        gc.collect()
        clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)  # torch >= 2.0
        if clear is not None:
            clear()
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
