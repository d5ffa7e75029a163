import os
import sys
import types
from types import SimpleNamespace

import pytest
import torch

import autofit.devices.cpu as cpu
import autofit.devices.cuda as cuda
from autofit.devices.cpu import cpu_info
from autofit.devices.cuda import CudaDevice, detect_gpu
from autofit.devices.device import DeviceError, DeviceInfo
from autofit.devices.nvml import NvmlUnavailable, query_nvml
from autofit.units import GiB, MiB

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")


class NVMLError(Exception):
    pass


class NVMLError_LibraryNotFound(NVMLError):
    pass


class NVMLError_DriverNotLoaded(NVMLError):
    pass


class NVMLError_NoPermission(NVMLError):
    pass


class NVMLError_NotSupported(NVMLError):
    pass


class NVMLLibraryMismatchError(Exception):  # pynvml's: not an NVMLError subclass
    pass


def fake_pynvml(gpus=(), init_error=None, procs=None, mig=False, name_bytes=False, mismatch=False):
    """A stand-in for the pynvml module with the same function names and error classes."""
    m = types.ModuleType("pynvml")
    m.NVMLError = NVMLError
    m.NVMLError_LibraryNotFound = NVMLError_LibraryNotFound
    m.NVMLError_DriverNotLoaded = NVMLError_DriverNotLoaded
    m.NVMLError_NoPermission = NVMLError_NoPermission
    m.NVMLError_NotSupported = NVMLError_NotSupported
    m.NVML_DEVICE_MIG_ENABLE = 1
    m.calls = {"init": 0, "shutdown": 0}

    def nvmlInit():
        m.calls["init"] += 1
        if init_error:
            raise init_error()

    def nvmlShutdown():
        m.calls["shutdown"] += 1

    def get_mig(h):
        if not mig:
            raise NVMLError_NotSupported()
        return [1, 1]

    def get_procs(h):
        if procs is None:
            raise NVMLError_NoPermission()
        return [SimpleNamespace(pid=p, usedGpuMemory=b) for p, b in procs]

    m.nvmlInit = nvmlInit
    m.nvmlShutdown = nvmlShutdown
    m.nvmlDeviceGetCount = lambda: len(gpus)
    m.nvmlDeviceGetHandleByIndex = lambda i: gpus[i]
    m.nvmlDeviceGetName = lambda h: h["name"].encode() if name_bytes else h["name"]
    m.nvmlMemory_v2 = 0x02000028

    def get_memory(h, version=None):
        if mismatch:
            raise NVMLLibraryMismatchError("Unversioned function called and the pyNVML version does not match")
        if version is not None and "reserved" not in h:
            raise NVMLError_NotSupported()  # an older driver: v1 only
        return SimpleNamespace(total=h["total"], free=h["free"], used=h["total"] - h["free"],
                               **({"reserved": h["reserved"]} if version is not None else {}))

    def by_uuid(u):
        u = u.decode() if isinstance(u, bytes) else u
        for g in gpus:
            if g["uuid"] == u:
                return g
        raise NVMLError("Not Found")

    m.nvmlDeviceGetMemoryInfo = get_memory
    m.nvmlDeviceGetUUID = lambda h: h["uuid"]
    m.nvmlDeviceGetHandleByUUID = by_uuid
    m.nvmlDeviceGetCudaComputeCapability = lambda h: h["cc"]
    m.nvmlSystemGetDriverVersion = lambda: b"550.54.15" if name_bytes else "550.54.15"
    m.nvmlSystemGetCudaDriverVersion = lambda: 12040
    m.nvmlDeviceGetMigMode = get_mig
    m.nvmlDeviceGetComputeRunningProcesses = get_procs
    m.nvmlDeviceGetGraphicsRunningProcesses = lambda h: []
    return m


RTX4070 = {"name": "NVIDIA GeForce RTX 4070", "total": 12282 * MiB, "free": 11 * GiB, "cc": (8, 9),
           "uuid": "GPU-5a1c0f2e-1111-2222-3333-444455556666", "reserved": 300 * MiB}
