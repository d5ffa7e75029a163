"""The embedded dataset: byte tokens of generated English-like text shipped inside the package
(trainer/embedded/, made by scripts/make_embedded_data.py), so that a run works with no download.
It is read only when asked for by name, dataset = 'embedded' (trainer.data.datasets.load_dataset),
and never in place of a user's own dataset of that name (check_embedded_name)."""
from __future__ import annotations

import gzip
import json
from functools import lru_cache
from importlib import resources
from pathlib import Path

import numpy as np

from trainer.data.tokenfiles import SHARD_NAME, DataError

EMBEDDED = "embedded"


def check_embedded_name(data_root: str | Path, resumed: str = "") -> None:
    """dataset = 'embedded' is the built-in corpus, but nanoGPT's rule (a folder as given, else
    <data_root>/NAME) names a user's ./embedded or <data_root>/embedded too: where one of them
    holds a dataset (train.bin, val.bin or llm.c shards), the built-in corpus was read silently
    instead of the user's data. Refused then, naming both and how to pick each. A folder holding
    none of those (a source folder named embedded) is no dataset and changes nothing. `resumed`:
    the checkpoint a resume continues, which trained on the built-in corpus: only renaming the
    folder resumes it (the user's data would be a new run). Raises DataError."""
    for where, as_path in ((Path(EMBEDDED), f"./{EMBEDDED}"), (Path(data_root) / EMBEDDED, None)):
        if where.is_dir() and _holds_dataset(where):
            as_path = as_path or where.as_posix()
            if resumed:
                raise DataError(f"dataset 'embedded' names both autofit's built-in corpus, which {resumed} trained on, "
                                f"and your dataset in {as_path}: rename that folder to resume it (a run on yours is a "
                                f"new run: another --out, dataset='{as_path}')")
            raise DataError(f"dataset 'embedded' names both autofit's built-in corpus and your dataset in {as_path}: "
                            f"set dataset='{as_path}' (a path) to train on yours, or rename that folder to train on "
                            f"the built-in corpus")


def _holds_dataset(folder: Path) -> bool:
    """Whether `folder` holds a file loading reads (train.bin, val.bin, llm.c shards)."""
    try:
        return any(f.name in ("train.bin", "val.bin") or SHARD_NAME.match(f.name) for f in folder.iterdir())
    except OSError:  # unreadable: loading it would fail, not read the built-in corpus in its place
        return False


@lru_cache(maxsize=1)
def embedded_arrays() -> dict[str, np.ndarray]:
    """{split: uint8 byte tokens} of the built-in corpus, decompressed once per process (~1.6 MB)
    and read-only, so every dataset object shares them. Raises DataError where a file is damaged."""
    root = resources.files("trainer") / "embedded"
    meta = json.loads((root / "meta.json").read_text())
    arrays = {}
    for split, info in meta["splits"].items():
        arr = np.frombuffer(gzip.decompress((root / info["file"]).read_bytes()), dtype=np.uint8)
        if len(arr) != info["tokens"]:
            raise DataError(f"embedded {split} data is damaged ({len(arr)} tokens, expected {info['tokens']}); "
                            f"regenerate with scripts/make_embedded_data.py")
        arrays[split] = arr
    return arrays
