"""One rank of the mid-run data failure test (tests/test_rank_leaving.py): started by torchrun with 2
ranks on gloo; argv: an output folder. A tiny Trainer run of 6 steps, checkpointed at step 2, in
which rank 1's step batch at step 3 fails to read with a DataError (as TokenSplit.check_unchanged
raises when train.bin is rewritten under a run). Writes <folder>/rank<N>.json: the error's line
(its type and text)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from trainer.config.train_config import load_config
from trainer.data.batches import StepBatches
from trainer.data.tokenfiles import DataError
from trainer.distributed.ranks import Ranks, exit_rank
from trainer.loop import RunOptions, train

DATA_LINE = "data/embedded/train.bin changed since the run opened it (a fault of the test)"


def main(out: Path) -> None:
    rank = Ranks.from_env().rank
    if rank == 1:
        real, taken = StepBatches.take, [0]

        def take(self, n):
            taken[0] += 1
            if taken[0] == 4:  # step 3's batch
                raise DataError(DATA_LINE)
            return real(self, n)
        StepBatches.take = take
    cfg = load_config(preset="tiny", overrides=[f"{k}={v}" for k, v in dict(
        n_layer=1, n_embd=16, n_head=2, block_size=16, batch_size=2, gradient_accumulation_steps=2,
        dataset="embedded", max_iters=6, eval_interval=2, eval_iters=1, always_save_checkpoint=True,
        dtype="float32", compile=False, device="cpu", out_dir=out / "run").items()])
    try:
        train(cfg, RunOptions(progress=False))
        said = {"error": None}
    except Exception as e:
        said = {"error": type(e).__name__, "line": str(e)}
    (out / f"rank{rank}.json").write_text(json.dumps(said))
    exit_rank(0)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
