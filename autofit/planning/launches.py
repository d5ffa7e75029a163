"""Kernels an eager training step launches, by the model's architecture (the roofline's launch
floor: autofit/planning/throughput.py).

A kernel here is an aten op that launches at least one kernel on CUDA: views (view, transpose,
split, _unsafe_view), detach and empty allocations launch none and are not counted; a fused op that
launches several (a foreach or fused optimizer op over many tensors) counts once, so the count is
a floor. The counts were taken on this project's CPU with a TorchDispatchMode over what
trainer.model.gpt.GPT and trainer.step run (a GPT of n_layer 1 and 2, n_embd 32: the difference is
one block's), the optimizer as make_optimizer builds it for CUDA (fused AdamW), and are checked
against such a count by tests/test_launches.py. Where CUDA runs fewer ops than the CPU, the table
says so: F.rms_norm is one fused kernel each way on CUDA where torch has _fused_rms_norm (torch's
CUDA registration _fused_rms_norm_cuda and its backward), seven-plus ops on the CPU.

Each row is (forward, backward) ops; `rows` names them for one block and the rest of a micro-batch.
"""
from __future__ import annotations

from autofit.planning import arch_terms as arch

# --- a block (trainer/model/layers.py Block), float32 --------------------------------------------
# c_attn, c_proj, c_fc, c_proj: mm each forward, two mm (input and weight gradient) backward; the
# backward of c_attn's split into q, k, v is a cat; SDPA and its backward; the two residual adds,
# and backward the two gradients meeting where x feeds the residual and the norm
BLOCK_CORE = (4 + 1 + 2, 8 + 1 + 1 + 2)
# per norm (two a block, ln_f once): F.layer_norm, or F.rms_norm fused (CUDA, torch with
# _fused_rms_norm) or decomposed (pow, mean, add, rsqrt, mul; backward 11 elementwise/reduction ops)
NORM = {"layernorm": (1, 1), "rmsnorm": (1, 1), "rmsnorm (decomposed)": (5, 11)}
# the activation: gelu; relu then square (backward pow, 2 mul, threshold_backward); SwiGLU's silu and
# product (backward 2 mul, silu_backward, and the cat of its chunk's two gradients)
MLP = {"gelu": (1, 1), "relu2": (2, 4), "swiglu": (2, 4)}
# RoPE on q and k (apply_rope: 4 mul, add, sub, cat each, and SDPA's copy of the rotated layout;
# backward: the slices' gradients, negations, products and sums)
ROPE = (15, 22)
# GQA: the K and V heads repeated for their query heads (CPU's SDPA; CUDA's non-flash paths too),
# and backward their gradients summed
GQA = (2, 2)
BIAS_PER_LINEAR = (0, 1)  # the bias gradient's sum over rows (addmm folds the forward add in)
# Under autocast (bf16, fp16): each weight cast to the compute dtype (and its gradient back), the
# fp32 norm outputs cast before c_attn and c_fc, the residual branches' gradients cast; RoPE's
# float() and back on q and k; QK-norm's fp32 output cast back for SDPA
AUTOCAST_BLOCK = (4 + 2, 4 + 2 + 2)
AUTOCAST_ROPE, AUTOCAST_QK_NORM = (6, 6), (4, 4)

# --- the rest of a micro-batch (trainer/model/gpt.py GPT, ce.py, trainer/step.py _accumulate) ----
TOKEN_EMBEDDING = (1, 1)  # embedding; embedding_dense_backward
LEARNED_POSITIONS = (3, 2)  # arange, embedding, add; embedding_dense_backward, the sum over the batch
ROPE_TABLES = (8, 0)  # rope_tables each forward: two arange, neg, div, pow, outer, cos, sin
HEAD = (1, 2)  # lm_head mm; its input and weight gradients
TIED_HEAD = (0, 1)  # the head's and the embedding's weight gradients added
LOSS = (2, 3)  # log_softmax, nll_loss; their backwards and backward's seed (ones_like)
SOFTCAP = (3, 3)  # div, tanh, mul and their backwards
AUTOCAST_OUTSIDE = (3, 3)  # the head's weight and input cast, the logits cast to fp32 for the loss
# _accumulate: x and y copied to the device, the loss times its share, added to the step's sum;
# backward: the share's product
TRAINER = (4, 1)
# a micro-batch after the first adds each parameter's new gradient to .grad: one add per tensor

# --- the optimizer step (trainer/step.py _ready_grads, make_optimizer) ----------------------------
# clip_grad_norm_ (foreach on CUDA): _foreach_norm, stack, vector_norm, add, reciprocal, mul,
# clamp, _foreach_mul_
CLIP = 8
# train_step's own: the step's loss sum (zeros) and its target-token count (ne, sum: on the host's
# copy of the targets, no kernel, but as much host time as a launch)
TRAINER_STEP = 3
ADAMW = 4  # fused AdamW: per parameter group (2: decayed, not) a step-count _foreach_add_ and _fused_adamw_
# torch.optim.Muon (torch/optim/_muon.py _single_tensor_muon), per matrix Muon takes: momentum
# lerp_, Nesterov lerp, bf16 copy, norm, clamp, div_; Newton-Schulz's 5 steps of mm and 2 addmm;
# weight decay mul_ and the update's add_
MUON_PER_MATRIX = 6 + 5 * 3 + 2