A100 = {"name": "NVIDIA A100-SXM4-80GB", "total": 81920 * MiB, "free": 80 * GiB, "cc": (8, 0),
        "uuid": "GPU-5a9b7d00-aaaa-bbbb-cccc-ddddeeeeffff"}


@pytest.fixture
def nvml(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)

    def install(**kw):
        m = fake_pynvml(**kw)
        monkeypatch.setitem(sys.modules, "pynvml", m)
        return m
    return install


@pytest.mark.parametrize("name_bytes", [False, True])
def test_normal_gpu(nvml, name_bytes):
    m = nvml(gpus=[RTX4070], procs=[(4242, 300 * MiB), (os.getpid(), 100 * MiB), (77, 50 * MiB)],
             name_bytes=name_bytes)
    info = query_nvml(0)
    assert info.kind == "cuda" and info.source == "nvml"
    assert info.name == "NVIDIA GeForce RTX 4070"
    assert info.total_bytes == 12282 * MiB and info.free_bytes == 11 * GiB
    assert info.compute_capability == (8, 9) and info.bf16_supported
    assert info.driver_version == "550.54.15" and info.cuda_version == "12.4"
    assert info.used_by_others_bytes == 350 * MiB  # our own process is not "others"
    assert info.mig is False
    assert m.calls == {"init": 1, "shutdown": 1}


def test_used_by_others_unknown(nvml):
    nvml(gpus=[RTX4070], procs=None)  # the process list needs permissions we lack
    assert query_nvml(0).used_by_others_bytes is None
    nvml(gpus=[RTX4070], procs=[(4242, None)])  # Windows WDDM cannot say
    assert query_nvml(0).used_by_others_bytes is None


