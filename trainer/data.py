"""Token datasets and the deterministic batch sampler.

Three on-disk forms are read:
- nanoGPT: a directory with train.bin and val.bin, raw little-endian uint16 tokens;
- llm.c shards: files with a 256 x int32 header (magic 20240520, version 1, token count) followed
  by uint16 tokens, named like fineweb_train_000001.bin / fineweb_val_000000.bin; a split's
  shards are concatenated logically, each one memory-mapped, never copied into RAM;
- the embedded set: byte tokens of generated English-like text shipped inside the package, so a
  run works with no download at all (see scripts/make_embedded_data.py).

The sampler draws a whole optimizer step's batch at once from a counter-based generator, so its
state is a pair of counters: a resumed run sees exactly the batches it would have seen, and the
trainer can cut the batch into any micro-batches without changing the data.
"""
from __future__ import annotations

import gzip
import io
import json
import pickle
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

import numpy as np
import torch

LLMC_MAGIC = 20240520
LLMC_VERSION = 1  # GPT-2 tokens as uint16; llm.c's other versions hold other token types
LLMC_HEADER_INTS = 256
LLMC_HEADER_BYTES = LLMC_HEADER_INTS * 4
GPT2_VOCAB_SIZE = 50257  # GPT-2 token ids are 0..50256 (50256 = <|endoftext|>)
BYTE_VOCAB_SIZE = 256
SPLITS = ("train", "val")

# llm.c names shards <name>_<split>_<index>.bin; its single-file sets (tiny_shakespeare_val.bin)
# drop the index.
_SHARD_NAME = re.compile(r"^.+_(train|val)(?:_\d+)?\.bin$")


class DataError(ValueError):
    """A dataset the user pointed at is missing, malformed or does not fit the model."""


