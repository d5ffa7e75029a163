"""GPU identity and memory through NVML (the `nvidia-ml-py` package, imported as `pynvml`).

NVML creates no CUDA context, so the free memory it reports is what the card has before this
process takes its own ~0.3-0.6 GiB. Every failure becomes NvmlUnavailable (the caller falls back
to torch.cuda) or DeviceError (the user asked for something that is not there).
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator

from autofit.device import DeviceError, DeviceInfo


class NvmlUnavailable(DeviceError):
    """NVML cannot answer (no library, no driver, no permission, no GPU); torch.cuda may still."""


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
def nvml() -> Iterator[Any]:
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


def nvml_handle(pynvml: Any, index: int) -> Any:
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
    with nvml() as pynvml:
        handle = nvml_handle(pynvml, index)
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


def own_process_bytes(index: int) -> int | None:
    """GPU memory NVML charges to this process, or None (no NVML, or PIDs hidden by a container)."""
    try:
        with nvml() as pynvml:
            handle = nvml_handle(pynvml, index)
            for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                if p.pid == os.getpid() and p.usedGpuMemory is not None:
                    return int(p.usedGpuMemory)
    except DeviceError:
        return None
    return None
