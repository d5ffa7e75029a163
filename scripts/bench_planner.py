"""Benchmark: autofit's micro-batch search (autofit.planner.probe_measured) against the two
search strategies of the common autotuners, on the budgeted CPU device.

- ours: probe_measured, restricted to the config's own levers (float32, eager, no
  checkpointing, standard loss) so that all methods search the same one-dimensional space.
  Run twice: with the CLI's default TrialSettings (3 optimizer steps per trial) and with
  TrialSettings(steps=2), the minimum the design allows (the first step allocates AdamW state).
- lightning: Lightning's `binsearch` mode: start at micro-batch 2, double until a trial fails,
  then bisect between the last success and the failure; 3 optimizer steps per trial
  (steps_per_trial=3). Capped at the effective batch, as ours is.
- accelerate: Accelerate's find_executable_batch_size: start at max(128, effective batch) and
  shrink x0.9 (int(m * 0.9)) after each failure until a size fits. Accelerate runs the user's
  real training at each size and stops at the first that does not raise; here each attempt is
  one trial of 3 optimizer steps.

Every method runs the same trial (autofit.trials.run_trial: the trainer's own train step, two
micro-batches per step when the batch accumulates) on the same device with the same budget
semantics: a trial fails when it raises OOM (over the device budget) or when its measured peak
is over the planning budget = compute_budget(cpu_info(device budget), margin).

Counting: "trials" are trials that ran (ours: records whose status is not 'pruned');
"steps" are optimizer steps started (a trial that runs out of memory in step k started k steps,
completed k-1); "largest fit" is the largest micro-batch the method confirmed to fit; "plan mb"
is what the method would train with (ours: plan.micro_batch, the fastest measured size, which
may be a divisor of the batch below the largest fit; the baselines: their largest fit).

    .venv/bin/python scripts/bench_planner.py [--json] [--quick]
"""
from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from autofit.budget import compute_budget  # noqa: E402
from autofit.cpu_budget import BudgetedCpuDevice  # noqa: E402
from autofit.devices import cpu_info  # noqa: E402
from autofit.estimate import ModelShape, estimate_peak  # noqa: E402
from autofit.planner import Space, probe_measured  # noqa: E402
from autofit.records import Candidate, TrialRecord  # noqa: E402
from autofit.trials import TrialSettings, run_trial  # noqa: E402
from autofit.units import fmt_bytes  # noqa: E402
from trainer.config import load_config  # noqa: E402

MARGIN = 0.10
EFFECTIVE_BATCH = 64  # batch_size 16 x gradient_accumulation_steps 4
BASELINE_STEPS = 3  # Lightning's steps_per_trial default
ACCELERATE_START = 128  # Accelerate's starting_batch_size default


@dataclass(frozen=True)
class Case:
    name: str
    overrides: tuple[str, ...]
    target_micro: int  # the device budget is set from the estimate so that about this size fits

    def config(self):
        return load_config(preset="tiny", overrides=list(self.overrides) + [
            "batch_size=16", "gradient_accumulation_steps=4", "dtype=float32", "compile=false"])


# Small models whose largest fitting micro-batch, under the budget chosen below, lies between 5
# and 40 of an effective batch of 64. Shallow on purpose: on the budgeted CPU device a trial's
# time is mostly per-op dispatch overhead, so depth (ops per step) sets the benchmark's run time.
CASES = [
    Case("L2 C64 T64 V256", ("n_layer=2", "n_head=2", "n_embd=64", "block_size=64"), 24),
    Case("L1 C64 T64 V2048 (head-heavy)", ("n_layer=1", "n_head=2", "n_embd=64", "block_size=64",
                                           "vocab_size=2048"), 8),
    Case("L3 C96 T32 V512", ("n_layer=3", "n_head=3", "n_embd=96", "block_size=32", "vocab_size=512"), 18),
    Case("tiny preset L4 C128 T128 V256", (), 12),
]
QUICK_CASES = CASES[:2]


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


@dataclass
class MethodResult:
    method: str
    trials: int
    steps_started: int
    steps_completed: int
    seconds: float
    largest_fit: int
    plan_micro_batch: int
    ooms: int
    over_budget: int
    sizes: list[str] = field(default_factory=list)  # "size:status" in the order they ran


