"""llm.c shards from a stream of documents, written so that a stop keeps every finished shard.

`autofit data prepare fineweb-edu` can run for hours (the ~10B-token sample is ~100 shards of
100M tokens). prepare() has it work in a partial folder inside --out (`.prepare-<prefix>.partial`;
hidden, and loading reads no sub-folder): each finished shard is written there atomically
(trainer.writes: a temp file, fsync, rename), then `progress.json` records the shards' token
counts and where the next shard starts in the document stream (a document's index and the token
offset in it). So at any moment that folder holds whole shards and a record of them: a Ctrl-C, a
SIGTERM, even a SIGKILL, loses at most the shard in hand (a part-filled buffer in memory).

A re-run with the same options reads progress.json (a typed record, checked on reading as every
file read back is), checks the shards it lists, skips the documents they hold (read again, not
tokenized) and goes on: the shards come out byte for byte as an uninterrupted run writes them.
"""
from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Annotated, Literal, Optional, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from trainer.data.datasets import MIN_SPLIT_TOKENS, DataError
from trainer.errors import counted
from trainer.data.tokenfiles import read_llmc_shard, write_llmc_shard
from trainer.writes import atomic_write

GPT2_EOT = 50256
PROGRESS_FILE = "progress.json"
Options = dict[str, Union[str, int, None]]


class ShardProgress(BaseModel):
    """progress.json of a partial folder: what a stopped preparation finished.

    options: what the shards depend on (input, tokenizer, shard size, ...); a re-run must give the
    same, or two datasets would be mixed. shards: tokens in each finished shard, in order (shard i
    is shard_path(folder, prefix, i)). The next shard starts at token next_pos of document next_doc
    (0-based; a document's tokens are [eot] + encode(text), cut at max_tokens)."""
    model_config = ConfigDict(extra="forbid", strict=True)
    version: Literal[1] = 1
    options: Options
    shards: list[Annotated[int, Field(ge=1)]] = Field(default_factory=list)
    next_doc: int = Field(0, ge=0)
    next_pos: int = Field(0, ge=0)

    @property
    def tokens(self) -> int:
        """Tokens in the finished shards."""
        return sum(self.shards)


def shard_path(out_dir: Path, name: str, index: int) -> Path:
    """llm.c's shard name: the first shard (index 0) is val, the others train."""
    split = "val" if index == 0 else "train"
    return out_dir / f"{name}_{split}_{index:06d}.bin"


def write_progress(folder: Path, progress: ShardProgress) -> None:
    """progress.json, replaced atomically (after the shard it lists is whole)."""
    atomic_write(folder / PROGRESS_FILE, lambda f: f.write(progress.model_dump_json(indent=1).encode()))


def read_progress(folder: Path, options: Options) -> ShardProgress | None:
    """The progress of a stopped preparation in `folder`, its shards checked; None when there is
    none. Raises DataError (one line, before any work) when the record is damaged, was made with
    other options, or a shard it lists is missing or of another length."""
    path = folder / PROGRESS_FILE
    if not path.is_file():
        return None
    start_over = f"delete {folder} to start over"
    try:
        prog = ShardProgress.model_validate_json(path.read_bytes())
    except (OSError, ValidationError) as e:
        why = e.errors()[0]["msg"] if isinstance(e, ValidationError) else (e.strerror or str(e))
        raise DataError(f"{path} (a stopped preparation's record) is damaged: {why}; {start_over}") from None
    if bad := [k for k in sorted(set(prog.options) | set(options)) if prog.options.get(k) != options.get(k)]:
        was = ", ".join(f"{k} {prog.options.get(k)!r}, now {options.get(k)!r}" for k in bad)
        raise DataError(f"{folder} holds a preparation stopped with other options ({was}); run with the "
                        f"same options to continue it, or {start_over}")
    for i, n in enumerate(prog.shards):
        shard = shard_path(folder, str(options["shard_prefix"]), i)
        try:
            got = len(read_llmc_shard(shard))
        except (OSError, DataError) as e:
            raise DataError(f"{shard}, a finished shard {path} lists, cannot be read "
                            f"({getattr(e, 'strerror', None) or e}); {start_over}") from None
        if got != n:
            raise DataError(f"{shard} holds {got:,} tokens where {path} says {n:,}; {start_over}")
    return prog


