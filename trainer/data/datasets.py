"""Token datasets and the deterministic batch sampler.

A dataset is named as nanoGPT names it: `dataset = NAME` is the folder data/NAME/ (relative to
the working directory, as nanoGPT's train.py looks), or a path to a folder, or 'embedded'. What a
folder may hold (see trainer/data/tokenfiles.py for the byte layouts):
- nanoGPT: train.bin and val.bin, raw little-endian uint16 tokens, and for character-level sets a
  meta.pkl whose vocab_size the model adopts when the config sets none (read with a restricted
  unpickler that loads plain containers only);
- llm.c shards: fineweb_train_000001.bin / fineweb_val_000000.bin, ...; a split's shards are
  concatenated logically, each one memory-mapped, never copied into RAM;
- the embedded set: byte tokens of generated English-like text shipped inside the package, so a
  run works with no download at all (trainer/data/embedded.py). It is used only when asked for by
  name, and refused where a dataset folder of the user's has that name too.

`check_vocab` refuses a model whose vocab_size cannot hold the dataset's largest token id, found
once per file and remembered in a sidecar (tokenfiles.max_token), before any training.

The sampler draws a whole optimizer step's batch at once from a counter-based generator, so its
state is a pair of counters: a resumed run sees exactly the batches it would have seen, and the
trainer can cut the batch into any micro-batches without changing the data.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from trainer.paths import PathProblem, expand_user, input_file, real_stat
from trainer.errors import counted
from trainer.data.meta import _meta_vocab, read_meta  # noqa: F401  (read_meta: here before)

from trainer.data.tokenfiles import (LLMC_HEADER_BYTES, LLMC_HEADER_INTS, LLMC_MAGIC, LLMC_VERSION,  # noqa: F401
                                SHARD_NAME, DataError, file_identity, fingerprint, max_token, read_llmc_shard,
                                read_nanogpt_bin, write_llmc_shard, write_tokens)
from trainer.data.embedded import EMBEDDED, check_embedded_name, embedded_arrays

if TYPE_CHECKING:
    import torch

GPT2_VOCAB_SIZE = 50257  # GPT-2 token ids are 0..50256 (50256 = <|endoftext|>)
UINT16_IDS = 65536  # the token ids a uint16 token file can hold, 0..65535 (nanoGPT .bin, llm.c GPT-2 shards)
BYTE_VOCAB_SIZE = 256
SPLITS = ("train", "val")
# The fewest tokens a split may hold: a run samples block_size + 1 tokens from each split
# (Dataset.check_block_size), and block_size is at least 1. `data prepare` refuses to write a
# shorter one, before anything is written (t11's M2: a 2-character text with --force replaced a
# good dataset with 1-token splits, exit 0, and the next run failed)
MIN_SPLIT_TOKENS = 2
DATA_ROOT = "data"  # nanoGPT's data_dir = os.path.join('data', dataset)

# Names `autofit data prepare` writes (trainer/data/prepare.py); a missing one says how to make it.
PREPARABLE = ("shakespeare_char", "shakespeare", "fineweb-edu")


class TokenSplit:
    """One split's tokens: one or more 1-D integer arrays read as if concatenated."""

    def __init__(self, parts: list[np.ndarray], sources: list[str]):
        self.parts = parts
        self.sources = sources  # where each part came from, for error messages
        self._starts = np.cumsum([0] + [len(p) for p in parts])
        # Each file's identity when it was mapped: a file rewritten in place under the memory map
        # (nanoGPT's prepare.py opens its .bin with mode 'w+') changes what later batches read,
        # and one that shrinks under it ends the process with SIGBUS, without a line.
        self._identities = [file_identity(s) for s in sources]

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

    def check_unchanged(self) -> None:
        """Raise DataError if a file of this split was rewritten in place (same inode, another
        size or modification time) since it was opened. A file replaced whole (a rename, as
        `autofit data prepare` writes) or removed is no change: the map keeps the old file's
        pages. Checked before each batch is read; a write between the check and the read is not
        caught, so the check narrows the SIGBUS window, it cannot close it."""
        for source, was in zip(self.sources, self._identities):
            now = file_identity(source)
            if was is None or now is None or now[:2] != was[:2] or now == was:
                continue
            change = (f"{was[2]} -> {now[2]} bytes" if now[2] != was[2] else "same size, modified")
            raise DataError(f"{source} was rewritten in place while this run read it ({change}): the batches "
                            f"from here would not be the data the run started on; write new data to a new "
                            f"file or folder (autofit data prepare replaces files whole)")

    def check_ids(self, vocab_size: int, note: str = "", fix: str = "") -> None:
        """Refuse the first part holding a token id >= vocab_size (DataError naming the file, the
        id and the vocab_size, and `fix`: what to do, when vocab_size cannot change). Parts whose
        dtype cannot reach vocab_size are not scanned; files are scanned once and the result kept
        (tokenfiles.max_token)."""
        for part, source in zip(self.parts, self.sources):
            if vocab_size > np.iinfo(part.dtype).max or not len(part):
                continue
            top = max_token(source, part) if Path(source).is_file() else int(part.max())
            if top >= vocab_size:
                raise DataError(f"{source} holds token id {top}, but vocab_size is {vocab_size}{note}: token ids "
                                f"must be below vocab_size; " + (fix or f"set vocab_size to at least {top + 1} or "
                                                                        f"fix the data"))


