"""The estimate's terms for the model options of today's small GPTs (trainer/model/layers.py, gpt.py,
ce.py; issue 16): which parameters exist, what optimizer state each carries, and what one
transformer block keeps for backward, per option. autofit/planning/estimate.py adds them up by
phase; every option at GPT-2's value gives nanoGPT's figures exactly, so GPT-2 rows are unchanged.

Counted from the code (which op saves which tensor), then checked against the budgeted CPU device
with the rows of scripts/bench_estimate.py that vary one option at a time (docs/estimator.md).
"""
from __future__ import annotations


def head_dim(shape) -> int:
    return shape.n_embd // shape.n_head


def kv_heads(shape) -> int:
    return shape.n_kv_head or shape.n_head


def mlp_hidden(shape) -> int:
    """The MLP's hidden width, as trainer.model.layers.mlp_hidden (4C; SwiGLU: 8C/3 rounded up to 64)."""
    C = shape.n_embd
    return 4 * C if shape.mlp != "swiglu" else -(-(8 * C // 3) // 64) * 64


def param_entries(shape) -> list[tuple[int, str]]:
    """(numel, kind) of every parameter in GPT.parameters() order: kind 'wte', 'wpe', 'block_matrix',
    'block_vector', 'ln_f' or 'head' (the untied lm_head; a tied one is wte, counted once)."""
    C, b = shape.n_embd, shape.bias
    out = [(shape.vocab_size * C, "wte")]
    if shape.pos_emb == "learned":
        out.append((shape.block_size * C, "wpe"))
    norm = [] if shape.norm == "rmsnorm" else [(C, "block_vector")] * (2 if b else 1)

    def linear(rows: int, cols: int) -> list[tuple[int, str]]:
        return [(rows * cols, "block_matrix")] + ([(rows, "block_vector")] if b else [])

    qkv_rows = (shape.n_head + 2 * kv_heads(shape)) * head_dim(shape)
    h = mlp_hidden(shape)
    fc_rows = 2 * h if shape.mlp == "swiglu" else h
    for _ in range(shape.n_layer):
        out += norm + linear(qkv_rows, C) + linear(C, C) + norm + linear(fc_rows, C) + linear(C, h)
    out += [(n, "ln_f") for n, _ in norm]
    if not shape.tie_embeddings:
        out.append((shape.vocab_size * C, "head"))
    return out


def muon_param(kind: str, shape) -> bool:
    """Whether trainer.step.make_optimizer gives this parameter to Muon (the blocks' matrices)."""
    return shape.optimizer == "muon" and kind == "block_matrix"


def optimizer_state_bytes(shape, unit) -> int:
    """AdamW: exp_avg and exp_avg_sq (2 x 4 B per parameter); Muon: one fp32 momentum buffer per
    matrix (4 B per parameter; torch.optim.Muon's 'momentum_buffer'). `unit(n)`: bytes of an fp32
    tensor of n elements on the device (rounded on CUDA)."""
    return sum((1 if muon_param(k, shape) else 2) * unit(n) for n, k in param_entries(shape))


def muon_step_temporaries(shape) -> int:
    """Peak bytes of torch.optim.Muon's for-loop step (torch/optim/_muon.py, _single_tensor_muon):
    per matrix r x c the Nesterov update grad.lerp(buf) (fp32), its bf16 copy and the next
    Newton-Schulz iterate (2 x bf16), and the m x m Gram matrix and its update (2 x bf16,
    m = min(r, c)). The fused c_attn and SwiGLU c_fc are stepped block by block (trainer.muon):
    Q, K and V, gate and up are its matrices. 0 without Muon."""
    if shape.optimizer != "muon":
        return 0
    C, h, kvd = shape.n_embd, mlp_hidden(shape), kv_heads(shape) * head_dim(shape)
    mats = [(shape.n_head * head_dim(shape), C), (kvd, C), (C, C), (h, C), (C, h)]
    return max(4 * r * c + 2 * 2 * r * c + 2 * 2 * min(r, c) ** 2 for r, c in mats)


def block_saved_elements(shape) -> tuple[int, int]:
    """(elements per token that one block keeps for backward, of them the fp32 residual-stream ones),
    counted from trainer/model/layers.py: the block input (norm's input), ln_1's output, c_attn's
    output (q, k, v: C + 2 KV hd), RoPE's rotated q and k and QK-norm's normed q and k (C + KV hd
    each, new tensors SDPA saves), SDPA's output, the residual x + attn, ln_2's output, and the
    MLP: GELU and ReLU^2 keep 2 hidden-wide tensors (activation input or output, c_proj's input),
    SwiGLU 4 (c_fc's 2-wide output, silu's output, the product). GPT-2: 16 C. Checked per option with
    saved-tensor hooks and the budgeted CPU device (docs/estimator.md)."""
    C, kvd = shape.n_embd, kv_heads(shape) * head_dim(shape)
    h = mlp_hidden(shape)
    qk = C + kvd
    rope, qkn = shape.pos_emb == "rope", shape.qk_norm
    attn = C + (C + 2 * kvd) + (qk if rope else 0) + (qk if qkn else 0) + C
    if rope or qkn:  # q is then contiguous in (B, H, T, hd): SDPA's output too, so c_proj's input is a copy
        attn += C
    if kvd < C:  # grouped (enable_gqa): the CPU's SDPA repeats K and V to n_head heads and saves the
        # repeats (2 C), in place of what it would have kept of them: QK-norm's normed k (kvd); with
        # RoPE also c_attn's k and v (2 kvd), the rotated k (kvd) and the contiguous copy (C). Read
        # per tensor with saved-tensor hooks (torch 2.13, CPU; tests/test_estimate_gqa.py); it was a
        # fit of one head ratio, 1.6 % over to 5 % under for others (session 10)
        attn += C - 3 * kvd if rope else 2 * C - kvd if qkn else 2 * C
    mlp = 4 * h if shape.mlp == "swiglu" else 2 * h
    return C + attn + C + C + mlp, 2 * C


def block_stats_bytes(shape, B: int) -> int:
    """Bytes of one block's small saved statistics, micro-batch B: LayerNorm's mean and rstd (2 x
    N fp32 each norm) or RMSNorm's rstd (N), QK-norm's rstd per head of q and k, SDPA's log-sum-exp
    (B x H x T fp32)."""
    N, T = B * shape.block_size, shape.block_size
    per_norm = 2 * N * 4 if shape.norm == "layernorm" else N * 4
    qk = (shape.n_head + kv_heads(shape)) * N * 4 if shape.qk_norm else 0
    return 2 * per_norm + qk + 4 * B * shape.n_head * T


def block_linear_params(shape) -> int:
    """Elements of one block's Linear weights and biases (autocast's 16-bit copies of them)."""
    C, h = shape.n_embd, mlp_hidden(shape)
    qkv = (shape.n_head + 2 * kv_heads(shape)) * head_dim(shape)
    fc = 2 * h if shape.mlp == "swiglu" else h
    n = qkv * C + C * C + fc * C + C * h
    return n + ((qkv + C + fc + C) if shape.bias else 0)


def softcap_head_extra(shape, N: int, amp: bool) -> tuple[int, int]:
    """(forward, backward start) bytes the standard loss adds with a logit soft-cap, N tokens:
    tanh keeps its output (N x V) for backward, and the capped logits are a second N x V
    buffer only until cross_entropy's log-softmax is made (measured: one N x V buffer more in both
    phases on the budgeted CPU device)."""
    if shape.logit_softcap <= 0:
        return 0, 0
    nv = N * shape.vocab_size * (2 if amp else 4)
    return nv, nv


def mlp_cuda_autocast_saved_bytes(shape, N: int, amp: bool, cuda: bool) -> int:
    """Bytes one non-checkpointed block saves beyond block_saved_elements' count, N tokens, under
    CUDA autocast: ReLU^2's square is aten.pow, which CUDA autocast runs in fp32, so pow saves an
    fp32 copy of relu's 16-bit output (4 bytes per hidden element) beside it. CPU autocast keeps
    pow in 16 bits (nothing more saved: measured on the budgeted CPU device). Measured on an H200
    (torch 2.11, 2026-12-04) with saved-tensor hooks: relu's bf16 output, pow's fp32 input and
    c_proj's bf16 input; the whole model (GPT-2 124M, bf16, 4 x 1024 tokens) 4.0 bytes per hidden
    element per block over GELU."""
    return 4 * mlp_hidden(shape) * N if shape.mlp == "relu2" and amp and cuda else 0


def mlp_backward_extra_bytes(shape, N: int, amp: bool) -> int:
    """Hidden-wide temporaries an MLP's backward holds beyond GELU's one (gelu_backward's output),
    N tokens: ReLU^2's square backs through PowBackward (x^1, then x 2, then x grad: two more
    live at once before threshold_backward); SwiGLU's product backs into two gradients (grad x up,
    grad x silu) before silu_backward. In the activation's dtype (16-bit under autocast). Traced
    op by op on the budgeted CPU device (L4 C32 T64, checkpointing 1: ReLU^2 +7.7, SwiGLU +3.7
    fp32 N x C at the top block's backward, against the GELU-shaped term)."""
    per = {"relu2": 2, "swiglu": 1}.get(shape.mlp, 0)
    if not per:
        return 0
    h = mlp_hidden(shape)
    # by then c_proj's weight gradient (counted in the GELU-shaped term) has gone into its .grad
    return max(0, per * (2 if amp else 4) * h * N - (2 if amp else 4) * h * shape.n_embd)


def weight_grad_upcast_bytes(shape, N: int, amp: bool) -> int:
    """The top block's backward transient under autocast when the MLP's weight gradient is cast up,
    N tokens (0 in fp32, where the gradient is made in fp32 and counted in the GELU-shaped term):
    the 16-bit gradient of c_proj's h x C copy becomes an fp32 h x C tensor (4 bytes per element,
    the 16-bit copy's saved weight going as its gradient comes), beside the fp32 residual gradient
    (4 bytes per token and channel): 4NC + 4hC. It binds where N is small against C: L2 C128 T16,
    bf16, micro-batch 1 with Muon was 1.7 % under on the budgeted CPU device without it (fitted
    over C 64-256 and N 8-32: within 450 bytes; tests/test_estimate.py)."""
    if not amp:
        return 0
    return 4 * N * shape.n_embd + 4 * mlp_hidden(shape) * shape.n_embd


def swiglu_fc_backward_bytes(shape, N: int, amp: bool) -> int:
    """The top block's backward transient at SwiGLU's c_fc, N tokens (0 for other MLPs), to be
    compared with the GELU-shaped one: c_fc's weight gradient is 2 x hidden x C, twice c_proj's,
    and it is made beside the gate|up gradient (cat, 2 x hidden wide) and then the input gradient,
    while the MLP's saved tensors (c_fc's output, silu's output, the product: 4 x hidden wide) are
    already freed. Beside the fp32 residual gradient (and its 16-bit cast under autocast), in fp32:
    8NC + 8hC - 8hN; under autocast the gradients are 16-bit: 8NC + 4hC - 4hN. It binds where N is
    small against C (micro-batch 1, short blocks): L2 C128 T16, micro-batch 1 with Muon was 2.1 %
    under on the budgeted CPU device without it (tests/test_estimate.py)."""
    if shape.mlp != "swiglu":
        return 0
    C, h = shape.n_embd, mlp_hidden(shape)
    if amp:
        return 6 * N * C + 6 * h * C - 8 * h * N
    return 8 * N * C + 8 * h * C - 8 * h * N


def embedding_backward_bytes(shape, amp: bool, accumulating: bool) -> int:
    """The gradients at wte's backward (bytes, besides `gradients`): wte's dense fp32 gradient,
    and, tied, the lm_head gradient held in autograd's buffer to be summed with it. Under autocast
    that held gradient is the fp32 upcast of the 16-bit copy's gradient and the sum is made out
    of place (aten.add.Tensor, measured on the budgeted CPU device: V 4096, C 128, bf16): one
    V x C fp32 buffer more than in fp32, where the sum is made in place. wpe's gradient (learned
    positions) is made before wte's: accumulating, it is added into its .grad and gone by then;
    with one micro-batch it is that .grad, new beside them."""
    VC = shape.vocab_size * shape.n_embd
    wpe = 4 * shape.block_size * shape.n_embd if shape.pos_emb == "learned" and not accumulating else 0
    if not shape.tie_embeddings:
        return 4 * VC + wpe
    return (12 if amp else 8) * VC + wpe


def sac_saved_bytes(shape, B: int, amp: bool) -> int:
    """What selective checkpointing (trainer/model/layers.py SAC_SAVED_OPS) keeps of a checkpointed
    block beyond its input, micro-batch B: the outputs of its four matmuls (c_attn: C + 2 KV hd,
    attention c_proj: C, c_fc: hidden or 2 x hidden, MLP c_proj: C) and SDPA's output and
    log-sum-exp; 16-bit under autocast, where the matmuls run."""
    N, C, h = B * shape.block_size, shape.n_embd, mlp_hidden(shape)
    kvd = kv_heads(shape) * head_dim(shape)
    fc = 2 * h if shape.mlp == "swiglu" else h
    elems = (C + 2 * kvd) + C + C + fc + C
    return (2 if amp else 4) * N * elems + 4 * B * shape.n_head * shape.block_size


def optimizer_cpu_temporaries(shape) -> int:
    """Peak bytes of the optimizer step's temporaries on the CPU (`shape`: an estimate.ModelShape),
    the for-loop AdamW's (the CPU default: no foreach, no fused) and Muon's.

    Per parameter it computes denom = exp_avg_sq.sqrt() / c, a temporary and the result (2 x the
    parameter), while the previous parameter's denom is still bound to the loop variable.
    The loop runs per param group: nanoGPT's groups are matrices (decay) then vectors; with Muon
    the blocks' matrices are Muon's (muon_step_temporaries), stepped first."""
    shapes = [(n, kind not in ("block_vector", "ln_f")) for n, kind in param_entries(shape)
              if not muon_param(kind, shape)]
    peak = muon_step_temporaries(shape)
    for group in ([n for n, m in shapes if m], [n for n, m in shapes if not m]):
        prev = 0
        for n in group:
            peak = max(peak, 4 * (2 * n + prev))
            prev = n
    return peak