def tokenize_to_shards(texts: Iterable[str], encode: Callable[[str], list[int]], out_dir: str | Path, *,
                       name: str = "fineweb", shard_size: int = 100_000_000, max_tokens: int | None = None,
                       eot: int = GPT2_EOT, log: Callable[[str], None] = lambda s: None, bar=None,
                       start: Optional[ShardProgress] = None,
                       on_shard: Callable[[ShardProgress], None] = lambda p: None,
                       boundary: Callable[[], None] = lambda: None) -> list[Path]:
    """Tokenize texts ([eot] + encode(text) each) into llm.c shards of shard_size tokens in
    out_dir; the first shard is val, the others train. Stops after max_tokens tokens, reading no
    document past it. Returns the shard paths (kept ones included). start: a stopped run's
    progress (read_progress): its shards are kept, its documents skipped. on_shard(progress):
    called after each shard is written. boundary(): called after each document and shard but the
    last; it may raise to stop (prepare's does on a Ctrl-C or SIGTERM): the part-filled shard in
    memory is dropped, the written ones stay. Raises DataError for ids that do not fit in uint16,
    or for fewer than two shards (one val, one train)."""
    _check_sizes(shard_size, max_tokens)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    prog = start.model_copy(deep=True) if start is not None else ShardProgress(options={})
    first_doc, first_pos, resumed = prog.next_doc, prog.next_pos, prog.tokens
    task = None if bar is None else bar.add_task(  # this run's tokens, so the ETA is this run's rate
        "tokenizing (tokens)", total=None if max_tokens is None else max_tokens - resumed)
    buf = np.empty(shard_size, dtype=np.uint16)
    filled, total = 0, resumed

    def flush(doc_i: int, pos: int, doc_len: int) -> None:
        nonlocal filled
        path = shard_path(out_dir, name, len(prog.shards))
        write_llmc_shard(path, buf[:filled])
        prog.shards.append(filled)
        prog.next_doc, prog.next_pos = (doc_i, pos) if pos < doc_len else (doc_i + 1, 0)
        on_shard(prog)
        log(f"wrote {path.name} ({filled:,} tokens, {total:,} so far)")
        filled = 0

    doc_i, pos, doc = first_doc, 0, np.zeros(0)
    for doc_i, text in enumerate(itertools.islice(texts, first_doc, None), first_doc):
        doc = _document(text, encode, eot)
        pos = first_pos if doc_i == first_doc else 0  # the start of the first document is in kept shards
        if max_tokens is not None:
            doc = doc[:pos + max_tokens - total]
        while pos < len(doc):  # a document spills into the next shard where this one is full
            take = min(shard_size - filled, len(doc) - pos)
            buf[filled:filled + take] = doc[pos:pos + take]
            filled, total, pos = filled + take, total + take, pos + take
            if filled == shard_size:
                flush(doc_i, pos, len(doc))
                if pos < len(doc):
                    boundary()
        if task is not None:
            bar.update(task, completed=total - resumed)
        if max_tokens is not None and total >= max_tokens:
            break
        boundary()
    if filled:
        flush(doc_i, pos, len(doc))
    _check_written(prog.shards, shard_size)
    return [shard_path(out_dir, name, i) for i in range(len(prog.shards))]


def _check_written(shards: list[int], shard_size: int) -> None:
    """Refuse shards (tokens each, val first) that leave no train split, or one shorter than a run
    can sample (MIN_SPLIT_TOKENS: the input ran out a token into it). Raises DataError."""
    total, train = sum(shards), sum(shards[1:])
    if len(shards) < 2:
        raise DataError(f"only {counted(total, 'token')}, enough for the val shard alone; lower --shard-size "
                        f"(now {shard_size:,}) so there is train data too")
    if train < MIN_SPLIT_TOKENS:
        raise DataError(f"only {counted(total, 'token')}: {counted(train, 'token')} for train past the val shard of "
                        f"{shard_size:,}, and a run samples block_size + 1 tokens ({MIN_SPLIT_TOKENS} or more) from "
                        f"each split; lower --shard-size so there is more train data")


def _check_sizes(shard_size: int, max_tokens: int | None) -> None:
    """Refuse sizes that leave a split shorter than a run can sample (MIN_SPLIT_TOKENS): before any
    document is read. Raises DataError."""
    if shard_size < 1:
        raise DataError(f"--shard-size must be at least 1, got {shard_size}")
    need = f"a run samples block_size + 1 tokens ({MIN_SPLIT_TOKENS} or more) from each split"
    if shard_size < MIN_SPLIT_TOKENS:  # the val split is the first shard
        raise DataError(f"--shard-size {shard_size} makes the val split one shard of {counted(shard_size, 'token')}, "
                        f"and {need}: give {MIN_SPLIT_TOKENS} or more")
    if max_tokens is not None and max_tokens <= shard_size:
        raise DataError(f"--max-tokens {max_tokens} fills at most the val shard; make it larger than "
                        f"--shard-size {shard_size} so there is train data too")
    if max_tokens is not None and max_tokens - shard_size < MIN_SPLIT_TOKENS:
        raise DataError(f"--max-tokens {max_tokens} leaves {counted(max_tokens - shard_size, 'token')} for train past "
                        f"the val shard of --shard-size {shard_size}, and {need}: make it "
                        f"{shard_size + MIN_SPLIT_TOKENS} or more")


def _document(text: str, encode: Callable[[str], list[int]], eot: int) -> np.ndarray:
    """[eot] + encode(text) as int64. Raises DataError for ids that do not fit in uint16."""
    doc = np.asarray([eot, *encode(text)], dtype=np.int64)
    if doc.max() > np.iinfo(np.uint16).max or doc.min() < 0:
        raise DataError(f"token ids {doc.min()}..{doc.max()} do not fit in uint16 shards")
    return doc
