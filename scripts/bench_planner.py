"""Benchmark: autofit's micro-batch search (autofit.planning.planner.probe_measured) against the two
search strategies of the common autotuners, on the budgeted CPU device.

- ours: probe_measured with the planner's default TrialSettings() (2 optimizer steps per trial
  since commit 896c24a), restricted to the config's own levers (float32, eager, no
  checkpointing, standard loss) so that all methods search the same one-dimensional space.
  probe_measured lowers the budgeted CPU device's limit to the planning budget while it
  probes, so an over-budget size raises OOM in its first step.
- lightning: Lightning's `binsearch` mode: start at micro-batch 2, double until a trial fails,
  then bisect between the last success and the failure. Capped at the effective batch, as ours
  is. Run twice:
    * "lightning": its defaults, 3 optimizer steps per trial (steps_per_trial=3), the device
      budget as the hard limit, so an over-budget size runs all its steps before its measured
      peak fails it;
    * "lightning, our trial": the same search with exactly our trial (2 steps, the limit lowered
      to the planning budget). This isolates the search strategy from the trial's cost.
- accelerate: Accelerate's find_executable_batch_size: start at max(128, effective batch) and
  shrink x0.9 (int(m * 0.9)) after each failure until a size fits. Accelerate runs the user's
  real training at each size and stops at the first that does not raise; here each attempt is
  one trial of 3 optimizer steps.

Cases. Accurate: the device budget is set from the closed-form estimate, which is within 0.1%
of the measured peak on CPU, so ours starts at the answer; this flatters ours. Estimate wrong:
(a) dropout > 0, whose allowance in the estimator is uncalibrated (the measured answer is what
counts); (b) simulated mis-estimates: `autofit.planning.search.max_micro_batch` is monkeypatched for
the case to return x2, x4 or x0.5 of the true estimate, standing in for an estimator that is
wrong on some device (e.g. a GPU whose allocator behaves unlike the model). A mis-estimate
case has the same config and budget as its base case, and the baselines do not use the
estimate, so their (deterministic) results are those of the base case and are not re-run.

Every method runs the same trial function (autofit.planning.trials.run_trial: the trainer's own train
step, two micro-batches per step when the batch accumulates) on the same device. A trial fails
when it raises OOM (over the device's limit) or when its measured peak is over the planning
budget = compute_budget(cpu_info(device budget), margin).

Counting: "trials" are trials that ran (ours: records whose status is not 'pruned');
"steps" are optimizer steps started (a trial that runs out of memory in step k started k steps,
completed k-1); "largest fit" is the largest micro-batch the method confirmed to fit; "plan mb"
is what the method would train with (ours: plan.micro_batch, the fastest measured size, which
may be a divisor of the batch below the largest fit; the baselines: their largest fit).

    .venv/bin/python scripts/bench_planner.py [--json] [--quick]
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import autofit.planning.search as search_mod  # noqa: E402
from autofit.planning.budget import compute_budget  # noqa: E402
from autofit.devices.cpu_budget import BudgetedCpuDevice  # noqa: E402
from autofit.devices.cpu import cpu_info  # noqa: E402
from autofit.planning.estimate import ModelShape, estimate_peak, max_micro_batch  # noqa: E402
from autofit.planning.candidates import Space  # noqa: E402
from autofit.planning.planner import probe_measured  # noqa: E402
from autofit.records import Candidate, TrialRecord  # noqa: E402
from autofit.planning.trials import TrialSettings, run_trial  # noqa: E402
from autofit.units import fmt_bytes  # noqa: E402
from trainer.config.train_config import load_config  # noqa: E402

MARGIN = 0.10
EFFECTIVE_BATCH = 64  # batch_size 16 x gradient_accumulation_steps 4
BASELINE_STEPS = 3  # Lightning's steps_per_trial default
ACCELERATE_START = 128  # Accelerate's starting_batch_size default


@dataclass(frozen=True)
class Case:
    name: str
    overrides: tuple[str, ...]
    target_micro: int  # the device budget is set from the estimate so that about this size fits
    kind: str = "accurate"  # 'accurate' | 'mis-estimate'
    estimate_factor: float = 1.0  # mis-estimate: the planner's estimate is this times the true one
    base: str | None = None  # mis-estimate: the case with the same config and budget

    def config(self):
        return load_config(preset="tiny", overrides=list(self.overrides) + [
            "batch_size=16", "gradient_accumulation_steps=4", "dtype=float32", "compile=false"])


L2 = ("n_layer=2", "n_head=2", "n_embd=64", "block_size=64")
L1_HEAD = ("n_layer=1", "n_head=2", "n_embd=64", "block_size=64", "vocab_size=2048")

# Small models whose largest fitting micro-batch, under the budget chosen below, lies between 5
# and 40 of an effective batch of 64. Shallow on purpose: on the budgeted CPU device a trial's
# time is mostly per-op dispatch overhead, so depth (ops per step) sets the benchmark's run time.
CASES = [
    Case("L2 C64 T64 V256", L2, 24),
    Case("L1 C64 T64 V2048 (head-heavy)", L1_HEAD, 8),
    Case("L3 C96 T32 V512", ("n_layer=3", "n_head=3", "n_embd=96", "block_size=32", "vocab_size=512"), 18),
    Case("tiny preset L4 C128 T128 V256", (), 12),
    # Dropout: the estimator's dropout terms are fitted on this device (docs/estimator.md); the
    # budget is set from the estimate, so any error in them would show here.
    Case("L2 C64 T64 V256 dropout 0.1", L2 + ("dropout=0.1",), 24),
    # Simulated mis-estimates: same config and budget as the base case, the planner's estimate
    # scaled. Stands in for an estimator that is wrong on some device.
    Case("L2 C64 T64 V256, estimate x2", L2, 24, "mis-estimate", 2.0, "L2 C64 T64 V256"),
    Case("L2 C64 T64 V256, estimate x0.5", L2, 24, "mis-estimate", 0.5, "L2 C64 T64 V256"),
    Case("L1 head-heavy, estimate x4", L1_HEAD, 8, "mis-estimate", 4.0, "L1 C64 T64 V2048 (head-heavy)"),
    Case("tiny preset, estimate x2", (), 12, "mis-estimate", 2.0, "tiny preset L4 C128 T128 V256"),
    Case("tiny preset, estimate x0.5", (), 12, "mis-estimate", 0.5, "tiny preset L4 C128 T128 V256"),
]
QUICK_CASES = [CASES[0], CASES[4], CASES[5], CASES[6]]

OURS = "ours"
LIGHTNING = "lightning"
LIGHTNING_SAME = "lightning, our trial"
ACCELERATE = "accelerate"


def device_budget_for(cfg, target: int) -> int:
    """A round device budget (whole MiB) whose planning budget, (1 - margin) of it, sits halfway
    between the estimated peaks of `target` and `target + 1` micro-batches. Set from the estimate,
    so the measured largest fit may differ from `target` by the estimate's error."""
    shape = ModelShape.from_config(cfg)
    est = lambda m: estimate_peak(shape, m, dtype="float32", checkpointing=0, loss_impl="standard",
                                  device="cpu", ce_chunk_size=cfg.ce_chunk_size,
                                  n_micro=2 if m < cfg.effective_batch else 1).peak_bytes
    planning = (est(target) + est(target + 1)) / 2
    return int(round(planning / (1.0 - MARGIN) / 2**20)) * 2**20


