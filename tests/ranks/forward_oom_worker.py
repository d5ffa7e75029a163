"""One rank of the mid-forward OOM tests (tests/test_multigpu.py): started by torchrun with 2
ranks on gloo; argv: parallelism ('ddp' or 'fsdp2'), a fault ('none', 'oom' or in 'train' mode
another site: train's docstring), an output folder, and 'eval' or 'train'. With 'oom', rank 1 runs
out of memory once inside block 1's forward: in 'eval' mid-way through its first eval batch of a
tiny GPT wrapped as the trainer wraps it; in 'train' at optimizer step 3 of a 6-step Trainer run. Writes <folder>/rank<N>.json: the final (eval)
micro-batch, the events (and in 'train' mode whose OOM each says), the losses."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from trainer.data.datasets import BatchSampler, load_dataset
from trainer.distributed.ranks import Ranks, exit_rank
from trainer.evaluate import Evaluator
from trainer.meter import NullMeter
from trainer.model.gpt import GPT, GPTConfig
from trainer.distributed.multirank import RankGroup


# Where rank 1 runs out of memory inside the backward ('train' mode): the loss head's backward
# (the gradient reaching the final norm's output), block 1's (its MLP's output: before block 1's
# reduce-scatter) and the embeddings' (after block 0's backward, before the root's reduce-scatter).
BACKWARD_SITES = {"head_backward": lambda m: m.transformer.ln_f,
                  "block_backward": lambda m: m.transformer.h[1].mlp,
                  "embedding_backward": lambda m: m.transformer.wte}


def _patch(owner, name: str, now, oom, after: bool = False) -> None:
    """owner.name raises the injected OOM once when now() holds: before the real call, or
    `after` it (the call's work done, as an OOM late in an optimizer update)."""
    real, left = getattr(owner, name), [1]

    def patched(*a, **k):
        fire = now() and left[0]
        if fire and not after:
            left[0] = 0
            oom()
        out = real(*a, **k)
        if fire and after:
            left[0] = 0
            oom()
        return out
    setattr(owner, name, patched)


# Where rank 1 runs out of memory inside the optimizer update ('train' mode): in clip_grad_norm_'s
# norms of its own gradients (before the norm's all-reduce), in clip_grad_norm_ as a whole (as
# torch's, before the sharded clip), in scaling the gradients by the clip coefficient (after the
# all-reduce, before any weight moves), and after the optimizer's step has moved every weight.
UPDATE_SITES = {
    "clip_norm": lambda t, now, oom: _patch(torch, "_foreach_norm", now, oom),
    "clip_call": lambda t, now, oom: _patch(torch.nn.utils, "clip_grad_norm_", now, oom),
    "clip_scale": lambda t, now, oom: _patch(torch, "_foreach_mul_", now, oom),
    "update": lambda t, now, oom: _patch(t.optimizer, "step", now, oom, after=True)}


def train(parallelism: str, fault: str, out: Path) -> dict:
    """A 6-step run of the trainer itself; with a fault, rank 1 runs out of memory at step 3, at
    the site the fault names ('oom': inside block 1's forward; BACKWARD_SITES; 'gather_buffer';
    'prime': before step 0 instead, making the optimizer's state),
    '/explicit' after it: without the check-ins after FSDP2's communication buffers, '/saved' after
    it: an evaluation and a checkpoint every 2 steps, '/rank0' after it: rank 0 runs out instead."""
    from trainer.config.train_config import load_config
    from trainer.loop import RunOptions, Trainer
    from trainer.step import InjectedOOM
    fault, _, backend = fault.partition("@")  # '...@aot_eager': that torch.compile backend (inductor)
    site, _, only = fault.partition("/")
    # 'compile' / 'compile_model': no fault, torch.compile (inductor) from step 2, scope blocks / model
    # '<site>/compile': the fault under torch.compile (blocks) from step 2
    compiled = dict(compile=True, compile_after=2, compile_scope=site[8:] or "blocks") if site.startswith(
        "compile") else dict(compile=True, compile_after=2) if only == "compile" else dict(compile=False)
    cfg = load_config(None, overrides=[f"{k}={v}" for k, v in dict(
        n_layer=2, n_head=2, n_embd=32, block_size=16, batch_size=4, gradient_accumulation_steps=1, dropout=0.0,
        dataset="embedded", max_iters=6, warmup_iters=1, lr_decay_iters=6, log_interval=1, eval_iters=1,
        eval_interval=2 if only == "saved" else 0,  # '/saved': a checkpoint at step 2, before the fault
        device="cpu", dtype="float32", parallelism=parallelism, out_dir=str(out / "run"), **compiled).items()])
    if only == "explicit":  # as on a torch without custom FSDP2 comms: the explicit check-ins alone
        from trainer.distributed import sharding
        sharding._check_in_after_comm_buffers = lambda *_: False
    trainer = Trainer(cfg, RunOptions(progress=False, meter=NullMeter(), compile_backend=backend or "inductor"))
    rank = trainer.rank
    faulty = 0 if only == "rank0" else 1
    now = lambda: rank == faulty and trainer.iter_num == 3 and max(trainer.micro_batches) > 1  # noqa: E731

    def oom(*_):
        if now():
            raise InjectedOOM(f"injected out of memory at {site}")

    model = trainer.model
    if site == "oom":  # inside block 1's forward
        model.transformer.h[1].register_forward_pre_hook(oom)
    elif site in BACKWARD_SITES:  # when the gradient reaches the module's output: inside the backward
        def on_output(module, args, out):
            if out.requires_grad:
                out.register_hook(oom)
        BACKWARD_SITES[site](model).register_forward_hook(on_output)
    elif site in UPDATE_SITES:  # inside the optimizer update, after the micro-batches
        UPDATE_SITES[site](trainer, now, oom)
    elif site == "prime":  # making the optimizer's state before step 0 (trainer.step.prime_optimizer)
        def prime_oom():
            # the allocator's words, which the trainer must not take for an OOM it can redo
            raise InjectedOOM("CUDA out of memory. Tried to allocate 2.00 MiB (injected in the optimizer's state)")
        _patch(trainer.optimizer, "step", lambda: rank == 1 and not trainer._primed, prime_oom)
    elif site == "gather_buffer":  # FSDP2's allocation of an all-gather's buffer, before the collective
        from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultAllocMixin
        allocate = DefaultAllocMixin.allocate
        DefaultAllocMixin.allocate = lambda self, *a, **k: (oom(), allocate(self, *a, **k))[1]
    res = trainer.run()
    return {"rank": rank, "micro_batch": max(res.micro_batches), "losses": res.losses,
            "events": [[e["event"], e["step"]] for e in res.events],
            "whose": [[e.get("reason"), e.get("oom_rank")] for e in res.events]}  # whose OOM each event says


def main() -> None:
    parallelism, fault, mode = sys.argv[1], sys.argv[2], sys.argv[4]
    if mode == "train":
        record = train(parallelism, fault, Path(sys.argv[3]))
        (Path(sys.argv[3]) / f"rank{record['rank']}.json").write_text(json.dumps(record))
        return
    ranks = Ranks.from_env()
    group = RankGroup(ranks, torch.device("cpu"), effective_batch=8, parallelism=parallelism)
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=256, n_layer=2, n_head=2, n_embd=32, dropout=0.0))
    group.wrap_model(model, seed=0)
    left = [1 if fault == "oom" and ranks.rank == 1 else 0]

    def oom_once(module, args):
        if left[0] and args[0].shape[0] > 2:
            left[0] -= 1
            raise torch.OutOfMemoryError("CUDA out of memory (injected in block 1)")

    model.transformer.h[1].register_forward_pre_hook(oom_once)
    events: list = []
    ev = Evaluator(BatchSampler(load_dataset("embedded"), 16, 7), iters=2, batch_size=8, micro_batch=8,
                   device=torch.device("cpu"), dtype="float32", meter=NullMeter(),
                   on_event=lambda kind, **kw: events.append([kind, kw]), agree=group.eval_agree,
                   total=group.sum_floats)  # every rank evaluates every batch: the sums over ranks give their mean
    losses = ev.evaluate(group.forward(model) if parallelism == "fsdp2" else model)
    record = {"rank": ranks.rank, "micro_batch": ev.micro_batch, "events": events, "losses": losses}
    (Path(sys.argv[3]) / f"rank{ranks.rank}.json").write_text(json.dumps(record))
    group.close()


if __name__ == "__main__":
    main()
    exit_rank(0)  # as autofit's own ranks end (python -m autofit)
