"""torch.compile in training: when it switches on, and how the model is compiled.

The loop starts eager and compiles after a warm-up (compile_after optimizer steps), so the first
steps (and any OOM in them) are cheap to recover from. Out-of-memory errors in the first
COMPILE_WINDOW steps after compile switches on are blamed on compilation: tracing and autotuning
raise the peak above the steady state.
"""
from __future__ import annotations

import torch

DEFAULT_COMPILE_AFTER = 20  # eager steps before torch.compile, when neither config nor plan says
COMPILE_WINDOW = 3


def resolve_compile_after(cfg) -> int:
    """A plan's warm-up before compiling: the config's compile_after, else 20 eager steps, or a
    tenth of a short run (at least 1)."""
    if cfg.compile_after is not None:
        return cfg.compile_after
    return min(DEFAULT_COMPILE_AFTER, max(1, cfg.max_iters // 10))


def compile_model(model: torch.nn.Module, backend: str = "inductor") -> torch.nn.Module:
    """A fresh torch.compile of `model` with static shapes: the full and the short last
    micro-batch each get their own graph, with no dynamic-shape retrace (as the probe's trials
    compile them). Dynamo's caches are reset first so no graph of an earlier compile is reused."""
    torch._dynamo.reset()
    return torch.compile(model, backend=backend, dynamic=False)
