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
        """After an OOM, when compile switches on or off, and after the optimizer state is made: a
        fresh reducer around `target` (the old one may be stopped half-way through a backward),
        with zero gradients that it makes views of its buckets. A reducer does that for gradients
        defined when it is built (torch's Reducer::initialize_bucket_views); without them, the
        next step's no_sync micro-batches made each .grad a tensor of its own until the synced
        backward copied it in, and at that backward's peak the buckets and the separate gradients
        were both live (one gradient copy more in step 0 and in every probe trial: 1.44 MB of a
        458k-parameter model's 16.6 MB, docs/estimator.md)."""
        self.module = None  # the old reducer and its buckets go first
        for p in self.model.parameters():
            p.grad = None
        for p in self.model.parameters():
            if p.requires_grad:
                p.grad = torch.zeros_like(p)
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

    FSDP2's collectives run inside the forward and the backward, so a rank that runs out of
    memory there would leave the others waiting in one. Every one of them is therefore preceded
    by an agreement round (Agreement.check_in), which raises OtherRankOOM on the ranks that did
    not fail, so all of them shrink and redo the step (`rewrap` then resets FSDP2's iteration
    state). In the forward: before each block's forward (before its all-gather) and after the
    whole forward, the loss included (before the backward's first all-gather). In the backward
    (_BackwardCheckIns): before the last block's pre-backward (after the loss head's and the
    final norm's backward, where the peak usually is), after each block's backward (before its
    reduce-scatter, which precedes the next block's all-gather), and after the embeddings'
    backward (before the root's reduce-scatter). And where torch lets FSDP2's communication be
    customised (FSDPModule.set_custom_all_gather: newer than the torch floor) one more after FSDP2 allocates each
    all-gather's or reduce-scatter's buffer, before it communicates: a block's whole weights or
    gradients, often the allocation that fails. On an older torch an OOM in that allocation
    still ends at the collective timeout (AUTOFIT_DIST_TIMEOUT)."""
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
        _BackwardCheckIns(model, self.agreement)
        _check_in_after_comm_buffers([*model.transformer.h, model], self.agreement)

    def micro_batch(self, last: bool):
        return contextlib.nullcontext()

    def finish(self) -> None:
        self.agreement.settle()

    @torch.no_grad()
    def clip_grad_norm(self, parameters, max_norm: float) -> torch.Tensor:
        """torch.nn.utils.clip_grad_norm_ (2-norm) on the sharded gradients, with an agreement
        round between the norms of this rank's shards (allocations that can fail) and the norm's
        all-reduce: torch's, on DTensors, all-reduces inside, where a rank that ran out of memory
        before it left the other in it (gloo then aborted both on mismatched collectives).
        Returns the whole gradient's norm before clipping, a 0-dim tensor on the device. Raises
        OtherRankOOM / RankFailed (check_in) when another rank failed first."""
        local = [_local(p.grad) for p in parameters if p.grad is not None]
        squares = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(local, 2.0)), 2.0) ** 2
        self.agreement.check_in()
        try:  # the shards are disjoint: the squares add up to the whole gradient's
            dist.all_reduce(squares, op=dist.ReduceOp.SUM)
        except RuntimeError as e:
            raise peer_lost(e, self.ranks) from None
        norm = squares.sqrt()
        torch._foreach_mul_(local, torch.clamp(max_norm / (norm + 1e-6), max=1.0))  # as torch's clip
        return norm

    def rewrap(self, target: torch.nn.Module | None = None) -> None:
        """After an OOM: FSDP2's per-iteration state reset and parameters back to their shards
        (a failed forward leaves blocks all-gathered, and its root marked as still inside a
        forward, so the next forward would skip the root's all-gather on this rank only), and no
        gradients. FSDP2 shards the modules in place, so a compiled `target` needs nothing more.
        `reset_iter_state` is FSDP2's documented recovery after an aborted forward or backward
        (torch 2.13); older torch only reshards, and a rank's OOM inside a forward can then leave
        the ranks out of step until the collective timeout. A backward that stopped before a
        block's reduce-scatter leaves that block's gradient on FSDP2's unsharded parameters
        (reset_iter_state keeps it), where the redo's backward would add to it: dropped too."""
        reset = getattr(self.model, "reset_iter_state", None)
        if reset is not None:
            reset()
        for m in [*self.model.transformer.h, self.model]:
            m.reshard()
            _drop_unsharded_grads(m)
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


class _CheckInFirst(torch.autograd.Function):
    """Identity on a block's input in the forward; in the backward, an agreement round once the
    block's backward is done, before the gradient goes on to FSDP2's post-backward node (its
    reduce-scatter), which FSDP2 put on the same input just before this one."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, agreement: Agreement) -> torch.Tensor:
        ctx.agreement = agreement
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ctx.agreement.check_in()
        return grad, None


class _BackwardCheckIns:
    """The backward's agreement rounds of FullySharded, each placed before one of FSDP2's
    collectives by the order in which autograd runs hooks (registration order on one tensor,
    queue order for the engine's end-of-backward callbacks):
    - on the last block's output, a tensor hook registered before FSDP2's pre-backward hook on
      it (a forward hook prepended to FSDP2's post-forward, which registers that one): before
      the last block's all-gather, after the loss head's and the final norm's backward;
    - on each block's input, an identity autograd node (_CheckInFirst) after FSDP2's
      post-backward node: after the block's backward, before its reduce-scatter;
    - on the model's output, a tensor hook (registered before FSDP2's root hook, which queues the
      root's post-backward callback) that queues an engine callback: after the embeddings'
      backward, before the root's reduce-scatter.
    Nothing is registered without a gradient (evaluation), nor while activation checkpointing
    recomputes a block inside the backward (its recomputed outputs get no gradient). The hooks
    run eagerly under torch.compile (dynamo-disabled, as FSDP2's own), since a round is a host
    collective."""

    def __init__(self, model: torch.nn.Module, agreement: Agreement):
        self.agreement = agreement
        disable = torch._dynamo.disable
        blocks = list(model.transformer.h)
        for block in blocks:
            block.register_forward_pre_hook(disable(self._wrap_input))  # appended: after FSDP2's
        blocks[-1].register_forward_hook(disable(self._on_last_output), prepend=True)
        model.register_forward_hook(disable(self._on_model_output), prepend=True)

    def _check_in(self, *_) -> None:
        self.agreement.check_in()

    def _queue_check_in(self, *_) -> None:
        torch.autograd.Variable._execution_engine.queue_callback(self._check_in)

    @staticmethod
    def _graphs(t) -> bool:
        """Whether `t` is a forward's output whose gradient the coming backward computes."""
        return (isinstance(t, torch.Tensor) and t.requires_grad and torch.is_grad_enabled()
                and torch._C._current_graph_task_id() == -1)

    def _wrap_input(self, module, args):
        if args and self._graphs(args[0]):
            return (_CheckInFirst.apply(args[0], self.agreement), *args[1:])
        return None

    def _on_last_output(self, module, args, output) -> None:
        if self._graphs(output):
            output.register_hook(self._check_in)

    def _on_model_output(self, module, args, output) -> None:
        if self._graphs(output):
            output.register_hook(self._queue_check_in)


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (FSDP2's parameters and gradients), or `t` itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def _drop_unsharded_grads(module: torch.nn.Module) -> None:
    """Frees the gradients FSDP2 accumulates on `module`'s unsharded parameters in a backward and
    hands on only in the post-backward (its reduce-scatter), which an aborted backward skips.
    FSDP2's internals (FSDPParam._unsharded_param, unsharded_accumulated_grad), read defensively:
    a torch that names them otherwise has nothing dropped here."""
    state = module._get_fsdp_state() if hasattr(module, "_get_fsdp_state") else None
    groups = getattr(state, "_fsdp_param_groups", None) or [getattr(state, "_fsdp_param_group", None)]
    for group in groups:
        for fsdp_param in getattr(group, "fsdp_params", None) or ():
            unsharded = getattr(fsdp_param, "_unsharded_param", None)
            if unsharded is not None:
                unsharded.grad = None
            if getattr(fsdp_param, "unsharded_accumulated_grad", None) is not None:
                fsdp_param.unsharded_accumulated_grad = None


def _check_in_after_comm_buffers(modules: list, agreement: Agreement) -> bool:
    """FSDP2's default all-gather and reduce-scatter on `modules`, with an agreement round after
    each buffer is allocated and before the collective: a rank whose allocation failed answers it
    from its OOM's outcome round instead of leaving the others inside the collective. Returns
    False (nothing changed) on a torch without custom FSDP2 communication."""
    try:
        from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultAllGather, DefaultReduceScatter
    except ImportError:
        return False
    if not all(hasattr(m, "set_custom_all_gather") and hasattr(m, "set_custom_reduce_scatter") for m in modules):
        return False

    def agreed(base):
        class Agreed(base):
            def allocate(self, size, *, dtype, device):
                buf = super().allocate(size, dtype=dtype, device=device)
                agreement.check_in()
                return buf
        return Agreed()
    gather, scatter = agreed(DefaultAllGather), agreed(DefaultReduceScatter)
    for m in modules:
        m.set_custom_all_gather(gather)
        m.set_custom_reduce_scatter(scatter)
    return True


PARALLELISMS = {"ddp": DataParallel, "fsdp2": FullySharded}


def wrap(kind: str, model: torch.nn.Module, device: torch.device, ranks: Ranks, agreement: Agreement):
    """The wrapper for `kind` ('ddp' or 'fsdp2'); call before the optimizer is made (FSDP2
    replaces the parameters with sharded ones). Raises ValueError for another kind."""
    if kind not in PARALLELISMS:
        raise ValueError(f"parallelism must be one of {sorted(PARALLELISMS)}, got {kind!r}")
    return PARALLELISMS[kind](model, device, ranks, agreement)