@dataclass
class TokenDataset:
    name: str
    format: str  # "embedded", "nanogpt" or "llmc"
    vocab_size: int  # the vocab the format declares (meta.pkl, GPT-2, bytes); ids are checked too
    splits: dict[str, TokenSplit]
    vocab_source: str = ""  # where vocab_size came from, for messages
    # False where vocab_size is assumed, not declared (a nanoGPT folder without meta.pkl: GPT-2
    # BPE is the guess). Then, as in nanoGPT, any vocab_size that holds every stored id trains.
    vocab_declared: bool = True
    folder: Path | None = None  # the directory it was read from; None for the embedded corpus

    def split(self, name: str) -> TokenSplit:
        if name not in self.splits:
            raise DataError(f"dataset '{self.name}' has no '{name}' split (it has {', '.join(self.splits)})")
        return self.splits[name]

    def num_tokens(self, split: str) -> int:
        return len(self.split(split))

    def check_block_size(self, block_size: int) -> None:
        """Refuse (one DataError line) a split too short for one sequence of block_size + 1
        tokens, found when the dataset is opened, not when the first batch of that split is drawn."""
        for name, split in self.splits.items():
            if len(split) < block_size + 1:
                raise DataError(f"the {name} split of '{self.name}' has {counted(len(split), 'token')}, fewer than "
                                f"block_size + 1 = {block_size + 1}; use a smaller block_size or more data")

    def check_vocab(self, vocab_size: int, fix: str = "") -> None:
        """Refuse a model whose embedding table cannot hold every token id of this dataset: one
        DataError line when vocab_size is below the format's declared vocab (not an assumed one:
        a folder without meta.pkl), or below the largest id actually stored (each file scanned
        once, then remembered). `fix`: the advice when vocab_size cannot change (a resumed
        model's), instead of 'set vocab_size >= N'. A vocab_size above the 65,536 ids that uint16
        token files can hold (nanoGPT .bin, llm.c GPT-2 shards) is refused too: it means a
        tokenizer whose larger ids these files cannot store (_check_uint16_room)."""
        self._check_uint16_room(vocab_size, fix)
        if vocab_size < self.vocab_size and self.vocab_declared:
            src = f", from {self.vocab_source}" if self.vocab_source else ""  # not '(... (byte tokens))': t8
            raise DataError(f"model vocab_size {vocab_size} is smaller than dataset '{self.name}' needs "
                            f"({self.vocab_size} token ids{src}); {fix or f'set vocab_size >= {self.vocab_size}'}")
        note = f" ({self.vocab_source} declares {self.vocab_size})" if self.vocab_source.endswith("meta.pkl") else ""
        for split in self.splits.values():
            split.check_ids(vocab_size, note, fix)

    def _check_uint16_room(self, vocab_size: int, fix: str) -> None:
        """A vocab_size above UINT16_IDS on uint16 token files: one DataError line. Such a vocab is
        a larger tokenizer's (tiktoken's cl100k_base has 100,277 ids), whose ids above 65,535 the
        files cannot hold (nanoGPT's prepare.py casts with np.uint16, which wraps them around,
        silently); the model would train on ids it cannot address. llm.c's uint32 shards (its
        Llama-3 layout) are refused by name when read (tokenfiles.read_llmc_shard). Where meta.pkl
        itself declares more ids than that, the data is refused whatever `vocab_size` (no advice to
        lower it: the declared-vocab check would then refuse that)."""
        if self.format not in ("nanogpt", "llmc"):
            return
        files = "nanoGPT .bin files" if self.format == "nanogpt" else "llm.c GPT-2 shards"
        if self.vocab_declared and self.vocab_size > UINT16_IDS and self.vocab_source.endswith("meta.pkl"):
            raise DataError(f"dataset '{self.name}' declares {self.vocab_size:,} token ids in {self.vocab_source}, "
                            f"more than the {UINT16_IDS:,} its {files} can hold (uint16, ids 0 to 65,535): any id above "
                            f"65,535 was wrapped around when the files were written (nanoGPT's prepare.py casts with "
                            f"np.uint16), so no vocab_size trains it as it is; prepare it again with a tokenizer of "
                            f"at most {UINT16_IDS:,} ids")
        if vocab_size <= UINT16_IDS:
            return
        raise DataError(f"vocab_size {vocab_size:,} is above the {UINT16_IDS:,} token ids that dataset '{self.name}' "
                        f"can hold: its {files} store each token as uint16 (ids 0 to 65,535), so a tokenizer with "
                        f"more ids (tiktoken's cl100k_base: 100,277) cannot be written to them; "
                        + (fix or f"use a tokenizer of at most {UINT16_IDS:,} ids, or set vocab_size <= {UINT16_IDS} "
                                  f"if every id of yours is below it"))


