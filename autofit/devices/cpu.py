"""The host CPU as a device: available RAM (cgroup-aware), its DeviceInfo, and the plain CPU device
(trains on the CPU and measures nothing). The budgeted CPU device, which does measure, is in
autofit.devices.cpu_budget.
"""
from __future__ import annotations

import os
import platform

import torch

from autofit.devices.device import DeviceError, DeviceInfo, NoCap
from autofit.devices.info import RANK_BUDGETS_ENV
from autofit.units import fmt_bytes
from trainer.meter import NullMeter
from trainer.errors import counted

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


def machine_memory_bytes() -> int | None:
    """All the memory this machine can give a process: physical RAM (MemTotal, else sysconf),
    capped by a container's cgroup limit; None where neither can be read."""
    total: int | None = None
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        pass
    for limit_path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(limit_path) as f:
                raw = f.read().strip()
        except OSError:
            continue
        if raw.isdigit() and int(raw) < 1 << 60:  # 'max', or v1's huge number: unlimited
            total = min(total, int(raw)) if total else int(raw)
        break
    return total


def check_budget_fits(budget_bytes: int, what: str = "--budget") -> None:
    """Refuse (DeviceError, one line) a CPU budget this machine could never give
    (machine_memory_bytes): trials would 'fit' memory that is not there, and training would be
    killed by the kernel instead of shrinking."""
    have = machine_memory_bytes()
    if have is not None and budget_bytes > have:
        raise DeviceError(f"{what}: {fmt_bytes(budget_bytes)} is more than this machine's memory ({fmt_bytes(have)}, "
                          f"physical RAM or the container's limit); ask for at most {fmt_bytes(have)}")


# What one rank costs before it trains: a Python process with torch loaded (an assumed figure,
# ~300-400 MiB resident with torch 2.x on Linux), so that N ranks are known not to fit up front.
RANK_PROCESS_BYTES = 256 * 1024**2


def check_ranks_fit(nproc: int, budget_bytes: int | None, kind: str | None, rank_budgets: list[int] | None = None,
                    source: str | None = None) -> None:
    """Refuse (DeviceError, one line) --nproc-per-node N that this machine cannot hold, before
    torchrun starts anything: more ranks than GPUs on a GPU run, or N ranks whose processes
    (RANK_PROCESS_BYTES each, assumed) and CPU budgets exceed the machine's memory (machine_memory_bytes).
    The budgets, in bytes: `budget_bytes` (--budget) for each rank, or `rank_budgets`, each rank's
    AUTOFIT_RANK_BUDGETS entry (rank 0 first: autofit.devices.ranks.check_rank_budgets), which also
    puts the ranks on the CPU: refused with `kind` 'cuda' (`source`: where that came from, when not
    from --device), as each rank would refuse it."""
    if kind == "cuda" and rank_budgets:  # each rank's words (autofit.devices.opener), once, before they start
        raise DeviceError(f"{RANK_BUDGETS_ENV} applies to the CPU device only; on a GPU the budget is free memory x "
                          f"(1 - margin)" + (f" ({source})" if source else ""))
    cpu = budget_bytes is not None or bool(rank_budgets)  # a budget puts the ranks on the budgeted CPU
    if kind == "cuda" or (kind is None and not cpu and torch.cuda.is_available()):
        gpus = torch.cuda.device_count()
        if gpus == 0:  # 'use --nproc-per-node 0 or fewer' is refused in turn: say what can work
            raise DeviceError(f"--nproc-per-node {nproc} --device cuda: torch finds no GPU on this machine "
                              f"(torch.cuda.device_count() is 0); for ranks on the CPU use --device cpu")
        if nproc > gpus:
            raise DeviceError(f"--nproc-per-node {nproc}: this machine has {counted(gpus, 'GPU')}, one per rank; "
                              f"use --nproc-per-node {gpus} or fewer")
        return
    have = machine_memory_bytes()
    if rank_budgets:
        need = sum(rank_budgets) + len(rank_budgets) * RANK_PROCESS_BYTES
        if have is not None and need > have:
            room = have - len(rank_budgets) * RANK_PROCESS_BYTES
            advice = (f"give the ranks at most {fmt_bytes(room)} in all" if room > 0 else
                      f"their processes alone need {fmt_bytes(need - sum(rank_budgets))}: use fewer ranks")
            raise DeviceError(f"--nproc-per-node {nproc}: the ranks' {RANK_BUDGETS_ENV} budgets "
                              f"({fmt_bytes(sum(rank_budgets))} in all) and their processes "
                              f"(~{fmt_bytes(RANK_PROCESS_BYTES)} each, assumed) need {fmt_bytes(need)}, more than "
                              f"this machine's memory ({fmt_bytes(have)}, physical RAM or the container's limit); "
                              f"{advice}")
        return
    each = (budget_bytes or 0) + RANK_PROCESS_BYTES
    if have is not None and nproc * each > have:
        what = f"~{fmt_bytes(RANK_PROCESS_BYTES)} for its process (assumed)" + (
            f" + its --budget {fmt_bytes(budget_bytes)}" if budget_bytes else "")
        raise DeviceError(f"--nproc-per-node {nproc}: each rank needs {what}, and this machine's memory "
                          f"({fmt_bytes(have)}, physical RAM or the container's limit) holds at most "
                          f"{have // each} such ranks")


