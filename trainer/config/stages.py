"""A schedule of training stages: the batch and the block size changing during training.

modded-nanogpt's train_gpt.py trains in stages (its TRAINING_STAGES: the sequence length grows
from 896 to 2048 tokens and the batch from 8 to 16 to 24 x 2048 x 8 tokens per step, each stage
switched on at a fixed step). A config says the same with `stages`, a list of tables:

    stages = [{until_iter = 200, block_size = 256, tokens_per_step = 65536},
              {until_iter = 600, block_size = 1024, tokens_per_step = 131072},
              {block_size = 1024, tokens_per_step = 262144}]

Stage i runs the optimizer steps from the previous stage's until_iter (0 for the first) up to,
not including, its own; the last stage has no until_iter and runs until training ends.
tokens_per_step is the effective batch in tokens (all ranks together), a whole number of
sequences of the stage's block_size. block_size (the config's) is the model's context: the
largest stage's block size must equal it.

Memory: a micro-batch of m sequences of T tokens costs most at the largest T (attention and every
activation grow with T; none grows when T shrinks at the same tokens). So the probe fits the
largest stage (`fitted_stage`), and every other stage runs the fitted micro-batch scaled so that
its tokens per micro-batch never exceed the fitted one's (`stage_micro_batch`); each stage's
effective batch stays exact (gradient accumulation recomputed per stage).
"""
from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict

from trainer.errors import counted

STAGE_KEYS = ("until_iter", "block_size", "tokens_per_step")
_SHAPE = "a non-empty list of tables {until_iter, block_size, tokens_per_step} (the last without until_iter)"


class Stage(BaseModel):
    """One stage: until_iter (the first optimizer step of the next stage; None for the last),
    block_size (tokens per sequence) and tokens_per_step (tokens per optimizer step, all ranks)."""
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    until_iter: int | None = None
    block_size: int
    tokens_per_step: int

    @property
    def effective_batch(self) -> int:
        """Sequences per optimizer step (all ranks)."""
        return self.tokens_per_step // self.block_size

    def words(self) -> str:
        return f"{self.effective_batch} x {self.block_size} = {self.tokens_per_step:,} tokens per step"


def stages_text(stages: tuple[Stage, ...] | None) -> str:
    """A stage list as a config writes it (and --set stages= takes it): '[dict(until_iter=35,
    block_size=16, tokens_per_step=256), dict(block_size=32, tokens_per_step=512)]'; 'None' for none."""
    if stages is None:
        return "None"
    return "[" + ", ".join("dict(" + ", ".join(f"{k}={v}" for k, v in s.model_dump().items() if v is not None) + ")"
                           for s in stages) + "]"


def _int(i: int, key: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"stages[{i}].{key} must be a positive integer, not {v!r}")
    return v


