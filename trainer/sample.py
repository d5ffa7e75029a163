"""Sampling text from a checkpoint, as nanoGPT's sample.py does.

The model comes from <out>/ckpt.pt (autofit's layout or nanoGPT's, see trainer/checkpoint/nanogpt.py)
or from GPT-2's published weights (trainer/model/pretrained.py). The text codec follows the
checkpoint's dataset, as nanoGPT's does: byte tokens for the built-in 'embedded' corpus; the
dataset's meta.pkl (stoi/itos, read with data.py's restricted unpickler) for character-level
sets; GPT-2 BPE (tiktoken) otherwise. tiktoken downloads its GPT-2 encoding at first use and
caches it (TIKTOKEN_CACHE_DIR); offline, a cached copy is needed.

Every sample is drawn on its own, batch of one, after torch.manual_seed(seed), as sample.py's
loop does, so a seed gives the same texts on the same device and weights.
"""
from __future__ import annotations

import contextlib
import io
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from trainer.data.datasets import BYTE_VOCAB_SIZE, GPT2_VOCAB_SIZE, load_dir
from trainer.data.meta import _PlainUnpickler
from trainer.data.tokenfiles import DataError, fingerprint, fingerprint_change
from trainer.model.gpt import GPT, GPTConfig
from trainer.checkpoint.nanogpt import NanoGPTCheckpoint, check_finite, read_nanogpt_checkpoint
from trainer.paths import PathProblem, expand_user, input_file
from trainer.model.pretrained import GPT2_MODELS, INSTALL_HINT, load_gpt2
from trainer.errors import counted
from trainer.step import cuda_bf16_supported

# logits / temperature must stay finite in float32 (3.4e38), or softmax gives NaN and sampling
# fails: 1e-6 keeps logits up to 1e32 finite. --top-k 1 is the way to ask for greedy decoding.
MIN_TEMPERATURE = 1e-6
REPLACEMENT = "\ufffd"  # shown for a generated id the vocabulary has no text for
DEFAULT_START = "\n"  # sample.py's prompt: where a text begins, in a corpus with lines


class SampleError(ValueError):
    """Bad sampling input a user can fix (one line)."""


@dataclass
class SampleOptions:
    """nanoGPT sample.py's settings and defaults."""
    start: str = DEFAULT_START  # the prompt, or "FILE:path" to read it from a UTF-8 file
    num_samples: int = 10
    max_new_tokens: int = 500  # tokens generated after the prompt, per sample
    temperature: float = 0.8  # > 0; < 1 sharper, > 1 more random
    top_k: int | None = 200  # keep the k most likely tokens (None: all)
    seed: int = 1337
    device: str = "cpu"  # 'cpu', 'cuda' or 'cuda:N'
    init_from: str = "resume"  # 'resume' (<out>/ckpt.pt), a GPT-2 model type, or a GPT-2 directory


@dataclass
class Codec:
    """Text <-> token ids for one vocabulary."""
    encode: Callable[[str], list[int]]
    decode: Callable[[list[int]], str]
    vocab_size: int  # ids this codec has text for
    description: str  # what it is and where it came from, for the status line


@dataclass
class SampleResult:
    texts: list[str]  # each the prompt followed by its continuation, as sample.py prints it
    model_source: str  # the checkpoint or weights, and their layout
    codec: str
    device: str
    dtype: str
    prompt_tokens: int