def estimate_start(cfg, planning_bytes: int) -> int:
    """The micro-batch the planner starts at (the true estimate, before any simulated error)."""
    m = max_micro_batch(ModelShape.from_config(cfg), planning_bytes, dtype="float32", checkpointing=0,
                        loss_impl="standard", compile=False, device="cpu", ce_chunk_size=cfg.ce_chunk_size)
    return min(max(m, 1), cfg.effective_batch)


@contextlib.contextmanager
def misestimate(factor: float):
    """Make the planner's estimate `factor` times the true one (simulated estimator error)."""
    if factor == 1.0:
        yield
        return
    orig = search_mod.max_micro_batch
    search_mod.max_micro_batch = lambda *a, **k: max(1, int(round(orig(*a, **k) * factor)))
    try:
        yield
    finally:
        search_mod.max_micro_batch = orig


@dataclass
class MethodResult:
    method: str
    steps_per_trial: int
    trials: int
    steps_started: int
    steps_completed: int
    seconds: float
    largest_fit: int
    plan_micro_batch: int
    ooms: int
    over_budget: int
    sizes: list[str] = field(default_factory=list)  # "size:status" in the order they ran
    reused_from: str | None = None  # baselines of a mis-estimate case: the base case's run


def steps_started(r: TrialRecord, steps: int) -> int:
    # A trial that raised started one step more than it completed (unless it raised after the last).
    return r.steps_run + (1 if r.status in ("oom", "error") and r.steps_run < steps else 0)


