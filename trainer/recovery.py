"""The out-of-memory policy of a run: which micro-batches a step uses, and what changes when the
device runs out of memory (or the allocator starts thrashing).

After an OOM the loop cleans up and redoes the same optimizer step on the same data with the
micro-batches this policy gives:
- in the first compiled steps (the compile window) the OOM is blamed on compilation: a smaller
  size that a compiled trial showed to fit (its shapes compile then: the window starts again),
  else eager at the same size (eager trials showed it fits);
- otherwise the next size from the shrink policy (the largest smaller size a trial showed to fit,
  else half), the effective batch kept exact by the split.

A staged run (trainer/config/stages.py) changes the step's batch and block size when a new stage
begins (StagedRun): the plan's micro-batch is the one fitted at the config's block_size (the
largest stage's); a stage of shorter sequences runs the most sequences whose tokens do not exceed
it (trainer.config.stages.stage_micro_batch), its effective batch exact. An out-of-memory shrink
in a stage works in the plan's units, sequences of block_size (the fit sizes' and the shrink
policy's): the failed micro-batch's tokens, the next fit size below them, run as the most of the
stage's sequences within its tokens. That lowers the token limit for the rest of the run (and is
kept in its checkpoint).
"""
from __future__ import annotations

from typing import Callable

from trainer.compiler import COMPILE_WINDOW
from trainer.config.stages import Stage, fitted_stage, stage_at, stage_micro_batch
from trainer.errors import TrainError, counted
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
        # a staged run's (the stage's block size, the fitted block_size), set by StagedRun.enter: the
        # micro-batches count the stage's sequences, the fit sizes and the policy the fitted ones
        self.blocks: tuple[int, int] | None = None

    def compiled_at(self, step: int) -> None:
        """New compiled shapes from `step` on: OOMs in the next steps are compilation's."""
        self.compile_window_end = step + COMPILE_WINDOW

    def after_oom(self, step: int, compiled: bool, reason: str) -> tuple[str, dict]:
        """What to do after an OOM at `step`: (event kind, its fields). Kinds: 'compile_oom_shrink'
        (smaller compiled micro-batches), 'compile_fallback_eager' (the caller drops the compiled
        module; same micro-batches), 'oom_shrink' (smaller micro-batches). Raises TrainError when
        no smaller micro-batch is left."""
        failed = max(self.micro_batches)
        T, B = self.blocks or (1, 1)
        # in sequences of the fitted block, rounded up: exactly the fit sizes below it have fewer
        # tokens than the failed micro-batch (a stage's block is never longer: check_stages)
        planned = -(-failed * T // B)
        if compiled and step < self.compile_window_end:
            smaller = [s for s in self.compiled_fit_sizes if s < planned]
            if not smaller:
                return "compile_fallback_eager", {"micro_batch": failed}
            self.compiled_at(step)  # the smaller shapes compile at the redone step: a new window
            return "compile_oom_shrink", self._resize(failed, max(smaller))
        if planned == 1 and failed > 1:  # less than one fitted sequence failed: only the stage's own shrink
            return "oom_shrink", self._resize(failed, None, failed // 2)
        new = self.shrink(planned)
        if not new or new >= planned:
            raise TrainError(f"out of memory at step {step} with micro-batch {failed}, "
                             f"and no smaller micro-batch is left to try ({reason})")
        if compiled:  # the new shapes compile now: the compile fallbacks apply again
            self.compiled_at(step)
        return "oom_shrink", self._resize(failed, new)

    def _resize(self, old: int, new: int | None, stage_new: int | None = None) -> dict:
        """Micro-batches of at most `new` sequences of the fitted block (as many of the stage's as
        fit in its tokens), or of `stage_new` of the stage's own, balanced; the event names the size
        they really have, and in a staged run the new size at block_size and tokens per
        micro-batch (the profile's lesson and the limit for the rest of the run)."""
        T, B = self.blocks or (1, 1)
        self.micro_batches = split_batch(self.rank_batch, stage_new if new is None else new * B // T)
        info = {"old_micro_batch": old, "new_micro_batch": max(self.micro_batches),
                "micro_batches": self.micro_batches, "effective_batch": sum(self.micro_batches)}
        if self.blocks is not None:  # below one fitted sequence: 1, the least a plan can say
            info.update(micro_batch_at_block_size=new or 1, stage_max_tokens=new * B if new else stage_new * T)
        return info


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


class StagedRun:
    """The stages of one run on `world_size` ranks, from `micro_batch` sequences of
    cfg.block_size tokens per micro-batch (the fitted one). Raises TrainError (one line naming the
    stage) when a stage's effective batch does not divide among the ranks."""

    def __init__(self, cfg, world_size: int, micro_batch: int):
        self.stages: tuple[Stage, ...] = cfg.stages
        self.block_size = cfg.block_size
        self.world_size = world_size
        self.max_tokens = micro_batch * cfg.block_size  # per micro-batch, on each rank
        self.index: int | None = None
        for i, st in enumerate(self.stages):  # each rank's share of every stage's batch is whole
            if st.effective_batch % world_size:
                raise TrainError(f"stages[{i}] ({st.words()}): {counted(st.effective_batch, 'sequence')} "
                                 f"{'does' if st.effective_batch == 1 else 'do'} not divide among "
                                 f"{world_size} ranks; make its tokens_per_step a multiple of {world_size} x "
                                 f"{st.block_size} = {world_size * st.block_size}")

    @staticmethod
    def fitted_batch(cfg) -> int:
        """The effective batch (sequences, all ranks) the plan was fitted for: the config's, or its
        fitted stage's (trainer.config.stages.fitted_stage)."""
        return cfg.stages[fitted_stage(cfg.stages)].effective_batch if cfg.stages else cfg.effective_batch

    @classmethod
    def of(cls, cfg, world_size: int, micro_batch: int) -> "StagedRun | None":
        return cls(cfg, world_size, micro_batch) if cfg.stages else None

    def micro_batches(self, i: int) -> list[int]:
        """Stage i's micro-batches on each rank (they add up to its rank batch exactly)."""
        st = self.stages[i]
        rank_batch = st.effective_batch // self.world_size
        return split_batch(rank_batch, stage_micro_batch(self.max_tokens, 1, st.block_size, rank_batch))

    def enter(self, trainer, it: int) -> None:
        """Before optimizer step `it`: when it starts a new stage (or is the first step run, or
        resumed), set the trainer's sampler block size, step batch and micro-batches to the
        stage's, and record a 'stage' event. Nothing changes within a stage."""
        i = stage_at(self.stages, it)
        if i == self.index:
            return
        t, st = trainer, self.stages[i]
        mbs = self.micro_batches(i)
        t.batches.set_block_size(st.block_size)  # the training sampler's (the evaluator keeps the model's)
        t.step_batch, t.rank_batch = st.effective_batch, sum(mbs)
        t.recovery.rank_batch, t.recovery.micro_batches = sum(mbs), mbs
        t.recovery.blocks = (st.block_size, self.block_size)  # its OOM shrinks in the plan's units
        if t.compiled:  # new shapes compile now: the compile fallbacks apply again
            t.recovery.compiled_at(it)
        previous, self.index = self.index, i
        t._event("stage", step=it, stage=i, previous=previous, block_size=st.block_size, effective_batch=st.effective_batch,
                 tokens_per_step=st.tokens_per_step, micro_batches=mbs, until_iter=st.until_iter)

    def resume(self, t, ck: dict) -> None:
        """Before checkpoint `ck` is restored: the tokens per micro-batch it ran at (its
        stage_max_tokens, lowered by any OOM shrink), and the sampler at the block size its state
        was saved at (the stage of its last step: its check compares like with like; the next step
        enters its own stage). A block size that is no stage's is left for that check to refuse."""
        if ck.get("stage_max_tokens"):
            self.max_tokens = int(ck["stage_max_tokens"])
        saved = (ck.get("sampler") or {}).get("block_size")
        if saved in {s.block_size for s in self.stages}:  # step k's batch is drawn at its stage's length
            t.batches.set_block_size(saved)

    def shrunk(self, info: dict) -> dict:
        """After an out-of-memory shrink in this stage (Recovery.after_oom's fields, its
        stage_max_tokens the tokens per micro-batch of the next fit size): those tokens are the limit
        from now on, in every later stage too. Returns the event's other field: the stage."""
        self.max_tokens = min(self.max_tokens, info["stage_max_tokens"])
        return {"stage": self.index}

    def record_fields(self) -> dict:
        """The stage fields of a 'train' record."""
        st = self.stages[self.index]
        return {"stage": self.index, "block_size": st.block_size}
