"""Host batches for training: each optimizer step's whole batch, drawn by the sampler, pinned
for an asynchronous copy to a GPU, and the next step's batch prepared in a background thread
while the current step runs, so the GPU does not wait on the data.

The sampler's counter moves only when a batch is taken, never when one is prepared, so a
checkpoint's sampler state is the same with or without the look-ahead and a resumed run sees
exactly the batches it would have seen.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from trainer.data.datasets import BatchSampler

# Above this many bytes of token ids (x and y, int64) a step's batch is never read whole: it is a
# LazyStepBatch, read one micro-batch at a time. 256 MiB is ~1M tokens; nanoGPT's GPT-2 step
# (480 x 1024 on one GPU) is 7.5 MiB. gradient_accumulation_steps = 1000000 would be 977 MiB+.
WHOLE_BATCH_MAX_BYTES = 256 * 1024**2


def held_rows(n: int, block_size: int) -> int:
    """How many of a step's n sequences the host holds at once: all n when the batch is read
    whole (at most WHOLE_BATCH_MAX_BYTES of token ids), else none beyond the micro-batch in use."""
    return n if whole_batch(n, block_size) else 0


def whole_batch(n: int, block_size: int) -> bool:
    return 2 * 8 * n * block_size <= WHOLE_BATCH_MAX_BYTES


class LazyStepBatch:
    """One step's batch of sequences, known by where they start (8 bytes each) and read a
    micro-batch at a time: `rows(start, stop)` gives x, y int64 (stop - start, block_size),
    the same rows the whole batch would hold there. trainer.step.train_step takes it as x (with
    y = None); every target of a sampled window counts (no ignored tokens)."""

    def __init__(self, sampler: BatchSampler, split: str, offsets: np.ndarray, pin: bool = False):
        self.sampler, self.split, self.offsets, self.pin = sampler, split, offsets, pin
        self.block_size = sampler.block_size

    def __len__(self) -> int:
        return len(self.offsets)

    def rows(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.sampler.read_rows(self.split, self.offsets[start:stop])
        return (x.pin_memory(), y.pin_memory()) if self.pin else (x, y)


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

    def take(self, n: int) -> tuple[torch.Tensor, torch.Tensor] | tuple[LazyStepBatch, None]:
        """This step's batch of n sequences (this rank's rows of it); the sampler moves on by one.
        A batch of more than WHOLE_BATCH_MAX_BYTES of token ids comes as (LazyStepBatch, None):
        its rows are read micro-batch by micro-batch, never all at once."""
        counter = self.sampler.counters.get(self.split, 0)
        if not whole_batch(n, self.sampler.block_size):
            offsets = self.sampler.offsets_at(self.split, n, counter, self.rows(n) if self.rows else None)
            self.sampler.counters[self.split] = counter + 1
            return LazyStepBatch(self.sampler, self.split, offsets, self.pin), None
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

    def set_block_size(self, block_size: int) -> None:
        """A new stage's sequence length (trainer/config/stages.py) from the next take on: the
        batch prepared ahead at the old length is dropped (waited for if it is being read)."""
        ahead, self._next = self._next, None
        if ahead is not None and not ahead[2].cancel():
            ahead[2].exception()  # wait: it reads the sampler's block size
        self.sampler.block_size = block_size

    def close(self) -> None:
        if self._next is not None:
            self._next[2].cancel()
        self._pool.shutdown(wait=True)
