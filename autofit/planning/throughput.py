"""Estimated training throughput, for when no matching GPU is here to measure it.

FLOPs per token of a training step: 6N (forward 2N, backward 4N, N the parameters) plus the
attention's 12 * n_layer * n_embd * block_size (PaLM, Chowdhery et al. 2022, appendix B; the same
count as nanoGPT's estimate_mfu). The card's peak comes from its hardware profile.
"""
from __future__ import annotations

from autofit.planning.estimate import ModelShape, param_count

ASSUMED_MFU = 0.40  # estimated mode only: fraction of the card's peak bf16/fp16 rate reached


def flops_per_token(shape: ModelShape) -> int:
    """Training FLOPs per token (forward + backward), 6N + 12 * L * C * T."""
    return 6 * param_count(shape) + 12 * shape.n_layer * shape.n_embd * shape.block_size


def estimated_tokens_per_s(shape: ModelShape, micro_batch: int, dtype: str, checkpointing: int, hw) -> float:
    """Tokens/s on the card of hardware profile `hw`: its dense peak x an assumed 40% MFU, over
    flops_per_token, x 3/4 with full recomputation, with small micro-batches under-filling the
    GPU (m / (m + 2)). An estimate, never a measurement."""
    peak = (hw.peak_bf16_tflops if dtype == "bfloat16" else hw.peak_fp16_tflops if dtype == "float16"
            else hw.peak_fp16_tflops / 4) * 1e12  # fp32 without tensor cores: a rough quarter
    recompute = 1.0 + (1.0 / 3.0) / max(1, checkpointing) if checkpointing else 1.0
    return peak * ASSUMED_MFU / (flops_per_token(shape) * recompute) * micro_batch / (micro_batch + 2)
