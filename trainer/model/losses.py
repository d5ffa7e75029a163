"""Reading the step losses back from the device: one host sync for all the steps since the last
read, a check that each is finite, and the count of fp16 steps the GradScaler skipped."""
from __future__ import annotations

import math
from typing import Callable

import torch

SCALER_SKIP_REPORT = 20  # fp16: this many skipped steps in a row is reported (a few are normal)


def read_losses(unread: list, fp16: bool, mean: Callable[[torch.Tensor], torch.Tensor],
                skips: int) -> tuple[list[float], int, bool, tuple[int, float] | None]:
    """`unread`: (step, StepResult) pairs, oldest first. `mean`: the losses averaged over the ranks
    (identity on one). Returns (the losses, the skipped-in-a-row count now, whether it just reached
    SCALER_SKIP_REPORT, (step, loss) of the first non-finite loss that was not a skipped fp16 step
    or None). One host sync: losses and skip flags are stacked and read together."""
    n = len(unread)
    rows = [r.loss_tensor.float() for _, r in unread]
    if fp16:
        rows += [r.skipped_tensor.float() if r.skipped_tensor is not None else torch.zeros_like(rows[0])
                 for _, r in unread]
    flat = torch.stack(rows)
    flat = torch.cat([mean(flat[:n]), flat[n:]]).tolist()  # the one sync
    vals, flags = flat[:n], [bool(v) for v in flat[n:]] or [False] * n
    report, bad = False, None
    for (step, _), v, skipped in zip(unread, vals, flags):
        skips = skips + 1 if skipped else 0
        report = report or skips == SCALER_SKIP_REPORT
        if bad is None and not math.isfinite(v) and not skipped:
            bad = (step, v)
    return vals, skips, report, bad
