"""Stage 4 of the GPU self-check: 2 ranks on one machine, where it has several GPUs (skipped with
the reason on one). `autofit run --nproc-per-node 2` starts torchrun; the ranks probe and agree on
one plan, train it with DDP, and an OOM injected on rank 1 only (AUTOFIT_FAULT_OOM_AT_STEP=3@1)
must be recovered by both, the effective batch unchanged. Writes OUT/stage4_ranks.json.

    python scripts/selfcheck/stage4_ranks.py OUT WORK [--dry-run]

The dry run starts the same 2 ranks on the CPU (gloo), each its own budgeted CPU device with a
different budget (AUTOFIT_RANK_BUDGETS), so the plan must be the smaller rank's.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DRY_MODEL, Stage, read_jsonl, run_cli, share_of, stage_args  # noqa: E402

OOM_AT, STEPS = 3, 8
GPU_CONFIG = ["--device", "cuda", *DRY_MODEL, "--set", "dtype=bfloat16"]
DRY_CONFIG = ["--device", "cpu", *DRY_MODEL, "--set", "dtype=float32"]
DRY_BUDGETS_MIB = (32, 24)
SHORT_PROBE = ["--no-compile", "--checkpointing", "0", "--loss", "standard"]


def gpu_count() -> tuple[int, str]:
    """GPUs NVML sees, and how that was found (NVML makes no CUDA context)."""
    try:
        import pynvml
        pynvml.nvmlInit()
    except Exception as e:  # noqa: BLE001 - no NVML: nothing to count; the skip says so
        return 0, f"NVML unavailable ({type(e).__name__})"
    try:
        return int(pynvml.nvmlDeviceGetCount()), "NVML device count"
    finally:
        pynvml.nvmlShutdown()


def judge(st: Stage, recs: list[dict], budgets_mib: tuple[int, ...] | None) -> None:
    run = next((r for r in recs if r.get("type") == "run"), {})
    trains = {r["step"]: r for r in recs if r.get("type") == "train"}
    events = [r for r in recs if r.get("type") == "event"]
    plan = run.get("plan") or {}
    st.set(plan={k: plan.get(k) for k in ("world_size", "parallelism", "micro_batch", "micro_batches",
                                          "budget_bytes", "measured_peak_bytes", "tokens_per_s")}, events=events)
    st.check("one plan for 2 ranks", plan.get("world_size") == 2 and run.get("world_size") == 2,
             f"plan world_size {plan.get('world_size')}, parallelism {plan.get('parallelism')}")
    if budgets_mib:  # the dry run: the plan fits the smaller rank's budget (less the 10% margin)
        smaller = int(min(budgets_mib) * 2**20 * 0.9)
        st.check("the plan is the smaller rank's", plan.get("budget_bytes") == smaller
                 and (plan.get("measured_peak_bytes") or 0) <= smaller,
                 f"budget {plan.get('budget_bytes')} (smaller rank's: {smaller}), peak {plan.get('measured_peak_bytes')}")
    st.check(f"all {STEPS} optimizer steps finished", sorted(trains) == list(range(STEPS)), f"steps {sorted(trains)}")
    shrink = [e for e in events if e.get("event") == "oom_shrink" and e.get("step") == OOM_AT]
    st.check(f"OOM on rank 1 only at step {OOM_AT} recovered by both ranks",
             bool(shrink) and "rank 1" in shrink[0].get("reason", "") and shrink[0].get("injected") is True,
             "; ".join(f"{e['old_micro_batch']} -> {e['new_micro_batch']} ({e['reason']})" for e in shrink)
             or "no oom_shrink event")
    eff = {r.get("effective_batch") for r in trains.values()}
    st.check("effective batch unchanged", len(eff) == 1 and eff == {run.get("effective_batch")}, f"{sorted(eff, key=str)}")
    st.check("losses finite", bool(trains) and all(math.isfinite(r.get("loss", math.nan)) for r in trains.values()),
             f"first {trains[min(trains)]['loss']:.3f}, last {trains[max(trains)]['loss']:.3f}" if trains else "no steps")
    st.set(figures={"tokens_per_s_median": sorted(r["tokens_per_s"] for r in trains.values() if r.get("tokens_per_s"))
                    [len(trains) // 2] if trains else None,
                    "how": "measured: rank 0's step wall time x 2 ranks' tokens (metrics.jsonl)"})


def main() -> int:
    a = stage_args(work=True)
    st = Stage(a.out, 4, "ranks", a.dry_run)
    env = {"AUTOFIT_FAULT_OOM_AT_STEP": f"{OOM_AT}@1", "AUTOFIT_DIST_TIMEOUT": "120"}
    budgets = None
    if a.dry_run:
        budgets = DRY_BUDGETS_MIB
        env["AUTOFIT_RANK_BUDGETS"] = ",".join(f"{b}MiB" for b in budgets)
        config = DRY_CONFIG
        st.skip("2 ranks on 2 GPUs (NCCL)", "dry run: 2 gloo ranks on the CPU, each its own budgeted device")
    else:
        n, how = gpu_count()
        st.set(gpus=n, gpus_how=how)
        if n < 2:
            st.skip("2 ranks on 2 GPUs (NCCL)", f"{n} GPU here ({how}): several ranks need several GPUs")
            return st.finish()
        config = GPU_CONFIG
    out = a.work / "stage4-run"
    res = run_cli(["run", "--nproc-per-node", "2", "--no-progress", "--out", str(out), *config, *SHORT_PROBE,
                   "--set", f"max_iters={STEPS}", "--set", f"lr_decay_iters={STEPS}", "--set", "warmup_iters=1",
                   "--set", "log_interval=1"], env=env, timeout=share_of(a.limit))
    st.set(run=res | {"stdout": res["stdout"][-3000:]})
    st.check("2-rank run exited 0", res["rc"] == 0 and not res["timed_out"], f"rc {res['rc']}"
             + (" (stopped: past its share of the stage's time)" if res["timed_out"] else "")
             + (f": {res['stderr_tail'][-400:]}" if res["rc"] else ""))
    recs = read_jsonl(out / "metrics.jsonl")
    if not recs:
        st.check("metrics written", False, f"nothing in {out / 'metrics.jsonl'}")
        return st.finish()
    judge(st, recs, budgets)
    return st.finish()


if __name__ == "__main__":
    sys.exit(main())