def summarize(method: str, trials: list[TrialRecord], steps: int, seconds: float, plan_mb: int) -> MethodResult:
    ran = [t for t in trials if t.status != "pruned"]
    fits = [t.micro_batch for t in ran if t.status == "fit"]
    return MethodResult(method=method, steps_per_trial=steps, trials=len(ran),
                        steps_started=sum(steps_started(t, steps) for t in ran),
                        steps_completed=sum(t.steps_run for t in ran), seconds=seconds,
                        largest_fit=max(fits, default=0), plan_micro_batch=plan_mb,
                        ooms=sum(t.status == "oom" for t in ran), over_budget=sum(t.status == "over_budget" for t in ran),
                        sizes=[f"{t.micro_batch}:{t.status}" for t in ran])


class Trialer:
    """The baselines' trial: run_trial with the same rank batch and planning budget as the planner's."""

    def __init__(self, cfg, device, budget_bytes: int, steps: int):
        self.cfg, self.device, self.budget_bytes = cfg, device, budget_bytes
        self.settings = TrialSettings(steps=steps, seed=cfg.seed)
        self.trials: list[TrialRecord] = []

    def fits(self, m: int) -> bool:
        cand = Candidate(micro_batch=m, dtype="float32", compile=False, checkpointing=0, loss_impl="standard")
        r = run_trial(self.cfg, cand, self.device, rank_batch=self.cfg.effective_batch,
                      budget_bytes=self.budget_bytes, settings=self.settings)
        self.trials.append(r)
        return r.status == "fit"  # oom and over_budget are both failures


def run_ours(cfg, device_budget: int, factor: float = 1.0) -> MethodResult:
    device = BudgetedCpuDevice(budget_bytes=device_budget)
    budget = compute_budget(cpu_info(device_budget), MARGIN)
    space = Space(dtypes=["float32"], compile=[False], checkpointing=[0], loss_impls=["standard"])
    settings = TrialSettings(seed=cfg.seed)  # the planner's default number of steps
    t0 = time.perf_counter()
    with misestimate(factor):
        res = probe_measured(cfg, device, budget, space, settings=settings)
    return summarize(OURS, res.trials, settings.steps, time.perf_counter() - t0, res.plan.micro_batch)


