"""OpenAI's GPT-2 weights, read from the Hugging Face format into our GPT (trainer/model/gpt.py).

What nanoGPT's GPT.from_pretrained does, without `transformers`: the weights come from the
model's model.safetensors and config.json (Hugging Face cache, a download through
huggingface_hub, or a local directory), are read one tensor at a time with safetensors, and
the four Conv1D matrices of each block are transposed into nn.Linear's (out, in) layout.
GPT-2 has vocab 50257, 1024 positions and biases; only dropout and a smaller block_size may be
changed, as nanoGPT allows.

One difference from Hugging Face's GPT2LMHeadModel is kept on purpose: GPT-2's config.json asks
for the tanh approximation of GELU ("gelu_new"); this model, like nanoGPT's, runs the exact GELU.
On the tests' tiny random model the logits then differ by ~2e-3 (of ~5, i.e. ~4e-4 relative) from
transformers' (tests/test_pretrained.py); the loader's notes say so.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import NamedTuple

import torch

from trainer.errors import TrainError, install_hint
from trainer.paths import expand_user
from trainer.model.gpt import GPT, GPTConfig

# n_layer, n_head, n_embd of the published models; source: nanoGPT's model.py from_pretrained
# and the config.json of each model on the Hugging Face hub.
GPT2_MODELS = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M parameters
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
}
GPT2_VOCAB, GPT2_POSITIONS = 50257, 1024  # every published size
HF_ORG = "openai-community"  # the models' home on the hub; the old bare ids ("gpt2") are aliases
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
# Hugging Face's GPT-2 keeps these as Conv1D with weights stored (in, out): transposed on load.
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
INSTALL_HINT = install_hint("hf", "huggingface_hub", "safetensors", "tiktoken")
_MASK_BUFFER = re.compile(r"^h\.\d+\.attn\.(bias|masked_bias)$")  # causal masks, not weights


class WeightsError(ValueError):
    """GPT-2 weights that cannot be found, read, or fitted into the model (one line)."""


class PretrainedGPT2(NamedTuple):
    model: GPT  # fp32 on the CPU, in eval mode
    model_args: dict  # n_layer, n_head, n_embd, vocab_size, block_size, bias, dropout (TrainConfig fields)
    source: str  # the directory the two files were read from
    notes: list[str]  # what differs from the published model (GELU form, cropped positions, dropout)


def load_gpt2(model_type: str | None, *, dropout: float | None = None, block_size: int | None = None,
              source: str | Path | None = None) -> PretrainedGPT2:
    """GPT-2 weights in our GPT: 'gpt2', 'gpt2-medium', 'gpt2-large' or 'gpt2-xl'.

    source: a directory holding model.safetensors and config.json (Hugging Face layout); without
    it the two files come from the Hugging Face cache, or are downloaded (huggingface_hub).
    model_type may be None only with a source: the shape is then config.json's alone (e.g. a
    small GPT-2-format model made for tests). dropout (default 0.0, as nanoGPT) and block_size
    (<= the model's positions; wpe is cropped, as nanoGPT's crop_block_size) override the model.
    Memory: the fp32 model plus one tensor at a time (gpt2-xl: ~6.2 GB).

    Raises WeightsError (one line naming the file or model id and what to do) for an unknown
    model type, a missing package, files not cached and not downloadable, a config.json that is
    not GPT-2's, or tensors whose names or shapes do not fit.
    """
    if model_type is not None and model_type not in GPT2_MODELS:
        raise WeightsError(f"unknown GPT-2 model {model_type!r}; choose one of {', '.join(GPT2_MODELS)}")
    if model_type is None and source is None:
        raise WeightsError("load_gpt2 needs a model type (gpt2, gpt2-medium, gpt2-large, gpt2-xl) or a source directory")
    if dropout is not None and not 0.0 <= dropout < 1.0:
        raise WeightsError(f"dropout must be in [0, 1), got {dropout}")
    config_path, weights_path = _locate(model_type, source)
    args, notes = read_gpt2_config(config_path, model_type)
    if block_size is not None:
        if not 1 <= block_size <= args["block_size"]:
            raise WeightsError(f"block_size {block_size}: GPT-2 has {args['block_size']} positions and "
                               f"block_size may only shrink (1..{args['block_size']})")
    args["dropout"] = 0.0 if dropout is None else float(dropout)
    model = GPT.empty(GPTConfig(**args))  # every tensor is then read from the file
    copy_hf_weights(model, weights_path)
    if block_size is not None and block_size < args["block_size"]:
        model.crop_block_size(block_size)
        notes.append(f"position embeddings cropped from {args['block_size']} to {block_size}")
        args["block_size"] = block_size
    if args["dropout"]:
        notes.append(f"dropout {args['dropout']} (published weights were trained with 0.1)")
    return PretrainedGPT2(model.eval(), args, str(weights_path.parent), notes)


def locate_gpt2(model_type: str) -> tuple[Path, Path]:
    """(config.json, model.safetensors) of a published GPT-2 ('gpt2' ... 'gpt2-xl'): from the
    Hugging Face cache, else downloaded now. A launcher calls it before any probe, so missing
    weights (offline, no cache) are one line before minutes of trials, not after. Raises
    WeightsError."""
    if model_type not in GPT2_MODELS:
        raise WeightsError(f"unknown GPT-2 model {model_type!r}; choose one of {', '.join(GPT2_MODELS)}")
    return _locate(model_type, None)


def _locate(model_type: str | None, source: str | Path | None) -> tuple[Path, Path]:
    """(config.json, model.safetensors) from a directory, or from the hub (cache first)."""
    if source is not None:
        root = expand_user(source)
        if not root.is_dir():
            raise WeightsError(f"GPT-2 weights: {root} is not a directory (it should hold {WEIGHTS_FILE} "
                               f"and {CONFIG_FILE})")
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            if not (root / name).is_file():
                raise WeightsError(f"{root / name} not found: a GPT-2 directory in the Hugging Face format holds "
                                   f"{WEIGHTS_FILE} and {CONFIG_FILE} (hf download {HF_ORG}/gpt2 "
                                   f"{CONFIG_FILE} {WEIGHTS_FILE} --local-dir {root})")
        return root / CONFIG_FILE, root / WEIGHTS_FILE
    return _from_hub(model_type)


def _from_hub(model_type: str) -> tuple[Path, Path]:
    try:
        from huggingface_hub import constants, hf_hub_download
    except ImportError:
        raise WeightsError(f"loading {model_type} from the Hugging Face hub needs huggingface_hub: "
                           f"{INSTALL_HINT}") from None
    repo = f"{HF_ORG}/{model_type}"
    # The cache first, under the current id and the old alias (what transformers used to save).
    for repo_id in (repo, model_type):
        try:
            files = [Path(hf_hub_download(repo_id, f, local_files_only=True)) for f in (CONFIG_FILE, WEIGHTS_FILE)]
            return files[0], files[1]
        except Exception:  # not cached (LocalEntryNotFoundError) or a broken cache entry
            continue
    # `autofit run` takes the weights from the cache only (it has no directory option; `sample
    # --init-from DIR` has), so the advice is how to fill or point at a cache
    fill = (f"put them in the Hugging Face cache ({constants.HF_HUB_CACHE}): `hf download {repo} {CONFIG_FILE} "
            f"{WEIGHTS_FILE}` where there is network (then copy that cache here), or point HF_HUB_CACHE at a cache "
            f"that holds them")
    if constants.HF_HUB_OFFLINE:  # read by huggingface_hub from the environment at import
        raise WeightsError(f"{repo} ({CONFIG_FILE}, {WEIGHTS_FILE}) is not in the Hugging Face cache and "
                           f"HF_HUB_OFFLINE is set: {fill}")
    try:
        from huggingface_hub.utils import logging as hf_logging
        hf_logging.set_verbosity_error()  # its retry warnings would bury the one line we end with
        files = [Path(hf_hub_download(repo, f)) for f in (CONFIG_FILE, WEIGHTS_FILE)]
    except Exception as e:  # no network, repository moved, disk full: say which and what to do
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise WeightsError(f"cannot download {repo} from the Hugging Face hub ({type(e).__name__}: {first}); "
                           f"check the network, or {fill} (HF_HUB_OFFLINE=1 then skips the download's retries)") from None
    return files[0], files[1]


def read_gpt2_config(path: Path, model_type: str | None) -> tuple[dict, list[str]]:
    """Model args (our names) from a Hugging Face GPT-2 config.json, checked against model_type's
    published shape when one is named. Returns (args without dropout, notes)."""
    try:
        hf = json.loads(Path(path).read_text(encoding="utf-8"))
        args = dict(n_layer=int(hf["n_layer"]), n_head=int(hf["n_head"]), n_embd=int(hf["n_embd"]),
                    vocab_size=int(hf["vocab_size"]), block_size=int(hf["n_positions"]), bias=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise WeightsError(f"{path} is not a GPT-2 config.json ({type(e).__name__}: {e})") from None
    if hf.get("model_type", "gpt2") != "gpt2":
        raise WeightsError(f"{path} describes a {hf.get('model_type')!r} model, not GPT-2")
    if args["n_embd"] % args["n_head"]:
        raise WeightsError(f"{path}: n_embd {args['n_embd']} is not divisible by n_head {args['n_head']}")
    if hf.get("n_inner") not in (None, 4 * args["n_embd"]):
        raise WeightsError(f"{path}: n_inner {hf['n_inner']} is not 4 x n_embd; this GPT's MLP is 4 x n_embd wide")
    if abs(float(hf.get("layer_norm_epsilon", 1e-5)) - 1e-5) > 1e-12:
        raise WeightsError(f"{path}: layer_norm_epsilon {hf['layer_norm_epsilon']} is not GPT-2's 1e-5")
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if hf.get(flag):
            raise WeightsError(f"{path}: {flag} is set; this GPT (as nanoGPT's) does not implement it")
    if model_type is not None:
        want = {**GPT2_MODELS[model_type], "vocab_size": 50257, "block_size": 1024}
        bad = [f"{k} {args[k]} (expected {v})" for k, v in want.items() if args[k] != v]
        if bad:
            raise WeightsError(f"{path} is not {model_type}'s config: {', '.join(bad)}")
    notes = []
    act = hf.get("activation_function", "gelu_new")
    if act != "gelu":
        notes.append(f"config.json asks for {act!r} (tanh GELU); run as exact GELU, as nanoGPT does")
    return args, notes


def hf_name(ours: str) -> str:
    """The name of our state-dict key in GPT-2's published model.safetensors (no 'transformer.')."""
    return ours[len("transformer."):] if ours.startswith("transformer.") else ours


