"""Start-up time of `autofit --help` against `python -c 'import torch'`, interleaved (A B A B ...)
so that the machine's load falls on both alike; prints each one's median and fastest run and
the ratio. A benchmark: it prints a table, nothing asserts on it.

    python scripts/bench_startup.py [--rounds 7]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

COMMANDS = {
    "autofit --help": [sys.executable, "-m", "autofit", "--help"],
    "autofit profiles list": [sys.executable, "-m", "autofit", "profiles", "list"],
    "python -c 'import torch'": [sys.executable, "-c", "import torch"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    times: dict[str, list[float]] = {k: [] for k in COMMANDS}
    for _ in range(args.rounds):
        for name, cmd in COMMANDS.items():
            t0 = time.perf_counter()
            subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
            times[name].append(time.perf_counter() - t0)
    ref = times["python -c 'import torch'"]
    print(f"{'command':<28} {'median s':>9} {'fastest s':>9} {'ratio (median)':>15} {'ratio (fastest)':>16}")
    for name, ts in times.items():
        print(f"{name:<28} {statistics.median(ts):9.3f} {min(ts):9.3f} "
              f"{statistics.median(ts) / statistics.median(ref):15.2f} {min(ts) / min(ref):16.2f}")
    load = os.getloadavg()
    print(f"{args.rounds} interleaved rounds; load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} "
          f"on {os.cpu_count()} CPUs (wall time, measured)")


if __name__ == "__main__":
    main()