def check_options(opts: SampleOptions) -> None:
    """Refuse bad settings before any file is read (one line each)."""
    if not opts.temperature > 0:
        raise SampleError(f"--temperature must be > 0, got {opts.temperature}")
    if not (math.isfinite(opts.temperature) and opts.temperature >= MIN_TEMPERATURE):
        raise SampleError(f"--temperature must be a finite number >= {MIN_TEMPERATURE:g} (logits are divided by it; "
                          f"for the most likely token every time use --top-k 1), got {opts.temperature}")
    if not 0 <= opts.seed < 2**64:
        raise SampleError(f"--seed must be an integer in 0 .. 2**64 - 1 (what torch.manual_seed takes), "
                          f"got {opts.seed}")
    if opts.top_k is not None and opts.top_k < 1:
        raise SampleError(f"--top-k must be at least 1, got {opts.top_k}")
    if opts.num_samples < 1:
        raise SampleError(f"--num-samples must be at least 1, got {opts.num_samples}")
    if opts.max_new_tokens < 1:
        raise SampleError(f"--max-new-tokens must be at least 1, got {opts.max_new_tokens}")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", opts.device):
        raise SampleError(f"--device must be cpu, cuda or cuda:N, got {opts.device!r}")
    if opts.device.startswith("cuda") and not torch.cuda.is_available():
        raise SampleError(f"--device {opts.device}: no CUDA GPU is visible here; use --device cpu")
    if opts.device.startswith("cuda:") and int(opts.device[5:]) >= (n := torch.cuda.device_count()):
        raise SampleError(f"--device {opts.device}: only {counted(n, 'CUDA GPU')} {'is' if n == 1 else 'are'} visible")


def read_start(start: str) -> str:
    """The prompt text: `start` itself, or the contents of the file named by 'FILE:path'."""
    if start.startswith("FILE:"):
        path = expand_user(start[5:])
        try:  # a FIFO would block, /dev/zero would never end: regular files only
            input_file(path, "--start FILE:")
            start = path.read_text(encoding="utf-8")
        except PathProblem as e:
            raise SampleError(str(e).replace("FILE: ", "FILE:", 1)) from None
        except FileNotFoundError:
            raise SampleError(f"--start FILE:{path}: no such file") from None
        except (OSError, UnicodeDecodeError) as e:
            raise SampleError(f"--start FILE:{path}: cannot read it as UTF-8 text ({type(e).__name__})") from None
    if not start:
        raise SampleError("--start is empty: give at least one character (sample.py's default is a newline)")
    try:  # bytes the terminal gave that are not UTF-8 come as surrogates (PEP 383)
        start.encode("utf-8")
    except UnicodeEncodeError as e:
        raise SampleError(f"--start is not UTF-8 text (character {e.start + 1} is a byte the terminal's encoding "
                          f"did not decode); give UTF-8 text, or FILE:path") from None
    return start


def byte_codec() -> Codec:
    """UTF-8 bytes, one token each (the embedded corpus)."""
    bad = REPLACEMENT.encode("utf-8")

    def decode(ids: list[int]) -> str:
        raw = b"".join(bytes([i]) if 0 <= i < BYTE_VOCAB_SIZE else bad for i in ids)
        return raw.decode("utf-8", errors="replace")

    return Codec(lambda s: list(s.encode("utf-8")), decode, BYTE_VOCAB_SIZE,
                 "bytes (the built-in 'embedded' corpus)")


def char_codec(meta_path: Path) -> Codec:
    """nanoGPT's character vocabulary from a meta.pkl (stoi, itos), read without running code."""
    try:
        meta = _PlainUnpickler(io.BytesIO(meta_path.read_bytes())).load()
        stoi, itos = dict(meta["stoi"]), dict(meta["itos"])
    except Exception as e:
        raise SampleError(f"cannot read the character vocabulary (stoi, itos) from {meta_path}: "
                          f"{type(e).__name__}: {str(e)[:120]}") from None
    # nanoGPT's prepare.py writes stoi {char: id} and itos {id: char}, ids 0..n-1; anything else
    # failed mid-generation (an id past the embedding) or in the decode
    ok = (all(isinstance(c, str) and type(i) is int and i >= 0 for c, i in stoi.items())
          and all(type(i) is int and i >= 0 and isinstance(c, str) for i, c in itos.items()) and itos)
    if not ok:
        raise SampleError(f"{meta_path}: not a character vocabulary (stoi maps characters to ids >= 0, itos ids "
                          f"to characters, as nanoGPT's prepare.py writes them)")

    def encode(text: str) -> list[int]:
        unknown = sorted({c for c in text if c not in stoi})
        if unknown:
            shown = ", ".join(repr(c) for c in unknown[:5]) + (", ..." if len(unknown) > 5 else "")
            raise SampleError(f"--start has {counted(len(unknown), 'character')} not in the vocabulary of {meta_path} "
                              f"({counted(len(stoi), 'character')}): {shown}")
        return [int(stoi[c]) for c in text]

    return Codec(encode, lambda ids: "".join(itos.get(i, REPLACEMENT) for i in ids), len(itos),
                 f"characters from {meta_path} ({len(itos)})")


