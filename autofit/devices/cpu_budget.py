"""The budgeted CPU device: real tensors on the CPU, with a memory budget enforced like a GPU's.

Every storage created by an op that runs under LiveBytesTracker (a TorchDispatchMode) is counted
once, by its untyped storage, and uncounted when the storage is freed (a weakref finalizer on the
storage object). That gives exact live bytes at storage granularity: views and in-place ops add
nothing. Going over the budget raises a real torch.OutOfMemoryError, so the trainer's OOM handling
and autofit's probe -> plan -> train -> recover path run unchanged on a machine with no GPU.

What dispatch does not see, and so is not counted:
- tensors created before the tracker was entered: register them with track_tensors/track_module/
  track_optimizer, or better, build the model and optimizer inside tracking();
UntypedStorage.resize_ is not an aten op through dispatch either, but FSDP2 frees and re-allocates
its unsharded parameters with it, so the tracker wraps it while active: growth is checked against
the budget like any allocation, shrinking gives the bytes back.
- tensors made from numpy (torch.from_numpy) or under torch._C._DisableTorchDispatch.
torch.compile: Dynamo does not compile frames while a TorchDispatchMode is active (checked on torch
2.13: the function runs eagerly), so a compile=True run on this device measures eager memory.
Unlike a real allocator there is no rounding and no fragmentation: this is "allocated", not
"reserved".
"""
from __future__ import annotations

import contextlib
import gc
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_flatten

from autofit.devices.cpu import cpu_info, default_cpu_budget
from autofit.devices.device import DeviceError, DeviceInfo
from autofit.units import fmt_bytes
from trainer.meter import MeterCapabilities, is_oom


def _logsumexp_temporary(args) -> int:
    """aten::logsumexp allocates (self - max), the input's size and dtype, inside its kernel
    (aten/src/ATen/native/ReduceOps.cpp, logsumexp_out_impl); an op-output tracker never sees it."""
    x = args[0] if args else None
    return x.numel() * x.element_size() if isinstance(x, torch.Tensor) and x.device.type == "cpu" else 0


# Ops whose kernels allocate temporaries that are none of their outputs, and how many bytes
# (autofit/planning/kernel_terms.py has the CUDA side). Counted as a transient peak, and refused
# against the budget, as a caching allocator would refuse them.
_INTERNAL_TEMPORARIES = {torch.ops.aten.logsumexp.default: _logsumexp_temporary}


def _internal_bytes(func, args) -> int:
    fn = _INTERNAL_TEMPORARIES.get(func)
    return fn(args) if fn is not None else 0


@dataclass
class _Entry:
    nbytes: int
    ref: weakref.ref  # the storage object; tells a freed-and-reused address from the same storage
    finalizer: weakref.finalize


