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

A Ctrl-C or SIGTERM is acted on at the next boundary between pieces of work (trainer.interrupt's
StopFlag; a second signal stops at once): fineweb-edu's after a document or a shard, the finished
shards kept in a partial folder that the same command, run again, continues from (trainer/data/
shards.py); the small sets' after the download, a chunk of characters or a split (trainer/data/
text_tokens.py; a re-run starts over, reusing a downloaded input.txt). Either way PrepareStopped says, in one line, what was kept
and how to continue.
"""
from __future__ import annotations

import os
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from trainer.data.datasets import PREPARABLE, SHARD_NAME, DataError
from trainer.data.shards import (GPT2_EOT, PROGRESS_FILE, ShardProgress, read_progress, shard_path,  # noqa: F401
                                 tokenize_to_shards, write_progress)  # GPT2_EOT, shard_path, tokenize_to_shards: here before
from trainer.errors import install_hint
from trainer.interrupt import StopFlag
from trainer.phases import LineBar
from trainer.writes import WriteError, check_room
from trainer.data.sources import (FINEWEB_CONFIG, FINEWEB_DATASET, TINY_SHAKESPEARE_URL, download_text,  # noqa: F401
                                  read_documents, read_text, stream_fineweb)
from trainer.data.text_tokens import Encoder, Prepared, encode_chars, write_bpe, write_chars  # noqa: F401
from trainer.data.tokenfiles import read_llmc_shard, sidecar_path

# said on the first Ctrl-C/SIGTERM of a text's preparation, before the boundary that acts on it
# (a large text's BPE encode can be seconds away from the next)
STOP_NOTICE = "autofit: stopping the preparation at the next boundary (Ctrl-C again to stop now)"


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
        import difflib  # trainer.config.messages' did_you_mean is a layer above data
        close = difflib.get_close_matches(name.lower(), PREPARABLE, n=1)
        raise DataError(f"unknown dataset {name!r} to prepare{f' (did you mean {close[0]!r}?)' if close else ''}; "
                        f"choose from {', '.join(PREPARABLE)}")
    if name != "fineweb-edu" and (max_tokens is not None or shard_size is not None):
        raise DataError("--max-tokens and --shard-size apply to fineweb-edu only")
    if max_tokens is not None and max_tokens < 1:
        raise DataError(f"--max-tokens must be at least 1, got {max_tokens}")
    if shard_size is not None and shard_size < 1:  # 0 was read as 'not given' further on
        raise DataError(f"--shard-size must be at least 1, got {shard_size}")
    if input_path is not None and not input_path.exists() and not input_path.is_symlink():
        raise DataError(f"--input {input_path} is not a file")
    if input_path is not None:
        from trainer.paths import PathProblem, input_file
        try:  # a FIFO would block, /dev/zero would never end: a regular file (or a link to one) only
            input_file(input_path, "--input")
        except PathProblem as e:
            raise DataError(str(e)) from None


# ---------------------------------------------------------------- the entry point


class PrepareStopped(KeyboardInterrupt):
    """A Ctrl-C or SIGTERM stopped a prepare: at the next boundary between pieces of work, or at
    once on a second signal. str(): one line, what was kept and how to continue (the CLI prints
    it and exits 128 + the signal's number, 130 for a Ctrl-C, as every interrupted autofit command
    does: trainer.interrupt.exit_code). A KeyboardInterrupt, so that code which does not know it
    treats it as the Ctrl-C it is. .signal: the stop signal's number (SIGINT, SIGTERM, SIGHUP)."""

    def __init__(self, line: str, signum: int | None = None):
        super().__init__(line)
        self.signal = signum


class _AtBoundary(Exception):
    """Raised at a boundary once a stop was asked for; prepare says it as PrepareStopped."""


def partial_folder(out_dir: Path, shard_prefix: str) -> Path:
    """Where fineweb-edu's shards are made, and kept when a run stops (trainer/data/shards.py).
    Hidden, and loading reads no sub-folder: never taken for a dataset."""
    return out_dir / f".prepare-{shard_prefix}.partial"


