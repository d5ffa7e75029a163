"""Opening the device a command runs on: one function for every caller (probe, run, run --profile,
--resume, --no-probe), so allocator settings, identity, context measurement and caps happen the
same way everywhere.

Which device: a simulated GPU when a hardware profile is named (estimates only); the budgeted CPU
device when a CPU budget is asked for; a CUDA GPU when there is one; otherwise the CPU, budgeted
(probing needs measurements) or plain (training as written needs none).
"""
from __future__ import annotations

from typing import Literal

from autofit.devices.device import Device, DeviceError, SimulatedDevice

CpuFallback = Literal["budgeted", "plain"]


def open_device(kind: str | None = None, *, budget_bytes: int | None = None, gpu_index: int | None = None,
                emulate_usable_bytes: int | None = None, cpu: CpuFallback = "budgeted",
                source: str | None = None) -> Device:
    """The device to measure and train on; `source`: where kind and gpu_index came from when not
    from the flags (e.g. "device 'cuda:1' from the config"), added to any DeviceError. The rest as
    _open_device's."""
    try:
        return _open_device(kind, budget_bytes=budget_bytes, gpu_index=gpu_index,
                            emulate_usable_bytes=emulate_usable_bytes, cpu=cpu)
    except DeviceError as e:
        if source is None:
            raise
        raise DeviceError(f"{e} ({source})") from None


def _open_device(kind: str | None, *, budget_bytes: int | None, gpu_index: int | None,
                 emulate_usable_bytes: int | None, cpu: CpuFallback) -> Device:
    """The device to measure and train on.

    kind: 'cuda', 'cpu', or None (a GPU if there is one, else the CPU).
    budget_bytes: a budget for the budgeted CPU device (implies kind 'cpu').
    gpu_index: the GPU asked for (--gpu-index); None: GPU 0. Asked for, it must be used: a run
        that would end up on the CPU (--device cpu, a budget, no GPU found) or under torchrun
        (each rank takes LOCAL_RANK's GPU) raises DeviceError instead of ignoring it.
    emulate_usable_bytes: on CUDA, cap this process to a smaller card's usable memory (emulation).
    cpu: what the CPU is without a budget: 'budgeted' (half the available RAM; the probe's
        default, since trials must measure) or 'plain' (nothing measured, compile runs for real).
    Under torchrun each rank opens its own: the GPU of its LOCAL_RANK, or its entry of
    AUTOFIT_RANK_BUDGETS on the CPU (autofit.devices.ranks).
    Raises DeviceError for a bad kind, a budget on a GPU, or a GPU asked for and absent.
    """
    from autofit.devices.cpu import PlainCpuDevice
    from autofit.devices.cpu_budget import BudgetedCpuDevice
    from autofit.devices.ranks import budget_flag, cpu_share, gpu_index as rank_gpu, rank_budget, under_torchrun
    if kind not in (None, "cpu", "cuda"):
        raise DeviceError(f"--device must be cuda, cuda:N (N: the GPU's index) or cpu, got {kind!r}")
    asked = gpu_index
    if asked is not None and (kind == "cpu" or budget_bytes is not None):
        raise DeviceError(f"--gpu-index {asked} picks a GPU, and this run is on the CPU "
                          f"({'--device cpu' if kind == 'cpu' else '--budget'}); drop one of them")
    if asked is not None and under_torchrun():
        raise DeviceError(f"--gpu-index {asked}: under torchrun each rank takes the GPU of its LOCAL_RANK; drop "
                          f"--gpu-index (CUDA_VISIBLE_DEVICES picks which GPUs the ranks see)")
    budget_bytes, gpu_index = rank_budget(budget_bytes), rank_gpu(asked or 0)
    # named as the user set it: where the variable is set, rank_budget took it (or refused it)
    what = budget_flag()
    if budget_bytes is not None and kind == "cuda":
        raise DeviceError(f"{what} applies to the CPU device only; on a GPU the budget is free memory x (1 - margin)")
    if budget_bytes is not None:  # the --budget, or a saved CPU profile's memory_bytes
        from autofit.devices.cpu import check_budget_fits
        check_budget_fits(budget_bytes, what)
    if budget_bytes is not None or (kind == "cpu" and cpu == "budgeted"):
        return BudgetedCpuDevice(budget_bytes=cpu_share(budget_bytes))
    if kind == "cpu":
        return PlainCpuDevice()
    from autofit.devices.cuda import detect_gpu, open_cuda_device, set_allocator_conf
    set_allocator_conf()  # before anything can initialise CUDA (detect_gpu's fallback does)
    try:
        info = detect_gpu(gpu_index)  # NVML first: no CUDA context yet
    except DeviceError as e:
        if kind == "cuda":
            raise
        if asked is not None:
            raise DeviceError(f"--gpu-index {asked}: no such GPU ({e}); without it this run would be on the CPU, "
                              f"where --gpu-index means nothing: drop it, or add --device cpu") from None
        if gpu_index > 0 and under_torchrun() and _has_gpu(detect_gpu):  # more ranks than GPUs here
            raise DeviceError(f"rank with LOCAL_RANK {gpu_index} has no GPU of its own ({e}); start at most one rank "
                              f"per GPU, or use --device cpu") from None
        return BudgetedCpuDevice(budget_bytes=cpu_share(None)) if cpu == "budgeted" else PlainCpuDevice()
    return open_cuda_device(gpu_index, info=info, emulate_usable_bytes=emulate_usable_bytes)


def _has_gpu(detect_gpu) -> bool:
    try:
        detect_gpu(0)
        return True
    except DeviceError:
        return False


def open_simulated(name: str) -> SimulatedDevice:
    """A GPU that is not here, from its hardware profile (HardwareError for an unknown name)."""
    from autofit.devices.hardware import get_hardware
    return SimulatedDevice(get_hardware(name))


def reopen_device(spec: dict, *, gpu_index: int | None = None) -> Device:
    """The device a checkpoint was trained on, from the spec its meter wrote (MemoryMeter.spec()),
    so a resumed run continues under the same budget or cap. gpu_index as open_device's (a CPU
    checkpoint refuses one)."""
    from autofit.devices.ranks import gpu_index as rank_gpu
    kind = spec.get("kind")
    if kind == "cuda":
        from autofit.devices.cuda import open_cuda_device
        device = open_cuda_device(rank_gpu(gpu_index or 0))
        if spec.get("memory_cap_bytes"):
            device.set_memory_cap(int(spec["memory_cap_bytes"]))
        return device
    if gpu_index is not None:
        raise DeviceError(f"--gpu-index {gpu_index} picks a GPU, and this run is on the CPU (the checkpoint's "
                          f"device: a resume continues where it trained); drop --gpu-index")
    if kind == "cpu-budgeted":
        return open_device("cpu", budget_bytes=int(spec["budget_bytes"]))
    return open_device("cpu", cpu="plain")
