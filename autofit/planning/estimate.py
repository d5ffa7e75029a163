"""Closed-form peak memory of one optimizer step of trainer.step.train_step, with a breakdown.

The estimate orders and prunes the probe's trials, and it is the whole answer for a simulated GPU.
It follows what the code in trainer/model/gpt.py and trainer/step.py keeps alive, phase by phase, in
the steady state (optimizer step >= 2, so AdamW's state exists; second micro-batch, so the first
one's gradients are alive through the forward and backward). The peak is the largest phase:

- forward (loss):          saved activations + the loss head's forward buffers
- backward start (loss):   saved activations + the loss head's gradient buffers
- backward (top block):    activations of the blocks below + the top block's (recomputed when
                           checkpointed) + the block's backward temporaries + the tied head's
                           weight gradient, which autograd holds until the embedding is reached
- backward (embedding):    the two V x C gradients of the tied weight meeting
- optimizer step:          weights + gradients + AdamW state + the update's temporaries

Coefficients are counted from the code (which op saves which tensor in which dtype) and were
checked op by op against the budgeted CPU device (autofit.devices.cpu_budget); see docs/estimator.md.
device='cpu' predicts that device's peak live bytes. device='cuda' predicts the caching
allocator's peak, adding terms the CPU device does not have (each documented where defined).

Several ranks (world_size > 1) change the model state, per rank:
- DDP (trainer/distributed/sharding.py): the gradients are views of DDP's flat buckets (gradient_as_bucket_view),
  which exist from the wrapper's construction, so gradient bytes are resident in every phase, even
  with one micro-batch per step; no other copy is made (the deferred all-reduce works in place).
- FSDP2 (fully_shard per block and on the root): weights, gradients and AdamW state are 1/world_size
  each (dim-0 shards, padded); 'comm_buffers' holds what is unsharded at each phase: the root's
  parameters (token and position embeddings, ln_f; the root is not resharded after forward) and,
  in a block's backward, its all-gathered parameters and unsharded gradients. Read from torch's
  FSDP2 design (torch/distributed/fsdp/_fully_shard) and checked against the budgeted CPU device
  on 2 gloo ranks (within 0.2%, n_layer 4, n_embd 64); on CUDA, where the all-gathers of the next
  block overlap on their own stream, the real peak can be a block's parameters higher.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from autofit.planning import arch_terms as arch
from autofit.planning.kernel_terms import add_to_phases, cublas_workspaces_bytes, cuda_kernel_terms
from autofit.planning.loss_head import head_phases

COMPONENTS = ("weights", "gradients", "optimizer_state", "activations", "logits_and_loss", "workspace",
              "comm_buffers", "allocator_slack")

# --- CUDA-only terms (from torch's sources; checked on an H200 on 2026-12-04: docs/estimator.md) --
# Kernel-internal allocations (cuBLAS workspaces, the SDPA backward's accumulators, ...) are
# autofit.planning.kernel_terms'; the cuBLAS workspaces held in every phase:
CUDA_WORKSPACE_BYTES = cublas_workspaces_bytes()
# Every CUDA allocation is rounded up to 512 bytes (kMinBlockSize in CUDACachingAllocator.cpp).
CUDA_ROUND_BYTES = 512
# Reserved exceeds allocated through block rounding (2 MiB for large requests) and fragmentation;
# one published report shows ~11 % (pytorch issue #40989); with expandable segments it is smaller.
# 5 % of the allocated peak is a middle figure; the budget's safety margin covers the rest. On an
# H200 (expandable segments on) reserved ran from 4.7 % under to 4.2 % over allocated + 5 %.
CUDA_ALLOCATOR_SLACK = 0.05

# Scalars the formula does not itemise: AdamW's per-parameter `step` tensors, the grad-clip norms,
# loss accumulators. Measured at a few hundred bytes on the CPU device; rounded up.
SMALL_TENSOR_BYTES = 4096

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


# ModelShape's fields beyond GPT-2's shape: today's small-GPT options, read from any config
MODEL_OPTIONS = ("pos_emb", "norm", "qk_norm", "mlp", "n_kv_head", "tie_embeddings", "logit_softcap",
                 "optimizer", "checkpointing_policy")


@dataclass(frozen=True)
class ModelShape:
    n_layer: int
    n_head: int
    n_embd: int
    block_size: int
    vocab_size: int
    bias: bool = False
    dropout: float = 0.0
    # today's small-GPT options (autofit/planning/arch_terms.py); the defaults are GPT-2's
    pos_emb: str = "learned"
    norm: str = "layernorm"
    qk_norm: bool = False
    mlp: str = "gelu"
    n_kv_head: int | None = None
    tie_embeddings: bool = True
    logit_softcap: float = 0.0
    optimizer: str = "adamw"
    checkpointing_policy: str = "full"  # what a checkpointed block keeps: its input, or its matmuls too

    @classmethod
    def from_config(cls, cfg: object) -> "ModelShape":
        """From any object with these attributes (TrainConfig, GPTConfig); a missing option is GPT-2's."""
        extra = {k: getattr(cfg, k) for k in MODEL_OPTIONS if hasattr(cfg, k)}
        return cls(n_layer=int(cfg.n_layer), n_head=int(cfg.n_head), n_embd=int(cfg.n_embd),
                   block_size=int(cfg.block_size), vocab_size=int(cfg.vocab_size), bias=bool(cfg.bias),
                   dropout=float(cfg.dropout), **extra)


