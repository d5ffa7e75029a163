"""The training config: nanoGPT's train.py knobs plus a few the launcher turns.

Sources, later overriding earlier: a preset, a config file (TOML, or a nanoGPT-style .py that is
parsed with `ast` and never executed), then `key=value` overrides. Every mistake a user can make
ends in a one-line ConfigError that names the key and where it came from.

nanoGPT config files load as they are: the keys `backend`, `wandb_*`, `init_from` and `eval_only`
are accepted so those files need no editing, but this trainer ignores them except where its code
says otherwise (it trains from scratch or resumes from its own checkpoint; it logs no wandb).
"""
from __future__ import annotations

import ast
import difflib
import math
import operator
import re
import sys
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - 3.10 only
    import tomli as tomllib


class ConfigError(ValueError):
    """A config the user can fix: unknown key, bad value, unreadable or refused file."""


# Where each key's value came from, while load_config builds a TrainConfig, so that a bad value
# is reported with its file:line or --set.
_SOURCES: ContextVar[dict[str, str] | None] = ContextVar("_SOURCES", default=None)


class TrainConfig(BaseModel):
    # extra='forbid' catches typos; load_config reports them with a suggestion first.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # I/O
    out_dir: str = Field("out", min_length=1)
    eval_interval: int = Field(2000, ge=0)  # 0: never evaluate
    log_interval: int = Field(1, gt=0)
    eval_iters: int = Field(200, ge=0)  # 0: never evaluate
    eval_only: Literal[False] = False  # accepted from nanoGPT configs; only False is supported
    always_save_checkpoint: bool = True
    # accepted from nanoGPT configs; only 'scratch' (resuming is `autofit run --resume`; loading
    # GPT-2 weights is not supported yet), so a fine-tune config cannot silently train from scratch
    init_from: Literal["scratch"] = "scratch"
    # wandb logging: accepted from nanoGPT configs, ignored
    wandb_log: bool = False
    wandb_project: str = "owt"
    wandb_run_name: str = "gpt2"
    # data: 'embedded', a directory holding train.bin/val.bin, or a nanoGPT dataset name
    dataset: str = Field("embedded", min_length=1)
    gradient_accumulation_steps: int = Field(5 * 8, gt=0)  # nanoGPT: 5 steps x 8 GPUs
    batch_size: int = Field(12, gt=0)  # micro-batch, sequences
    block_size: int = Field(1024, gt=0)
    # model
    n_layer: int = Field(12, gt=0)
    n_head: int = Field(12, gt=0)
    n_embd: int = Field(768, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    bias: bool = False
    vocab_size: int = Field(50304, gt=0)
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
    backend: str = "nccl"  # accepted from nanoGPT configs, ignored (no DDP set-up here)
    device: str = "auto"  # 'auto' | 'cpu' | 'cuda' | 'cuda:N'
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    compile: bool = True
    seed: int = Field(1337, ge=0)
    # launcher knobs
    compile_after: int | None = Field(None, ge=0)  # eager optimizer steps before compiling; None: trainer default
    checkpointing: int = Field(0, ge=0)  # activation checkpointing: 0 off, k: every k-th block
    loss_impl: Literal["standard", "chunked"] = "standard"  # chunked never holds full fp32 logits
    ce_chunk_size: int = Field(4096, gt=0)  # rows of B*T per chunk of the chunked loss

    def __init__(self, **data: Any) -> None:
        # Construction anywhere (checkpoints, tests, the CLI) fails with the same one-line error.
        try:
            super().__init__(**data)
        except ValidationError as e:
            raise ConfigError(format_validation_error(e, _SOURCES.get())) from None

    def __setattr__(self, name: str, value: Any) -> None:
        previous = self.__dict__.get(name)
        try:
            super().__setattr__(name, value)
        except ValidationError as e:
            # pydantic has already stored the value when a check across fields fails; put the
            # old one back so a refused assignment leaves the config as it was.
            if name in self.__dict__:
                self.__dict__[name] = previous
            raise ConfigError(format_validation_error(e)) from None

    @field_validator("device")
    @classmethod
    def _device_form(cls, v: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", v):
            raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', not {v!r}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "TrainConfig":
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.checkpointing > self.n_layer:
            raise ValueError(f"checkpointing ({self.checkpointing}) must be between 0 and n_layer "
                             f"({self.n_layer})")
        # Only with decay: nanoGPT's finetune configs set a small learning_rate, decay_lr=False
        # and leave min_lr at its default, which is then unused.
        if self.decay_lr and self.min_lr > self.learning_rate:
            raise ValueError(f"min_lr ({self.min_lr}) must not exceed learning_rate "
                             f"({self.learning_rate}) when decay_lr is on")
        return self

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

PRESETS: dict[str, dict[str, Any]] = {
    # Byte-level model on the embedded text: trains on a laptop CPU in minutes, < 1M parameters.
    "tiny": dict(
        n_layer=4, n_head=4, n_embd=128, block_size=128, vocab_size=256, dropout=0.0,
        batch_size=16, gradient_accumulation_steps=2, learning_rate=1e-3, max_iters=300,
        warmup_iters=20, lr_decay_iters=300, min_lr=1e-4, eval_interval=100, eval_iters=10,
        log_interval=10, dtype="float32", compile=False, dataset="embedded", out_dir="out/tiny",
        weight_decay=0.1, beta2=0.99,
    ),
    # nanoGPT's config/train_gpt2.py on one GPU (its 5 x 8 GPUs of accumulation as 40 steps).
    "gpt2-124m": dict(
        n_layer=12, n_head=12, n_embd=768, block_size=1024, batch_size=12,
        gradient_accumulation_steps=40, max_iters=600000, lr_decay_iters=600000,
        eval_interval=1000, eval_iters=200, log_interval=10, weight_decay=0.1,
        dataset="fineweb", out_dir="out/gpt2-124m",
    ),
    # The config that ran out of memory on an RTX 4070 and started the project (DESIGN.md).
    "rtx4070-seed": dict(
        batch_size=16, gradient_accumulation_steps=32, block_size=1024, n_layer=12, n_head=12,
        n_embd=576, vocab_size=50304, compile=True, dtype="bfloat16", dataset="fineweb",
        out_dir="out/rtx4070-seed",
    ),
}

# The fields a plan's memory use depends on; profiles fingerprint plans by them.
_SUMMARY_FIELDS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "bias", "dropout",
                   "dtype", "compile", "checkpointing", "loss_impl", "ce_chunk_size", "batch_size",
                   "gradient_accumulation_steps")


def config_summary(cfg: TrainConfig) -> dict[str, Any]:
    """The memory-relevant fields of `cfg`, flat, for profile fingerprints."""
    out = {k: getattr(cfg, k) for k in _SUMMARY_FIELDS}
    out["effective_batch"] = cfg.effective_batch
    return out


# ---------------------------------------------------------------- error messages


def _suggest(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def unknown_key_message(key: str) -> str:
    return f"unknown key {key!r}{_suggest(key, FIELDS)}"


def format_validation_error(e: ValidationError, sources: dict[str, str] | None = None) -> str:
    """All of pydantic's errors on one line: 'key=value (source): what is wrong; ...'."""
    parts = []
    for err in e.errors():
        key = str(err["loc"][0]) if err["loc"] else ""
        where = f" ({sources[key]})" if sources and key in sources else ""
        if err["type"] == "extra_forbidden":
            parts.append(unknown_key_message(key) + where)
            continue
        msg = err["msg"].removeprefix("Value error, ")
        if not key:
            # A check across fields: its message names them and their values; add where the
            # named ones were set, since the culprit may be a preset value the user never typed.
            named = [f"{k} from {src}" for k, src in (sources or {}).items()
                     if re.search(rf"\b{k}\b", msg)]
            parts.append(msg + (f" [{', '.join(named)}]" if named else ""))
            continue
        value = err.get("input")
        if err["type"] == "literal_error" and isinstance(value, str):
            choices = err.get("ctx", {}).get("expected", "")
            msg += _suggest(value, re.findall(r"'([^']*)'", choices))
        parts.append(f"{key}={value!r}{where}: {msg}")
    return "invalid config: " + "; ".join(parts)


# ---------------------------------------------------------------- safe literal evaluation

_MAX_EXPONENT = 64
_MAX_INT_BITS = 1024  # ~10**308, the float range; larger integers are no sane config value

_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
           ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
           ast.Pow: operator.pow}

# Why a node is refused, in words a user recognises.
_REFUSED = {
    ast.Call: "function call", ast.Name: "name reference", ast.Attribute: "attribute access",
    ast.JoinedStr: "f-string", ast.Subscript: "subscript", ast.List: "list", ast.Tuple: "tuple",
    ast.Dict: "dict", ast.Set: "set", ast.Lambda: "lambda", ast.Compare: "comparison",
    ast.BoolOp: "and/or", ast.IfExp: "conditional expression", ast.ListComp: "comprehension",
    ast.SetComp: "comprehension", ast.DictComp: "comprehension", ast.GeneratorExp: "comprehension",
    ast.Starred: "starred expression", ast.NamedExpr: "walrus assignment", ast.Await: "await",
    ast.Import: "import", ast.ImportFrom: "import", ast.AugAssign: "augmented assignment",
    ast.AnnAssign: "annotated assignment", ast.If: "if statement", ast.For: "for loop",
    ast.While: "while loop", ast.FunctionDef: "function definition",
    ast.AsyncFunctionDef: "function definition", ast.ClassDef: "class definition",
    ast.With: "with statement", ast.Try: "try statement", ast.Delete: "del statement",
    ast.Global: "global statement", ast.Nonlocal: "nonlocal statement", ast.Assert: "assert",
    ast.Raise: "raise", ast.Return: "return", ast.Pass: "pass", ast.Match: "match statement",
}


class _Refused(Exception):
    def __init__(self, node: ast.AST, reason: str):
        super().__init__(reason)
        self.lineno = getattr(node, "lineno", 0)
        self.reason = reason


def _describe(node: ast.AST) -> str:
    what = _REFUSED.get(type(node), type(node).__name__)
    if isinstance(node, ast.Name):
        what += f" {node.id!r}"
    return what


def _literal(node: ast.AST) -> int | float | str | bool | None:
    """Value of a literal expression; anything that could run code or grow unbounded is refused."""
    if isinstance(node, ast.Constant):
        if node.value is None or isinstance(node.value, (bool, int, float, str)):
            return node.value
        raise _Refused(node, f"{type(node.value).__name__} constant")
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        v = _number(node.operand)
        return _check(node, -v if isinstance(node.op, ast.USub) else +v)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        a, b = _number(node.left), _number(node.right)
        if isinstance(node.op, ast.Pow):
            _check_power(node, a, b)
        try:
            v = _BINOPS[type(node.op)](a, b)
        except ZeroDivisionError:
            raise _Refused(node, "division by zero") from None
        except OverflowError:
            raise _Refused(node, "number too large") from None
        return _check(node, v)
    if isinstance(node, ast.BinOp):
        raise _Refused(node, f"operator {type(node.op).__name__}")
    raise _Refused(node, _describe(node))


def _number(node: ast.AST) -> int | float:
    v = _literal(node)
    # Arithmetic on strings ('x' * 10**9) could exhaust memory, and on bools/None means nothing.
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _Refused(node, "arithmetic is only allowed on numbers")
    return v


def _check_power(node: ast.AST, base: int | float, exp: int | float) -> None:
    # Refuse before computing: 10 ** 10 ** 9 would hang the parser.
    if abs(exp) > _MAX_EXPONENT:
        raise _Refused(node, f"exponent {exp} too large (at most {_MAX_EXPONENT})")
    if isinstance(base, int) and isinstance(exp, int) and exp > 0 \
            and base.bit_length() * exp > _MAX_INT_BITS:
        raise _Refused(node, "number too large")


def _check(node: ast.AST, v: Any) -> int | float:
    if isinstance(v, complex):
        raise _Refused(node, "complex result")
    if isinstance(v, int) and v.bit_length() > _MAX_INT_BITS:
        raise _Refused(node, "number too large")
    if isinstance(v, float) and not math.isfinite(v):
        raise _Refused(node, "number too large")
    return v


def parse_py_config(text: str, filename: str = "<config>") -> dict[str, tuple[Any, int]]:
    """nanoGPT-style config -> {key: (value, line)}, by reading its syntax tree, never running it.

    Only top-level `name = <literal>` statements and bare strings (docstrings) are allowed; a
    literal is a number, string, bool or None, with unary +/- and + - * / // % ** on numbers.
    """
    try:
        tree = ast.parse(text, filename=filename)
    except SyntaxError as e:
        raise ConfigError(f"{filename}:{e.lineno}: syntax error: {e.msg}") from None
    except (ValueError, RecursionError, MemoryError) as e:  # null bytes, absurd nesting
        raise ConfigError(f"{filename}: cannot parse: {e or type(e).__name__}") from None
    out: dict[str, tuple[Any, int]] = {}
    try:
        for stmt in tree.body:
            if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant) \
                    and isinstance(stmt.value.value, str):
                continue  # docstring or a bare string used as a comment
            if isinstance(stmt, ast.Expr):
                raise _Refused(stmt, _describe(stmt.value))
            if not isinstance(stmt, ast.Assign):
                raise _Refused(stmt, _describe(stmt))
            if len(stmt.targets) != 1:
                raise _Refused(stmt, "chained assignment")
            target = stmt.targets[0]
            if not isinstance(target, ast.Name):
                raise _Refused(stmt, f"assignment to {_describe(target).split(' ')[0]}")
            try:
                out[target.id] = (_literal(stmt.value), stmt.lineno)
            except RecursionError:
                raise _Refused(stmt, "expression nested too deeply") from None
    except _Refused as r:
        raise ConfigError(f"{filename}:{r.lineno}: refused: {r.reason} "
                          "(only literal assignments are allowed)") from None
    return out


