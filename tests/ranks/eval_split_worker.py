"""One rank of the split-evaluation tests (tests/test_eval_split.py): started by torchrun with 2 ranks
on gloo; argv: an output folder, a mode and the parallelism ('ddp', the default, or 'fsdp2').
'split': a tiny GPT evaluated twice with EVAL_ITERS batches per split through the trainer's hooks
(RankGroup.eval_hooks); in the second evaluation rank 0 runs out of memory once on the train
split's last batch, a round in which rank 1 has no batch. 'datafault': rank 1's first val batch
fails to read with a DataError. 'oom1': at eval micro-batch 1, rank 1 runs out of memory in every
forward. Writes <folder>/rank<N>.json: the batches this rank drew (split, counter), its forward
calls, the losses of each evaluation, the final eval micro-batch, the events, the sampler's
counters, and any error."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from trainer.data.datasets import BatchSampler, load_dataset
from trainer.data.tokenfiles import DataError
from trainer.distributed.multirank import RankGroup
from trainer.distributed.ranks import Ranks, exit_rank
from trainer.evaluate import Evaluator
from trainer.meter import NullMeter
from trainer.model.gpt import GPT, GPTConfig

EVAL_ITERS = 5  # not a multiple of 2: rank 1 has an empty last round in each split
BATCH, BLOCK, SEED = 8, 16, 7
DATA_LINE = "data/embedded/val.bin changed since the run opened it (a fault of the test)"


def tiny_model() -> GPT:
    """The test's model: the same weights on every rank and in the test's 1-rank reference."""
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=BLOCK, vocab_size=256, n_layer=1, n_head=2, n_embd=32, dropout=0.0))


OOM_LINE = "CUDA out of memory (injected at eval micro-batch 1)"


def main(out: Path, mode: str, parallelism: str) -> None:
    ranks = Ranks.from_env()
    group = RankGroup(ranks, torch.device("cpu"), effective_batch=BATCH, parallelism=parallelism)
    model = tiny_model()
    group.wrap_model(model, seed=0)
    sampler, drawn, forwards, oom_at = BatchSampler(load_dataset("embedded"), BLOCK, SEED), [], [0], [None]
    real = sampler.batch_at

    def batch_at(split, n, counter, rows=None):
        drawn.append([split, counter])
        if mode == "datafault" and ranks.rank == 1 and split == "val":
            raise DataError(DATA_LINE)
        return real(split, n, counter, rows)
    sampler.batch_at = batch_at

    def count(module, args):
        forwards[0] += 1
        if mode == "oom1" and ranks.rank == 1:
            raise torch.OutOfMemoryError(OOM_LINE)
        if drawn[-1] == oom_at[0] and args[0].shape[0] > BATCH // 2:
            oom_at[0] = None
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
    model.register_forward_pre_hook(count)
    events: list = []
    ev = Evaluator(sampler, iters=EVAL_ITERS, batch_size=BATCH, micro_batch=1 if mode == "oom1" else BATCH,
                   device=torch.device("cpu"),
                   dtype="float32", meter=NullMeter(), on_event=lambda kind, **kw: events.append([kind, kw]),
                   **group.eval_hooks())
    record = {"rank": ranks.rank, "error": None}
    try:
        first = ev.evaluate(model)  # the loop evaluates the unwrapped model, as here
        oom_at[0] = ["train", 2 * EVAL_ITERS - 1] if ranks.rank == 0 else None
        record["losses"] = [first, ev.evaluate(model)]
    except Exception as e:
        record.update(error=type(e).__name__, line=str(e))
    record.update(drawn=drawn, forwards=forwards[0], micro_batch=ev.micro_batch, events=events,
                  counters=sampler.counters)
    (out / f"rank{ranks.rank}.json").write_text(json.dumps(record))
    group.close()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else "ddp")
    exit_rank(0)  # as autofit's own ranks end (python -m autofit)
