"""What device we run on: its identity and capacity (DeviceInfo) and the CUDA memory meter.

GPU identity comes from NVML first, because NVML creates no CUDA context: the free memory it
reports is what the card has before this process takes its own ~0.3-0.6 GiB of context. torch.cuda
is the fallback (it creates a context to answer). The CPU and simulated devices get a DeviceInfo
too, so everything downstream (budget, planner, rendering) handles one type.
"""
from __future__ import annotations

import contextlib
import os
import platform
from typing import TYPE_CHECKING, Any, ContextManager, Iterator, Literal

import torch
from pydantic import BaseModel

from autofit.units import fmt_bytes
from trainer.meter import CudaMeter

if TYPE_CHECKING:  # hardware.py imports this module; only the type is needed here
    from autofit.hardware import HardwareSpec


class DeviceError(RuntimeError):
    """A device problem the user can cause or fix (no GPU, bad index, bad budget). One line."""


class NvmlUnavailable(DeviceError):
    """NVML cannot answer (no library, no driver, no permission, no GPU); torch.cuda may still."""


class DeviceInfo(BaseModel):
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
    source: str  # 'nvml', 'torch.cuda', 'nvml+torch.cuda', 'cpu', 'profile:<slug>'
    note: str = ""

    @property
    def bf16_supported(self) -> bool:
        # bf16 tensor cores start with Ampere (8.0); before that bf16 is emulated and slow.
        if self.kind == "cpu":
            return True
        return self.compute_capability is not None and tuple(self.compute_capability) >= (8, 0)


# ---------------------------------------------------------------------------------------- CPU

# Without --budget, the CPU device may use this share of the RAM available now: the rest is left
# to the OS, the data loader and whatever else runs, so a too-big trial OOMs in our tracker instead
# of getting the process killed by the kernel.
DEFAULT_CPU_BUDGET_SHARE = 0.5


def _cgroup_available_bytes() -> int | None:
    """Memory left under a container's cgroup limit (v2, then v1), or None when unlimited."""
    for limit_path, usage_path in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        try:
            with open(limit_path) as f:
                raw = f.read().strip()
            if raw == "max":
                return None
            limit = int(raw)
            if limit >= 1 << 60:  # cgroup v1 says "unlimited" with a huge number
                return None
            with open(usage_path) as f:
                usage = int(f.read().strip())
            return max(0, limit - usage)
        except (OSError, ValueError):
            continue
    return None


def available_ram_bytes() -> int:
    """RAM this process could still get: MemAvailable, capped by a container's cgroup limit."""
    avail: int | None = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024  # the file says kB and means KiB
                    break
    except (OSError, ValueError, IndexError):
        pass
    if avail is None:
        for pages in ("SC_AVPHYS_PAGES", "SC_PHYS_PAGES"):  # macOS has only the second
            try:
                avail = os.sysconf(pages) * os.sysconf("SC_PAGE_SIZE")
                break
            except (ValueError, OSError, AttributeError):
                continue
    if avail is None:
        raise DeviceError("cannot read the available RAM on this system; pass an explicit --budget")
    cg = _cgroup_available_bytes()
    return min(avail, cg) if cg is not None else avail


def default_cpu_budget() -> int:
    return int(available_ram_bytes() * DEFAULT_CPU_BUDGET_SHARE)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "CPU"


def cpu_info(budget_bytes: int | None = None, used_bytes: int = 0) -> DeviceInfo:
    """The budgeted CPU device: total = the budget; free = the budget minus `used_bytes`."""
    avail = available_ram_bytes()
    if budget_bytes is None:
        budget = int(avail * DEFAULT_CPU_BUDGET_SHARE)
        note = f"budget {fmt_bytes(budget)} = {DEFAULT_CPU_BUDGET_SHARE:.0%} of {fmt_bytes(avail)} RAM available"
    else:
        if budget_bytes <= 0:
            raise DeviceError(f"CPU budget must be positive, got {budget_bytes} bytes")
        budget = int(budget_bytes)
        note = f"budget {fmt_bytes(budget)} of {fmt_bytes(avail)} RAM available"
        if budget > avail:
            note += "; the budget exceeds available RAM, so the OS may swap or kill the run first"
    return DeviceInfo(kind="cpu", name=_cpu_name(), index=None, total_bytes=budget,
                      free_bytes=max(0, budget - used_bytes), used_by_others_bytes=None,
                      compute_capability=None, driver_version=None, cuda_version=None,
                      source="cpu", note=note)


# ---------------------------------------------------------------------------------------- NVML

