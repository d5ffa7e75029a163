"""Token files on disk: nanoGPT's raw uint16 .bin, llm.c's shards, and their largest token id.

- nanoGPT (data/NAME/prepare.py): train.bin and val.bin hold raw little-endian uint16 tokens.
- llm.c (dev/data/data_common.py, write_datafile): a header of 256 int32 (magic, version, token
  count, zeros), then the tokens. GPT-2 shards are magic 20240520 / version 1 with uint16 tokens,
  the only kind read here; Llama-3 shards (magic 20240801 / version 7, uint32 tokens) and llm.c's
  multiple-choice eval files (magic 20240522) are named and refused.

Every write goes through trainer.writes.atomic_write (a temporary file, fsynced, renamed over the
target), so a file a reader finds is whole, and a full disk is one line. The largest token id of a
file is kept in a small JSON sidecar next to it (`<file>.max.json`, keyed by size, mtime, ctime and
inode) so a dataset is scanned at most once.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Iterable

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from trainer.writes import atomic_write  # noqa: F401  (every dataset file is written through it)
from trainer.errors import counted


class DataError(ValueError):
    """A dataset the user pointed at is missing, malformed or does not fit the model."""


LLMC_MAGIC = 20240520
LLMC_VERSION = 1  # GPT-2 tokens as uint16
LLMC_LLAMA3_MAGIC = 20240801  # version 7, uint32 tokens
LLMC_EVAL_MAGIC = 20240522  # HellaSwag/MMLU-style multiple-choice examples, not a token stream
LLMC_HEADER_INTS = 256
LLMC_HEADER_BYTES = LLMC_HEADER_INTS * 4
# llm.c names shards <name>_<split>_<index>.bin; its single-file sets (tiny_shakespeare_val.bin)
# drop the index.
SHARD_NAME = re.compile(r"^.+_(train|val)(?:_\d+)?\.bin$")


def write_tokens(path: str | Path, tokens: np.ndarray) -> None:
    """Write a nanoGPT .bin (raw little-endian uint16) atomically, with its max-token sidecar.
    Raises DataError if a token does not fit in uint16."""
    toks = _as_uint16(np.asarray(tokens), path)
    atomic_write(path, lambda f: f.write(toks.tobytes()))
    _store_max(Path(path), int(toks.max()) if toks.size else -1)


def write_llmc_shard(path: str | Path, tokens: Iterable[int] | np.ndarray) -> None:
    """Write tokens (ints < 65536) as one llm.c GPT-2 shard, atomically, with its sidecar.
    Raises DataError if a token does not fit in uint16 or there are 2**31 or more of them."""
    path = Path(path)
    toks = _as_uint16(np.asarray(tokens), path)
    if len(toks) >= 2**31:
        raise DataError(f"{len(toks)} tokens is too many for one llm.c shard ({path})")
    header = np.zeros(LLMC_HEADER_INTS, dtype="<i4")
    header[:3] = (LLMC_MAGIC, LLMC_VERSION, len(toks))

    def write(f) -> None:
        f.write(header.tobytes())
        f.write(toks.tobytes())
    atomic_write(path, write)
    _store_max(path, int(toks.max()) if toks.size else -1)


def _as_uint16(toks: np.ndarray, path: str | Path) -> np.ndarray:
    if toks.size and (toks.min() < 0 or toks.max() > np.iinfo(np.uint16).max):
        raise DataError(f"tokens for {path} do not fit in uint16 (range {toks.min()}..{toks.max()})")
    return toks.astype("<u2")


def read_llmc_shard(path: str | Path) -> np.ndarray:
    """Memory-map one llm.c GPT-2 shard's tokens (uint16) after checking its header against the
    file size. Raises DataError naming the file: too short, another llm.c kind (Llama-3, eval),
    not llm.c at all, another version, truncated or too long."""
    path = Path(path)
    size = path.stat().st_size
    if size < LLMC_HEADER_BYTES:
        raise DataError(f"{path} is {counted(size, 'byte')}, too short for an llm.c header ({LLMC_HEADER_BYTES} bytes)")
    header = np.fromfile(path, dtype="<i4", count=LLMC_HEADER_INTS)
    magic, version, n = (int(v) for v in header[:3])
    if magic == LLMC_LLAMA3_MAGIC:
        raise DataError(f"{path} is an llm.c Llama-3 shard (uint32 tokens, magic {magic}, version {version}); "
                        f"only llm.c GPT-2 shards (uint16 tokens, magic {LLMC_MAGIC}) are supported")
    if magic == LLMC_EVAL_MAGIC:
        raise DataError(f"{path} is an llm.c eval file (multiple-choice examples, magic {magic}), "
                        f"not a token shard")
    if magic != LLMC_MAGIC:
        raise DataError(f"{path} is not an llm.c token shard (magic {magic}, expected {LLMC_MAGIC})")
    if version != LLMC_VERSION:
        raise DataError(f"{path} has llm.c shard version {version}; only version {LLMC_VERSION} "
                        f"(GPT-2 uint16 tokens) is supported")
    expected = LLMC_HEADER_BYTES + 2 * n
    if n < 0 or size != expected:
        state = "truncated" if size < expected else "longer than its header says"
        raise DataError(f"{path} is {state}: header says {counted(n, 'token')} ({expected} bytes), file has {counted(size, 'byte')}")
    if n == 0:
        return np.zeros(0, dtype="<u2")
    return np.memmap(path, dtype="<u2", mode="r", offset=LLMC_HEADER_BYTES, shape=(n,))


def read_nanogpt_bin(path: Path) -> np.ndarray:
    """Memory-map a nanoGPT .bin as uint16. Raises DataError for an odd byte count."""
    size = path.stat().st_size
    if size % 2:
        raise DataError(f"{path} has an odd size ({counted(size, 'byte')}); nanoGPT .bin files hold uint16 tokens")
    # np.memmap refuses an empty file; an empty split is reported later, when sampled.
    return np.memmap(path, dtype="<u2", mode="r") if size else np.zeros(0, dtype="<u2")


# ---------------------------------------------------------------- the largest token id


class _MaxToken(BaseModel):
    """The sidecar: the largest token id of this file, known by its size, modification time,
    status-change time and inode. Size and mtime alone are not enough: `cp -p` (or rsync -t) of
    another dataset's files keeps them, and a stale maximum would let a too-small vocab_size
    through to an index error in the embedding. ctime and the inode cannot be set by a copy."""
    model_config = ConfigDict(extra="forbid", strict=True)
    size: int
    mtime_ns: int
    ctime_ns: int
    inode: int
    max_token: int  # -1 for an empty file


def file_identity(source: str) -> tuple[int, int, int, int] | None:
    """(device, inode, size in bytes, mtime in ns) of the file at `source`; None where it is no
    file (the embedded set) or cannot be read now."""
    try:
        st = os.stat(source)
    except (OSError, ValueError):
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino


_MEMO: dict[tuple[str, int, int], int] = {}  # (path, size, mtime_ns) -> max, per process


def sidecar_path(path: Path) -> Path:
    return path.with_name(path.name + ".max.json")


def max_token(path: str | Path, tokens: np.ndarray) -> int:
    """Largest id in `tokens` (the memory-mapped contents of `path`); -1 if empty.

    Read from the sidecar when its size and mtime match the file, else scanned once (numpy's max
    over the memory map, reading the file a single time) and stored in the sidecar where the
    directory is writable; a stale or damaged sidecar is rewritten, never trusted.
    """
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), *_identity(st))
    if key in _MEMO:
        return _MEMO[key]
    found = _read_max(path, st)
    if found is None:
        found = int(tokens.max()) if len(tokens) else -1
        _store_max(path, found, st)
    _MEMO[key] = found
    return found


def _read_max(path: Path, st: os.stat_result) -> int | None:
    try:
        rec = _MaxToken.model_validate_json(sidecar_path(path).read_text())
    except (OSError, ValueError, ValidationError):
        return None
    return rec.max_token if (rec.size, rec.mtime_ns, rec.ctime_ns, rec.inode) == _identity(st) else None


def _store_max(path: Path, value: int, st: os.stat_result | None = None) -> None:
    st = st or path.stat()
    rec = _MaxToken(size=st.st_size, mtime_ns=st.st_mtime_ns, ctime_ns=st.st_ctime_ns, inode=st.st_ino,
                    max_token=value)
    try:
        atomic_write(sidecar_path(path), lambda f: f.write(json.dumps(rec.model_dump()).encode()))
    except OSError:
        pass  # a read-only dataset: the scan is simply repeated by the next process


ENDS = 4096  # tokens hashed at each end of a split for its fingerprint


def fingerprint(parts: list[np.ndarray]) -> dict[str, int | str]:
    """What identifies a split's tokens cheaply, for a checkpoint to say what it trained on: the
    token count and a sha256 (16 hex digits) of the first and last ENDS tokens' bytes (two pages
    read, whatever the size). A dataset prepared again from other text, or with other ids (a
    character vocabulary of another alphabet), changes it; the same text prepared again does not."""
    import hashlib
    n = sum(len(p) for p in parts)
    h = hashlib.sha256()
    if parts:
        h.update(np.ascontiguousarray(parts[0][:ENDS]).tobytes())
        h.update(np.ascontiguousarray(parts[-1][-ENDS:]).tobytes())
    return {"tokens": int(n), "ends": h.hexdigest()[:16]}


def fingerprint_change(was: dict, now: dict) -> str | None:
    """The first split whose fingerprint differs, in words ('train: 30,000 -> 9,000 tokens', or
    'train: same size, other tokens'), or None when every split of `was` is the same in `now`."""
    for split, w in was.items():
        n = now.get(split)
        if n is None:
            return f"{split}: no such split now"
        if n["tokens"] != w["tokens"]:
            return f"{split}: {w['tokens']:,} -> {n['tokens']:,} tokens"
        if n["ends"] != w["ends"]:
            return f"{split}: same size, other tokens"
    return None
