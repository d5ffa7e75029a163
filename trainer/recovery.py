"""The out-of-memory policy of a run: which micro-batches a step uses, and what changes when the
device runs out of memory (or the allocator starts thrashing).

After an OOM the loop cleans up and redoes the same optimizer step on the same data with the
micro-batches this policy gives:
- in the first compiled steps (the compile window) the OOM is blamed on compilation: a smaller
  size that a compiled trial showed to fit, else eager at the same size (eager trials showed it
  fits);
- otherwise the next size from the shrink policy (the largest smaller size a trial showed to fit,
  else half), the effective batch kept exact by the split.
"""
from __future__ import annotations

from typing import Callable

from trainer.compiler import COMPILE_WINDOW
from trainer.errors import TrainError
from trainer.step import split_batch

THRASH_STEPS = 3  # consecutive steps with rising allocator retries that count as an OOM
# Thrashing is confirmed (a lesson for the profile) only with the reserved peak this near the
# allocator's limit; rising retries far from it are fragmentation the shrink may not need.
THRASH_NEAR_LIMIT = 0.90

ShrinkPolicy = Callable[[int], "int | None"]


def shrink_policy(fit_sizes: list[int]) -> ShrinkPolicy:
    """After an OOM at micro-batch m: the largest size below m that a trial showed to fit, else
    half of m (the redone step then confirms it); None when m is 1."""
    known = sorted(set(fit_sizes))

    def shrink(failed: int) -> int | None:
        smaller = [s for s in known if s < failed]
        if smaller:
            return smaller[-1]
        return failed // 2 if failed > 1 else None
    return shrink


def halve(failed: int) -> int | None:
    """The default policy with no trials to go by."""
    return failed // 2 if failed > 1 else None


class Recovery:
    """The micro-batches of every optimizer step (sum = the rank's batch, kept exact) and how
    they change after an out-of-memory error."""

    def __init__(self, rank_batch: int, micro_batch: int, shrink: ShrinkPolicy | None = None,
                 compiled_fit_sizes: list[int] | None = None):
        self.rank_batch = rank_batch
        self.micro_batches = split_batch(rank_batch, micro_batch)
        self.shrink = shrink or halve
        self.compiled_fit_sizes = list(compiled_fit_sizes or [])
        self.compile_window_end = -1

    def compiled_at(self, step: int) -> None:
        """New compiled shapes from `step` on: OOMs in the next steps are compilation's."""
        self.compile_window_end = step + COMPILE_WINDOW

    def after_oom(self, step: int, compiled: bool, reason: str) -> tuple[str, dict]:
        """What to do after an OOM at `step`: (event kind, its fields). Kinds: 'compile_oom_shrink'
        (smaller compiled micro-batches), 'compile_fallback_eager' (the caller drops the compiled
        module; same micro-batches), 'oom_shrink' (smaller micro-batches). Raises TrainError when
        no smaller micro-batch is left."""
        failed = max(self.micro_batches)
        if compiled and step < self.compile_window_end:
            smaller = [s for s in self.compiled_fit_sizes if s < failed]
            if not smaller:
                return "compile_fallback_eager", {"micro_batch": failed}
            return "compile_oom_shrink", self._resize(failed, max(smaller))
        new = self.shrink(failed)
        if not new or new >= failed:
            raise TrainError(f"out of memory at step {step} with micro-batch {failed}, "
                             f"and no smaller micro-batch is left to try ({reason})")
        if compiled:  # the new shapes compile now: the compile fallbacks apply again
            self.compiled_at(step)
        return "oom_shrink", self._resize(failed, new)

    def _resize(self, old: int, new: int) -> dict:
        """Micro-batches of at most `new`, balanced; the event names the size they really have."""
        self.micro_batches = split_batch(self.rank_batch, new)
        return {"old_micro_batch": old, "new_micro_batch": max(self.micro_batches),
                "micro_batches": self.micro_batches, "effective_batch": sum(self.micro_batches)}


class ThrashDetector:
    """Allocator thrashing: the caching allocator's retry count rising for THRASH_STEPS steps in
    a row means it frees and retries at every step, the last stop before an OOM."""

    def __init__(self):
        self.prev: int | None = None
        self.rising = 0

    def observe(self, retries: int) -> bool:
        """Feed the retry count after a step; True when the run should shrink now."""
        self.rising = self.rising + 1 if self.prev is not None and retries > self.prev else 0
        self.prev = retries
        if self.rising >= THRASH_STEPS:
            self.rising = 0
            return True
        return False
