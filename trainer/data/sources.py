"""Where the texts of `autofit data prepare` come from: a local file, nanoGPT's Tiny Shakespeare
download (kept and reused as input.txt), a local .jsonl of FineWeb-style rows, or FineWeb-Edu
streamed by `datasets`. Every failure is a DataError of one line naming the file or the URL."""
from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

from trainer.data.datasets import DataError
from trainer.data.tokenfiles import atomic_write
from trainer.errors import install_hint

TINY_SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
FINEWEB_DATASET = "HuggingFaceFW/fineweb-edu"
FINEWEB_CONFIG = "sample-10BT"  # ~10B GPT-2 tokens


def read_text(path: Path) -> str:
    """A local text file as UTF-8. Raises DataError naming the file."""
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read --input {path}: {e}") from None


def download_text(url: str, dest: Path, bar, log: Callable[[str], None],
                  boundary: Callable[[], None] = lambda: None) -> str:
    """The text at url, kept in dest (reused when it is there, as nanoGPT's prepare.py does).
    boundary() is called after each chunk read and may raise to stop: the chunks read are then
    dropped (dest is written only whole). Raises DataError (one line) when the download fails,
    saying how to give a local file."""
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
                boundary()
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
        i = 0
        while True:
            try:
                line = next(f, None)
            except UnicodeDecodeError as e:  # JSON rows are UTF-8 (RFC 8259); read_text says the same
                raise DataError(f"{path}: not UTF-8 text ({e.reason}, byte 0x{e.object[e.start]:02x}); FineWeb's "
                                f"rows are UTF-8 JSON") from None
            if line is None:
                return
            i += 1
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