def decode_bytes(tokens) -> str:
    """Text of byte tokens (the embedded dataset); bytes that are not UTF-8 show as U+FFFD."""
    if hasattr(tokens, "detach"):  # a torch tensor
        tokens = tokens.detach().cpu().numpy()
    arr = np.asarray(tokens)
    if arr.size and (arr.min() < 0 or arr.max() >= BYTE_VOCAB_SIZE):
        raise DataError("decode_bytes needs byte tokens in 0..255")
    return arr.astype(np.uint8).tobytes().decode("utf-8", errors="replace")


# ---------------------------------------------------------------------------------------------
# Finding and loading


def dataset_dir(spec: str, *, data_root: str | Path = DATA_ROOT) -> Path | None:
    """The folder `spec` names: an existing directory as given, else <data_root>/<spec> for a bare
    name (nanoGPT's data/NAME). None for 'embedded' or when no such folder exists."""
    if spec == EMBEDDED:
        return None
    path = expand_user(spec)
    if path.is_dir():
        return path
    if len(path.parts) == 1 and (Path(data_root) / spec).is_dir():
        return Path(data_root) / spec
    return None


def dataset_vocab(spec: str, *, data_root: str | Path = DATA_ROOT) -> tuple[int, str] | None:
    """(vocab_size, source) a dataset declares, for a config that sets none, as nanoGPT's train.py
    reads meta.pkl: a folder's meta.pkl, or 256 for the embedded bytes. None where the dataset is
    not there or declares nothing (GPT-2 BPE data: keep nanoGPT's padded 50304). Raises DataError
    for an unreadable or unsafe meta.pkl."""
    if spec == EMBEDDED:
        return BYTE_VOCAB_SIZE, "the embedded dataset (byte tokens)"
    where = dataset_dir(spec, data_root=data_root)
    if where is None or not (where / "meta.pkl").is_file():
        return None
    return _meta_vocab(where / "meta.pkl"), str(where / "meta.pkl")