class TokenSplit:
    """One split's tokens: one or more 1-D integer arrays read as if concatenated."""

    def __init__(self, parts: list[np.ndarray], sources: list[str]):
        self.parts = parts
        self.sources = sources  # where each part came from, for error messages
        self._starts = np.cumsum([0] + [len(p) for p in parts])

    def __len__(self) -> int:
        return int(self._starts[-1])

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) as int64, crossing shard boundaries where needed."""
        if start < 0 or length < 0 or start + length > len(self):
            raise IndexError(f"window [{start}, {start + length}) outside a split of {len(self)} tokens")
        out = np.empty(length, dtype=np.int64)
        i = int(np.searchsorted(self._starts, start, side="right")) - 1
        done = 0
        while done < length:
            offset = start + done - int(self._starts[i])
            take = min(length - done, len(self.parts[i]) - offset)
            out[done:done + take] = self.parts[i][offset:offset + take]
            done += take
            i += 1
        return out


@dataclass
class TokenDataset:
    name: str
    format: str  # "embedded", "nanogpt" or "llmc"
    vocab_size: int  # tokens are < vocab_size; known from the format, never scanned for
    splits: dict[str, TokenSplit]

    def split(self, name: str) -> TokenSplit:
        if name not in self.splits:
            raise DataError(f"dataset '{self.name}' has no '{name}' split (it has {', '.join(self.splits)})")
        return self.splits[name]

    def num_tokens(self, split: str) -> int:
        return len(self.split(split))

    def check_vocab(self, vocab_size: int) -> None:
        """Refuse a model whose embedding table cannot hold every token id of this dataset."""
        if vocab_size < self.vocab_size:
            raise DataError(f"model vocab_size {vocab_size} is smaller than dataset '{self.name}' needs "
                            f"({self.vocab_size} token ids); set vocab_size >= {self.vocab_size}")


def decode_bytes(tokens) -> str:
    """Text of byte tokens (the embedded dataset); bytes that are not UTF-8 show as U+FFFD."""
    if isinstance(tokens, torch.Tensor):
        tokens = tokens.detach().cpu().numpy()
    arr = np.asarray(tokens)
    if arr.size and (arr.min() < 0 or arr.max() >= BYTE_VOCAB_SIZE):
        raise DataError("decode_bytes needs byte tokens in 0..255")
    return arr.astype(np.uint8).tobytes().decode("utf-8", errors="replace")


# ---------------------------------------------------------------------------------------------
# Loading


def load_dataset(spec: str, *, data_root: str | Path = "data") -> TokenDataset:
    """'embedded', a directory path, or a nanoGPT-style name looked up as <data_root>/<name>."""
    if spec == "embedded":
        return load_embedded()
    path = Path(spec).expanduser()
    if path.is_dir():
        return load_dir(path)
    if path.exists():
        raise DataError(f"dataset '{spec}' is a file; give the directory that holds its train and val data")
    if len(path.parts) > 1:  # a path, not a bare name: do not guess under data_root
        raise DataError(f"dataset directory {spec} does not exist")
    where = Path(data_root) / spec
    if where.is_dir():
        return load_dir(where)
    if "fineweb" in spec.lower():
        raise DataError(f"dataset '{spec}' not found at {where}; run: python scripts/prepare_fineweb.py --out {where}")
    raise DataError(f"dataset '{spec}' not found at {where}; put nanoGPT train.bin/val.bin or llm.c shards there "
                    f"(python scripts/prepare_fineweb.py --out {where} makes FineWeb-Edu shards), or use 'embedded'")


def load_dir(path: str | Path) -> TokenDataset:
    """A directory in nanoGPT form (train.bin, val.bin) or llm.c form (*_train_*.bin shards)."""
    path = Path(path)
    if (path / "train.bin").is_file() or (path / "val.bin").is_file():
        return _load_nanogpt(path)
    shards: dict[str, list[Path]] = {s: [] for s in SPLITS}
    for f in sorted(path.iterdir()):
        m = _SHARD_NAME.match(f.name)
        if m and f.is_file():
            shards[m.group(1)].append(f)
    if not any(shards.values()):
        raise DataError(f"{path} holds neither train.bin/val.bin (nanoGPT) nor *_train_*.bin/*_val_*.bin "
                        f"shards (llm.c)")
    for split, files in shards.items():
        if not files:
            raise DataError(f"{path} has llm.c shards but no {split} shard (*_{split}_*.bin)")
    splits = {}
    for split, files in shards.items():
        splits[split] = TokenSplit([read_llmc_shard(f) for f in files], [str(f) for f in files])
    return TokenDataset(name=path.name, format="llmc", vocab_size=GPT2_VOCAB_SIZE, splits=splits)


def _load_nanogpt(path: Path) -> TokenDataset:
    splits = {}
    for split in SPLITS:
        f = path / f"{split}.bin"
        if not f.is_file():
            raise DataError(f"{path} has no {split}.bin (a nanoGPT dataset needs train.bin and val.bin)")
        size = f.stat().st_size
        if size % 2:
            raise DataError(f"{f} has an odd size ({size} bytes); nanoGPT .bin files hold uint16 tokens")
        # np.memmap refuses an empty file; an empty split is reported later, when sampled.
        arr = np.memmap(f, dtype="<u2", mode="r") if size else np.zeros(0, dtype="<u2")
        splits[split] = TokenSplit([arr], [str(f)])
    return TokenDataset(name=path.name, format="nanogpt", vocab_size=_nanogpt_vocab(path), splits=splits)


class _PlainUnpickler(pickle.Unpickler):
    """Reads only plain containers (dict, list, str, int): a meta.pkl cannot run code."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _nanogpt_vocab(path: Path) -> int:
    # nanoGPT's character-level sets store their vocab_size in meta.pkl; the others are GPT-2.
    meta = path / "meta.pkl"
    if not meta.is_file():
        return GPT2_VOCAB_SIZE
    try:
        data = _PlainUnpickler(io.BytesIO(meta.read_bytes())).load()
        return int(data["vocab_size"])
    except Exception as e:
        raise DataError(f"cannot read vocab_size from {meta}: {e}") from None


def write_llmc_shard(path: str | Path, tokens) -> None:
    """Write tokens (ints < 65536) as one llm.c shard; written to a temp file, then renamed, so a
    half-written shard never looks like a whole one."""
    path = Path(path)
    toks = np.asarray(tokens)
    if toks.size and (toks.min() < 0 or toks.max() > np.iinfo(np.uint16).max):
        raise DataError(f"tokens for {path} do not fit in uint16 (range {toks.min()}..{toks.max()})")
    if len(toks) >= 2**31:
        raise DataError(f"{len(toks)} tokens is too many for one llm.c shard ({path})")
    header = np.zeros(LLMC_HEADER_INTS, dtype="<i4")
    header[:3] = (LLMC_MAGIC, LLMC_VERSION, len(toks))
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(toks.astype("<u2").tobytes())
    tmp.replace(path)


