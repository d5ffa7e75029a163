"""Evaluation during training: the mean loss over fixed batches of each split, as nanoGPT's
estimate_loss does, on its own sampler so that how often a run evaluates never changes the
training batches. An out-of-memory error halves the evaluation micro-batch only; the training
plan is not touched. With several ranks the ranks agree after each batch whether any ran out of
memory (trainer.distributed.multirank.RankGroup.eval_agree), and all halve and redo it together, so every
rank runs the same forward passes (FSDP2's all-gathers pair up) and the same eval micro-batch."""
from __future__ import annotations

import gc
from typing import Callable

import torch

from trainer.data.datasets import BatchSampler
from trainer.phases import PhaseProgress
from trainer.step import autocast


class Evaluator:
    """Mean loss of `model` over `iters` batches of `batch_size` sequences per split, chunked into
    micro-batches of `micro_batch` (halved after an OOM, with an 'eval_oom_shrink' event).
    `agree(oom) -> bool`: after each batch, whether any rank ran out of memory on it (a collective
    with several ranks; `oom` itself with one). Raises the OOM when the micro-batch is already 1, on
    every rank at once (torch.OutOfMemoryError on the ranks that did not run out themselves)."""

    def __init__(self, sampler: BatchSampler, *, iters: int, batch_size: int, micro_batch: int,
                 device: torch.device, dtype: str, meter, on_event: Callable[..., None],
                 agree: Callable[[bool], bool] = lambda oom: oom):
        self.sampler = sampler
        self.iters = iters
        self.batch_size = batch_size
        self.micro_batch = micro_batch
        self.device = device
        self.dtype = dtype
        self.meter = meter
        self.on_event = on_event
        self.agree = agree
        self.stop: Callable[[], bool] = lambda: False  # set by the training loop: a stop was asked for
        self.say: Callable[[str], None] = lambda line: None  # where progress lines go

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, label: str = "evaluation") -> dict[str, float] | None:
        """{'train': loss, 'val': loss}, or None when `stop()` says to stop: checked before each
        batch, so a Ctrl-C or SIGTERM is acted on when the batch in flight ends (with several ranks
        `stop` is the ranks' agreed answer, the same on all). Says the count and ETA through `say`
        now and then (trainer.phases). The model is put back in training mode afterwards."""
        model.eval()
        out = {}
        progress = PhaseProgress(label, 2 * self.iters, self.say)
        try:
            for split in ("train", "val"):
                total = 0.0
                for _ in range(self.iters):
                    if self.stop():
                        return None
                    x, y = self.sampler.sample(split, self.batch_size)
                    total += self._agreed_loss(model, x, y)
                    progress.tick()
                out[split] = total / self.iters
        finally:
            model.train()
        return out

    def _agreed_loss(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
        """The loss of one batch, redone at half the micro-batch while any rank runs out of memory."""
        while True:
            oom = None
            try:
                loss = self.batch_loss(model, x, y)
            except Exception as e:
                if not self.meter.is_oom(e):
                    raise
                oom = e
            if not self.agree(oom is not None):  # every rank redoes the batch when one ran out
                return loss
            if self.micro_batch <= 1:  # all ranks give up together: none waits on one that raised
                raise oom if oom is not None else torch.OutOfMemoryError(
                    "out of memory in evaluation on another rank at eval micro-batch 1")
            oom = None  # its traceback would keep the failed batch's tensors alive
            gc.collect()
            self.meter.cleanup()
            self.micro_batch = max(1, self.micro_batch // 2)
            self.on_event("eval_oom_shrink", eval_micro_batch=self.micro_batch)

    def batch_loss(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
        loss = 0.0
        for s in range(0, x.shape[0], self.micro_batch):
            xb, yb = x[s:s + self.micro_batch].to(self.device), y[s:s + self.micro_batch].to(self.device)
            with autocast(self.device.type, self.dtype):
                loss += float(model(xb, yb)) * xb.shape[0]
        return loss / x.shape[0]
