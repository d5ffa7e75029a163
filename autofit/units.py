"""Byte sizes: parsing what users type ("2GiB", "1.5G", "512MiB", "4096") and printing bytes.

Suffix rules, case-insensitive, with an optional space before the suffix:
- KiB, MiB, GiB, TiB are binary (powers of 1024).
- KB, MB, GB, TB are decimal (powers of 1000), as the SI prefixes say.
- Bare K, M, G, T are binary, following nvidia-smi and most GPU tooling, where "12G" means 12 GiB.
- B or no suffix means bytes (the CLI's --budget takes a bare number under 1 MiB for a missing
  unit and refuses it: missing_unit).
Fractions are allowed ("1.5G"); the result is rounded to whole bytes.
"""
from __future__ import annotations

import math
import re

KiB = 1024
MiB = 1024**2
GiB = 1024**3
TiB = 1024**4
PiB = 1024**5
EiB = 1024**6

_UNITS = {
    "": 1, "b": 1,
    "k": KiB, "kib": KiB, "kb": 1000,
    "m": MiB, "mib": MiB, "mb": 1000**2,
    "g": GiB, "gib": GiB, "gb": 1000**3,
    "t": TiB, "tib": TiB, "tb": 1000**4,
}

_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_size(s: str | int) -> int:
    """Bytes in `s`, e.g. "2GiB" -> 2147483648. Raises ValueError on junk, zero or negative sizes."""
    if isinstance(s, bool):  # bool is an int subclass; True bytes is never what anyone meant
        raise ValueError(f"not a size: {s!r}")
    if isinstance(s, int):
        n = s
    else:
        m = _SIZE_RE.match(str(s))
        if m is None:
            if str(s).strip().startswith("-"):
                raise ValueError(f"size must be positive, got {s!r}")
            raise ValueError(f"not a size: {s!r} (examples: 2GiB, 1.5G, 512MiB, 4096)")
        number, unit = m.group(1), m.group(2).lower()
        if unit not in _UNITS:
            raise ValueError(f"unknown size unit {m.group(2)!r} in {s!r} (use B, KiB, MiB, GiB, TiB, KB, MB, GB, TB, K, M, G, T)")
        value = float(number) * _UNITS[unit]
        if not math.isfinite(value):
            raise ValueError(f"not a size: {s!r}")
        n = round(value)
    if n <= 0:
        raise ValueError(f"size must be positive, got {s!r}")
    return n


# A budget typed as a bare number below this is taken for a missing unit, not a wish for bytes: no
# model trains in under 1 MiB, and `--budget 2` meant 2 GiB (t11's L5: read as 2 bytes, it ended
# eight lines later in 'nothing fits ... a larger --budget would help')
BARE_BYTES_FLOOR = MiB


def missing_unit(s: str | int) -> str | None:
    """Words for a size typed with no unit that parses to under BARE_BYTES_FLOOR bytes ("2 is 2
    bytes: give a unit, e.g. 2GiB (or 2B for bytes)"), else None: a unit given (B included),
    or a bare number of 1 MiB or more. Call it on a size parse_size accepted."""
    m = _SIZE_RE.match(str(s))
    if isinstance(s, bool) or m is None or m.group(2) or (n := parse_size(s)) >= BARE_BYTES_FLOOR:
        return None
    number = m.group(1)
    likely = "GiB" if float(number) <= 64 else "MiB"  # 2 -> 2GiB, 256 -> 256MiB: the sizes budgets come in
    return f"{number} is {n:,} byte{'s' * (n != 1)}: give a unit, e.g. {number}{likely} (or {number}B for bytes)"


def fmt_bytes(n: int | float) -> str:
    """Human-readable binary size: "1.54 GiB", "512.0 MiB", "3.0 KiB", "12 B". Sizes beyond any
    one machine's memory (a typo'd AUTOFIT_RANK_BUDGETS entry; profiles cap a card at 1 PiB) keep
    to a few digits: "4.00 PiB", "86.74 EiB", and from 1024 EiB on a power of ten of bytes,
    "1.10e+32 B", where TiB printed "100000000000000000000.00 TiB"."""
    sign = "-" if n < 0 else ""
    a = abs(n)
    if a >= 1024 * EiB:
        return f"{sign}{a:.2e} B"
    if a >= EiB:
        return f"{sign}{a / EiB:.2f} EiB"
    if a >= PiB:
        return f"{sign}{a / PiB:.2f} PiB"
    if a >= TiB:
        return f"{sign}{a / TiB:.2f} TiB"
    if a >= GiB:
        return f"{sign}{a / GiB:.2f} GiB"
    if a >= MiB:
        return f"{sign}{a / MiB:.1f} MiB"
    if a >= KiB:
        return f"{sign}{a / KiB:.1f} KiB"
    return f"{sign}{int(a)} B"


def fmt_share(x: float) -> str:
    """A share as a percentage with the digits it needs: 0.1 -> "10%", 0.125 -> "12.5%", 0.999 ->
    "99.9%", 0.9999999 -> "99.99999%" (never "100%" or "0%" for a share that is neither)."""
    pct = x * 100
    for digits in range(3, 10):
        text = f"{pct:.{digits}f}".rstrip("0").rstrip(".")
        if float(text) not in (0.0, 100.0) or pct in (0.0, 100.0):
            break
    return text + "%"


def measured_peak_words(r) -> str:
    """'measured peak 7.00 GiB', or with a reserved figure (CUDA) 'measured peak 7.00 GiB allocated,
    9.90 GiB reserved': the figure the budget judges is always among them (autofit.records.judged_peak)."""
    if r.measured_reserved_bytes and r.measured_reserved_bytes > (r.measured_peak_bytes or 0):
        return (f"measured peak {fmt_bytes(r.measured_peak_bytes)} allocated, "
                f"{fmt_bytes(r.measured_reserved_bytes)} reserved")
    return f"measured peak {fmt_bytes(r.measured_peak_bytes)}"
