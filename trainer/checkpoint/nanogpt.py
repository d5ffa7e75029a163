"""nanoGPT's checkpoint layout, both ways.

nanoGPT's train.py saves ckpt.pt as a dict with six keys: model (the state dict, with
torch.compile's `_orig_mod.` prefix when compiled), optimizer (AdamW's state dict), model_args
(the seven GPTConfig fields), iter_num, best_val_loss (a 0-d tensor after the first eval) and
config (train.py's settings: dataset, learning_rate, ...). Its sample.py reads model_args, model
and config['dataset'] (to find data/<dataset>/meta.pkl). Our model has nanoGPT's parameter
names, and trainer/step.py's make_optimizer builds nanoGPT's two AdamW groups
([decay: dim >= 2, no_decay: dim < 2], each in model.parameters() order, as nanoGPT's
configure_optimizers), so both state dicts carry over as they are.

What nanoGPT does not save cannot be restored: where the data sampler was (nanoGPT draws
random batches) and the RNG state; read_nanogpt_checkpoint lists these for the caller to say.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from trainer.model.gpt import MODEL_ARGS, MODERN_ARGS, GPT, GPTConfig, clean_state_dict
from trainer.model.gpt import model_args_of as _model_args_of
from trainer.checkpoint.safe_load import UnsafeOrUnreadable, load_weights_only
from trainer.paths import PathProblem, input_file
from trainer.checkpoint.schema import CheckpointFieldError, NanoGPTCheckpointFields, check_format, validate
from trainer.errors import counted

# What tells autofit's layout from nanoGPT's (autofit's checkpoints carry nanoGPT's keys too).
AUTOFIT_MARKERS = ("model", "config", "sampler")
NANOGPT_KEYS = ("model", "optimizer", "model_args", "iter_num", "best_val_loss", "config")


class CheckpointError(ValueError):
    """A checkpoint file that is unreadable, of neither known layout, or does not fit (one line)."""


@dataclass
class NanoGPTCheckpoint:
    """What a nanoGPT-layout checkpoint holds, in our terms."""
    model: dict[str, torch.Tensor]  # state dict in our (= nanoGPT's) names, `_orig_mod.` stripped
    optimizer: dict | None  # AdamW state dict; None when the file has none
    model_args: dict[str, Any]  # the seven MODEL_ARGS
    iter_num: int
    best_val_loss: float
    config: dict[str, Any]  # nanoGPT's config dict (or autofit's TrainConfig dict)
    layout: str  # "nanogpt" or "autofit" (an autofit checkpoint also carries nanoGPT's keys)
    not_restored: list[str] = field(default_factory=list)  # what this checkpoint cannot give back
    # an autofit checkpoint's data fingerprint per split (trainer.data.tokenfiles.fingerprint), kept
    # by its sampler since session 11; None for nanoGPT's and for older ones
    trained_on: dict | None = None
    # the absolute dataset folder an autofit checkpoint trained on (its sampler's, since session
    # 13), where `sample` looks for meta.pkl last; None for nanoGPT's and for older ones
    trained_in: str | None = None


def load_torch_file(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """torch.load with weights_only=True (a checkpoint cannot run code). Raises CheckpointError
    (one line) for a missing, unreadable or non-dict file."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        raise CheckpointError(f"no checkpoint at {path}")
    try:  # a dangling or looping link, a FIFO (reading blocks), a device (reading never ends)
        input_file(path, "checkpoint")
    except PathProblem as e:
        raise CheckpointError(str(e)) from None
    try:
        ck = load_weights_only(path, map_location=map_location)
    except UnsafeOrUnreadable as e:  # truncated, not a torch file, or a pickle that wants to run code
        raise CheckpointError(f"{path} is not a readable checkpoint with weights_only=True: {e}") from None
    if not isinstance(ck, dict):
        raise CheckpointError(f"{path} holds a {type(ck).__name__}, not a checkpoint dict")
    return ck


