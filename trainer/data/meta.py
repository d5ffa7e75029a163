"""nanoGPT's meta.pkl ({'vocab_size', 'itos', 'stoi'}, written by its character-level prepare.py
scripts), read with an unpickler that loads plain containers only, so a meta.pkl cannot run code.
"""
from __future__ import annotations

import io
import pickle
from pathlib import Path

from trainer.data.tokenfiles import DataError


class CodeRefused(pickle.UnpicklingError):
    """A pickle that names a class or function to load (which could run code): refused."""


class _PlainUnpickler(pickle.Unpickler):
    """Reads only plain containers (dict, list, str, int): a meta.pkl cannot run code."""

    def find_class(self, module: str, name: str):
        raise CodeRefused(f"refusing to load {module}.{name}")


def read_meta(path: str | Path) -> dict:
    """A nanoGPT meta.pkl ({'vocab_size', 'itos', 'stoi'}) through the restricted unpickler.
    Raises DataError naming the file if it is unreadable, holds code, or is not such a dict."""
    try:
        data = _PlainUnpickler(io.BytesIO(Path(path).read_bytes())).load()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    except CodeRefused as e:  # 'refusing to load os.system'
        raise DataError(f"cannot read {path}: {e}") from None
    except Exception as e:  # text or other bytes: pickle's parse errors name its internals, not the file
        raise DataError(f"cannot read {path}: it is not a pickle as nanoGPT's prepare.py writes meta.pkl "
                        f"({type(e).__name__}); prepare the dataset again") from None
    if not isinstance(data, dict):
        raise DataError(f"cannot read vocab_size from {path}: it holds a {type(data).__name__}, not a dict")
    return data


def _meta_vocab(path: Path) -> int:
    """meta.pkl's vocab_size. Raises DataError naming the file unless it is a positive integer."""
    v = read_meta(path).get("vocab_size")
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise DataError(f"cannot read vocab_size from {path}: {v!r} is not a positive integer")
    return v
