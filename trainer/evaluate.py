"""Evaluation during training: the mean loss over fixed batches of each split, as nanoGPT's
estimate_loss does, on its own sampler so that how often a run evaluates never changes the
training batches. An out-of-memory error halves the evaluation micro-batch only; the training
plan is not touched. With several ranks the ranks agree after each batch whether any ran out of
memory, and which (trainer.distributed.multirank.RankGroup.eval_agree), and all halve and redo it
together, so every rank runs the same eval micro-batch and the agreement rounds pair up; at eval
micro-batch 1 all stop, the others naming the rank that ran out.

Under DDP the ranks split the batches (eval_rounds): rank r evaluates batches r, r + W, r + 2W, ...
of the eval_iters, and the losses' sums and counts are summed over the ranks, so each rank runs
1/W of the forward passes and the mean is over the same batches one process evaluates (nanoGPT's
ranks each evaluate eval_iters batches of their own: W times the work). Every rank moves the eval
sampler on by all eval_iters, so a resume, on any number of ranks, draws the batches it would
have. Under FSDP2 every rank runs every forward (its all-gathers need every rank), so there each
rank evaluates every batch, as one process does, and the sums over the ranks are W times one's."""
from __future__ import annotations

import gc
from typing import Callable

import torch

from trainer.data.datasets import BatchSampler
from trainer.data.tokenfiles import DataError
from trainer.distributed.ranks import OTHER_OOM, OWN_ERROR, OtherRankOOM, RankFailed, first_line
from trainer.phases import PhaseProgress
from trainer.step import autocast