def load_dataset(spec: str, *, data_root: str | Path = DATA_ROOT) -> TokenDataset:
    """'embedded', a directory path, or a nanoGPT-style name looked up as <data_root>/<name>.
    Raises DataError (one line) naming where it looked and how to prepare a missing dataset, and
    for 'embedded' where a dataset folder of the user's has that name (check_embedded_name)."""
    if spec == EMBEDDED:
        check_embedded_name(data_root)
        return load_embedded()
    where = dataset_dir(spec, data_root=data_root)
    if where is not None:
        return load_dir(where)
    path = expand_user(spec)
    try:  # a dangling or looping link says so, not 'does not exist'
        real_stat(path, "dataset")
    except PathProblem as e:
        raise DataError(str(e)) from None
    if path.exists():
        raise DataError(f"dataset '{spec}' is a file; give the directory that holds its train and val data")
    if len(path.parts) > 1:  # a path, not a bare name: do not guess under data_root
        raise DataError(f"dataset directory {spec} does not exist")
    raise DataError(missing_dataset_message(spec, Path(data_root) / spec))


def missing_dataset_message(name: str, where: Path) -> str:
    """One line: where a named dataset was looked for, and the command that prepares it."""
    looked = f"dataset '{name}' not found at {where}" + ("" if where.is_absolute() else f" (under {Path.cwd()})")
    if name in PREPARABLE or "fineweb" in name.lower():
        kind = name if name in PREPARABLE else "fineweb-edu"
        return f"{looked}; prepare it with: autofit data prepare {kind} --out {where}"
    if name == "openwebtext":
        return (f"{looked}; nanoGPT's data/openwebtext/prepare.py writes it (a ~54 GB download), or prepare a "
                f"smaller one: autofit data prepare fineweb-edu --out data/fineweb-edu --max-tokens 200000000 "
                f"and set dataset='fineweb-edu' (the built-in corpus is dataset='embedded')")
    return (f"{looked}; put nanoGPT train.bin/val.bin or llm.c shards there, or prepare one of "
            f"{', '.join(PREPARABLE)} with: autofit data prepare NAME --out {where} "
            f"(the built-in corpus is dataset='embedded')")


def load_dir(path: str | Path) -> TokenDataset:
    """A directory in nanoGPT form (train.bin, val.bin) or llm.c form (*_train_*.bin shards)."""
    path = Path(path)
    if (path / "train.bin").is_file() or (path / "val.bin").is_file():
        return _load_nanogpt(path)
    shards: dict[str, list[Path]] = {s: [] for s in SPLITS}
    prefixes: set[str] = set()
    for f in sorted(path.iterdir()):
        m = SHARD_NAME.match(f.name)
        if m and f.is_file():
            shards[m.group(1)].append(f)
            prefixes.add(f.name[:m.start(1) - 1])
    if len(prefixes) > 1:  # llm.c reads one prefix's shards; joined, two datasets read as one (r4)
        raise DataError(f"{path} holds llm.c shards of {len(prefixes)} datasets ({', '.join(sorted(prefixes))}): "
                        f"one dataset per folder; move the others to a folder of their own")
    if not any(shards.values()):
        raise DataError(f"{path} holds neither train.bin/val.bin (nanoGPT) nor *_train_*.bin/*_val_*.bin "
                        f"shards (llm.c)")
    for split, files in shards.items():
        if not files:
            raise DataError(f"{path} has llm.c shards but no {split} shard (*_{split}_*.bin)")
    splits = {}
    for split, files in shards.items():
        splits[split] = TokenSplit([read_llmc_shard(f) for f in files], [str(f) for f in files])
    return TokenDataset(name=path.name, format="llmc", vocab_size=GPT2_VOCAB_SIZE, splits=splits,
                        vocab_source="llm.c GPT-2 shards", folder=path)


