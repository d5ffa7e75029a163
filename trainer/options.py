"""What the training loop takes and gives: RunOptions (the plan a launcher hands it: micro-batch
sizes, when to compile, how to shrink after an OOM, where to report events) and RunResult."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from trainer.meter import MemoryMeter
from trainer.step import FaultInjector


@dataclass
class RunOptions:
    """How trainer.loop.Trainer runs a config: the plan's micro-batch (sequences per forward pass)
    and compile step, the OOM shrink policy, the step to stop after, resume, and test hooks
    (meter, device, fault injector, step clock)."""
    micro_batch: int | None = None  # None: the config's batch_size, as nanoGPT
    compile_after: int | None = None
    compile_backend: Any = "inductor"  # a torch.compile backend name (or callable)
    compiled_fit_sizes: list[int] = field(default_factory=list)  # compiled micro-batches known to fit
    # shrink(micro_batch_that_failed) -> the next micro-batch to try, or None to give up.
    shrink: Callable[[int], int | None] | None = None
    on_event: Callable[[dict], None] | None = None  # OOM recoveries etc., for the launcher's profile
    plan_info: dict[str, Any] | None = None  # recorded in the metrics file: which plan, from where
    eval_micro_batch: int | None = None
    max_steps: int | None = None  # stop after this optimizer step; the LR schedule is unchanged
    resume: bool = False
    meter: MemoryMeter | None = None
    device: torch.device | None = None
    progress: bool = True
    fault: FaultInjector | None = None  # default: from AUTOFIT_FAULT_OOM_AT_STEP
    # times each step on the device (trainer.clock); default: CUDA events on a GPU, the host clock elsewhere
    clock: Any = None


@dataclass
class RunResult:
    """What a run did: optimizer steps done, every step's loss, tokens trained (all ranks), the
    final micro-batch split, how it ended, its events and the checkpoint written."""
    steps: int
    losses: list[float]
    tokens: int
    micro_batches: list[int]
    status: str  # 'finished' | 'interrupted' | 'evaluated' (eval_only)
    events: list[dict]
    checkpoint: Path | None
    last_eval: dict | None = None  # {'train': loss, 'val': loss} of the last evaluation
    # the step `checkpoint` holds: `steps`, or earlier where always_save_checkpoint=False kept the best
    checkpoint_step: int | None = None
    # what stopped an 'interrupted' run: the signal's number, or trainer.interrupt.BROKEN_PIPE when
    # stdout was closed (`| head`); None otherwise
    stopped_by: int | None = None
