"""The config's error messages in words: pydantic's errors as one line that names each key, its
value, where it was set (file:line or --set) and what is wrong, with a close match for a typo
(`did you mean 'n_layer'?`). The schema is trainer.config.train_config."""
from __future__ import annotations

import difflib
import re
from typing import Any, Sequence

from pydantic import ValidationError


# Short names for dtypes from other tools' flags (Lightning's precision, llm.c, HF's --bf16): not
# accepted, so that a config reads as nanoGPT's does, but named in the answer.
DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}


def did_you_mean(word: str, choices: Sequence[str]) -> str:
    """The suffix ` (did you mean 'x'?)` for the closest of `choices` to `word` (or the dtype
    that a short name such as 'bf16' stands for); '' when none is close."""
    alias = DTYPE_ALIASES.get(word.lower())
    if alias in choices:
        return f" (did you mean {alias!r}?)"
    # case-blind: 'RMSNorm' is 'rmsnorm' to a reader, though difflib calls them far apart
    lowered = {c.lower(): c for c in choices}
    close = difflib.get_close_matches(word.lower(), list(lowered), n=1)
    return f" (did you mean {lowered[close[0]]!r}?)" if close else ""


def unknown_key_message(key: str, fields: Sequence[str]) -> str:
    """'unknown key 'n_layers' (did you mean 'n_layer'?)': the closest of the config's `fields`."""
    return f"unknown key {key!r}{did_you_mean(key, fields)}"


# Strict type errors, in words: `batch_size=True (c.py:2): must be an integer, not a bool`.
_TYPE_WORDS = {"int_type": "an integer", "float_type": "a number", "bool_type": "True or False",
               "string_type": "a string"}


def _kind_of(value: Any) -> str:
    kinds = {bool: "a bool", int: "an integer", float: "a float", str: "a string", type(None): "None"}
    return kinds.get(type(value), type(value).__name__)


def format_validation_error(e: ValidationError, fields: Sequence[str], sources: dict[str, str] | None = None) -> str:
    """All of pydantic's errors on one line: 'key=value (source): what is wrong; ...'; `fields`
    are the config's field names (for a typo's closest match), `sources` where each key was set."""
    parts = []
    for err in e.errors():
        key = str(err["loc"][0]) if err["loc"] else ""
        where = f" ({sources[key]})" if sources and key in sources else ""
        if err["type"] == "extra_forbidden":
            parts.append(unknown_key_message(key, fields) + where)
            continue
        msg = err["msg"].removeprefix("Value error, ")
        if not key:
            # A check across fields: its message names them and their values; add where the
            # named ones were set, since the culprit may be a preset value the user never typed.
            named = [f"{k} from {src}" for k, src in (sources or {}).items()
                     if re.search(rf"\b{k}\b", msg)]
            parts.append(msg + (f" [{', '.join(named)}]" if named else ""))
            continue
        value = err.get("input")
        if err["type"] in _TYPE_WORDS:
            msg = f"must be {_TYPE_WORDS[err['type']]}, not {_kind_of(value)}"
        if err["type"] == "finite_number":
            msg = "must be a finite number, not inf or nan"
        if err["type"] == "literal_error" and isinstance(value, str):
            choices = err.get("ctx", {}).get("expected", "")
            msg += did_you_mean(value, re.findall(r"'([^']*)'", choices))
        parts.append(f"{key}={value!r}{where}: {msg}")
    return "invalid config: " + "; ".join(parts)