def gpt2_codec(encoder: Any = None) -> Codec:
    """GPT-2 BPE. `encoder` is anything with tiktoken's encode(text, allowed_special=...),
    decode(ids) and n_vocab; by default tiktoken's 'gpt2' encoding."""
    if encoder is None:
        encoder = _tiktoken_gpt2()
    n_vocab = int(getattr(encoder, "n_vocab", GPT2_VOCAB_SIZE))

    def decode(ids: list[int]) -> str:
        out, run = [], []
        for i in ids:  # ids the encoding lacks (a padded vocab's 50257..50303) show as U+FFFD
            if 0 <= i < n_vocab:
                run.append(i)
                continue
            if run:
                out.append(encoder.decode(run))
                run = []
            out.append(REPLACEMENT)
        if run:
            out.append(encoder.decode(run))
        return "".join(out)

    return Codec(lambda s: list(encoder.encode(s, allowed_special={"<|endoftext|>"})), decode, n_vocab,
                 "GPT-2 BPE (tiktoken)")


def _tiktoken_gpt2() -> Any:
    try:
        import tiktoken
    except ImportError:
        raise SampleError(f"GPT-2 BPE needs tiktoken: {INSTALL_HINT}") from None
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # downloaded at first use: offline with no cached copy
        raise SampleError(f"tiktoken could not load the GPT-2 encoding ({type(e).__name__}); it is downloaded "
                          f"at first use and cached: run once with network, or set TIKTOKEN_CACHE_DIR to a "
                          f"directory holding it") from None


def pick_codec(dataset: str | None, vocab_size: int, *, data_root: str | Path = "data",
               gpt2_encoder: Any = None, trained_on: dict | None = None, trained_in: str | None = None) -> Codec:
    """The codec for a model trained on `dataset`, found as nanoGPT's sample.py does: a meta.pkl
    in the dataset's directory (a path, or <data_root>/<name>) means characters; the embedded
    corpus means bytes; anything else GPT-2 BPE, which needs vocab_size >= 50257. `trained_in`:
    the absolute folder the checkpoint trained on (NanoGPTCheckpoint.trained_in), looked in last,
    so `sample` run from another folder finds the meta.pkl too. `trained_on`: the checkpoint's data
    fingerprint (NanoGPTCheckpoint.trained_on), against which a meta.pkl's dataset prepared again
    since training is said in the codec's description. Raises SampleError naming every place looked."""
    if dataset == "embedded":
        return byte_codec()
    looked = _meta_places(dataset, data_root, trained_in) if dataset else []
    for i, meta in enumerate(looked):
        if meta.is_file():
            changed = _data_changed(meta.parent, trained_on)
            codec = _for_model(char_codec(meta), vocab_size, meta, changed)
            if trained_in and i == len(looked) - 1:  # found only where it trained
                codec.description += f", the folder it trained on ({dataset!r} is not found from {Path.cwd()})"
            codec.description += changed or ""
            return codec
    if vocab_size < GPT2_VOCAB_SIZE:
        where = (f"no meta.pkl at {' or '.join(map(str, dict.fromkeys(looked)))} (from {Path.cwd()})" if looked else
                 "the checkpoint names no dataset")
        raise SampleError(f"the model's vocab_size {vocab_size} is smaller than GPT-2 BPE's {GPT2_VOCAB_SIZE} and "
                          f"{where}: run from the folder the model trained in, or put its dataset's meta.pkl back")
    return gpt2_codec(gpt2_encoder)


