"""autofit under torchrun: the process group of a command, each rank's device, and
`autofit run --nproc-per-node N`, which starts torchrun for the user.

- `torchrun --nproc_per_node N -m autofit run ...` (or any torchrun rendezvous, multi-node
  included) starts N copies of the command; session() joins them into one process group at the
  start of the command and leaves it at the end, on success, error, Ctrl-C and SIGTERM.
- Each rank opens its own device (autofit.devices.ranks reads which): on CUDA the GPU named by
  LOCAL_RANK; on the CPU, a budgeted device whose budget can differ per rank
  (AUTOFIT_RANK_BUDGETS=3MiB,2MiB: rank 0 gets 3 MiB, rank 1 2 MiB), so that ranks with
  different cards can be tried on one machine.
- relaunch() runs torchrun's own launcher (torch.distributed.run) in this process with
  --standalone, and turns its failure report into one line per failed rank.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import sys
import tempfile
from typing import Collection, Iterator

from autofit import interrupts
from autofit.devices.info import DeviceError
from autofit.devices.ranks import env_rank, other_rank, ranks, under_torchrun
from trainer.interrupt import LAUNCHER_ENV, STOP_SIGNALS as TRAINING_STOP_SIGNALS

# set by relaunch() for its ranks, to its process id: their error lines go back to it, their
# SIGTERM is its to say, and its death stops them (die_with_launcher)
LAUNCHED_ENV = LAUNCHER_ENV
NOTES_PREFIX = "autofit-launch-"  # the launcher's folder in the temporary folder: <prefix><pid>-<random>
# the line for a Ctrl-C before the command itself began (autofit.__main__ says the same)
STARTING = "interrupted while starting; nothing was done"
# what session() turns into a Ctrl-C (training's StopFlag then handles them itself): a
# scheduler's SIGTERM, a closed terminal's or dropped ssh connection's SIGHUP
STOP_SIGNALS = tuple(sig for sig in TRAINING_STOP_SIGNALS if sig != signal.SIGINT)


def check_ranks(cfg, nproc_per_node: int | None, resume: bool) -> None:
    """Before any probe: the effective batch must divide among the ranks (--nproc-per-node N, or
    torchrun's WORLD_SIZE). A resume checks the checkpoint's own batch later. Raises TrainError,
    or DeviceError for --nproc-per-node inside a torchrun rank."""
    if nproc_per_node is not None and under_torchrun():
        raise DeviceError("--nproc-per-node starts torchrun; this process is already one of torchrun's ranks")
    if nproc_per_node is not None and nproc_per_node < 1:
        raise DeviceError(f"--nproc-per-node must be at least 1, got {nproc_per_node}")
    if resume or (nproc_per_node is None and not under_torchrun()):
        return
    from trainer.distributed.ranks import check_divisible
    if cfg.stages:  # every stage's effective batch (trainer/config/stages.py), named in the error
        from trainer.recovery import StagedRun
        StagedRun(cfg, nproc_per_node or ranks().world_size, 1)
        return
    check_divisible(cfg.effective_batch, nproc_per_node or ranks().world_size, cfg.batch_size,
                    cfg.gradient_accumulation_steps)


def quiet_unless_rank0(console, err_console) -> None:
    """Under torchrun only rank 0 prints the plan, the progress, the logs and --json's output
    (the other ranks' stdout goes to os.devnull); every rank still prints its own error line."""
    if other_rank():
        console.quiet = err_console.quiet = True
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process


def error_prefix(msg: str) -> str:
    """'rank N: ' before an error line under torchrun (unless the message names its rank)."""
    rank = env_rank()
    if rank is None:
        return ""
    return "" if msg.startswith(f"rank {rank}:") else f"rank {rank}: "


def report_error(msg: str) -> bool:
    """Where a rank's one-line error goes, so that the user reads it once, not once per rank.
    Under `autofit run --nproc-per-node` (LAUNCHED_ENV set) every rank writes it to its
    torchelastic error file (TORCHELASTIC_ERROR_FILE, torchrun's own channel from rank to
    launcher) and prints nothing: the launcher prints each distinct line once, on stderr. Under a
    torchrun the user started, rank 0 prints it and the other ranks write it to that file, which
    torchrun shows in its failure summary. Returns True when the line went to the file (print
    nothing), False when the caller prints it (no torchrun, rank 0 of a user's torchrun, no file)."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE", "")
    rank = env_rank()  # without torch: the error may be a Ctrl-C in torch's own import
    if rank is None or not path or (rank == 0 and not os.environ.get(LAUNCHED_ENV)):
        return False
    import json
    import time
    try:  # torchrun reads {"message": str, "timestamp": int} back as the failure's message
        with open(path, "w") as f:
            json.dump({"message": msg, "timestamp": int(time.time()), "autofit": True}, f)
    except OSError:
        return False
    return True


def _raise_interrupt(signum, frame):
    if under_torchrun() and os.environ.get(LAUNCHED_ENV):
        # a rank of `autofit run --nproc-per-node`: torchrun sends SIGTERM after another rank's
        # error, or when the launcher itself was stopped; the launcher prints that line, once
        interrupts.said()
    raise KeyboardInterrupt  # the command's with-blocks unwind, and the group is left


@contextlib.contextmanager
def session() -> Iterator[None]:
    """The command's process group under torchrun (no group with one process): joined before the
    command touches a device (on CUDA the rank's GPU is set first, after the allocator
    settings), left afterwards whatever happens. SIGTERM and SIGHUP unwind like Ctrl-C until
    training installs its own handler (finish the step, checkpoint, stop), with one process too:
    a scheduler's SIGTERM or a closed terminal's SIGHUP in the probe or a data prepare is then the
    Ctrl-C line, and no staging folder is left behind."""
    several = under_torchrun()
    old = {sig: signal.signal(sig, _raise_interrupt) for sig in STOP_SIGNALS}
    try:
        if several:
            die_with_launcher()
            # a Ctrl-C while each rank imports torch and joins (a second or more): one line, from rank 0
            interrupts.during(STARTING)
            _start_group()
            interrupts.during(interrupts.DEFAULT_LINE)
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        # only where the group's module loaded whole: after a Ctrl-C inside `import torch`,
        # importing it again fails on the half-built torch, with tracebacks instead of the line
        if several and "trainer.distributed.ranks" in sys.modules:
            sys.modules["trainer.distributed.ranks"].stop()


PR_SET_PDEATHSIG = 1  # linux/prctl.h
# The signal Linux sends a rank when its launcher dies. Not SIGTERM itself: the kernel sends it once
# for each of the launcher's threads as they exit (the rank is handed from a dying thread to the
# next), and a second SIGTERM means 'stop now', no checkpoint. _launcher_died turns them into one.
DEATH_SIGNAL = getattr(signal, "SIGUSR2", None)
_death = {"told": False}


def die_with_launcher() -> None:
    """A rank of `autofit run --nproc-per-node` (LAUNCHED_ENV: the launcher's process id) gets
    one SIGTERM when the launcher dies, even by SIGKILL: finish the step, checkpoint, stop.
    torchrun starts each rank in a session of its own and nothing else tells it, so a killed
    launcher left the ranks training to the end as orphans, holding --out's lock. Linux only
    (prctl PR_SET_PDEATHSIG, through ctypes); elsewhere, or under a torchrun the user started,
    nothing."""
    launcher = os.environ.get(LAUNCHED_ENV, "")
    if not launcher or not sys.platform.startswith("linux") or DEATH_SIGNAL is None:
        return
    try:
        import ctypes
        signal.signal(DEATH_SIGNAL, _launcher_died)  # for the life of the process
        if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(DEATH_SIGNAL), 0, 0, 0) != 0:
            return
    except (OSError, AttributeError, ValueError):  # no libc prctl, not the main thread: runs as before
        return
    if launcher.isdigit() and int(launcher) > 1 and os.getppid() != int(launcher):
        _launcher_died(DEATH_SIGNAL, None)  # it died before prctl took hold: the same stop


def _launcher_died(signum, frame) -> None:
    """The launcher is gone: one SIGTERM to this rank, whatever number of death signals came."""
    if not _death["told"]:
        _death["told"] = True
        os.kill(os.getpid(), signal.SIGTERM)


def _start_group() -> None:
    """This rank joins the process group (on CUDA after the allocator settings, which must come
    before set_device initialises CUDA)."""
    import torch

    from trainer.distributed import ranks as distributed
    kind = "cpu"
    if torch.cuda.is_available():
        from autofit.devices.cuda import set_allocator_conf
        set_allocator_conf()
        kind = "cuda"
    distributed.start(kind, ranks())


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


def relaunch(argv: list[str], nproc: int, log=lambda s: None) -> int:
    """Runs `python -m autofit <argv minus --nproc-per-node>` on `nproc` ranks of this machine
    through torchrun's launcher (--standalone: a local rendezvous on a free port). Returns the
    exit code: 0, or the failed ranks' (signals as 128 + number), after their lines on stderr
    (failed_lines). torchrun's own log lines (its OMP_NUM_THREADS banner, 'Sending process ...
    closing signal', 'failed (exitcode: 2)') are left out: those lines say it better, once. For
    several machines, run torchrun yourself with its rendezvous options (README: Several GPUs)."""
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
    killed: set[int] = set()
    try:
        with _killed_by_torchrun(killed):
            run(args)
    except ChildFailedError as e:
        lines, code = failed_lines(e.failures, nproc, interrupt_said=_said(notes), killed=killed)
        for text in lines:
            print(text, file=sys.stderr)
        return code
    except SignalException as e:  # Ctrl-C, SIGTERM, SIGHUP: torchrun passed it on and waited for the ranks
        if not _said(notes):  # rank 0 said what it did (checkpoint or not); else only what this process knows
            stuck = f"; {len(killed)} rank(s) did not stop in time and were killed (SIGKILL)" if killed else ""
            print(f"autofit: stopped by {signal.Signals(e.sigval).name}, passed on to the ranks{stuck}; no rank said "
                  f"it saved a checkpoint", file=sys.stderr)
        return 128 + int(e.sigval)
    finally:
        logging.disable(logging.NOTSET)
        shutil.rmtree(notes, ignore_errors=True)
    return 0


@contextlib.contextmanager
def _killed_by_torchrun(pids: set[int]) -> Iterator[None]:
    """Collects into `pids` the ranks torchrun's own shutdown killed with SIGKILL (a rank that did
    not end within its 30 s of the SIGTERM): that SIGKILL is not a cause of the failure, and the
    rank is named as stuck. Through torchrun's SubprocessHandler.close; with a torch that has none
    (another layout), nothing is collected and such a SIGKILL reads as any other."""
    try:
        from torch.distributed.elastic.multiprocessing.subprocess_handler import SubprocessHandler
    except ImportError:
        yield
        return
    close = SubprocessHandler.close

    def recording(self, death_sig=None):
        if death_sig == signal.SIGKILL:
            pids.add(self.proc.pid)
        return close(self, death_sig)
    SubprocessHandler.close = recording
    try:
        yield
    finally:
        SubprocessHandler.close = close


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
                 killed: Collection[int] = ()) -> tuple[list[str], int]:
    """The launcher's report of failed ranks (torchrun's ProcessFailure per global rank, with
    .message, .error_file_data, .exitcode, .signal_name()): (lines for stderr, exit code).

    The user reads the cause, once. Each distinct error line the ranks reported (report_error)
    is printed once: as it is when every rank reported it (a config error), else prefixed with
    the ranks that did. A rank that died without a line is named with its exit code or signal,
    except one torchrun stopped with SIGTERM because another rank had failed (dead of the signal,
    or exit code 130 when the rank took it as a Ctrl-C). Lines that only say a rank stopped
    because of another (lost contact, 'rank N failed in this step': trainer.distributed.ranks.
    CONSEQUENCES) are left out when a cause is known, and said once when none is. The exit code
    is the first cause's: the reporting rank's (2, a user error, if torchrun's SIGTERM ended it
    after its line), else the failed rank's.

    Ranks that ended interrupted (exit code 130: a Ctrl-C, SIGTERM or SIGHUP sent to them, not to
    this launcher) with no error line: nothing more when rank 0 said its own interrupt line
    (`interrupt_said`, autofit.interrupts.tell_launcher), else one line for all of them; exit
    code 130 unless another rank's failure is the cause.

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
        # Ctrl-C (session: exit code 130) when it came before the rank's own handler was gone
        if rank in said or (said and f.exitcode in (-signal.SIGTERM, interrupts.EXIT_CODE)):
            continue
        if f.exitcode == interrupts.EXIT_CODE:  # one line for all of them, below, not one per rank
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
        lines.append(f"autofit: interrupted: rank {', '.join(map(str, interrupted))} stopped with exit code "
                     f"{interrupts.EXIT_CODE}, and no rank said it saved a checkpoint")
    codes = reported_codes + codes + [interrupts.EXIT_CODE] * bool(interrupted) + [128 + signal.SIGKILL] * bool(stuck)
    return reported + lines, (codes[0] if codes else 1)


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
