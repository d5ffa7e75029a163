"""Summarises a GPU self-check run (see gpu_selfcheck.sh): estimated vs measured peak per trial,
the plan, tokens/s and MFU against this card's own peak, and whether all steps finished."""
import json
import sys
from pathlib import Path

import torch

from autofit.devices import detect_gpu
from autofit.estimate import ModelShape, param_count
from autofit.hardware import load_builtin, slug_for
from autofit.profiles import load_profile
from autofit.units import fmt_bytes


def main(out: Path, tests_rc: int, run_rc: int) -> int:
    metrics = out / "run" / "metrics.jsonl"
    recs = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    if not any(r["type"] == "run" for r in recs):
        (out / "selfcheck.json").write_text(json.dumps({"cuda_tests_rc": tests_rc, "run_rc": run_rc,
                                                        "steps_finished": 0, "error": "the run never trained"}))
        print(f"cuda tests exit {tests_rc}; run exit {run_rc}; the run never trained (see {out / 'run.log'})")
        return 1
    last = max(i for i, r in enumerate(recs) if r["type"] == "run")  # this run only
    recs = recs[last:]
    run = recs[0]
    trains = [r for r in recs if r["type"] == "train"]
    events = [r for r in recs if r["type"] == "event"]
    prof = load_profile("rtx4070-12gb")
    fp = (run.get("plan") or {}).get("fingerprint")
    fitted = prof.plans.get(fp) if prof and fp else None
    info = detect_gpu(0)
    here = load_builtin().get(slug_for(info.name, info.total_bytes))
    cfg = run["config"]
    n = param_count(ModelShape.from_config(type("C", (), cfg)))
    flops_per_token = 6 * n + 12 * cfg["n_layer"] * cfg["n_embd"] * cfg["block_size"]
    steady = [r["tokens_per_s"] for r in trains if r["step"] >= 45 and r["tokens_per_s"]]
    tps = sum(steady) / len(steady) if steady else None
    peak_tflops = here.peak_bf16_tflops if here else None
    mfu = tps * flops_per_token / (peak_tflops * 1e12) if tps and peak_tflops else None
    summary = {
        "gpu": info.name, "driver": info.driver_version, "torch": torch.__version__,
        "cuda_tests_rc": tests_rc, "run_rc": run_rc,
        "trials": [t.model_dump(mode="json") for t in (fitted.trials if fitted else [])],
        "plan": fitted.plan.model_dump(mode="json") if fitted else None,
        "steps_finished": len(trains), "steps_expected": 60,
        "events": events, "steady_tokens_per_s": tps, "flops_per_token": flops_per_token,
        "card_peak_bf16_tflops": peak_tflops, "mfu": mfu,
        "peak_mem_bytes_max": max((r["peak_mem_bytes"] or 0) for r in trains) if trains else None,
    }
    (out / "selfcheck.json").write_text(json.dumps(summary, indent=2))
    print(f"GPU {info.name}, driver {info.driver_version}, torch {torch.__version__}")
    print(f"cuda tests exit {tests_rc}; run exit {run_rc}")
    print(f"{'micro':>5} {'dtype':>8} {'comp':>4} {'ckpt':>4} {'loss':>8} {'estimated':>11} {'measured':>11} {'err':>7} {'tok/s':>9} status")
    for t in summary["trials"]:
        e, m = t.get("estimated_peak_bytes"), t.get("measured_peak_bytes")
        err = f"{(e - m) / m:+.1%}" if e and m else "-"
        print(f"{t['micro_batch']:>5} {t['dtype']:>8} {str(t['compile'])[0]:>4} {t['checkpointing']:>4} "
              f"{t['loss_impl']:>8} {fmt_bytes(e) if e else '-':>11} {fmt_bytes(m) if m else '-':>11} {err:>7} "
              f"{t['tokens_per_s'] or 0:>9,.0f} {t['status']}")
    if fitted:
        p = fitted.plan
        print(f"plan: {p.split}, {p.dtype}, compile {p.compile} after {p.compile_after}, ckpt {p.checkpointing}, "
              f"loss {p.loss_impl}, measured peak {fmt_bytes(p.measured_peak_bytes or 0)} of {fmt_bytes(p.budget_bytes)}")
    print(f"events: {[(e['step'], e['event']) for e in events]}")
    print(f"steady tokens/s (steps 45+, measured): {tps:,.0f}" if tps else "steady tokens/s: n/a")
    print(f"MFU vs this card's dense bf16 peak {peak_tflops} TFLOP/s: {mfu:.1%}" if mfu else "MFU: n/a")
    compile_on = [e["step"] for e in events if e["event"] == "compile_on"]
    oom = [e for e in events if e["event"] in ("oom_shrink", "compile_oom_shrink", "compile_fallback_eager")]
    effective = {r["effective_batch"] for r in trains}
    checks = {
        "compile switched on at step 30": compile_on == [30],
        "OOM injected at step 40 recovered": any(e["step"] == 40 for e in oom),
        "effective batch unchanged (512)": effective == {512},
        "all 60 steps finished": len(trains) == 60,
    }
    summary["checks"] = checks
    (out / "selfcheck.json").write_text(json.dumps(summary, indent=2))
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    print(f"finished {len(trains)} of 60 steps")
    return 0 if tests_rc == 0 and run_rc == 0 and all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])))
