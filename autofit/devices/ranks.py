"""What a rank's device depends on under torchrun: whether this process is one of several ranks,
its GPU (LOCAL_RANK) and its CPU budget (AUTOFIT_RANK_BUDGETS, or a share of the RAM). Read from
torchrun's environment; the process group itself is autofit.launch.torchrun's."""
from __future__ import annotations

import os

from autofit.devices.info import RANK_BUDGETS_ENV, DeviceError
from trainer.errors import counted


def ranks():
    """This process's trainer.distributed.ranks.Ranks from torchrun's environment (rank 0 of 1
    without torchrun)."""
    from trainer.distributed.ranks import Ranks
    return Ranks.from_env()


def under_torchrun() -> bool:
    """Whether torchrun started this process as one of several ranks (no torch import needed)."""
    return os.environ.get("WORLD_SIZE", "1").strip() not in ("", "1")


def env_rank() -> int | None:
    """This process's RANK under torchrun, read from the environment without importing torch (a
    Ctrl-C that fell into torch's import must not import it again to say so); None without
    torchrun, or where RANK/WORLD_SIZE are not integers in range (that error is itself being said)."""
    if not under_torchrun():
        return None
    try:
        rank, world = int(os.environ.get("RANK", "0")), int(os.environ["WORLD_SIZE"])
    except ValueError:
        return None
    return rank if 0 <= rank < world else None


def other_rank() -> bool:
    """Whether this process is a rank other than 0 under torchrun (it leaves the talking to rank 0)."""
    rank = env_rank()
    return rank is not None and rank != 0


def budget_flag() -> str:
    """Where this process's CPU budget was given, for advice: AUTOFIT_RANK_BUDGETS where it is set
    (each torchrun rank's), else --budget."""
    return RANK_BUDGETS_ENV if os.environ.get(RANK_BUDGETS_ENV, "").strip() else "--budget"


def rank_budget(budget_bytes: int | None) -> int | None:
    """This rank's CPU budget: its entry of AUTOFIT_RANK_BUDGETS when that is set (one size per
    rank, comma-separated), else `budget_bytes`. Raises DeviceError for a list that does not
    name every rank, a size that does not parse or has no unit (entry_bytes), or the variable set
    on one process."""
    raw = os.environ.get(RANK_BUDGETS_ENV, "").strip()
    if not raw:
        return budget_bytes
    if not under_torchrun():  # a variable left exported from a test session took over --budget in silence
        raise DeviceError(f"{RANK_BUDGETS_ENV} gives each of several torchrun ranks its own CPU budget, and this is "
                          f"one process: unset it (--budget sets this process's)")
    r = ranks()
    items = [v.strip() for v in raw.split(",")]
    if len(items) != r.world_size:
        raise DeviceError(f"{RANK_BUDGETS_ENV} names {counted(len(items), 'budget')} for "
                          f"{counted(r.world_size, 'rank')}; give one per rank, e.g. {RANK_BUDGETS_ENV}=3MiB,2MiB")
    try:
        return entry_bytes(items[r.rank])
    except ValueError as e:
        # starts with the rank, so error_prefix adds no second 'rank N:'
        raise DeviceError(f"rank {r.rank}: its budget in {RANK_BUDGETS_ENV}, {items[r.rank]!r}: {e}") from None


def entry_bytes(item: str) -> int:
    """Bytes of one AUTOFIT_RANK_BUDGETS entry, read as --budget is (autofit.cli.common._size):
    raises ValueError (its words) for junk, and for a bare number under 1 MiB, a missing unit
    (autofit.units.missing_unit: '3' is 3 bytes, where 3GiB was meant)."""
    from autofit.units import missing_unit, parse_size
    n = parse_size(item)
    if why := missing_unit(item):
        raise ValueError(why)
    return n


def check_rank_budgets(nproc: int) -> list[int] | None:
    """Before torchrun starts `nproc` ranks (--nproc-per-node): AUTOFIT_RANK_BUDGETS, where it is set,
    reads as one size with its unit per rank (entry_bytes), so a bad entry or a list of another length
    is one line here, not one per rank after they started (rank_budget still checks both, for a
    torchrun the user starts). Returns the sizes in bytes, rank 0 first; None where it is not set.
    Raises DeviceError naming the variable and the entry, or the number of entries and `nproc`."""
    raw = os.environ.get(RANK_BUDGETS_ENV, "").strip()
    if not raw:
        return None
    items = [v.strip() for v in raw.split(",")]
    given = [v for v in items if v]
    # the user's own entries, cut or repeated to one per rank; past 8 ranks the line would be too long
    example = f", e.g. {RANK_BUDGETS_ENV}={','.join((given + given[-1:] * nproc)[:nproc])}" if given and nproc <= 8 else ""
    if "" in items:  # '3MiB,' was "rank 1's budget, '': not a size", a rank --nproc-per-node 1 does not start
        raise DeviceError(f"{RANK_BUDGETS_ENV}={raw}: entry {items.index('') + 1} of {len(items)} is empty (a comma "
                          f"too many?); give one size per rank, comma-separated{example}")
    sizes = []
    for rank, item in enumerate(items):
        try:
            sizes.append(entry_bytes(item))
        except ValueError as e:
            raise DeviceError(f"{RANK_BUDGETS_ENV}={raw}: rank {rank}'s budget, {item!r}: {e}") from None
    if len(items) != nproc:
        raise DeviceError(f"{RANK_BUDGETS_ENV}={raw} names {counted(len(items), 'budget')} for --nproc-per-node "
                          f"{nproc}; give one per rank, comma-separated{example}")
    return sizes


def cpu_share(budget_bytes: int | None) -> int | None:
    """A budgeted CPU device's default budget under torchrun: the usual share of the RAM available
    now, divided among this machine's ranks (LOCAL_WORLD_SIZE), which all take it at once.
    `budget_bytes` when one was given; None (the device's own default) without torchrun."""
    if budget_bytes is not None or not under_torchrun():
        return budget_bytes
    from autofit.devices.cpu import default_cpu_budget
    return default_cpu_budget() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", ranks().world_size)))


def gpu_index(default: int) -> int:
    """The GPU a rank opens: LOCAL_RANK under torchrun (one GPU per rank), else `default`."""
    r = ranks()
    return r.local_rank if r.several else default