def read_llmc_shard(path: str | Path) -> np.ndarray:
    """Memory-map one llm.c shard's tokens after checking its header against the file size."""
    path = Path(path)
    size = path.stat().st_size
    if size < LLMC_HEADER_BYTES:
        raise DataError(f"{path} is {size} bytes, too short for an llm.c header ({LLMC_HEADER_BYTES} bytes)")
    header = np.fromfile(path, dtype="<i4", count=LLMC_HEADER_INTS)
    magic, version, n = (int(v) for v in header[:3])
    if magic != LLMC_MAGIC:
        raise DataError(f"{path} is not an llm.c token shard (magic {magic}, expected {LLMC_MAGIC})")
    if version != LLMC_VERSION:
        raise DataError(f"{path} has llm.c shard version {version}; only version {LLMC_VERSION} "
                        f"(GPT-2 uint16 tokens) is supported")
    expected = LLMC_HEADER_BYTES + 2 * n
    if n < 0 or size != expected:
        state = "truncated" if size < expected else "longer than its header says"
        raise DataError(f"{path} is {state}: header says {n} tokens ({expected} bytes), file has {size} bytes")
    if n == 0:
        return np.zeros(0, dtype="<u2")
    return np.memmap(path, dtype="<u2", mode="r", offset=LLMC_HEADER_BYTES, shape=(n,))


def load_embedded() -> TokenDataset:
    return TokenDataset(name="embedded", format="embedded", vocab_size=BYTE_VOCAB_SIZE,
                        splits={s: TokenSplit([a], [f"trainer/embedded/{s}"]) for s, a in _embedded_arrays().items()})


@lru_cache(maxsize=1)
def _embedded_arrays() -> dict[str, np.ndarray]:
    # Decompressed once per process (~1.6 MB); read-only so every dataset object can share them.
    root = resources.files("trainer") / "embedded"
    meta = json.loads((root / "meta.json").read_text())
    arrays = {}
    for split in SPLITS:
        info = meta["splits"][split]
        arr = np.frombuffer(gzip.decompress((root / info["file"]).read_bytes()), dtype=np.uint8)
        if len(arr) != info["tokens"]:
            raise DataError(f"embedded {split} data is damaged ({len(arr)} tokens, expected {info['tokens']}); "
                            f"regenerate with scripts/make_embedded_data.py")
        arrays[split] = arr
    return arrays


# ---------------------------------------------------------------------------------------------
# Sampling


class BatchSampler:
    """nanoGPT's get_batch, made reproducible and resumable.

    The offsets of call k on a split come from np.random.default_rng([seed, split_id, k]), so the
    sampler's whole state is one counter per split, and any batch can be drawn again by number.
    """

    def __init__(self, dataset: TokenDataset, block_size: int, seed: int):
        if block_size < 1:
            raise DataError(f"block_size must be at least 1, got {block_size}")
        if seed < 0:
            raise DataError(f"seed must be a non-negative integer, got {seed}")
        self.dataset = dataset
        self.block_size = block_size
        self.seed = seed
        self.counters = {s: 0 for s in dataset.splits}

    def sample(self, split: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The next batch of split: x, y int64 (n, block_size), y = x shifted left by one token."""
        x, y = self.batch_at(split, n, self.counters.get(split, 0))
        self.counters[split] = self.counters.get(split, 0) + 1
        return x, y

    def batch_at(self, split: str, n: int, counter: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch number `counter` of split, without moving the sampler on."""
        tokens = self.dataset.split(split)
        T = self.block_size
        if len(tokens) < T + 1:
            raise DataError(f"the {split} split of '{self.dataset.name}' has {len(tokens)} tokens, fewer than "
                            f"block_size + 1 = {T + 1}")
        if n < 1:
            raise DataError(f"batch size must be at least 1, got {n}")
        rng = np.random.default_rng([self.seed, SPLITS.index(split), counter])
        offsets = rng.integers(0, len(tokens) - T, size=n)  # the last window ends at the last token
        rows = np.stack([tokens.read(int(o), T + 1) for o in offsets])
        return torch.from_numpy(rows[:, :-1].copy()), torch.from_numpy(rows[:, 1:].copy())

    def state_dict(self) -> dict:
        return {"seed": self.seed, "block_size": self.block_size, "counters": dict(self.counters)}

    def load_state_dict(self, state: dict) -> None:
        # Counters only mean the same batches under the same seed and block size.
        for key in ("seed", "block_size"):
            if state.get(key) != getattr(self, key):
                raise DataError(f"sampler state was saved with {key} {state.get(key)}, this run has "
                                f"{getattr(self, key)}; resume with the same {key}")
        self.counters = {s: int(c) for s, c in state["counters"].items()}
