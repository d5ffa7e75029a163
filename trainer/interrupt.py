"""Ctrl-C and SIGTERM during training: finish the step in flight, save a checkpoint, stop."""
from __future__ import annotations

import signal
from typing import Any


class StopFlag:
    """Ctrl-C / SIGTERM set a flag; the loop finishes the step, saves a checkpoint and returns."""

    def __init__(self):
        self.signal: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
