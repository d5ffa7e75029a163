"""Benchmark: is the probe's plan the fastest that fits, is it the same every time, and what does
finding it cost against Lightning's BatchSizeFinder and Accelerate's find_executable_batch_size?

For each case (a model shape and a CPU budget, on the budgeted CPU device, fp32, eager):

1. probe: autofit.planning.planner.probe_measured, the default all-levers space of `autofit probe`
   (checkpointing off/1 x standard/chunked loss), run REPEATS times, each in a fresh process as
   `autofit probe` runs (first-use costs included, imports not): its wall time, the optimizer
   steps it started (a failed trial's failing step counted; the learning-rate-0 step that makes
   AdamW's state is not an optimizer step of training and is not counted), and whether every
   repeat chose the same plan. Then once more with the standard loss only (the space the peers
   search). Its cost is also given as the process's CPU seconds and the sequences its trials sent
   into a forward pass, figures the machine's load moves little or not at all
   (scripts/bench_plan_report.py), and the peers' likewise.
2. grid: every fitting plan of every lever combination: for each combination, every distinct
   balanced split of the effective batch (trainer.step.split_batch) whose micro-batch fits,
   timed as whole optimizer steps (the trainer's train_step, as training runs them) on the
   budgeted device limited to the planning budget, interleaved (A B C ... A B C) with the
   probes' plans, ROUNDS rounds of a warm-up and STEPS timed steps each (4 x 3), then the fastest 6 and the
   probes' plans 8 rounds more. The figure is the fastest
   step's CPU time of this process (other processes' load is not counted in it); wall time is
   printed beside it. plan / best = the best grid point's time per token over the plan's.
3. across processes: the grid's FINALISTS fastest plans and the probes' plans timed again, each in
   scripts/bench_processes.PROCESSES fresh processes, interleaved; a plan's figure is the median
   over the processes of its fastest step there, and plan / best is given on it too. On this
   shared machine a whole process reads one plan several per cent faster or slower against
   another than the next process does, so a one-process grid's ranking of plans that close is
   that process's, and a user's run is another process (bench_processes' docstring).
4. peers (only with --peer-python, a separate throwaway venv holding lightning and accelerate;
   never autofit dependencies): Lightning's BatchSizeFinder (its defaults: mode 'power', init 2,
   3 steps per trial) through a LightningModule around the same GPT, and Accelerate's
   find_executable_batch_size (start 128, x0.9 per failure; each attempt builds the model and
   runs 3 optimizer steps), both on the same budgeted device and planning budget. The one adapter:
   both libraries recognise an OOM by its message ('CUDA ... out of memory'), so their checks are
   patched to also accept torch.OutOfMemoryError, which the budgeted device raises (and CUDA's
   OOM is an instance of).

    .venv/bin/python scripts/bench_plan_quality.py [--quick] [--small] [--peer-python /tmp/venv/bin/python] [--json F]

Repeat stability alone (no grid, no peers): N fresh-process probes of one case, and with
--probe-env a second arm alternated with the first, e.g. the glibc lead of docs/planner-benchmark.md:

    .venv/bin/python scripts/bench_plan_quality.py --stability 10 --case tiny --probe-env MALLOC_TRIM_THRESHOLD_=1073741824

Nothing asserts on time: it prints tables. The machine's load average is printed with them.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# as `autofit` starts (autofit/__main__.py), before torch loads: sleeping OpenMP waits where the
# machine is loaded, for the probes' children and this process's grid alike
from autofit.devices.host_load import choose_openmp_wait  # noqa: E402

choose_openmp_wait()
import torch  # noqa: E402

from autofit.devices.cpu import cpu_info  # noqa: E402
from autofit.devices.cpu_budget import BudgetedCpuDevice  # noqa: E402
from autofit.planning.budget import compute_budget  # noqa: E402
from autofit.planning.candidates import Levers, Space, candidate_space, lever_combos  # noqa: E402
from autofit.planning.estimate import ModelShape, max_micro_batch  # noqa: E402
from autofit.planning.planner import probe_measured  # noqa: E402
from autofit.planning.trials import TrialSettings, new_objects_only, prime_optimizer, trial_split  # noqa: E402
from autofit.units import parse_size  # noqa: E402
from trainer.config.train_config import load_config  # noqa: E402
from trainer.model.gpt import GPT, GPTConfig  # noqa: E402
from trainer.step import make_optimizer, split_batch, train_step  # noqa: E402
from bench_plan_report import report  # noqa: E402
from bench_processes import PROCESSES, across, medians  # noqa: E402

MARGIN = 0.10
REPEATS = 3
# 4 interleaved rounds x 3 timed steps per grid point: with 4 readings (2 x 2) the grid's own
# ranking was noise on this shared machine (a 13 % faster plan ranked behind two slower ones; 24
# readings per point found it, 2026-12-04)
ROUNDS = 4
STEPS = 3
# ... and 12 readings still ranked a 6 % slower plan first at load 2; the fastest FINALISTS points
# (and the probes' plans) get FINAL_ROUNDS interleaved rounds more: 36 readings each
FINALISTS = 6
FINAL_ROUNDS = 8


@dataclass(frozen=True)
class Case:
    name: str
    overrides: tuple[str, ...]
    budget: str  # the device budget (--budget)

    def config(self):
        return load_config(preset="tiny", overrides=list(self.overrides))


CASES = [
    Case("tiny preset L4 C128 T128 V256, 16x2", (), "77MiB"),
    Case("L2 C128 T64 V8192 head-heavy, 16x2", ("n_layer=2", "n_embd=128", "n_head=4", "block_size=64",
                                                 "vocab_size=8192"), "120MiB"),
    Case("L4 C128 T128 V4096, 16x2", ("vocab_size=4096",), "110MiB"),
]
# Small shapes whose steps take tens of ms: the grid runs in minutes on a loaded 2-core machine.
SMALL_CASES = [
    Case("L2 C64 T64 V256, 16x2", ("n_layer=2", "n_embd=64", "n_head=2", "block_size=64"), "10MiB"),
    Case("L1 C64 T64 V4096 head-heavy, 16x2", ("n_layer=1", "n_embd=64", "n_head=2", "block_size=64",
                                                "vocab_size=4096"), "20MiB"),
]


def load() -> str:
    a = os.getloadavg()
    return f"load average {a[0]:.1f} / {a[1]:.1f} / {a[2]:.1f} on {os.cpu_count()} CPUs"


def progress(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def plan_key(plan) -> tuple:
    return (plan.checkpointing, plan.checkpointing_policy, plan.loss_impl, tuple(plan.micro_batches))


def steps_started(trials) -> int:
    return sum(t.steps_run + (1 if t.status in ("oom", "error") else 0) for t in trials if t.status != "pruned")


def sequences_started(trials, rank_batch: int) -> int:
    """Sequences the trials sent into a forward pass: each step started, its whole split counted
    (re-timings included: contest.retime adds its steps to the record's steps_run)."""
    return sum((t.steps_run + (1 if t.status in ("oom", "error") else 0)) * sum(trial_split(rank_batch, t.micro_batch))
               for t in trials if t.status != "pruned")


def probe_once(case: Case, standard_only: bool, env: dict[str, str] | None = None) -> dict:
    """One probe in a fresh process, as `autofit probe` runs (and as the peers run): its first
    trial pays the process's first-use costs, as a user's does. Its wall time counts
    probe_measured only, not the imports (the peers' imports are not counted either). `env`:
    variables added to the probe process's environment (--stability's second arm)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", case.name] + (["--standard-only"] if standard_only else [])
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env={**os.environ, **(env or {})})
    if r.returncode != 0:
        raise SystemExit(f"probe of {case.name} failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
    d = json.loads(r.stdout.strip().splitlines()[-1])
    d["plan"] = SimpleNamespace(**d["plan"])
    return d


def child(case_name: str, standard_only: bool) -> None:
    """The probe of one case, in this process: prints {plan, seconds, steps, trials} as JSON."""
    case = next(c for c in CASES + SMALL_CASES if c.name == case_name)
    cfg = case.config()
    device_budget = parse_size(case.budget)
    space = candidate_space(cfg, "cpu", cpu_info(device_budget).bf16_supported, compile_measurable=False)
    if standard_only:
        space = Space(dtypes=space.dtypes, compile=[False], checkpointing=[0], loss_impls=["standard"])
    dev = BudgetedCpuDevice(budget_bytes=device_budget)
    budget = compute_budget(dev.info, MARGIN)
    # torch imports torch._dynamo at its first use inside the probe's first trial (1.3 s here);
    # `import lightning` imports it before the peers' timers start, so it is imported here too
    import torch._dynamo  # noqa: F401
    t0, c0 = time.perf_counter(), time.process_time()
    res = probe_measured(cfg, dev, budget, space, settings=TrialSettings())
    secs, cpu_secs = time.perf_counter() - t0, time.process_time() - c0
    p = res.plan
    plan = {k: getattr(p, k) for k in ("checkpointing", "checkpointing_policy", "loss_impl", "micro_batches",
                                       "micro_batch", "grad_accum", "split")}
    print(json.dumps({"plan": plan, "seconds": secs, "cpu_seconds": cpu_secs, "steps": steps_started(res.trials),
                      "sequences": sequences_started(res.trials, cfg.effective_batch),
                      "trials": len([t for t in res.trials if t.status != "pruned"])}))


def time_split(cfg, lv: Levers, split: list[int], dev: BudgetedCpuDevice, budget: int) -> dict | None:
    """One warm-up and STEPS timed optimizer steps of `split` with levers `lv`, as training runs
    them (a fresh model); None when it does not fit the planning budget."""
    out, state = None, {}
    with dev.tracking(), dev.limited_to(budget):
        try:
            mc = GPTConfig.from_train_config(cfg)
            mc.checkpointing, mc.loss_impl = lv.checkpointing, lv.loss_impl
            mc.checkpointing_policy = lv.checkpointing_policy
            torch.manual_seed(0)
            state["m"] = model = GPT(mc)
            state["o"] = opt = make_optimizer(model, learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                              betas=(cfg.beta1, cfg.beta2), device_type="cpu")
            prime_optimizer(model, opt, keep_grads=False)  # as training: set_to_none between steps
            g = torch.Generator().manual_seed(0)
            n = sum(split)
            state["x"] = x = torch.randint(0, cfg.vocab_size, (n, cfg.block_size), generator=g)
            state["y"] = y = torch.randint(0, cfg.vocab_size, (n, cfg.block_size), generator=g)
            dev.reset_peak()
            wall, cpu = [], []
            for _ in range(STEPS + 1):
                t0, c0 = time.perf_counter(), time.process_time()
                train_step(model, opt, x, y, split, grad_clip=cfg.grad_clip)
                wall.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
            out = {"wall": wall[1:], "cpu": cpu[1:], "peak": dev.peak_bytes(), "tokens": n * cfg.block_size}
        except torch.OutOfMemoryError:
            out = None
        state.clear()
        gc.collect()
        dev.cleanup()
    return out


def grid_points(cfg, space: Space, budget: int) -> list[tuple[Levers, tuple[int, ...]]]:
    """Every distinct balanced split of every combination up to one past the estimate's largest fit
    (the estimate is within 0.12 % on this device; a split that does not fit drops out when timed)."""
    shape, E = ModelShape.from_config(cfg), cfg.effective_batch
    pts = []
    for lv in lever_combos(space):
        top = min(E, max_micro_batch(shape, budget, **lv.estimate_args(), compile=False, device="cpu",
                                     ce_chunk_size=cfg.ce_chunk_size) + 1)
        for split in sorted({tuple(split_batch(E, m)) for m in range(1, top + 1)}, key=lambda s: -s[0]):
            pts.append((lv, split))
    return pts


def run_grid(cfg, case: Case, plans: list, space: Space) -> dict:
    dev = BudgetedCpuDevice(budget_bytes=parse_size(case.budget))
    budget = compute_budget(dev.info, MARGIN).budget_bytes
    pts = grid_points(cfg, space, budget)
    plan_keys = [(Levers("float32", p.checkpointing, p.loss_impl, False, p.checkpointing_policy), tuple(p.micro_batches))
                 for p in plans]
    pts += [k for k in dict.fromkeys(plan_keys) if k not in pts]  # the probes' plans, timed in the same rounds
    best: dict = {}
    progress(f"{case.name}: {len(pts)} grid points x {ROUNDS} rounds")
    with new_objects_only():  # each point's gc.collect walks only what the points made, as in the probe
        _grid_rounds(cfg, pts, dev, budget, best, ROUNDS)
        # the finalists: the fastest FINALISTS points and the probes' plans, FINAL_ROUNDS rounds more
        fit = {k: v for k, v in best.items() if v is not None}
        top = sorted(fit, key=lambda k: per_token(fit[k], "cpu"))[:FINALISTS]
        final = top + [k for k in dict.fromkeys(plan_keys) if k in fit and k not in top]
        progress(f"{case.name}: {len(final)} finalists x {FINAL_ROUNDS} rounds")
        _grid_rounds(cfg, final, dev, budget, best, FINAL_ROUNDS)
    return {k: v for k, v in best.items() if v is not None}


def _grid_rounds(cfg, pts, dev, budget, best, rounds: int) -> None:
    for _ in range(rounds):
        for lv, split in pts:
            if best.get((lv, split), 0) is None:
                continue  # did not fit in an earlier round
            r = time_split(cfg, lv, list(split), dev, budget)
            if r is None:
                best[(lv, split)] = None
                continue
            acc = best.setdefault((lv, split), {"wall": [], "cpu": [], "peak": 0, "tokens": r["tokens"]})
            acc["wall"] += r["wall"]
            acc["cpu"] += r["cpu"]
            acc["peak"] = max(acc["peak"], r["peak"])


def plan_point(pl) -> tuple:
    """A probe's plan as a grid point (Levers, split)."""
    return (Levers("float32", pl.checkpointing, pl.loss_impl, False, pl.checkpointing_policy), tuple(pl.micro_batches))


def per_token(v: dict, key: str) -> float:
    return min(v[key]) / v["tokens"]


def name(lv: Levers, split) -> str:
    ck = f" ckpt{lv.checkpointing}" + (" sel" if lv.checkpointing_policy == "selective" else "") if lv.checkpointing else ""
    head = f"{split[0]}" + (f"x{len(split)}" if len(set(split)) == 1 else f"..{split[-1]} ({len(split)})")
    return f"{lv.loss_impl}{ck} {head}"


def run_case(case: Case, peer_python: str | None) -> dict:
    cfg = case.config()
    device_budget = parse_size(case.budget)
    info = cpu_info(device_budget)
    space = candidate_space(cfg, "cpu", info.bf16_supported, compile_measurable=False)
    probes = []
    for i in range(REPEATS):
        d = probe_once(case, standard_only=False)
        progress(f"{case.name}: probe {i + 1}: {d['plan'].loss_impl} ckpt{d['plan'].checkpointing} "
                 f"{d['plan'].split}, {d['seconds']:.1f} s")
        probes.append(d)
    std = probe_once(case, standard_only=True)
    std_secs = std["seconds"]
    progress(f"{case.name}: standard-only probe {std_secs:.1f} s; grid next")
    grid = run_grid(cfg, case, [p["plan"] for p in probes], space)
    best_key = min(grid, key=lambda k: per_token(grid[k], "cpu"))
    best_cpu = per_token(grid[best_key], "cpu")
    best_wall = min(per_token(v, "wall") for v in grid.values())
    keys = [plan_point(p["plan"]) for p in probes]
    # the grid's finalists and the probes' plans again, in fresh processes (scripts/bench_processes.py)
    final = sorted(grid, key=lambda k: per_token(grid[k], "cpu"))[:FINALISTS]
    final += [k for k in dict.fromkeys(keys) if k in grid and k not in final]
    xp = across(case.name, final, progress=progress)
    xp_cpu, xp_wall = medians(xp, "cpu"), medians(xp, "wall")
    rows = []
    for p, key in zip(probes, keys):
        g = grid.get(key)
        rows.append({"plan": name(*key), **{k: p[k] for k in ("seconds", "cpu_seconds", "steps", "sequences", "trials")},
                     "plan_over_best_cpu": best_cpu / per_token(g, "cpu") if g else None,
                     "plan_over_best_wall": best_wall / per_token(g, "wall") if g else None,
                     "xp_cpu": min(xp_cpu.values()) / xp_cpu[key] if key in xp_cpu else None,
                     "xp_wall": min(xp_wall.values()) / xp_wall[key] if key in xp_wall else None})
    out = {"case": case.name, "budget": case.budget, "effective_batch": cfg.effective_batch,
           "grid_points": len(grid), "best": name(*best_key), "probes": rows,
           "same_plan": len({plan_key(p["plan"]) for p in probes}) == 1,
           "standard_only": {**{k: std[k] for k in ("seconds", "cpu_seconds", "steps", "sequences")},
                             "plan": f"{std['plan'].micro_batch} x {std['plan'].grad_accum}"},
           "top": sorted(((name(*k), per_token(v, "cpu") * 1e6, per_token(v, "wall") * 1e6, v["peak"])
                          for k, v in grid.items()), key=lambda r: r[1])[:6],
           "across": sorted(((name(*k), v["cpu"], v["wall"], xp_cpu.get(k), xp_wall.get(k)) for k, v in xp.items()),
                            key=lambda r: r[3] if r[3] is not None else 1e9),
           "load": load()}
    if peer_python:
        out["peers"] = run_peers(peer_python, case)
    return out


def run_peers(peer_python: str, case: Case) -> dict:
    here = Path(__file__).resolve().parent / "bench_peers.py"
    r = subprocess.run([peer_python, str(here), "--overrides", json.dumps(list(case.overrides)),
                        "--budget", case.budget], capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        return {"error": (r.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def stability(case: Case, n: int, env: dict[str, str], standard_only: bool) -> None:
    """`n` fresh-process probes of `case` (no grid: cheap), each arm in turn when `env` is given
    (the default environment, then with `env`), and how often each arm chose each plan: the
    probe's repeat stability, and an A/B test of what the process's environment does to it."""
    arms = [("default", {})] + ([(" ".join(f"{k}={v}" for k, v in env.items()), env)] if env else [])
    seen: dict[str, dict[str, list[float]]] = {a: {} for a, _ in arms}
    for i in range(n):
        for arm, extra in arms:
            d = probe_once(case, standard_only, extra)
            pl = d["plan"]
            key = f"{pl.loss_impl} ckpt{pl.checkpointing} {pl.split}"
            seen[arm].setdefault(key, []).append((d["seconds"], d["cpu_seconds"]))
            progress(f"{case.name}: [{arm}] probe {i + 1}: {key}, {d['seconds']:.1f} s ({d['cpu_seconds']:.1f} s CPU)")
    print(f"\n### {case.name}: {n} fresh-process probes per arm ({load()})\n")
    print("| environment | plan | chosen | probe wall s | probe CPU s |")
    print("|---|---|---:|---|---|")
    for arm, plans in seen.items():
        for key, secs in sorted(plans.items(), key=lambda kv: -len(kv[1])):
            wall, cpu = [s[0] for s in secs], [s[1] for s in secs]
            print(f"| {arm} | {key} | {len(secs)} of {n} | {min(wall):.1f}-{max(wall):.1f} | {min(cpu):.1f}-{max(cpu):.1f} |")


def cost(case: Case, rounds: int, peer_python: str) -> None:
    """The cost goals alone (no grid): `rounds` alternated rounds of the peers, an all-levers probe
    and a standard-only probe, each in a fresh process, on `case`; prints each tool's wall time,
    CPU time, optimizer steps and sequences, and the plans chosen."""
    rows: dict[str, list[dict]] = {}
    for i in range(rounds):
        peers = run_peers(peer_python, case)
        if "error" in peers:
            raise SystemExit(f"the peers failed: {peers['error']}")
        for name_, d in peers.items():
            rows.setdefault(name_, []).append({**d, "plan": f"largest fit {d.get('batch')}"})
        for label_, std in (("autofit, all levers", False), ("autofit, standard loss only", True)):
            d = probe_once(case, standard_only=std)
            pl = d["plan"]
            rows.setdefault(label_, []).append({**d, "plan": f"{pl.loss_impl} ckpt{pl.checkpointing} {pl.split}"})
        progress(f"{case.name}: cost round {i + 1} of {rounds} done ({load()})")
    print(f"\n### {case.name}, budget {case.budget}: cost, {rounds} alternated rounds ({load()})\n")
    print("| tool | plans | wall s | CPU s | opt. steps | sequences |")
    print("|---|---|---|---|---|---|")
    span = lambda v: f"{min(v):.2f}-{max(v):.2f}" if max(v) > min(v) else f"{v[0]:.2f}"  # noqa: E731
    for tool, ds in rows.items():
        plans = ", ".join(f"{p} x{n}" for p, n in
                          sorted({d["plan"]: sum(e["plan"] == d["plan"] for e in ds) for d in ds}.items()))
        ints = lambda k: "/".join(str(d[k]) for d in ds)  # noqa: E731
        print(f"| {tool} | {plans} | {span([d['seconds'] for d in ds])} | {span([d['cpu_seconds'] for d in ds])} "
              f"| {ints('steps')} | {ints('sequences')} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the first case only")
    ap.add_argument("--small", action="store_true", help="the small shapes (SMALL_CASES) instead")
    ap.add_argument("--peer-python", help="python of a throwaway venv with lightning and accelerate")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--stability", type=int, metavar="N",
                    help="only N fresh-process probes of one case (--case), no grid, no peers")
    ap.add_argument("--case", help="the case's name or its start (default: every case; --stability: the first)")
    ap.add_argument("--probe-env", action="append", default=[], metavar="KEY=VALUE",
                    help="with --stability: a second arm of probes with this in their environment (repeatable)")
    ap.add_argument("--standard-only-probes", action="store_true", help="with --stability: standard loss only")
    ap.add_argument("--cost", type=int, metavar="ROUNDS",
                    help="only the cost goals: ROUNDS alternated rounds of the peers and both probes of --case "
                         "(or every case), no grid; needs --peer-python")
    ap.add_argument("--child", help=argparse.SUPPRESS)  # one probe of this case, in this process
    ap.add_argument("--standard-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.standard_only)
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {load()}")
    cases = SMALL_CASES if args.small else CASES
    if args.stability:
        matching = [c for c in CASES + SMALL_CASES if c.name.startswith(args.case or "")] if args.case else cases
        bad = [e for e in args.probe_env if "=" not in e]
        if not matching or bad or args.stability < 1:
            ap.error(f"--case {args.case!r} names no case" if not matching else
                     f"--probe-env takes KEY=VALUE, not {bad[0]!r}" if bad else "--stability takes N >= 1")
        env = dict(e.split("=", 1) for e in args.probe_env)
        stability(matching[0], args.stability, env, args.standard_only_probes)
        return
    if args.cost:
        if not args.peer_python:
            ap.error("--cost needs --peer-python")
        for case in [c for c in CASES + SMALL_CASES if c.name.startswith(args.case)] if args.case else cases:
            cost(case, args.cost, args.peer_python)
        return
    results = []
    if args.case:
        cases = [c for c in CASES + SMALL_CASES if c.name.startswith(args.case)]
    for case in cases[:1] if args.quick else cases:
        c = run_case(case, args.peer_python)
        report(c, ROUNDS, STEPS, REPEATS, PROCESSES)
        results.append(c)
        sys.stdout.flush()
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
