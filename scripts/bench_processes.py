"""The grid's finalists timed again across fresh processes (scripts/bench_plan_quality.py's last stage).

Why: on this workplace's shared 2-core CPU the same two plans rank differently from one process to
the next. Timed interleaved in five fresh processes (L2 C128 T64 V8192 at 120MiB, chunked loss,
6 rounds each, 2026-12-06), the fastest of 16 x 2, 32 x 1 and 11 + 11 + 10 by CPU time was 11 + 11
+ 10 in three processes, 16 x 2 in one and 32 x 1 in one, up to 9 % apart (docs/planner-benchmark.md,
twelfth pass). A grid timed in one process ranks plans by that process's luck, and a user's run is
yet another process. So each finalist's figure here is the median, over PROCESSES fresh processes,
of its fastest step in each (CPU time and wall time per token, as the grid's), and plan / best is
judged on those medians.

    .venv/bin/python scripts/bench_processes.py --child CASE POINTS_JSON   # one process's timings

Nothing asserts on time: the tables are printed by scripts/bench_plan_report.py.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROCESSES = 5
ROUNDS = 6  # interleaved rounds per process, a fresh model and a warm-up step each (the grid's time_split)


def to_json(lv, split) -> list:
    """A grid point (Levers, split) as JSON: [dtype, checkpointing, loss, policy, split]."""
    return [lv.dtype, lv.checkpointing, lv.loss_impl, lv.checkpointing_policy, list(split)]


def from_json(p: list):
    from autofit.planning.candidates import Levers
    dtype, ck, loss, policy, split = p
    return Levers(dtype, ck, loss, False, policy), tuple(split)


def child(case_name: str, points_json: str) -> None:
    """Times `points_json`'s points interleaved for ROUNDS rounds in this process; prints, per
    point, [fastest CPU us/token, fastest wall us/token] (null where it did not fit) as JSON."""
    import bench_plan_quality as b  # here, not at the top: it imports this module
    from autofit.devices.cpu_budget import BudgetedCpuDevice
    from autofit.planning.budget import compute_budget
    from autofit.planning.trials import new_objects_only
    from autofit.units import parse_size
    case = next(c for c in b.CASES + b.SMALL_CASES if c.name == case_name)
    cfg, pts = case.config(), [from_json(p) for p in json.loads(points_json)]
    dev = BudgetedCpuDevice(budget_bytes=parse_size(case.budget))
    budget = compute_budget(dev.info, b.MARGIN).budget_bytes
    best: list = [[None, None] for _ in pts]
    with new_objects_only():
        for _ in range(ROUNDS):
            for i, (lv, split) in enumerate(pts):
                r = b.time_split(cfg, lv, list(split), dev, budget)
                if r is None:
                    continue
                now = [min(r["cpu"]) / r["tokens"] * 1e6, min(r["wall"]) / r["tokens"] * 1e6]
                best[i] = [v if o is None else min(o, v) for o, v in zip(best[i], now)]
    print(json.dumps(best))


def across(case_name: str, points: list, n: int = PROCESSES, progress=lambda s: None) -> dict:
    """Each of `points` ((Levers, split) pairs) timed in `n` fresh processes, one after another.
    Returns {point: {"cpu": [us/token per process], "wall": [...]}} (a process where the point
    did not fit adds nothing). Raises SystemExit when a process fails."""
    out: dict = {p: {"cpu": [], "wall": []} for p in points}
    arg = json.dumps([to_json(*p) for p in points])
    for i in range(n):
        r = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", case_name, arg],
                           capture_output=True, text=True, timeout=3600)
        if r.returncode != 0:
            raise SystemExit(f"a process of the cross-process stage failed: "
                             f"{(r.stderr.strip().splitlines() or ['?'])[-1]}")
        for p, (cpu, wall) in zip(points, json.loads(r.stdout.strip().splitlines()[-1])):
            if cpu is not None:
                out[p]["cpu"].append(cpu)
                out[p]["wall"].append(wall)
        progress(f"{case_name}: process {i + 1} of {n} of the finalists done")
    return out


def medians(xp: dict, key: str) -> dict:
    """{point: the median over processes of its fastest `key` ('cpu' or 'wall') us/token}."""
    return {p: statistics.median(v[key]) for p, v in xp.items() if v[key]}


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] != "--child":
        raise SystemExit("usage: bench_processes.py --child CASE POINTS_JSON")
    child(sys.argv[2], sys.argv[3])
