"""Ctrl-C outside the training loop's own handling: one line that says what was under way and
what is kept, then exit code 128 + the signal's number (130 Ctrl-C, 143 SIGTERM, 129 SIGHUP: the
shell's convention, which schedulers read too).

The training loop handles the first Ctrl-C itself (finish the step, checkpoint, stop; cli's
_report_run says so). Everywhere else, a Ctrl-C is a KeyboardInterrupt: typer turns one raised in
a command into a silent exit code 130 (main() then exits with exit_code()), and one raised outside
it (startup, torchrun's session) reaches main(). Either way main() prints the line set here by the
phase of the command under way:

    interrupts.during("interrupted during the probe; nothing was saved")
"""
from __future__ import annotations

import os
import signal
from collections.abc import Callable  # not typing's: 2 ms more of the start-up before unwind_stops

EXIT_CODE = 130  # 128 + SIGINT: a Ctrl-C's exit status (a SIGTERM's is 143, a SIGHUP's 129: exit_code())
# 128 + SIGPIPE: training stopped because stdout's reader went away (`autofit run | head`), with a
# checkpoint. What a shell reports for a command a closed pipe killed, which `set -o pipefail`
# scripts already know; not 130 (no Ctrl-C came) and not 1 (nothing failed, the steps are kept).
PIPE_EXIT_CODE = 141
Line = str | Callable[[], str]  # a callable is asked at the moment of the Ctrl-C (what exists then)

DEFAULT_LINE = "interrupted; nothing was saved"
_state: dict = {"line": DEFAULT_LINE, "said": False, "signal": None, "peer_left": False}


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


# Why a run of several ranks stopped at once though training's first Ctrl-C promised a checkpoint:
# the launcher passes a Ctrl-C on to every rank, and one outside a StopFlag leaves at once; the
# others then lose contact with it in the step's collective (autofit.launch.torchrun.taken_as_stop).
PEER_LEFT = "another rank stopped at once, so the ranks could not finish the step together"


def peer_left() -> None:
    """This rank's stop came from another rank's leaving at once (lost contact after a Ctrl-C)."""
    _state["peer_left"] = True


def why_at_once() -> str:
    """'; ' + PEER_LEFT when peer_left() was called in this command, else ''."""
    return f"; {PEER_LEFT}" if _state["peer_left"] else ""


def line() -> str | None:
    """The line for a Ctrl-C now, or None when the command already said it."""
    if _state["said"]:
        return None
    text = _state["line"]
    return text() if callable(text) else text


def reset() -> None:
    """Back to the start of a command (tests run several in one process)."""
    _state.update(line=DEFAULT_LINE, said=False, signal=None, peer_left=False)
    from trainer.interrupt import forget_received  # no torch
    forget_received()


# SIGTERM (a scheduler's) and SIGHUP (a closed terminal); SIGHUP does not exist on Windows
STOPS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGHUP") if hasattr(signal, n))


def heard(signum: int) -> None:
    """The KeyboardInterrupt being raised stands for stop signal `signum` (SIGTERM, SIGHUP), for
    exit_code() where no handler of trainer.interrupt noted one first."""
    _state["signal"] = signum


def _unwind(signum, frame):
    heard(signum)
    raise KeyboardInterrupt


def unwind_stops() -> None:
    """From now on SIGTERM and SIGHUP unwind like a Ctrl-C (one line, exit_code()), until the
    command installs its own handlers (autofit.launch.torchrun.session, training's StopFlag): by
    default they ended the process at once, silently, while the CLI and torch loaded."""
    for sig in STOPS:
        signal.signal(sig, _unwind)


def exit_code() -> int:
    """The exit status of an interrupted command: 128 + the number of the stop signal that ended it
    (130 Ctrl-C, 143 SIGTERM, 129 SIGHUP), in one process, a rank and the launcher of
    `--nproc-per-node` alike. The signal is the first one a handler noted (trainer.interrupt.
    received: training's StopFlag, the command's session), else the one heard while the CLI
    loaded (heard()); none: a KeyboardInterrupt from Python's own Ctrl-C handler, 130."""
    from trainer.interrupt import exit_code as code, received  # no torch
    sig = received()
    return code(sig if sig is not None else _state["signal"])
