"""Stage 3 of the GPU self-check: GPT-2 124M (vocab 50304) trains on this card (its whole memory, no
emulation), eager for a few steps, then with torch.compile switched on; an OOM is injected while
eager (AUTOFIT_FAULT_OOM_AT_STEP) and must be recovered with the effective batch unchanged; tokens/s
and MFU are measured against the card's own dense peak (its built-in hardware profile).
Writes OUT/stage3_train.json after each step.

    python scripts/selfcheck/stage3_train.py OUT WORK [--dry-run]

The dry run trains the tiny preset on the plain CPU device (torch.compile cannot run under the
budgeted CPU device's tracker, and a run there says so instead of switching it on) with the same
schedule; Dynamo is disabled (TORCH_COMPILE_DISABLE=1) so the dry run stays short: the compile
switch, the injected OOM and its recovery run for real, the compiled kernels do not.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DRY_MODEL, Stage, follow_jsonl, read_jsonl, run_cli, share_of, stage_args  # noqa: E402
from figures import (find_card_profile, flops_per_token, median, mfu, model_plan, peak_for,  # noqa: E402
                     steady_steps)

# The OOM comes while eager, so the one cold compile (step 4) is at the shrunk micro-batch: an OOM
# after the switch would compile a second time (dynamic=False: a new shape), the largest cost of
# the stage. The compiled-OOM paths are tested on the CPU (tests/test_loop.py, compile window).
# Steps 2-3 (eager) and 5-9 (compiled) are steady, at the same micro-batch.
COMPILE_AFTER, OOM_AT, STEPS = 4, 1, 10
# GPT-2 124M at vocab 50304 (the embedded corpus's byte tokens are valid ids of it; see stage 2)
GPU_CONFIG = ["--device", "cuda", "--preset", "gpt2-124m", "--set", "dataset=embedded", "--set", "vocab_size=50304",
              "--set", "block_size=1024",
              "--set", "batch_size=16", "--set", "gradient_accumulation_steps=4", "--set", "dtype=bfloat16"]
DRY = {"compile_after": 3, "oom_at": 1, "steps": 8}  # the OOM while eager, as on the GPU
DRY_CONFIG = ["--device", "cpu", *DRY_MODEL]  # the plain CPU: compile can switch on there
RECOVERY_EVENTS = ("oom_shrink", "compile_oom_shrink", "compile_fallback_eager")


def schedule(compile_after: int, steps: int) -> list[str]:
    return ["--set", "compile=True", "--set", f"compile_after={compile_after}", "--set", f"max_iters={steps}",
            "--set", f"lr_decay_iters={steps}", "--set", "warmup_iters=1", "--set", "eval_interval=0",
            "--set", "log_interval=1"]


def card_identity() -> tuple[str, int] | None:
    """NVML name and total bytes of GPU 0 (NVML: this process makes no CUDA context)."""
    try:
        import pynvml
        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - no NVML: MFU is then not computed, and the record says why
        return None
    try:
        h = pynvml.nvmlDeviceGetHandleByIndex(0)
        name = pynvml.nvmlDeviceGetName(h)
        return (name.decode() if isinstance(name, bytes) else str(name)), int(pynvml.nvmlDeviceGetMemoryInfo(h).total)
    finally:
        pynvml.nvmlShutdown()


def this_run(records: list[dict]) -> list[dict]:
    starts = [i for i, r in enumerate(records) if r.get("type") == "run"]
    return records[starts[-1]:] if starts else []


def judge(st: Stage, recs: list[dict], compile_after: int, oom_at: int, steps: int) -> dict:
    """The checks on one run's metrics; returns the train records by step."""
    run = next((r for r in recs if r.get("type") == "run"), {})
    trains = {r["step"]: r for r in recs if r.get("type") == "train"}
    events = [r for r in recs if r.get("type") == "event"]
    st.set(events=events, run_record={k: run.get(k) for k in ("device", "dtype", "micro_batches", "effective_batch",
                                                              "block_size", "compile", "compile_after")})
    st.check(f"all {steps} optimizer steps finished", sorted(trains) == list(range(steps)),
             f"steps logged: {sorted(trains)}")
    on = [e["step"] for e in events if e.get("event") == "compile_on"]
    st.check(f"torch.compile switched on at step {compile_after}", on == [compile_after], f"compile_on at {on}")
    rec = [e for e in events if e.get("event") in RECOVERY_EVENTS and e.get("step") == oom_at]
    st.check(f"injected OOM at step {oom_at} recovered", bool(rec) and rec[0].get("injected") is True
             and oom_at in trains, "; ".join(f"{e['event']} {e.get('old_micro_batch', e.get('micro_batch'))} -> "
                                             f"{e.get('new_micro_batch', 'eager')}" for e in rec) or "no recovery event")
    eff = {r.get("effective_batch") for r in trains.values()}
    st.check("effective batch unchanged", len(eff) == 1 and eff == {run.get("effective_batch")},
             f"{sorted(eff, key=str)} (run: {run.get('effective_batch')})")
    compiled = [s for s, r in trains.items() if r.get("compiled")]
    st.check("steps after the switch ran compiled", bool(compiled) and min(compiled) == compile_after,
             f"compiled steps {compiled}")
    st.check("losses finite", all(math.isfinite(r.get("loss", math.nan)) for r in trains.values()),
             f"first {trains[min(trains)]['loss']:.3f}, last {trains[max(trains)]['loss']:.3f}" if trains else "no steps")
    return trains


