"""`autofit run --nproc-per-node N`: the launcher process, which runs torchrun's own launcher
(torch.distributed.run) for the user and reads back how the ranks ended.

relaunch() gives the ranks their environment (OMP_NUM_THREADS shared out, LAUNCHED_ENV so that
their error lines and stop notices come back here), runs torchrun with --standalone, and turns its
failure report into one line per distinct cause (failed_lines). Around torchrun's run it watches
what torchrun does not say: ranks its shutdown killed, a stop that takes long, and its own
folder (removed at the end, or by the next launch after a SIGKILL). What each rank does under
torchrun (the process group, its error channel, dying with the launcher) is
autofit.launch.torchrun's.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Collection, Iterator

from autofit import interrupts
from autofit.launch.torchrun import LAUNCHED_ENV, NOTES_PREFIX
from trainer.interrupt import STOP_EXIT_CODES
TORCHRUN_STOP_S = 30  # how long torchrun's shutdown waits for the ranks before SIGKILL (PContext.close's timeout)
STILL_WAITING_S = 10.0  # a stop not done by then is said: saving a large model's checkpoint takes seconds


def strip_nproc(argv: list[str]) -> list[str]:
    """`argv` without --nproc-per-node N / --nproc-per-node=N."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--nproc-per-node":
            skip = True
            continue
        if a.startswith("--nproc-per-node="):
            continue
        out.append(a)
    return out


