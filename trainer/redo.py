"""One optimizer step of the training loop with its out-of-memory recovery: the step redone on
the same data and RNG with smaller micro-batches after an OOM, or shrunk before one when the
allocator thrashes (the policy is trainer.recovery's; the step itself trainer.step's).

RedoneStep is a part of trainer.loop.Trainer, kept apart because the loop reads as nanoGPT's
without it; its methods use the Trainer's attributes (model, optimizer, group, recovery, meter,
sampler, batches, stages, ...).
"""
from __future__ import annotations

import contextlib
import gc

import torch

from trainer.compiler import uncompile
from trainer.data.tokenfiles import DataError
from trainer.distributed.ranks import OTHER_OOM, OtherRankOOM
from trainer.errors import TrainError
from trainer.recovery import THRASH_NEAR_LIMIT, THRASH_STEPS
from trainer.schedule import lr_at
from trainer.step import InjectedOOM, StepResult, UpdateOOM, prime_optimizer, train_step


class RedoneStep:
    """The step and its recovery, mixed into trainer.loop.Trainer; and an OOM before any step (the
    model, a resumed optimizer state) as one line, which has nothing to redo."""

    def train_one_step(self, it: int) -> tuple[StepResult, float]:
        """Optimizer step `it`, redone on the same data with the same RNG after each OOM until it
        completes or the recovery policy runs out of smaller micro-batches. Returns the step's result
        and its lap on self.clock (the last attempt's; self.clock.seconds waits for the device)."""
        if self.stages is not None:  # a new stage: its block size, batch and micro-batches
            self.stages.enter(self, it)
        lr = lr_at(it, self.cfg)
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)  # Muon's group: muon_lr / learning_rate
        start = dict(self.sampler.counters)  # where a give-up's checkpoint resumes: this step's batch
        try:
            x, y = self.batches.take(self.step_batch)  # the step's batch (this rank's rows), once
        except DataError as e:  # several ranks: told in the step's agreement, not as lost contact (r4)
            self.sampler.counters.update(start)  # a lazily read batch had counted it
            raise self.group.failed(e) or e
        rng = self._rng_state()  # a redone step draws the same dropout masks
        while True:
            lap = self.clock.start()
            self.meter.reset_peak()
            failure, injected = None, False
            try:
                if not self._primed:  # the optimizer's state first, not lazily inside step 0's update (not redone)
                    self._prime()
                res = train_step(self.model, self.optimizer, x, y, self.micro_batches,
                                 dtype=self.dtype, scaler=self.scaler, grad_clip=self.cfg.grad_clip,
                                 forward=self.group.forward(self.forward), step=it, fault=self.fault,
                                 sync_grads=self.group.sync)
            except Exception as e:
                # a half-applied update is not redone; nor is a TrainError, whose line may quote an
                # allocator's 'CUDA out of memory' (the optimizer state's: _prime) but is final
                if not self.meter.is_oom(e) or isinstance(e, (UpdateOOM, TrainError)):
                    # the step did not happen: a checkpoint saved on the way out (the data changed
                    # under a lazily read batch, which take() had counted) resumes on this batch
                    self.sampler.counters.update(start)
                    with contextlib.suppress(RuntimeError):  # a broken CUDA context: e is the line to say
                        self._set_rng_state(rng)
                    other = self.group.failed(e)  # the other ranks are told; a lost rank is one line
                    if other is not None:
                        raise other from None
                    raise TrainError(self._update_oom_line(e)) if isinstance(e, UpdateOOM) else e
                failure, attempt = str(e).splitlines()[0][:200], _attempt(e)
            if failure is None:
                return res, self._timed(self.clock.stop(lap))
            # outside the except block: its traceback no longer pins the failed step's tensors
            self._cleanup_after_oom()
            failure, injected, whose = self._agreed_oom(attempt, failure)  # every rank knows before any moves on
            try:
                self._shrink(failure, injected, **whose)
            except TrainError as e:  # keep the steps that did complete; this one is next, on its own batch and RNG
                self.sampler.counters.update(start), self._set_rng_state(rng)
                if self.iter_num > 0:  # at step 0 nothing trained: a checkpoint would only block a new run
                    self.save_last()
                if self.saved_step is not None:  # what is kept, as every other stop says it
                    e.args = (f"{e}; {self.ckpt_path} holds step {self.saved_step}: "
                              f"{resume_with_more_memory(self.meter.spec())}",)
                raise
            self._set_rng_state(rng)

    def _agreed_oom(self, attempt: dict, failure: str) -> tuple[str, bool, dict]:
        """The ranks' agreement on an attempt that ran out of memory (RankGroup.after_oom; one
        process: nothing to agree): (the shrink's reason, whether every OOM was injected, the
        event's extra fields). Another rank's OOM is named as the agreement names it, in the
        reason ('rank 1 ran out of memory in this step') and as the event's oom_rank; this rank's
        own keeps its allocator's words. Raises RankFailed when another rank failed otherwise."""
        injected, who = self.group.after_oom(attempt)
        if attempt["other"] and who is not None:
            return f"rank {who} {OTHER_OOM} in this step", injected, {"oom_rank": who}
        return failure, injected, {}

    @contextlib.contextmanager
    def _oom_as_error(self, doing: str, advice: str):
        """An out-of-memory error inside (before any step: nothing to shrink or redo) as a
        TrainError of one line, 'out of memory DOING (its first line): ADVICE'."""
        try:
            yield
        except Exception as e:
            if not self.meter.is_oom(e):
                raise
            raise TrainError(f"out of memory {doing} ({str(e).splitlines()[0][:160]}): {advice}") from None

    def _update_oom_line(self, e: UpdateOOM) -> str:
        """The UpdateOOM's line with where to go on from: the checkpoint on disk (saved_step, known
        on every rank), or, before the run wrote one, a new start. No checkpoint is written now:
        the weights are half-updated (and, with several ranks, differ between them)."""
        if self.saved_step is None:
            where = "this run has written no checkpoint yet, so start it again"
        else:
            where = f"resume from the last checkpoint, {self.ckpt_path} (step {self.saved_step}), with --resume"
        return f"{str(e).splitlines()[0]}; {where}, with a smaller micro-batch if it happens again"

    def _check_thrash(self) -> None:
        """Allocator thrashing: shrink before it becomes an OOM (where the meter counts retries).
        It is a lesson for the profile only when confirmed: reserved memory near the limit."""
        if not self.meter.capabilities.alloc_retries:
            return
        # several ranks: shrink together when any rank thrashes, so the micro-batches stay alike
        if self.group.any_rank(self.thrash.observe(self.meter.alloc_retries())) and max(self.micro_batches) > 1:
            reserved, limit = self.meter.peak_reserved_bytes(), self.meter.limit_bytes()
            confirmed = bool(reserved and limit and reserved >= THRASH_NEAR_LIMIT * limit)
            self._shrink(f"allocator retries rose for {THRASH_STEPS} steps", cause="thrash", confirmed=confirmed)

    def _prime(self) -> None:
        """The optimizer's state, made before the first step (trainer.step.prime_optimizer). An OOM
        here is no micro-batch's: the state sits beside the weights whatever the micro-batch, so a
        shrink cannot help; raises TrainError saying so (it read 'no smaller micro-batch is left').
        Several ranks stop together, none redoes (RankGroup.primed): the others raise RankFailed
        naming this rank, where they met a closed socket at step 0's first collective before."""
        try:
            prime_optimizer(self.model, self.optimizer, keep_grads=False)
        except Exception as e:
            if not self.meter.is_oom(e):
                raise  # several ranks: the caller's group.failed tells the others, in the round below
            shard = ("more ranks (FSDP2 shards the state among them)" if self.group.parallelism == "fsdp2" else
                     "several GPUs with --set parallelism=fsdp2 (shards the state)")
            error = TrainError(f"out of memory making the optimizer's state ({type(self.optimizer).__name__}) beside "
                               f"the weights, before step {self.iter_num}: no micro-batch fits, a smaller one cannot "
                               f"help ({str(e).splitlines()[0][:160]}); a larger budget or GPU, a smaller model, or "
                               f"{shard}")
        else:
            error = None
        # several ranks: every one learns here whether the state fit everywhere, before any moves on
        # to step 0's collectives (which a stopped rank would answer with a closed socket)
        self.group.primed(oom=error is not None)
        if error is not None:
            raise error
        if self.group.parallel is not None and self.group.parallel.kind == "ddp":
            self.group.rewrap(self.forward)  # its gradients views of the buckets from step 0 (DataParallel.rewrap)
        self._primed = True

    def _cleanup_after_oom(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:  # a fresh scaler: the failed step may have left inf checks behind;
            fresh = torch.amp.GradScaler(self.device.type)  # its scale and growth count go on as they were
            fresh.load_state_dict(self.scaler.state_dict())
            self.scaler = fresh
        gc.collect()
        self.meter.cleanup()

    def _shrink(self, reason: str, injected: bool = False, **extra) -> None:
        """Applies the recovery policy after an OOM (or thrashing); the caller redoes the step."""
        kind, info = self.recovery.after_oom(self.iter_num, self.compiled, reason)
        if self.stages is not None and "new_micro_batch" in info:  # the stage's new token limit
            info.update(self.stages.shrunk(info))
        if "effective_batch" in info:  # the recovery policy sees this rank's share
            info["effective_batch"] *= self.world_size
        if kind == "compile_fallback_eager":  # no compiled state outlives the fallback
            self.forward, self.compiled, self.compile_failed = uncompile(self.model), False, True
        # a clean wrapper on every rank (a failed step's reducer may be stopped half-way), around
        # the eager module after a fallback: a thrash shrink changes it too, not only an OOM's
        self.group.rewrap(self.forward)
        self._event(kind, reason=reason, **info, **extra, **({"injected": True} if injected else {}))

    def _rng_state(self) -> tuple:
        return torch.get_rng_state(), torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None

    def _set_rng_state(self, state: tuple) -> None:
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], self.device)