def run_lightning(cfg, device_budget: int, same_trial: bool = False) -> MethodResult:
    budget = compute_budget(cpu_info(device_budget), MARGIN)
    # our trial: the device's limit lowered to the planning budget, as probe_measured does
    device = BudgetedCpuDevice(budget_bytes=budget.budget_bytes if same_trial else device_budget)
    steps = TrialSettings().steps if same_trial else BASELINE_STEPS
    tr = Trialer(cfg, device, budget.budget_bytes, steps)
    E = cfg.effective_batch
    t0 = time.perf_counter()
    lo, hi, m = 0, None, 2
    while True:  # power phase
        if tr.fits(m):
            lo = m
            if m >= E:
                break
            m = min(2 * m, E)
        else:
            hi = m
            break
    while hi is not None and hi - lo > 1:  # binsearch phase (if 2 failed: over [0, 2))
        mid = (lo + hi) // 2
        if mid == 0:
            break
        if tr.fits(mid):
            lo = mid
        else:
            hi = mid
    return summarize(LIGHTNING_SAME if same_trial else LIGHTNING, tr.trials, steps, time.perf_counter() - t0, lo)


def run_accelerate(cfg, device_budget: int) -> MethodResult:
    device = BudgetedCpuDevice(budget_bytes=device_budget)
    budget = compute_budget(cpu_info(device_budget), MARGIN)
    tr = Trialer(cfg, device, budget.budget_bytes, BASELINE_STEPS)
    m = max(ACCELERATE_START, cfg.effective_batch)
    t0 = time.perf_counter()
    found = 0
    while m >= 1:
        if tr.fits(m):
            found = m
            break
        m = int(m * 0.9)
    return summarize(ACCELERATE, tr.trials, BASELINE_STEPS, time.perf_counter() - t0, found)


def fmt_result(r: MethodResult) -> str:
    return (f"{r.method} ({r.steps_per_trial} steps/trial): {r.trials} trials, {r.steps_started} steps, "
            f"{r.seconds:.1f} s, largest fit {r.largest_fit}, plan {r.plan_micro_batch}"
            + (f" (= {r.reused_from})" if r.reused_from else "") + f"  [{' '.join(r.sizes)}]")


def run_case(case: Case, log, done: dict[str, dict]) -> dict:
    cfg = case.config()
    device_budget = device_budget_for(cfg, case.target_micro)
    planning = compute_budget(cpu_info(device_budget), MARGIN).budget_bytes
    true_start = estimate_start(cfg, planning)
    start = min(max(int(round(true_start * case.estimate_factor)), 1), cfg.effective_batch)
    log(f"== {case.name}: device budget {fmt_bytes(device_budget)}, planning budget {fmt_bytes(planning)}, "
        f"effective batch {cfg.effective_batch}; estimate {true_start}"
        + (f", given to the planner as {start} (x{case.estimate_factor:g})" if case.estimate_factor != 1.0 else ""))
    # Warm-up, not counted: the first trial in a process pays one-off costs (allocator, kernels'
    # first use) that would otherwise be charged to whichever method runs first.
    Trialer(cfg, BudgetedCpuDevice(budget_bytes=device_budget), device_budget, 2).fits(1)
    base = done.get(case.base) if case.base else None
    if case.base and base is None:
        raise SystemExit(f"case {case.name!r}: its base case {case.base!r} must run first")
    results = []
    runs = [lambda: run_ours(cfg, device_budget, case.estimate_factor)]
    if base is None:
        runs += [lambda: run_lightning(cfg, device_budget), lambda: run_lightning(cfg, device_budget, same_trial=True),
                 lambda: run_accelerate(cfg, device_budget)]
    for fn in runs:
        gc.collect()
        r = fn()
        log("   " + fmt_result(r))
        results.append(r)
    if base is not None:  # same config, budget and trials: the baselines' runs are the base case's
        for d in base["results"][1:]:
            results.append(MethodResult(**{**d, "reused_from": case.base}))
    by = {r.method: r for r in results}
    o, light, same = by[OURS], by[LIGHTNING], by[LIGHTNING_SAME]
    checks = {
        "steps_ratio_vs_lightning": o.steps_started / light.steps_started,
        "steps_ratio_vs_lightning_same_trial": o.steps_started / same.steps_started,
        "trials_ratio_vs_lightning": o.trials / light.trials,
        "steps_at_most_third": 3 * o.steps_started <= light.steps_started,
        "largest_fit_at_least_lightning": o.largest_fit >= light.largest_fit,
        "plan_micro_batch_at_least_lightning": o.plan_micro_batch >= light.largest_fit,
    }
    return {"case": case.name, "kind": case.kind, "estimate_factor": case.estimate_factor, "base": case.base,
            "config": dict(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, block_size=cfg.block_size,
                           vocab_size=cfg.vocab_size, dropout=cfg.dropout, effective_batch=cfg.effective_batch),
            "device_budget_bytes": device_budget, "planning_budget_bytes": planning,
            "estimate_micro_batch": true_start, "planner_start_micro_batch": start,
            "results": [asdict(r) for r in results], "checks": checks}


