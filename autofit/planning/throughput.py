"""Estimated training throughput, for when no matching GPU is here to measure it: a roofline.

A micro-batch's time is the largest of three floors (each an estimate, never a measurement):
- compute: its FLOPs over the card's dense peak for the dtype (peak_tflops) x ASSUMED_MFU, with
  small micro-batches under-filling the GPU (tokens / (tokens + FILL_TOKENS));
- memory: the bytes it must move over the card's memory bandwidth (the profile's
  memory_bandwidth_gbs): the activations of each token (bytes_per_token) and the weights, gradients
  and optimizer state (WEIGHT_BYTES_PER_MICRO_BATCH, UPDATE_BYTES, per parameter);
- host: the time the host takes to issue its ops (autofit/planning/launches.py counts them by the
  model's architecture, loss and optimizer). Eager PyTorch pays HOST_OP_SECONDS of Python,
  dispatcher and autograd bookkeeping for every aten op it dispatches, a view or detach that
  launches nothing included, and LAUNCH_SECONDS more for each that launches a kernel; a compiled
  block (trainer/compiler.py: each block compiled, the rest eager) pays COMPILED_GRAPH_SECONDS per
  graph call (its forward and its backward) and COMPILED_KERNEL_SECONDS per kernel, no per-op cost.
  The GPU runs behind the host, so whichever of the host and the GPU is slower sets the time.
The optimizer step's own traffic and ops are shared among the step's micro-batches by their
tokens, so the micro-batches' times add up to the step's.

Why the host floor is per op and not per kernel (the H200 self-check of 2026-12-04,
docs/gpu-selfcheck.md): GPT-2 124M in bf16 at micro-batch 1 took 23.6 ms for a trial's step of two
micro-batches and the update (86,793 tokens/s), and 27.2 ms at micro-batch 4 with four times the
tokens: the time hardly grows with the work, the mark of an overhead-bound step ("Making Deep
Learning Go Brrrr From First Principles", horace.io/brrr_intro.html, its Overhead section). That
step dispatches 2,508 aten ops (launches.py; 1,084 of them launch a kernel, the rest are views,
detaches and the like), 9.4 us of host time per op, 21.8 us per kernel: 5 us per kernel (the floor
before) gave 2.7 ms a micro-batch against the ~12 ms measured.

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
host floor counts the recomputed forward's ops themselves (launches.recompute_kernels).
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
# Host floor (module docstring). Per aten op of an eager step: Python, the dispatcher and autograd's
# bookkeeping. 7 us: pytorch/pytorch#41383 measured 6.8 us per `2 * x` in a Python loop with autograd
# recording (5 us without; ngimel there: ~2 us for x * x without autograd, about half of it Python
# parsing, a C++ caller ~1 us); pytorch/pytorch#82793 found a dispatch-bound inference on an A100
# at ~4 us per op. The H200 record implies 8.1 us per op at LAUNCH_SECONDS' 3 us (23.6 ms, 2,508 ops,
# 1,084 kernels: module docstring), its host's own figure (another H200 machine ran micro-batch 4
# 1.6-1.8x slower), so the public figure is kept: the floor stays a floor there (0.88x measured).
HOST_OP_SECONDS = 7e-6
# Per kernel launched, on top: cuLaunchKernel 3.0-3.3 us (meta-pytorch/tritonbench#1017, GB200, the
# driver's irreducible cost; 4-6 us through the runtime on an RTX 5070 Ti, susun-blog.com's
# "From Launch Overhead to CUDA Graph")
LAUNCH_SECONDS = 3e-6
# Compiled blocks (torch.compile with inductor, no CUDA graphs: autofit compiles without
# mode='reduce-overhead'): inductor's launcher per kernel, CachingAutotuner.run 6.8 us with its
# cuLaunchKernel, and per compiled graph call (guards, DeviceGuard, the wrapper) 33-44 us end to end
# (tritonbench#1017, GB200). Kernels: the block's eager count, which inductor's fusion lowers (the
# casts and elementwise chains between matmuls): an upper bound, not measured on a GPU.
COMPILED_KERNEL_SECONDS = 6.8e-6
COMPILED_GRAPH_SECONDS = 40e-6
# Ops: autofit/planning/launches.py counts them by the model's architecture, loss and optimizer.


def rate_words(hw=None) -> str:
    """How an estimated rate was got, where it is printed (autofit.report.rates.plan_rate_words):
    the card's peak TFLOP/s, or for a profile with sustained_tflops (peak_tflops scales by it) the
    rate it sustains, which is what the estimate used (t6's L3: a T4's line named the peak)."""
    rate = ("the card's sustained TFLOP/s (its power limit's, below its peak)"
            if getattr(hw, "sustained_tflops", None) else "the card's peak TFLOP/s")
    return (f"roofline, the slowest of {rate} x {ASSUMED_MFU:.0%} assumed MFU, the bytes "
            f"a step moves over its memory bandwidth, and the host's {HOST_OP_SECONDS * 1e6:g} us per eager op "
            f"plus {LAUNCH_SECONDS * 1e6:g} us per kernel launch, {COMPILED_KERNEL_SECONDS * 1e6:g} us per kernel "
            f"of a compiled block")  # no parenthesis of its own: the plan line puts it in one


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
    host: float

    @property
    def seconds(self) -> float:
        return max(self.compute, self.memory, self.host)

    @property
    def bound(self) -> str:
        """Which floor sets the time: 'compute', 'memory bandwidth' or 'host overhead'."""
        return max((self.compute, "compute"), (self.memory, "memory bandwidth"), (self.host, "host overhead"))[1]


@dataclass(frozen=True)
class HostOps:
    """What the host issues for one micro-batch (its share of the optimizer step's included):
    `eager` aten ops, `kernels` of them launch one; `compiled` kernels and `graphs` calls of
    compiled blocks. `seconds`: the host floor's time (module docstring)."""
    eager: float
    kernels: float
    compiled: float = 0.0
    graphs: int = 0

    @property
    def seconds(self) -> float:
        return self.eager * HOST_OP_SECONDS + self.kernels * LAUNCH_SECONDS \
            + self.compiled * COMPILED_KERNEL_SECONDS + self.graphs * COMPILED_GRAPH_SECONDS


def step_floors(shape: ModelShape, micro_batch: int, dtype: str, checkpointing: int, hw,
                checkpointing_policy: str = "full", tf32: bool = True, step_batch: int | None = None, *,
                compiled: bool = False, loss_impl: str = "standard", ce_chunk_size: int = 4096,
                torch_lce: bool | None = None) -> StepFloors:
    """The floors of one micro-batch of `micro_batch` sequences in an optimizer step of `step_batch`
    (None: the micro-batch alone), on the card of hardware profile `hw`: compute (peak_tflops x
    ASSUMED_MFU, tokens / (tokens + FILL_TOKENS) fill), memory (its memory_bandwidth_gbs, where it has one) and host
    (host_ops: eager, or with `compiled` blocks; `loss_impl`, `ce_chunk_size`, `torch_lce` as launches.loss_rows
    takes them), compute and memory with recomputation's extra share (RECOMPUTE_SHARE by
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
    ops = host_ops(shape, dtype, checkpointing, checkpointing_policy, share, compiled=compiled, loss_impl=loss_impl,
                   n_chunks=launches.chunks(micro_batch, shape, ce_chunk_size), torch_lce=torch_lce)
    return StepFloors(compute, memory, ops.seconds)


def host_ops(shape: ModelShape, dtype: str, checkpointing: int = 0, checkpointing_policy: str = "full",
             share: float = 1.0, *, compiled: bool = False, loss_impl: str = "standard", n_chunks: int = 1,
             torch_lce: bool | None = None, fused_norm: bool | None = None) -> HostOps:
    """The ops one micro-batch issues (autofit/planning/launches.py): its blocks' forward and
    backward (with the forward its checkpointed blocks, ceil(L / k) of them, run again), the rest of
    its forward and backward, the gradient adds of a micro-batch that accumulates (all but the
    step's first: 1 - share of them; the first hands each gradient over by a detach instead), and
    `share` (its part of the optimizer step's sequences) of the optimizer step's. `compiled`: the
    blocks run compiled (trainer/compiler.py's default scope), the rest eager."""
    block_k = sum(map(sum, launches.block_rows(shape, dtype, fused_norm).values()))
    block_v = sum(launches.block_views(shape, fused_norm))
    ckpt = -(-shape.n_layer // checkpointing) if checkpointing else 0
    recomputed_k = ckpt * launches.recompute_kernels(shape, dtype, checkpointing_policy, fused_norm)
    recomputed_v = ckpt * launches.block_views(shape, fused_norm)[0]
    outside_k = sum(map(sum, launches.outside_rows(shape, dtype, fused_norm, loss_impl, n_chunks,
                                                   torch_lce).values()))
    outside_v = sum(launches.outside_views(shape, fused_norm, loss_impl, n_chunks, torch_lce))
    added = launches.accumulate_kernels(shape) * (1.0 - share)
    kernels = outside_k + added + launches.update_kernels(shape, dtype) * share
    eager = kernels + outside_v - added + launches.update_views(shape) * share
    blocks_k = shape.n_layer * block_k + recomputed_k
    if compiled:
        return HostOps(eager, kernels, compiled=blocks_k, graphs=2 * shape.n_layer)
    blocks = blocks_k + shape.n_layer * block_v + recomputed_v
    return HostOps(eager + blocks, kernels + blocks_k)


def estimated_tokens_per_s(shape: ModelShape, micro_batch: int, dtype: str, checkpointing: int, hw,
                           checkpointing_policy: str = "full", tf32: bool = True,
                           step_batch: int | None = None, **host) -> float:
    """Tokens/s of micro-batch `micro_batch` on the card of hardware profile `hw` in an optimizer
    step of `step_batch` sequences: its tokens over the largest of step_floors (the roofline of the
    module docstring; `host`: step_floors' compiled, loss_impl, ce_chunk_size, torch_lce). An
    estimate, never a measurement. Raises KeyError for an unknown policy."""
    floors = step_floors(shape, micro_batch, dtype, checkpointing, hw, checkpointing_policy, tf32, step_batch, **host)
    return micro_batch * shape.block_size / floors.seconds
