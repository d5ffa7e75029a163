"""Several processes, one training run, on PyTorch's own engine: torchrun starts the ranks,
torch.distributed connects them (NCCL on CUDA, gloo on the CPU), DDP or FSDP2 trains
(trainer/distributed/sharding.py holds the two wrappers).

This module holds what every rank must agree on:
- who it is (Ranks, from torchrun's RANK / LOCAL_RANK / WORLD_SIZE);
- its rows of each step's batch: every rank draws the same batch of E sequences from the
  counter-based sampler and keeps its own disjoint slice, so a 2-rank and a 1-rank run with the
  same effective batch see the same sequences per step, and the sampler's counter (one per
  step, the same on every rank) keeps the data position across a change of world size;
- the outcome of every attempt at an optimizer step (agree): an out-of-memory error, or any
  error, on one rank is known to all before any of them moves on, together with a pending
  Ctrl-C / SIGTERM, so every rank shrinks, redoes or stops at the same step.
"""
from __future__ import annotations

import datetime
import os
import re
import sys
from dataclasses import dataclass
from typing import NoReturn

import torch
import torch.distributed as dist

from trainer.errors import TrainError

# Slots of the tensor one agreement round all-reduces (MAX): what any rank saw.
REAL_OOM, INJECTED_OOM, ERROR, STOP, UNFINISHED = range(5)
TIMEOUT_ENV = "AUTOFIT_DIST_TIMEOUT"  # seconds a collective may wait for the other ranks
MIN_TIMEOUT_S = 1


@dataclass(frozen=True)
class Ranks:
    """This process's place in the run: torchrun's RANK (global), LOCAL_RANK (on this node,
    which names the GPU) and WORLD_SIZE. One process without torchrun is rank 0 of 1."""
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @classmethod
    def from_env(cls) -> "Ranks":
        """Raises TrainError for values that are not integers or out of range."""
        try:
            world = int(os.environ.get("WORLD_SIZE", 1))
            rank = int(os.environ.get("RANK", 0))
            local = int(os.environ.get("LOCAL_RANK", rank if world > 1 else 0))
        except ValueError:
            raise TrainError("RANK, LOCAL_RANK and WORLD_SIZE must be integers (torchrun sets them)") from None
        if world < 1 or not 0 <= rank < world:
            raise TrainError(f"RANK={rank}, WORLD_SIZE={world}: WORLD_SIZE must be at least 1 and RANK in "
                             f"0..WORLD_SIZE-1 (torchrun sets them)")
        if local < 0:
            raise TrainError(f"LOCAL_RANK={local}: it must be at least 0 (torchrun sets it)")
        return cls(rank, local, world)

    @property
    def master(self) -> bool:
        return self.rank == 0

    @property
    def several(self) -> bool:
        return self.world_size > 1

    def rows(self, step_batch: int) -> slice:
        """This rank's rows of a step's batch of `step_batch` sequences (which the world size
        divides: trainer.distributed.shares.check_divisible)."""
        share = step_batch // self.world_size
        return slice(self.rank * share, (self.rank + 1) * share)


def backend_for(device_type: str) -> str:
    """NCCL for CUDA tensors, gloo for the CPU's (and a CUDA run's CPU-side agreements)."""
    if device_type == "cuda" and dist.is_nccl_available():
        return "cpu:gloo,cuda:nccl"
    return "gloo"


def timeout() -> datetime.timedelta | None:
    """How long a collective waits for the other ranks (AUTOFIT_DIST_TIMEOUT seconds; None:
    torch's default, 10 minutes for NCCL and 30 for gloo). Bounds a hang on a rank that is
    stuck, not dead: a dead rank's sockets close, and the others fail at once."""
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    if not raw:
        return None
    try:
        seconds = float(raw)
        # nan too; below a second c10d's wait rounds to 0 ms and the first collective times out
        if not seconds >= MIN_TIMEOUT_S:
            raise ValueError
        return datetime.timedelta(seconds=seconds)  # inf, 1e20: OverflowError
    except (ValueError, OverflowError):
        raise TrainError(f"{TIMEOUT_ENV} must be a finite number of seconds, at least {MIN_TIMEOUT_S}, "
                         f"got {raw!r}") from None


