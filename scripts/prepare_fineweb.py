"""Download a FineWeb-Edu sample and write it as llm.c token shards for `load_dataset(dir)`.

    pip install autofit[data]            # datasets + tiktoken
    python scripts/prepare_fineweb.py --out data/fineweb --max-tokens 200_000_000

Documents are streamed (nothing but the shards is kept on disk), tokenized with GPT-2's BPE, and
each is preceded by the <|endoftext|> token (50256), as llm.c does. The first shard is the val
split (<name>_val_000000.bin), the rest are train (<name>_train_000001.bin, ...). A document may
run across a shard boundary; the sampler reads a split's shards as one stream anyway.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, not installed

from trainer.data import DataError, write_llmc_shard  # noqa: E402

GPT2_EOT = 50256


def shard_path(out_dir: Path, name: str, index: int) -> Path:
    split = "val" if index == 0 else "train"
    return out_dir / f"{name}_{split}_{index:06d}.bin"


def tokenize_to_shards(texts: Iterable[str], encode: Callable[[str], list[int]], out_dir: str | Path, *,
                       name: str = "fineweb", shard_size: int = 100_000_000, max_tokens: int | None = None,
                       eot: int = GPT2_EOT, log: Callable[[str], None] = lambda s: None) -> list[Path]:
    """Tokenize texts ([eot] + encode(text) each) into llm.c shards of shard_size tokens in
    out_dir; the first shard is val, the others train. Stops after max_tokens tokens. Returns the
    shard paths written. At least two shards are needed (one val, one train)."""
    if shard_size < 1:
        raise DataError(f"--shard-size must be at least 1, got {shard_size}")
    if max_tokens is not None and max_tokens <= shard_size:
        raise DataError(f"--max-tokens {max_tokens} fills at most the val shard; make it larger than "
                        f"--shard-size {shard_size} so there is train data too")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    buf = np.empty(shard_size, dtype=np.uint16)
    filled, total, written = 0, 0, []

    def flush() -> None:
        nonlocal filled
        path = shard_path(out_dir, name, len(written))
        write_llmc_shard(path, buf[:filled])
        written.append(path)
        log(f"wrote {path} ({filled:,} tokens, {total:,} so far)")
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
            filled += take
            total += take
            pos += take
            if filled == shard_size:
                flush()
        if max_tokens is not None and total >= max_tokens:
            break
    if filled:
        flush()
    if len(written) < 2:
        raise DataError(f"only {total:,} tokens, enough for the val shard alone; lower --shard-size "
                        f"(now {shard_size:,}) so there is train data too")
    return written


def stream_fineweb(dataset: str, config: str) -> tuple[Iterable[str], Callable[[str], list[int]], int]:
    """The download path: FineWeb-Edu texts, streamed, and tiktoken's GPT-2 encoder."""
    try:
        import tiktoken
        from datasets import load_dataset
    except ImportError as e:
        raise DataError(f"{e.name} is not installed; run: pip install autofit[data]") from None
    enc = tiktoken.get_encoding("gpt2")
    rows = load_dataset(dataset, name=config, split="train", streaming=True)
    return (row["text"] for row in rows), enc.encode_ordinary, enc.eot_token


def main() -> int:
    parser = argparse.ArgumentParser(description="Write FineWeb-Edu as llm.c token shards.")
    parser.add_argument("--out", type=Path, default=Path("data/fineweb"), help="output directory")
    parser.add_argument("--name", default="fineweb", help="shard file prefix")
    parser.add_argument("--dataset", default="HuggingFaceFW/fineweb-edu")
    parser.add_argument("--config", default="sample-10BT", help="the dataset's config (subset) name")
    parser.add_argument("--shard-size", type=int, default=100_000_000, help="tokens per shard")
    parser.add_argument("--max-tokens", type=int, default=None,
                        help="stop after this many tokens (default: the whole sample, ~10B tokens)")
    args = parser.parse_args()
    try:
        texts, encode, eot = stream_fineweb(args.dataset, args.config)
        paths = tokenize_to_shards(texts, encode, args.out, name=args.name, shard_size=args.shard_size,
                                   max_tokens=args.max_tokens, eot=eot, log=print)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"done: {len(paths)} shards in {args.out}; use it with dataset = '{args.out}'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
