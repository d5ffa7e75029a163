"""The training config: nanoGPT's train.py knobs plus a few the launcher turns.

Sources, later overriding earlier: a preset, a config file (TOML, or a nanoGPT-style .py that is
parsed with `ast` and never executed, see trainer/config/pyfile.py), then `key=value` overrides. Every
mistake a user can make ends in a one-line ConfigError that names the key and where it came from.

Types are strict, as nanoGPT's configurator is for its --key=value overrides: an integer field
takes an integer, not True or 2.0; a boolean takes True/False; a string takes a string; a float
takes any finite number (an integer too). --set values are text and are read as the field's type
(`--set compile=False`, `--set batch_size=8`).

nanoGPT config files load as they are: `backend`, `wandb_*`, `init_from` and `eval_only` are
accepted with nanoGPT's meanings; the trainer decides what it does with them.
"""
from __future__ import annotations

import contextlib
import math
import re
import types
import typing
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from trainer.paths import PathProblem, TomlProblem, expand_user, parse_toml, read_user_text
from trainer.config.model_options import check_model_options, lever_words
from trainer.config.stages import StagesField, check_stages
from trainer.config.system import BackendField, DeviceField
from trainer.config.messages import did_you_mean, format_validation_error, unknown_key_message
from trainer.config.pyfile import ConfigError, Refused, literal, parse_py_config

__all__ = ["ConfigError", "TrainConfig", "PRESETS", "FIELDS", "load_config", "parse_override",
           "parse_py_config", "format_validation_error"]

# Where each key's value came from, while load_config builds a TrainConfig, so that a bad value
# is reported with its file:line or --set.
_SOURCES: ContextVar[dict[str, str] | None] = ContextVar("_SOURCES", default=None)

# Relative tolerance of the checks that compare two float fields: `learning_rate = 6e-4 / 10`
# is 5.9999999999999995e-05 and must not "exceed" a min_lr of 6e-05.
_REL_TOL = 1e-9

INIT_FROM = ("scratch", "resume", "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")