def copy_hf_weights(model: GPT, weights_path: Path) -> None:
    """Copy every tensor of a GPT-2 model.safetensors into `model`, transposing Conv1D weights.

    Accepts the published layout (h.0.attn.c_attn.weight, ...) and the one transformers'
    save_pretrained writes (transformer.h.0..., lm_head.weight tied to wte); the causal-mask
    buffers (attn.bias, attn.masked_bias) are skipped. Raises WeightsError naming the file and
    the first tensor that is missing, unexpected, or of the wrong shape.
    """
    try:
        from safetensors import SafetensorError, safe_open
    except ImportError:
        raise WeightsError(f"reading {weights_path} needs safetensors: {INSTALL_HINT}") from None
    params = dict(model.named_parameters())  # the tied lm_head.weight appears once, as wte
    wanted = {hf_name(k): k for k in params}
    done: set[str] = set()
    try:
        with safe_open(str(weights_path), framework="pt") as f:
            for key in f.keys():
                name = hf_name(key)
                if _MASK_BUFFER.match(name):
                    continue
                if name == "lm_head.weight":
                    continue  # tied to wte in GPT-2; wte is what is read
                if name not in wanted:
                    raise WeightsError(f"{weights_path} has tensor {key!r}, which a GPT-2 does not; "
                                       f"is this a GPT-2 checkpoint?")
                _copy_one(params[wanted[name]], f.get_tensor(key), key, weights_path)
                done.add(name)
    except SafetensorError as e:
        raise WeightsError(f"{weights_path} is not a readable safetensors file ({e})") from None
    missing = [k for k in wanted if k not in done]
    if missing:
        raise WeightsError(f"{weights_path} lacks {len(missing)} of the model's tensors (first: {missing[0]}); "
                           f"config.json and model.safetensors do not belong together")


