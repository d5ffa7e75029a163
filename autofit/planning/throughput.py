"""Estimated training throughput, for when no matching GPU is here to measure it: a roofline.

A micro-batch's time is the largest of three floors (each an estimate, never a measurement):
- compute: its FLOPs over the card's dense peak for the dtype (peak_tflops) x ASSUMED_MFU, with
  small micro-batches under-filling the GPU (tokens / (tokens + FILL_TOKENS));
- memory: the bytes it must move over the card's memory bandwidth (the profile's
  memory_bandwidth_gbs): the activations of each token (bytes_per_token) and the weights, gradients
  and optimizer state (WEIGHT_BYTES_PER_MICRO_BATCH, UPDATE_BYTES, per parameter);
- launches: the kernels its eager forward, backward and share of the optimizer step launch
  (autofit/planning/launches.py, by the model's architecture and optimizer) x LAUNCH_SECONDS each.
The optimizer step's own traffic and kernels are shared among the step's micro-batches by their
tokens, so the micro-batches' times add up to the step's.

FLOPs per token of a training step: 6N (forward 2N, backward 4N, N the parameters) plus the
attention's 12 * n_layer * n_embd * block_size (PaLM, Chowdhery et al. 2022, appendix B; the same
count as nanoGPT's estimate_mfu). The card's peak comes from its hardware profile; where the profile
has a sustained_tflops (a card whose power limit keeps it below the boost clock its datasheet peak
assumes, such as the 70 W T4) every rate is scaled down by the sustained share.

Recomputation, as extra step time with every block checkpointed (k-th blocks: a k-th of it):
- full: the whole forward again, 2N of the 6N FLOPs, so 1/3 more;
- selective: only what trainer/model/sac_ops.py SAC_SAVED_OPS does not save (norms, activations,
  RoPE, residual adds: elementwise, memory-bound, no matmul), which a FLOP count cannot price.
  The figure is torchtitan's: its selective policy costs 8.5 % of the throughput of no
  checkpointing on Llama3-8B (pytorch/torchtitan#2570, as quoted in autofit issue 16), a step
  1 / (1 - 0.085) = 1.093x as long. torchtitan's save list also recomputes every second matmul
  (torchtitan/distributed/activation_checkpoint.py), ours keeps them all, so for this model it is
  an upper bound. torchtitan#97 measured full vs selective on Llama 7B at 4.91 vs 4.55 s a step.
The same share lengthens the memory floor (the recomputed forward moves its bytes again); the
launch floor counts the recomputed forward's kernels themselves (launches.recompute_kernels).
"""
from __future__ import annotations

from dataclasses import dataclass

from autofit.planning import launches
from autofit.planning.estimate import ModelShape, param_count

ASSUMED_MFU = 0.40  # estimated mode only: fraction of the card's peak bf16/fp16 rate reached
# A micro-batch under-fills the GPU by tokens / (tokens + FILL_TOKENS): its matmuls' row count is
# its tokens, whatever the sequences' length. 2048 is two of nanoGPT's 1024-token sequences, so at
# block 1024 this is the m / (m + 2) by sequences it replaces; that one took a 2048-token sequence
# as a third full and a 64-token one as a third full too (t8: nanochat-d12, block 2048, on a GTX
# 1650 estimated ~3x low at micro-batch 1). An assumption, like the MFU, until a GPU measures it.
FILL_TOKENS = 2048
# Memory floor (module docstring). Activations: a block saves 16 tensors of n_embd per token
# (docs/estimator.md, 'Saved activations per block'); each is written in the forward and read in the
# backward, and its gradient written and read there: 4 passes, 64 n_embd-wide element passes per
# token and block, at the dtype's bytes (4 fp32, 2 under autocast). The logits: written, read by the
# loss, their gradient written and read, in fp32 (the loss runs in fp32): 16 bytes per vocabulary
# entry and token. A floor: an eager op reads its inputs once more for each output it writes.
ACT_PASSES_PER_BLOCK = 64
LOGIT_BYTES_PER_VOCAB = 16
# Weights (fp32 masters) per micro-batch: read in the forward (4 B) and the backward (4 B), the
# gradient accumulated (read and written, 8 B); per optimizer step: AdamW reads the parameter, its
# gradient and both moments and writes the parameter and moments (28 B), gradient clipping reads the
# gradient once more (4 B)
WEIGHT_BYTES_PER_MICRO_BATCH = 16
UPDATE_BYTES = 32
# Launch floor: eager PyTorch spends ~5-25 us of host time per op before its kernel is queued
# (dispatcher, autograd bookkeeping, cudaLaunchKernel 1-3 us: "From PyTorch op to kernel launch",
# jiahuanglin.xyz gpu_kernel_serving lesson 18; pytorch.org/blog/accelerating-pytorch-with-cuda-graphs
# for launch overhead as the bound of small models); the low end, since the GPU queue overlaps it.
LAUNCH_SECONDS = 5e-6
# Kernels: autofit/planning/launches.py counts them by the model's architecture and optimizer.


def rate_words(hw=None) -> str:
    """How an estimated rate was got, where it is printed (autofit.report.rates.plan_rate_words):
    the card's peak TFLOP/s, or for a profile with sustained_tflops (peak_tflops scales by it) the
    rate it sustains, which is what the estimate used (t6's L3: a T4's line named the peak)."""
    rate = ("the card's sustained TFLOP/s (its power limit's, below its peak)"
            if getattr(hw, "sustained_tflops", None) else "the card's peak TFLOP/s")
    return (f"roofline, the slowest of {rate} x {ASSUMED_MFU:.0%} assumed MFU, the bytes "
            f"a step moves over its memory bandwidth, and {LAUNCH_SECONDS * 1e6:g} us per kernel launch")


