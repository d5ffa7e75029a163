"""The learning-rate schedule, as nanoGPT's train.py has it."""
from __future__ import annotations

import math


def lr_at(it: int, cfg) -> float:
    """Learning rate at optimizer step `it` for a TrainConfig: linear warm-up over warmup_iters
    ((it + 1) / (warmup_iters + 1), nanoGPT's form), cosine decay from learning_rate to min_lr
    at lr_decay_iters, then min_lr; constant learning_rate when decay_lr is off."""
    if not cfg.decay_lr:
        return cfg.learning_rate
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it > cfg.lr_decay_iters:
        return cfg.min_lr
    ratio = (it - cfg.warmup_iters) / max(1, cfg.lr_decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.learning_rate - cfg.min_lr)


def at_zero_lr_from(step: int, cfg) -> bool:
    """Whether the learning rate (lr_at) is 0 at `step` and every step after it:
    a decayed schedule past lr_decay_iters (and its warm-up) holds min_lr, here 0. nanochat-style
    configs set min_lr 0 and lr_decay_iters = max_iters, so training on from their last
    checkpoint with a larger max_iters alone trains at 0."""
    return bool(cfg.decay_lr and cfg.min_lr == 0 and step >= max(cfg.lr_decay_iters, cfg.warmup_iters))
