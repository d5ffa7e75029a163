"""Download a FineWeb-Edu sample and write it as llm.c token shards (a thin wrapper).

    pip install 'autofit[data]'            # datasets + tiktoken
    python scripts/prepare_fineweb.py --out data/fineweb --max-tokens 200_000_000

The same as `autofit data prepare fineweb-edu --out DIR`; the work is trainer/data/prepare.py's.
A Ctrl-C or SIGTERM stops it at the next document or shard boundary, keeps the finished shards
(exit 128 + the signal's number: 130 Ctrl-C, 143 SIGTERM) and the same command, run again, continues from them.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, not installed

from trainer.data.datasets import DataError  # noqa: E402
from trainer.interrupt import exit_code  # noqa: E402
from trainer.writes import WriteError  # noqa: E402
from trainer.data.prepare import (FINEWEB_CONFIG, FINEWEB_DATASET, PrepareStopped, prepare,  # noqa: E402, F401
                                  tokenize_to_shards)



def main() -> int:
    parser = argparse.ArgumentParser(description="Write FineWeb-Edu as llm.c token shards.")
    parser.add_argument("--out", type=Path, default=Path("data/fineweb"), help="output directory")
    parser.add_argument("--name", default="fineweb", help="shard file prefix")
    parser.add_argument("--dataset", default=FINEWEB_DATASET)
    parser.add_argument("--config", default=FINEWEB_CONFIG, help="the dataset's config (subset) name")
    parser.add_argument("--shard-size", type=int, default=None, help="tokens per shard (default 100,000,000)")
    parser.add_argument("--max-tokens", type=int, default=None,
                        help="stop after this many tokens (default: the whole sample, ~10B tokens)")
    parser.add_argument("--input", type=Path, default=None, help="a local .jsonl of {\"text\": ...} rows instead")
    parser.add_argument("--force", action="store_true", help="replace shards already in --out")
    args = parser.parse_args()
    try:
        done = prepare("fineweb-edu", args.out, input_path=args.input, max_tokens=args.max_tokens,
                       shard_size=args.shard_size, force=args.force, fineweb=(args.dataset, args.config),
                       shard_prefix=args.name, log=print)
    except (DataError, WriteError) as e:  # one line: what was wrong, or what the disk refused
        print(f"error: {e}", file=sys.stderr)
        return 2
    except PrepareStopped as e:  # Ctrl-C/SIGTERM: the finished shards are kept; running again continues
        print(e, file=sys.stderr)
        return exit_code(e.signal)  # 128 + the signal's number, as every interrupted autofit command exits
    print(f"done: {len(done.files)} shards in {args.out}; use it with dataset = '{args.out}'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