RATE_WORDS = rate_words()  # a card without sustained_tflops
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
    the fp16 tensor rate across cards: RTX 4090 1/2, V100 and T4 1/8, A100 1/16).
    A profile with `sustained_tflops` (the fp16 rate its power limit lets it hold) scales each
    figure by its share of the datasheet's fp16 peak: a lower clock slows every unit alike."""
    if dtype == "bfloat16":
        peak = hw.peak_bf16_tflops
    elif dtype == "float16":
        peak = hw.peak_fp16_tflops
    else:
        peak = hw.peak_fp16_tflops / (2 if tf32 and tuple(hw.compute_capability) >= (8, 0) else 4)
    sustained = getattr(hw, "sustained_tflops", None)
    return peak * min(1.0, sustained / hw.peak_fp16_tflops) if sustained else peak


def bytes_per_token(shape: ModelShape, dtype: str) -> int:
    """Activation bytes one token moves through memory in a training step (module docstring):
    ACT_PASSES_PER_BLOCK n_embd-wide passes per block at the dtype's width, and the logits'
    LOGIT_BYTES_PER_VOCAB per vocabulary entry."""
    width = 4 if dtype == "float32" else 2
    return ACT_PASSES_PER_BLOCK * shape.n_embd * shape.n_layer * width + LOGIT_BYTES_PER_VOCAB * shape.vocab_size


@dataclass(frozen=True)
class StepFloors:
    """The three floors of one micro-batch's time, in seconds (module docstring)."""
    compute: float
    memory: float  # 0 where the profile gives no bandwidth
    launches: float

    @property
    def seconds(self) -> float:
        return max(self.compute, self.memory, self.launches)

    @property
    def bound(self) -> str:
        """Which floor sets the time: 'compute', 'memory bandwidth' or 'kernel launches'."""
        return max((self.compute, "compute"), (self.memory, "memory bandwidth"), (self.launches, "kernel launches"))[1]


def step_floors(shape: ModelShape, micro_batch: int, dtype: str, checkpointing: int, hw,
                checkpointing_policy: str = "full", tf32: bool = True, step_batch: int | None = None) -> StepFloors:
    """The floors of one micro-batch of `micro_batch` sequences in an optimizer step of `step_batch`
    (None: the micro-batch alone), on the card of hardware profile `hw`: compute (peak_tflops x
    ASSUMED_MFU, tokens / (tokens + FILL_TOKENS) fill), memory (its memory_bandwidth_gbs, where it has one) and kernel
    launches (step_kernels), compute and memory with recomputation's extra share (RECOMPUTE_SHARE by
    policy, times the share of blocks checkpointed: ceil(L / k) of L), and the optimizer step's
    part by the micro-batch's share of its sequences. An estimate, never a measurement. Raises KeyError for an unknown policy."""
    tokens = micro_batch * shape.block_size
    share = micro_batch / max(step_batch or micro_batch, micro_batch)  # of the optimizer step's sequences
    # blocks 0, k, 2k, ... are checkpointed (trainer.model.gpt): ceil(L / k) of the L blocks recompute
    blocks = -(-shape.n_layer // checkpointing) / shape.n_layer if checkpointing else 0.0
    recompute = 1.0 + RECOMPUTE_SHARE[checkpointing_policy] * blocks
    peak = peak_tflops(hw, dtype, tf32) * 1e12
    compute = tokens * flops_per_token(shape) * recompute / (peak * ASSUMED_MFU) * (tokens + FILL_TOKENS) / tokens
    bandwidth = getattr(hw, "memory_bandwidth_gbs", None)
    n = param_count(shape)
    moved = tokens * bytes_per_token(shape, dtype) * recompute + n * (WEIGHT_BYTES_PER_MICRO_BATCH
                                                                      + UPDATE_BYTES * share)
    memory = moved / (bandwidth * 1e9) if bandwidth else 0.0
    return StepFloors(compute, memory, step_kernels(shape, dtype, checkpointing, checkpointing_policy, share)
                      * LAUNCH_SECONDS)


def step_kernels(shape: ModelShape, dtype: str, checkpointing: int = 0, checkpointing_policy: str = "full",
                 share: float = 1.0) -> float:
    """Kernels one micro-batch launches (autofit/planning/launches.py): its forward and backward,
    the forward its checkpointed blocks (ceil(L / k) of them) run again, the gradient adds of a
    micro-batch that accumulates (all but the step's first: 1 - share of them), and `share` (its
    part of the optimizer step's sequences) of the optimizer step's kernels."""
    forward, backward = launches.micro_batch_kernels(shape, dtype)
    recomputed = -(-shape.n_layer // checkpointing) * launches.recompute_kernels(
        shape, dtype, checkpointing_policy) if checkpointing else 0
    return forward + backward + recomputed + launches.accumulate_kernels(shape) * (1.0 - share) \
        + launches.update_kernels(shape) * share


def estimated_tokens_per_s(shape: ModelShape, micro_batch: int, dtype: str, checkpointing: int, hw,
                           checkpointing_policy: str = "full", tf32: bool = True,
                           step_batch: int | None = None) -> float:
    """Tokens/s of micro-batch `micro_batch` on the card of hardware profile `hw` in an optimizer
    step of `step_batch` sequences: its tokens over the largest of step_floors (the roofline of the
    module docstring). An estimate, never a measurement. Raises KeyError for an unknown policy."""
    floors = step_floors(shape, micro_batch, dtype, checkpointing, hw, checkpointing_policy, tf32, step_batch)
    return micro_batch * shape.block_size / floors.seconds
