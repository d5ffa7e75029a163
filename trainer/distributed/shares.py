"""Each rank's share of the effective batch: every rank takes the same number of sequences per
optimizer step (trainer.distributed.ranks.Ranks.rows), so the world size must divide the effective
batch. Nothing is rounded silently: a batch that does not divide is refused, naming the nearest
that do and the --set that makes one."""
from __future__ import annotations

from trainer.errors import TrainError


def nearest_divisible(effective_batch: int, world_size: int) -> tuple[int, int]:
    """The multiples of world_size just below (at least world_size) and just above
    effective_batch."""
    below = max(world_size, effective_batch // world_size * world_size)
    above = (effective_batch // world_size + 1) * world_size
    return below, above


def split_for(targets: tuple[int, ...], batch_size: int | None, grad_accum: int | None) -> str:
    """--set words for a batch_size x gradient_accumulation_steps whose product is one of `targets`
    (first preferred): the accumulation alone where batch_size divides one, else, for the first,
    the divisor nearest the config's accumulation with batch_size following."""
    for t in targets:
        if batch_size and t % batch_size == 0:
            return f"--set gradient_accumulation_steps={t // batch_size}"
    target = targets[0]
    ga = min((d for d in range(1, target + 1) if target % d == 0), key=lambda d: (abs(d - (grad_accum or 1)), d))
    return f"--set batch_size={target // ga} --set gradient_accumulation_steps={ga}"


def check_divisible(effective_batch: int, world_size: int, batch_size: int | None = None,
                    grad_accum: int | None = None) -> None:
    """Each rank's share of the effective batch must be whole: nothing is rounded silently.
    Raises TrainError naming the nearest effective batches that divide, and (given the config's
    batch_size and gradient_accumulation_steps) the --set that makes the nearest one."""
    if world_size > effective_batch:  # every rank needs a sequence: fewer ranks, not a bigger batch, is the fix
        raise TrainError(f"{world_size} ranks need at least one sequence each per step, and the effective batch "
                         f"(batch_size x gradient_accumulation_steps) is {effective_batch}: use at most "
                         f"{effective_batch} rank{'s' * (effective_batch != 1)}, or an effective batch that "
                         f"{world_size} divides")
    if world_size > 1 and effective_batch % world_size:
        lo, hi = nearest_divisible(effective_batch, world_size)
        options = f"{lo} or {hi}" if lo != hi and lo < effective_batch else f"{hi}"
        raise TrainError(f"the effective batch of {effective_batch} sequences (batch_size x "
                         f"gradient_accumulation_steps) does not divide among {world_size} ranks; the nearest that "
                         f"do are {options} (e.g. {split_for((hi, lo) if lo < effective_batch else (hi,), batch_size, grad_accum)})")
