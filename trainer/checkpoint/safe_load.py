"""Reading a torch file that someone else may have written: torch.load(weights_only=True), so that
no code in it runs, with torch's own warnings and multi-paragraph refusal kept off the terminal.

The callers (trainer.checkpoint.ckpt for --resume, trainer.checkpoint.nanogpt for sample, init_from and
nanoGPT checkpoints) turn the one-line reason into their own error naming the file.
"""
from __future__ import annotations

import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from trainer.meter import is_oom

# torch's refusal of a pickled class names it as 'Unsupported global: GLOBAL module.name'
_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


class UnsafeOrUnreadable(ValueError):
    """torch.load(weights_only=True) refused the file; str() is a one-line reason."""


def load_weights_only(path: str | Path, map_location: str | torch.device = "cpu", mmap: bool = False) -> Any:
    """The object torch.save wrote to `path`, loaded with weights_only=True (tensors, plain
    containers and numbers only; a pickle that would run code is refused unexecuted).
    mmap: map the tensors instead of reading them. Raises UnsafeOrUnreadable with a one-line
    reason to follow '... with weights_only=True: ' (what torch refused, without its advice to
    load with weights_only=False)."""
    try:
        with warnings.catch_warnings():
            # torch warns (2 lines) about a pickle protocol other than its own before it refuses the
            # file; the refusal is what the user needs to see, once
            warnings.simplefilter("ignore")
            # torch maps only its zip format; an older torch.save (or a plain pickle) is read whole,
            # so that its refusal says what it holds
            mmap = mmap and zipfile.is_zipfile(path)
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:  # truncated, not a torch file, or a pickle that wants to run code
        if is_oom(e):  # the file is fine; the device is full: the caller's to say (trainer.loop)
            raise
        raise UnsafeOrUnreadable(_reason(e, Path(path))) from None


def _reason(e: Exception, path: Path) -> str:
    text = str(e)
    if path.is_file() and not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            head = f.read(4)
        if head == b"PK\x03\x04":  # a zip's first entry, but no end record: torch.save's file, cut off
            return f"a torch.save zip file cut short ({path.stat().st_size} bytes; an interrupted copy or a full disk)"
        if head[:1] != b"\x80":  # pickle's PROTO opcode: every torch.save and pickle since protocol 2
            return "not a torch file (neither torch.save's zip format nor a pickle)"
    found = _GLOBAL.search(text)
    if found:
        return f"it pickles {found.group(1)}, which is refused: unpickling it could run code"
    if "Weights only load failed" in text:
        return ("it is a pickle the weights_only loader refuses (written by pickle itself, or holding objects "
                "whose unpickling could run code)")
    first = (text.strip().splitlines() or [type(e).__name__])[0]
    return f"not a torch file: {first[:120]}"
