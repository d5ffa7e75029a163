"""Stage 2 of the GPU self-check: the probe of GPT-2 124M (vocab 50304) at the seed config's batch
shape (block 1024, 16 x 32 sequences, bf16, as the rtx4070-seed preset) on this card emulating an
rtx4070-12gb, and each trial's estimated vs measured peak and its return to baseline.
Writes OUT/stage2_probe.json after each step.

    python scripts/selfcheck/stage2_probe.py OUT WORK [--dry-run]

`autofit probe` has no --profile/--emulate, so the emulated probe goes through
`autofit run --profile rtx4070-12gb --emulate --max-steps 1` (probe, save the plan, train one
step: a run with no step to train is refused before its probe), and its trials are read back with `autofit profiles show rtx4070-12gb --json`. Only eager
candidates are probed (--no-compile): a compiled trial of this model costs a cold compile each,
which stage 3 measures once. The dry run probes the tiny preset on the budgeted CPU device
(`autofit probe --device cpu --budget ... --save --json`) and reads its profile the same way.

Each trial's full record reaches OUT/stage2_trials.jsonl as the trial ends (autofit's
AUTOFIT_TRIALS_JSONL: the probe appends it itself), so a stage killed at its limit, before the
profile is saved, still leaves every finished trial's record; the report reads them then.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (DRY_MODEL, Stage, both, cli_json, follow_jsonl, follow_lines, read_jsonl, run_cli,  # noqa: E402
                    share_of, stage_args)
from figures import baseline_summary, leak_tolerance, model_plan, trial_rows  # noqa: E402

EMULATED = "rtx4070-12gb"
# GPT-2 124M at the rtx4070-seed preset's batch shape: 16 x 32 sequences of 1024 tokens, bf16. The
# embedded corpus is bytes (its meta says vocab 256), so vocab_size is set: the 50304-wide head is
# the seed case's problem; the byte tokens are valid ids of it (synthetic data is enough here).
GPU_CONFIG = ["--preset", "gpt2-124m", "--set", "dataset=embedded", "--set", "vocab_size=50304", "--set", "block_size=1024",
              "--set", "batch_size=16", "--set", "gradient_accumulation_steps=32", "--set", "dtype=bfloat16",
              "--set", "eval_interval=0"]
DRY_BUDGET = "32MiB"
TRIAL_LINES = ("trial:", "  -> ")  # the probe's own line per trial and its outcome, as printed
TRIALS_FILE = "stage2_trials.jsonl"  # in OUT: one line per finished trial, appended by the probe itself


def trials_env(out: Path) -> dict[str, str]:
    """The probe's environment: autofit appends each trial's record to OUT/stage2_trials.jsonl."""
    return {"AUTOFIT_TRIALS_JSONL": str(out / TRIALS_FILE)}


def fit_on_gpu(st: Stage, work: Path, timeout: float | None) -> tuple[str | None, str | None]:
    """Probe under emulation and save the plan; returns (profile name, plan fingerprint or None).
    The profile is read back even when the run failed after the probe had saved it."""
    out = work / "stage2-run"
    res = run_cli(["run", "--profile", EMULATED, "--emulate", "--max-steps", "1", "--no-progress",
                   "--no-compile", "--checkpointing", "0", "--out", str(out), *GPU_CONFIG], timeout=timeout,
                  env=trials_env(st.path.parent),
                  follow=both(follow_jsonl(st, out / "metrics.jsonl", "raw_metrics"),
                              follow_lines(st, "raw_trial_lines", TRIAL_LINES)))
    st.set(fit=res | {"stdout": res["stdout"][-2000:]})
    runs = [r for r in read_jsonl(out / "metrics.jsonl") if r.get("type") == "run"]
    plan = (runs[-1].get("plan") or {}) if runs else {}
    st.set(run_plan_info={k: plan.get(k) for k in ("source", "profile", "fingerprint", "emulated_on", "budget_bytes",
                                                   "fit_sizes", "description", "allocator_state")})
    state = plan.get("allocator_state") or {}
    if "expandable_segments:true" in str(state.get("settings", "")).replace(" ", "").lower():
        st.check("autofit's run has expandable segments really on", state.get("expandable_segments"),
                 f"{state} (the allocator's own segments, read in the run)")
    st.check("probe under emulation ran and saved a plan", res["rc"] == 0 and bool(plan),
             f"rc {res['rc']}" + (" (stopped: past its share of the stage's time)" if res["timed_out"] else "")
             + (f": {res['stderr_tail'][-400:]}" if res["rc"] else ""))
    return EMULATED, plan.get("fingerprint")


def fit_on_cpu(st: Stage, timeout: float | None) -> tuple[str | None, str | None]:
    data, res = cli_json(["probe", "--device", "cpu", "--budget", DRY_BUDGET, "--save", "--json",
                           "--checkpointing", "0", *DRY_MODEL], timeout=timeout, env=trials_env(st.path.parent),
                         follow=follow_lines(st, "raw_trial_lines", TRIAL_LINES))
    st.set(fit=res, probe_device=(data or {}).get("device"), budget=(data or {}).get("budget"))
    saved = (data or {}).get("saved") or {}
    if not st.check("probe on the budgeted CPU ran and saved a plan", bool(saved),
                    f"rc {res['rc']}" + (f": {res['stderr_tail'][-400:]}" if res["rc"] else "")):
        return None, None
    return saved["profile"], saved["fingerprint"]


def read_fitted(st: Stage, profile: str, fingerprint: str | None) -> dict | None:
    """The fitted plan (plan + trials) from the saved profile, by fingerprint (or the only one)."""
    data, res = cli_json(["profiles", "show", profile, "--json"])
    plans = (data or {}).get("plans") or {}
    fitted = plans.get(fingerprint) if fingerprint else None
    if fitted is None and len(plans) == 1:
        fitted = next(iter(plans.values()))
    st.check(f"fitted plan read back from profile {profile}", fitted is not None,
             f"{len(plans)} plan(s) in the profile" + (f"; rc {res['rc']}: {res['stderr_tail'][-300:]}" if res["rc"] else ""))
    if data:
        st.set(hardware=data.get("hardware"))
    return fitted


def estimate_slack(device: str) -> float:
    """The allocator slack in autofit's CUDA estimate (0 on the CPU): figures.trial_rows takes it
    off to compare allocated with allocated. Recorded in the stage's JSON for the report."""
    from autofit.planning.estimate import CUDA_ALLOCATOR_SLACK
    return CUDA_ALLOCATOR_SLACK if device == "cuda" else 0.0


