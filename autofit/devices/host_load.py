"""How busy other processes kept the CPU cores this process may run on, while it timed something.

On a CPU device the contest (autofit.planning.contest) judges CPU time, which a quiet share of the
cores leaves untouched; but when the cores are oversubscribed, a torch/OpenMP thread that waits for
a core spins, and its CPU time grows with the contention too (measured on a shared 2-core machine
at load 3: one contender read 5-9x slower than idle, and a probe chose a plan at 0.3x of the
best). The probe cannot remove that, but it can measure it and say so.

Busy time per core comes from Linux's /proc/stat (user + nice + system + irq + softirq + steal,
in clock ticks: proc(5)); this process's own share from time.process_time() (all its threads).
Elsewhere (no /proc/stat) nothing is measured and nothing is said."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

# Other processes busy on more than this share of our cores: oversubscribed enough that CPU-time
# figures are inflated (a fifth of 2 cores is 0.4 core; on the shared machine an idle spell reads
# 0.0-0.1 core of others, a loaded one 1-2)
BUSY_SHARE = 0.2


def _cores() -> list[int]:
    """The CPU numbers this process may run on (its affinity), else all."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return list(range(os.cpu_count() or 1))


def busy_seconds(cores: list[int], stat: str = "/proc/stat") -> float | None:
    """Seconds the given cores spent busy since boot (all processes), from `stat`; None where it
    cannot be read (not Linux) or names none of `cores`."""
    try:
        with open(stat) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    want = {f"cpu{c}" for c in cores}
    ticks = 0
    found = False
    for ln in lines:
        parts = ln.split()
        if parts and parts[0] in want:
            v = [int(x) for x in parts[1:9]] + [0] * 8
            ticks += v[0] + v[1] + v[2] + v[5] + v[6] + v[7]  # user nice system irq softirq steal
            found = True
    return ticks / os.sysconf("SC_CLK_TCK") if found else None


@dataclass
class Load:
    """Other processes' load over a span: `others_cores` cores kept busy on average (busy time of
    our cores less this process's own CPU time, per second of wall time), of `cores`."""
    others_cores: float
    cores: int
    seconds: float

    @property
    def busy(self) -> bool:
        """Oversubscribed enough to inflate CPU-time figures (BUSY_SHARE of our cores)."""
        return self.others_cores > BUSY_SHARE * self.cores

    def words(self) -> str:
        """The measured load in words, e.g. 'other processes kept 1.6 of the 2 cores busy'."""
        return (f"other processes kept {self.others_cores:.1f} of this process's {self.cores} cores busy over "
                f"{self.seconds:.0f} s (measured from /proc/stat)")


class LoadMeter:
    """`with LoadMeter() as m: ...` then `m.load`: the others' Load over the block, or None where
    nothing could be measured (no /proc/stat, or a span too short to read in clock ticks)."""

    def __init__(self, stat: str = "/proc/stat", clock=time.monotonic, own=time.process_time):
        self._stat, self._clock, self._own = stat, clock, own
        self._cores = _cores()
        self.load: Load | None = None

    def __enter__(self) -> "LoadMeter":
        self._start = (self._clock(), busy_seconds(self._cores, self._stat), self._own())
        return self

    def __exit__(self, *exc) -> None:
        wall0, busy0, own0 = self._start
        busy1 = busy_seconds(self._cores, self._stat)
        wall = self._clock() - wall0
        if busy0 is None or busy1 is None or wall < 1.0:
            return
        others = max(0.0, (busy1 - busy0) - (self._own() - own0)) / wall
        self.load = Load(others_cores=min(others, float(len(self._cores))), cores=len(self._cores), seconds=wall)