def throughput(st: Stage, trains: dict, events: list[dict], cfg: dict, dtype: str, hw: dict | None, how: str) -> None:
    """Steady tokens/s eager and compiled (medians of measured step times), MFU, compile cost."""
    eager_steps, compiled_steps = steady_steps(trains, events)
    eager = [r["tokens_per_s"] for r in eager_steps]
    comp = [r["tokens_per_s"] for r in compiled_steps]
    flops, n, formula = flops_per_token(cfg)
    peak = peak_for(hw, dtype)
    steady = median([r["step_s"] for r in compiled_steps])
    first = [r["step_s"] for s, r in sorted(trains.items()) if r.get("compiled")][:1]
    fig = {"eager_tokens_per_s": median(eager), "compiled_tokens_per_s": median(comp),
           "eager_steps_used": len(eager), "compiled_steps_used": len(comp),
           "flops_per_token": flops, "matmul_params": n, "flops_formula": formula,
           "peak_tflops": peak, "peak_source": how, "dtype": dtype,
           "first_compiled_step_minus_steady_s": (first[0] - steady) if first and steady else None,
           "peak_mem_bytes_max": max((r.get("peak_mem_bytes") or 0 for r in trains.values()), default=None) or None,
           "how": "measured: tokens/s from each logged step's device time (metrics.jsonl; CUDA events around the "
                  "step, read after the GPU finished it), median over steady steps "
                  "(step 0 and steps with an event left out); MFU = tokens/s x FLOPs/token / card peak"}
    fig["eager_mfu"] = mfu(fig["eager_tokens_per_s"], flops, peak)
    fig["compiled_mfu"] = mfu(fig["compiled_tokens_per_s"], flops, peak)
    st.set(figures=fig)


def main() -> int:
    a = stage_args(work=True)
    st = Stage(a.out, 3, "train", a.dry_run)
    if a.dry_run:
        c, o, n, base, env = DRY["compile_after"], DRY["oom_at"], DRY["steps"], DRY_CONFIG, {"TORCH_COMPILE_DISABLE": "1"}
        st.skip("GPT-2 124M training on the GPU, compiled kernels", "dry run: the tiny preset trains on the plain "
                "CPU device with Dynamo disabled (TORCH_COMPILE_DISABLE=1)")
        model_plan(st, GPU_CONFIG)  # what the GPU run would train, read from its own arguments
    else:
        c, o, n, base, env = COMPILE_AFTER, OOM_AT, STEPS, GPU_CONFIG, {}
    out = a.work / "stage3-run"
    res = run_cli(["run", "--no-probe", "--no-progress", "--out", str(out), *base, *schedule(c, n)],
                  env={**env, "AUTOFIT_FAULT_OOM_AT_STEP": str(o)}, timeout=share_of(a.limit),
                  follow=follow_jsonl(st, out / "metrics.jsonl", "raw_metrics"))
    st.set(run=res | {"stdout": res["stdout"][-3000:]}, schedule={"compile_after": c, "oom_at": o, "steps": n})
    st.check("training run exited 0", res["rc"] == 0 and not res["timed_out"], f"rc {res['rc']}"
             + (" (stopped: past its share of the stage's time)" if res["timed_out"] else "")
             + (f": {res['stderr_tail'][-400:]}" if res["rc"] else ""))
    recs = this_run(read_jsonl(out / "metrics.jsonl"))
    if not recs:
        st.check("metrics written", False, f"no run record in {out / 'metrics.jsonl'}")
        return st.finish()
    trains = judge(st, recs, c, o, n)
    run = recs[0]
    hw, how = (None, "dry run: a CPU has no hardware profile with a tensor peak")
    ident = None if a.dry_run else card_identity()
    if ident:
        st.set(card={"name": ident[0], "total_bytes": ident[1]})  # the report's roofline, where stage 1 did not run
        hw, how = find_card_profile(*ident)
    elif not a.dry_run:
        how = "NVML could not name the card"
    throughput(st, trains, [r for r in recs if r.get("type") == "event"], run["config"], run.get("dtype", ""), hw, how)
    return st.finish()


if __name__ == "__main__":
    sys.exit(main())
