"""A CUDA GPU as a Device, and the one function that opens it for every caller.

Identity comes from NVML first (autofit.nvml: no CUDA context); torch.cuda is the fallback (it
creates a context to answer). Memory is read from torch's caching allocator (trainer.meter's
CudaMeter). `open_cuda_device` owns what must happen in order before a plan can be trusted:
allocator settings before CUDA starts, identity, the context measurement, an emulation cap.
"""
from __future__ import annotations

import os

import torch

from autofit.device import DeviceError, DeviceInfo
from autofit.nvml import NvmlUnavailable, own_process_bytes, query_nvml
from autofit.units import fmt_bytes
from trainer.meter import CudaMeter

# Trials and training share this allocator setting: with expandable segments, changing the
# micro-batch does not leave the cache fragmented into blocks of the old size.
ALLOC_CONF = "expandable_segments:True"

EMULATE_NOTE = ("emulated: this process is capped (set_per_process_memory_fraction) to the profile's "
                "capacity less the CUDA context; the context and library workspaces differ between cards, "
                "so this approximates the smaller card")


def set_allocator_conf() -> None:
    """Environment for CUDA, set before CUDA initialises (the allocator reads its settings once).
    A user's own setting wins, under either name (PYTORCH_ALLOC_CONF is the newer one).
    CUDA_DEVICE_ORDER=PCI_BUS_ID makes torch's device index agree with NVML's numbering."""
    if "PYTORCH_ALLOC_CONF" not in os.environ and "PYTORCH_CUDA_ALLOC_CONF" not in os.environ:
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = ALLOC_CONF
    os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")


def query_torch_cuda(index: int = 0) -> DeviceInfo:
    """GPU `index` through torch.cuda. This creates a CUDA context on the device (it holds memory
    from now on), which is why it is only the fallback."""
    if not torch.cuda.is_available():
        raise DeviceError("torch.cuda: not available")
    count = torch.cuda.device_count()
    if not 0 <= index < count:
        raise DeviceError(f"GPU index {index} is out of range: torch.cuda sees {count} GPU(s) "
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
    """The GPU to train on: NVML first, torch.cuda when NVML cannot answer (or MIG is on)."""
    try:
        info = query_nvml(index)
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
        return query_torch_cuda(index)
    except DeviceError as e:
        raise DeviceError(f"no NVIDIA GPU found (NVML: {nvml_reason}; {e})") from None


def measure_cuda_context_bytes(index: int = 0, free_before_bytes: int | None = None) -> int | None:
    """GPU memory this process holds outside torch's caching allocator: the CUDA context, loaded
    kernels and library handles. It comes off the budget, since no tensor can use it.

    Best figure: NVML's per-process usage minus torch's reserved bytes. Next: `free_before_bytes`
    (NVML free memory read before CUDA was initialised) minus free now minus reserved. Last:
    total - free - reserved - other processes' use, which also counts the driver's own reservation,
    so it errs high (the safe side for a budget). None when CUDA is unavailable or anything fails.
    """
    if not torch.cuda.is_available():
        return None
    try:
        free, total = torch.cuda.mem_get_info(index)  # creates the context if not yet there
        reserved = int(torch.cuda.memory_reserved(index))
        own = own_process_bytes(index)
        if own is not None:
            return max(0, own - reserved)
        if free_before_bytes is not None:
            return max(0, int(free_before_bytes) - int(free) - reserved)
        try:
            others = query_nvml(index).used_by_others_bytes or 0
        except DeviceError:
            others = 0
        return max(0, int(total) - int(free) - reserved - others)
    except (RuntimeError, OSError):
        return None


class CudaDevice(CudaMeter):
    """A CUDA GPU: the caching-allocator meter (trainer.meter.CudaMeter) plus identity, the
    measured context bytes, and a memory cap for emulating a smaller card."""
    runs_trials = True

    def __init__(self, index: int = 0, info: DeviceInfo | None = None):
        super().__init__(torch.device("cuda", index))
        self.index = index
        self.torch_device = self.device
        self._info = info
        self.context_bytes: int | None = None  # measured by open_cuda_device
        self.memory_cap_bytes: int | None = None

    @property
    def info(self) -> DeviceInfo:
        if self._info is None:
            self._info = detect_gpu(self.index)
        return self._info

    def set_memory_cap(self, cap_bytes: int) -> None:
        """Let the caching allocator use at most `cap_bytes`, to emulate a smaller card on a big one.
        The cap limits allocator memory only; the CUDA context comes on top, as on the real card."""
        total = int(torch.cuda.get_device_properties(self.index).total_memory)
        if not 0 < cap_bytes <= total:
            raise DeviceError(f"memory cap {fmt_bytes(cap_bytes)} must be between 0 and the "
                              f"device's {fmt_bytes(total)}")
        torch.cuda.set_per_process_memory_fraction(cap_bytes / total, self.index)
        self.memory_cap_bytes = int(cap_bytes)

    def spec(self) -> dict:
        return {"kind": "cuda", "memory_cap_bytes": self.memory_cap_bytes}


def open_cuda_device(index: int = 0, *, info: DeviceInfo | None = None,
                     emulate_cap_bytes: int | None = None) -> CudaDevice:
    """The CUDA device for every caller (probe, run --profile, --resume, --no-probe).

    In order: the allocator configuration (before anything can initialise CUDA), the identity
    (NVML first; `info` when the caller already read it), the memory held outside the allocator
    (context_bytes), and, with `emulate_cap_bytes`, a cap to a smaller card's capacity less that
    context. Raises DeviceError when there is no GPU or this torch build has no CUDA.
    """
    from autofit.budget import ASSUMED_CONTEXT_BYTES
    set_allocator_conf()
    info = info or detect_gpu(index)
    if not torch.cuda.is_available():
        raise DeviceError(f"NVML sees {info.name}, but this torch build has no CUDA support "
                          f"(torch {torch.__version__}); install a CUDA build of torch")
    device = CudaDevice(index, info)
    # NVML's free memory was read before our CUDA context existed; torch.cuda's fallback figure
    # was read after, and already excludes it.
    after_init = info.source.startswith("torch.cuda")
    device.context_bytes = 0 if after_init else measure_cuda_context_bytes(index, free_before_bytes=info.free_bytes)
    if emulate_cap_bytes is not None:
        # On the real card the context comes out of its capacity before the allocator gets any.
        ctx = device.context_bytes or ASSUMED_CONTEXT_BYTES
        device.set_memory_cap(max(2**20, emulate_cap_bytes - ctx))
        device._info = info.model_copy(update={"total_bytes": emulate_cap_bytes,
                                               "free_bytes": min(info.free_bytes, emulate_cap_bytes),
                                               "note": EMULATE_NOTE})
    return device