def prepare(name: str, out_dir: str | Path, *, input_path: str | Path | None = None,
            encoder: Encoder | None = None, max_tokens: int | None = None, shard_size: int | None = None,
            force: bool = False, progress: bool = True, log: Callable[[str], None] = lambda s: None,
            fineweb: tuple[str, str] = (FINEWEB_DATASET, FINEWEB_CONFIG), shard_prefix: str = "fineweb",
            url: str = TINY_SHAKESPEARE_URL) -> Prepared:
    """Write dataset `name` (see the module docstring) into out_dir; returns what was written.

    encoder: the GPT-2 BPE to use (default: tiktoken's; tests inject one). progress: a bar (or,
    piped, count + ETA lines) and a line per shard written, through log. Raises DataError (one
    line) for every input a user can get wrong, before any download or tokenizing (a stopped
    fineweb-edu preparation in out_dir made with other options is one of them); WriteError when
    the disk refuses; PrepareStopped on a Ctrl-C or SIGTERM (module docstring).
    """
    out_dir = Path(out_dir)
    input_path = Path(input_path) if input_path is not None else None
    _check_options(name, input_path, max_tokens, shard_size)
    if name != "shakespeare_char" and encoder is None:
        encoder = gpt2_encoder()  # before out_dir is made: a missing encoding leaves no empty folder
    made = not out_dir.exists()
    check_out_dir(out_dir, force)
    old = dataset_files(out_dir)
    job = _Job(name, out_dir, input_path, encoder, log, url, progress)
    if name == "fineweb-edu":
        job.staging = partial_folder(out_dir, shard_prefix)
        job.options = _shard_options(input_path, fineweb, encoder, shard_prefix, 100_000_000 if shard_size is None else shard_size, max_tokens)
        job.kept = read_progress(job.staging, job.options)  # a stopped run's shards, checked; else None
        job.texts = read_documents(input_path) if input_path else stream_fineweb(*fineweb)
    else:
        job.staging = Path(tempfile.mkdtemp(prefix=".prepare-", dir=out_dir))
    # a Ctrl-C/SIGTERM sets it; the next boundary (soon) stops; a second: at once. Answered at once
    # where the next boundary can be seconds away (a whole text part in one BPE encode); fineweb's
    # next document is milliseconds away, and its stop line follows at once
    with StopFlag(STOP_NOTICE if job.texts is None else None) as flag:
        job.stop = flag
        try:
            with _progress(progress, log) as bar:
                done = job.run_shards(bar) if job.texts is not None else job.run_text(bar)
            job.boundary()  # a stop asked during the last file's write: the old dataset stays
            with flag.hold():  # one file renamed, another not: a mixed dataset, so no second-signal stop here
                _move_into_place(job.staging, out_dir, old, done)
        except BaseException as e:
            keep = job.texts is not None and not isinstance(e, DataError) and job.kept is not None
            if not keep:  # nothing a re-run can continue from
                shutil.rmtree(job.staging, ignore_errors=True)
                if made and not any(out_dir.iterdir()):  # a failed first prepare leaves no empty dataset folder
                    out_dir.rmdir()
            if isinstance(e, (_AtBoundary, KeyboardInterrupt)):
                raise PrepareStopped(job.stopped_line(old, at_once=not isinstance(e, _AtBoundary)), flag.signal) from None
            if isinstance(e, WriteError):  # named as the file it would have become, not its staging copy
                raise WriteError(f"dataset file {out_dir / Path(e.what).name}", e.reason, job.kept_clause(old)) from None
            raise
    shutil.rmtree(job.staging, ignore_errors=True)  # empty but for a fineweb run's progress.json
    return done


def _shard_options(input_path: Path | None, fineweb: tuple[str, str], encoder: Encoder, prefix: str,
                   shard_size: int, max_tokens: int | None) -> dict:
    """What a fineweb-edu preparation's shards depend on: a stopped run continues only with the same."""
    if input_path is not None:
        st = input_path.stat()  # a changed file (size or mtime) is another input
        source = {"input": str(input_path.resolve()), "input_bytes": st.st_size, "input_mtime_ns": st.st_mtime_ns}
    else:  # the streamed set, in the order `datasets` streams it
        source = {"input": f"{fineweb[0]} ({fineweb[1]})"}
    return {**source, "tokenizer": encoder.name, "eot": encoder.eot, "shard_prefix": prefix,
            "shard_size": shard_size, "max_tokens": max_tokens}


