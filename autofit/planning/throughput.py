"""Estimated training throughput, for when no matching GPU is here to measure it.

FLOPs per token of a training step: 6N (forward 2N, backward 4N, N the parameters) plus the
attention's 12 * n_layer * n_embd * block_size (PaLM, Chowdhery et al. 2022, appendix B; the same
count as nanoGPT's estimate_mfu). The card's peak comes from its hardware profile.

Recomputation, as extra step time with every block checkpointed (k-th blocks: a k-th of it):
- full: the whole forward again, 2N of the 6N FLOPs, so 1/3 more;
- selective: only what trainer/model/sac_ops.py SAC_SAVED_OPS does not save (norms, activations,
  RoPE, residual adds: elementwise, memory-bound, no matmul), which a FLOP count cannot price.
  The figure is torchtitan's: its selective policy costs 8.5 % of the throughput of no
  checkpointing on Llama3-8B (pytorch/torchtitan#2570, as quoted in autofit issue 16), a step
  1 / (1 - 0.085) = 1.093x as long. torchtitan's save list also recomputes every second matmul
  (torchtitan/distributed/activation_checkpoint.py), ours keeps them all, so for this model it is
  an upper bound. torchtitan#97 measured full vs selective on Llama 7B at 4.91 vs 4.55 s a step.
"""
from __future__ import annotations

from autofit.planning.estimate import ModelShape, param_count

ASSUMED_MFU = 0.40  # estimated mode only: fraction of the card's peak bf16/fp16 rate reached
# How an estimated rate was got, where it is printed (autofit.report.render.plan_rate_words)
RATE_WORDS = "from the card's peak TFLOP/s and an assumed MFU"
# extra step time of recomputation with every block checkpointed, by policy (module docstring)
RECOMPUTE_SHARE = {"full": 1.0 / 3.0, "selective": 0.085 / (1.0 - 0.085)}


def flops_per_token(shape: ModelShape) -> int:
    """Training FLOPs per token (forward + backward), 6N + 12 * L * C * T, N without the tables
    that are looked up, not multiplied: the learned positions, and the input embedding where it
    is not tied to the head (nanoGPT's estimate_mfu leaves out the positions the same way)."""
    lookups = (shape.block_size * shape.n_embd if shape.pos_emb == "learned" else 0) \
        + (0 if shape.tie_embeddings else shape.vocab_size * shape.n_embd)
    return 6 * (param_count(shape) - lookups) + 12 * shape.n_layer * shape.n_embd * shape.block_size


def peak_tflops(hw, dtype: str, tf32: bool = True) -> float:
    """The dense matmul peak (TFLOP/s) of hardware profile `hw` for `dtype`. bf16 and fp16: the
    profile's figures. fp32 with TF32 on (the trainer's default, as nanoGPT's) on compute
    capability 8.0 or newer: half the fp16 (fp32-accumulate) figure, the ratio of every Ampere,
    Ada and Hopper whitepaper (A100 156 / 312, H100 SXM 495 / 989, RTX 4090 82.6 / 165.2 dense).
    fp32 without tensor cores: a rough quarter of fp16 (the CUDA-core fp32 rate is 1/2 to 1/16 of
    the fp16 tensor rate across cards: RTX 4090 1/2, V100 and T4 1/8, A100 1/16)."""
    if dtype == "bfloat16":
        return hw.peak_bf16_tflops
    if dtype == "float16":
        return hw.peak_fp16_tflops
    return hw.peak_fp16_tflops / (2 if tf32 and tuple(hw.compute_capability) >= (8, 0) else 4)


def estimated_tokens_per_s(shape: ModelShape, micro_batch: int, dtype: str, checkpointing: int, hw,
                           checkpointing_policy: str = "full", tf32: bool = True) -> float:
    """Tokens/s on the card of hardware profile `hw`: its dense peak for `dtype` (peak_tflops;
    `tf32`: the config's tf32) x an assumed 40% MFU, over flops_per_token, with recomputation's
    extra time (RECOMPUTE_SHARE by policy, times the share of blocks checkpointed: ceil(L / k) of
    L), with small micro-batches under-filling the GPU (m / (m + 2)).
    An estimate, never a measurement. Raises KeyError for an unknown policy."""
    peak = peak_tflops(hw, dtype, tf32) * 1e12
    # blocks 0, k, 2k, ... are checkpointed (trainer.model.gpt): ceil(L / k) of the L blocks recompute
    share = -(-shape.n_layer // checkpointing) / shape.n_layer if checkpointing else 0.0
    recompute = 1.0 + RECOMPUTE_SHARE[checkpointing_policy] * share
    return peak * ASSUMED_MFU / (flops_per_token(shape) * recompute) * micro_batch / (micro_batch + 2)