# ---------------------------------------------------------------- sources


def _read_toml(text: str, path: Path) -> dict[str, tuple[Any, int]]:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None
    table = data.pop("train", None)
    if table is not None:
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: 'train' must be a table ([train]), not a value")
        both = sorted(set(table) & set(data))
        if both:
            raise ConfigError(f"{path}: key {both[0]!r} is set both at top level and in [train]")
        data.update(table)
    # tomllib keeps no line numbers; find each key's line so errors can point at it.
    lines = text.splitlines()
    out = {}
    for key, value in data.items():
        pat = re.compile(rf"^\s*[\"']?{re.escape(key)}[\"']?\s*=")
        line = next((i + 1 for i, s in enumerate(lines) if pat.match(s)), 0)
        out[key] = (value, line)
    return out


def _read_file(path: Path) -> dict[str, tuple[Any, int]]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.suffix not in (".toml", ".py"):
        raise ConfigError(f"unsupported config file type {path.suffix or '(none)'!r}: {path} "
                          "(use .toml or a nanoGPT-style .py)")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from None
    return _read_toml(text, path) if path.suffix == ".toml" else parse_py_config(text, str(path))


_WORDS = {"true": True, "false": False, "none": None, "null": None}


def parse_override(item: str) -> tuple[str, Any]:
    """'key=value' -> (key, value). The value is read as a literal (number, bool, None, quoted
    string, arithmetic) where it is one, else taken as the plain string, so `dtype=bfloat16` and
    `out_dir=out/run1` need no quotes."""
    key, sep, raw = item.partition("=")
    key, raw = key.strip(), raw.strip()
    if not sep or not key:
        raise ConfigError(f"--set expects key=value, got {item!r}")
    if raw.lower() in _WORDS:
        return key, _WORDS[raw.lower()]
    try:
        value: Any = _literal(ast.parse(raw, mode="eval").body)
    except (SyntaxError, ValueError, RecursionError, _Refused):
        return key, raw
    # A string field keeps what was typed: `wandb_run_name=123` means the name '123'.
    field = TrainConfig.model_fields.get(key)
    if field is not None and field.annotation is str and not isinstance(value, str):
        return key, raw
    return key, value


def load_config(preset: str | None = None, config_file: str | Path | None = None,
                overrides: Sequence[str] = ()) -> TrainConfig:
    """TrainConfig from a preset (None: the class defaults), then a file, then `key=value`s."""
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}  # key -> where its value came from, for error messages

    def put(key: str, value: Any, source: str) -> None:
        if key not in TrainConfig.model_fields:
            raise ConfigError(f"{source}: {unknown_key_message(key)}")
        values[key] = value
        sources[key] = source

    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}{_suggest(preset, list(PRESETS))}; "
                              f"choose from {', '.join(PRESETS)}")
        for key, value in PRESETS[preset].items():
            put(key, value, f"preset {preset}")
    if config_file is not None:
        path = Path(config_file)
        for key, (value, line) in _read_file(path).items():
            put(key, value, f"{path}:{line}" if line else str(path))
    for item in overrides:
        key, value = parse_override(item)
        put(key, value, "--set")
    token = _SOURCES.set(sources)
    try:
        return TrainConfig(**values)
    finally:
        _SOURCES.reset(token)
