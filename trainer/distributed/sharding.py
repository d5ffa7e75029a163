"""The two ways several ranks train one model, both PyTorch's own: DDP (every rank holds the whole
model; gradients all-reduced) and FSDP2 (`fully_shard` per transformer block and on the root:
weights, gradients and AdamW state sharded across the ranks, all-gathered block by block).

Both plug into trainer.step.train_step as its `sync_grads`: `micro_batch(last)` is the context
of one micro-batch's forward and backward, `finish()` is called after the step's last backward
and before the optimizer step, and `zero_grad_to_none` says how to clear the gradients.
`rewrap()` puts a clean wrapper in place after an out-of-memory error (every rank at once).

Deadlock-free OOM agreement with DDP: every rank's last micro-batch syncs as DDP does (its
reducer fills the gradient buckets), but the bucket all-reduce itself is deferred by a comm hook
until the ranks have agreed, in one round after the last backward, that every rank's backward
ran. A rank that ran out of memory mid-backward therefore leaves no other rank waiting inside a
bucket all-reduce. The price is that the all-reduce no longer overlaps the last backward.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from trainer.distributed.ranks import Agreement, Ranks, peer_lost


def _stash_bucket(stash: list, bucket):  # no return annotation: DDP checks it, and ours is a string
    """DDP comm hook: keeps the bucket's flat gradient buffer for the all-reduce after the
    agreement, and returns a completed Future of it unchanged (DDP's reducer then finishes the
    backward locally)."""
    stash.append(bucket.buffer())
    fut: torch.futures.Future = torch.futures.Future()
    fut.set_result(bucket.buffer())
    return fut


class DataParallel:
    """DDP around the model, its bucket all-reduce deferred until the ranks agree (see the
    module docstring). Gradients are views of DDP's buckets (gradient_as_bucket_view) and are
    zeroed, not freed, between steps, so they and the buckets are one allocation."""
    kind = "ddp"
    zero_grad_to_none = False

    def __init__(self, model: torch.nn.Module, device: torch.device, ranks: Ranks, agreement: Agreement):
        self.model, self.device, self.ranks, self.agreement = model, device, ranks, agreement
        self._stash: list[torch.Tensor] = []
        self.module: torch.nn.Module | None = None
        self.wrap(model)

    def wrap(self, target: torch.nn.Module) -> None:
        """DDP around `target` (the model, or its torch.compile wrapper); collective: every rank
        calls it at the same point (DDP checks the shapes and broadcasts rank 0's weights)."""
        from torch.nn.parallel import DistributedDataParallel as DDP
        self.module = None  # the old reducer and its buckets are freed first
        self._stash.clear()
        self._rebuilt = False
        ids = [self.device.index] if self.device.type == "cuda" else None
        try:
            ddp = DDP(target, device_ids=ids, gradient_as_bucket_view=True)
        except RuntimeError as e:
            raise peer_lost(e, self.ranks) from None
        ddp.register_comm_hook(self._stash, _stash_bucket)
        self.module, self._target = ddp, target

    def rewrap(self, target: torch.nn.Module | None = None) -> None:
        """After an OOM, or when compile switches on or off: a fresh reducer around `target` (the
        old one may be stopped half-way through a backward), with no gradients."""
        self.module = None
        for p in self.model.parameters():
            p.grad = None
        self.wrap(self._target if target is None else target)

    def micro_batch(self, last: bool):
        return contextlib.nullcontext() if last else self.module.no_sync()

    def finish(self) -> None:
        """Agrees on the step (raises OtherRankOOM / RankFailed when another rank failed), then
        averages the stashed buckets over the ranks, as DDP's default allreduce hook does."""
        self.agreement.settle()
        try:
            works = []
            for buf in self._stash:
                buf.div_(self.ranks.world_size)
                works.append(dist.all_reduce(buf, async_op=True))
            for w in works:
                w.wait()
            if not self._rebuilt:
                # DDP re-orders its buckets once, with a broadcast, in the forward after the first
                # synced backward. Here, where every rank is known to have finished the step, it
                # cannot meet a rank that failed before its forward (as DDP's own join hook does).
                self.module.reducer._rebuild_buckets()
                self._rebuilt = True
        except RuntimeError as e:
            raise peer_lost(e, self.ranks) from None
        finally:
            self._stash.clear()


def _fully_shard():
    """FSDP2's fully_shard: public in torch.distributed.fsdp from torch 2.6, under
    torch.distributed._composable.fsdp in 2.4 and 2.5 (docs/torch-floor.md)."""
    import importlib
    for module in ("torch.distributed.fsdp", "torch.distributed._composable.fsdp"):
        found = getattr(importlib.import_module(module), "fully_shard", None)
        if found is not None:
            return found
    raise ImportError("this torch has no FSDP2 (fully_shard); use parallelism = 'ddp'")


class FullySharded:
    """FSDP2: `fully_shard` on every transformer block, then on the root (embeddings, final
    norm, the tied head). Gradients are reduce-scattered in every micro-batch's backward: FSDP2's
    no-sync mode would accumulate them unsharded, giving back the memory that sharding is for
    (more communication is the price of the memory lever).

    Each block's forward starts with an agreement round (Agreement.check_in), and the whole
    forward ends with one, so an OOM in one rank's forward (the loss included) is known to the
    others before they wait in the next block's all-gather or the backward's; after it,
    `rewrap` resets FSDP2's iteration state. An OOM inside a backward cannot be agreed this way
    (its reduce-scatter is already in flight) and ends at the collective timeout
    (AUTOFIT_DIST_TIMEOUT) with one line, as Composer's FSDP hooks also leave it."""
    kind = "fsdp2"
    zero_grad_to_none = True

    def __init__(self, model: torch.nn.Module, device: torch.device, ranks: Ranks, agreement: Agreement):
        from torch.distributed.device_mesh import init_device_mesh
        self.model, self.device, self.ranks, self.agreement = model, device, ranks, agreement
        fully_shard = _fully_shard()
        mesh = init_device_mesh(device.type, (ranks.world_size,))
        for block in model.transformer.h:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        self.module = model
        check = lambda *_: self.agreement.check_in()  # noqa: E731
        for m in [model, *model.transformer.h]:
            m.register_forward_pre_hook(check, prepend=True)  # before FSDP's own all-gather
        # and once after the whole forward (the loss included), before the backward's first
        # all-gather: an OOM in the last block or the loss head is known before any rank goes on
        model.register_forward_hook(check)

    def micro_batch(self, last: bool):
        return contextlib.nullcontext()

    def finish(self) -> None:
        self.agreement.settle()

    def rewrap(self, target: torch.nn.Module | None = None) -> None:
        """After an OOM: FSDP2's per-iteration state reset and parameters back to their shards
        (a failed forward leaves blocks all-gathered, and its root marked as still inside a
        forward, so the next forward would skip the root's all-gather on this rank only), and no
        gradients. FSDP2 shards the modules in place, so a compiled `target` needs nothing more.
        `reset_iter_state` is FSDP2's documented recovery after an aborted forward or backward
        (torch 2.13); older torch only reshards, and a rank's OOM inside a forward can then leave
        the ranks out of step until the collective timeout."""
        reset = getattr(self.model, "reset_iter_state", None)
        if reset is not None:
            reset()
        for m in [*self.model.transformer.h, self.model]:
            m.reshard()
        for p in self.model.parameters():
            p.grad = None

    def full_state(self, optimizer: torch.optim.Optimizer) -> dict:
        """The whole model's and optimizer's state, gathered to rank 0 on the CPU (collective:
        every rank calls it; the others get empty dicts). The model's keys are those of a
        one-GPU run; the optimizer's are parameter names (torch.distributed.checkpoint's)."""
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                              get_optimizer_state_dict)
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return {"model": get_model_state_dict(self.model, options=opts),
                "optimizer": get_optimizer_state_dict(self.model, optimizer, options=opts)}

    def load_state(self, optimizer: torch.optim.Optimizer, model_state: dict, optim_state: dict) -> None:
        """Loads a full state dict (from rank 0's checkpoint, read by every rank) into the shards."""
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                              set_optimizer_state_dict)
        opts = StateDictOptions(full_state_dict=True)
        set_model_state_dict(self.model, model_state, options=opts)
        set_optimizer_state_dict(self.model, optimizer, optim_state, options=opts)


PARALLELISMS = {"ddp": DataParallel, "fsdp2": FullySharded}


def wrap(kind: str, model: torch.nn.Module, device: torch.device, ranks: Ranks, agreement: Agreement):
    """The wrapper for `kind` ('ddp' or 'fsdp2'); call before the optimizer is made (FSDP2
    replaces the parameters with sharded ones). Raises ValueError for another kind."""
    if kind not in PARALLELISMS:
        raise ValueError(f"parallelism must be one of {sorted(PARALLELISMS)}, got {kind!r}")
    return PARALLELISMS[kind](model, device, ranks, agreement)