def cpu_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one, as in a
    container or under taskset; else os.cpu_count())."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def rank_environment(environ, nproc: int, cores: int) -> tuple[dict[str, str], str | None]:
    """What --nproc-per-node adds to the ranks' environment, and the line that says so.

    OMP_NUM_THREADS: torchrun sets it to 1 for every rank when it is unset (and prints a 4-line
    banner saying so), which leaves a CPU run on 1 core per rank; autofit gives each of the
    `nproc` ranks an equal share of the `cores` instead, max(1, cores // nproc). A user's own
    OMP_NUM_THREADS (in `environ`) is kept as it is; one rank changes nothing (torchrun sets
    nothing then either). Returns ({name: value} to set, a line to log or None)."""
    if nproc <= 1 or environ.get("OMP_NUM_THREADS", "").strip():
        return {}, None
    threads = max(1, cores // nproc)
    return {"OMP_NUM_THREADS": str(threads)}, (
        f"OMP_NUM_THREADS={threads} for each of the {nproc} ranks ({cores} CPU cores / {nproc}); set "
        f"OMP_NUM_THREADS yourself to choose another")


def relaunch(argv: list[str], nproc: int, log=lambda s: None, ckpt: Path | None = None) -> int:
    """Runs `python -m autofit <argv minus --nproc-per-node>` on `nproc` ranks of this machine
    through torchrun's launcher (--standalone: a local rendezvous on a free port). Returns the
    exit code: 0, or the failed ranks' (signals as 128 + number), after their lines on stderr
    (failed_lines). torchrun's own log lines (its OMP_NUM_THREADS banner, 'Sending process ...
    closing signal', 'failed (exitcode: 2)') are left out: those lines say it better, once. For
    several machines, run torchrun yourself with its rendezvous options (README: Several GPUs).
    `ckpt`: the run's <out>/ckpt.pt, named where the ranks stopped without saying they saved one."""
    import logging

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run
    _remove_stale_notes(tempfile.gettempdir())
    # where rank 0 marks that it said its interrupt line, and torchrun's per-run folder of the
    # ranks' error files (else a torchelastic_* folder left in /tmp by every launch, as torchrun
    # itself leaves them; PET_LOG_DIR, torchrun's own setting, is kept); named by this pid for
    # _remove_stale_notes
    notes = tempfile.mkdtemp(prefix=f"{NOTES_PREFIX}{os.getpid()}-")
    logs = [] if os.environ.get("PET_LOG_DIR") else [f"--log-dir={os.path.join(notes, 'torchrun')}"]
    args = parse_args(["--standalone", f"--nproc-per-node={nproc}", *logs, "-m", "autofit", *strip_nproc(argv)])
    extra, line = rank_environment(os.environ, nproc, cpu_cores())
    # torchrun passes this process's environment to the ranks
    os.environ.update({**extra, LAUNCHED_ENV: str(os.getpid()), interrupts.SAID_ENV: os.path.join(notes, "said")})
    if line:
        log(line)
    logging.disable(logging.ERROR)  # this process only launches: its log is torchrun's
    seen = Shutdown()
    try:
        with _watching_torchrun(seen):
            run(args)
    except ChildFailedError as e:
        lines, code = failed_lines(e.failures, nproc, interrupt_said=_said(notes), killed=seen.killed,
                                   unsaid=unsaid_words(argv, ckpt))
        for text in lines:
            print(text, file=sys.stderr)
        return code
    except SignalException as e:  # Ctrl-C, SIGTERM, SIGHUP: torchrun passed it on and waited for the ranks
        if not _said(notes):  # rank 0 said what it did (checkpoint or not); else only what this process knows
            stuck = ("; a second signal killed the ranks (SIGKILL)" if seen.second_signal else
                     f"; {len(seen.killed)} rank{'s' * (len(seen.killed) != 1)} did not stop in time and were killed (SIGKILL)" if seen.killed else "")
            print(f"autofit: stopped by {signal.Signals(e.sigval).name}, passed on to the ranks{stuck}; "
                  f"{unsaid_words(argv, ckpt)}", file=sys.stderr)
        return 128 + int(e.sigval)
    finally:
        logging.disable(logging.NOTSET)
        shutil.rmtree(notes, ignore_errors=True)
    return 0


def unsaid_words(argv: list[str], ckpt: Path | None = None) -> str:
    """What the launcher says is kept when the ranks stopped for a signal and rank 0 did not say
    its own line (a rank that lost contact with one the signal stopped first says an error
    instead), by the command it launched (`argv`, sys.argv[1:]): a run's stop saves a checkpoint,
    and an earlier one in its folder (`ckpt`, read now: its step) is still there to resume (t12's
    L6: a double Ctrl-C said only that no rank saved one); a probe's saves nothing (its --save
    and --plot are written only once it is done)."""
    if not argv or argv[0] != "probe":
        return "no rank said it saved a checkpoint" + _earlier_checkpoint(ckpt)
    if any(a in ("--save", "--plot") or a.startswith("--plot=") for a in argv):
        return ("the probe was stopped, and no rank said it wrote its plan (--save and --plot write it only after "
                "the probe)")
    return "the probe was stopped and nothing was saved"


def _earlier_checkpoint(ckpt: Path | None) -> str:
    """'; <ckpt> holds step N: --resume continues from it' where `ckpt` reads as a checkpoint (its
    tensors mapped, not read), else '' (none there, or one that does not read: no promise)."""
    if ckpt is None or not ckpt.is_file():
        return ""
    from trainer.checkpoint.ckpt import read_checkpoint
    try:
        step = int(read_checkpoint(ckpt, any_layout=True, mmap=True)["iter_num"])
    except Exception:  # noqa: BLE001 - said on the way out of a stop: a file that does not read is not named
        return ""
    return f"; {ckpt} holds step {step} (saved earlier): --resume continues from it"


@dataclass
class Shutdown:
    """What the launcher saw of torchrun's shutdown of the ranks (_watching_torchrun)."""
    killed: set[int] = field(default_factory=set)  # ranks SIGKILLed by torchrun's shutdown or a second signal
    closing: list = field(default_factory=list)  # torchrun's handlers of the ranks it told to stop
    stopping: bool = False  # a stop signal came: torchrun is shutting the ranks down
    second_signal: bool = False  # the user asked again: the ranks were killed at once


def _say_still_waiting() -> None:
    print(f"autofit: still waiting for the ranks to finish their step and save a checkpoint; torchrun kills them "
          f"{TORCHRUN_STOP_S} s after the signal (a rank may be stuck in a collective); press Ctrl-C again to kill "
          f"them now, without a checkpoint", file=sys.stderr)


@contextlib.contextmanager
def _watching_torchrun(seen: Shutdown, notice_after_s: float = STILL_WAITING_S) -> Iterator[threading.Timer]:
    """Around torchrun's run(), through its SubprocessHandler.close and its signal handler (with a
    torch that has neither, in another layout, nothing is watched):
    - the ranks its shutdown killed with SIGKILL (a rank that did not end within its 30 s of the
      stop signal) are collected in seen.killed: not a cause of the failure, the rank is named stuck;
    - a stop (Ctrl-C, SIGTERM, SIGHUP) whose ranks have not ended after `notice_after_s` is said,
      once (a rank stuck in a collective answers nothing until torchrun's SIGKILL);
    - a second stop signal during the shutdown kills the ranks at once: torchrun's own handler
      would abandon its shutdown there and leave them running, stuck, without a launcher.
    Yields the notice's timer (started at the first stop signal)."""
    notice = threading.Timer(notice_after_s, _say_still_waiting)
    notice.daemon = True
    try:
        from torch.distributed.elastic.multiprocessing import api
        from torch.distributed.elastic.multiprocessing.subprocess_handler import SubprocessHandler
    except ImportError:
        yield notice
        return
    close, terminate = SubprocessHandler.close, api._terminate_process_handler

    def recording(self, death_sig=None):
        if death_sig == signal.SIGKILL:
            seen.killed.add(self.proc.pid)
        else:
            seen.closing.append(self)
        return close(self, death_sig)

    def on_signal(signum, frame):
        if not seen.stopping:  # the first: torchrun shuts the ranks down
            seen.stopping = True
            notice.start()
            terminate(signum, frame)  # raises its SignalException
        seen.second_signal = True
        notice.cancel()
        for handler in seen.closing:
            try:
                recording(handler, signal.SIGKILL)
            except ProcessLookupError:  # it ended meanwhile
                pass
    SubprocessHandler.close, api._terminate_process_handler = recording, on_signal
    # torchrun installs its handler for these and leaves it: a Ctrl-C after run() returned (while
    # this process exits) raised its SignalException, a traceback, instead of the one line
    handlers = {sig: signal.getsignal(sig) for sig in _TORCHRUN_SIGNALS}
    try:
        yield notice
    finally:
        notice.cancel()
        SubprocessHandler.close, api._terminate_process_handler = close, terminate
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


_TORCHRUN_SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT") if hasattr(signal, n))


def _remove_stale_notes(tmp: str) -> None:
    """Removes this user's launcher folders (NOTES_PREFIX<pid>-*) whose launcher is gone: one
    killed with SIGKILL cannot remove its own, and they would pile up in the temporary folder."""
    for entry in os.scandir(tmp):
        m = re.fullmatch(re.escape(NOTES_PREFIX) + r"(\d+)-\w+", entry.name)
        try:
            if m is None or not entry.is_dir(follow_symlinks=False) or entry.stat().st_uid != os.getuid():
                continue
            os.kill(int(m.group(1)), 0)
        except ProcessLookupError:  # no such process: its launcher is gone
            shutil.rmtree(entry.path, ignore_errors=True)
        except (OSError, OverflowError):  # alive under another user, or vanished meanwhile: not ours to judge
            continue


def _said(notes: str) -> bool:
    """Whether rank 0 printed its own interrupt line (autofit.interrupts.tell_launcher)."""
    return os.path.exists(os.path.join(notes, "said"))


def failed_lines(failures: dict, nproc: int, interrupt_said: bool = False,
                 killed: Collection[int] = (), unsaid: str = unsaid_words(["run"])) -> tuple[list[str], int]:
    """The launcher's report of failed ranks (torchrun's ProcessFailure per global rank, with
    .message, .error_file_data, .exitcode, .signal_name()): (lines for stderr, exit code).

    The user reads the cause, once. Each distinct error line the ranks reported (report_error)
    is printed once: as it is when every rank reported it (a config error), else prefixed with
    the ranks that did. A rank that died without a line is named with its exit code or signal,
    except one torchrun stopped with SIGTERM because another rank had failed (dead of the signal,
    or exit code 143 when the rank took it as a stop: STOP_EXIT_CODES). Lines that only say a rank stopped
    because of another (lost contact, 'rank N failed in this step': trainer.distributed.ranks.
    CONSEQUENCES) are left out when a cause is known, and said once when none is. The exit code
    is the first cause's: the reporting rank's (2, a user error, if torchrun's SIGTERM ended it
    after its line), else the failed rank's.

    Ranks that ended interrupted (exit code 128 + a stop signal's number: 130 a Ctrl-C, 143 SIGTERM,
    129 SIGHUP sent to them, not to this launcher; 141: rank 0's stdout was closed, and it stopped
    training with a checkpoint) with no error line: nothing more when rank 0 said its own interrupt
    line (`interrupt_said`, autofit.interrupts.tell_launcher), else one line for all of them, ending
    in `unsaid` (unsaid_words: what is kept, by the command launched); exit code theirs (_stop_code)
    unless another rank's failure is the cause.

    A rank that torchrun's own shutdown killed with SIGKILL (its process id in `killed`: it did
    not stop within 30 s of the SIGTERM sent after another rank failed) is not a cause: the other
    ranks' lines are said (rank 0's 'lost contact' when it gave up waiting for it), then one line
    names it as stuck."""
    from trainer.distributed.ranks import CONSEQUENCES
    said = {r: f.message for r, f in failures.items()
            if isinstance(getattr(f, "error_file_data", None), dict) and f.error_file_data.get("autofit")}
    lines, codes, interrupted, stuck = [], [], [], []
    for rank, f in sorted(failures.items()):
        if f.exitcode == -signal.SIGKILL and getattr(f, "pid", None) in killed:
            stuck.append(rank)
            continue
        # torchrun's SIGTERM after another rank's error: the rank died of it, or took it as a
        # stop (session: exit code 143) when it came before the rank's own handler was gone
        if rank in said or (said and (f.exitcode == -signal.SIGTERM or f.exitcode in STOP_EXIT_CODES)):
            continue
        # one line for all of them, below, not one per rank; 141: rank 0's stdout was closed (`| head`)
        if f.exitcode in STOP_EXIT_CODES or f.exitcode == interrupts.PIPE_EXIT_CODE:
            interrupted.append(rank)
            continue
        how = f"signal {f.signal_name()}" if f.exitcode < 0 else f"exit code {f.exitcode}"
        lines.append(f"autofit: rank {rank} stopped with {how}")
        codes.append(128 - f.exitcode if f.exitcode < 0 else f.exitcode)
    causes = {r: m for r, m in said.items() if not any(w in m for w in CONSEQUENCES)}
    if causes or lines:
        said = causes
    else:  # only consequences: each rank lost the others; one line says so
        said = dict([min(said.items())]) if said else {}
    reported, reported_codes = _reported(said, failures, nproc)
    if stuck:
        lines.append(f"autofit: rank {', '.join(map(str, stuck))} did not stop when torchrun asked it to after the "
                     f"failure, and was killed (SIGKILL; stuck?)")
    if interrupted and not interrupt_said:
        lines.append(_interrupted_line(failures, interrupted, unsaid))
    codes = reported_codes + codes + _stop_code(failures, interrupted) + [128 + signal.SIGKILL] * bool(stuck)
    return reported + lines, (codes[0] if codes else 1)


def _stop_code(failures: dict, interrupted: list[int]) -> list[int]:
    """[the exit code of the ranks that ended interrupted], or []: the lowest rank's whose code is
    not 130, else 130. A rank that stopped with the others for a signal sent to another rank alone
    heard none itself and exits 130, a Ctrl-C's (rank 0 after a SIGTERM to rank 1); the signalled
    rank's own code (143) names the stop."""
    stops = [failures[r].exitcode for r in interrupted]
    return [next((c for c in stops if c != interrupts.EXIT_CODE), stops[0])] if stops else []


def _interrupted_line(failures: dict, interrupted: list[int], unsaid: str) -> str:
    """failed_lines' one line for the ranks that ended interrupted and said nothing, with their
    exit codes (128 + each one's stop signal, 141 for a closed stdout)."""
    stops = sorted({failures[r].exitcode for r in interrupted})
    return (f"autofit: interrupted: rank {', '.join(map(str, interrupted))} stopped with exit code"
            f"{'s' * (len(stops) > 1)} {', '.join(map(str, stops))}; {unsaid}")


def _reported(said: dict, failures: dict, nproc: int) -> tuple[list[str], list[int]]:
    """failed_lines' lines for the error lines the ranks wrote ({rank: line}), each distinct line
    once, and their exit codes."""
    reported, codes = [], []
    for msg in dict.fromkeys(said[r] for r in sorted(said)):
        who = [r for r in sorted(said) if said[r] == msg]
        named = len(who) == nproc or msg.startswith("rank ")
        reported.append(f"autofit: error: {msg}" if named else
                        f"autofit: error: rank {', '.join(map(str, who))}: {msg}")
        # a rank that wrote its line may still be stopped by torchrun's SIGTERM on its way out
        codes += [c for c in (failures[r].exitcode for r in who) if c > 0][:1] or [2]
    return reported, codes
