"""How far a long phase is (evaluation, data preparation): one line now and then with the count
and an ETA, so that no phase is silent for minutes, on a terminal and piped alike (a line, not a
bar: it can be written beside training's own bar and into a log file).

    evaluation at step 0: 120/400 batches, ETA 3m 20s (from the rate measured so far)
"""
from __future__ import annotations

import time
from typing import Callable


def fmt_seconds(s: float) -> str:
    """'45s', '3m 20s', '2h 05m'."""
    s = int(round(s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s // 3600}h {s % 3600 // 60:02d}m"


class PhaseProgress:
    """Counts the units of a phase (`tick`) and says, through `say`, at most once every `every_s`
    seconds of `clock` (time.monotonic; tests inject one), how many of `total` are done and the
    ETA at the rate measured so far. Says nothing for a phase shorter than `every_s`."""

    def __init__(self, label: str, total: int, say: Callable[[str], None], unit: str = "batches",
                 every_s: float = 30.0, clock: Callable[[], float] = time.monotonic):
        self.label, self.total, self.say, self.unit = label, total, say, unit
        self.every_s, self.clock = every_s, clock
        self.done = 0
        self.start = self.last = clock()

    def tick(self, n: int = 1) -> None:
        self.done += n
        now = self.clock()
        if now - self.last < self.every_s or (self.total and self.done >= self.total) or now <= self.start:
            return
        self.last = now
        unit = f" {self.unit}" if self.unit else ""
        if not self.total:  # a size not known ahead (a download without Content-Length)
            self.say(f"{self.label}: {self.done:,}{unit} so far")
            return
        eta = (self.total - self.done) * (now - self.start) / self.done
        self.say(f"{self.label}: {self.done:,}/{self.total:,}{unit}, ETA {fmt_seconds(eta)} "
                 f"(from the rate measured so far)")


class LineBar:
    """rich.progress.Progress's add_task / advance / update, said as PhaseProgress lines: the
    progress of a phase whose output is piped (a log file, CI), where a bar cannot be drawn."""

    def __init__(self, say: Callable[[str], None], every_s: float = 30.0, clock: Callable[[], float] = time.monotonic):
        self.say, self.every_s, self.clock = say, every_s, clock
        self.tasks: list[PhaseProgress] = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def add_task(self, description: str, total: int | None = None, **_) -> int:
        self.tasks.append(PhaseProgress(description, int(total or 0), self.say, unit="", every_s=self.every_s,
                                        clock=self.clock))
        return len(self.tasks) - 1

    def advance(self, task: int, advance: float = 1) -> None:
        self.tasks[task].tick(int(advance))

    def update(self, task: int, completed: float | None = None, **_) -> None:
        if completed is not None:
            self.tasks[task].tick(int(completed) - self.tasks[task].done)