def _import_pynvml() -> Any:
    # Imported on call, not at module load: the package is optional at runtime (and tests swap it).
    try:
        import pynvml
    except ImportError as e:
        raise NvmlUnavailable(f"the pynvml module cannot be imported ({e}); install nvidia-ml-py") from None
    return pynvml


def _nvml_reason(pynvml: Any, e: BaseException) -> str:
    def is_(cls_name: str) -> bool:
        cls = getattr(pynvml, cls_name, None)
        return isinstance(cls, type) and isinstance(e, cls)

    if is_("NVMLError_LibraryNotFound"):
        return "NVML library (libnvidia-ml) not found, so no NVIDIA driver is installed"
    if is_("NVMLError_DriverNotLoaded"):
        return "the NVIDIA driver is not loaded"
    if is_("NVMLError_NoPermission"):
        return "no permission to query the GPU through NVML"
    return f"NVML error: {e}"


def _text(v: str | bytes) -> str:
    return v.decode(errors="replace") if isinstance(v, bytes) else str(v)


@contextlib.contextmanager
def _nvml() -> Iterator[Any]:
    """An initialised pynvml module; nvmlShutdown always runs (NVML counts init/shutdown pairs)."""
    pynvml = _import_pynvml()
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as e:
        raise NvmlUnavailable(_nvml_reason(pynvml, e)) from None
    try:
        yield pynvml
    except pynvml.NVMLError as e:
        raise NvmlUnavailable(_nvml_reason(pynvml, e)) from None
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError:
            pass


def _nvml_handle(pynvml: Any, index: int) -> Any:
    """NVML handle of CUDA device `index`.

    NVML numbers every GPU in PCI bus order and ignores CUDA_VISIBLE_DEVICES, while CUDA numbers
    only the visible ones, so a CUDA index is mapped through CUDA_VISIBLE_DEVICES here. CUDA's
    default ordering is fastest-first; on a machine with different GPU models set
    CUDA_DEVICE_ORDER=PCI_BUS_ID so both agree.
    """
    count = int(pynvml.nvmlDeviceGetCount())
    if count == 0:
        raise NvmlUnavailable("NVML reports no GPUs")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        entries = [v.strip() for v in visible.split(",") if v.strip()]
        if not entries:
            raise NvmlUnavailable("CUDA_VISIBLE_DEVICES is empty, so no GPU is visible")
        if not 0 <= index < len(entries):
            raise DeviceError(f"GPU index {index} is out of range: CUDA_VISIBLE_DEVICES={visible} "
                              f"makes {len(entries)} GPU(s) visible (indices 0..{len(entries) - 1})")
        entry = entries[index]
        if entry.startswith("MIG-"):
            # The MIG instance's own memory is what counts; torch.cuda reports it, so defer to it.
            raise NvmlUnavailable(f"CUDA_VISIBLE_DEVICES selects MIG instance {entry}")
        if entry.startswith("GPU-"):
            return pynvml.nvmlDeviceGetHandleByUUID(entry)
        try:
            index = int(entry)
        except ValueError:
            raise DeviceError(f"cannot read CUDA_VISIBLE_DEVICES entry {entry!r}") from None
    if not 0 <= index < count:
        raise DeviceError(f"GPU index {index} is out of range: NVML sees {count} GPU(s) "
                          f"(indices 0..{count - 1})")
    return pynvml.nvmlDeviceGetHandleByIndex(index)


def _used_by_others(pynvml: Any, handle: Any) -> int | None:
    """Memory used on this GPU by other processes, or None when NVML cannot say.

    Compute and graphics processes both count (a desktop's display server uses the card too); a
    process listed in both is counted once. usedGpuMemory is None where the driver cannot tell
    (Windows WDDM). Inside a container NVML reports host PIDs, so our own process would be counted
    as "other" once it holds a context: query before touching CUDA.
    """
    me = os.getpid()
    per_pid: dict[int, int | None] = {}
    try:
        for getter in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses"):
            fn = getattr(pynvml, getter, None)
            if fn is None:
                continue
            for p in fn(handle):
                if p.pid != me:
                    per_pid[p.pid] = p.usedGpuMemory
    except pynvml.NVMLError:
        return None
    if any(v is None for v in per_pid.values()):
        return None
    return int(sum(v for v in per_pid.values() if v is not None))


def _mig_enabled(pynvml: Any, handle: Any) -> bool:
    try:
        current, _pending = pynvml.nvmlDeviceGetMigMode(handle)
    except (pynvml.NVMLError, AttributeError):  # NotSupported on GPUs without MIG
        return False
    return current == getattr(pynvml, "NVML_DEVICE_MIG_ENABLE", 1)


