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


def first_zero_lr_step(cfg) -> int | None:
    """The first optimizer step from which lr_at is 0 for good, or None where the rate never
    reaches 0 (decay_lr off, or min_lr above 0). With min_lr 0 the cosine reaches 0 at
    lr_decay_iters itself (its ratio is 1 there) and lr_at holds min_lr past it; a warm-up that ends
    after lr_decay_iters runs first, and where it ends at lr_decay_iters that step's ratio is 0
    (learning_rate: lr_at's max(1, ...) guard), so 0 starts a step later. nanochat-style configs
    set min_lr 0 and lr_decay_iters = max_iters, so a larger max_iters alone trains on at 0."""
    if not (cfg.decay_lr and cfg.min_lr == 0):
        return None
    if cfg.lr_decay_iters == cfg.warmup_iters:
        return cfg.lr_decay_iters + 1
    return max(cfg.lr_decay_iters, cfg.warmup_iters)


def at_zero_lr_from(step: int, cfg) -> bool:
    """Whether the learning rate (lr_at) is 0 at `step` and every step after it (first_zero_lr_step)."""
    first = first_zero_lr_step(cfg)
    return first is not None and step >= first


def zero_lr_words(cfg) -> str:
    """Why the rate is 0 from first_zero_lr_step on, in the words of the settings that make it so
    ('the schedule reaches min_lr 0 at lr_decay_iters 3 and holds it'), for the run's note and the
    resume's refusal alike."""
    if cfg.warmup_iters > cfg.lr_decay_iters:
        return (f"the warm-up ends at step {cfg.warmup_iters}, past lr_decay_iters {cfg.lr_decay_iters}, where the "
                f"schedule holds min_lr 0")
    return f"the schedule reaches min_lr 0 at lr_decay_iters {cfg.lr_decay_iters} and holds it"