def default_cpu_budget(avail: int | None = None) -> int:
    """The budget without --budget: DEFAULT_CPU_BUDGET_SHARE of the RAM available now (`avail`, or
    read), rounded down to a whole GiB (from 2 GiB; below, to 64 MiB), so the profile it names
    (cpu-10gb) stays while free RAM moves by less than that: t7's M3 saw cpu-11641mb, then
    cpu-11203mb a minute later, and the `run --profile` autofit had suggested found nothing."""
    half = int((available_ram_bytes() if avail is None else avail) * DEFAULT_CPU_BUDGET_SHARE)
    step = 2**30 if half >= 2 * 2**30 else 64 * 2**20
    return half // step * step if half >= step else half


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "CPU"


def cpu_info(budget_bytes: int | None = None, used_bytes: int = 0, default: bool = False) -> DeviceInfo:
    """The budgeted CPU device: total = the budget; free = the budget minus `used_bytes`.
    `default`: `budget_bytes` is default_cpu_budget()'s (no --budget), as the note then says."""
    avail = available_ram_bytes()
    if budget_bytes is None or default:
        budget = default_cpu_budget(avail) if budget_bytes is None else int(budget_bytes)
        share = f"{DEFAULT_CPU_BUDGET_SHARE:.0%} of {fmt_bytes(avail)} RAM available, rounded down"
        note = f"budget {fmt_bytes(budget)} = {share} (a profile's name stays while free RAM moves a little)"
        how = f"assumed: no --budget, so {share}"
    else:
        if budget_bytes <= 0:
            raise DeviceError(f"CPU budget must be positive, got {budget_bytes} bytes")
        budget = int(budget_bytes)
        note = f"budget {fmt_bytes(budget)} of {fmt_bytes(avail)} RAM available"
        if budget > avail:
            note += "; the budget exceeds available RAM, so the OS may swap or kill the run first"
        how = "given: --budget"  # a value the user typed is not assumed (t7's L15)
    return DeviceInfo(kind="cpu", name=_cpu_name(), index=None, total_bytes=budget,
                      free_bytes=max(0, budget - used_bytes), used_by_others_bytes=None,
                      compute_capability=None, driver_version=None, cuda_version=None,
                      source="cpu", note=note, free_how=how)


class PlainCpuDevice(NoCap, NullMeter):
    """The CPU with no memory budget and no measurement (e.g. `autofit run --no-probe --device cpu`):
    peak readings are None, never made up, and torch.compile compiles for real."""
    runs_trials = False
    torch_device = torch.device("cpu")

    @property
    def info(self) -> DeviceInfo:
        avail = available_ram_bytes()
        return DeviceInfo(kind="cpu", name=_cpu_name(), index=None, total_bytes=avail, free_bytes=avail,
                          used_by_others_bytes=None, compute_capability=None, driver_version=None,
                          cuda_version=None, source="cpu", note="plain CPU: no memory budget, nothing measured")
