"""Host batches for training: each optimizer step's whole batch, drawn by the sampler, pinned
for an asynchronous copy to a GPU, and the next step's batch prepared in a background thread
while the current step runs, so the GPU does not wait on the data.

The sampler's counter moves only when a batch is taken, never when one is prepared, so a
checkpoint's sampler state is the same with or without the look-ahead and a resumed run sees
exactly the batches it would have seen.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import torch

from trainer.data.datasets import BatchSampler


class StepBatches:
    """The training batches of a run: `take(n)` returns step k's (x, y), each n x block_size
    int64, and starts preparing step k+1's. `pin`: page-locked host memory (CUDA only), so the
    train step's non_blocking copies really overlap with compute. `rows`: with several ranks, the
    rank's share of each step's n sequences (trainer.distributed.ranks.Ranks.rows); take(n) then
    returns only those rows."""

    def __init__(self, sampler: BatchSampler, split: str = "train", pin: bool = False,
                 rows=None):
        self.sampler = sampler
        self.rows = rows  # None, or a callable: step batch size -> this rank's slice of it
        self.split = split
        self.pin = pin
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="autofit-batches")
        self._next: tuple[int, int, Future] | None = None  # (counter, n, future)

    def _prepare(self, counter: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.sampler.batch_at(self.split, n, counter, self.rows(n) if self.rows else None)
        if self.pin:
            x, y = x.pin_memory(), y.pin_memory()
        return x, y

    def take(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This step's batch of n sequences (this rank's rows of it); the sampler moves on by one."""
        counter = self.sampler.counters.get(self.split, 0)
        ahead = self._next
        if ahead is not None and ahead[0] == counter and ahead[1] == n:
            batch = ahead[2].result()
        else:  # nothing prepared (first step, after a resume, or the batch size changed)
            if ahead is not None:
                ahead[2].cancel()
            batch = self._prepare(counter, n)
        self.sampler.counters[self.split] = counter + 1
        self._next = (counter + 1, n, self._pool.submit(self._prepare, counter + 1, n))
        return batch

    def close(self) -> None:
        if self._next is not None:
            self._next[2].cancel()
        self._pool.shutdown(wait=True)