def steps_started(r: TrialRecord, steps: int) -> int:
    # A trial that raised started one step more than it completed (unless it raised after the last).
    return r.steps_run + (1 if r.status in ("oom", "error") and r.steps_run < steps else 0)


def summarize(method: str, trials: list[TrialRecord], steps: int, seconds: float, plan_mb: int) -> MethodResult:
    ran = [t for t in trials if t.status != "pruned"]
    fits = [t.micro_batch for t in ran if t.status == "fit"]
    return MethodResult(method=method, trials=len(ran), steps_started=sum(steps_started(t, steps) for t in ran),
                        steps_completed=sum(t.steps_run for t in ran), seconds=seconds,
                        largest_fit=max(fits, default=0), plan_micro_batch=plan_mb,
                        ooms=sum(t.status == "oom" for t in ran), over_budget=sum(t.status == "over_budget" for t in ran),
                        sizes=[f"{t.micro_batch}:{t.status}" for t in ran])


class Trialer:
    """The baselines' trial: run_trial with the same rank batch and budget as the planner's."""

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


def run_ours(cfg, device_budget: int, steps: int) -> MethodResult:
    device = BudgetedCpuDevice(budget_bytes=device_budget)
    budget = compute_budget(cpu_info(device_budget), MARGIN)
    space = Space(dtypes=["float32"], compile=[False], checkpointing=[0], loss_impls=["standard"])
    t0 = time.perf_counter()
    res = probe_measured(cfg, device, budget, space, settings=TrialSettings(steps=steps, seed=cfg.seed))
    return summarize(f"ours ({steps} steps/trial)", res.trials, steps, time.perf_counter() - t0,
                     res.plan.micro_batch)


def run_lightning(cfg, device_budget: int) -> MethodResult:
    device = BudgetedCpuDevice(budget_bytes=device_budget)
    budget = compute_budget(cpu_info(device_budget), MARGIN)
    tr = Trialer(cfg, device, budget.budget_bytes, BASELINE_STEPS)
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
    if hi is not None and lo == 0:  # 2 failed: Lightning would go on down; bisect over [0, 2)
        lo = 0
    while hi is not None and hi - lo > 1:  # binsearch phase
        mid = (lo + hi) // 2
        if mid == 0:
            break
        if tr.fits(mid):
            lo = mid
        else:
            hi = mid
    return summarize("lightning (x2 + bisect)", tr.trials, BASELINE_STEPS, time.perf_counter() - t0, lo)


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
    return summarize("accelerate (x0.9 down)", tr.trials, BASELINE_STEPS, time.perf_counter() - t0, found)


def run_case(case: Case, log) -> dict:
    cfg = case.config()
    device_budget = device_budget_for(cfg, case.target_micro)
    planning = compute_budget(cpu_info(device_budget), MARGIN).budget_bytes
    log(f"== {case.name}: device budget {fmt_bytes(device_budget)}, planning budget {fmt_bytes(planning)}, "
        f"effective batch {cfg.effective_batch}")
    # Warm-up, not counted: the first trial in a process pays one-off costs (allocator, kernels'
    # first use) that would otherwise be charged to whichever method runs first.
    Trialer(cfg, BudgetedCpuDevice(budget_bytes=device_budget), device_budget, 2).fits(1)
    results = []
    for fn in (lambda: run_ours(cfg, device_budget, 3), lambda: run_ours(cfg, device_budget, 2),
               lambda: run_lightning(cfg, device_budget), lambda: run_accelerate(cfg, device_budget)):
        gc.collect()
        r = fn()
        log(f"   {r.method}: {r.trials} trials, {r.steps_started} steps, {r.seconds:.1f} s, "
            f"largest fit {r.largest_fit}, plan {r.plan_micro_batch}  [{' '.join(r.sizes)}]")
        results.append(r)
    by = {r.method.split(" ")[0] + (" 2" if "2 steps" in r.method else ""): r for r in results}
    light = by["lightning"]
    checks = {}
    for key in ("ours", "ours 2"):
        o = by[key]
        checks[results[[r.method for r in results].index(o.method)].method] = {
            "steps_ratio_vs_lightning": o.steps_started / light.steps_started if light.steps_started else None,
            "steps_at_most_third": 3 * o.steps_started <= light.steps_started,
            "largest_fit_at_least_lightning": o.largest_fit >= light.largest_fit,
            "plan_micro_batch_at_least_lightning": o.plan_micro_batch >= light.largest_fit,
        }
    return {"case": case.name, "config": dict(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
                                               block_size=cfg.block_size, vocab_size=cfg.vocab_size,
                                               effective_batch=cfg.effective_batch),
            "device_budget_bytes": device_budget, "planning_budget_bytes": planning,
            "results": [asdict(r) for r in results], "checks": checks}