def _header(c: dict) -> str:
    cfg = c["config"]
    drop = f" dropout {cfg['dropout']:g}" if cfg["dropout"] else ""
    est = f"estimate {c['estimate_micro_batch']}"
    if c["estimate_factor"] != 1.0:
        est += f", given to the planner as {c['planner_start_micro_batch']} (x{c['estimate_factor']:g}, simulated)"
    return (f"### {c['case']}  (L{cfg['n_layer']} C{cfg['n_embd']} T{cfg['block_size']} V{cfg['vocab_size']}{drop}, "
            f"effective batch {cfg['effective_batch']}; device budget {fmt_bytes(c['device_budget_bytes'])}, "
            f"planning budget {fmt_bytes(c['planning_budget_bytes'])}; {est})")


def _check_line(c: dict) -> str:
    ch = c["checks"]
    return (f"- ours: {ch['steps_ratio_vs_lightning']:.2f}x lightning's steps "
            f"({'PASS' if ch['steps_at_most_third'] else 'MISS'} <= 1/3), "
            f"{ch['steps_ratio_vs_lightning_same_trial']:.2f}x lightning's with our trial, "
            f"{ch['trials_ratio_vs_lightning']:.2f}x its trials; largest fit "
            f"{'PASS' if ch['largest_fit_at_least_lightning'] else 'MISS'} >= lightning's; plan micro-batch "
            f"{'>=' if ch['plan_micro_batch_at_least_lightning'] else '<'} lightning's")