@dataclass
class _Job:
    """One prepare's work and what it has kept so far (for the line said when it stops)."""
    name: str
    out_dir: Path
    input_path: Path | None
    encoder: Encoder | None
    log: Callable[[str], None]
    url: str
    progress: bool  # False (--no-progress): no bar, and no line per shard written
    staging: Path = Path()
    texts: Iterable[str] | None = None  # fineweb-edu's documents
    options: dict = field(default_factory=dict)  # fineweb-edu's (_shard_options)
    kept: ShardProgress | None = None  # the finished shards in staging, as progress.json lists them
    stop: StopFlag | None = None

    def boundary(self) -> None:
        """Between two pieces of work: stop here if a signal came."""
        if self.stop is not None and self.stop.signal is not None:
            raise _AtBoundary

    def run_shards(self, bar) -> Prepared:
        if self.kept is not None and self.kept.shards:
            self.log(f"continuing a stopped preparation: {len(self.kept.shards)} finished shards "
                     f"({self.kept.tokens:,} tokens) in {self.staging}; skipping the {self.kept.next_doc:,} "
                     f"documents they hold")

        def saved(prog: ShardProgress) -> None:  # the shard is whole; now its record
            write_progress(self.staging, prog)
            self.kept = prog.model_copy(deep=True)
        opts = self.options
        shards = tokenize_to_shards(self.texts, self.encoder.encode, self.staging, name=opts["shard_prefix"],
                                    shard_size=opts["shard_size"], max_tokens=opts["max_tokens"],
                                    eot=self.encoder.eot, log=self.log if self.progress else lambda s: None, bar=bar,
                                    start=self.kept or ShardProgress(options=opts), on_shard=saved,
                                    boundary=self.boundary)
        return Prepared(self.out_dir, shards, {"val": _shard_tokens(shards[:1]), "train": _shard_tokens(shards[1:])})

    def run_text(self, bar) -> Prepared:
        text = (read_text(self.input_path) if self.input_path
                else download_text(self.url, self.out_dir / "input.txt", bar, self.log, self.boundary))
        self.boundary()
        if self.name == "shakespeare_char":
            return write_chars(text, self.staging, bar, self.boundary)
        return write_bpe(text, self.staging, self.encoder, bar, self.boundary)

    def kept_clause(self, old: list[Path]) -> str:
        """What is kept, for a line that says the run stopped or failed."""
        was = f"the dataset in {self.out_dir} is as it was" if old else f"no dataset was written to {self.out_dir}"
        if self.texts is None or self.kept is None or not self.kept.shards:
            return was
        k = len(self.kept.shards)
        return (f"{k} finished shard{'s' if k != 1 else ''} ({self.kept.tokens:,} tokens) kept in {self.staging}; "
                f"{was}; run the same command again to continue from shard {k}")

    def stopped_line(self, old: list[Path], at_once: bool) -> str:
        sig = signal.Signals(self.stop.signal).name if self.stop and self.stop.signal else None
        how = ("interrupted" if sig is None else f"stopped at once by a second signal (the first: {sig})" if at_once
               else f"stopped by {sig} at the next boundary")
        kept = self.kept_clause(old)
        if self.texts is not None and self.kept is not None and self.kept.shards:
            return f"{how}; the shard in hand was dropped; {kept}"
        reuse = ""
        if self.texts is None and self.input_path is None and (self.out_dir / "input.txt").is_file():
            reuse = f"; {self.out_dir / 'input.txt'} (downloaded) is kept and will be reused"
        before = "before the first shard was finished" if self.texts is not None else "before the dataset was written"
        return f"{how} {before}; {kept}{reuse}; run the same command again to start over"


def _shard_tokens(paths: list[Path]) -> int:
    return sum(len(read_llmc_shard(p)) for p in paths)


def _move_into_place(staging: Path, out_dir: Path, old: list[Path], done: Prepared) -> None:
    # Every new file is whole before any old one is touched; then the old layout's leftovers
    # (a meta.pkl under a BPE set, shards past the new count) go, so loading sees one dataset.
    # A fineweb run's progress.json stays behind, removed with the staging folder.
    moving = sorted(f for f in staging.iterdir() if f.name != PROGRESS_FILE)
    new_names = {f.name for f in moving}
    for f in moving:
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
