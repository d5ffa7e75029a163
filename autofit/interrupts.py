"""Ctrl-C outside the training loop's own handling: one line that says what was under way and
what is kept, then exit code 130 (128 + SIGINT, the shell's convention).

The training loop handles the first Ctrl-C itself (finish the step, checkpoint, stop; cli's
_report_run says so). Everywhere else, a Ctrl-C is a KeyboardInterrupt: typer turns one raised in
a command into a silent exit code 130, and one raised outside it (startup, torchrun's session)
reaches main(). Either way main() prints the line set here by the phase of the command under way:

    interrupts.during("interrupted during the probe; nothing was saved")
"""
from __future__ import annotations

import os
from typing import Callable, Union

EXIT_CODE = 130  # 128 + SIGINT: the exit status of every interrupted command
Line = Union[str, Callable[[], str]]  # a callable is asked at the moment of the Ctrl-C (what exists then)

DEFAULT_LINE = "interrupted; nothing was saved"
_state: dict = {"line": DEFAULT_LINE, "said": False}


def during(line: Line) -> None:
    """From now on a Ctrl-C prints `line` (after 'autofit: '): what was under way, what is kept."""
    _state["line"] = line


def said() -> None:
    """The command printed its own interrupt line (training's 'interrupted after step N; ...'):
    main() adds none."""
    _state["said"] = True


# Set by `autofit run --nproc-per-node` (autofit.launch.launcher.relaunch) for its ranks: a file
# that rank 0 creates once it printed its interrupt line, so that the launcher adds no line of its
# own ("stopped by SIGINT ...") beside it, and says what it knows when no rank said anything.
SAID_ENV = "AUTOFIT_INTERRUPT_SAID"


def tell_launcher() -> None:
    """Rank 0 printed its interrupt line (what stopped, what is kept): its launcher, if any, says
    none. Call it only where the line reached the user (rank 0; the other ranks print nothing)."""
    path = os.environ.get(SAID_ENV)
    if path:
        try:
            open(path, "a").close()
        except OSError:  # the launcher then says its own line too: one more line, nothing lost
            pass


def line() -> str | None:
    """The line for a Ctrl-C now, or None when the command already said it."""
    if _state["said"]:
        return None
    text = _state["line"]
    return text() if callable(text) else text


def reset() -> None:
    """Back to the start of a command (tests run several in one process)."""
    _state.update(line=DEFAULT_LINE, said=False)
