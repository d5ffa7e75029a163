"""How long an optimizer step took on the device: the step clock the training loop uses.

On CUDA the host only queues kernels: `train_step` returns as soon as the last one is queued, and
the GPU may still be working on the step (or on the previous one). A host clock read then counts
the queueing, not the work; a compiled step, with few launches, could read several times too
fast. So the loop times a step with a pair of CUDA events recorded on the current stream around
it (torch.cuda.Event(enable_timing=True); Event.elapsed_time gives milliseconds between the two
points where the GPU reached them, https://pytorch.org/docs/stable/generated/torch.cuda.Event.html).
Recording an event does not wait for anything; the host waits (Event.synchronize) only when a
step's time is read, and the loop reads it only on the steps it logs, which sync anyway to read
the loss. Unlogged steps keep no host sync.

Elsewhere (the CPU: ops run to completion before they return) the host's perf_counter is the
device's clock.

A lap is what `start()` returns and `stop(lap)` closes; `seconds(lap)` reads it (waiting for the
device if it must). Shapes: none; units: seconds (float).
"""
from __future__ import annotations

import time
from typing import Any, Callable

import torch


class HostClock:
    """The host's perf_counter: right where ops finish before they return (the CPU)."""
    syncs = False  # reading a lap never waits for a device

    def __init__(self, now: Callable[[], float] = time.perf_counter):
        self.now = now

    def start(self) -> list[float]:
        return [self.now()]

    def stop(self, lap: list[float]) -> list[float]:
        lap.append(self.now())
        return lap

    def seconds(self, lap: list[float]) -> float:
        return lap[1] - lap[0]


class EventClock:
    """Device time between two events recorded on the current stream around a step (CUDA).

    `event` makes an event (default torch.cuda.Event(enable_timing=True)); it must offer
    record(), synchronize() and elapsed_time(other) in milliseconds, as torch.cuda.Event does.
    Tests pass a fake whose 'kernels' finish later than they are queued."""
    syncs = True

    def __init__(self, event: Callable[[], Any] | None = None):
        self.event = event or (lambda: torch.cuda.Event(enable_timing=True))

    def start(self) -> tuple:
        begin = self.event()
        begin.record()  # reached by the GPU once the work queued before it is done
        return (begin,)

    def stop(self, lap: tuple) -> tuple:
        end = self.event()
        end.record()  # reached once the step's last kernel has finished
        return (lap[0], end)

    def seconds(self, lap: tuple) -> float:
        begin, end = lap
        end.synchronize()  # the one host sync, on the steps whose time is read
        return begin.elapsed_time(end) / 1000.0


def step_clock(device: torch.device) -> HostClock | EventClock:
    """The clock for steps on `device`: CUDA events on a GPU, the host clock elsewhere."""
    return EventClock() if device.type == "cuda" else HostClock()
