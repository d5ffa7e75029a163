"""autofit under torchrun: the process group of a command, each rank's device, and
`autofit run --nproc-per-node N`, which starts torchrun for the user.

- `torchrun --nproc_per_node N -m autofit run ...` (or any torchrun rendezvous, multi-node
  included) starts N copies of the command; session() joins them into one process group at the
  start of the command and leaves it at the end, on success, error, Ctrl-C and SIGTERM.
- Each rank opens its own device: on CUDA the GPU named by LOCAL_RANK; on the CPU, a budgeted
  device whose budget can differ per rank (AUTOFIT_RANK_BUDGETS=3MiB,2MiB: rank 0 gets 3 MiB,
  rank 1 2 MiB), so that ranks with different cards can be tried on one machine.
- relaunch() runs torchrun's own launcher (torch.distributed.run) in this process with
  --standalone, and turns its failure report into one line per failed rank.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
from typing import Iterator

from autofit.device import DeviceError

RANK_BUDGETS_ENV = "AUTOFIT_RANK_BUDGETS"


def ranks():
    """This process's trainer.distributed.Ranks from torchrun's environment (rank 0 of 1
    without torchrun)."""
    from trainer.distributed import Ranks
    return Ranks.from_env()


def under_torchrun() -> bool:
    """Whether torchrun started this process as one of several ranks (no torch import needed)."""
    return os.environ.get("WORLD_SIZE", "1").strip() not in ("", "1")


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
    from trainer.distributed import check_divisible
    check_divisible(cfg.effective_batch, nproc_per_node or ranks().world_size)


def quiet_unless_rank0(console, err_console) -> None:
    """Under torchrun only rank 0 prints the plan, the progress, the logs and --json's output
    (the other ranks' stdout goes to os.devnull); every rank still prints its own error line."""
    if under_torchrun() and not ranks().master:
        console.quiet = err_console.quiet = True
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process


def error_prefix(msg: str) -> str:
    """'rank N: ' before an error line under torchrun (unless the message names its rank)."""
    if not under_torchrun():
        return ""
    r = ranks()
    return "" if msg.startswith(f"rank {r.rank}:") else f"rank {r.rank}: "


def rank_budget(budget_bytes: int | None) -> int | None:
    """This rank's CPU budget: its entry of AUTOFIT_RANK_BUDGETS when that is set (one size per
    rank, comma-separated), else `budget_bytes`. Raises DeviceError for a list that does not
    name every rank, or a size that does not parse."""
    from autofit.units import parse_size
    raw = os.environ.get(RANK_BUDGETS_ENV, "").strip()
    if not raw:
        return budget_bytes
    r = ranks()
    items = [v.strip() for v in raw.split(",")]
    if len(items) != r.world_size:
        raise DeviceError(f"{RANK_BUDGETS_ENV} names {len(items)} budget(s) for {r.world_size} rank(s); give one "
                          f"per rank, e.g. {RANK_BUDGETS_ENV}=3MiB,2MiB")
    try:
        return parse_size(items[r.rank])
    except ValueError as e:
        raise DeviceError(f"{RANK_BUDGETS_ENV}: rank {r.rank}'s budget {items[r.rank]!r}: {e}") from None


def cpu_share(budget_bytes: int | None) -> int | None:
    """A budgeted CPU device's default budget under torchrun: the usual share of the RAM available
    now, divided among this machine's ranks (LOCAL_WORLD_SIZE), which all take it at once.
    `budget_bytes` when one was given; None (the device's own default) without torchrun."""
    if budget_bytes is not None or not under_torchrun():
        return budget_bytes
    from autofit.cpu import default_cpu_budget
    return default_cpu_budget() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", ranks().world_size)))


def gpu_index(default: int) -> int:
    """The GPU a rank opens: LOCAL_RANK under torchrun (one GPU per rank), else `default`."""
    r = ranks()
    return r.local_rank if r.several else default


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt  # the command's with-blocks unwind, and the group is left


@contextlib.contextmanager
def session() -> Iterator[None]:
    """The command's process group under torchrun (nothing with one process): joined before the
    command touches a device (on CUDA the rank's GPU is set first, after the allocator
    settings), left afterwards whatever happens. SIGTERM unwinds like Ctrl-C until training
    installs its own handler (finish the step, checkpoint, stop)."""
    if not under_torchrun():
        yield
        return
    import torch

    from trainer import distributed
    kind = "cpu"
    if torch.cuda.is_available():
        from autofit.cuda import set_allocator_conf
        set_allocator_conf()  # before set_device initialises CUDA
        kind = "cuda"
    old = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        distributed.start(kind, ranks())
        yield
    finally:
        signal.signal(signal.SIGTERM, old)
        distributed.stop()


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


def relaunch(argv: list[str], nproc: int) -> int:
    """Runs `python -m autofit <argv minus --nproc-per-node>` on `nproc` ranks of this machine
    through torchrun's launcher (--standalone: a local rendezvous on a free port). Returns the
    exit code: 0, or the first failed rank's (signals as 128 + number), after one line per
    failed rank on stderr. For several machines, run torchrun yourself with its rendezvous
    options (README: Several GPUs)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run
    args = parse_args(["--standalone", f"--nproc-per-node={nproc}", "-m", "autofit", *strip_nproc(argv)])
    try:
        run(args)
    except ChildFailedError as e:
        codes = []
        for rank, f in sorted(e.failures.items()):
            how = f"signal {f.signal_name()}" if f.exitcode < 0 else f"exit code {f.exitcode}"
            print(f"autofit: rank {rank} stopped with {how}", file=sys.stderr)
            codes.append(128 - f.exitcode if f.exitcode < 0 else f.exitcode)
        return codes[0] if codes else 1
    except SignalException as e:  # Ctrl-C / SIGTERM: torchrun passed it on and waited for the ranks
        print(f"autofit: stopped by {signal.Signals(e.sigval).name}; the ranks were told to checkpoint and stop",
              file=sys.stderr)
        return 128 + int(e.sigval)
    return 0
