"""torch.compile in training: when it switches on, and how the model is compiled.

The loop starts eager and compiles after a warm-up (compile_after optimizer steps), so the first
steps (and any OOM in them) are cheap to recover from. Out-of-memory errors in the first
COMPILE_WINDOW steps after compile switches on (or new shapes start compiling: a stage, a shrink)
are blamed on compilation: tracing and autotuning raise the peak above the steady state.

By default each transformer block is compiled on its own (regional compilation, as torchtitan
does): the blocks share one graph per input shape, so compiling costs about one block's worth
instead of the whole model's, and the rest (embeddings, the loss head) runs eagerly. scope
'model' compiles the whole model as nanoGPT does. Inductor's on-disk caches stay on, so a second
run with the same shapes compiles from cache.
"""
from __future__ import annotations

from typing import Literal

import torch

DEFAULT_COMPILE_AFTER = 20  # eager steps before torch.compile, when neither config nor plan says
COMPILE_WINDOW = 3
CompileScope = Literal["blocks", "model"]


def resolve_compile_after(cfg) -> int:
    """A plan's warm-up before compiling: the config's compile_after, else 20 eager steps, or a
    tenth of a short run (at least 1)."""
    if cfg.compile_after is not None:
        return cfg.compile_after
    return min(DEFAULT_COMPILE_AFTER, max(1, cfg.max_iters // 10))


def compile_model(model: torch.nn.Module, backend: str = "inductor", scope: CompileScope = "blocks") -> torch.nn.Module:
    """Compiles `model` (a trainer.model.gpt.GPT) with static shapes, dynamic=False: the full and the
    short last micro-batch each get their own graph, with no dynamic-shape retrace (the probe's
    trials compile the same way). Returns the module to call: the model itself with each block
    compiled in place (scope 'blocks'; state-dict names unchanged), or torch.compile's wrapper of
    the whole model (scope 'model'). Dynamo's in-memory caches are reset first, so no graph of an
    earlier compile is reused."""
    torch._dynamo.reset()
    if scope == "model":
        return torch.compile(model, backend=backend, dynamic=False)
    if scope != "blocks":
        raise ValueError(f"compile scope must be 'blocks' or 'model', got {scope!r}")
    for block in model.transformer.h:
        block.compile(backend=backend, dynamic=False)
    return model


def uncompile(model: torch.nn.Module) -> torch.nn.Module:
    """Back to eager: the blocks' compiled calls dropped and Dynamo's caches reset, so no compiled
    state outlives its use. Returns the eager module."""
    for block in model.transformer.h:
        block._compiled_call_impl = None  # what nn.Module.compile set (torch >= 2.2)
    torch._dynamo.reset()
    return model


def is_compiled(model: torch.nn.Module, forward: torch.nn.Module) -> bool:
    """Whether `forward` (what the loop calls) runs compiled code for `model`."""
    return forward is not model or any(b._compiled_call_impl is not None for b in model.transformer.h)