def fused_rms_norm() -> bool:
    """Whether the installed torch runs F.rms_norm as one fused op on CUDA (_fused_rms_norm)."""
    import torch  # here: the estimate's modules load without torch (`profiles show` stays light)
    return hasattr(torch.ops.aten, "_fused_rms_norm_backward")


def _norm(shape, fused: bool) -> tuple[int, int]:
    return NORM["rmsnorm" if fused else "rmsnorm (decomposed)"] if shape.norm == "rmsnorm" else NORM["layernorm"]


def _add(*rows: tuple[int, int]) -> tuple[int, int]:
    return sum(r[0] for r in rows), sum(r[1] for r in rows)


def _times(k: int, row: tuple[int, int]) -> tuple[int, int]:
    return k * row[0], k * row[1]


def block_rows(shape, dtype: str = "float32", fused_norm: bool | None = None) -> dict[str, tuple[int, int]]:
    """(forward, backward) ops of one block by component, for ModelShape `shape` under `dtype`;
    `fused_norm`: whether RMSNorm is one op (None: the installed torch on CUDA, fused_rms_norm)."""
    fused = fused_rms_norm() if fused_norm is None else fused_norm
    rows = {"matmuls, SDPA, residuals": BLOCK_CORE, "norms": _times(2, _norm(shape, fused)),
            "mlp activation": MLP[shape.mlp]}
    if shape.pos_emb == "rope":
        rows["rope"] = ROPE
    if shape.qk_norm:
        rows["qk-norm"] = _times(2, NORM["rmsnorm" if fused else "rmsnorm (decomposed)"])
    if shape.n_kv_head and shape.n_kv_head != shape.n_head:
        rows["gqa"] = GQA
    if shape.bias:
        rows["bias"] = _times(4, BIAS_PER_LINEAR)
    if dtype != "float32":
        rows["autocast casts"] = _add(AUTOCAST_BLOCK, AUTOCAST_ROPE if shape.pos_emb == "rope" else (0, 0),
                                      AUTOCAST_QK_NORM if shape.qk_norm else (0, 0))
    return rows


def outside_rows(shape, dtype: str = "float32", fused_norm: bool | None = None) -> dict[str, tuple[int, int]]:
    """(forward, backward) ops of a micro-batch outside its blocks, by component (block_rows' args)."""
    fused = fused_rms_norm() if fused_norm is None else fused_norm
    rows = {"token embedding": TOKEN_EMBEDDING,
            "positions": LEARNED_POSITIONS if shape.pos_emb == "learned" else ROPE_TABLES,
            "final norm": _norm(shape, fused), "head": _add(HEAD, TIED_HEAD if shape.tie_embeddings else (0, 0)),
            "loss": _add(LOSS, SOFTCAP if shape.logit_softcap else (0, 0)), "trainer": TRAINER}
    if dtype != "float32":
        rows["autocast casts"] = AUTOCAST_OUTSIDE
    return rows


def muon_matrices_per_block(shape) -> int:
    """Matrices Muon orthogonalises in a block: c_attn as its q, k, v blocks, SwiGLU's c_fc as gate
    and up (trainer.model.gpt.GPT.fused_rows), c_proj and the MLP's c_proj."""
    return 3 + 1 + (2 if shape.mlp == "swiglu" else 1) + 1


def micro_batch_kernels(shape, dtype: str = "float32", fused_norm: bool | None = None) -> tuple[int, int]:
    """(forward, backward) ops of one micro-batch's forward and backward, without gradient accumulation."""
    per_block = _add(*block_rows(shape, dtype, fused_norm).values())
    return _add(_times(shape.n_layer, per_block), *outside_rows(shape, dtype, fused_norm).values())


def accumulate_kernels(shape) -> int:
    """Adds of a micro-batch whose gradients accumulate into .grad: one per parameter tensor."""
    return len(arch.param_entries(shape))


def update_kernels(shape) -> int:
    """Ops of one optimizer step: train_step's own, gradient clipping, fused AdamW and, for Muon,
    MUON_PER_MATRIX per matrix it takes."""
    muon = MUON_PER_MATRIX * muon_matrices_per_block(shape) * shape.n_layer if shape.optimizer == "muon" else 0
    return TRAINER_STEP + CLIP + ADAMW + muon


def recompute_kernels(shape, dtype: str, policy: str, fused_norm: bool | None = None) -> int:
    """Forward ops a checkpointed block runs again in its backward: all of them ('full'), or all but
    its matmuls and SDPA, which selective checkpointing keeps (trainer/model/sac_ops.py)."""
    forward = _add(*block_rows(shape, dtype, fused_norm).values())[0]
    return forward - 5 if policy == "selective" else forward