def render(out: dict) -> str:
    lines = []
    for c in out["cases"]:
        cfg = c["config"]
        lines.append(f"### {c['case']}  (L{cfg['n_layer']} C{cfg['n_embd']} T{cfg['block_size']} "
                     f"V{cfg['vocab_size']}, effective batch {cfg['effective_batch']}; device budget "
                     f"{fmt_bytes(c['device_budget_bytes'])}, planning budget {fmt_bytes(c['planning_budget_bytes'])})")
        lines.append("")
        lines.append("| method | trials | opt. steps started (completed) | seconds | largest fit | plan micro-batch | OOM / over budget |")
        lines.append("|---|---:|---:|---:|---:|---:|---:|")
        for r in c["results"]:
            lines.append(f"| {r['method']} | {r['trials']} | {r['steps_started']} ({r['steps_completed']}) | "
                         f"{r['seconds']:.1f} | {r['largest_fit']} | {r['plan_micro_batch']} | "
                         f"{r['ooms']} / {r['over_budget']} |")
        lines.append("")
        lines.append("Sizes tried, in order: " + "; ".join(f"{r['method'].split(' (')[0]}"
                                                          f"{' (2)' if '2 steps' in r['method'] else ''}: "
                                                          + " ".join(r["sizes"]) for r in c["results"]))
        lines.append("")
        for m, ch in c["checks"].items():
            lines.append(f"- {m}: steps {ch['steps_ratio_vs_lightning']:.2f}x lightning's "
                         f"({'PASS' if ch['steps_at_most_third'] else 'MISS'} <= 1/3); largest fit "
                         f"{'PASS' if ch['largest_fit_at_least_lightning'] else 'MISS'} >= lightning's; plan micro-batch "
                         f"{'>=' if ch['plan_micro_batch_at_least_lightning'] else '<'} lightning's")
        lines.append("")
    for m, s in out["summary"].items():
        lines.append(f"**Summary, {m}:** steps <= 1/3 of lightning's in {s['steps_pass']}/{s['n']} cases "
                     f"(total {s['steps_total']} vs {s['lightning_steps_total']}, {s['ratio_total']:.2f}x); "
                     f"largest fit >= lightning's in {s['fit_pass']}/{s['n']} cases; "
                     f"plan micro-batch >= lightning's in {s['plan_pass']}/{s['n']} cases.")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="print only JSON on stdout")
    ap.add_argument("--quick", action="store_true", help=f"{len(QUICK_CASES)} cases instead of {len(CASES)}")
    args = ap.parse_args(argv)
    log = (lambda s: print(s, file=sys.stderr, flush=True)) if args.json else (lambda s: print(s, flush=True))
    cases = QUICK_CASES if args.quick else CASES
    t0 = time.perf_counter()
    out = {"machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                       "torch": torch.__version__, "python": platform.python_version()},
           "date": time.strftime("%Y-%m-%d"), "margin": MARGIN, "cases": [run_case(c, log) for c in cases]}
    summary = {}
    for m in out["cases"][0]["checks"]:
        chs = [c["checks"][m] for c in out["cases"]]
        ours = sum(r["steps_started"] for c in out["cases"] for r in c["results"] if r["method"] == m)
        light = sum(r["steps_started"] for c in out["cases"] for r in c["results"] if r["method"].startswith("lightning"))
        summary[m] = {"n": len(chs), "steps_pass": sum(c["steps_at_most_third"] for c in chs),
                      "fit_pass": sum(c["largest_fit_at_least_lightning"] for c in chs),
                      "plan_pass": sum(c["plan_micro_batch_at_least_lightning"] for c in chs),
                      "steps_total": ours, "lightning_steps_total": light, "ratio_total": ours / light}
    out["summary"] = summary
    out["seconds_total"] = time.perf_counter() - t0
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print()
        print(render(out))
        print(f"\n(total {out['seconds_total']:.0f} s; torch {torch.__version__}, {torch.get_num_threads()} threads)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
