"""The self-check's figures, from what autofit writes (its --json output, metrics.jsonl) and
nothing internal: per-trial estimate vs measurement, model FLOPs per token, MFU, and the card's
peak from its built-in hardware profile (through `autofit profiles ... --json`)."""
from __future__ import annotations

import statistics

from common import cli_json

# A trial's memory-return fields, whatever autofit names them: kept as they are in the record.
BASELINE_KEYS = ("baseline", "leak", "before", "after")


def trial_rows(trials: list[dict]) -> list[dict]:
    """One row per trial: the candidate, its status, estimated and measured peak (bytes), the
    estimate's error relative to the measurement, and any baseline/leak fields the trial carries."""
    rows = []
    for t in trials:
        est, meas = t.get("estimated_peak_bytes"), t.get("measured_peak_bytes")
        row = {k: t.get(k) for k in ("micro_batch", "dtype", "compile", "checkpointing", "loss_impl", "status",
                                     "measured_reserved_bytes", "tokens_per_s", "steps_run", "seconds", "note")}
        row.update(estimated_peak_bytes=est, measured_peak_bytes=meas,
                   estimate_error=(est - meas) / meas if est and meas else None)
        row.update({k: v for k, v in t.items() if any(b in k for b in BASELINE_KEYS)})
        rows.append(row)
    return rows


def leaked_bytes(row: dict) -> int | None:
    """Bytes a trial left allocated: its `leaked_bytes`, else the first `X_after_bytes` minus
    `X_before_bytes` pair (`X_baseline_bytes` counts as before); None when it carries neither."""
    if row.get("leaked_bytes") is not None:
        return int(row["leaked_bytes"])
    for k, after in row.items():
        if k.endswith("_after_bytes") and after is not None:
            stem = k[: -len("_after_bytes")]
            before = row.get(f"{stem}_before_bytes", row.get(f"{stem}_baseline_bytes", row.get("baseline_bytes")))
            if before is not None:
                return int(after) - int(before)
    return None


def baseline_summary(rows: list[dict], tolerance_bytes: int = 2 * 2**20) -> tuple[bool | None, str]:
    """Did every trial give its memory back (within `tolerance_bytes`, and no note of a leak)?
    None when the trial records carry no such figure."""
    figures = [(r, leaked_bytes(r)) for r in rows]
    keyed = [(r, b) for r, b in figures if b is not None]
    if not keyed:
        return None, "the trial records carry no baseline/leak figure (this autofit does not record it)"
    bad = [r for r, b in keyed if b > tolerance_bytes or "leak" in (r.get("note") or "").lower()]
    worst = max(b for _, b in keyed)
    return not bad, (f"{len(keyed)} trials carry baseline figures; {len(bad)} kept more than "
                     f"{tolerance_bytes / 2**20:.0f} MiB or noted a leak; most left allocated {worst / 2**20:.1f} MiB")


def flops_per_token(cfg: dict) -> tuple[float, int, str]:
    """Training FLOPs per token of a nanoGPT-style GPT (forward + backward), the PaLM paper's
    count (Chowdhery et al. 2022, appendix B), as nanoGPT's estimate_mfu does: 6·N + 12·L·C·T.
    N here is the weights that feed a matmul for every token, 12·L·C² in the blocks plus V·C for
    the (tied) head; LayerNorm and bias vectors (< 0.1 %) and the position table (looked up, not
    multiplied) are left out. Attention is counted in full, causal masking notwithstanding.
    Returns (flops, N, formula)."""
    L, C, T, V = (int(cfg[k]) for k in ("n_layer", "n_embd", "block_size", "vocab_size"))
    n = 12 * L * C * C + V * C
    attn = 12 * L * C * T
    return float(6 * n + attn), n, f"6·N + 12·L·C·T = 6·{n:,} + 12·{L}·{C}·{T} (PaLM App. B; nanoGPT estimate_mfu)"


def mfu(tokens_per_s: float | None, flops: float, peak_tflops: float | None) -> float | None:
    """Model FLOPs utilisation: achieved FLOP/s over the card's dense peak (both FLOP/s)."""
    if not tokens_per_s or not peak_tflops:
        return None
    return tokens_per_s * flops / (peak_tflops * 1e12)


def median(xs: list[float]) -> float | None:
    xs = [x for x in xs if x]
    return statistics.median(xs) if xs else None


def find_card_profile(name: str, total_bytes: int) -> tuple[dict | None, str]:
    """The built-in (or user) hardware profile of the card NVML names: its NVML names include
    `name` and its memory is within 3% of `total_bytes`. (hardware dict or None, how it was found)."""
    entries, res = cli_json(["profiles", "list", "--json"])
    if entries is None:
        return None, f"autofit profiles list failed: {res['stderr_tail'][-300:]}"
    near = [e["name"] for e in entries
            if e.get("memory_bytes") and abs(e["memory_bytes"] - total_bytes) <= 0.03 * total_bytes]
    for prof in near:
        shown, _ = cli_json(["profiles", "show", prof, "--json"])
        hw = (shown or {}).get("hardware") or {}
        if name in (hw.get("nvml_names") or []) or hw.get("gpu") == name:
            return hw, f"hardware profile {prof} (NVML name {name!r}, memory within 3%)"
    return None, f"no hardware profile names {name!r} with about {total_bytes / 2**30:.1f} GiB (looked at {near})"


def peak_for(hw: dict | None, dtype: str) -> float | None:
    """The card's dense tensor peak for `dtype` (TFLOP/s), or None (fp32, or no profile)."""
    if not hw:
        return None
    return {"bfloat16": hw.get("peak_bf16_tflops"), "float16": hw.get("peak_fp16_tflops")}.get(dtype)
