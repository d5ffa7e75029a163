"""autofit under torchrun: the process group of a command, each rank's device, and
`autofit run --nproc-per-node N`, which starts torchrun for the user.

- `torchrun --nproc_per_node N -m autofit run ...` (or any torchrun rendezvous, multi-node
  included) starts N copies of the command; session() joins them into one process group at the
  start of the command and leaves it at the end, on success, error, Ctrl-C and SIGTERM.
- Each rank opens its own device (autofit.devices.ranks reads which): on CUDA the GPU named by
  LOCAL_RANK; on the CPU, a budgeted device whose budget can differ per rank
  (AUTOFIT_RANK_BUDGETS=3MiB,2MiB: rank 0 gets 3 MiB, rank 1 2 MiB), so that ranks with
  different cards can be tried on one machine.
- `autofit run --nproc-per-node N` is autofit.launch.launcher's: it runs torchrun's own launcher
  in this process, and the ranks it starts pass through here.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
from typing import Iterator

from autofit import interrupts
from autofit.devices.info import DeviceError
from autofit.devices.ranks import check_rank_budgets, env_rank, other_rank, ranks, under_torchrun
from trainer.interrupt import LAUNCHER_ENV, STOP_SIGNALS as TRAINING_STOP_SIGNALS, note_received, received

# set by autofit.launch.launcher.relaunch() for its ranks, to its process id: their error lines go back to it, their
# SIGTERM is its to say, and its death stops them (die_with_launcher)
LAUNCHED_ENV = LAUNCHER_ENV
NOTES_PREFIX = "autofit-launch-"  # the launcher's folder in the temporary folder: <prefix><pid>-<random>
# the line for a Ctrl-C before the command itself began (autofit.__main__ says the same)
STARTING = "interrupted while starting; nothing was done"
# what session() turns into a Ctrl-C (training's StopFlag then handles them itself): a
# scheduler's SIGTERM, a closed terminal's or dropped ssh connection's SIGHUP
STOP_SIGNALS = tuple(sig for sig in TRAINING_STOP_SIGNALS if sig != signal.SIGINT)


def check_ranks(cfg, nproc_per_node: int | None, resume: bool, overrides: dict | None = None,
                sources: dict | None = None, allow_changes: bool = False) -> None:
    """Before any probe: the effective batch must divide among the ranks (--nproc-per-node N, or
    torchrun's WORLD_SIZE). A resume's is its checkpoint's config with its --set values
    (`overrides`, from `sources`, `allow_changes`); with --nproc-per-node its file and that batch
    are checked here first (as each rank will: autofit.launch.resume.check_resume_ranks), so that a
    bad or newer-format one ('upgrade autofit') or a batch the ranks cannot share is one line
    before N ranks start; so is an AUTOFIT_RANK_BUDGETS entry that is not a size with a unit, or a
    list of other than N entries (autofit.devices.ranks.check_rank_budgets). Raises TrainError or
    ConfigError, or DeviceError for --nproc-per-node inside a torchrun rank or for such a list."""
    if nproc_per_node is not None and under_torchrun():
        raise DeviceError("--nproc-per-node starts torchrun; this process is already one of torchrun's ranks")
    if nproc_per_node is not None and nproc_per_node < 1:
        raise DeviceError(f"--nproc-per-node must be at least 1, got {nproc_per_node}")
    if nproc_per_node is not None:  # AUTOFIT_RANK_BUDGETS=3,2 (3 and 2 bytes), or 1 entry for 2 ranks: one line
        check_rank_budgets(nproc_per_node)
    if resume and nproc_per_node is not None:
        from autofit.launch.resume import check_resume_ranks
        check_resume_ranks(cfg.out_dir, nproc_per_node, overrides or {}, sources, allow_changes)
    if resume or (nproc_per_node is None and not under_torchrun()):
        return
    from trainer.distributed.shares import check_divisible
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
    torchrun shows in its failure summary; but a line of rank 0's that only repeats another rank's
    failure (a consequence: 'rank 1 failed in this step ...') goes to the file too, so the user
    reads the cause once, in torchrun's summary, stamped a second later than the cause so that the
    summary's 'Root Cause' is the failing rank (torchrun picks the earliest whole-second stamp, and
    the lower rank on a tie). Returns True when the line went to the file (print nothing), False
    when the caller prints it (no torchrun, rank 0's own error in a user's torchrun, no file)."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE", "")
    rank = env_rank()  # without torch: the error may be a Ctrl-C in torch's own import
    if rank is None or not path or (rank == 0 and not os.environ.get(LAUNCHED_ENV) and not _consequence(msg)):
        return False
    import json
    import time
    try:  # torchrun reads {"message": str, "timestamp": int} back as the failure's message
        with open(path, "w") as f:
            stamp = int(time.time()) + int(_consequence(msg))
            json.dump({"message": msg, "timestamp": stamp, "autofit": True}, f)
    except OSError:
        return False
    return True


def _consequence(msg: str) -> bool:
    """Whether `msg` only repeats another rank's failure (trainer.distributed.ranks.CONSEQUENCES).
    Only that module says one: where it is not loaded (torch's own import failed), none was said."""
    group = sys.modules.get("trainer.distributed.ranks")
    return group is not None and any(w in msg for w in group.CONSEQUENCES)


def _raise_interrupt(signum, frame):
    note_received(signum)
    interrupts.heard(signum)  # the launcher's exit code names a SIGTERM or SIGHUP (interrupts.exit_code)
    if under_torchrun() and os.environ.get(LAUNCHED_ENV):
        # a rank of `autofit run --nproc-per-node`: torchrun sends SIGTERM after another rank's
        # error, or when the launcher itself was stopped; the launcher prints that line, once
        interrupts.said()
    raise KeyboardInterrupt  # the command's with-blocks unwind, and the group is left


def _ctrl_c(signum, frame):
    """Python's own Ctrl-C (KeyboardInterrupt), with the signal noted (trainer.interrupt.received)."""
    note_received(signum)
    raise KeyboardInterrupt


def _raise_again(signum, frame):
    """The KeyboardInterrupt a finalizer dropped (_stop_in_finalizer), raised where the code goes on."""
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    raise KeyboardInterrupt


def _cancel_again() -> None:
    """No _raise_again from now on: its timer stopped, SIGALRM's default back."""
    if hasattr(signal, "setitimer") and signal.getsignal(signal.SIGALRM) is _raise_again:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)


def _stop_in_finalizer(hook):
    """sys.unraisablehook for the command: a stop signal's KeyboardInterrupt raised while a
    finalizer ran (seen in DDP's first collective: 'Exception ignored in: <finalize object ...>',
    a traceback) was dropped there, and the rank went on as if no Ctrl-C had come. It is raised
    again a millisecond later (SIGALRM), where the code goes on, without the traceback.
    Anything else goes to `hook`, Python's."""
    def unraisable(u):
        if issubclass(u.exc_type, KeyboardInterrupt) and received() is not None and hasattr(signal, "setitimer"):
            # a moment later (SIGALRM): raised here, in the hook, it would be dropped again
            signal.signal(signal.SIGALRM, _raise_again)
            signal.setitimer(signal.ITIMER_REAL, 0.001)
            return
        hook(u)
    return unraisable


def taken_as_stop(e: BaseException) -> bool:
    """Whether error `e` of a command is the stop signal this rank received before it, not an
    error: a lost contact with another rank (trainer.distributed.ranks.peer_lost's TrainError,
    or under torchrun a collective's own error about a peer) after a Ctrl-C, SIGTERM or SIGHUP
    reached this rank. Why: the launcher passes a signal on to every rank at once, and a rank
    that takes it at once (outside a StopFlag: it raises KeyboardInterrupt and leaves) ends the
    collective another rank waits in (inside a StopFlag, that one only noted the signal): before
    the first trial, between the probe and training, at training's first step, while a
    checkpoint loads. That rank then said an error the launcher drops, and the launcher its
    fallback line, not rank 0's interrupt line. A lost contact with no signal before it stays an
    error. Where the launcher reports the signal (trainer.interrupt.reported_by_launcher:
    torchrun's SIGTERM after another rank failed), the rank stops quietly, as _raise_interrupt does."""
    from trainer.interrupt import reported_by_launcher
    group = sys.modules.get("trainer.distributed.ranks")  # loaded wherever a collective ran
    if received() is None or group is None:
        return False
    from trainer.errors import TrainError
    lost = (isinstance(e, TrainError) and group.LOST_CONTACT in str(e)) or (under_torchrun() and group.is_peer_failure(e))
    if lost and received() in reported_by_launcher():
        interrupts.said()
    if lost:  # training's line then says why its promised checkpoint was not written
        interrupts.peer_left()
    return lost


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
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not where SIGINT is ignored (a background job)
        old[signal.SIGINT] = signal.signal(signal.SIGINT, _ctrl_c)
    old_hook, sys.unraisablehook = sys.unraisablehook, _stop_in_finalizer(sys.unraisablehook)
    try:
        if several:
            die_with_launcher()
            # a Ctrl-C while each rank imports torch and joins (a second or more): one line, from rank 0
            interrupts.during(STARTING)
            _start_group()
            interrupts.during(interrupts.DEFAULT_LINE)
        yield
    finally:
        _cancel_again()  # the command is over: a re-raise still due would land in the exit (a traceback)
        for sig, handler in old.items():
            signal.signal(sig, handler)
        sys.unraisablehook = old_hook
        # only where the group's module loaded whole: after a Ctrl-C inside `import torch`,
        # importing it again fails on the half-built torch, with tracebacks instead of the line
        if several and "trainer.distributed.ranks" in sys.modules:
            sys.modules["trainer.distributed.ranks"].stop()
        if several:
            _remove_dead_launchers_folder()


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


def _remove_dead_launchers_folder() -> None:
    """On the way out of a rank whose launcher died (_launcher_died): the launcher's folder
    (relaunch's, NOTES_PREFIX<its pid>-*, named by interrupts.SAID_ENV), which a launcher killed
    with SIGKILL cannot remove; else it stayed in the temporary folder until the next launch.
    Every rank tries (one may end before the others; a later rank's error line, its file gone,
    is then printed by the rank itself, as no launcher reads it). Nothing else is removed."""
    folder = os.path.dirname(os.environ.get(interrupts.SAID_ENV, ""))
    launcher = os.environ.get(LAUNCHED_ENV, "")
    if _death["told"] and folder and os.path.basename(folder).startswith(f"{NOTES_PREFIX}{launcher}-"):
        shutil.rmtree(folder, ignore_errors=True)


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