@torch.no_grad()
def _copy_one(param: torch.nn.Parameter, tensor: torch.Tensor, key: str, path: Path) -> None:
    transpose = key.endswith(CONV1D_WEIGHTS)
    if transpose and tensor.dim() == 2:
        tensor = tensor.t()
    if tuple(tensor.shape) != tuple(param.shape):
        stored = tuple(tensor.t().shape) if transpose else tuple(tensor.shape)
        raise WeightsError(f"{path}: tensor {key!r} has shape {stored}, the model needs "
                           f"{tuple(param.shape[::-1]) if transpose else tuple(param.shape)}; "
                           f"config.json and model.safetensors disagree")
    param.copy_(tensor)


def gpt2_config(cfg):
    """The TrainConfig for init_from = 'gpt2*', as nanoGPT's train.py makes it: the published
    model's n_layer, n_head, n_embd, vocab 50257 and bias; block_size cropped to the config's when
    smaller than GPT-2's 1024; dropout the config's. Each value the weights set says so in
    `source_of` ('the gpt2 weights'). Other configs come back unchanged.

    Raises WeightsError (one line) where a config file or --set gives one of those keys a value
    other than the weights' (a block_size above 1024): nanoGPT ignores them silently, and the run
    would train another model than the one written. A preset's value is a default: replaced."""
    if cfg.init_from not in GPT2_MODELS:
        return cfg
    published = {**GPT2_MODELS[cfg.init_from], "vocab_size": GPT2_VOCAB, "bias": True}
    _refuse_other_shape(cfg, published)
    shape = {**published, "block_size": min(cfg.block_size, GPT2_POSITIONS)}
    out = cfg.model_copy(update=shape)
    weights = f"the {cfg.init_from} weights"
    out._sources = {**cfg._sources, **{k: weights for k, v in shape.items()
                                       if k != "block_size" or v != cfg.block_size}}
    return out


