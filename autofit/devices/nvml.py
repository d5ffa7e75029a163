"""GPU identity and memory through NVML (the `nvidia-ml-py` package, imported as `pynvml`).

NVML creates no CUDA context, so the free memory it reports is what the card has before this
process takes its own ~0.3-0.6 GiB. Every failure becomes NvmlUnavailable (the caller falls back
to torch.cuda) or DeviceError (the user asked for something that is not there).
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator

from autofit.devices.device import DeviceError, DeviceInfo
from trainer.errors import counted


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
    """An initialised pynvml module; nvmlShutdown always runs (NVML counts init/shutdown pairs).
    Any NVML failure inside, NVMLLibraryMismatchError (not an NVMLError) included, becomes
    NvmlUnavailable; a DeviceError (the user asked for a GPU that is not there) passes through."""
    pynvml = _import_pynvml()
    try:
        pynvml.nvmlInit()
    except Exception as e:
        raise NvmlUnavailable(_nvml_reason(pynvml, e)) from None
    try:
        yield pynvml
    except DeviceError:
        raise
    except Exception as e:
        raise NvmlUnavailable(_nvml_reason(pynvml, e)) from None
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def _uuid_of(pynvml: Any, handle: Any) -> str:
    return _text(pynvml.nvmlDeviceGetUUID(handle))


def _handle_by_uuid_prefix(pynvml: Any, prefix: str, count: int) -> Any:
    """The one GPU whose NVML UUID starts with `prefix` (CUDA accepts unique prefixes)."""
    matches = [i for i in range(count)
               if _uuid_of(pynvml, pynvml.nvmlDeviceGetHandleByIndex(i)).startswith(prefix)]
    if len(matches) != 1:
        raise NvmlUnavailable(f"CUDA_VISIBLE_DEVICES entry {prefix!r} matches "
                              f"{'no GPU UUID' if not matches else counted(len(matches), 'GPU UUID')}")
    return pynvml.nvmlDeviceGetHandleByIndex(matches[0])


def nvml_handle(pynvml: Any, index: int, uuid: str | None = None) -> Any:
    """NVML handle of CUDA device `index`.

    Best: by the UUID torch reports for that device (`uuid`, from
    torch.cuda.get_device_properties(index).uuid, which needs no CUDA context): it is right
    whatever CUDA_DEVICE_ORDER and CUDA_VISIBLE_DEVICES say. Without it, CUDA_VISIBLE_DEVICES is
    read as CUDA reads it (indices, GPU- UUIDs or unique UUID prefixes) in NVML's PCI order, which
    is CUDA's order only under CUDA_DEVICE_ORDER=PCI_BUS_ID (never forced here: that would change
    what cuda:0 means). Entries this cannot map raise NvmlUnavailable (torch.cuda then answers);
    an index the user asked for that is not there raises DeviceError.
    """
    count = int(pynvml.nvmlDeviceGetCount())
    if count == 0:
        raise NvmlUnavailable("NVML reports no GPUs")
    if uuid:
        if uuid.startswith("MIG-"):
            raise NvmlUnavailable(f"GPU {index} is MIG instance {uuid}")
        return pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        if not 0 <= index < count:
            raise DeviceError(f"GPU index {index} is out of range: NVML sees {counted(count, 'GPU')} "
                              f"(indices 0..{count - 1})")
        return pynvml.nvmlDeviceGetHandleByIndex(index)
    entries = [v.strip() for v in visible.split(",") if v.strip()]
    if not entries:
        raise NvmlUnavailable("CUDA_VISIBLE_DEVICES is empty, so no GPU is visible")
    if not 0 <= index < len(entries):
        raise DeviceError(f"GPU index {index} is out of range: CUDA_VISIBLE_DEVICES={visible} "
                          f"makes {counted(len(entries), 'GPU')} visible (indices 0..{len(entries) - 1})")
    entry = entries[index]
    if entry.startswith("MIG-"):
        # The MIG instance's own memory is what counts; torch.cuda reports it, so defer to it.
        raise NvmlUnavailable(f"CUDA_VISIBLE_DEVICES selects MIG instance {entry}")
    if entry.startswith("GPU-"):
        return _handle_by_uuid_prefix(pynvml, entry, count)
    try:
        nvml_index = int(entry)
    except ValueError:
        raise NvmlUnavailable(f"cannot read CUDA_VISIBLE_DEVICES entry {entry!r}") from None
    if not 0 <= nvml_index < count:
        raise NvmlUnavailable(f"CUDA_VISIBLE_DEVICES entry {nvml_index} is out of range: NVML sees {counted(count, 'GPU')}")
    return pynvml.nvmlDeviceGetHandleByIndex(nvml_index)


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
    except Exception:  # NVMLError, or a library/binding mismatch
        return None
    if any(v is None for v in per_pid.values()):
        return None
    return int(sum(v for v in per_pid.values() if v is not None))


def _mig_enabled(pynvml: Any, handle: Any) -> bool:
    try:
        current, _pending = pynvml.nvmlDeviceGetMigMode(handle)
    except Exception:  # NotSupported on GPUs without MIG, or an older binding
        return False
    return current == getattr(pynvml, "NVML_DEVICE_MIG_ENABLE", 1)


def _memory(pynvml: Any, handle: Any) -> tuple[int, int, int | None]:
    """(total, free, driver-reserved bytes). NVML's v2 memory info reports the memory the driver
    and firmware reserve (not usable by any process); older drivers or bindings have only v1."""
    try:
        m = pynvml.nvmlDeviceGetMemoryInfo(handle, version=pynvml.nvmlMemory_v2)
        return int(m.total), int(m.free), int(m.reserved)
    except Exception:
        m = pynvml.nvmlDeviceGetMemoryInfo(handle)
        return int(m.total), int(m.free), None


def query_nvml(index: int = 0, uuid: str | None = None) -> DeviceInfo:
    """GPU `index` (CUDA numbering; `uuid` from torch when known) as NVML sees it, without creating
    a CUDA context. Raises NvmlUnavailable, or DeviceError for an index that is not there."""
    with nvml() as pynvml:
        handle = nvml_handle(pynvml, index, uuid)
        name = _text(pynvml.nvmlDeviceGetName(handle))
        total, free, reserved = _memory(pynvml, handle)
        try:
            cc: tuple[int, int] | None = tuple(int(x) for x in pynvml.nvmlDeviceGetCudaComputeCapability(handle))  # type: ignore[assignment]
        except Exception:
            cc = None
        try:
            driver: str | None = _text(pynvml.nvmlSystemGetDriverVersion())
        except Exception:
            driver = None
        try:
            v = int(pynvml.nvmlSystemGetCudaDriverVersion())  # e.g. 12040 -> "12.4"
            cuda: str | None = f"{v // 1000}.{(v % 1000) // 10}"
        except Exception:
            cuda = None
        try:
            gpu_uuid: str | None = _uuid_of(pynvml, handle)
        except Exception:
            gpu_uuid = None
        mig = _mig_enabled(pynvml, handle)
        others = _used_by_others(pynvml, handle)
    note = ""
    if mig:
        note = ("MIG is enabled: NVML's total and free memory are the whole GPU's, not the MIG "
                "instance this process can use; prefer torch.cuda's figures")
    return DeviceInfo(kind="cuda", name=name, index=index, total_bytes=total, free_bytes=free,
                      used_by_others_bytes=others, compute_capability=cc, driver_version=driver,
                      cuda_version=cuda, mig=mig, source="nvml", note=note, uuid=gpu_uuid,
                      driver_reserved_bytes=reserved)


def own_process_bytes(index: int, uuid: str | None = None) -> int | None:
    """GPU memory NVML charges to this process, or None: no NVML, or our PID is not in its list
    (in a container NVML reports host PIDs, so the own process cannot be found by PID)."""
    try:
        with nvml() as pynvml:
            handle = nvml_handle(pynvml, index, uuid)
            for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                if p.pid == os.getpid() and p.usedGpuMemory is not None:
                    return int(p.usedGpuMemory)
    except DeviceError:
        return None
    return None
