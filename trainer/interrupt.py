"""Ctrl-C, SIGTERM and SIGHUP during training: finish the step in flight, save a checkpoint, stop;
then exit with 128 + the signal's number (exit_code)."""
from __future__ import annotations

import contextlib
import os
import signal
from typing import Any, Collection


# what training says at the first Ctrl-C/SIGTERM (an evaluation in flight ends at its next batch)
STOP_NOTICE = "autofit: stopping at the next step boundary, then saving a checkpoint (Ctrl-C again to stop now)"
# ... where always_save_checkpoint=False may keep ckpt.pt as the best val loss's model (t7's M8:
# the line promised a save, the next one said none was written)
KEEP_BEST_STOP_NOTICE = ("autofit: stopping at the next step boundary, then saving a checkpoint unless ckpt.pt "
                         "holds a better evaluated model (always_save_checkpoint=False); Ctrl-C again to stop now")
# ... and at an eval_only run's, which trains and saves nothing
EVAL_STOP_NOTICE = "autofit: stopping the evaluation (eval_only: nothing is saved)"

# Set by a launcher that starts the ranks through torchrun and reports their stops itself
# (`autofit run --nproc-per-node`, autofit.launch.torchrun.relaunch); its ranks inherit it.
LAUNCHER_ENV = "AUTOFIT_LAUNCHER"


# What stops a run cleanly: Ctrl-C, a scheduler's SIGTERM, and SIGHUP (a closed terminal or a
# dropped ssh connection; torchrun passes it on to the ranks too), which killed a run silently
# with no checkpoint before. SIGHUP does not exist on Windows.
STOP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n))

# What StopFlag.signal holds when stdout's reader went away (`autofit run | head`: EPIPE, not a
# signal: Python ignores SIGPIPE): SIGPIPE's number, 13 also where the platform has none.
BROKEN_PIPE = int(getattr(signal, "SIGPIPE", 13))


def reported_by_launcher() -> frozenset[int]:
    """The signals whose stop this process's launcher reports, so a rank says nothing of them:
    SIGTERM and SIGHUP under a launcher that set LAUNCHER_ENV (torchrun sends SIGTERM after another
    rank failed, whose line the launcher prints, or passes on the launcher's own stop, which it
    reports); none otherwise (a Ctrl-C reaches every process of the terminal: rank 0 says it was
    heard)."""
    return frozenset(STOP_SIGNALS[1:]) if os.environ.get(LAUNCHER_ENV) else frozenset()


# The first stop signal this process received, whichever handler took it (a StopFlag's, or
# autofit's for a command: autofit.launch.torchrun.session), and kept after the handler is gone.
# A rank of several that then loses contact with another lost it to the same stop (the launcher
# passes a Ctrl-C on to every rank at once, and a rank outside a StopFlag leaves at once): that is
# the interrupt, not an error (autofit.launch.torchrun.taken_as_stop).
_received: dict = {"signal": None}


def received() -> int | None:
    """The first stop signal (SIGINT, SIGTERM, SIGHUP) this process received, or None."""
    return _received["signal"]


def note_received(signum: int) -> None:
    """A stop signal reached this process (called by every handler of one); the first is kept."""
    if _received["signal"] is None:
        _received["signal"] = int(signum)


def exit_code(signum: int | None = None) -> int:
    """The exit status of a command that a stop signal ended: 128 + the signal's number (130 for
    SIGINT, 143 for SIGTERM, 129 for SIGHUP), the shell's convention, which bash, `timeout`,
    Slurm and Kubernetes read to tell which signal stopped a job. For `signum`, else the first
    stop signal this process received (received()); 130 when none was noted (Python's own Ctrl-C
    handler, before any of ours, notes nothing: a KeyboardInterrupt is a SIGINT's)."""
    sig = received() if signum is None else signum
    return 128 + int(signal.SIGINT if sig is None else sig)


# The exit codes of a command a stop signal ended (exit_code), as a launcher reads a rank's
STOP_EXIT_CODES = frozenset(128 + int(sig) for sig in STOP_SIGNALS)


def forget_received() -> None:
    """Back to no signal received (the start of a command; tests run several in one process)."""
    _received["signal"] = None


def _other_rank() -> bool:
    """A rank other than 0 of several (torchrun's RANK, WORLD_SIZE): it leaves the talking to rank 0,
    which hears the same signal (torchrun passes a stop on to every rank)."""
    return os.environ.get("WORLD_SIZE", "1").strip() not in ("", "1") and os.environ.get("RANK", "0").strip() != "0"


class StopFlag:
    """Ctrl-C / SIGTERM / SIGHUP set a flag; the loop finishes the step, saves a checkpoint and returns."""

    def __init__(self, notice: str | None = None, silent: Collection[int] = ()):
        """notice: one line written to stderr when the first signal comes, so a user who pressed
        Ctrl-C during a long trial or evaluation knows it was heard and what happens next; not for
        the signals in `silent` (reported_by_launcher()), nor on a rank other than 0 (each rank
        said it: two lines for one Ctrl-C)."""
        self.signal: int | None = None
        self.notice = None if _other_rank() else notice
        self.silent = frozenset(silent)
        self._old: dict[int, Any] = {}
        self.holding = False  # set by hold(): a second signal waits too

    def __enter__(self):
        for sig in STOP_SIGNALS:
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        note_received(signum)
        # a second Ctrl-C: stop now. A closed stdout's stop is no first signal: the user's first
        # Ctrl-C after it still finishes the step and saves the checkpoint
        if self.signal is not None and self.signal != BROKEN_PIPE and not self.holding:
            raise KeyboardInterrupt
        self.signal = signum
        if self.notice and signum not in self.silent:  # os.write: a print from a handler can hit a write already under way
            try:
                os.write(2, (self.notice + "\n").encode("utf-8", "replace"))
            except OSError:  # a closed stderr: the stop itself still happens
                pass

    def pipe_closed(self) -> None:
        """stdout was closed (trainer.writes.broken_pipe_calls): a stop like a signal's, agreed between
        ranks alike, with no notice (the run's last line says it). A signal already heard stands."""
        if self.signal is None:
            self.signal = BROKEN_PIPE

    @contextlib.contextmanager
    def hold(self):
        """A few milliseconds that must not be cut in two (renaming a dataset's new files over its
        old ones): a second signal does not stop them at once; the first one's stop still stands."""
        self.holding = True
        try:
            yield
        finally:
            self.holding = False

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