def query_nvml(index: int = 0) -> DeviceInfo:
    """GPU `index` as NVML sees it, without creating a CUDA context. Raises NvmlUnavailable."""
    with _nvml() as pynvml:
        handle = _nvml_handle(pynvml, index)
        name = _text(pynvml.nvmlDeviceGetName(handle))
        mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
        try:
            cc: tuple[int, int] | None = tuple(int(x) for x in pynvml.nvmlDeviceGetCudaComputeCapability(handle))  # type: ignore[assignment]
        except pynvml.NVMLError:
            cc = None
        try:
            driver: str | None = _text(pynvml.nvmlSystemGetDriverVersion())
        except pynvml.NVMLError:
            driver = None
        try:
            v = int(pynvml.nvmlSystemGetCudaDriverVersion())  # e.g. 12040 -> "12.4"
            cuda: str | None = f"{v // 1000}.{(v % 1000) // 10}"
        except (pynvml.NVMLError, AttributeError):
            cuda = None
        mig = _mig_enabled(pynvml, handle)
        others = _used_by_others(pynvml, handle)
    note = ""
    if mig:
        note = ("MIG is enabled: NVML's total and free memory are the whole GPU's, not the MIG "
                "instance this process can use; prefer torch.cuda's figures")
    return DeviceInfo(kind="cuda", name=name, index=index, total_bytes=int(mem.total),
                      free_bytes=int(mem.free), used_by_others_bytes=others, compute_capability=cc,
                      driver_version=driver, cuda_version=cuda, mig=mig, source="nvml", note=note)


# ---------------------------------------------------------------------------------------- torch.cuda

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


def _nvml_own_process_bytes(index: int) -> int | None:
    """GPU memory NVML charges to this process, or None (no NVML, or PIDs hidden by a container)."""
    try:
        with _nvml() as pynvml:
            handle = _nvml_handle(pynvml, index)
            for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                if p.pid == os.getpid() and p.usedGpuMemory is not None:
                    return int(p.usedGpuMemory)
    except DeviceError:
        return None
    return None


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
        own = _nvml_own_process_bytes(index)
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


class CudaDevice:
    """A CUDA GPU as a MemoryMeter (trainer.meter protocol) plus identity and capacity controls."""

    def __init__(self, index: int = 0, info: DeviceInfo | None = None):
        self.index = index
        self.torch_device = torch.device("cuda", index)
        self._meter = CudaMeter(self.torch_device)
        self._info = info
        self.memory_cap_bytes: int | None = None

    @property
    def info(self) -> DeviceInfo:
        if self._info is None:
            self._info = detect_gpu(self.index)
        return self._info

    def tracking(self) -> ContextManager:
        return self._meter.tracking()

    def reset_peak(self) -> None:
        self._meter.reset_peak()

    def peak_bytes(self) -> int | None:
        return self._meter.peak_bytes()

    def current_bytes(self) -> int:
        return int(torch.cuda.memory_allocated(self.torch_device))

    def peak_reserved_bytes(self) -> int:
        return self._meter.peak_reserved_bytes()

    def alloc_retries(self) -> int:
        return self._meter.alloc_retries()

    def cleanup(self) -> None:
        self._meter.cleanup()

    def set_memory_cap(self, cap_bytes: int) -> None:
        """Let the caching allocator use at most `cap_bytes`, to emulate a smaller card on a big one.
        The cap limits allocator memory only; the CUDA context comes on top, as on the real card."""
        total = int(torch.cuda.get_device_properties(self.index).total_memory)
        if not 0 < cap_bytes <= total:
            raise DeviceError(f"memory cap {fmt_bytes(cap_bytes)} must be between 0 and the "
                              f"device's {fmt_bytes(total)}")
        torch.cuda.set_per_process_memory_fraction(cap_bytes / total, self.index)
        self.memory_cap_bytes = int(cap_bytes)


# ---------------------------------------------------------------------------------------- simulated

def simulated_info(hw: HardwareSpec) -> DeviceInfo:
    """A hardware profile standing in for a GPU that is not here: estimates only."""
    return DeviceInfo(kind="simulated", name=hw.gpu, index=None, total_bytes=hw.memory_bytes,
                      free_bytes=hw.memory_bytes, used_by_others_bytes=None,
                      compute_capability=hw.compute_capability, driver_version=None,
                      cuda_version=None, source=f"profile:{hw.name}",
                      note="simulated from a hardware profile: figures are estimates, not measurements")
