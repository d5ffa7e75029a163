"""What a checkpoint may hold: one typed model per layout, checked once, when the file is read.

A checkpoint is data someone else may have written or edited, so every field a resume, `sample`
or init_from reads back is validated here (types and ranges) before any model is built, and a
bad one is one line naming the file, the field and what was expected:

    o/ckpt.pt: iter_num: expected an integer >= 0, got -5
    o/ckpt.pt: model: transformer.h.1.ln_1.weight is missing: the weights are n_layer=1 and the
        config says 2 (...)

AutofitCheckpoint is trainer/checkpoint/ckpt.py's training_state; NanoGPTCheckpointFields the six
keys nanoGPT's train.py saves. Beyond the fields' own types, `check_checkpoint` checks what ties
them together: the weights' names and shapes against the model the config describes, the AdamW
state against those parameters, each RNG state's size against this torch's.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal, Mapping

import torch
from pydantic import (BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError, field_validator,
                      model_validator)

from trainer.errors import TrainError

# torch.get_rng_state() of the CPU generator (MT19937): its size is fixed for a torch build.
CPU_RNG_BYTES = int(torch.get_rng_state().numel())


class CheckpointFieldError(TrainError):
    """A checkpoint field of the wrong type, out of range, or disagreeing with another (one line)."""


# ckpt.pt's format (trainer/checkpoint/ckpt.py training_state writes it under FORMAT_KEY): a
# checkpoint without the key is format 1, as every one before it was. Raise it when a checkpoint
# gains what an older autofit would refuse (SamplerState forbids unknown keys, a config field it
# does not know) or misread: that autofit then says 'upgrade', not that the file is corrupt.
# nanoGPT's train.py and sample.py read only their own keys and ignore this one.
CHECKPOINT_FORMAT = 1
FORMAT_KEY = "autofit_format"


def check_format(ck: Any, path: str | Path) -> int:
    """The format of checkpoint `ck` (1 when it has no FORMAT_KEY). Raises CheckpointFieldError
    (one line) when the key is not an integer >= 1, or is above CHECKPOINT_FORMAT: a newer autofit
    wrote the file, whose other fields this one could take for corruption."""
    if not isinstance(ck, Mapping) or FORMAT_KEY not in ck:
        return 1
    n = ck[FORMAT_KEY]
    if type(n) is not int or n < 1:
        raise CheckpointFieldError(f"{path}: {FORMAT_KEY}: expected an integer >= 1, got {_describe(n)}")
    if n > CHECKPOINT_FORMAT:
        raise CheckpointFieldError(f"{path}: written by a newer autofit (format {n}; this one reads up to "
                                   f"{CHECKPOINT_FORMAT}): upgrade autofit")
    return n


def _as_number(v: Any) -> Any:
    # nanoGPT saves best_val_loss as a 0-d tensor after its first evaluation
    if isinstance(v, torch.Tensor) and v.numel() == 1 and v.dtype.is_floating_point:
        return float(v.item())
    return v


def _rng_tensor(v: Any, size: int | None, what: str) -> torch.Tensor:
    if not isinstance(v, torch.Tensor) or v.dtype != torch.uint8 or v.dim() != 1:
        got = f"a {v.dtype} tensor of shape {tuple(v.shape)}" if isinstance(v, torch.Tensor) else type(v).__name__
        raise ValueError(f"expected {what} (a 1-D uint8 tensor), got {got}")
    if size is not None and v.numel() != size:
        raise ValueError(f"expected {what} of {size} bytes (torch.get_rng_state()), got {v.numel()}")
    if v.numel() == 0:
        raise ValueError(f"expected {what}, got an empty tensor")
    if size == CPU_RNG_BYTES:  # the right size, but not a state the CPU generator takes ('Invalid mt19937 state')
        try:
            torch.Generator().set_state(v)
        except RuntimeError as e:
            raise ValueError(f"expected {what}, which this is not ({str(e).splitlines()[0]})") from None
    return v


class SamplerState(BaseModel):
    """trainer.data.datasets.BatchSampler.state_dict()."""
    model_config = ConfigDict(extra="forbid")
    seed: StrictInt = Field(ge=0)
    block_size: StrictInt = Field(ge=1)
    counters: dict[str, StrictInt]
    # per split: {"tokens": count, "ends": hash} (trainer.data.tokenfiles.fingerprint); None in
    # checkpoints written before it was kept
    data: dict[str, dict[str, StrictInt | str]] | None = None
    # the absolute folder the data was read from (sample looks there for meta.pkl); None for the
    # embedded corpus and in checkpoints written before session 13
    folder: str | None = None

    @field_validator("counters")
    @classmethod
    def _non_negative(cls, v: dict[str, int]) -> dict[str, int]:
        bad = {k: c for k, c in v.items() if c < 0}
        if bad:
            raise ValueError(f"expected counts >= 0, got {bad}")
        return v

    @model_validator(mode="after")
    def _a_count_per_split(self) -> "SamplerState":
        # state_dict() holds a count for every split of the data, 0 before its first batch, so none
        # (or none for a split the data has) is a hand edit, not a fresh state: read as 0, that
        # split's batches would start again from the first, silently (k9's 'not done')
        splits = list(self.data or {})
        if not self.counters or any(s not in self.counters for s in splits):
            raise ValueError(f"expected counters to hold a batch count for each split of the data"
                             f"{' (' + ', '.join(splits) + ')' if splits else ''}, got {self.counters}; "
                             f"one left out would start that split again from its first batch")
        return self


class DeviceSpec(BaseModel):
    """MemoryMeter.spec(): how to reopen the device a run trained on."""
    model_config = ConfigDict(extra="allow")
    kind: Literal["cpu", "cpu-budgeted", "cuda", "simulated"]
    budget_bytes: StrictInt | None = Field(default=None, ge=1, le=2**62)
    memory_cap_bytes: StrictInt | None = Field(default=None, ge=1, le=2**62)


class OptimizerState(BaseModel):
    """torch.optim.Optimizer.state_dict(): per-parameter state and at least one group. Muon +
    AdamW's (trainer.muon.MuonAdamW: {'muon': ..., 'adamw': ...}) is checked part by part and read
    as the union of the two parts' groups and states."""
    model_config = ConfigDict(extra="allow", arbitrary_types_allowed=True)
    state: dict[Any, dict[str, Any]]
    param_groups: list[dict[str, Any]] = Field(min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _muon_adamw(cls, v: Any) -> Any:
        if not (isinstance(v, Mapping) and set(v) == {"muon", "adamw"}):
            return v
        parts = {}
        for name in ("muon", "adamw"):
            try:
                parts[name] = OptimizerState.model_validate(v[name])
            except ValidationError as e:
                raise ValueError(f"{name}: {field_problem(e)}") from None
        return {"state": {**parts["adamw"].state, **parts["muon"].state},
                "param_groups": parts["muon"].param_groups + parts["adamw"].param_groups}

    @field_validator("param_groups")
    @classmethod
    def _groups_have_params(cls, v: list[dict]) -> list[dict]:
        for i, g in enumerate(v):
            if not isinstance(g.get("params"), list):
                raise ValueError(f"expected group {i} to list its parameters ('params'), got {g.get('params')!r}")
        return v


class AutofitCheckpoint(BaseModel):
    """trainer/checkpoint/ckpt.py's training_state, as read back. Extra keys (nanoGPT's, which
    autofit's checkpoints also carry, and the per-rank ones) are allowed; those read are typed."""
    model_config = ConfigDict(extra="allow", arbitrary_types_allowed=True)

    model: dict[str, torch.Tensor]
    optimizer: OptimizerState
    iter_num: StrictInt = Field(ge=0)
    best_val_loss: float
    best_val_step: StrictInt | None = Field(default=None, ge=0)  # trainer.checkpoint.ckpt.best_model_step
    last_eval_iter: StrictInt = Field(default=-1, ge=-1)
    config: dict[str, Any]
    sampler: SamplerState
    eval_sampler: SamplerState
    rng_cpu: torch.Tensor
    rng_cuda: torch.Tensor | None = None
    rng_ranks: list[torch.Tensor] | None = Field(default=None, min_length=1)
    micro_batches: list[StrictInt] = Field(min_length=1)
    # a staged run (trainer/config/stages.py): tokens per micro-batch it ran at (after any OOM shrink)
    stage_max_tokens: StrictInt | None = Field(default=None, ge=1)
    plan: str | None = None
    device: DeviceSpec | None = None
    world_size: StrictInt = Field(default=1, ge=1)
    compile_failed: StrictBool = False
    # the evaluation's micro-batch: a resume evaluates in the same slices (a sum over other slices
    # differs in the last digits), not at the training's size after an OOM shrink
    eval_micro_batch: StrictInt | None = Field(default=None, ge=1)
    scaler: dict[str, Any] | None = None
    optimizer_keys: Literal["names"] | None = None

    _num = field_validator("best_val_loss", mode="before")(_as_number)

    @field_validator("best_val_loss")
    @classmethod
    def _not_nan(cls, v: float) -> float:
        if math.isnan(v):
            raise ValueError("expected a number (inf before any evaluation), got nan")
        return v

    @field_validator("micro_batches")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if any(m < 1 for m in v):
            raise ValueError(f"expected sizes >= 1, got {v}")
        return v

    @field_validator("rng_cpu")
    @classmethod
    def _rng_cpu(cls, v: Any) -> torch.Tensor:
        return _rng_tensor(v, CPU_RNG_BYTES, "the CPU generator's state")

    @field_validator("rng_cuda")
    @classmethod
    def _rng_cuda(cls, v: Any) -> torch.Tensor | None:
        return None if v is None else _rng_tensor(v, None, "a CUDA generator's state")

    @field_validator("rng_ranks")
    @classmethod
    def _rng_ranks(cls, v: Any) -> list | None:
        return None if v is None else [_rng_tensor(t, CPU_RNG_BYTES, "each rank's CPU generator state") for t in v]

    @field_validator("plan")
    @classmethod
    def _plan_is_object(cls, v: str | None) -> str | None:
        if v is None:
            return v
        try:
            parsed = json.loads(v)
        except ValueError:
            raise ValueError("expected the plan as JSON text, got text that is not JSON") from None
        if not isinstance(parsed, dict):
            raise ValueError(f"expected a JSON object, got a {type(parsed).__name__}")
        return v


class NanoGPTCheckpointFields(BaseModel):
    """The keys nanoGPT's train.py saves (model_args and the weights are checked against each
    other by trainer.checkpoint.nanogpt)."""
    model_config = ConfigDict(extra="allow", arbitrary_types_allowed=True)

    model: dict[str, torch.Tensor]
    model_args: dict[str, Any] | None = None  # an autofit checkpoint of 0.1.0 has only its config
    optimizer: OptimizerState | None = None
    iter_num: StrictInt = Field(default=0, ge=0)
    best_val_loss: float = float("inf")
    config: dict[str, Any] | None = None

    _num = field_validator("best_val_loss", mode="before")(_as_number)


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    text = repr(value)
    return text if len(text) <= 60 else f"a {type(value).__name__}"


def field_problem(exc: ValidationError) -> str:
    """'<field>: expected ..., got ...' of pydantic's first error, on one line."""
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "(top level)"
    msg = " ".join(str(err["msg"]).split()).removeprefix("Value error, ")
    if err["type"] == "missing":
        return f"{where}: missing"
    if msg.startswith("expected"):
        return f"{where}: {msg}"
    msg = msg.removeprefix("Input should be ")  # pydantic's 'Input should be a valid integer'
    msg = msg.replace("List should have ", "a list of ", 1).replace(" after validation", "")
    return f"{where}: expected {msg[0].lower() + msg[1:]}, got {_describe(err.get('input'))}"


def validate(model: type[BaseModel], ck: Any, path: str | Path) -> BaseModel:
    """`ck` validated as `model`; CheckpointFieldError naming the file and the field otherwise."""
    if not isinstance(ck, Mapping):
        raise CheckpointFieldError(f"{path}: expected a checkpoint dict, got {type(ck).__name__}")
    try:
        return model.model_validate(dict(ck))
    except ValidationError as e:
        raise CheckpointFieldError(f"{path}: {field_problem(e)}") from None
