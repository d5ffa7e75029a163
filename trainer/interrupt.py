"""Ctrl-C and SIGTERM during training: finish the step in flight, save a checkpoint, stop."""
from __future__ import annotations

import os
import signal
from typing import Any


# what training says at the first Ctrl-C/SIGTERM (an evaluation in flight ends at its next batch)
STOP_NOTICE = "autofit: stopping at the next step boundary, then saving a checkpoint (Ctrl-C again to stop now)"


class StopFlag:
    """Ctrl-C / SIGTERM set a flag; the loop finishes the step, saves a checkpoint and returns."""

    def __init__(self, notice: str | None = None):
        """notice: one line written to stderr when the first signal comes, so a user who pressed
        Ctrl-C during a long trial or evaluation knows it was heard and what happens next."""
        self.signal: int | None = None
        self.notice = notice
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
        if self.notice:  # os.write: a print from a handler can hit a write already under way
            try:
                os.write(2, (self.notice + "\n").encode("utf-8", "replace"))
            except OSError:  # a closed stderr: the stop itself still happens
                pass

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
