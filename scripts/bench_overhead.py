"""Benchmark: the trainer's per-step overhead against a bare loop of the same model, in one process.

The bare loop is what a minimal nanoGPT-style script does per optimizer step: set the LR, draw the
step's batch, call trainer.step.train_step, read nothing back. The trainer is trainer.loop.Trainer
with everything it does per step (batches one step ahead, the OOM guard, the thrash check where the
meter has one, logging on log steps only). Per-step time is the difference of two runs of N and
N + M steps divided by M, so set-up, the first steps and the final checkpoint cancel out; the two
kinds alternate over several repetitions and the medians are compared. Prints a table.

Two clocks: wall time, and this process's CPU time (time.process_time, every thread's), which
other processes on a shared machine cannot inflate; on a GPU the wall clock is the one to read.

    .venv/bin/python scripts/bench_overhead.py [--device cpu|cuda] [--reps 3] [--json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.config.train_config import load_config  # noqa: E402
from trainer.data.datasets import BatchSampler, load_dataset  # noqa: E402
from trainer.loop import RunOptions, Trainer  # noqa: E402
from trainer.model.gpt import GPT, GPTConfig  # noqa: E402
from trainer.schedule import lr_at  # noqa: E402
from trainer.step import check_dtype, make_optimizer, train_step  # noqa: E402

N, M = 10, 30  # steps of the short and the long run: per-step time = (t(N + M) - t(N)) / M


def config(out: str, steps: int, device: str):
    over = dict(n_layer=4, n_head=4, n_embd=128, block_size=128, batch_size=16, gradient_accumulation_steps=2,
                max_iters=steps, lr_decay_iters=steps, warmup_iters=2, eval_interval=0, log_interval=10 ** 6,
                dataset="embedded", compile=False, device=device, out_dir=out,
                dtype="float32" if device == "cpu" else "auto")
    return load_config(preset="tiny", overrides=[f"{k}={v}" for k, v in over.items()])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare(steps: int, device: str) -> tuple[float, float]:
    """(wall, CPU) seconds for `steps` optimizer steps of the bare loop (after building the model)."""
    cfg = config("unused", steps, device)
    dev = torch.device(device)
    torch.manual_seed(cfg.seed)
    model = GPT(GPTConfig.from_train_config(cfg)).to(dev)
    opt = make_optimizer(model, learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay,
                         betas=(cfg.beta1, cfg.beta2), device_type=dev.type)
    sampler = BatchSampler(load_dataset(cfg.dataset), cfg.block_size, cfg.seed)
    dtype = check_dtype(cfg.dtype, dev)
    _sync(dev)
    t0, c0 = time.perf_counter(), time.process_time()
    for it in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(it, cfg)
        x, y = sampler.sample("train", cfg.effective_batch)
        train_step(model, opt, x, y, [cfg.batch_size] * cfg.gradient_accumulation_steps, dtype=dtype,
                   grad_clip=cfg.grad_clip)
    _sync(dev)
    return time.perf_counter() - t0, time.process_time() - c0


def trainer(steps: int, device: str) -> tuple[float, float]:
    """(wall, CPU) seconds of Trainer.run() for `steps` optimizer steps (its set-up excluded)."""
    with tempfile.TemporaryDirectory() as out:
        t = Trainer(config(out, steps, device), RunOptions(progress=False))
        _sync(t.device)
        t0, c0 = time.perf_counter(), time.process_time()
        t.run()
        _sync(t.device)
        return time.perf_counter() - t0, time.process_time() - c0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1,
                    help="intra-op threads (1: no OpenMP spin-waiting on a shared machine inflates the CPU clock)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    per_step = {clock: {"bare loop": [], "trainer": []} for clock in ("wall", "cpu")}
    for _ in range(a.reps):  # alternate, so a drifting machine slows both alike
        for name, fn in (("bare loop", bare), ("trainer", trainer)):
            short, long = fn(N, a.device), fn(N + M, a.device)
            for i, clock in enumerate(("wall", "cpu")):
                per_step[clock][name].append((long[i] - short[i]) / M)
    med = {c: {k: statistics.median(v) for k, v in d.items()} for c, d in per_step.items()}
    ratio = {c: med[c]["trainer"] / med[c]["bare loop"] for c in med}
    result = {"device": a.device, "torch": torch.__version__, "threads": torch.get_num_threads(),
              "ms_per_step": {c: {k: round(v * 1000, 3) for k, v in d.items()} for c, d in med.items()},
              "all_ms_per_step": {c: {k: [round(x * 1000, 3) for x in v] for k, v in d.items()}
                                  for c, d in per_step.items()},
              "ratio": {c: round(r, 4) for c, r in ratio.items()}, "target": 1.02}
    if a.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"per-step time (measured, median of {a.reps} alternating repetitions, (t({N + M}) - t({N})) / {M}); "
          f"{a.device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"| {'clock':<5} | {'loop':<10} | {'ms/step':>8} | each repetition (ms/step)")
    print(f"|{'-' * 7}|{'-' * 12}|{'-' * 10}|{'-' * 40}")
    for c in per_step:
        for k in per_step[c]:
            print(f"| {c:<5} | {k:<10} | {med[c][k] * 1000:8.2f} | {', '.join(f'{x * 1000:.2f}' for x in per_step[c][k])}")
    print(f"ratio trainer / bare loop: wall {ratio['wall']:.3f}, CPU time {ratio['cpu']:.3f} (target <= 1.02)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