def test_library_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` fail
    with pytest.raises(NvmlUnavailable, match="nvidia-ml-py"):
        query_nvml(0)


@pytest.mark.parametrize("err,text", [
    (NVMLError_LibraryNotFound, "no NVIDIA driver is installed"),
    (NVMLError_DriverNotLoaded, "driver is not loaded"),
    (NVMLError_NoPermission, "no permission"),
])
def test_init_errors(nvml, err, text):
    m = nvml(gpus=[RTX4070], init_error=err)
    with pytest.raises(NvmlUnavailable, match=text):
        query_nvml(0)
    assert m.calls["shutdown"] == 0  # never initialised, nothing to shut down


def test_zero_gpus(nvml):
    m = nvml(gpus=[])
    with pytest.raises(NvmlUnavailable, match="no GPUs"):
        query_nvml(0)
    assert m.calls == {"init": 1, "shutdown": 1}


def test_bad_index_lists_count(nvml):
    m = nvml(gpus=[RTX4070, A100])
    with pytest.raises(DeviceError, match=r"index 5 is out of range: NVML sees 2 GPUs \(indices 0..1\)") as e:
        query_nvml(5)
    assert not isinstance(e.value, NvmlUnavailable)  # a user error, not a reason to try torch.cuda
    assert m.calls["shutdown"] == 1
    assert query_nvml(1).name == "NVIDIA A100-SXM4-80GB"


def test_cuda_visible_devices_maps_index(nvml, monkeypatch):
    nvml(gpus=[RTX4070, A100])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    info = query_nvml(0)  # CUDA's device 0 is NVML's device 1
    assert info.name == "NVIDIA A100-SXM4-80GB" and info.index == 0
    with pytest.raises(DeviceError, match="makes 1 GPU"):
        query_nvml(1)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(NvmlUnavailable, match="empty"):
        query_nvml(0)


def test_mig(nvml):
    nvml(gpus=[A100], procs=[], mig=True)
    info = query_nvml(0)
    assert info.mig is True
    assert "MIG" in info.note and "torch.cuda" in info.note


def test_detect_gpu_without_any_gpu(nvml, monkeypatch):
    nvml(gpus=[RTX4070], init_error=NVMLError_DriverNotLoaded)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError) as e:
        detect_gpu(0)
    assert str(e.value) == ("no NVIDIA GPU found (NVML: the NVIDIA driver is not loaded; "
                            "torch.cuda: not available)")


def test_detect_gpu_prefers_nvml(nvml):
    nvml(gpus=[RTX4070], procs=[])
    assert detect_gpu(0).source == "nvml"


def test_bf16_supported():
    base = dict(name="x", index=0, total_bytes=1, free_bytes=1, used_by_others_bytes=None,
                driver_version=None, cuda_version=None, source="t")
    assert not DeviceInfo(kind="cuda", compute_capability=(7, 5), **base).bf16_supported
    assert DeviceInfo(kind="simulated", compute_capability=(8, 0), **base).bf16_supported
    assert DeviceInfo(kind="cpu", compute_capability=None, **base).bf16_supported


def test_cpu_info():
    info = cpu_info(2 * GiB)
    assert info.kind == "cpu" and info.total_bytes == info.free_bytes == 2 * GiB and info.source == "cpu"
    default = cpu_info(None)
    avail = cpu.available_ram_bytes()
    # Half of what is available, give or take what other processes did in between.
    assert abs(default.total_bytes - avail * cpu.DEFAULT_CPU_BUDGET_SHARE) < 0.1 * avail
    assert "50%" in default.note
    # rounded down to a whole GiB (64 MiB below 2 GiB): a profile's name survives a little drift (t7's M3)
    assert cpu.default_cpu_budget(23 * GiB + 300 * MiB) == cpu.default_cpu_budget(22 * GiB + 900 * MiB) == 11 * GiB
    assert cpu.default_cpu_budget(3 * GiB + 100 * MiB) == 1 * GiB + 512 * MiB and cpu.default_cpu_budget(100 * MiB) == 50 * MiB
    with pytest.raises(DeviceError):
        cpu_info(0)


def test_available_ram_respects_cgroup_limit(monkeypatch):
    monkeypatch.setattr(cpu, "_cgroup_available_bytes", lambda: 1 * MiB)
    assert cpu.available_ram_bytes() == 1 * MiB


def test_measure_context_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cuda.measure_cuda_context_bytes(0) is None


@pytest.mark.cuda
@needs_cuda
def test_real_gpu():
    info = detect_gpu(0)
    assert info.kind == "cuda" and info.total_bytes > info.free_bytes > 0
    dev = CudaDevice(0, info)
    dev.reset_peak()
    x = torch.empty(64 * MiB, dtype=torch.uint8, device=dev.torch_device)
    assert dev.peak_bytes() >= 64 * MiB and dev.current_bytes() >= 64 * MiB
    assert dev.peak_reserved_bytes() >= dev.peak_bytes()
    ctx = cuda.measure_cuda_context_bytes(0)
    assert ctx is not None and 50 * MiB < ctx < 4 * GiB
    del x
    dev.cleanup()
    assert dev.alloc_retries() >= 0


@pytest.mark.cuda
@needs_cuda
def test_memory_cap_emulates_smaller_card():
    dev = CudaDevice(0)
    dev.cleanup()
    dev.set_memory_cap(1 * GiB)
    try:
        with pytest.raises(torch.OutOfMemoryError):
            torch.empty(2 * GiB, dtype=torch.uint8, device=dev.torch_device)
        with pytest.raises(DeviceError):
            dev.set_memory_cap(0)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, 0)
        dev.cleanup()


def _torch_info(total, free):
    return DeviceInfo(kind="cuda", name="NVIDIA A100-SXM4-80GB MIG 1g.10gb", index=0, total_bytes=total,
                      free_bytes=free, used_by_others_bytes=None, compute_capability=(8, 0),
                      driver_version=None, cuda_version="12.4", source="torch.cuda")


def test_detect_gpu_falls_back_to_torch_cuda(nvml, monkeypatch):
    nvml(gpus=[], init_error=NVMLError_NoPermission)
    monkeypatch.setattr(cuda, "query_torch_cuda", lambda i: _torch_info(10 * GiB, 9 * GiB))
    assert detect_gpu(0).source == "torch.cuda"


def test_detect_gpu_with_mig_takes_torch_memory_figures(nvml, monkeypatch):
    nvml(gpus=[A100], procs=[], mig=True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cuda, "query_torch_cuda", lambda i: _torch_info(10 * GiB, 9 * GiB))
    info = detect_gpu(0)
    assert info.mig and info.source == "nvml+torch.cuda"
    assert (info.total_bytes, info.free_bytes) == (10 * GiB, 9 * GiB)
    assert info.name == "NVIDIA A100-SXM4-80GB" and info.driver_version == "550.54.15"


# ---------------------------------------------------------------- NVML <-> torch matching (issue 8)

def test_torch_uuid_picks_the_nvml_device_whatever_the_order(nvml, monkeypatch):
    nvml(gpus=[RTX4070, A100], procs=[])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")  # says RTX 4070 first, in NVML's PCI order...
    # ...but torch (fastest first, its default order) calls the A100 device 0: the UUID decides
    monkeypatch.setattr(cuda, "torch_uuid", lambda i: A100["uuid"].removeprefix("GPU-") if i == 0 else None)
    info = detect_gpu(0)
    assert info.name == "NVIDIA A100-SXM4-80GB" and info.uuid == A100["uuid"] and info.index == 0


def test_uuid_and_uuid_prefix_in_cuda_visible_devices(nvml, monkeypatch):
    nvml(gpus=[RTX4070, A100], procs=[])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", A100["uuid"])
    assert query_nvml(0).name == "NVIDIA A100-SXM4-80GB"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-5a9b")  # a unique prefix, as CUDA accepts
    assert query_nvml(0).name == "NVIDIA A100-SXM4-80GB"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-5a")  # ambiguous: both UUIDs start so
    with pytest.raises(NvmlUnavailable, match="matches 2"):
        query_nvml(0)


@pytest.mark.parametrize("visible,text", [("abc", "cannot read"), ("7", "out of range"), ("GPU-ffff", "matches no")])
def test_visible_device_entries_nvml_cannot_map_fall_back_to_torch(nvml, monkeypatch, visible, text):
    nvml(gpus=[RTX4070], procs=[])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    with pytest.raises(NvmlUnavailable, match=text):
        query_nvml(0)
    monkeypatch.setattr(cuda, "query_torch_cuda", lambda i: _torch_info(10 * GiB, 9 * GiB))
    info = detect_gpu(0)  # torch.cuda answers, and the note says why, in one line
    assert info.source == "torch.cuda" and text in info.note and "\n" not in info.note


def test_library_mismatch_is_nvml_trouble_not_a_traceback(nvml, monkeypatch):
    nvml(gpus=[RTX4070], procs=[], mismatch=True)
    with pytest.raises(NvmlUnavailable, match="does not match"):
        query_nvml(0)
    monkeypatch.setattr(cuda, "query_torch_cuda", lambda i: _torch_info(10 * GiB, 9 * GiB))
    assert detect_gpu(0).source == "torch.cuda"


def test_driver_reserved_memory_from_nvml_v2(nvml):
    nvml(gpus=[RTX4070, A100], procs=[])
    assert query_nvml(0).driver_reserved_bytes == 300 * MiB
    assert query_nvml(1).driver_reserved_bytes is None  # v1 only: not known, never made up


def test_allocator_variable_follows_the_installed_torch(monkeypatch):
    assert cuda.allocator_env_name("2.13.0+cpu") == "PYTORCH_ALLOC_CONF"
    assert cuda.allocator_env_name("2.11.0") == "PYTORCH_ALLOC_CONF"
    # 2.9 reads the new name but ignores expandable_segments under it (pytorch#183387)
    assert cuda.allocator_env_name("2.9.1") == "PYTORCH_CUDA_ALLOC_CONF"
    assert cuda.allocator_env_name("2.4.0") == "PYTORCH_CUDA_ALLOC_CONF"
    for name in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF", "CUDA_DEVICE_ORDER"):
        monkeypatch.setenv(name, "x")  # so that monkeypatch restores the original state afterwards,
        monkeypatch.delenv(name)  # whatever set_allocator_conf writes
    assert cuda.set_allocator_conf() == cuda.ALLOC_CONF
    assert os.environ[cuda.allocator_env_name()] == cuda.ALLOC_CONF
    assert "CUDA_DEVICE_ORDER" not in os.environ  # never forced: it would change what cuda:0 means
    monkeypatch.delenv(cuda.allocator_env_name())
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "backend:cudaMallocAsync")  # the user's own wins
    assert cuda.set_allocator_conf() == "backend:cudaMallocAsync"
    assert cuda.allocator_settings() == "backend:cudaMallocAsync"
    assert "PYTORCH_ALLOC_CONF" not in os.environ


class FakeCuda:
    """torch.cuda as far as open_cuda_device uses it, for a machine with no GPU."""

    def __init__(self, monkeypatch, total=80 * GiB, free_after_init=70 * GiB, reserved=0, count=2):
        self.calls = []
        self.free, self.total, self.reserved = free_after_init, total, reserved
        self.fraction = 1.0
        for name, fn in {"is_available": lambda: True, "device_count": lambda: count,
                         "set_device": lambda i: self.calls.append(("set_device", i)),
                         "mem_get_info": lambda i=None: (self.free, self.total),
                         "memory_reserved": lambda i=None: self.reserved,
                         "get_device_properties": lambda i: SimpleNamespace(total_memory=self.total),
                         "set_per_process_memory_fraction": self._fraction}.items():
            monkeypatch.setattr(torch.cuda, name, fn)

    def _fraction(self, f, i=None):
        self.fraction = f
        self.calls.append(("fraction", round(f, 6), i))


def _nvml_info(**over):
    base = dict(kind="cuda", name="NVIDIA H100 80GB HBM3", index=1, total_bytes=80 * GiB, free_bytes=79 * GiB,
                used_by_others_bytes=2 * GiB, compute_capability=(9, 0), driver_version="580", cuda_version="13.0",
                source="nvml", uuid="GPU-1234")
    return DeviceInfo(**{**base, **over})


def test_open_cuda_device_sets_the_device_and_measures_the_context(monkeypatch):
    fake = FakeCuda(monkeypatch, free_after_init=78 * GiB)
    monkeypatch.setattr(cuda, "own_process_bytes", lambda i, u=None: None)  # a container: our PID is hidden
    dev = cuda.open_cuda_device(1, info=_nvml_info())
    assert ("set_device", 1) in fake.calls  # nothing lands on GPU 0 when GPU 1 is asked
    assert dev.context_bytes == 1 * GiB  # free before init - free after - reserved
    # after a trial, workspaces appear outside the allocator: 512 MiB more gone, 256 MiB of it reserved
    fake.free, fake.reserved = 78 * GiB - 512 * MiB, 256 * MiB
    assert dev.refresh_context() == 1 * GiB + 256 * MiB
    with pytest.raises(DeviceError, match="out of range"):
        cuda.open_cuda_device(5, info=_nvml_info())


def test_every_budget_term_says_measured_assumed_or_from_a_profile_under_emulation_too(monkeypatch):
    from autofit.planning.budget import compute_budget, device_budget
    FakeCuda(monkeypatch, free_after_init=78 * GiB)
    monkeypatch.setattr(cuda, "own_process_bytes", lambda i, u=None: None)
    kinds = ("measured:", "assumed:", "from a profile:", "given:")  # given: a --budget the user typed (t7's L15)
    real = device_budget(cuda.open_cuda_device(0, info=_nvml_info(index=0)))
    emulated = device_budget(cuda.open_cuda_device(0, info=_nvml_info(index=0), emulate_usable_bytes=11 * GiB,
                                                   emulate_how="rtx4070-12gb's memory less an assumed 3% driver reserve"))
    simulated = compute_budget(_nvml_info(kind="simulated", source="profile:rtx4070-12gb"))
    cpu = compute_budget(_nvml_info(kind="cpu", source="cpu"))
    for b in (real, emulated, simulated, cpu):
        assert all(t.how.startswith(kinds) for t in b.terms), [t.how for t in b.terms]
    def free(b):
        return next(t.how for t in b.terms if t.label == "free memory")
    assert free(real) == "measured: NVML free memory"
    # the emulated card's free memory is the profile's capacity less a reserve: not measured here
    assert free(emulated).startswith("from a profile: rtx4070-12gb's memory less an assumed 3%")
    assert free(simulated).startswith("from a profile: profile:rtx4070-12gb capacity")


def test_the_allocator_state_is_read_from_its_segments_not_the_environment(monkeypatch):
    FakeCuda(monkeypatch, free_after_init=78 * GiB)
    monkeypatch.setattr(cuda, "own_process_bytes", lambda i, u=None: None)
    monkeypatch.setenv("PYTORCH_ALLOC_CONF", "expandable_segments:True")
    dev = cuda.open_cuda_device(0, info=_nvml_info(index=0))
    made = []
    monkeypatch.setattr(torch, "empty", lambda *a, **k: made.append(k.get("device")))
    monkeypatch.setattr(torch.cuda, "memory_snapshot", lambda: [{"is_expandable": False, "total_size": 2 << 20}])
    assert dev.allocator_state() == {"settings": "expandable_segments:True", "expandable_segments": False}
    assert made == [dev.device]  # a segment exists before the snapshot is read
    monkeypatch.setattr(torch.cuda, "memory_snapshot", lambda: [{"is_expandable": True}])
    assert dev.allocator_state()["expandable_segments"] is True


def test_context_fallback_never_counts_our_own_process_as_another(monkeypatch):
    FakeCuda(monkeypatch, free_after_init=70 * GiB, reserved=0)
    monkeypatch.setattr(cuda, "own_process_bytes", lambda i, u=None: None)
    # no before-init free figure: total - free - reserved - others *as read before CUDA started*
    ctx = cuda.measure_cuda_context_bytes(0, free_before_bytes=None, others_before_bytes=8 * GiB)
    assert ctx == 80 * GiB - 70 * GiB - 8 * GiB


def test_emulation_caps_to_the_small_cards_usable_memory(monkeypatch):
    fake = FakeCuda(monkeypatch, free_after_init=78 * GiB)
    monkeypatch.setattr(cuda, "own_process_bytes", lambda i, u=None: None)
    usable = 12 * GiB - 300 * MiB  # an RTX 4070's total less its driver-reserved memory
    dev = cuda.open_cuda_device(0, info=_nvml_info(index=0), emulate_usable_bytes=usable)
    assert dev.memory_cap_bytes == usable - 1 * GiB  # the context comes out of the small card too
    assert dev.info.total_bytes == usable and dev.info.free_bytes == usable
    with dev.limited_to(4 * GiB):  # while probing: the budget, inside the emulation cap
        assert dev.memory_cap_bytes == 4 * GiB and fake.fraction == pytest.approx(4 / 80)
    assert dev.memory_cap_bytes == usable - 1 * GiB  # restored afterwards
    with dev.limited_to(70 * GiB):  # never above the emulation cap
        assert dev.memory_cap_bytes == usable - 1 * GiB


@pytest.mark.parametrize("name, shown", [
    ("NVIDIA GeForce RTX 4070 (Laptop)", "NVIDIA GeForce RTX 4070 (Laptop; cuda, 12.00 GiB total, 11.00 GiB free; "),
    ("NVIDIA GeForce RTX 4070", "NVIDIA GeForce RTX 4070 (cuda, 12.00 GiB total, 11.00 GiB free; "),
    ("NVIDIA H100 80GB HBM3 MIG 1g.10gb", "NVIDIA H100 80GB HBM3 MIG 1g.10gb (cuda, 12.00 GiB total, "),
])
def test_a_gpu_name_ending_in_a_parenthesis_reads_as_one(nvml, name, shown):
    """s18 (k24): the device line printed 'NVIDIA GeForce RTX 4070 (Laptop) (cuda, ...)', two
    parentheses in a row, for an NVML name that itself ends in one: the details join it."""
    from autofit.devices.info import with_details
    from autofit.report.render import device_line
    nvml(gpus=[{**RTX4070, "name": name, "total": 12 * GiB}], procs=[])
    info = query_nvml(0)
    line = device_line(SimpleNamespace(device=info, device_ranks=""))
    assert line.startswith(f"device: {shown}") and line.endswith("read via nvml)") and ") (" not in line, line
    assert line.count("(") == line.count(")")
    assert with_details(info.name, "cuda") == ("NVIDIA GeForce RTX 4070 (Laptop; cuda)" if name.endswith(")") else
                                               f"{name} (cuda)")  # the probe's 'probing on ...' line
    assert with_details("Intel(R) Xeon(R) Processor", "cpu") == "Intel(R) Xeon(R) Processor (cpu)"