def _one_stage(i: int, raw: Any, last: bool) -> Stage:
    if isinstance(raw, Stage):
        raw = raw.model_dump(exclude_none=True)
    if not isinstance(raw, dict):
        raise ValueError(f"stages[{i}] must be a table {{until_iter, block_size, tokens_per_step}}, "
                         f"not {type(raw).__name__}")
    from trainer.config.messages import did_you_mean
    for key in raw:
        if key not in STAGE_KEYS:
            raise ValueError(f"stages[{i}]: unknown key {key!r}{did_you_mean(str(key), list(STAGE_KEYS))}; "
                             f"a stage has {', '.join(STAGE_KEYS)}")
    for key in ("block_size", "tokens_per_step"):
        if key not in raw:
            raise ValueError(f"stages[{i}] has no {key}")
    vals = {k: _int(i, k, v) for k, v in raw.items() if v is not None}
    if not last and "until_iter" not in vals:
        raise ValueError(f"stages[{i}] needs until_iter (the step where stages[{i + 1}] begins); only the last "
                         f"stage runs until training ends")
    if last and "until_iter" in vals:
        raise ValueError(f"stages[{i}] is the last stage and runs until training ends: drop its until_iter "
                         f"({vals['until_iter']})")
    T, tokens = vals["block_size"], vals["tokens_per_step"]
    if tokens % T:
        lo, hi = max(T, tokens // T * T), (tokens // T + 1) * T
        eg = f"{lo} or {hi}" if lo != hi else f"{lo}"  # t7: 'e.g. 64 or 64' below one sequence
        raise ValueError(f"stages[{i}].tokens_per_step ({tokens}) must be a whole number of sequences of its "
                         f"block_size ({T}): e.g. {eg}")
    return Stage(**vals)


def parse_stages(raw: Any) -> tuple[Stage, ...] | None:
    """A config's `stages` value (a list of dicts, from TOML, a .py config, --set or a
    checkpoint's JSON) -> Stages, checked one by one. None stays None. Raises ValueError (one
    line naming the stage and key) for any other shape, a missing or unknown key, a value that is
    not a positive integer, until_iter not rising, or tokens not a whole number of sequences."""
    if raw is None:
        return None
    if not isinstance(raw, (list, tuple)) or not raw:
        raise ValueError(f"stages must be {_SHAPE}, not {raw!r:.60}")
    stages = tuple(_one_stage(i, s, i == len(raw) - 1) for i, s in enumerate(raw))
    for i in range(1, len(stages) - 1):
        if stages[i].until_iter <= stages[i - 1].until_iter:
            raise ValueError(f"stages[{i}].until_iter ({stages[i].until_iter}) must be greater than "
                             f"stages[{i - 1}].until_iter ({stages[i - 1].until_iter})")
    return stages


# The most sequences per optimizer step a config may ask: 2^24, about 10,000x GPT-3's 1,600
# sequences of 2,048 tokens (Brown et al. 2020, table 2.1). Far past it a step's split alone is a
# list of billions (a batch_size of 2^40 was a MemoryError traceback).
MAX_EFFECTIVE_BATCH = 2**24


def check_stages(cfg) -> None:
    """Across fields: the effective batch (batch_size x gradient_accumulation_steps) at most
    MAX_EFFECTIVE_BATCH; the largest stage's block_size is the config's (the model's context),
    and no stage's is larger. Raises ValueError (one line)."""
    if cfg.batch_size * cfg.gradient_accumulation_steps > MAX_EFFECTIVE_BATCH:
        raise ValueError(f"batch_size x gradient_accumulation_steps = {cfg.batch_size * cfg.gradient_accumulation_steps:,} "
                         f"sequences per step is past the {MAX_EFFECTIVE_BATCH:,} autofit plans for (GPT-3 took "
                         f"1,600 per step)")
    if cfg.stages is None:
        return
    largest = max(s.block_size for s in cfg.stages)
    if largest != cfg.block_size:
        raise ValueError(f"stages: the largest stage block_size ({largest}) must equal block_size "
                         f"({cfg.block_size}), the model's context (set block_size = {largest})")


def fitted_stage(stages: tuple[Stage, ...]) -> int:
    """Index of the stage the probe fits: the largest block size (the most memory per sequence and
    per micro-batch of the same tokens), and of those the largest effective batch (the most
    micro-batch sizes open to the plan), the earliest on a tie."""
    return max(range(len(stages)), key=lambda i: (stages[i].block_size, stages[i].effective_batch, -i))


def fitted_config(cfg):
    """The config the probe fits: `cfg` itself without stages; with stages, a copy set to the
    fitted stage (block_size and an effective batch of its sequences, as batch_size x
    gradient_accumulation_steps with batch_size the largest divisor not above the config's) and
    no stages, so that the planner, its trials and the estimate see one ordinary config."""
    if cfg.stages is None:
        return cfg
    st = cfg.stages[fitted_stage(cfg.stages)]
    n = st.effective_batch
    micro = max(d for d in range(1, min(cfg.batch_size, n) + 1) if n % d == 0)
    out = cfg.model_copy(deep=True)
    out.stages = None
    out.block_size = st.block_size
    out.batch_size, out.gradient_accumulation_steps = micro, n // micro
    return out


def batch_words(cfg) -> str:
    """'effective batch: 8 sequences = 8,192 tokens per optimizer step', or for a schedule of
    stages each stage's steps and batch."""
    if not cfg.stages:
        return f"effective batch: {counted(cfg.effective_batch, 'sequence')} = {cfg.tokens_per_step:,} tokens per optimizer step"
    parts, start = [], 0
    for s in cfg.stages:
        steps = f"steps {start}-{s.until_iter - 1}" if s.until_iter is not None else f"steps {start} on"
        parts.append(f"{steps}: {s.words()}")
        start = s.until_iter or start
    n = len(cfg.stages)
    return f"schedule of {n} stage{'s' * (n != 1)}, each effective batch exact: " + "; ".join(parts)


def stage_at(stages: tuple[Stage, ...], it: int) -> int:
    """Index of the stage that runs optimizer step `it` (0-based)."""
    for i, s in enumerate(stages):
        if s.until_iter is None or it < s.until_iter:
            return i
    return len(stages) - 1


def stage_micro_batch(fitted_micro: int, fitted_block: int, block_size: int, rank_batch: int) -> int:
    """The micro-batch of a stage of `block_size` tokens per sequence, from the micro-batch fitted
    at `fitted_block`: the most sequences whose tokens do not exceed the fitted micro-batch's
    (fitted_micro x fitted_block), at least 1, at most the stage's rank batch."""
    return max(1, min(rank_batch, fitted_micro * fitted_block // block_size))


# TrainConfig's `stages` field: checked by parse_stages whatever the source (a dict from TOML, a
# checkpoint's JSON, Stage objects), before pydantic's strict type check sees Stage objects
StagesField = Annotated[tuple[Stage, ...] | None, BeforeValidator(parse_stages)]