class LiveBytesTracker(TorchDispatchMode):
    """Counts live bytes of CPU storages created by ops run under it; enforces `budget_bytes`."""

    def __init__(self, budget_bytes: int | None = None):
        super().__init__()
        self._budget: int | None = None
        self.budget_bytes = budget_bytes
        self.live_bytes = 0
        self.peak_bytes = 0
        self._entries: dict[int, _Entry] = {}  # storage data_ptr -> entry
        # Re-entrant: a finalizer can fire (storage freed) while we are inside the lock.
        self._lock = threading.RLock()

    @property
    def budget_bytes(self) -> int | None:
        return self._budget

    @budget_bytes.setter
    def budget_bytes(self, value: int | None) -> None:
        # Checked at every allocation, so lowering it mid-run takes effect at the next one.
        if value is not None and value <= 0:
            raise DeviceError(f"CPU budget must be positive, got {value} bytes")
        self._budget = None if value is None else int(value)

    # -- accounting -------------------------------------------------------------------------

    def _is_counted(self, st: torch.UntypedStorage) -> bool:
        e = self._entries.get(st.data_ptr())
        return e is not None and e.ref() is st

    def _new_storages(self, objs: Iterable[Any]) -> list[torch.UntypedStorage]:
        """Storages among `objs` (flattened tensors) that are not counted yet, each once. A
        wrapper subclass (FSDP2's DTensor) holds no storage of its own: its inner tensors (the
        local shard) are counted instead, since the ops on them run unseen inside its dispatch."""
        new: dict[int, torch.UntypedStorage] = {}
        todo = list(objs)
        while todo:
            t = todo.pop()
            if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
                continue
            if is_traceable_wrapper_subclass(t):
                todo.extend(getattr(t, name) for name in t.__tensor_flatten__()[0])
                continue
            try:
                st = t.untyped_storage()
                ptr = st.data_ptr()
            except (RuntimeError, NotImplementedError):  # sparse and other storage-less layouts
                continue
            if st.nbytes() == 0 or ptr in new or self._is_counted(st):
                continue
            new[st.data_ptr()] = st
        return list(new.values())

    def _check(self, need: int, what: str) -> None:
        if self._budget is not None and self.live_bytes + need > self._budget:
            raise torch.OutOfMemoryError(
                f"budgeted CPU device out of memory: tried to allocate {fmt_bytes(need)}; "
                f"{fmt_bytes(self.live_bytes)} of {fmt_bytes(self._budget)} budget in use ({what})")

    def _register(self, st: torch.UntypedStorage) -> None:
        ptr, n = st.data_ptr(), st.nbytes()
        with self._lock:
            old = self._entries.pop(ptr, None)
            if old is not None:  # the old storage at this address is gone but its finalizer is late
                old.finalizer.detach()
                self.live_bytes -= old.nbytes
            fin = weakref.finalize(st, self._release, ptr, id(st))
            fin.atexit = False  # nothing to account for at interpreter exit
            self._entries[ptr] = _Entry(n, weakref.ref(st), fin)
            self.live_bytes += n
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)

    def _release(self, ptr: int, storage_id: int) -> None:
        with self._lock:
            e = self._entries.get(ptr)
            # Only the storage that registered this entry may remove it (the address may be reused).
            if e is not None and (e.ref() is None or id(e.ref()) == storage_id):
                del self._entries[ptr]
                self.live_bytes -= e.nbytes

    # -- UntypedStorage.resize_ -------------------------------------------------------------

    def __enter__(self):
        self._orig_resize = torch.UntypedStorage.resize_
        tracker, orig = self, self._orig_resize

        def resize_(storage, nbytes):
            return tracker._resize(storage, int(nbytes), orig)
        torch.UntypedStorage.resize_ = resize_
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            torch.UntypedStorage.resize_ = self._orig_resize

    def _resize(self, st: torch.UntypedStorage, nbytes: int, orig):
        with self._lock:
            old = next((p for p, e in self._entries.items() if e.ref() is st), None)
            have = self._entries[old].nbytes if old is not None else 0
            if st.device.type == "cpu" and nbytes > have:
                self._check(nbytes - have, "UntypedStorage.resize_")
            out = orig(st, nbytes)
            if old is not None:  # the address changes with the size: count it again from scratch
                e = self._entries.pop(old)
                e.finalizer.detach()
                self.live_bytes -= e.nbytes
            if st.device.type == "cpu" and st.nbytes() > 0:
                self._register(st)
            return out

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        hidden = _internal_bytes(func, args)
        if hidden:  # a temporary the op's kernel makes and frees inside the call: a peak, then gone
            self._check(hidden, f"{func}'s internal temporary")
            self.peak_bytes = max(self.peak_bytes, self.live_bytes + hidden)
        out = func(*args, **(kwargs or {}))
        new = self._new_storages(tree_flatten(out)[0])
        need = sum(st.nbytes() for st in new)
        if need and self._budget is not None and self.live_bytes + need > self._budget:
            # A real allocator fails before the op runs; here the op already produced its output.
            # Drop it before raising, because the traceback keeps this frame's locals alive.
            del out, new
            self._check(need, str(func))
        for st in new:
            self._register(st)
        return out

    # -- tensors made outside the tracker ---------------------------------------------------

    def track_tensors(self, tensors: Any) -> int:
        """Count existing tensors (any nesting of lists/tuples/dicts); returns the bytes added.
        Raises torch.OutOfMemoryError, counting none of them, when they do not fit the budget."""
        new = self._new_storages(tree_flatten(tensors)[0])
        need = sum(st.nbytes() for st in new)
        if need:
            self._check(need, "registering existing tensors")
        for st in new:
            self._register(st)
        return need

    def track_module(self, module: torch.nn.Module) -> int:
        """Count a module's parameters, buffers and gradients."""
        params = list(module.parameters())
        return self.track_tensors(params + list(module.buffers())
                                  + [p.grad for p in params if p.grad is not None])

    def track_optimizer(self, optimizer: torch.optim.Optimizer) -> int:
        """Count an optimizer's state (AdamW exp_avg, exp_avg_sq, step)."""
        return self.track_tensors([dict(s) for s in optimizer.state.values()])

    def reset_peak(self) -> None:
        self.peak_bytes = self.live_bytes