def _attempt(e: BaseException) -> dict:
    """How an attempt's OOM `e` is told to the other ranks (RankGroup.after_oom): whether it was
    injected, already agreed, another rank's (OtherRankOOM: met in a check-in of this rank's step,
    or told in its settle; not entered as this rank's own), and the rank such an agreed one names."""
    return {"injected": isinstance(e, InjectedOOM) or getattr(e, "injected", False),
            "agreed": getattr(e, "agreed", False), "other": isinstance(e, OtherRankOOM),
            "rank": getattr(e, "rank", None)}


def _mib(n: int) -> str:
    """Bytes as --budget takes them and autofit prints them: GiB from 1 GiB, else MiB."""
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def resume_with_more_memory(spec: dict) -> str:
    """How a run stopped by an out-of-memory error with no smaller micro-batch left goes on from
    its checkpoint with more memory, on the device `spec` names (MemoryMeter.spec()): a budgeted
    CPU's resume takes a larger --budget (autofit.launch.resume, nothing else reopens it with
    more); a GPU's has more when other processes free some or on a larger card, except under an
    --emulate cap, which a resume keeps; a plain CPU's when more RAM is free."""
    budget, cap = spec.get("budget_bytes"), spec.get("memory_cap_bytes")
    if budget:
        return f"--resume with a --budget above {_mib(int(budget))} continues from it with more memory"
    if cap:
        return (f"--resume keeps its {_mib(int(cap))} cap (--emulate's), where it may run out again; for more memory "
                f"start a new run (another --out) without --emulate")
    larger = ", or on a larger GPU" if spec.get("kind") == "cuda" else ""
    return f"--resume continues from it with more memory (other processes' memory freed{larger})"