def render(out: dict) -> str:
    lines = []
    full = [c for c in out["cases"] if c["kind"] != "mis-estimate"]
    mis = [c for c in out["cases"] if c["kind"] == "mis-estimate"]
    for c in full:
        lines += [_header(c), "",
                  "| method | steps/trial | trials | opt. steps started (completed) | seconds | largest fit | plan micro-batch | OOM / over budget |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in c["results"]:
            lines.append(f"| {r['method']} | {r['steps_per_trial']} | {r['trials']} | {r['steps_started']} "
                         f"({r['steps_completed']}) | {r['seconds']:.1f} | {r['largest_fit']} | "
                         f"{r['plan_micro_batch']} | {r['ooms']} / {r['over_budget']} |")
        lines += ["", "Sizes tried, in order: " + "; ".join(f"{r['method']}: " + " ".join(r["sizes"])
                                                            for r in c["results"]), "", _check_line(c), ""]
    if mis:
        lines += ["### Simulated mis-estimates (ours only; the baselines are the base case's runs)", "",
                  "| case | estimate -> planner's start | trials | opt. steps started (completed) | seconds | "
                  "largest fit (lightning's) | plan micro-batch | steps vs lightning (vs lightning, our trial) | sizes tried, in order |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        for c in mis:
            o = c["results"][0]
            light = next(r for r in c["results"] if r["method"] == LIGHTNING)
            same = next(r for r in c["results"] if r["method"] == LIGHTNING_SAME)
            ch = c["checks"]
            lines.append(f"| {c['case']} | {c['estimate_micro_batch']} -> {c['planner_start_micro_batch']} | "
                         f"{o['trials']} | {o['steps_started']} ({o['steps_completed']}) | {o['seconds']:.1f} | "
                         f"{o['largest_fit']} ({light['largest_fit']}) | {o['plan_micro_batch']} | "
                         f"{o['steps_started']}/{light['steps_started']} = {ch['steps_ratio_vs_lightning']:.2f}x "
                         f"({'PASS' if ch['steps_at_most_third'] else 'MISS'}) "
                         f"({o['steps_started']}/{same['steps_started']} = {ch['steps_ratio_vs_lightning_same_trial']:.2f}x) | "
                         f"{' '.join(o['sizes'])} |")
        lines.append("")
    for group, s in out["summary"].items():
        lines.append(f"**Summary, {group}:** ours' steps <= 1/3 of lightning's in {s['steps_pass']}/{s['n']} cases "
                     f"(total {s['steps_total']} vs {s['lightning_steps_total']}, {s['ratio_total']:.2f}x; "
                     f"vs lightning with our trial {s['lightning_same_steps_total']}, {s['ratio_same_total']:.2f}x); "
                     f"largest fit >= lightning's in {s['fit_pass']}/{s['n']} cases; "
                     f"plan micro-batch >= lightning's in {s['plan_pass']}/{s['n']} cases.")
    return "\n".join(lines)


def summarize_group(cases: list[dict]) -> dict:
    res = lambda c, m: next(r for r in c["results"] if r["method"] == m)
    ours = sum(res(c, OURS)["steps_started"] for c in cases)
    light = sum(res(c, LIGHTNING)["steps_started"] for c in cases)
    same = sum(res(c, LIGHTNING_SAME)["steps_started"] for c in cases)
    return {"n": len(cases), "cases": [c["case"] for c in cases],
            "steps_pass": sum(c["checks"]["steps_at_most_third"] for c in cases),
            "fit_pass": sum(c["checks"]["largest_fit_at_least_lightning"] for c in cases),
            "plan_pass": sum(c["checks"]["plan_micro_batch_at_least_lightning"] for c in cases),
            "steps_total": ours, "lightning_steps_total": light, "lightning_same_steps_total": same,
            "ratio_total": ours / light, "ratio_same_total": ours / same}


def git_commit() -> str | None:
    try:
        root = Path(__file__).resolve().parents[1]
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "autofit", "trainer"],
                               cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        return sha + (" (+ uncommitted changes in autofit/ or trainer/)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="print only JSON on stdout")
    ap.add_argument("--quick", action="store_true", help=f"{len(QUICK_CASES)} cases instead of {len(CASES)}")
    args = ap.parse_args(argv)
    log = (lambda s: print(s, file=sys.stderr, flush=True)) if args.json else (lambda s: print(s, flush=True))
    cases = QUICK_CASES if args.quick else CASES
    commit = git_commit()  # read before the run: the code measured is the code imported now
    t0 = time.perf_counter()
    done: dict[str, dict] = {}
    for c in cases:
        done[c.name] = run_case(c, log, done)
    out = {"machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                       "torch": torch.__version__, "python": platform.python_version()},
           "date": time.strftime("%Y-%m-%d"), "commit": commit, "margin": MARGIN,
           "cases": list(done.values())}
    groups = {"accurate estimate": [c for c in out["cases"] if c["kind"] == "accurate"],
              "estimate wrong (simulated mis-estimates)": [c for c in out["cases"] if c["kind"] != "accurate"]}
    out["summary"] = {g: summarize_group(cs) for g, cs in groups.items() if cs}
    out["seconds_total"] = time.perf_counter() - t0
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print()
        print(render(out))
        print(f"\n(total {out['seconds_total']:.0f} s; torch {torch.__version__}, {torch.get_num_threads()} threads; "
              f"commit {out['commit']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