def _load_nanogpt(path: Path) -> TokenDataset:
    splits = {}
    for split in SPLITS:
        f = path / f"{split}.bin"
        if not f.exists() and not f.is_symlink():
            raise DataError(f"{path} has no {split}.bin (a nanoGPT dataset needs train.bin and val.bin)")
        try:  # a FIFO would block the memory map, a device would never end
            input_file(f, "dataset file")
        except PathProblem as e:
            raise DataError(str(e)) from None
        splits[split] = TokenSplit([read_nanogpt_bin(f)], [str(f)])
    meta = path / "meta.pkl"
    if meta.is_file():
        vocab, source = _meta_vocab(meta), str(meta)
    else:  # nanoGPT's BPE sets (shakespeare, openwebtext) have no meta.pkl: GPT-2 tokens
        vocab, source = GPT2_VOCAB_SIZE, "no meta.pkl: GPT-2 BPE assumed"
    return TokenDataset(name=path.name, format="nanogpt", vocab_size=vocab, splits=splits, vocab_source=source,
                        vocab_declared=meta.is_file(), folder=path)


def load_embedded() -> TokenDataset:
    """The built-in corpus (vocab 256, byte tokens). Raises DataError where its files are damaged."""
    return TokenDataset(name=EMBEDDED, format="embedded", vocab_size=BYTE_VOCAB_SIZE,
                        splits={s: TokenSplit([a], [f"trainer/embedded/{s}"]) for s, a in embedded_arrays().items()},
                        vocab_source="byte tokens")


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

    def batch_at(self, split: str, n: int, counter: int, rows: slice | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch number `counter` of split, without moving the sampler on. `rows`: only these
        rows of the n drawn (one rank's share of a step's batch): the offsets of all n are drawn,
        so every rank's rows are those a single process would have in that place, and only the
        rank's own are read."""
        return self.read_rows(split, self.offsets_at(split, n, counter, rows))

    def offsets_at(self, split: str, n: int, counter: int, rows: slice | None = None) -> np.ndarray:
        """Where the sequences of batch number `counter` start (int64, n of them, or the `rows`
        among them): 8 bytes a sequence, so a huge step batch can be known without being read."""
        tokens = self.dataset.split(split)
        T = self.block_size
        if len(tokens) < T + 1:
            raise DataError(f"the {split} split of '{self.dataset.name}' has {counted(len(tokens), 'token')}, fewer than "
                            f"block_size + 1 = {T + 1}")
        if n < 1:
            raise DataError(f"batch size must be at least 1, got {n}")
        rng = np.random.default_rng([self.seed, SPLITS.index(split), counter])
        offsets = rng.integers(0, len(tokens) - T, size=n)  # the last window ends at the last token
        return offsets if rows is None else offsets[rows]

    def read_rows(self, split: str, offsets: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """x, y int64 (len(offsets), block_size): the sequences starting at `offsets`."""
        tokens, T = self.dataset.split(split), self.block_size
        tokens.check_unchanged()
        rows = np.stack([tokens.read(int(o), T + 1) for o in offsets])
        import torch  # here, not at the top: reading configs and data folders needs no torch
        return torch.from_numpy(rows[:, :-1].copy()), torch.from_numpy(rows[:, 1:].copy())

    def state_dict(self) -> dict:
        # "data": what the counters count batches of, so a resume on data prepared again is found;
        # "folder": where it was read, so `sample` run from another folder still finds its meta.pkl
        folder = {"folder": str(self.dataset.folder.absolute())} if self.dataset.folder is not None else {}
        return {"seed": self.seed, "block_size": self.block_size, "counters": dict(self.counters),
                "data": {s: fingerprint(self.dataset.split(s).parts) for s in self.dataset.splits}, **folder}

    def load_state_dict(self, state: dict) -> None:
        # Counters only mean the same batches under the same seed and block size.
        for key in ("seed", "block_size"):
            if state.get(key) != getattr(self, key):
                raise DataError(f"sampler state was saved with {key} {state.get(key)}, this run has "
                                f"{getattr(self, key)}; resume with the same {key}")
        self.counters = {s: int(c) for s, c in state["counters"].items()}