def _meta_places(dataset: str, data_root: str | Path, trained_in: str | None) -> list[Path]:
    """Where a character dataset's meta.pkl may be, in order: the dataset as a folder, else a bare
    name under data_root (nanoGPT's data/NAME), as training finds the dataset (datasets.
    dataset_dir); then the folder the checkpoint trained on."""
    where = expand_user(dataset)
    places = [where / "meta.pkl"]
    if not where.is_dir() and len(where.parts) == 1:
        places.append(Path(data_root) / dataset / "meta.pkl")
    if trained_in:
        places.append(Path(trained_in) / "meta.pkl")
    return places


def _for_model(codec: Codec, vocab_size: int, meta: Path, changed: str | None = None) -> Codec:
    """A character codec checked against the model's vocab_size: more characters than the model
    has ids is refused (a prompt's ids past its embedding: the meta.pkl is not the one the model
    trained with); fewer is said in the description (the ids without a character print as U+FFFD),
    with its cause where the checkpoint's data fingerprint tells it (`changed`, _data_changed: ''
    the same data, so a vocab_size set above its characters, as nanoGPT's shakespeare_char config
    pins 65; words: prepared again, said by the caller, and a pinned vocab_size may be a cause too;
    None: unknown). Raises SampleError."""
    if codec.vocab_size > vocab_size:
        raise SampleError(f"{meta} has {counted(codec.vocab_size, 'character')}, but the model has only "
                          f"{counted(vocab_size, 'token id')}: the dataset was prepared again since it was trained; sample "
                          f"with the meta.pkl it was trained with")
    if codec.vocab_size < vocab_size:
        why = {"": f": its vocab_size was set above the {counted(codec.vocab_size, 'character')} of the data it trained on "
                   f"(a config's pinned value), so those ids were never trained"}.get(
            changed, " (a vocab_size set above the data's characters, or the dataset prepared again)")  # t8: both
        codec.description += (f"; the model has {vocab_size} ids: {codec.vocab_size} to {vocab_size - 1} have no "
                              f"character here and print as {REPLACEMENT}{why}")
    return codec


def _data_changed(where: Path, trained_on: dict | None) -> str | None:
    """'; ...' when the token files beside a meta.pkl are not those the checkpoint trained on (the
    dataset was prepared again: its meta.pkl may map ids to other characters, even with as many
    of them), '' when they are, None when that is not known (no fingerprint in the checkpoint,
    unreadable token files): the check is a courtesy."""
    if not trained_on:
        return None
    try:
        data = load_dir(where)
        change = fingerprint_change(trained_on, {s: fingerprint(data.split(s).parts) for s in data.splits})
    except (DataError, KeyError, TypeError, ValueError, OSError):
        return None
    return (f"; but {where} was prepared again since the model trained ({change}): its meta.pkl may map "
            f"ids to other characters than the model learned" if change else "")


def load_model(out_dir: str | Path, init_from: str,
               device: torch.device) -> tuple[GPT, str | None, str, NanoGPTCheckpoint | None]:
    """(model in eval mode on device, its dataset name or None, a description of where it came
    from, the checkpoint read (its trained_on and trained_in say what data it trained on) or None
    for GPT-2 weights)."""
    if init_from in GPT2_MODELS or (init_from != "resume" and Path(init_from).is_dir()):
        src = None if init_from in GPT2_MODELS else init_from
        loaded = load_gpt2(init_from if src is None else None, dropout=0.0, source=src)
        return loaded.model.to(device), None, f"GPT-2 weights from {loaded.source}", None
    if init_from != "resume":
        raise SampleError(f"--init-from {init_from!r}: use resume, {', '.join(GPT2_MODELS)}, or a directory "
                          f"holding a GPT-2 model.safetensors and config.json")
    path = Path(out_dir)
    path = path if path.is_file() else path / "ckpt.pt"
    ck = read_nanogpt_checkpoint(path, map_location="cpu")
    check_finite(ck.model, path)
    model = GPT.empty(GPTConfig(**ck.model_args))
    model.load_state_dict(ck.model)
    dataset = ck.config.get("dataset")
    return model.eval().to(device), dataset if isinstance(dataset, str) else None, \
        f"{path} ({ck.layout} layout, step {ck.iter_num})", ck