class BudgetedCpuDevice:
    """CPU device with a memory budget, implementing autofit.devices.device.Device.

    The trainer should build the model and optimizer inside tracking() so that every storage is
    counted from birth; anything built outside must be registered through `tracker.track_*`.
    Without an explicit budget it gets DEFAULT_CPU_BUDGET_SHARE (50%) of the RAM available now.
    It measures allocated bytes only (no caching allocator, so no reserved bytes and no retries),
    and Dynamo compiles nothing while its tracker is active.
    """
    capabilities = MeterCapabilities(measures=True, reserved=False, alloc_retries=False, compile=False)
    runs_trials = True
    context_bytes = None

    def __init__(self, budget_bytes: int | None = None):
        self.tracker = LiveBytesTracker(default_cpu_budget() if budget_bytes is None else budget_bytes)
        self.default_budget = budget_bytes is None  # no --budget: its info's note says how it was set
        self.torch_device = torch.device("cpu")
        self._depth = 0

    @property
    def budget_bytes(self) -> int:
        assert self.tracker.budget_bytes is not None
        return self.tracker.budget_bytes

    @budget_bytes.setter
    def budget_bytes(self, value: int) -> None:
        if value is None:
            raise DeviceError("the budgeted CPU device needs a budget")
        self.tracker.budget_bytes = value

    @contextlib.contextmanager
    def tracking(self) -> Iterator[BudgetedCpuDevice]:
        # Nested use (model build inside a run scope, then each step) shares the one mode that is
        # already active; entering it again would push it twice on the dispatch stack.
        if self._depth:
            self._depth += 1
            try:
                yield self
            finally:
                self._depth -= 1
            return
        with self.tracker:
            self._depth = 1
            try:
                yield self
            finally:
                self._depth = 0

    def reset_peak(self) -> None:
        self.tracker.reset_peak()

    def peak_bytes(self) -> int | None:
        return self.tracker.peak_bytes

    def peak_reserved_bytes(self) -> int | None:
        return None

    def current_bytes(self) -> int:
        return self.tracker.live_bytes

    def alloc_retries(self) -> int | None:
        return None

    def cleanup(self) -> None:
        # Collect first: tensors caught in reference cycles (e.g. via an old traceback) are only
        # freed by the cycle collector, and their finalizers are what lower live_bytes.
        gc.collect()
        self.tracker.reset_peak()

    def is_oom(self, exc: BaseException) -> bool:
        return is_oom(exc)

    def spec(self) -> dict:
        return {"kind": "cpu-budgeted", "budget_bytes": self.budget_bytes}

    def limit_bytes(self) -> int | None:
        return self.budget_bytes

    @contextlib.contextmanager
    def limited_to(self, limit_bytes: int) -> Iterator[None]:
        """While probing, the budget is lowered to the planning budget, so an over-budget trial
        raises OOM in its first step; it comes back after."""
        saved = self.budget_bytes
        self.budget_bytes = min(saved, limit_bytes)
        try:
            yield
        finally:
            self.budget_bytes = saved

    def refresh_context(self) -> int | None:
        return None

    @property
    def info(self) -> DeviceInfo:
        return cpu_info(self.budget_bytes, used_bytes=self.tracker.live_bytes, default=self.default_budget)
