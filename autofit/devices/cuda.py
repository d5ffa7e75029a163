"""A CUDA GPU as a Device, and the one function that opens it for every caller.

Identity comes from NVML first (autofit.devices.nvml: no CUDA context); torch.cuda is the fallback (it
creates a context to answer). Memory is read from torch's caching allocator (trainer.meter's
CudaMeter). `open_cuda_device` owns what must happen in order before a plan can be trusted:
allocator settings before CUDA starts, identity, the context measurement, an emulation cap.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch

from autofit.devices.device import DeviceError, DeviceInfo
from autofit.devices.nvml import NvmlUnavailable, own_process_bytes, query_nvml
from autofit.units import fmt_bytes
from trainer.meter import CudaMeter
from trainer.errors import counted

# Trials and training share this allocator setting: with expandable segments, changing the
# micro-batch does not leave the cache fragmented into blocks of the old size.
ALLOC_CONF = "expandable_segments:True"

EMULATE_NOTE = ("emulated: this process is capped (set_per_process_memory_fraction) to the profile's "
                "capacity less the CUDA context; the context and library workspaces differ between cards, "
                "so this approximates the smaller card")


def allocator_env_name(torch_version: str | None = None) -> str:
    """The allocator-settings variable the installed torch reads. torch 2.8 renamed
    PYTORCH_CUDA_ALLOC_CONF to PYTORCH_ALLOC_CONF (the old name warns), but 2.9.x ignores
    expandable_segments under the new name (pytorch/pytorch#183387; fixed in 2.11): older torch
    gets the old name."""
    version = torch_version or torch.__version__
    try:
        major, minor = (int(v) for v in version.split("+")[0].split(".")[:2])
    except ValueError:
        return "PYTORCH_ALLOC_CONF"
    return "PYTORCH_ALLOC_CONF" if (major, minor) >= (2, 11) else "PYTORCH_CUDA_ALLOC_CONF"


def set_allocator_conf() -> str:
    """Sets the allocator environment before CUDA initialises (the allocator reads it once) and
    returns the settings in force. A user's own setting wins, under either name. Device order is
    left alone: forcing CUDA_DEVICE_ORDER would change what cuda:0 means to the user's other
    tools; NVML is matched to torch's devices by UUID instead."""
    for name in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF"):
        if name in os.environ:
            return os.environ[name]
    os.environ[allocator_env_name()] = ALLOC_CONF
    return ALLOC_CONF


def allocator_settings() -> str:
    """The allocator settings this process runs with (for plan fingerprints); '' for torch's
    defaults."""
    for name in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF"):
        if name in os.environ:
            return os.environ[name]
    return ""


def torch_uuid(index: int) -> str | None:
    """The UUID torch reports for CUDA device `index` (no CUDA context needed), or None when this
    torch has no CUDA or cannot say."""
    try:
        if not torch.cuda.is_available():
            return None
        return str(torch.cuda.get_device_properties(index).uuid)
    except Exception:
        return None


def query_torch_cuda(index: int = 0) -> DeviceInfo:
    """GPU `index` through torch.cuda. This creates a CUDA context on the device (it holds memory
    from now on), which is why it is only the fallback."""
    if not torch.cuda.is_available():
        raise DeviceError("torch.cuda: not available")
    count = torch.cuda.device_count()
    if not 0 <= index < count:
        raise DeviceError(f"GPU index {index} is out of range: torch.cuda sees {counted(count, 'GPU')} "
                          f"(indices 0..{count - 1})")
    props = torch.cuda.get_device_properties(index)
    free, total = torch.cuda.mem_get_info(index)
    return DeviceInfo(kind="cuda", name=props.name, index=index, total_bytes=int(total),
                      free_bytes=int(free), used_by_others_bytes=None,
                      compute_capability=(props.major, props.minor), driver_version=None,
                      cuda_version=torch.version.cuda, source="torch.cuda",
                      note="read through torch.cuda: this process's CUDA context already takes "
                           "part of the memory it reports as used")


def detect_gpu(index: int = 0) -> DeviceInfo:
    """The GPU to train on: NVML first (matched to torch's device by UUID), torch.cuda when NVML
    cannot answer or MIG is on; the note then says why, in one line. Raises DeviceError when
    neither finds the GPU."""
    try:
        info = query_nvml(index, torch_uuid(index))
    except NvmlUnavailable as e:
        nvml_reason = str(e)
    else:
        if info.mig and torch.cuda.is_available():
            try:
                t = query_torch_cuda(index)
            except DeviceError:
                return info
            return info.model_copy(update={
                "total_bytes": t.total_bytes, "free_bytes": t.free_bytes, "source": "nvml+torch.cuda",
                "note": "MIG is enabled: memory figures are the MIG instance's, read through torch.cuda"})
        return info
    try:
        info = query_torch_cuda(index)
    except DeviceError as e:
        raise DeviceError(f"no NVIDIA GPU found (NVML: {nvml_reason}; {e})") from None
    return info.model_copy(update={"note": f"NVML could not answer ({nvml_reason}), so torch.cuda did; "
                                           f"its figures already include this process's CUDA context"})


def measure_cuda_context_bytes(index: int = 0, free_before_bytes: int | None = None,
                               others_before_bytes: int | None = None, uuid: str | None = None) -> int | None:
    """GPU memory this process holds outside torch's caching allocator: the CUDA context, loaded
    kernels and library workspaces (cuBLAS, cuDNN, Triton). It comes off the budget, since no
    tensor can use it.

    Best figure: NVML's use by this process minus torch's reserved bytes. In a container NVML
    lists host PIDs and our own process is not found; then `free_before_bytes` (NVML free memory
    read before CUDA was initialised) minus free now minus reserved; last, total - free - reserved
    - `others_before_bytes` (other processes' use read before CUDA started: read now, our own
    process would be among the "others"). The last errs high (the driver's own reservation
    counts), the safe side for a budget. None when CUDA is unavailable or anything fails.
    """
    if not torch.cuda.is_available():
        return None
    try:
        free, total = torch.cuda.mem_get_info(index)  # creates the context if not yet there
        reserved = int(torch.cuda.memory_reserved(index))
        own = own_process_bytes(index, uuid)
        if own is not None:
            return max(0, own - reserved)
        if free_before_bytes is not None:
            return max(0, int(free_before_bytes) - int(free) - reserved)
        return max(0, int(total) - int(free) - reserved - int(others_before_bytes or 0))
    except (RuntimeError, OSError):
        return None


class CudaDevice(CudaMeter):
    """A CUDA GPU: the caching-allocator meter (trainer.meter.CudaMeter) plus identity, the
    measured memory outside the allocator, and a memory cap (to emulate a smaller card, and to
    keep probe trials inside the budget)."""
    runs_trials = True

    def __init__(self, index: int = 0, info: DeviceInfo | None = None):
        super().__init__(torch.device("cuda", index))
        self.index = index
        self.torch_device = self.device
        self._info = info
        self.context_bytes: int | None = None  # measured by open_cuda_device
        self.memory_cap_bytes: int | None = None
        self._open_free: int | None = None  # free and reserved bytes right after the context existed
        self._open_reserved = 0

    @property
    def info(self) -> DeviceInfo:
        if self._info is None:
            self._info = detect_gpu(self.index)
        return self._info

    def total_memory_bytes(self) -> int:
        return int(torch.cuda.get_device_properties(self.index).total_memory)

    def set_memory_cap(self, cap_bytes: int | None) -> None:
        """Let the caching allocator reserve at most `cap_bytes` (None: the whole card), through
        torch.cuda.set_per_process_memory_fraction. The cap limits allocator memory only; the CUDA
        context comes on top, as on a real card of that size. Raises DeviceError outside
        (0, total]."""
        total = self.total_memory_bytes()
        if cap_bytes is not None and not 0 < cap_bytes <= total:
            raise DeviceError(f"memory cap {fmt_bytes(cap_bytes)} must be between 0 and the "
                              f"device's {fmt_bytes(total)}")
        torch.cuda.set_per_process_memory_fraction(1.0 if cap_bytes is None else cap_bytes / total, self.index)
        self.memory_cap_bytes = None if cap_bytes is None else int(cap_bytes)

    @contextlib.contextmanager
    def limited_to(self, limit_bytes: int) -> Iterator[None]:
        """While probing: the allocator may reserve at most `limit_bytes` (never more than an
        emulation cap already set), so an over-budget candidate fails in its first step instead of
        taking memory the desktop or another process holds. The previous cap comes back after."""
        before = self.memory_cap_bytes
        self.set_memory_cap(min(limit_bytes, before or limit_bytes, self.total_memory_bytes()))
        try:
            yield
        finally:
            self.set_memory_cap(before)

    def limit_bytes(self) -> int | None:
        return self.memory_cap_bytes or self.total_memory_bytes()

    def refresh_context(self) -> int | None:
        """Measures the memory outside the allocator again (after a trial, cuBLAS/cuDNN/Triton
        workspaces exist that did not at open): NVML's use by this process minus reserved, or,
        where NVML cannot find our PID, the context at open plus the fall in free memory that
        reserved bytes do not explain. Returns (and keeps) the new figure."""
        own = own_process_bytes(self.index, self.info.uuid)
        reserved = int(torch.cuda.memory_reserved(self.index))
        if own is not None:
            self.context_bytes = max(0, own - reserved)
        elif self._open_free is not None:
            free, _ = torch.cuda.mem_get_info(self.index)
            grown = (self._open_free - int(free)) - (reserved - self._open_reserved)
            self.context_bytes = (self.context_bytes or 0) + max(0, grown)
        return self.context_bytes

    def allocator_state(self) -> dict:
        """The caching allocator's real state, not the environment variable that asked for it
        (torch 2.9 ignored expandable_segments under PYTORCH_ALLOC_CONF: pytorch#183387): the
        settings in force and whether its segments are expandable (torch.cuda.memory_snapshot,
        after a 1-element allocation so that a segment exists; None when torch cannot say)."""
        torch.empty(1, device=self.device)  # its segment stays cached for training to reuse
        try:
            expandable = any(seg.get("is_expandable") for seg in torch.cuda.memory_snapshot())
        except Exception:  # noqa: BLE001 - an allocator without snapshots: unknown, not an error
            expandable = None
        return {"settings": allocator_settings() or "default", "expandable_segments": expandable}

    def spec(self) -> dict:
        return {"kind": "cuda", "memory_cap_bytes": self.memory_cap_bytes}


def open_cuda_device(index: int = 0, *, info: DeviceInfo | None = None,
                     emulate_usable_bytes: int | None = None, emulate_how: str | None = None) -> CudaDevice:
    """The CUDA device for every caller (probe, run --profile, --resume, --no-probe).

    In order: the allocator configuration (before anything can initialise CUDA), the identity
    (NVML first, matched by UUID; `info` when the caller already read it), torch.cuda.set_device
    (so nothing lands on GPU 0 when another index is asked), the memory held outside the
    allocator (context_bytes), and, with `emulate_usable_bytes` (a smaller card's total less its
    driver-reserved memory; `emulate_how` says where that figure came from, for the budget's label),
    a cap to that less the context. Raises DeviceError when there is no
    GPU at that index or this torch build has no CUDA.
    """
    from autofit.devices.info import ASSUMED_CONTEXT_BYTES
    set_allocator_conf()
    info = info or detect_gpu(index)
    if not torch.cuda.is_available():
        raise DeviceError(f"NVML sees {info.name}, but this torch build has no CUDA support "
                          f"(torch {torch.__version__}); install a CUDA build of torch")
    if not 0 <= index < torch.cuda.device_count():
        raise DeviceError(f"GPU index {index} is out of range: torch.cuda sees {counted(torch.cuda.device_count(), 'GPU')}")
    torch.cuda.set_device(index)
    device = CudaDevice(index, info)
    # NVML's free memory was read before our CUDA context existed; torch.cuda's fallback figure
    # was read after, and already excludes it.
    if info.source.startswith("torch.cuda"):
        device.context_bytes = 0
    else:
        device.context_bytes = measure_cuda_context_bytes(index, free_before_bytes=info.free_bytes,
                                                          others_before_bytes=info.used_by_others_bytes,
                                                          uuid=info.uuid)
    device._open_free = int(torch.cuda.mem_get_info(index)[0])
    device._open_reserved = int(torch.cuda.memory_reserved(index))
    if emulate_usable_bytes is not None:
        # On the real card the context comes out of its usable memory before the allocator gets any.
        ctx = device.context_bytes or ASSUMED_CONTEXT_BYTES
        device.set_memory_cap(max(2**20, emulate_usable_bytes - ctx))
        how = emulate_how or "the emulated card's capacity less its driver-reserved memory"
        device._info = info.model_copy(update={"total_bytes": emulate_usable_bytes,
                                               "free_bytes": min(info.free_bytes, emulate_usable_bytes),
                                               "free_how": f"from a profile: {how} (emulated; this GPU's "
                                                           f"NVML free memory only caps it)",
                                               "note": EMULATE_NOTE + (f"; {info.note}" if info.note else "")})
    return device