class TrainConfig(BaseModel):
    """nanoGPT's train.py settings (same names, units and defaults) plus the launcher's levers.

    Construction and assignment raise ConfigError (one line) for an unknown key, a value of the
    wrong type (strict: no bool for an int, no 2.0 for an int), a non-finite float, a value out of
    range, or fields that disagree. `source_of(key)` says where a value came from when the config
    was built by load_config.
    """
    # extra='forbid' catches typos; load_config reports them with a suggestion first. strict and
    # allow_inf_nan=False refuse True/2.0 for integers and inf/nan for floats, from every source.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True,
                              allow_inf_nan=False)

    # I/O
    out_dir: str = Field("out", min_length=1)
    eval_interval: int = Field(2000, ge=0)  # 0: never evaluate
    log_interval: int = Field(1, gt=0)
    eval_iters: int = Field(200, ge=0)  # 0: never evaluate
    eval_only: bool = False  # nanoGPT: evaluate once and exit
    always_save_checkpoint: bool = True
    # nanoGPT's: a new model, <out_dir>/ckpt.pt, or OpenAI's GPT-2 weights of that size
    init_from: Literal["scratch", "resume", "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"] = "scratch"
    # logging beside metrics.jsonl: Weights & Biases (nanoGPT's keys; the `wandb` extra) and
    # TensorBoard event files in this folder (the `tensorboard` extra); both off by default
    wandb_log: bool = False
    wandb_project: str = "owt"
    wandb_run_name: str = "gpt2"
    tensorboard_dir: str | None = Field(None, min_length=1)
    # data: a nanoGPT dataset name (data/NAME/, as nanoGPT looks), a directory holding
    # train.bin/val.bin or llm.c shards, or 'embedded' (the built-in corpus, only when asked for)
    dataset: str = Field("openwebtext", min_length=1)
    gradient_accumulation_steps: int = Field(5 * 8, gt=0)  # nanoGPT: 5 steps x 8 GPUs
    batch_size: int = Field(12, gt=0)  # micro-batch, sequences
    block_size: int = Field(1024, gt=0)
    # batch and block size changing during training: a list of {until_iter, block_size, tokens_per_step}
    stages: StagesField = None  # (trainer/config/stages.py); None: one stage, the settings above
    # model
    n_layer: int = Field(12, gt=0)
    n_head: int = Field(12, gt=0)
    n_embd: int = Field(768, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    bias: bool = False
    # nanoGPT's padded GPT-2 vocab; load_config takes the dataset's (meta.pkl) when no file or
    # --set gives one, as nanoGPT's train.py does
    vocab_size: int = Field(50304, gt=0)
    # today's small GPTs (nanochat, modded-nanogpt; trainer/model/layers.py); defaults are GPT-2's
    pos_emb: Literal["learned", "rope"] = "learned"  # rope: rotary positions, no wpe table
    rope_base: float = Field(10000.0, gt=0.0)
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"  # rmsnorm is parameter-free
    qk_norm: bool = False  # RMSNorm of each query and key head
    mlp: Literal["gelu", "relu2", "swiglu"] = "gelu"
    n_kv_head: int | None = Field(None, gt=0)  # grouped-query attention; None: n_head
    tie_embeddings: bool = True  # wte and lm_head share one matrix (GPT-2)
    logit_softcap: float = Field(0.0, ge=0.0)  # cap * tanh(logits / cap); 0: off
    # the optimizer: 'adamw' (nanoGPT's), or 'muon': torch.optim.Muon for the blocks' matrices at
    # muon_lr (scheduled like learning_rate), AdamW for embeddings, head and vectors
    optimizer: Literal["adamw", "muon"] = "adamw"
    muon_lr: float = Field(0.02, gt=0.0)
    # AdamW
    learning_rate: float = Field(6e-4, gt=0.0)
    max_iters: int = Field(600000, ge=0)
    weight_decay: float = Field(1e-1, ge=0.0)
    beta1: float = Field(0.9, ge=0.0, lt=1.0)
    beta2: float = Field(0.95, ge=0.0, lt=1.0)
    grad_clip: float = Field(1.0, ge=0.0)  # 0: no clipping
    # learning-rate schedule
    decay_lr: bool = True
    warmup_iters: int = Field(2000, ge=0)
    lr_decay_iters: int = Field(600000, ge=0)
    min_lr: float = Field(6e-5, ge=0.0)
    # system
    # nanoGPT's, checked as torch.distributed would (system.py), then ignored: NCCL on CUDA, gloo on the
    # CPU (trainer/distributed/ranks.py)
    backend: BackendField = "nccl"
    device: DeviceField = "auto"  # 'auto' | 'cpu' | 'cuda' | 'cuda:N'
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    compile: bool = True
    seed: int = Field(1337, ge=0)
    # launcher knobs
    compile_after: int | None = Field(None, ge=0)  # eager optimizer steps before compiling; None: trainer default
    checkpointing: int = Field(0, ge=0)  # activation checkpointing: 0 off, k: every k-th block
    # what a checkpointed block recomputes: 'full' (everything) or 'selective' (all but its matmuls
    # and attention, which are saved: trainer/model/layers.py SAC_SAVED_OPS)
    checkpointing_policy: Literal["full", "selective"] = "full"
    loss_impl: Literal["standard", "chunked"] = "standard"  # chunked never holds full fp32 logits
    ce_chunk_size: int = Field(4096, gt=0)  # rows of B*T per chunk of the chunked loss
    # torch.compile each transformer block on its own ('blocks', regional compilation) or the
    # whole model at once ('model', as nanoGPT does)
    compile_scope: Literal["blocks", "model"] = "blocks"
    # TF32 tensor cores for fp32 matmuls (torch.set_float32_matmul_precision("high")), as nanoGPT
    # enables them; False keeps full fp32 ("highest")
    tf32: bool = True
    # several ranks (torchrun): 'ddp' (each rank holds the whole model), 'fsdp2' (weights,
    # gradients and AdamW state sharded across the ranks with fully_shard), or 'auto' (the probe
    # tries FSDP2 as a memory lever after the others; DDP without a probe); unused on one GPU
    parallelism: Literal["auto", "ddp", "fsdp2"] = "auto"

    # key -> where its value came from ("preset tiny", "c.py:3", "--set", "data/x/meta.pkl")
    _sources: dict[str, str] = PrivateAttr(default_factory=dict)

    def __init__(self, **data: Any) -> None:
        # Construction anywhere (checkpoints, tests, the CLI) fails with the same one-line error.
        try:
            super().__init__(**data)
        except ValidationError as e:
            raise ConfigError(format_validation_error(e, FIELDS, _SOURCES.get())) from None

    def __setattr__(self, name: str, value: Any) -> None:
        previous = self.__dict__.get(name)
        try:
            super().__setattr__(name, value)
        except ValidationError as e:
            # pydantic has already stored the value when a check across fields fails; put the
            # old one back so a refused assignment leaves the config as it was.
            if name in self.__dict__:
                self.__dict__[name] = previous
            raise ConfigError(format_validation_error(e, FIELDS, self._sources)) from None

    @field_validator("out_dir", "tensorboard_dir")
    @classmethod
    def _home(cls, v: str | None) -> str | None:  # a config meets no shell: "~/runs" is in the home folder
        return v and str(expand_user(v))

    @model_validator(mode="after")
    def _consistent(self) -> "TrainConfig":
        for key, value in self:
            # no sane setting needs more than 63 bits, and torch and numpy take no more
            if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 2**63:
                raise ValueError(f"{key} = {str(value)[:12]}... ({len(str(abs(value)))} digits) is too large "
                                 f"(at most {2**63 - 1})")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        check_model_options(self, _SOURCES.get())
        check_stages(self)
        if self.checkpointing > self.n_layer:
            raise ValueError(f"checkpointing ({self.checkpointing}) must be between 0 and n_layer "
                             f"({self.n_layer})")
        if self.eval_only and self.eval_iters == 0:  # t8: a ZeroDivisionError traceback in the mean
            raise ValueError("eval_only evaluates eval_iters batches of each split, and eval_iters is 0: set "
                             "eval_iters >= 1")
        # Only with decay: nanoGPT's finetune configs set a small learning_rate, decay_lr=False
        # and leave min_lr at its default, which is then unused.
        if self.decay_lr and self.min_lr > self.learning_rate \
                and not math.isclose(self.min_lr, self.learning_rate, rel_tol=_REL_TOL):
            raise ValueError(f"min_lr ({self.min_lr}) must not exceed learning_rate "
                             f"({self.learning_rate}) when decay_lr is on")
        return self

    def __eq__(self, other: object) -> bool:
        # Equal settings make equal configs, wherever each value came from.
        if not isinstance(other, TrainConfig):
            return NotImplemented
        return self.model_dump() == other.model_dump()

    def source_of(self, key: str) -> str:
        """Where `key`'s value came from: 'preset NAME', 'FILE:LINE', '--set', the meta.pkl it
        was read from, or 'default' (the class default, or a config not built by load_config)."""
        return self._sources.get(key, "default")

    def lever_words(self) -> str:
        """', activation checkpointing every 2 blocks (selective), chunked loss': the memory levers
        this config trains with that are not the defaults ('' for none), for a run's opening line."""
        return lever_words(self)

    @property
    def effective_batch(self) -> int:
        """Sequences per optimizer step."""
        return self.batch_size * self.gradient_accumulation_steps

    @property
    def tokens_per_step(self) -> int:
        return self.effective_batch * self.block_size

    def resolved_dtype(self, device_type: str, bf16_supported: bool) -> str:
        """The dtype to train in: an explicit choice as is; 'auto' picks as nanoGPT does."""
        if self.dtype != "auto":
            return self.dtype
        if device_type == "cuda":
            return "bfloat16" if bf16_supported else "float16"
        return "float32"


FIELDS: tuple[str, ...] = tuple(TrainConfig.model_fields)

from trainer.config.presets import PRESET_FIXED, PRESETS  # noqa: E402  (named configs; they use the field names above)

def _read_toml(text: str, path: Path) -> dict[str, tuple[Any, int]]:
    try:
        data = parse_toml(text)
    except TomlProblem as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None
    table = data.pop("train", None)
    if table is not None:
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: 'train' must be a table ([train]), not a value")
        both = sorted(set(table) & set(data))
        if both:
            raise ConfigError(f"{path}: key {both[0]!r} is set both at top level and in [train]")
        data.update(table)
    # tomllib keeps no line numbers; find each key's first line, in one pass over the lines (a
    # search per key is quadratic: minutes for a file of 40,000 keys).
    first_line: dict[str, int] = {}
    for i, s in enumerate(text.splitlines()):
        m = _KEY_LINE.match(s)
        if m:
            first_line.setdefault(m.group(1) or m.group(2) or m.group(3), i + 1)
    return {key: (value, first_line.get(key, 0)) for key, value in data.items()}


# `key =`, `"key" =` or `'key' =` at the start of a line (what _read_toml's line numbers point at)
_KEY_LINE = re.compile(r"""^\s*(?:"([^"]*)"|'([^']*)'|([A-Za-z0-9_-]+))\s*=""")


def _read_file(path: Path) -> dict[str, tuple[Any, int]]:
    if path.is_dir():  # nanoGPT's config/ folder given instead of a file in it
        raise ConfigError(f"config file {path} is a folder: name a .py or .toml file in it")
    if not path.exists() and not path.is_symlink():
        raise ConfigError(f"config file not found: {path}")
    if path.suffix not in (".toml", ".py"):
        raise ConfigError(f"unsupported config file type {path.suffix or '(none)'!r}: {path} "
                          "(use .toml or a nanoGPT-style .py)")
    try:  # a dangling or looping link, a FIFO (reading blocks), a device (never ends); a BOM is fine
        text = read_user_text(path, "config file")
    except PathProblem as e:
        raise ConfigError(str(e)) from None
    return _read_toml(text, path) if path.suffix == ".toml" else parse_py_config(text, str(path))


_WORDS = {"true": True, "false": False, "none": None, "null": None}


def _field_kind(key: str) -> str | None:
    """'bool', 'int', 'float' or 'text' (str and Literal fields) for a TrainConfig key, else None."""
    if key not in TrainConfig.model_fields:
        return None
    ann = TrainConfig.model_fields[key].annotation
    if ann is bool:
        return "bool"
    if ann is int or (typing.get_origin(ann) in (typing.Union, types.UnionType)
                      and int in typing.get_args(ann)):  # int | None
        return "int"
    if ann is float:
        return "float"
    return "text"


def parse_override(item: str) -> tuple[str, Any]:
    """'key=value' -> (key, value), the text read as the field's type.

    Text fields (str, and choices such as dtype) take what was typed, so `dtype=bfloat16`,
    `out_dir=out/run1` and `wandb_run_name=123` need no quotes (a quoted string is unquoted);
    None is None where the field takes it. Booleans read true/false in any case; numbers read
    literals and arithmetic (`6e-4/10`), and a float field any float text (`1e999`, `inf`: refused
    by name). What does not read as the field's type is passed on as text, and validation refuses
    it with the key and '--set'. Raises ConfigError for an item without '='.
    """
    key, sep, raw = item.partition("=")
    key, raw = key.strip(), raw.strip()
    if not sep or not key:
        raise ConfigError(f"--set expects key=value, got {item!r}")
    kind = _field_kind(key)
    if kind == "text":
        if raw == "None" and type(None) in typing.get_args(TrainConfig.model_fields[key].annotation):
            return key, None  # as a nanoGPT .py config writes it: not a folder named 'None'
        try:
            value = literal(raw, key)  # a list of tables for `stages`
        except (SyntaxError, ValueError, RecursionError, Refused):
            return key, raw
        return key, value if isinstance(value, (str, list)) else raw
    if raw.lower() in _WORDS:
        return key, _WORDS[raw.lower()]
    try:
        return key, literal(raw)
    except Refused as r:
        if r.about_value and kind in ("int", "float"):  # 1e308*10, 1/0: say why, not "not a number"
            raise ConfigError(f"invalid config: {key}={raw!r} (--set): {r.reason}") from None
    except (SyntaxError, ValueError, RecursionError):
        pass
    if kind == "float":
        with contextlib.suppress(ValueError):
            return key, float(raw)
    return key, raw


def _dataset_vocab(dataset: Any) -> tuple[int, str] | None:
    """(vocab_size, where it was read) from the dataset `dataset` names, or None if it names
    none that declares one. Imported here, not at the top: only this reads the data folder."""
    if not isinstance(dataset, str) or not dataset:
        return None
    from trainer.data.datasets import DataError, dataset_vocab
    try:
        return dataset_vocab(dataset)
    except DataError as e:
        raise ConfigError(f"{e} (read because the config does not set vocab_size)") from None


def load_config(preset: str | None = None, config_file: str | Path | None = None,
                overrides: Sequence[str] = ()) -> TrainConfig:
    """TrainConfig from a preset (None: the class defaults), then a file, then `key=value`s.

    Where neither the file nor a --set gives vocab_size, it is the dataset's own as nanoGPT's
    train.py takes it (meta.pkl's vocab_size; 256 for the embedded bytes); else the preset's or
    the default (50304). With init_from = 'gpt2*' the data is not asked: GPT-2's weights fix it. `cfg.source_of(key)` says which. Raises ConfigError (one line).
    """
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}  # key -> where its value came from, for error messages
    explicit: set[str] = set()  # keys a file or --set gave; a preset's values are defaults

    def put(key: str, value: Any, source: str) -> None:
        if key not in TrainConfig.model_fields:
            raise ConfigError(f"{source}: {unknown_key_message(key, FIELDS)}")
        values[key] = value
        sources[key] = source

    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}{did_you_mean(preset, list(PRESETS))}; "
                              f"choose from {', '.join(PRESETS)}")
        for key, value in PRESETS[preset].items():
            put(key, value, f"preset {preset}")
        explicit.update(PRESET_FIXED.get(preset, ()))
    if config_file is not None:
        path = Path(config_file)
        for key, (value, line) in _read_file(path).items():
            put(key, value, f"{path}:{line}" if line else str(path))
            explicit.add(key)
    for item in overrides:
        key, value = parse_override(item)
        put(key, value, "--set")
        explicit.add(key)
    # init_from = 'gpt2*': the weights' vocab (trainer.model.pretrained.gpt2_config), not the data's
    if "vocab_size" not in explicit and not str(values.get("init_from", "")).startswith("gpt2"):
        found = _dataset_vocab(values.get("dataset", TrainConfig.model_fields["dataset"].default))
        if found is not None:
            values["vocab_size"], sources["vocab_size"] = found
    token = _SOURCES.set(sources)
    try:
        cfg = TrainConfig(**values)
    finally:
        _SOURCES.reset(token)
    cfg._sources = dict(sources)
    return cfg