@dataclass
class Estimate:
    peak_bytes: int
    breakdown: dict[str, int] = field(default_factory=dict)  # COMPONENTS; sums to peak_bytes
    phase: str = ""  # where the peak occurs
    basis: str = ""  # one line: how it was estimated

    def to_json(self) -> dict:
        return {"peak_bytes": self.peak_bytes, "breakdown": dict(self.breakdown), "phase": self.phase,
                "basis": self.basis}


def _param_shapes(shape: ModelShape) -> list[tuple[int, bool]]:
    """(numel, is_matrix) of every parameter in GPT.parameters() order, a tied lm_head once."""
    return [(n, kind not in ("block_vector", "ln_f")) for n, kind in arch.param_entries(shape)]


def param_count(shape: ModelShape) -> int:
    """Parameters of trainer.model.gpt.GPT, tied token embedding / LM head counted once."""
    return sum(n for n, _ in _param_shapes(shape))


def _round(n: int, to: int) -> int:
    return -(-n // to) * to


@dataclass(frozen=True)
class _State:
    """Per-rank model state bytes and the unsharded buffers of each phase (see the docstring)."""
    weights: int
    grads: int  # all gradients, as held at the optimizer step
    adam: int
    grads_resident: bool  # gradient bytes exist before the first backward (DDP's buckets)
    comm: dict[str, int]  # phase name -> bytes unsharded there (FSDP2)


def _model_state(shape: ModelShape, cuda: bool, world_size: int, parallelism: str) -> _State:
    unit = (lambda n: _round(4 * n, CUDA_ROUND_BYTES)) if cuda else (lambda n: 4 * n)
    entries = arch.param_entries(shape)
    if world_size <= 1 or parallelism not in ("ddp", "fsdp2"):
        full = sum(unit(n) for n, _ in entries)
        return _State(full, full, arch.optimizer_state_bytes(shape, unit), False, {})
    if parallelism == "ddp":
        full = sum(unit(n) for n, _ in entries)
        return _State(full, full, arch.optimizer_state_bytes(shape, unit), True, {})
    W = world_size
    shard = sum(unit(-(-n // W)) for n, _ in entries)  # each parameter's dim-0 shard, padded
    root = sum(unit(n) for n, kind in entries if not kind.startswith("block"))  # wte, wpe, ln_f, head
    block = sum(unit(n) for n, kind in entries if kind.startswith("block")) // max(shape.n_layer, 1)
    comm = {"forward (loss)": root, "backward start (loss)": root,
            # the block's all-gathered parameters and its unsharded gradients (CPU device measured:
            # the prefetched next block and the reduce-scatter input do not add to this peak)
            "backward (top block)": root + 2 * block,
            "backward (embedding)": root + root}  # the root's gradients and their reduce-scatter input
    return _State(shard, shard, arch.optimizer_state_bytes(shape, lambda n: unit(-(-n // W))), False, comm)


def _check_args(micro_batch: int, dtype: str, checkpointing: int, loss_impl: str, device: str,
                ce_chunk_size: int, n_micro: int, policy: str = "full") -> None:
    if micro_batch < 0:
        raise ValueError(f"micro_batch must be >= 0, got {micro_batch}")
    if dtype not in _DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}")
    if loss_impl not in ("standard", "chunked"):
        raise ValueError(f"unknown loss_impl {loss_impl!r}")
    if policy not in ("full", "selective"):
        raise ValueError(f"unknown checkpointing_policy {policy!r}")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if checkpointing < 0 or ce_chunk_size < 1 or n_micro < 1:
        raise ValueError("checkpointing must be >= 0, ce_chunk_size and n_micro >= 1")


@dataclass(frozen=True)
class _Blocks:
    """Bytes the transformer blocks keep for backward, for one micro-batch."""
    per_block: list[int]  # saved by each block (a checkpointed one keeps only its input)
    full: int  # saved by one block that is not checkpointed
    n_ckpt: int  # checkpointed blocks
    w16: int  # autocast's 16-bit copies of one block's Linear weights (0 in fp32)
    ln_f: int  # ln_f's saved input and stats
    transient: int  # one block's backward temporaries
    embed: int = 0  # the embedding dropout's saved bytes (dropout > 0)

    @property
    def saved(self) -> int:
        """All the blocks keep for backward, with the embedding dropout's."""
        return sum(self.per_block) + self.embed


def _dropout_bytes(shape: ModelShape, B: int, amp: bool, cuda: bool) -> tuple[int, int]:
    """(per block, embedding) bytes that dropout > 0 keeps for backward, one micro-batch of B.

    CPU, fitted to the budgeted CPU device's peaks (docs/estimator.md, the dropout rows of
    scripts/bench_estimate.py): per block 8 bytes per token and channel in fp32, 10 under bf16
    autocast (the residual and MLP dropouts' masks and kept outputs), plus 12 bytes per attention
    score (B x H x T x T): with dropout_p > 0 the CPU's SDPA leaves its flash kernel for the math
    path, which keeps the softmax output, the mask and the dropped probabilities; the embedding
    dropout 4 bytes per token and channel.
    CUDA (from torch's sources; the H200 check of 2026-12-04 ran no dropout): flash and
    memory-efficient attention apply dropout from an
    RNG seed and keep no mask, so no score-sized term; each dropout keeps a 1-byte mask."""
    if shape.dropout <= 0:
        return 0, 0
    N, C = B * shape.block_size, shape.n_embd
    if cuda:
        return 2 * N * C, N * C
    scores = B * shape.n_head * shape.block_size ** 2
    return (10 if amp else 8) * N * C + 12 * scores, 4 * N * C


def _block_bytes(shape: ModelShape, B: int, amp: bool, checkpointing: int, cuda: bool = False,
                 policy: str = "full") -> _Blocks:
    L, C, T = shape.n_layer, shape.n_embd, shape.block_size
    N, h = B * T, arch.mlp_hidden(shape)
    # fp32: block input, ln_1 out, qkv (3), SDPA out, x + attn, ln_2 out, c_fc out (4), GELU out
    # (4) = 16 elements per token and channel (SDPA's output is already in (B, T, H, hd) order, so
    # the transpose().contiguous() before c_proj copies nothing). Under autocast, LayerNorm runs
    # in fp32 and the residual stream stays fp32 (2 x 4 B), the rest is 16-bit (14 x 2 B); the
    # 16-bit weight copies autocast makes are saved by each Linear for backward.
    # GPT-2: 16 elements, of them 2 residual; other models: arch_terms.block_saved_elements
    elems, resid = arch.block_saved_elements(shape)
    stats = arch.block_stats_bytes(shape, B)  # LayerNorm mean/rstd (fp32) x2, SDPA log-sum-exp
    w16 = 2 * arch.block_linear_params(shape) if amp else 0
    full = (4 * resid + 2 * (elems - resid) if amp else 4 * elems) * N + stats + w16
    full += arch.mlp_cuda_autocast_saved_bytes(shape, N, amp, cuda)
    drop_block, drop_embed = _dropout_bytes(shape, B, amp, cuda)
    full += drop_block  # a checkpointed block recomputes its dropout (same RNG state), keeps nothing
    ckpt = 4 * N * C  # a checkpointed block keeps only its fp32 input
    if policy == "selective":  # and its matmul and attention outputs
        ckpt += arch.sac_saved_bytes(shape, B, amp)
    per_block = [ckpt if checkpointing and i % checkpointing == 0 else full for i in range(L)]
    n_ckpt = sum(1 for i in range(L) if checkpointing and i % checkpointing == 0)
    ln_f = 4 * N * C + (2 if shape.norm == "layernorm" else 1) * N * 4  # ln_f's saved input and its stats
    if amp:
        # Block backward temporaries: fp32 residual grad + its 16-bit cast, c_proj's 16-bit weight
        # grad and the 16-bit grad of the h-wide activation output (h = 4C for GPT-2).
        transient = 4 * N * C + 2 * N * C + 2 * h * C + 2 * h * N
    else:
        transient = 4 * N * C + 4 * h * C + 4 * h * N
    transient += arch.mlp_backward_extra_bytes(shape, N, amp)
    # where N is small against C: SwiGLU's c_fc weight gradient; under autocast its fp32 upcast
    transient = max(transient, arch.swiglu_fc_backward_bytes(shape, N, amp), arch.weight_grad_upcast_bytes(shape, N, amp))
    if policy == "selective" and checkpointing and (L - 1) % checkpointing == 0:
        # the top block recomputed under selective checkpointing holds one fp32 N x C more than
        # under full (measured on the budgeted CPU device for GPT-2, RoPE, RMSNorm and ReLU^2
        # blocks alike, fp32; assumed the same under autocast)
        transient += 4 * N * C
    return _Blocks(per_block, full, n_ckpt, w16, ln_f, transient, drop_embed)


def estimate_peak(shape: ModelShape, micro_batch: int, *, dtype: str, checkpointing: int, loss_impl: str,
                  compile: bool = False, device: str = "cuda", ce_chunk_size: int = 4096,
                  n_micro: int = 2, world_size: int = 1, parallelism: str = "ddp", sdpa: str = "flash",
                  checkpointing_policy: str | None = None, step_batch: int | None = None) -> Estimate:
    """Peak bytes of a train_step with micro-batches of `micro_batch` full-length sequences, on
    one rank of `world_size` (parallelism 'ddp' or 'fsdp2' when there are several).

    n_micro: micro-batches per optimizer step (autofit's trials run 2 when training accumulates,
    1 otherwise); with 2 or more, gradients are alive through every forward and backward.
    step_batch: sequences in this rank's optimizer step, whose token ids the CPU device holds (None:
    n_micro x micro_batch's; _held_rows).
    compile=True is estimated as eager (see docs/estimator.md: inductor usually saves less in the
    steady state and can need more while compiling; no factor is invented for it).
    sdpa: the CUDA attention backend assumed for its kernel-internal terms ('flash', 'efficient',
    'math'; autofit.planning.kernel_terms); the CPU estimate ignores it.
    checkpointing_policy: what a checkpointed block keeps, 'full' or 'selective' (None: the shape's).
    Raises ValueError for an unknown dtype, loss_impl, policy or device, or a negative size."""
    policy = checkpointing_policy or shape.checkpointing_policy
    _check_args(micro_batch, dtype, checkpointing, loss_impl, device, ce_chunk_size, n_micro, policy)
    L, C, T, V = shape.n_layer, shape.n_embd, shape.block_size, shape.vocab_size
    N, VC = micro_batch * T, V * C  # tokens per micro-batch; elements of the V x C head
    amp, cuda = dtype != "float32", device == "cuda"
    # --- model state (on CUDA each parameter-sized tensor is its own allocation, rounded) --------
    st = _model_state(shape, cuda, world_size, parallelism)
    weights, grads_all, adam = st.weights, st.grads, st.adam
    # Accumulating, the previous micro-batch's gradients exist from the start of the forward; with
    # one micro-batch train_step set them to None after the last step (DDP: bucket views, which stay).
    grads_in_pass = grads_all if n_micro >= 2 or st.grads_resident else 0
    # Token ids: the CPU device holds the step's x, y (int64) and y != -1 (bool); CUDA a micro-batch's
    ids = 16 * N if cuda else 17 * T * _held_rows(step_batch, n_micro * micro_batch, T)
    blk = _block_bytes(shape, micro_batch, amp, checkpointing, cuda, policy)

    phases: list[tuple[str, dict[str, int]]] = []

    def add(name: str, grads: int, acts: int, head: int, work: int = 0) -> None:
        phases.append((name, {"weights": weights, "gradients": grads, "optimizer_state": adam,
                              "activations": acts + ids, "logits_and_loss": head, "workspace": work,
                              "comm_buffers": st.comm.get(name, 0)}))

    for name, acts, head_bytes in head_phases(shape, N, amp, blk, loss_impl, cuda, ce_chunk_size):
        add(name, grads_in_pass, acts, head_bytes)
    wpe = 4 * T * C if shape.pos_emb == "learned" else 0  # RoPE: no position table
    accumulating = n_micro >= 2 or st.grads_resident or bool(st.comm)
    # the lm_head weight's fp32 gradient before it reaches a .grad: tied, it waits in autograd's
    # buffer for wte's; untied, it is lm_head's own .grad (new with one micro-batch, else added in place)
    head_grad = 4 * VC if shape.tie_embeddings or not accumulating else 0
    if L > 0:
        below = sum(blk.per_block[:-1]) + blk.embed
        add("backward (top block)", grads_in_pass, below + blk.full + blk.transient, head_grad)
    # wte's dense gradient meets the held lm_head gradient (tied) or lm_head's .grad (untied, then
    # in `gradients`); wpe's gradient beside them.
    grads_before_embedding = grads_all if accumulating else \
        max(0, grads_all - 4 * VC - wpe)
    add("backward (embedding)", grads_before_embedding, 0, arch.embedding_backward_bytes(shape, amp, accumulating))
    # optimizer step: the whole batch's ids are still referenced by the caller on CPU; the fused
    # CUDA AdamW that make_optimizer picks updates in place.
    add("optimizer step", grads_all, 0, 0, 0 if cuda else arch.optimizer_cpu_temporaries(shape))
    if cuda:  # what kernels allocate inside one op (the CPU calibration cannot contain it)
        add_to_phases(phases, cuda_kernel_terms(shape, micro_batch, amp, sdpa))
    return _estimate_from_phases(phases, cuda, compile, sdpa)


def _estimate_from_phases(phases: list[tuple[str, dict[str, int]]], cuda: bool, compile: bool,
                          sdpa: str = "flash") -> Estimate:
    """The largest phase, plus the small tensors and (CUDA) allocator slack."""
    name, parts = max(phases, key=lambda p: sum(p[1].values()))
    parts["workspace"] += SMALL_TENSOR_BYTES
    if cuda:
        parts["allocator_slack"] = int(CUDA_ALLOCATOR_SLACK * sum(parts.values()))
    else:
        parts["allocator_slack"] = 0
    breakdown = {k: int(parts.get(k, 0)) for k in COMPONENTS}
    basis = ("closed form, calibrated on the budgeted CPU device (±2% on the benchmark grid)" if not cuda else
             "closed form calibrated on the budgeted CPU device, plus CUDA terms from torch's sources "
             f"(cuBLAS workspaces {CUDA_WORKSPACE_BYTES // 2**20} MiB, the {sdpa} SDPA backward's "
             f"accumulators, 512 B rounding, {CUDA_ALLOCATOR_SLACK:.0%} allocator slack), checked against "
             "an H200's allocated peaks (within 1 % at GPT-2 124M's size, eager; torch's "
             "F.linear_cross_entropy not yet)")
    if compile:
        basis += "; torch.compile estimated as eager (steady state usually lower, warm-up can be higher)"
    return Estimate(peak_bytes=sum(breakdown.values()), breakdown=breakdown, phase=name, basis=basis)


def _held_rows(step_batch: int | None, trial_rows: int, T: int) -> int:
    """Sequences whose token ids the CPU device holds through a step: the whole step's batch where
    training reads it whole (trainer.data.batches.held_rows; the probe's trials hold it too), at
    least the micro-batches in flight. Counting only the trial's two micro-batches read 0.25 % low
    at micro-batch 2 of 16, more at smaller sizes of a larger batch."""
    if not step_batch:
        return trial_rows
    from trainer.data.batches import held_rows  # imports torch: only on this CPU path
    return max(trial_rows, held_rows(step_batch, T))


def max_micro_batch(shape: ModelShape, budget_bytes: int, *, limit: int = 1 << 20, **kwargs) -> int:
    """Largest micro-batch whose estimated peak fits `budget_bytes` (0 if none), by bisection: the
    estimate grows with the micro-batch. kwargs are estimate_peak's keyword arguments."""
    def fits(b: int) -> bool:
        return estimate_peak(shape, b, **kwargs).peak_bytes <= budget_bytes

    if not fits(1):
        return 0
    lo, hi = 1, 2  # fits(lo); find a hi that does not fit by doubling, then bisect
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    if hi > limit:
        return lo
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo
