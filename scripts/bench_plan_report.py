"""The tables scripts/bench_plan_quality.py prints for one case: the grid's fastest plans, each
probe's plan against the grid's best, and the probes' cost against the peers'.

Cost is given three ways, because on a shared machine wall time says as much about the other
processes as about the tool: wall seconds; CPU seconds of the tool's own process (time.process_time:
all its threads, not the other processes' load; it still grows somewhat under load, as caches and
memory bandwidth are shared); and sequences started through a forward pass (each optimizer step's
sequences, a failed step's counted whole; the sequences of a failed start are not all run, so this
overstates a tool that fails often, Accelerate most), a count no load changes.
"""
from __future__ import annotations

from autofit.units import fmt_bytes


def _f(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _ratio(a, b) -> str:
    return f"{a / b:.2f}x" if a is not None and b else "-"


def report(c: dict, rounds: int, steps: int, repeats: int, processes: int) -> None:
    """Prints the markdown tables of one case's results (bench_plan_quality.run_case's dict)."""
    print(f"\n### {c['case']} (budget {c['budget']}, effective batch {c['effective_batch']}; {c['load']})\n")
    print(f"grid: {c['grid_points']} fitting plans timed, {rounds} interleaved rounds x {steps} steps; "
          f"best: {c['best']}\n")
    print("| grid plan (fastest by CPU time) | CPU us/token | wall us/token | measured peak |")
    print("|---|---:|---:|---:|")
    for n, cpu_us, wall_us, peak in c["top"]:
        print(f"| {n} | {cpu_us:.2f} | {wall_us:.2f} | {fmt_bytes(peak)} |")
    print(f"\nthe finalists again, each in {processes} fresh processes (scripts/bench_processes.py): each process's "
          "fastest step, us/token, and the median over the processes\n")
    print("| plan | CPU, per process | CPU median | wall, per process | wall median |")
    print("|---|---|---:|---|---:|")
    for n, cpu, wall, cpu_med, wall_med in c["across"]:
        print(f"| {n} | {', '.join(f'{v:.1f}' for v in cpu)} | {_f(cpu_med, '.2f')} "
              f"| {', '.join(f'{v:.1f}' for v in wall)} | {_f(wall_med, '.2f')} |")
    print("\n| probe | plan | plan / best (CPU) | plan / best (wall) | across processes (CPU) | across processes (wall) "
          "| wall s | CPU s | opt. steps | sequences | trials |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for i, p in enumerate(c["probes"], 1):
        ratios = " | ".join(_f(p[k], ".3f") for k in ("plan_over_best_cpu", "plan_over_best_wall", "xp_cpu", "xp_wall"))
        print(f"| all levers #{i} | {p['plan']} | {ratios} | {p['seconds']:.1f} | {p['cpu_seconds']:.1f} "
              f"| {p['steps']} | {p['sequences']} | {p['trials']} |")
    s = c["standard_only"]
    print(f"| standard loss only | {s['plan']} | | | | | {s['seconds']:.1f} | {s['cpu_seconds']:.1f} | {s['steps']} "
          f"| {s['sequences']} | |")
    print(f"\nsame plan in {repeats} of {repeats} probes: {'yes' if c['same_plan'] else 'NO'}")
    peers = c.get("peers")
    if peers and "error" not in peers:
        _peers(c, peers, s)
    elif peers:
        print(f"\npeers: {peers['error']}")


def _peers(c: dict, peers: dict, s: dict) -> None:
    """The peers' table and the cost goals' ratios (issue 18), by wall time, CPU time and sequences."""
    print("\n| peer | largest fit | wall s | CPU s | opt. steps | sequences |")
    print("|---|---:|---:|---:|---:|---:|")
    for k, v in peers.items():
        print(f"| {k} | {v['batch']} | {v['seconds']:.1f} | {v['cpu_seconds']:.1f} | {v['steps']} "
              f"| {v['sequences']} |")
    light = peers.get("lightning BatchSizeFinder")
    if not light:
        return
    print("\n| cost ratio | wall | CPU | sequences |")
    print("|---|---:|---:|---:|")
    n = len(c["probes"])
    mean = {k: sum(p[k] for p in c["probes"]) / n for k in ("seconds", "cpu_seconds", "sequences")}
    print("| all-levers probe (mean) / Lightning | "
          + " | ".join(_ratio(mean[k], light[k]) for k in ("seconds", "cpu_seconds", "sequences")) + " |")
    print("| standard-only probe / the faster peer | "
          + " | ".join(_ratio(s[k], min(v[k] for v in peers.values())) for k in ("seconds", "cpu_seconds", "sequences"))
          + " |")
