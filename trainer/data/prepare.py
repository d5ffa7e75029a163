"""Preparing datasets in nanoGPT's layout (`autofit data prepare NAME --out DIR`).

- shakespeare_char: nanoGPT's data/shakespeare_char/prepare.py. Tiny Shakespeare, one token per
  character: the sorted set of the text's characters is the vocabulary (65 for the real text),
  the first 90% of the characters are train.bin, the rest val.bin (uint16), and meta.pkl holds
  {'vocab_size', 'itos', 'stoi'}, which `dataset = 'shakespeare_char'` reads for vocab_size.
- shakespeare: nanoGPT's data/shakespeare/prepare.py. The same 90/10 split of the characters,
  each part encoded with GPT-2's BPE (tiktoken's encode_ordinary), no meta.pkl.
- fineweb-edu: a FineWeb-Edu sample streamed with `datasets`, GPT-2 BPE, each document preceded
  by <|endoftext|> (50256), written as llm.c shards: the first shard is val, the rest train.

`--input FILE` uses a local text instead of the download (for fineweb-edu: a .jsonl of rows with a
"text" field, as FineWeb's own, or a plain text taken as one document). Everything is checked
before the work starts (the name, the options, the input, that the output folder can be written,
that it holds no dataset unless --force, that the tokenizer loads). The files are written into a
staging folder inside the output folder and moved into place only when all are written, so a
failed or interrupted run leaves what was there before as it was.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from trainer.data.datasets import PREPARABLE, SHARD_NAME, DataError
from trainer.errors import install_hint
from trainer.phases import LineBar
from trainer.writes import WriteError, check_room
from trainer.data.tokenfiles import atomic_write, sidecar_path, write_llmc_shard, write_tokens

TINY_SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
FINEWEB_DATASET = "HuggingFaceFW/fineweb-edu"
FINEWEB_CONFIG = "sample-10BT"  # ~10B GPT-2 tokens
GPT2_EOT = 50256
TRAIN_SHARE = 0.9  # nanoGPT's prepare.py scripts: train = the first 90% of the characters


@dataclass
class Encoder:
    """A tokenizer: encode(text) -> token ids, and the end-of-text id put before documents."""
    name: str
    encode: Callable[[str], list[int]]
    eot: int


@dataclass
class Prepared:
    """What a prepare wrote: the folder, its files, tokens per split, and the vocab it declares."""
    out_dir: Path
    files: list[Path]
    tokens: dict[str, int] = field(default_factory=dict)
    vocab_size: int | None = None  # meta.pkl's, for the char-level set; None: GPT-2 BPE


def gpt2_encoder() -> Encoder:
    """tiktoken's GPT-2 BPE. Raises DataError (one line) if tiktoken is not installed or its
    encoding file cannot be had (tiktoken downloads it on first use and caches it)."""
    try:
        import tiktoken
    except ImportError:
        raise DataError(f"tiktoken is not installed (GPT-2 BPE); run: {install_hint('data', 'tiktoken')}") from None
    try:
        enc = tiktoken.get_encoding("gpt2")
    except Exception as e:  # requests' connection errors, a damaged cache, ...
        raise DataError(f"cannot load tiktoken's GPT-2 encoding ({type(e).__name__}); tiktoken downloads "
                        f"it on first use: run once with network, or set TIKTOKEN_CACHE_DIR to a cache that "
                        f"holds it") from None
    return Encoder("gpt2", enc.encode_ordinary, enc.eot_token)


# ---------------------------------------------------------------- checks before the work


def dataset_files(out_dir: Path) -> list[Path]:
    """The files of a dataset in out_dir (what loading reads, and the sidecars)."""
    if not out_dir.is_dir():
        return []
    named = {"train.bin", "val.bin", "meta.pkl"}
    files = [f for f in out_dir.iterdir() if f.is_file() and (f.name in named or SHARD_NAME.match(f.name))]
    return sorted(files + [sidecar_path(f) for f in files if sidecar_path(f).is_file()])


def check_out_dir(out_dir: Path, force: bool) -> None:
    """Create out_dir and prove it writable; refuse one that holds a dataset unless force.
    Raises DataError (one line)."""
    from trainer.paths import PathProblem, nearest_existing, output_dir
    try:  # links followed, a file, FIFO or device on the way refused, writability tested by writing
        output_dir(out_dir, "--out")
    except PathProblem as e:
        raise DataError(str(e)) from None
    # a few KiB written, before the folder is made: a full disk is found before any download
    check_room(nearest_existing(out_dir), f"in --out {out_dir}")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot write in --out {out_dir}: {e.strerror or e}") from None
    existing = [f.name for f in dataset_files(out_dir) if not f.name.endswith(".max.json")]
    if existing and not force:
        shown = ", ".join(existing[:3]) + (", ..." if len(existing) > 3 else "")
        raise DataError(f"{out_dir} already holds a dataset ({shown}); add --force to replace it")


def _check_options(name: str, input_path: Path | None, max_tokens: int | None, shard_size: int | None) -> None:
    if name not in PREPARABLE:
        raise DataError(f"unknown dataset {name!r} to prepare; choose from {', '.join(PREPARABLE)}")
    if name != "fineweb-edu" and (max_tokens is not None or shard_size is not None):
        raise DataError("--max-tokens and --shard-size apply to fineweb-edu only")
    if max_tokens is not None and max_tokens < 1:
        raise DataError(f"--max-tokens must be at least 1, got {max_tokens}")
    if input_path is not None and not input_path.exists() and not input_path.is_symlink():
        raise DataError(f"--input {input_path} is not a file")
    if input_path is not None:
        from trainer.paths import PathProblem, input_file
        try:  # a FIFO would block, /dev/zero would never end: a regular file (or a link to one) only
            input_file(input_path, "--input")
        except PathProblem as e:
            raise DataError(str(e)) from None


# ---------------------------------------------------------------- the entry point


def prepare(name: str, out_dir: str | Path, *, input_path: str | Path | None = None,
            encoder: Encoder | None = None, max_tokens: int | None = None, shard_size: int | None = None,
            force: bool = False, progress: bool = True, log: Callable[[str], None] = lambda s: None,
            fineweb: tuple[str, str] = (FINEWEB_DATASET, FINEWEB_CONFIG), shard_prefix: str = "fineweb",
            url: str = TINY_SHAKESPEARE_URL) -> Prepared:
    """Write dataset `name` (see the module docstring) into out_dir; returns what was written.

    encoder: the GPT-2 BPE to use (default: tiktoken's; tests inject one). Raises DataError (one
    line) for every input a user can get wrong, before any download or tokenizing.
    """
    out_dir = Path(out_dir)
    input_path = Path(input_path) if input_path is not None else None
    _check_options(name, input_path, max_tokens, shard_size)
    if name != "shakespeare_char" and encoder is None:
        encoder = gpt2_encoder()  # before out_dir is made: a missing encoding leaves no empty folder
    made = not out_dir.exists()
    check_out_dir(out_dir, force)
    texts: Iterable[str] | None = None
    if name == "fineweb-edu":
        texts = read_documents(input_path) if input_path else stream_fineweb(*fineweb)
    old = dataset_files(out_dir)
    staging = Path(tempfile.mkdtemp(prefix=".prepare-", dir=out_dir))
    try:
        with _progress(progress, log) as bar:
            if name == "fineweb-edu":
                shards = tokenize_to_shards(texts, encoder.encode, staging, name=shard_prefix,
                                            shard_size=shard_size or 100_000_000, max_tokens=max_tokens,
                                            eot=encoder.eot, log=log, bar=bar)
                done = Prepared(out_dir, shards, {"val": _shard_tokens(shards[:1]),
                                                  "train": _shard_tokens(shards[1:])})
            else:
                text = read_text(input_path) if input_path else download_text(url, out_dir / "input.txt", bar, log)
                done = (write_chars(text, staging, bar) if name == "shakespeare_char"
                        else write_bpe(text, staging, encoder, bar))
        _move_into_place(staging, out_dir, old, done)
    except BaseException as e:
        shutil.rmtree(staging, ignore_errors=True)
        if made and not any(out_dir.iterdir()):  # a failed first prepare leaves no empty dataset folder
            out_dir.rmdir()
        if isinstance(e, WriteError):  # named as the file it would have become, not its staging copy
            raise WriteError(f"dataset file {out_dir / Path(e.what).name}", e.reason,
                             f"the dataset in {out_dir} is as it was" if old else "no dataset was written") from None
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return done


def _move_into_place(staging: Path, out_dir: Path, old: list[Path], done: Prepared) -> None:
    # Every new file is whole before any old one is touched; then the old layout's leftovers
    # (a meta.pkl under a BPE set, shards past the new count) go, so loading sees one dataset.
    new_names = {f.name for f in staging.iterdir()}
    for f in sorted(staging.iterdir()):
        os.replace(f, out_dir / f.name)
    for f in old:
        if f.name not in new_names:
            f.unlink(missing_ok=True)
    done.out_dir = out_dir
    done.files = [out_dir / f.name for f in done.files]


def _progress(enabled: bool, log: Callable[[str], None]):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    # on stderr, so `--json`-style stdout stays clean; each task's description names its unit.
    # A bar only on a terminal (piped, rich's transient bar still leaves a blank line on stderr);
    # piped, a line with the count and the ETA every 30 s (trainer.phases), so no minute is silent.
    import sys
    if enabled and not sys.stderr.isatty():
        return LineBar(log)
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeRemainingColumn(), console=Console(stderr=True), transient=True,
                    disable=not enabled or not sys.stderr.isatty())


# ---------------------------------------------------------------- text in


def read_text(path: Path) -> str:
    """A local text file as UTF-8. Raises DataError naming the file."""
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read --input {path}: {e}") from None


def download_text(url: str, dest: Path, bar, log: Callable[[str], None]) -> str:
    """The text at url, kept in dest (reused when it is there, as nanoGPT's prepare.py does).
    Raises DataError (one line) when the download fails, saying how to give a local file."""
    if dest.is_file():
        log(f"using {dest} (downloaded before; delete it to download again)")
        return read_text(dest)
    import urllib.error
    import urllib.request
    chunks = []
    try:
        with urllib.request.urlopen(url, timeout=60) as resp:
            task = bar.add_task(f"downloading {dest.name} (bytes)", total=int(resp.headers.get("Content-Length") or 0) or None)
            while chunk := resp.read(1 << 16):
                chunks.append(chunk)
                bar.advance(task, len(chunk))
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise DataError(f"cannot download {url}: {reason}; download it yourself and pass --input FILE") from None
    data = b"".join(chunks)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{url} is not UTF-8 text: {e}") from None
    atomic_write(dest, lambda f: f.write(data))
    log(f"downloaded {len(data):,} bytes to {dest}")
    return text


def read_documents(path: Path) -> Iterator[str]:
    """Documents of a local file: a .jsonl's rows' "text" (FineWeb's row form), else the whole
    file as one document. Raises DataError naming the file and line of a bad row."""
    if path.suffix not in (".jsonl", ".json"):
        yield read_text(path)
        return
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{i}: not a JSON row: {e.msg}") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise DataError(f"{path}:{i}: a row needs a \"text\" string")
            yield row["text"]


def stream_fineweb(dataset: str, config: str) -> Iterator[str]:
    """FineWeb-Edu's texts, streamed by `datasets` (nothing but the shards is kept on disk).
    Raises DataError if `datasets` is not installed; checked when called, before any download."""
    try:
        from datasets import load_dataset
    except ImportError:
        raise DataError(f"datasets is not installed; run: {install_hint('data', 'datasets', 'tiktoken')}") from None

    def rows() -> Iterator[str]:
        for row in load_dataset(dataset, name=config, split="train", streaming=True):
            yield row["text"]
    return rows()


# ---------------------------------------------------------------- tokens out


def _split_text(text: str) -> tuple[str, str]:
    n = len(text)
    train, val = text[:int(n * TRAIN_SHARE)], text[int(n * TRAIN_SHARE):]
    if not train or not val:
        raise DataError(f"the text has {n} characters: too few for a train and a val split")
    return train, val


def encode_chars(text: str) -> tuple[np.ndarray, list[str]]:
    """(ids as uint16, the vocabulary) of a character-level encoding as nanoGPT's: the vocabulary
    is sorted(set(text)) and a character's id is its index there. Raises DataError past 65536
    distinct characters (uint16)."""
    points = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
    vocab = np.unique(points)  # sorted by code point, as sorted() sorts one-character strings
    if len(vocab) > np.iinfo(np.uint16).max + 1:
        raise DataError(f"the text has {len(vocab):,} distinct characters; uint16 tokens hold at most 65,536")
    ids = np.searchsorted(vocab, points).astype(np.uint16)
    return ids, [chr(int(c)) for c in vocab]


def write_chars(text: str, out_dir: Path, bar) -> Prepared:
    """shakespeare_char's layout in out_dir: train.bin, val.bin (uint16) and meta.pkl."""
    import pickle
    train, _ = _split_text(text)
    task = bar.add_task("encoding (characters)", total=len(text))
    ids, chars = encode_chars(text)
    bar.advance(task, len(text))
    cut = len(train)  # one token per character: the split of the text is the split of the ids
    meta = {"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": {c: i for i, c in enumerate(chars)}}
    write_tokens(out_dir / "train.bin", ids[:cut])
    write_tokens(out_dir / "val.bin", ids[cut:])
    atomic_write(out_dir / "meta.pkl", lambda f: pickle.dump(meta, f))
    return Prepared(out_dir, [out_dir / n for n in ("train.bin", "val.bin", "meta.pkl")],
                    {"train": cut, "val": len(ids) - cut}, vocab_size=len(chars))


def write_bpe(text: str, out_dir: Path, encoder: Encoder, bar) -> Prepared:
    """shakespeare's layout in out_dir: each 90/10 part of the text encoded whole (a cut inside
    a part could change its tokens), as train.bin and val.bin (uint16)."""
    parts = dict(zip(("train", "val"), _split_text(text)))
    task = bar.add_task(f"encoding with {encoder.name} BPE (characters)", total=len(text))
    tokens = {}
    for split, part in parts.items():
        ids = np.asarray(encoder.encode(part), dtype=np.int64)
        write_tokens(out_dir / f"{split}.bin", ids)
        tokens[split] = len(ids)
        bar.advance(task, len(part))
    return Prepared(out_dir, [out_dir / "train.bin", out_dir / "val.bin"], tokens)


def shard_path(out_dir: Path, name: str, index: int) -> Path:
    split = "val" if index == 0 else "train"
    return out_dir / f"{name}_{split}_{index:06d}.bin"


def _shard_tokens(paths: list[Path]) -> int:
    from trainer.data.tokenfiles import read_llmc_shard
    return sum(len(read_llmc_shard(p)) for p in paths)


def tokenize_to_shards(texts: Iterable[str], encode: Callable[[str], list[int]], out_dir: str | Path, *,
                       name: str = "fineweb", shard_size: int = 100_000_000, max_tokens: int | None = None,
                       eot: int = GPT2_EOT, log: Callable[[str], None] = lambda s: None, bar=None) -> list[Path]:
    """Tokenize texts ([eot] + encode(text) each) into llm.c shards of shard_size tokens in
    out_dir; the first shard is val, the others train. Stops after max_tokens tokens, reading
    no document past it. Returns the shard paths written. At least two shards are needed (one
    val, one train); raises DataError otherwise, or for ids that do not fit in uint16."""
    if shard_size < 1:
        raise DataError(f"--shard-size must be at least 1, got {shard_size}")
    if max_tokens is not None and max_tokens <= shard_size:
        raise DataError(f"--max-tokens {max_tokens} fills at most the val shard; make it larger than "
                        f"--shard-size {shard_size} so there is train data too")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    task = bar.add_task("tokenizing (tokens)", total=max_tokens) if bar is not None else None
    buf = np.empty(shard_size, dtype=np.uint16)
    filled, total, written = 0, 0, []

    def flush() -> None:
        nonlocal filled
        path = shard_path(out_dir, name, len(written))
        write_llmc_shard(path, buf[:filled])
        written.append(path)
        log(f"wrote {path.name} ({filled:,} tokens, {total:,} so far)")
        filled = 0

    for text in texts:
        doc = np.asarray([eot, *encode(text)], dtype=np.int64)
        if doc.max() > np.iinfo(np.uint16).max or doc.min() < 0:
            raise DataError(f"token ids {doc.min()}..{doc.max()} do not fit in uint16 shards")
        if max_tokens is not None:
            doc = doc[:max_tokens - total]
        pos = 0
        while pos < len(doc):  # a document spills into the next shard where this one is full
            take = min(shard_size - filled, len(doc) - pos)
            buf[filled:filled + take] = doc[pos:pos + take]
            filled, total, pos = filled + take, total + take, pos + take
            if filled == shard_size:
                flush()
        if task is not None:
            bar.update(task, completed=total)
        if max_tokens is not None and total >= max_tokens:
            break
    if filled:
        flush()
    if len(written) < 2:
        raise DataError(f"only {total:,} tokens, enough for the val shard alone; lower --shard-size "
                        f"(now {shard_size:,}) so there is train data too")
    return written
