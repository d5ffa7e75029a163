"""Stage 1 of the GPU self-check (<= 2 min): who the card is, from NVML and from torch, and whether
they agree; what this process holds outside torch's caching allocator (the CUDA context, then
cuBLAS and attention kernels and workspaces); and the cuda-marked tests.  Writes
OUT/stage1_device.json after each step.

    python scripts/selfcheck/stage1_device.py OUT [--dry-run] [--tests-timeout S]

Memory outside the allocator = this process's GPU memory as NVML charges it
(nvmlDeviceGetComputeRunningProcesses, usedGpuMemory) minus torch.cuda.memory_reserved(). Where
NVML does not list our PID (a container's PID namespace), free-before minus free-now minus
reserved is used instead and labelled so (it also counts any other process's change).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Stage, log, tail, stage_args  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
MiB = 2**20


def _text(v) -> str:
    return v.decode(errors="replace") if isinstance(v, bytes) else str(v)


def nvml_devices(pynvml) -> list[dict]:
    """Every GPU NVML sees, read before this process has a CUDA context."""
    out = []
    for i in range(int(pynvml.nvmlDeviceGetCount())):
        h = pynvml.nvmlDeviceGetHandleByIndex(i)
        mem = pynvml.nvmlDeviceGetMemoryInfo(h)
        d = {"nvml_index": i, "name": _text(pynvml.nvmlDeviceGetName(h)), "uuid": _text(pynvml.nvmlDeviceGetUUID(h)),
             "total_bytes": int(mem.total), "free_bytes": int(mem.free), "used_bytes": int(mem.used),
             "compute_capability": list(pynvml.nvmlDeviceGetCudaComputeCapability(h))}
        try:
            d["pci_bus_id"] = _text(pynvml.nvmlDeviceGetPciInfo(h).busId)
        except pynvml.NVMLError as e:
            d["pci_bus_id"] = f"error: {e}"
        try:  # v2 adds the memory the driver keeps for itself (nvml.h, nvmlMemory_v2_t)
            m2 = pynvml.nvmlDeviceGetMemoryInfo(h, version=pynvml.nvmlMemory_v2)
            d["v2_total_bytes"], d["v2_reserved_bytes"] = int(m2.total), int(m2.reserved)
        except (pynvml.NVMLError, AttributeError, TypeError) as e:
            d["v2_error"] = str(e)
        out.append(d)
    return out


def nvml_system(pynvml) -> dict:
    v = int(pynvml.nvmlSystemGetCudaDriverVersion())
    return {"driver_version": _text(pynvml.nvmlSystemGetDriverVersion()), "cuda_driver_api": v,
            "cuda_driver_api_text": f"{v // 1000}.{(v % 1000) // 10}"}


def driver_api_version(cdll=None) -> tuple[int | None, str]:
    """The CUDA driver API version the loaded driver reports (cuDriverGetVersion from libcuda, as
    nvidia-smi's 'CUDA Version'), and how it was read. torch does not expose it (torch._C has no
    _cuda_getDriverVersion on recent builds), so it is asked of libcuda.so.1 through ctypes; no
    CUDA context is made. (None, why) where libcuda cannot be loaded or answers an error."""
    import ctypes
    try:
        lib = (cdll or ctypes.CDLL)("libcuda.so.1")
        v = ctypes.c_int(0)
        rc = lib.cuDriverGetVersion(ctypes.byref(v))
    except (OSError, AttributeError) as e:
        return None, f"libcuda.so.1 not loadable: {e}"
    if rc != 0:
        return None, f"cuDriverGetVersion returned CUresult {rc}"
    return int(v.value), "libcuda.so.1 cuDriverGetVersion (ctypes)"


def torch_device(torch, index: int = 0, cdll=None) -> dict:
    """torch's view of CUDA device `index`; get_device_properties creates no context. The driver
    API version is libcuda's own answer (driver_api_version), compared with NVML's."""
    p = torch.cuda.get_device_properties(index)
    driver_api, driver_how = driver_api_version(cdll)
    return {"index": index, "name": p.name, "total_bytes": int(p.total_memory), "uuid": str(p.uuid),
            "compute_capability": [p.major, p.minor], "multiprocessors": p.multi_processor_count,
            "cuda_driver_api": driver_api, "cuda_driver_api_how": driver_how, "torch": torch.__version__,
            "cuda_build": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
            "device_count": torch.cuda.device_count()}


def _uuid_key(u: str) -> str:
    return u.lower().removeprefix("gpu-")


def compare_identity(nv: dict, system: dict, td: dict) -> list[tuple[str, bool | None, str]]:
    """(check, ok, detail) rows: NVML's device against torch's. Names and UUIDs must match
    exactly; the totals may differ by what the driver keeps for itself (cudaDeviceProp's
    totalGlobalMem against NVML's total), so they must agree within 3%, and the gap is recorded."""
    rows = [("name: NVML and torch agree", nv["name"] == td["name"], f"NVML {nv['name']!r}, torch {td['name']!r}"),
            ("UUID: NVML and torch agree", _uuid_key(nv["uuid"]) == _uuid_key(td["uuid"]),
             f"NVML {nv['uuid']}, torch {td['uuid']}"),
            ("compute capability: NVML and torch agree", list(nv["compute_capability"]) == list(td["compute_capability"]),
             f"NVML {nv['compute_capability']}, torch {td['compute_capability']}")]
    gap = nv["total_bytes"] - td["total_bytes"]
    rows.append(("total memory: NVML and torch within 3%", abs(gap) <= 0.03 * nv["total_bytes"],
                 f"NVML {nv['total_bytes']} B ({nv['total_bytes'] / MiB:.0f} MiB), torch {td['total_bytes']} B "
                 f"({td['total_bytes'] / MiB:.0f} MiB), NVML - torch = {gap / MiB:.0f} MiB"
                 + (f"; NVML v2 reserved {nv['v2_reserved_bytes'] / MiB:.0f} MiB" if "v2_reserved_bytes" in nv else "")))
    if td.get("cuda_driver_api") is None:
        rows.append(("CUDA driver API version: NVML and libcuda agree", None,
                     td.get("cuda_driver_api_how") or "libcuda gave no version"))
    else:
        rows.append(("CUDA driver API version: NVML and libcuda agree", system["cuda_driver_api"] == td["cuda_driver_api"],
                     f"NVML {system['cuda_driver_api']}, torch {td['cuda_driver_api']} (driver {system['driver_version']})"))
    return rows


def own_usage(pynvml, handle, torch, free_before: int, index: int = 0) -> dict:
    """This process's GPU memory outside torch's caching allocator, now (see the module doc)."""
    torch.cuda.synchronize(index)
    reserved = int(torch.cuda.memory_reserved(index))
    free_now = int(pynvml.nvmlDeviceGetMemoryInfo(handle).free)
    own = None
    for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
        if p.pid == os.getpid() and p.usedGpuMemory is not None:
            own = int(p.usedGpuMemory)
    if own is not None:
        return {"reserved_bytes": reserved, "nvml_process_bytes": own, "outside_allocator_bytes": own - reserved,
                "how": "measured: NVML per-process usedGpuMemory minus torch.cuda.memory_reserved"}
    return {"reserved_bytes": reserved, "nvml_process_bytes": None,
            "outside_allocator_bytes": free_before - free_now - reserved,
            "how": "measured: NVML free before CUDA started minus free now minus reserved "
                   "(this PID is not in NVML's process list; other processes' changes count too)"}


def context_and_workspaces(st: Stage, pynvml, handle, torch, free_before: int) -> None:
    """Outside-allocator bytes after CUDA init, after a cuBLAS bf16 matmul, after SDPA fwd+bwd."""
    import torch.nn.functional as F
    dev = torch.device("cuda", 0)
    steps = {}
    torch.ones(1, device=dev)  # creates the primary context, and the allocator's first segment
    steps["context"] = own_usage(pynvml, handle, torch, free_before)
    st.set(outside_allocator=steps)
    allocator_checks(st, torch)
    a = torch.randn(4096, 4096, device=dev, dtype=torch.bfloat16)
    (a @ a).sum().item()  # cuBLAS handle, its workspace (through the caching allocator) and kernels
    steps["after_cublas_matmul"] = own_usage(pynvml, handle, torch, free_before)
    st.set(outside_allocator=steps)
    q, k, v = (torch.randn(4, 12, 1024, 64, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
    steps["after_sdpa_fwd_bwd"] = own_usage(pynvml, handle, torch, free_before)
    st.set(outside_allocator=steps, sdpa_enabled={
        "flash": torch.backends.cuda.flash_sdp_enabled(), "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
        "cudnn": getattr(torch.backends.cuda, "cudnn_sdp_enabled", lambda: None)(),
        "math": torch.backends.cuda.math_sdp_enabled()})
    backends = sdpa_backends(torch, q, k, v)
    st.set(sdpa_backends=backends)
    steps["after_all_sdpa_backends"] = own_usage(pynvml, handle, torch, free_before)  # cuDNN's, efficient's too
    st.set(outside_allocator=steps)
    sdpa_default(st, torch, q, k, v, backends)
    del a, q, k, v
    ctx = steps["context"]["outside_allocator_bytes"]
    total = steps["after_all_sdpa_backends"]["outside_allocator_bytes"]
    st.check("CUDA context measured (outside the allocator, after init)", ctx > 0, f"{ctx / MiB:.0f} MiB; "
             + steps["context"]["how"])
    st.check("context + cuBLAS + SDPA workspaces measured", total >= ctx,
             f"{total / MiB:.0f} MiB outside the allocator after the matmul and SDPA "
             f"(+{(total - ctx) / MiB:.0f} MiB over the bare context)")


# What stages 2-3 run with when the SDPA backend torch picks by default failed here: cuDNN attention
# goes behind flash and memory-efficient (sdp_utils.cpp reads TORCH_CUDNN_SDPA_DEPRIORITIZED in the
# torch versions that prefer cuDNN on Hopper). Only names in this table are ever exported.
SDPA_FALLBACK_ENV = {"CUDNN_ATTENTION": {"TORCH_CUDNN_SDPA_DEPRIORITIZED": "1"}}


def sdpa_choice(torch, q, k, v) -> str:
    """The SDPA backend torch picks for a plain causal call on these tensors (what training runs):
    torch._fused_sdp_choice, named by torch.nn.attention.SDPBackend; 'unknown: why' if it cannot say."""
    try:
        from torch.nn.attention import SDPBackend
        choice = int(torch._fused_sdp_choice(q, k, v, is_causal=True))
        names = {int(v): k for k, v in SDPBackend.__members__.items()}
        return names.get(choice, f"unknown: backend number {choice}")
    except Exception as e:  # noqa: BLE001 - a torch without it: recorded, not fatal
        return f"unknown: {type(e).__name__}: {e}"


def sdpa_default(st: Stage, torch, q, k, v, backends: dict) -> None:
    """Records the default backend (with grad, as training calls it) and, when that backend failed
    at this shape, the environment stages 2-3 run with instead (env_for_later_stages)."""
    chosen = sdpa_choice(torch, q, k, v)
    st.set(sdpa_default=chosen, cudnn_version=torch.backends.cudnn.version())
    result = backends.get(chosen)
    if result is None or result == "ran":
        st.check("the default SDPA backend runs at GPT-2's head shape", result == "ran" or None,
                 f"torch picks {chosen}" + ("" if result == "ran" else "; not among the backends tried"))
        return
    fallback = SDPA_FALLBACK_ENV.get(chosen)
    if fallback:
        st.set(env_for_later_stages=fallback)
    st.check("the default SDPA backend runs at GPT-2's head shape", False,
             f"torch picks {chosen}, which failed ({result}); " + (
                 f"stages 2-3 run with {' '.join(f'{k}={v}' for k, v in fallback.items())}" if fallback
                 else "no fallback for it: stages 2-3 may fail in attention"))


def allocator_checks(st: Stage, torch) -> None:
    """The caching allocator's real settings after its first allocation, against what autofit set
    (autofit.devices.cuda.set_allocator_conf, called before CUDA started): its settings string
    where torch exposes it, and whether any segment is expandable (torch.cuda.memory_snapshot)."""
    from autofit.devices.cuda import allocator_settings
    wanted = allocator_settings()
    getter = getattr(torch._C, "_accelerator_getAllocatorSettings", None)
    try:
        segments = torch.cuda.memory_snapshot()
    except Exception as e:  # noqa: BLE001
        segments, why = None, f"{type(e).__name__}: {e}"
    expandable = None if segments is None else any(seg.get("is_expandable") for seg in segments)
    st.set(allocator={"env": wanted, "settings": str(getter()) if getter else None,
                      "segments": None if segments is None else len(segments), "expandable": expandable})
    if "expandable_segments:true" not in wanted.replace(" ", "").lower():
        st.check("expandable segments on, as autofit sets them", None, f"autofit's setting here is {wanted!r}")
    elif expandable is None:
        st.check("expandable segments on, as autofit sets them", None, f"memory_snapshot failed: {why}")
    else:
        st.check("expandable segments on, as autofit sets them", expandable,
                 f"{wanted!r} set before CUDA started; {len(segments)} segment(s), expandable: {expandable}")


def sdpa_backends(torch, q, k, v) -> dict:
    """Each SDPA backend on its own, causal bf16 fwd+bwd at GPT-2's head shape: which run here.
    A backend that refuses (e.g. cuDNN's NOT_SUPPORTED) is a finding, not a failure."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        return {"error": "torch.nn.attention.sdpa_kernel is missing (torch < 2.3)"}
    import torch.nn.functional as F
    out = {}
    for name in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"):
        backend = getattr(SDPBackend, name, None)
        if backend is None:
            out[name] = "not in this torch"
            continue
        try:
            with sdpa_kernel([backend]):
                F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
            torch.cuda.synchronize()
            out[name] = "ran"
        except Exception as e:  # noqa: BLE001 - record why a backend refused
            out[name] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
    return out


def device_checks(st: Stage) -> None:
    import pynvml
    import torch
    pynvml.nvmlInit()
    try:
        devices = nvml_devices(pynvml)  # before any CUDA context of ours exists
        system = nvml_system(pynvml)
        st.set(nvml_devices=devices, nvml_system=system)
        if not torch.cuda.is_available():
            st.check("torch sees a CUDA GPU", False, f"torch {torch.__version__} (CUDA build {torch.version.cuda}) "
                     f"sees none, NVML sees {len(devices)}")
            return
        td = torch_device(torch, 0)
        st.set(torch_device=td)
        nv = next((d for d in devices if _uuid_key(d["uuid"]) == _uuid_key(td["uuid"])), None)
        if not st.check("torch's cuda:0 found in NVML by UUID", nv is not None, td["uuid"]):
            return
        st.set(card={"name": nv["name"], "total_bytes": nv["total_bytes"], "uuid": nv["uuid"],
                     "compute_capability": nv["compute_capability"], "driver": system["driver_version"],
                     "cuda_driver_api": system["cuda_driver_api_text"], "torch": td["torch"],
                     "cuda_build": td["cuda_build"], "cudnn": td["cudnn"]})
        for name, ok, detail in compare_identity(nv, system, td):
            st.check(name, ok, detail)
        handle = pynvml.nvmlDeviceGetHandleByUUID(nv["uuid"])
        context_and_workspaces(st, pynvml, handle, torch, nv["free_bytes"])
    finally:
        pynvml.nvmlShutdown()


def parse_pytest_summary(text: str) -> dict:
    """Counts from pytest's closing line ('3 passed, 1 skipped, 200 deselected in 4.1s')."""
    counts = {}
    for line in reversed(text.strip().splitlines()):
        found = re.findall(r"(\d+) (passed|failed|skipped|deselected|errors?|xfailed|xpassed)", line)
        if found:
            counts = {k.rstrip("s") if k.startswith("error") else k: int(n) for n, k in found}
            break
    return counts


# One line per failure with its whole message (--tb=line): the record keeps the output's last
# TESTS_TAIL lines, and a full traceback per failure pushed the messages (the cuda-marked op counts
# name every op that differs) out of it; -rN: no summary lines cut to the terminal's width.
PYTEST_ARGS = ["-q", "--tb=line", "-rN", "-p", "no:cacheprovider"]
TESTS_TAIL = 40


def cuda_tests(st: Stage, timeout_s: float, dry_run: bool) -> None:
    cmd = [sys.executable, "-m", "pytest", *PYTEST_ARGS, "-m", "cuda", "tests"]
    log("$ " + " ".join(cmd[2:]))
    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        st.set(cuda_tests={"rc": None, "timed_out_after_s": timeout_s, "tail": tail(out)})
        st.check("cuda-marked tests", False, f"timed out after {timeout_s:.0f} s")
        return
    log(tail(proc.stdout + proc.stderr, TESTS_TAIL))
    counts = parse_pytest_summary(proc.stdout)
    st.set(cuda_tests={"rc": proc.returncode, "counts": counts, "seconds": round(time.monotonic() - t0, 1),
                       "tail": tail(proc.stdout + proc.stderr, TESTS_TAIL)})
    ran = counts.get("passed", 0) + counts.get("failed", 0) + counts.get("error", 0)
    if dry_run and ran == 0:
        st.check("cuda-marked tests", None, f"no GPU: {counts.get('skipped', 0)} collected and skipped (rc {proc.returncode})")
    else:
        st.check("cuda-marked tests", proc.returncode == 0 and ran > 0,
                 f"rc {proc.returncode}, " + ", ".join(f"{n} {k}" for k, n in counts.items()))


def main() -> int:
    a = stage_args(work=False)
    tests_timeout = 75.0 if a.limit is None else max(10.0, a.limit - 30.0)  # identity + context take ~15 s
    st = Stage(a.out, 1, "device", a.dry_run)
    if a.dry_run:
        st.skip("device identity (NVML vs torch)", "dry run: no CUDA device is used")
        st.skip("context and workspace bytes", "dry run: no CUDA device is used")
    else:
        from autofit.devices.cuda import set_allocator_conf
        set_allocator_conf()  # as autofit's own processes do, before CUDA starts: the check is of that
        try:
            device_checks(st)
        except Exception as e:  # noqa: BLE001 - one clear line in the record; the tests still run
            st.check("device identity and context", False, f"{type(e).__name__}: {e}")
    cuda_tests(st, tests_timeout, a.dry_run)
    return st.finish()


if __name__ == "__main__":
    sys.exit(main())
