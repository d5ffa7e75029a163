"""The self-check's figures, from what autofit writes (its --json output, metrics.jsonl) and
nothing internal: per-trial estimate vs measurement, model FLOPs per token, MFU, and the card's
peak from its built-in hardware profile (through `autofit profiles ... --json`)."""
from __future__ import annotations

import statistics

from common import cli_json

# A trial's memory-return fields, whatever autofit names them: kept as they are in the record.
BASELINE_KEYS = ("baseline", "leak", "before", "after")


def trial_rows(trials: list[dict], slack: float = 0.0) -> list[dict]:
    """One row per trial: the candidate, its status, estimated and measured peaks (bytes), the
    estimate's errors compared like with like, and any baseline/leak fields the trial carries.

    autofit's CUDA estimate is a reserved-style figure: the allocated estimate plus `slack` (the
    estimator's allocator slack, a fraction of the rest; 0 on the CPU). So the allocated estimate
    (estimate / (1 + slack)) is compared with the allocated peak (`estimate_error`), and the full
    estimate with the reserved peak (`reserved_estimate_error`, None where nothing reserves)."""
    rows = []
    for t in trials:
        est, meas, res = t.get("estimated_peak_bytes"), t.get("measured_peak_bytes"), t.get("measured_reserved_bytes")
        alloc = round(est / (1.0 + slack)) if est else None
        row = {k: t.get(k) for k in ("micro_batch", "dtype", "compile", "checkpointing", "checkpointing_policy",
                                     "loss_impl", "status",
                                     "measured_reserved_bytes", "tokens_per_s", "steps_run", "seconds", "note")}
        row.update(estimated_peak_bytes=est, estimated_allocated_bytes=alloc, measured_peak_bytes=meas,
                   estimate_error=(alloc - meas) / meas if alloc and meas else None,
                   reserved_estimate_error=(est - res) / res if est and res else None)
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


def leak_tolerance(device: str) -> int:
    """The bytes a trial may leave allocated: autofit's own (autofit.planning.trials
    LEAK_TOLERANCE_BYTES, the figure run_trial judges by), so the self-check and the trials agree.
    On CUDA the cuBLAS workspaces are freed by the device's cleanup, so they are not in it."""
    from autofit.planning.trials import LEAK_TOLERANCE_BYTES
    return LEAK_TOLERANCE_BYTES["cuda" if device == "cuda" else "cpu"]


def baseline_summary(rows: list[dict], tolerance_bytes: int) -> tuple[bool | None, str]:
    """Did every trial give its memory back (within `tolerance_bytes`, run_trial's tolerance:
    see leak_tolerance; and no note of a leak)? None when the trial records carry no such figure."""
    figures = [(r, leaked_bytes(r)) for r in rows]
    keyed = [(r, b) for r, b in figures if b is not None]
    if not keyed:
        return None, "the trial records carry no baseline/leak figure (this autofit does not record it)"
    bad = [r for r, b in keyed if b > tolerance_bytes or "leak" in (r.get("note") or "").lower()]
    worst = max(b for _, b in keyed)
    tol = f"{tolerance_bytes / 2**20:g} MiB" if tolerance_bytes >= 2**20 else f"{tolerance_bytes / 2**10:g} KiB"
    return not bad, (f"{len(keyed)} trials carry baseline figures; {len(bad)} kept more than {tol} (run_trial's "
                     f"tolerance) or noted a leak; most left allocated {worst / 2**20:.1f} MiB")


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


def steady_steps(trains: dict[int, dict], events: list[dict]) -> tuple[list[dict], list[dict]]:
    """Stage 3's steady steps, (eager, compiled) train records by step: step 0 (warm-up) and every
    step with an event (it compiled, recompiled or redid work) left out. The report's roofline
    estimate takes the same steps as the measured tokens/s, so the two compare like with like."""
    busy = {e["step"] for e in events}
    steady = [r for s, r in sorted(trains.items()) if s not in busy]
    return ([r for r in steady if not r.get("compiled") and r["step"] > 0],
            [r for r in steady if r.get("compiled")])


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


GPT2_VOCAB = 50304  # GPT-2's 50257 tokens padded to a multiple of 64, as nanoGPT trains it
GPT2_124M = (120e6, 130e6)  # parameters of GPT-2 "124M" at that vocab (tied head counted once)


def param_count(cfg: dict) -> int:
    """Parameters of the nanoGPT GPT a config describes (tied token embedding / LM head once):
    V·C + T·C + L·(12·C² + 2 LayerNorms) + ln_f, with biases (9·C + 2·C per block, C for ln_f)
    when `bias`. GPT-2 124M at V 50304: 124,373,760."""
    L, C, T, V = (int(cfg[k]) for k in ("n_layer", "n_embd", "block_size", "vocab_size"))
    b = bool(cfg.get("bias"))
    ln = 2 * C if b else C
    block = 12 * C * C + 2 * ln + (9 * C if b else 0)
    return V * C + T * C + L * block + ln


def model_plan(st, config_args: list[str]) -> dict | None:
    """What a GPU stage would train, read with `autofit config ... --json` from its own arguments
    (no GPU needed): vocab, shape and parameter count, checked to be GPT-2 124M at vocab 50304
    (the seed case's logits head is the term that runs out of memory; a dataset's byte vocabulary
    would hide it)."""
    args = [a for a in config_args if a not in ("--device", "cuda")]
    cfg, res = cli_json(["config", *args, "--json"])
    if cfg is None:
        st.check("the GPU run's model read with autofit config", False, f"rc {res['rc']}: {res['stderr_tail'][-300:]}")
        return None
    plan = {k: cfg.get(k) for k in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "bias", "batch_size",
                                    "gradient_accumulation_steps", "dtype", "dataset")}
    plan["parameters"] = n = param_count(cfg)
    st.set(gpu_model=plan)
    st.check(f"the GPU run trains GPT-2 124M at vocab {GPT2_VOCAB}",
             cfg.get("vocab_size") == GPT2_VOCAB and GPT2_124M[0] <= n <= GPT2_124M[1],
             f"{n / 1e6:.1f}M parameters, vocab {cfg.get('vocab_size')}, {cfg.get('n_layer')} layers x "
             f"{cfg.get('n_embd')}, block {cfg.get('block_size')}")
    return plan