def start(device_type: str, ranks: Ranks | None = None) -> bool:
    """Joins the process group of a torchrun run (env:// rendezvous), unless it is joined
    already or this is one process. On CUDA the rank's GPU (LOCAL_RANK) is set first, so no
    CUDA context lands on GPU 0 by accident. Returns True when this call joined it (the caller
    then owns destroy_process_group: stop())."""
    ranks = ranks or Ranks.from_env()
    if not ranks.several or dist.is_initialized():
        return False
    if device_type == "cuda":
        torch.cuda.set_device(ranks.local_rank)
    kwargs = {"timeout": timeout()} if timeout() is not None else {}
    try:
        dist.init_process_group(backend_for(device_type), **kwargs)
    except (RuntimeError, ValueError) as e:
        raise TrainError(f"rank {ranks.rank}: cannot join the other {ranks.world_size - 1} rank{'s' * (ranks.world_size != 2)} ({first_line(e)}); "
                         f"start several ranks with torchrun or autofit run --nproc-per-node N") from None
    return True


def stop() -> None:
    """destroy_process_group, when one is joined (on success, error, Ctrl-C and SIGTERM alike)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def exit_rank(code: int) -> NoReturn:
    """Ends one of several ranks' processes with exit status `code`, once its work is done and
    the group left (stop()): standard streams and logging flushed, then os._exit, without the
    interpreter's teardown. Why: destroy_process_group leaves the gloo backend alive while
    anything still holds the group (FSDP2's module state does, and DDP's reducer), and its
    worker threads release each finished collective's tensors a moment after the caller's wait
    returned. When that release falls into the teardown (a loaded machine delays the thread),
    the thread cannot take the GIL any more, Python ends it, and the C++ runtime aborts the
    process ('terminate called without an active exception', SIGABRT): a rank that finished
    its run would then fail it. With one process this is sys.exit(code)."""
    try:
        several = Ranks.from_env().several
    except TrainError:  # torchrun's variables are wrong: said already, and no group was joined
        several = False
    if not several:
        sys.exit(code)
    import logging
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing more can be said there
            pass
    os._exit(code)


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


# ------------------------------------------------------------------------------- failures

class RankFailed(TrainError):
    """Another rank failed with an error that is not an out-of-memory one; this rank stops too."""


class OtherRankOOM(torch.OutOfMemoryError):
    """Another rank ran out of memory in this attempt at the step: this rank cleans up, shrinks and
    redoes it as after its own OOM, but tells the agreement of no failure of its own (as under DDP,
    where it learns of it in the step's settle). `agreed`: the ranks have already exchanged the
    outcome of this attempt, so it is not reported again; `injected`: every OOM was an injected
    fault; `rank`: the rank the message names (the highest that failed, as failed_rank)."""

    def __init__(self, message: str, injected: bool, agreed: bool = True, rank: int | None = None):
        super().__init__(message)
        self.injected = injected
        self.agreed = agreed
        self.rank = rank


# Errors of a collective whose peer has gone (gloo's closed sockets, NCCL's aborted
# communicators, the store's lost connection): not a bug in this rank.
_PEER_WORDS = ("connection reset", "connection closed", "connection refused", "broken pipe",
               "nccl communicator", "ncclremoteerror", "timed out", "timeout", "socket", "gloo")


def is_peer_failure(exc: BaseException) -> bool:
    """True when `exc` says another rank is gone or stuck (torch.distributed's DistError, or a
    RuntimeError from gloo/NCCL about a closed connection or a timeout)."""
    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    return isinstance(exc, RuntimeError) and any(w in str(exc).lower() for w in _PEER_WORDS)


# gloo's and NCCL's messages open with the C++ source line that raised: '[../third_party/gloo/
# gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:4242'. Not for users.
_SOURCE_PATH = re.compile(r"\[[^\]\s]*\.(?:cc|cpp|cu|h|hpp):\d+\]\s*")
LOST_CONTACT = "lost contact with another rank"
# Words of the lines a rank says when it stops because of another rank: consequences, which the
# launcher (autofit.launch.torchrun.failed_lines) leaves out when the cause is known.
# A rank that gives up after another rank's OOM ('out of memory at step 3 with micro-batch 1, and
# no smaller micro-batch is left to try (rank 1 ran out of memory in this step)') says a consequence
# too: the rank that ran out of memory says the cause, with its own allocator's words.
OTHER_OOM = "ran out of memory"
# Its own error says why: printed by --nproc-per-node's launcher, or in a user's torchrun's summary
# (its root cause), where rank 0's line goes too (autofit.launch.torchrun.report_error). Every line
# that names another rank's failure and ends in these words is a consequence.
OWN_ERROR = "(its own error says why)"
OTHER_FAILED = f"failed in this step {OWN_ERROR}"
# Before step 0: a rank's optimizer state did not fit (trainer.redo: no smaller micro-batch can
# help, so every rank stops; the rank that ran out says why, with its allocator's words). In
# evaluation at eval micro-batch 1 likewise (trainer.evaluate: 'rank 1 ran out of memory in ...').
OTHER_PRIME_OOM = f"{OTHER_OOM} making the optimizer's state {OWN_ERROR}"
CONSEQUENCES = (LOST_CONTACT, OWN_ERROR, f"{OTHER_OOM} in this step)")


def peer_lost(exc: BaseException, ranks: Ranks) -> TrainError:
    """The one line of a collective whose peer has gone (or this rank's OOM in it), the reason without C++ source
    paths, once (a TrainError already said, from a deeper collective, is returned as it is, not wrapped again)."""
    if isinstance(exc, TrainError):
        return exc
    reason = _SOURCE_PATH.sub("", first_line(exc)).strip() or type(exc).__name__
    oom = isinstance(exc, torch.OutOfMemoryError)  # its own allocation failed (DDP's wrap): the cause (t10's M1)
    what, then = ("out of memory in a collective with the other ranks", "give this rank more memory") if oom \
        else (LOST_CONTACT, "the last checkpoint is kept")
    return TrainError(f"rank {ranks.rank}: {what} ({reason}); stopping here, {then}")


# ------------------------------------------------------------------------------- agreements

class Agreement:
    """The rounds in which the ranks exchange what happened in an attempt at an optimizer step.

    Each round is one all_reduce (MAX) of [real OOM, injected OOM, other error, stop wanted,
    unfinished]; a failure is entered as the failing rank + 1, so the others can name it. A rank
    that finished its attempt (ok or failed) calls `outcome`, which repeats rounds until no rank
    is unfinished; a rank still inside the step can answer a round with
    `check_in` (FSDP2's per-block checks), which raises OtherRankOOM when a rank has failed.
    Under DDP's deferred sync no rank communicates mid-step, so one round settles a step.
    The flag tensor is made once: no allocation can fail on the way to telling the others.
    Modelled on Composer's auto-microbatching (its trainer all-reduces a found_cuda_oom flag and
    an all_ranks_finished flag in the same way), with the stop request carried along.
    """

    def __init__(self, ranks: Ranks):
        self.ranks = ranks
        # On the host, through gloo even in a CUDA run (backend_for): no wait for the GPU's stream, no device memory
        self.flags = torch.zeros(5, dtype=torch.int64)
        self.stop_wanted = lambda: False  # set by the loop: a signal arrived on this rank
        self.agreed_stop = False
        self.reason = ""  # after an error: the failing rank's line (outcome)

    def _round(self, values: list[int]) -> list[int]:
        for i, v in enumerate(values):
            self.flags[i] = v
        try:
            dist.all_reduce(self.flags, op=dist.ReduceOp.MAX)
        except Exception as e:  # a peer is gone: this rank cannot agree with anyone
            raise peer_lost(e, self.ranks) from None
        return [int(v) for v in self.flags.tolist()]

    def outcome(self, failure: str | None = None, reason: str = "") -> list[int]:
        """Tells the others how this rank's attempt ended (failure: None, 'oom', 'injected' or 'error',
        whose line is `reason`); returns what every rank saw, once none is still inside the step. Sets
        agreed_stop (any rank wants to stop after it), and after an error `reason`, the failing rank's
        line: every rank ends in this one round, so all gather it (r4: a rank whose data failed was
        known to the others only as lost contact, when its process ended)."""
        mine = [0] * 5
        slot = {"oom": REAL_OOM, "injected": INJECTED_OOM, "error": ERROR}.get(failure or "")
        if slot is not None:
            mine[slot] = self.ranks.rank + 1
        while True:
            mine[STOP] = int(self.stop_wanted())
            seen = self._round(mine)
            if not seen[UNFINISHED]:
                self.agreed_stop = bool(seen[STOP])
                try:  # on the failing rank a failed gather must not hide its own error
                    self.reason = all_gather_objects(reason, self.ranks)[seen[ERROR] - 1] if seen[ERROR] else ""
                except TrainError:
                    if not reason:
                        raise
                return seen

    def check_in(self) -> None:
        """A round from inside the step: raises OtherRankOOM (not yet agreed: the caller's
        failure path calls outcome) when another rank has failed."""
        seen = self._round([0, 0, 0, 0, 1])
        if seen[REAL_OOM] or seen[INJECTED_OOM] or seen[ERROR]:
            # another error becomes RankFailed in the outcome round that follows (raise_for)
            what = "failed" if seen[ERROR] else OTHER_OOM
            raise OtherRankOOM(f"{failed_rank(seen)} {what} in this step", injected=not seen[REAL_OOM],
                               agreed=False, rank=max(seen[REAL_OOM], seen[INJECTED_OOM], seen[ERROR]) - 1)

    def settle(self) -> None:
        """The success path's round: raises OtherRankOOM (agreed) when another rank ran out of
        memory, RankFailed when one failed otherwise."""
        seen = self.outcome(None)
        raise_for(seen, self.ranks, self.reason)


def failed_rank(seen: list[int]) -> str:
    """'rank N' for the (highest) rank whose failure an agreement saw."""
    return f"rank {max(seen[REAL_OOM], seen[INJECTED_OOM], seen[ERROR]) - 1}"


def oom_rank(seen: list[int]) -> int | None:
    """The (highest, as failed_rank) rank that ran out of memory in an agreed attempt, None when none did."""
    return max(seen[REAL_OOM], seen[INJECTED_OOM]) - 1 if seen[REAL_OOM] or seen[INJECTED_OOM] else None


def raise_for(seen: list[int], ranks: Ranks, reason: str = "") -> None:
    """Turns an agreed outcome into this rank's exception (nothing when every rank succeeded): RankFailed
    for another rank's error (with its line, `reason`, where known), OtherRankOOM for another's OOM."""
    if seen[ERROR]:
        raise rank_failed(seen, ranks, reason)
    if seen[REAL_OOM] or seen[INJECTED_OOM]:
        raise OtherRankOOM(f"{failed_rank(seen)} {OTHER_OOM} in this step", injected=not seen[REAL_OOM],
                           rank=oom_rank(seen))


def rank_failed(seen: list[int], ranks: Ranks, reason: str = "") -> RankFailed:
    """This rank's RankFailed for another rank's error in an agreed outcome (seen[ERROR] set): 'rank 0: rank 1
    failed in this step (its own error says why); stopping here too (rank 1: REASON)', the failing rank's line
    where the round gathered it (Agreement.reason), without the last bracket where not."""
    why = f" (rank {seen[ERROR] - 1}: {reason})" if reason else ""
    return RankFailed(f"rank {ranks.rank}: rank {seen[ERROR] - 1} {OTHER_FAILED}; stopping here too{why}")


def all_gather_objects(obj, ranks: Ranks) -> list:
    """Every rank's `obj` (picklable), in rank order; a single process gets [obj]."""
    if not ranks.several:
        return [obj]
    out: list = [None] * ranks.world_size
    try:
        dist.all_gather_object(out, obj)
    except Exception as e:
        raise peer_lost(e, ranks) from None
    return out


def any_over_ranks(flag: bool, ranks: Ranks) -> bool:
    """True when `flag` is True on any rank (an all_reduce MAX on the host, through gloo)."""
    if not ranks.several:
        return bool(flag)
    t = torch.tensor([int(bool(flag))])
    try:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    except Exception as e:
        raise peer_lost(e, ranks) from None
    return bool(t.item())


def mean_over_ranks(t: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """The mean of `t` over the ranks (a copy; `t` itself when there is one rank)."""
    if not ranks.several:
        return t
    out = t.detach().clone()
    try:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    except Exception as e:
        raise peer_lost(e, ranks) from None
    return out / ranks.world_size


SIGNAL_AT_ENV = "AUTOFIT_FAULT_SIGNAL_AT"
SIGNAL_WAITS = ("budget", "trials", "training")  # where signal_at() is called


def signal_at(wait: str, ranks: Ranks) -> None:
    """AUTOFIT_FAULT_SIGNAL_AT=WAIT (a test's fault, under `--nproc-per-node`): at the named wait (SIGNAL_WAITS) the
    ranks meet (a barrier); then rank 1 plays the rank a few milliseconds behind, outside any StopFlag: with Python's
    own Ctrl-C handler it sends SIGINT to the launcher (which passes it on to every rank, as a terminal's Ctrl-C) and
    waits for its own, which ends it; the others go on into the wait's collective without it: the order of events a
    busy machine gives now and then, every time. Unset, another wait, or one process: nothing."""
    from trainer.interrupt import LAUNCHER_ENV
    launcher = os.environ.get(LAUNCHER_ENV, "")
    if os.environ.get(SIGNAL_AT_ENV) != wait or not ranks.several or not launcher.isdigit():
        return
    import signal
    import time
    dist.barrier()
    if ranks.rank != 1:
        return
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.kill(int(launcher), signal.SIGINT)
    while True:
        time.sleep(3600)