def judge(st: Stage, fitted: dict, device: str) -> None:
    """The checks on the fitted plan's trials; `device` 'cuda' or 'cpu' (what they ran on). A
    probe stopped before it saved its profile: `fitted` holds the trials of OUT/stage2_trials.jsonl
    and no plan."""
    rows = trial_rows(fitted.get("trials") or [], slack=estimate_slack(device))
    st.set(trials=rows, plan=fitted.get("plan"), config_summary=fitted.get("config_summary"),
           fingerprint_inputs=fitted.get("fingerprint_inputs"))
    measured = [r for r in rows if r["measured_peak_bytes"]]
    st.check("trials measured a peak", bool(measured),
             f"{len(measured)} of {len(rows)} trials measured ({', '.join(sorted({r['status'] for r in rows}))})")
    errs = [abs(r["estimate_error"]) for r in rows if r["estimate_error"] is not None and r["status"] == "fit"]
    if errs:
        worst = max(errs)
        # a figure to record, not a gate: the estimator is judged by these numbers in the report
        st.set(estimate_error_max=worst, estimate_error_median=sorted(errs)[len(errs) // 2],
               estimate_error_n=len(errs), estimate_error_how="allocated estimate (less the allocator slack) "
               "against the allocated peak; reserved_estimate_error: the full estimate against the reserved peak")
    ok, detail = baseline_summary(rows, leak_tolerance(device))
    st.check("every trial returned to its memory baseline", ok, detail)
    if fitted.get("plan") is None:
        return
    plan = fitted.get("plan") or {}
    st.check("plan keeps the effective batch", plan.get("effective_batch") == sum(plan.get("micro_batches") or [0]),
             f"{plan.get('split')}, {plan.get('mode')} peak {plan.get('measured_peak_bytes')} B "
             f"of a {plan.get('budget_bytes')} B budget")


def main() -> int:
    a = stage_args(work=True)
    st = Stage(a.out, 2, "probe", a.dry_run)
    device = "cpu" if a.dry_run else "cuda"
    st.set(trials_file=TRIALS_FILE, estimate_slack=estimate_slack(device))
    if a.dry_run:
        st.skip(f"probe of GPT-2 124M emulating {EMULATED}", "dry run: needs a CUDA GPU; the tiny preset is "
                f"probed on the budgeted CPU device ({DRY_BUDGET}) instead")
        model_plan(st, GPU_CONFIG)  # what the GPU run would probe, read from its own arguments
        profile, fp = fit_on_cpu(st, share_of(a.limit))
    else:
        profile, fp = fit_on_gpu(st, a.work, share_of(a.limit))
    fitted = read_fitted(st, profile, fp) if profile else None
    if fitted is None and (finished := read_jsonl(a.out / TRIALS_FILE)):  # the probe stopped before saving
        st.set(trials_from=f"{TRIALS_FILE}: the probe stopped before it saved its profile")
        fitted = {"trials": finished, "plan": None}
    if fitted is not None:
        judge(st, fitted, device)
    return st.finish()


if __name__ == "__main__":
    sys.exit(main())