def checkpoint_layout(ck: Mapping, path: str | Path = "checkpoint") -> str:
    """'autofit' (AUTOFIT_MARKERS: trainer/checkpoint/ckpt.py's training_state) or 'nanogpt' (train.py's keys);
    CheckpointError otherwise."""
    if all(k in ck for k in AUTOFIT_MARKERS):
        return "autofit"
    if "model" in ck and "model_args" in ck:
        return "nanogpt"
    raise CheckpointError(f"{path} is neither an autofit checkpoint nor a nanoGPT one (has keys "
                          f"{', '.join(map(str, list(ck)[:8])) or 'none'}; nanoGPT's has {', '.join(NANOGPT_KEYS)})")


def model_args_of(source: Any) -> dict[str, Any]:
    """trainer.model.gpt.model_args_of, raising CheckpointError (one line) for args that lack a field."""
    try:
        return _model_args_of(source)
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def expected_shapes(model_args: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """State-dict names and shapes of a GPT with these args (nanoGPT's seven and any of today's
    options, trainer.model.gpt.MODERN_ARGS), built on the meta device (no memory)."""
    keys = MODEL_ARGS + tuple(MODERN_ARGS)
    with torch.device("meta"):
        model = GPT(GPTConfig(**{k: model_args[k] for k in keys if k in model_args}))
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_model_state(state: Mapping[str, torch.Tensor], model_args: Mapping, path: str | Path,
                      against: str = "model_args") -> None:
    """Refuse (one line) a state dict whose names or shapes do not fit GPT(model_args); `against`
    names where the args come from ('model_args', 'config'). Looks at shapes only (tensors may be
    memory-mapped or on the meta device)."""
    want = expected_shapes(model_args)
    missing = [k for k in want if k not in state]
    extra = [k for k in state if k not in want]
    if missing or extra:
        what = f"lacks {missing[0]}" if missing else f"has {extra[0]}, which the model does not"
        layers = len({k.split(".")[2] for k in state if k.startswith("transformer.h.")})
        hint = (f"; the weights have {counted(layers, 'layer')}, {against} says n_layer={model_args['n_layer']}"
                if layers and layers != model_args["n_layer"] else "")
        raise CheckpointError(f"{path}: model: the model state {what} ({len(missing)} missing, {len(extra)} "
                              f"unexpected){hint}")
    for k, shape in want.items():
        if not isinstance(state[k], torch.Tensor) or tuple(state[k].shape) != shape:
            got = tuple(state[k].shape) if isinstance(state[k], torch.Tensor) else type(state[k]).__name__
            raise CheckpointError(f"{path}: model: {k} has shape {got}, {against} "
                                  f"({_args_text(model_args)}) give {shape}")


def check_finite(state: Any, path: str | Path, what: str = "model") -> None:
    """Raise CheckpointError naming the first floating-point tensor in `state` (a state dict, or
    an optimizer's nested one) that holds NaN or inf: a run that diverged saved it, and every
    step or sample from it would be NaN, while the loss check would blame the learning rate.
    One device-to-host read per tensor, on the device the checkpoint was loaded to."""
    stack = [(what, state)]
    while stack:
        name, value = stack.pop()
        if isinstance(value, torch.Tensor):
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise CheckpointError(f"{path}: {name} holds NaN or inf (the run that saved it had diverged): "
                                      f"nothing can train or sample from it; start again, or from a copy saved "
                                      f"before the divergence")
        elif isinstance(value, Mapping):
            stack.extend((f"{name}.{k}", v) for k, v in reversed(list(value.items())))
        elif isinstance(value, (list, tuple)):
            stack.extend((f"{name}[{i}]", v) for i, v in reversed(list(enumerate(value))))


def _args_text(args: Mapping) -> str:
    return ", ".join(f"{k}={args[k]}" for k in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size"))


def optimizer_param_order(model: torch.nn.Module) -> list[list[str]]:
    """Parameter names of nanoGPT's two AdamW groups, in the order make_optimizer and nanoGPT's
    configure_optimizers both use: [decay (dim >= 2), no_decay (dim < 2)], model order within each.
    An optimizer state dict refers to parameters by their position in this list."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [[n for n, p in named if p.dim() >= 2], [n for n, p in named if p.dim() < 2]]


def check_optimizer_state(opt_state: Mapping, model: torch.nn.Module, path: str | Path) -> None:
    """Refuse (one line) an AdamW state dict whose groups or moment shapes do not line up with
    optimizer_param_order(model): loading it would give parameters each other's moments."""
    groups = opt_state.get("param_groups") if isinstance(opt_state, Mapping) else None
    order = optimizer_param_order(model)
    if not isinstance(groups, list) or len(groups) != len(order):
        n = len(groups) if isinstance(groups, list) else "no"
        raise CheckpointError(f"{path}: optimizer state has {n} parameter groups, nanoGPT's AdamW has 2 "
                              f"(decay, no_decay)")
    params = dict(model.named_parameters())
    state = opt_state.get("state", {})
    for gi, (group, names) in enumerate(zip(groups, order)):
        ids = list(group.get("params", []))
        if len(ids) != len(names):
            raise CheckpointError(f"{path}: optimizer group {gi} has {len(ids)} parameters, the model's has "
                                  f"{len(names)}")
        for pid, name in zip(ids, names):
            moment = state.get(pid, {}).get("exp_avg")
            if moment is not None and tuple(moment.shape) != tuple(params[name].shape):
                raise CheckpointError(f"{path}: optimizer state {pid} has shape {tuple(moment.shape)} where "
                                      f"{name} is {tuple(params[name].shape)}: the parameter order differs")


def read_nanogpt_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> NanoGPTCheckpoint:
    """Read a nanoGPT ckpt.pt (or an autofit one, through the nanoGPT keys it carries or its
    config) with weights_only=True, checked against its model_args.

    Raises CheckpointError (one line) for a missing or unreadable file, one a newer autofit wrote
    (its format above trainer.checkpoint.schema.CHECKPOINT_FORMAT: 'upgrade autofit'), a dict of neither
    layout, model args that do not describe a GPT, or model/optimizer state that does not fit.
    """
    return nanogpt_checkpoint_from(load_torch_file(path, map_location), path)


def nanogpt_checkpoint_from(ck: Mapping, path: str | Path = "checkpoint") -> NanoGPTCheckpoint:
    """read_nanogpt_checkpoint's checks and result for a checkpoint dict already loaded. A newer
    autofit's format is refused first, as --resume refuses it: its nanoGPT keys may read here while
    what they mean changed (nanoGPT's own files carry no format and read as format 1)."""
    try:
        check_format(ck, path)
    except CheckpointFieldError as e:
        raise CheckpointError(str(e)) from None
    layout = checkpoint_layout(ck, path)
    try:  # every field's type and range, once (trainer/checkpoint/schema.py)
        validate(NanoGPTCheckpointFields, {k: ck[k] for k in NANOGPT_KEYS if k in ck}, path)
    except CheckpointFieldError as e:
        raise CheckpointError(str(e)) from None
    raw_args = ck.get("model_args") if "model_args" in ck else ck.get("config")
    if not isinstance(raw_args, Mapping):
        raise CheckpointError(f"{path}: model_args is a {type(raw_args).__name__}, not a dict")
    try:
        args = model_args_of(raw_args)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    if args["n_embd"] % args["n_head"] or min(args["n_layer"], args["n_head"], args["block_size"],
                                               args["vocab_size"]) < 1:
        raise CheckpointError(f"{path}: model_args ({_args_text(args)}) do not describe a GPT")
    if not isinstance(ck["model"], Mapping):
        raise CheckpointError(f"{path}: 'model' is a {type(ck['model']).__name__}, not a state dict")
    state = clean_state_dict(dict(ck["model"]))
    check_model_state(state, args, path)
    opt = ck.get("optimizer")
    # Muon + AdamW (trainer.muon.MuonAdamW) is autofit's own state: its load_state_dict checks it
    if opt is not None and not (isinstance(opt, Mapping) and set(opt) == {"muon", "adamw"}):
        with torch.device("meta"):
            check_optimizer_state(opt, GPT(GPTConfig(**args)), path)
    config = ck.get("config") if isinstance(ck.get("config"), Mapping) else {}
    best = ck.get("best_val_loss", float("inf"))
    sampler = ck.get("sampler") if layout == "autofit" else None
    trained_on = sampler.get("data") if isinstance(sampler, Mapping) else None
    return NanoGPTCheckpoint(model=state, optimizer=opt, model_args=args, iter_num=int(ck.get("iter_num", 0)),
                             best_val_loss=float(best), config=dict(config), layout=layout,
                             not_restored=_not_restored(layout, opt, config),
                             trained_on=dict(trained_on) if isinstance(trained_on, Mapping) else None,
                             trained_in=_str_or_none(sampler.get("folder")) if isinstance(sampler, Mapping) else None)


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _not_restored(layout: str, opt: Any, config: Mapping) -> list[str]:
    # An autofit checkpoint also holds the sampler and RNG state; trainer/loop.py's resume
    # restores them, so only a missing optimizer is worth saying.
    out = [] if layout == "autofit" else [
        "data position (nanoGPT draws random batches and saves no sampler state: batches restart "
        "from this run's seed)",
        "RNG state (nanoGPT saves none: dropout masks restart from the seed)"]
    if opt is None:
        out.append("optimizer state (none in the file: AdamW moments start at zero)")
    if layout == "nanogpt" and config.get("dtype") == "float16":
        out.append("fp16 GradScaler state (nanoGPT saves none: the loss scale starts again)")
    return out


def nanogpt_keys(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, model_args: Any,
                 iter_num: int, best_val_loss: float, config: Mapping[str, Any]) -> dict[str, Any]:
    """The keys nanoGPT's train.py writes, for a checkpoint that nanoGPT's sample.py (and its
    resume) reads as is: model (state dict, `_orig_mod.` stripped), optimizer, model_args (exactly
    nanoGPT's seven GPTConfig fields, from a TrainConfig, GPTConfig or mapping), iter_num,
    best_val_loss and config (must hold 'dataset': sample.py looks for data/<dataset>/meta.pkl).
    Every value loads with torch.load(weights_only=True). Merged into autofit's checkpoint
    (state.update(nanogpt_keys(...)), config = the TrainConfig dict) the file does not grow:
    'model' holds the same storages, which torch.save writes once.

    Raises CheckpointError if model_args lack a field or config is not a plain dict with 'dataset'.
    """
    module = getattr(model, "_orig_mod", model)  # a torch.compile'd module wraps the real one
    if not isinstance(config, Mapping) or "dataset" not in config:
        raise CheckpointError("config for a nanoGPT checkpoint must be a dict with 'dataset' "
                              "(nanoGPT's sample.py reads config['dataset'])")
    return {
        "model": clean_state_dict(module.state_dict()),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "model_args": model_args_of(model_args),
        "iter_num": int(iter_num),
        "best_val_loss": float(best_val_loss),
        "config": dict(config),
    }


def train_config_of(ckpt: NanoGPTCheckpoint):
    """A TrainConfig for continuing a nanoGPT run: its config's settings that autofit knows (the
    names are nanoGPT's), its model_args, and init_from='resume'. Returns (config, the keys of
    nanoGPT's config that were dropped, with a device autofit does not train on, e.g. 'mps').
    Raises trainer.config.train_config.ConfigError for a value autofit refuses."""
    from trainer.config.train_config import FIELDS, ConfigError, TrainConfig
    known = {k: v for k, v in ckpt.config.items() if k in FIELDS}
    dropped = sorted(k for k in ckpt.config if k not in FIELDS)
    try:  # where that run trained, e.g. nanoGPT's --device=mps on a Mac: not a device here, and no flag could replace it
        TrainConfig(device=known.get("device", "auto"))
    except ConfigError:
        dropped.append(f"device={known.pop('device')!r}")
    known.update(ckpt.model_args)
    known["init_from"] = "resume"
    return TrainConfig(**known), dropped