def generate_samples(out_dir: str | Path, opts: SampleOptions, *, data_root: str | Path = "data",
                     gpt2_encoder: Any = None, on_sample: Callable[[str], None] | None = None,
                     say: Callable[[str], None] | None = None) -> SampleResult:
    """Texts sampled from the checkpoint in out_dir (or opts.init_from's GPT-2 weights).
    `say` gets one line on the model, vocabulary, device and prompt before the first sample;
    `on_sample` each text as soon as it is drawn (as sample.py prints them), so an interrupted
    run keeps what it printed.

    Raises SampleError, CheckpointError or WeightsError (one line) for bad options, a missing or
    unreadable --start file, a missing checkpoint, a vocabulary that cannot be found, or a
    prompt the vocabulary cannot encode; all before any generation.
    """
    check_options(opts)
    start = read_start(opts.start)
    device = torch.device(opts.device)
    model, dataset, source, ck = load_model(out_dir, opts.init_from, device)
    vocab = model.config.vocab_size
    codec = gpt2_codec(gpt2_encoder) if opts.init_from != "resume" else \
        pick_codec(dataset, vocab, data_root=data_root, gpt2_encoder=gpt2_encoder, trained_on=ck.trained_on,
                   trained_in=ck.trained_in)
    ids, note = _prompt_ids(codec, start)
    if max(ids) >= vocab:
        raise SampleError(f"--start encodes to token {max(ids)}, beyond the model's vocab_size {vocab}")
    dtype, ctx = _autocast(device)
    if say is not None:
        say(f"model {source}; vocabulary {codec.description}; {device}, {dtype}; prompt {counted(len(ids), 'token')}{note}")
    x = torch.tensor(ids, dtype=torch.long, device=device)[None, ...]
    torch.manual_seed(opts.seed)
    texts = []
    with torch.no_grad(), ctx:
        for _ in range(opts.num_samples):
            y = model.generate(x, opts.max_new_tokens, temperature=opts.temperature, top_k=opts.top_k)
            texts.append(codec.decode(y[0].tolist()))
            if on_sample is not None:
                on_sample(texts[-1])
    return SampleResult(texts, source, codec.description, str(device), dtype, len(ids))


def _prompt_ids(codec: Codec, start: str) -> tuple[list[int], str]:
    """(the prompt's token ids, a note for the status line). The default newline prompt on a
    character vocabulary without a newline (a corpus of one line) starts from id 0 instead, and
    says so; nanoGPT's sample.py fails there with a KeyError. Raises SampleError for any other
    prompt the vocabulary cannot encode."""
    try:
        return codec.encode(start), ""
    except SampleError:
        if start != DEFAULT_START:
            raise
    return [0], f" (the default newline is not in this vocabulary: starting from id 0, {codec.decode([0])!r})"


def _autocast(device: torch.device):
    # sample.py's choice: bf16 where the GPU has it, else fp16; fp32 on the CPU. Asked as training
    # asks (compute capability 8.0+): torch.cuda.is_bf16_supported() says yes where bf16 is only
    # emulated (a T4), and sampling there in bf16 is slow
    if device.type != "cuda":
        return "float32", contextlib.nullcontext()
    dtype = torch.bfloat16 if cuda_bf16_supported(device) else torch.float16
    return str(dtype).removeprefix("torch."), torch.autocast(device_type="cuda", dtype=dtype)
