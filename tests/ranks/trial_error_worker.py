"""One rank of the trial-error test (tests/test_multigpu.py): started by torchrun with 2 ranks on
gloo; argv: parallelism ('ddp' or 'fsdp2') and an output folder. Rank 1's train_step raises a
RuntimeError (not an OOM) in a probe trial of a tiny GPT on a budgeted CPU device; rank 0's runs.
Writes <folder>/rank<N>.json: this rank's trial record (status, met_other_rank, note) and the
record agreed over the ranks (agree.trial)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import autofit.planning.trials as trials
from autofit.devices.cpu_budget import BudgetedCpuDevice
from autofit.planning import agree
from autofit.records import Candidate
from trainer.config.train_config import load_config
from trainer.distributed.ranks import Ranks, exit_rank, start, stop


def main(parallelism: str, out: Path) -> None:
    start("cpu")
    rank = Ranks.from_env().rank
    real = trials.train_step

    def step(*a, **k):
        if rank == 1:
            raise RuntimeError("kernel exploded on rank 1\nsecond line, not said")
        return real(*a, **k)
    trials.train_step = step
    cfg = load_config(preset="tiny", overrides=["n_layer=1", "n_embd=32", "n_head=2", "block_size=32",
                                                "vocab_size=256", "batch_size=8", "gradient_accumulation_steps=1"])
    dev = BudgetedCpuDevice(budget_bytes=200_000_000)
    cand = Candidate(micro_batch=2, dtype="float32", compile=False, checkpointing=0, loss_impl="standard",
                     sharded=parallelism == "fsdp2")
    rec = trials.run_trial(cfg, cand, dev, rank_batch=4, budget_bytes=200_000_000)
    agreed = agree.trial(rec)
    (out / f"rank{rank}.json").write_text(json.dumps({
        "status": rec.status, "met": rec.met_other_rank, "note": rec.note,
        "agreed_status": agreed.status, "agreed_note": agreed.note}))
    stop()
    exit_rank(0)


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