def _given(cfg, key: str) -> bool:
    """Whether a config file or --set gave `key` (not a preset, not the class default)."""
    src = cfg.source_of(key)
    return src != "default" and not src.startswith("preset ")


def _refuse_other_shape(cfg, published: dict) -> None:
    bad = [f"{k}={getattr(cfg, k)!r} ({cfg.source_of(k)})" for k, v in published.items()
           if _given(cfg, k) and getattr(cfg, k) != v]
    if _given(cfg, "block_size") and cfg.block_size > GPT2_POSITIONS:
        bad.append(f"block_size={cfg.block_size} ({cfg.source_of('block_size')}; GPT-2 has {GPT2_POSITIONS} positions)")
    if bad:
        keep = ", ".join(f"{k}={v!r}" for k, v in published.items())
        raise WeightsError(f"invalid config: init_from {cfg.init_from!r} loads GPT-2's architecture ({keep}): "
                          f"{', '.join(bad)} differ (nanoGPT replaces them silently; autofit refuses, so that the model "
                          f"trained is the one written): drop them, or init_from='scratch'; only dropout and a "
                          f"smaller block_size may change")


def build_model(cfg, device: torch.device, *, resume: bool) -> tuple[GPT, list[str]]:
    """The GPT a run starts from, on `device` in training mode, and notes for the run's opening
    lines: OpenAI's GPT-2 weights for init_from = 'gpt2*' (as nanoGPT's train.py; not on a resume,
    whose checkpoint holds the weights), else a new GPT initialised on the device itself (not on
    the host and copied). `cfg`: a trainer.config TrainConfig. Raises TrainError when the weights
    cannot be had or their shape disagrees with the config."""
    if cfg.init_from.startswith("gpt2") and not resume:
        try:
            pre = load_gpt2(cfg.init_from, dropout=cfg.dropout, block_size=cfg.block_size)
        except WeightsError as e:
            raise TrainError(str(e)) from None
        got = {k: pre.model_args[k] for k in ("n_layer", "n_head", "n_embd", "vocab_size", "block_size", "bias")}
        want = {k: getattr(cfg, k) for k in got}
        if got != want:
            raise TrainError(f"the {cfg.init_from} weights in {pre.source} have {got}, the config {want}")
        return pre.model.to(device).train(), [f"weights of {cfg.init_from} from {pre.source}"] + pre.notes
    with torch.device(device):
        return GPT(GPTConfig.from_train_config(cfg)), []
