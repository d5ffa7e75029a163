"""Ops an eager training step dispatches, by the model's architecture (the roofline's host floor:
autofit/planning/throughput.py): the ones that launch a kernel on CUDA, and the ones that launch
none but cost host time all the same.

A kernel here is an aten op that launches at least one kernel on CUDA: views (view, transpose,
split, _unsafe_view), detach and empty allocations launch none and are counted apart (the *_VIEWS
tables: each still goes through Python or the dispatcher and autograd); a fused op that launches
several (a foreach or fused optimizer op over many tensors) counts once, so the kernel count is a
floor. The counts were taken on this project's CPU with a TorchDispatchMode over what
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
# The chunked loss in place of HEAD, LOSS, SOFTCAP and AUTOCAST_OUTSIDE: (ops a micro-batch runs
# once, ops per chunk of ce_chunk_size rows of its tokens), float32 / under autocast, the gradient
# taken in the forward. autofit's (trainer/model/ce.py _ChunkedLinearCrossEntropy): the target mask
# and count, grad_w and the loss sum made, the mean, and backward's scaling; per chunk three mm
# (logits, grad_x, grad_w), the target gather, the in-place log-sum-exp (amax, sub_, exp_, sum,
# log, add), the loss sum, softmax - one-hot (div_, arange, index, index_put_, mul_), the grad_x
# slice copy and grad_w's add_; autocast adds the chunk's casts (5). The soft-cap adds 7 per chunk
# (div_, tanh_, square, neg_, add_, mul_ and the slope's mul_).
AUTOFIT_CHUNKED = {"float32": (11, 23), "autocast": (12, 28)}
AUTOFIT_CHUNKED_SOFTCAP = 7
# torch's F.linear_cross_entropy (torch >= 2.13, a Python custom op torch_nn::_linear_cross_entropy
# _batch_chunked in torch/nn/modules/linear_cross_entropy.py, counted inside it): the outputs made,
# the target mask (eq, where, bitwise_not), the count and the mean's scale, backward's two mul_;
# per chunk mm, amax, sub_, the target dot-gather, exp_ and sum, the softmax scale (div, mul),
# log_ and its dot, the input gradient (index_select, mul, addmm) and the weight gradient (addmm_,
# mul, index_add_). Under autocast the casts in and out (6) and, on the CPU, a copy and a mul_ per
# chunk more (CUDA's mm upcasts inside the matmul: out_dtype), taken as counted here
TORCH_CHUNKED = {"float32": (17, 19), "autocast": (23, 21)}
# _accumulate: x and y copied to the device, the loss times its share, added to the step's sum;
# backward: the share's product
TRAINER = (4, 1)
# a micro-batch after the first adds each parameter's new gradient to .grad: one add per tensor
# fp16's GradScaler (trainer/step.py): the loss times the scale, and that product's backward
GRAD_SCALER = (1, 1)

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
# fp16's GradScaler per step (torch/amp/grad_scaler.py): unscale_ (the scale's double, reciprocal
# and float, found_inf's full, _amp_foreach_non_finite_check_and_unscale_), the skip flag's clone
# and compare (trainer/step.py), _amp_update_scale_ and its casts; with fused AdamW, which takes
# found_inf itself, also the sum of the devices' found_inf and a _foreach_sub_ per parameter group
GRAD_SCALER_STEP, GRAD_SCALER_FUSED_ADAMW = 10, 1 + 2

# --- ops that launch no kernel (views, detach, _unsafe_view): host time without a launch ---------
# A GPT-2 block (forward: q, k, v split and head views, the weights' t; backward: the weights'
# and gradients' t, view, transpose, and a detach per parameter tensor where the step's first
# micro-batch hands its gradient to .grad: a later one adds it, accumulate_kernels)
BLOCK_VIEWS = (22, 39)
# per option, more than GPT-2's block: RoPE's slices and unsqueezes; a decomposed RMSNorm's
# keepdim view (each norm); QK-norm's head views (its norms apart); ReLU^2, SwiGLU's chunk; GQA's
# repeat (the CPU's SDPA); biases' views and detaches
OPTION_VIEWS = {"rope": (8, 4), "rmsnorm (decomposed)": (1, 1), "qk-norm": (0, 2), "relu2": (1, 1),
                "swiglu": (1, 0), "gqa": (6, 4), "bias": (0, 10)}
# the rest of a GPT-2 micro-batch (the head's t, the logits' and targets' views for the loss, the
# embeddings' detaches); RoPE instead of learned positions, untied head, soft-cap, biases
OUTSIDE_VIEWS = (4, 10)
OUTSIDE_OPTION_VIEWS = {"rope": (1, -2), "untied": (0, 1), "softcap": (1, 1), "bias": (0, 1)}
# the chunked losses against the standard loss's views: (once, per chunk): autofit's row slices,
# t, unsqueeze and squeeze (a single chunk's whole-range slices are not made); torch's narrows
CHUNKED_VIEWS = {"autofit": (-7, 10), "torch": (2, 20)}
UPDATE_VIEWS = 7  # clipping's and AdamW's views of the gradients
MUON_VIEWS_PER_MATRIX, MUON_VIEWS = 6, 4  # Muon's per matrix (c_attn's q, k, v blocks), and its own


def fused_rms_norm() -> bool:
    """Whether the installed torch runs F.rms_norm as one fused op on CUDA (_fused_rms_norm)."""
    import torch  # here: the estimate's modules load without torch (`profiles show` stays light)
    return hasattr(torch.ops.aten, "_fused_rms_norm_backward")


def torch_chunked_loss() -> bool:
    """Whether the installed torch has F.linear_cross_entropy, which the chunked loss then runs
    for a model without a soft-cap (trainer/model/ce.py lm_loss)."""
    from trainer.model.ce import HAS_TORCH_LCE  # here, as fused_rms_norm: it imports torch
    return HAS_TORCH_LCE


def chunked_path(shape, torch_lce: bool | None = None) -> str:
    """Which chunked loss `shape` runs: 'torch' (F.linear_cross_entropy, no soft-cap) or 'autofit'
    (trainer/model/ce.py's own chunking). `torch_lce`: whether torch has it (None: the installed torch)."""
    has = torch_chunked_loss() if torch_lce is None else torch_lce
    return "torch" if has and not shape.logit_softcap else "autofit"


def _norm(shape, fused: bool) -> tuple[int, int]:
    return NORM["rmsnorm" if fused else "rmsnorm (decomposed)"] if shape.norm == "rmsnorm" else NORM["layernorm"]


def _add(*rows: tuple[int, int]) -> tuple[int, int]:
    return sum(r[0] for r in rows), sum(r[1] for r in rows)


def _times(k: int, row: tuple[int, int]) -> tuple[int, int]:
    return k * row[0], k * row[1]


def block_rows(shape, dtype: str = "float32", fused_norm: bool | None = None) -> dict[str, tuple[int, int]]:
    """(forward, backward) kernel ops of one block by component, for ModelShape `shape` under `dtype`;
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


def block_views(shape, fused_norm: bool | None = None) -> tuple[int, int]:
    """(forward, backward) ops of one block that launch no kernel (BLOCK_VIEWS, OPTION_VIEWS)."""
    fused = fused_rms_norm() if fused_norm is None else fused_norm
    decomposed = (2 * (shape.norm == "rmsnorm") + 2 * bool(shape.qk_norm)) if not fused else 0
    options = [OPTION_VIEWS["rope"] if shape.pos_emb == "rope" else (0, 0),
               _times(decomposed, OPTION_VIEWS["rmsnorm (decomposed)"]),
               OPTION_VIEWS["qk-norm"] if shape.qk_norm else (0, 0),
               OPTION_VIEWS.get(shape.mlp, (0, 0)),
               OPTION_VIEWS["gqa"] if shape.n_kv_head and shape.n_kv_head != shape.n_head else (0, 0),
               OPTION_VIEWS["bias"] if shape.bias else (0, 0)]
    return _add(BLOCK_VIEWS, *options)


def chunks(micro_batch: int, shape, ce_chunk_size: int) -> int:
    """Chunks of ce_chunk_size rows the chunked loss walks over a micro-batch's tokens."""
    return -(-micro_batch * shape.block_size // max(1, ce_chunk_size))


def loss_rows(shape, dtype: str = "float32", loss_impl: str = "standard", n_chunks: int = 1,
              torch_lce: bool | None = None) -> dict[str, tuple[int, int]]:
    """(forward, backward) kernel ops of the head and the loss: the standard loss's rows, or the
    chunked loss's, once per micro-batch and per chunk of its `n_chunks` (chunked_path picks which)."""
    if loss_impl == "standard":
        rows = {"head": HEAD, "loss": _add(LOSS, SOFTCAP if shape.logit_softcap else (0, 0))}
        if dtype != "float32":
            rows["autocast casts"] = AUTOCAST_OUTSIDE
        return rows
    path = chunked_path(shape, torch_lce)
    once, per_chunk = (AUTOFIT_CHUNKED if path == "autofit" else TORCH_CHUNKED)[
        "float32" if dtype == "float32" else "autocast"]
    per_chunk += AUTOFIT_CHUNKED_SOFTCAP if shape.logit_softcap else 0
    return {f"chunked loss ({path}'s, {n_chunks} chunk{'s' * (n_chunks != 1)})": (once + per_chunk * n_chunks, 0)}


def outside_rows(shape, dtype: str = "float32", fused_norm: bool | None = None, loss_impl: str = "standard",
                 n_chunks: int = 1, torch_lce: bool | None = None) -> dict[str, tuple[int, int]]:
    """(forward, backward) kernel ops of a micro-batch outside its blocks, by component (block_rows'
    args; the loss's, loss_rows'); fp16 adds its GradScaler's."""
    fused = fused_rms_norm() if fused_norm is None else fused_norm
    rows = {"token embedding": TOKEN_EMBEDDING,
            "positions": LEARNED_POSITIONS if shape.pos_emb == "learned" else ROPE_TABLES,
            "final norm": _norm(shape, fused), "tied head": TIED_HEAD if shape.tie_embeddings else (0, 0),
            **loss_rows(shape, dtype, loss_impl, n_chunks, torch_lce), "trainer": TRAINER}
    if dtype == "float16":
        rows["grad scaler"] = GRAD_SCALER
    return rows


def outside_views(shape, fused_norm: bool | None = None, loss_impl: str = "standard", n_chunks: int = 1,
                  torch_lce: bool | None = None) -> tuple[int, int]:
    """(forward, backward) ops of a micro-batch outside its blocks that launch no kernel (OUTSIDE_VIEWS)."""
    fused = fused_rms_norm() if fused_norm is None else fused_norm
    opt = OUTSIDE_OPTION_VIEWS
    rows = [OUTSIDE_VIEWS, opt["rope"] if shape.pos_emb == "rope" else (0, 0),
            OPTION_VIEWS["rmsnorm (decomposed)"] if shape.norm == "rmsnorm" and not fused else (0, 0),
            opt["untied"] if not shape.tie_embeddings else (0, 0), opt["softcap"] if shape.logit_softcap else (0, 0),
            opt["bias"] if shape.bias else (0, 0)]
    if loss_impl != "standard":
        once, per_chunk = CHUNKED_VIEWS[chunked_path(shape, torch_lce)]
        rows.append((once + per_chunk * n_chunks, 0))
    return _add(*rows)


def muon_matrices_per_block(shape) -> int:
    """Matrices Muon orthogonalises in a block: c_attn as its q, k, v blocks, SwiGLU's c_fc as gate
    and up (trainer.model.gpt.GPT.fused_rows), c_proj and the MLP's c_proj."""
    return 3 + 1 + (2 if shape.mlp == "swiglu" else 1) + 1


def micro_batch_kernels(shape, dtype: str = "float32", fused_norm: bool | None = None, loss_impl: str = "standard",
                        n_chunks: int = 1, torch_lce: bool | None = None) -> tuple[int, int]:
    """(forward, backward) kernel ops of one micro-batch's forward and backward, without gradient
    accumulation (outside_rows' args)."""
    per_block = _add(*block_rows(shape, dtype, fused_norm).values())
    outside = outside_rows(shape, dtype, fused_norm, loss_impl, n_chunks, torch_lce)
    return _add(_times(shape.n_layer, per_block), *outside.values())


def accumulate_kernels(shape) -> int:
    """Adds of a micro-batch whose gradients accumulate into .grad: one per parameter tensor (in
    place of the detach the step's first micro-batch makes, counted in the *_VIEWS)."""
    return len(arch.param_entries(shape))


def update_kernels(shape, dtype: str = "float32") -> int:
    """Ops of one optimizer step: train_step's own, gradient clipping, fused AdamW, for Muon
    MUON_PER_MATRIX per matrix it takes, and fp16's GradScaler."""
    muon = MUON_PER_MATRIX * muon_matrices_per_block(shape) * shape.n_layer if shape.optimizer == "muon" else 0
    scaler = GRAD_SCALER_STEP + (GRAD_SCALER_FUSED_ADAMW if shape.optimizer == "adamw" else 0) \
        if dtype == "float16" else 0
    return TRAINER_STEP + CLIP + ADAMW + muon + scaler


def update_views(shape) -> int:
    """Ops of one optimizer step that launch no kernel (UPDATE_VIEWS, Muon's)."""
    muon = MUON_VIEWS + MUON_VIEWS_PER_MATRIX * muon_matrices_per_block(shape) * shape.n_layer \
        if shape.optimizer == "muon" else 0
    return UPDATE_VIEWS + muon


def recompute_kernels(shape, dtype: str, policy: str, fused_norm: bool | None = None) -> int:
    """Forward ops a checkpointed block runs again in its backward: all of them ('full'), or all but
    its matmuls and SDPA, which selective checkpointing keeps (trainer/model/sac_ops.py)."""
    forward = _add(*block_rows(shape, dtype, fused_norm).values())[0]
    return forward - 5 if policy == "selective" else forward
