"""The peers of scripts/bench_plan_quality.py: Lightning's BatchSizeFinder and Accelerate's
find_executable_batch_size on the same GPT, budgeted CPU device and planning budget. Run with the
python of a throwaway venv that holds lightning and accelerate (never autofit dependencies);
prints one JSON line: {peer: {batch, seconds, cpu_seconds, steps, sequences}} (sequences: those
sent into a forward pass, a failed attempt's counted whole). Import time is not counted.

The one adapter: both libraries tell an OOM by its message ('CUDA out of memory', 'DefaultCPU
Allocator: can't allocate memory'); their checks are patched to also accept torch.OutOfMemoryError,
which the budgeted CPU device raises (a CUDA OOM is one too, so on a GPU nothing changes).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from autofit.devices.cpu_budget import BudgetedCpuDevice  # noqa: E402
from autofit.planning.budget import compute_budget  # noqa: E402
from autofit.units import parse_size  # noqa: E402
from trainer.config.train_config import load_config  # noqa: E402
from trainer.model.gpt import GPT, GPTConfig  # noqa: E402
from trainer.step import make_optimizer  # noqa: E402

MARGIN = 0.10


def data(cfg, n: int):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (n, cfg.block_size), generator=g)
    y = torch.randint(0, cfg.vocab_size, (n, cfg.block_size), generator=g)
    return torch.utils.data.TensorDataset(x, y)


def lightning_finder(cfg, dev, budget: int) -> dict:
    import lightning as L
    from lightning.pytorch.tuner import Tuner
    import lightning.pytorch.tuner.batch_size_scaling as bss
    real = bss.is_oom_error
    bss.is_oom_error = lambda e: isinstance(e, torch.OutOfMemoryError) or real(e)
    steps, seqs = [0], [0]

    class Lit(L.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.model = GPT(GPTConfig.from_train_config(cfg))
            self.batch_size = 2

        def training_step(self, batch, i):
            steps[0] += 1
            seqs[0] += len(batch[0])
            return self.model(*batch)

        def configure_optimizers(self):
            return make_optimizer(self.model, learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                  betas=(cfg.beta1, cfg.beta2), device_type="cpu")

        def train_dataloader(self):
            return torch.utils.data.DataLoader(data(cfg, cfg.effective_batch), batch_size=self.batch_size)

    with dev.tracking(), dev.limited_to(budget):
        t0, c0 = time.perf_counter(), time.process_time()
        lit = Lit()
        trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False)
        found = Tuner(trainer).scale_batch_size(lit)  # defaults: mode 'power', init 2, 3 steps per trial
        secs, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"batch": found, "seconds": secs, "cpu_seconds": cpu, "steps": steps[0], "sequences": seqs[0]}


def accelerate_finder(cfg, dev, budget: int) -> dict:
    import accelerate.utils.memory as am
    real = am.should_reduce_batch_size
    am.should_reduce_batch_size = lambda e: isinstance(e, torch.OutOfMemoryError) or real(e)
    steps, seqs = [0], [0]

    @am.find_executable_batch_size(starting_batch_size=128)
    def train(batch_size):
        torch.manual_seed(0)
        model = GPT(GPTConfig.from_train_config(cfg))
        opt = make_optimizer(model, learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay,
                             betas=(cfg.beta1, cfg.beta2), device_type="cpu")
        x, y = data(cfg, batch_size).tensors
        for _ in range(3):
            steps[0] += 1
            seqs[0] += batch_size
            model(x, y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return batch_size

    with dev.tracking(), dev.limited_to(budget):
        t0, c0 = time.perf_counter(), time.process_time()
        found = train()
        secs, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"batch": found, "seconds": secs, "cpu_seconds": cpu, "steps": steps[0], "sequences": seqs[0]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--overrides", default="[]")
    ap.add_argument("--budget", required=True)
    args = ap.parse_args()
    cfg = load_config(preset="tiny", overrides=json.loads(args.overrides))
    import lightning  # noqa: F401  (import time is not counted)
    import accelerate  # noqa: F401
    out = {}
    for peer, fn in (("lightning BatchSizeFinder", lightning_finder), ("accelerate find_executable_batch_size",
                                                                       accelerate_finder)):
        dev = BudgetedCpuDevice(budget_bytes=parse_size(args.budget))
        budget = compute_budget(dev.info, MARGIN).budget_bytes
        out[peer] = fn(cfg, dev, budget)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