def eval_rounds(iters: int, rank: int, ranks: int) -> list[int | None]:
    """The batch number (0 .. iters-1) that `rank` of the `ranks` splitting `iters` batches
    evaluates in each agreement round, or None for a round it only joins (the last round, where
    `ranks` does not divide `iters`): ceil(iters / ranks) rounds on every rank, so their
    agreement rounds pair up. Round k holds batches k*ranks .. k*ranks + ranks - 1, so the rounds
    done are always a prefix of the batches (a stop mid-evaluation leaves the sampler's counter
    there, as one process's does). Raises ValueError unless 0 <= rank < ranks."""
    if not 0 <= rank < ranks:
        raise ValueError(f"rank {rank} of {ranks} ranks")
    return [k * ranks + rank if k * ranks + rank < iters else None for k in range(-(-iters // ranks))]


class Evaluator:
    """Mean loss of `model` over `iters` batches of `batch_size` sequences per split, chunked into
    micro-batches of `micro_batch` (halved after an OOM, with an 'eval_oom_shrink' event whose
    reason is this rank's OOM's first line, or for another rank's 'rank 1 ran out of memory in this
    evaluation batch', with that rank as its oom_rank).
    `agree(oom) -> rank or None`: after each batch, the rank that ran out of memory on it (the
    highest where several did, as a step's agreement names it), None when none did (a collective
    with several ranks; with one, 0 when `oom`). When the micro-batch is already 1 every rank stops
    at once: the rank that ran out raises its own OOM, the others RankFailed naming that rank
    ('rank 1 ran out of memory in evaluation at step 4, at eval micro-batch 1 (its own error says
    why); stopping here too'). `share`: (this rank, the number of ranks splitting the batches;
    RankGroup.eval_hooks), (0, 1): every batch here. `total(values) -> values`: the element-wise
    sums over all the ranks (the identity with one). `failed(exc)`: tells the other ranks of this
    rank's DataError reading its batch (RankGroup.failed; None with one process), in the agreement
    round they wait in: the batch's (split batches, DDP), or a check-in of their forward (FSDP2,
    where every rank reads every batch), which is a round of the same agreement."""

    def __init__(self, sampler: BatchSampler, *, iters: int, batch_size: int, micro_batch: int,
                 device: torch.device, dtype: str, meter, on_event: Callable[..., None],
                 agree: Callable[[bool], int | None] = lambda oom: 0 if oom else None,
                 share: tuple[int, int] = (0, 1),
                 total: Callable[[list[float]], list[float]] = lambda values: values,
                 failed: Callable[[BaseException], BaseException | None] = lambda exc: None):
        self.sampler = sampler
        self.iters = iters
        self.batch_size = batch_size
        self.micro_batch = micro_batch
        self.device = device
        self.dtype = dtype
        self.meter = meter
        self.on_event = on_event
        self.agree = agree
        self.share, self.total, self.failed = share, total, failed
        self.stop: Callable[[], bool] = lambda: False  # set by the training loop: a stop was asked for
        self.say: Callable[[str], None] = lambda line: None  # where progress lines go

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, label: str = "evaluation") -> dict[str, float] | None:
        """{'train': loss, 'val': loss}, the mean over every rank's batches (the same on every
        rank), or None when `stop()` says to stop: checked before each round, so a Ctrl-C or
        SIGTERM is acted on when the batch in flight ends (with several ranks `stop` is the
        ranks' agreed answer, the same on all). Says the count and ETA through `say` now and then
        (trainer.phases). The model is put back in training mode afterwards. Raises DataError
        when this rank's batch cannot be read (the others then stop with RankFailed)."""
        model.eval()
        sums: list[float] = []
        rank, ranks = self.share
        progress = PhaseProgress(label, 2 * self.iters, self.say)
        try:
            for split in ("train", "val"):
                total, count, start, done = 0.0, 0, self.sampler.counters.get(split, 0), 0
                for k, i in enumerate(eval_rounds(self.iters, rank, ranks)):
                    if self.stop():
                        return None
                    x, y = self._batch(split, start + i) if i is not None else (None, None)
                    loss = self._agreed_loss(model, x, y, label)
                    if i is not None:
                        total, count = total + loss, count + 1
                    before, done = done, min((k + 1) * ranks, self.iters)
                    # every rank counts all the round's batches: the next evaluation or a resume draws on
                    self.sampler.counters[split] = start + done
                    progress.tick(done - before)  # the batches of all ranks
                sums += [total, count]
        finally:
            model.train()
        sums = self.total(sums)  # one process: the same floats, so the same mean as before the split
        return {"train": sums[0] / sums[1], "val": sums[2] / sums[3]}

    def _batch(self, split: str, counter: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Eval batch number `counter` of `split`. A DataError (the data changed under the run)
        is told to the other ranks (RankGroup.failed): they would otherwise wait in the agreement
        until this rank's process ended, and stop as 'lost contact' (DDP: in the round's agreement,
        not reading this batch; FSDP2: in the first check-in of the forward of theirs)."""
        try:
            return self.sampler.batch_at(split, self.batch_size, counter)
        except DataError as e:
            raise self.failed(e) or e

    def _agreed_loss(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, label: str) -> float:
        """The loss of one batch, redone at half the micro-batch while any rank runs out of memory;
        x None: this rank has no batch in the round and only joins its agreement (and halves too)."""
        while True:
            oom, loss = None, 0.0
            try:
                if x is not None:
                    loss = self.batch_loss(model, x, y)
            except Exception as e:
                if not self.meter.is_oom(e):
                    raise
                oom = e
            # FSDP2: another rank's OOM, met in a check-in of this rank's forward, is not this rank's
            mine = oom is not None and not isinstance(oom, OtherRankOOM)
            who = self.agree(mine)
            if who is None:  # no rank ran out; where one did, every rank redoes the batch
                return loss
            if self.micro_batch <= 1:  # all ranks give up together: none waits on one that raised
                if mine:
                    raise oom
                raise RankFailed(f"rank {who} {OTHER_OOM} in {label}, at eval micro-batch 1 {OWN_ERROR}; "
                                 f"stopping here too")
            # the record says whose OOM it was, as a step's shrink does (trainer.redo): this rank's
            # allocator's words, or the rank the agreement names
            whose = {"reason": first_line(oom)} if mine else {"reason": f"rank {who} {OTHER_OOM} in this evaluation "
                                                                        f"batch", "oom_rank": who}
            oom = None  # its traceback would keep the failed batch's tensors alive
            gc.collect()
            self.meter.cleanup()
            self.micro_batch = max(1, self.micro_batch // 2)
            self.on_event("eval_oom_shrink", eval_micro_batch=self.micro_batch, **whose)

    def batch_loss(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
        loss = 0.0
        for s in range(0, x.shape[0], self.micro_batch):
            xb, yb = x[s:s + self.micro_batch].to(self.device), y[s:s + self.micro_batch].to(self.device)
            with autocast(self.device.type, self.dtype):
                loss += float(model(xb, yb)) * xb.shape[0]
        return loss / x.shape[0]
