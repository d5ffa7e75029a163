"""The transformer block and its parts, in nanoGPT's shape by default and in today's small-GPT
shapes by option (nanochat's nanochat/gpt.py, modded-nanogpt's train_gpt.py, torchtitan's llama3):

- norm: nanoGPT's LayerNorm (weight, optional bias) or parameter-free RMSNorm (F.rms_norm);
- attention: multi-head, or grouped-query (n_kv_head < n_head: each K/V head serves
  n_head / n_kv_head query heads), with rotary position embeddings (RoPE) and QK-norm as options;
- MLP: GELU (GPT-2), ReLU^2 (nanochat, modded-nanogpt) or SwiGLU (Llama).

With every option at its default the parameter names and shapes are nanoGPT's, so a nanoGPT
checkpoint loads as is.
"""
from __future__ import annotations

import inspect

import torch
import torch.nn as nn
from torch.nn import functional as F

from trainer.model.sac_ops import SAC_SAVED_OPS  # the save list of selective checkpointing

# F.scaled_dot_product_attention takes enable_gqa from torch 2.5; older torch repeats K and V.
try:
    _SDPA_GQA = "enable_gqa" in inspect.signature(F.scaled_dot_product_attention).parameters
except (TypeError, ValueError):  # a builtin without a signature: assume the older torch
    _SDPA_GQA = False


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's has no bias=False before 2.1)."""

    def __init__(self, ndim: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class RMSNorm(nn.Module):
    """Parameter-free RMSNorm over the last dimension, x / sqrt(mean(x^2) + eps), as nanochat's
    `norm` (F.rms_norm, torch >= 2.4; eps is torch's default, finfo(dtype).eps)."""

    def forward(self, x):
        return F.rms_norm(x, (x.size(-1),))


def make_norm(config) -> nn.Module:
    return RMSNorm() if config.norm == "rmsnorm" else LayerNorm(config.n_embd, bias=config.bias)


def rope_tables(block_len: int, head_dim: int, base: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of RoPE's angles for positions 0..block_len-1: each (block_len, head_dim/2), fp32.
    Channel pair i turns by position * base^(-2i/head_dim) (Su et al. 2021, RoFormer, eq. 34)."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    angles = torch.outer(torch.arange(block_len, dtype=torch.float32, device=device), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, T, D) by the angles of cos/sin (T, D/2): channel i is paired with channel
    i + D/2 (the half-split layout of nanochat and GPT-NeoX), and each pair is turned as a point
    in the plane. The result keeps x's dtype."""
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d].float(), x[..., d:].float()
    y1 = x1 * cos + x2 * sin
    y2 = x2 * cos - x1 * sin
    return torch.cat([y1, y2], dim=-1).to(x.dtype)


class CausalSelfAttention(nn.Module):
    """Causal self-attention through F.scaled_dot_product_attention. c_attn projects to the
    n_head query heads and the n_kv_head key and value heads at once ((n_head + 2 n_kv_head) x
    head_dim outputs; 3 x n_embd without GQA, as nanoGPT)."""

    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head or config.n_head
        self.head_dim = config.n_embd // config.n_head
        self.c_attn = nn.Linear(config.n_embd, (self.n_head + 2 * self.n_kv_head) * self.head_dim,
                                bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.dropout = config.dropout
        self.qk_norm = config.qk_norm

    def forward(self, x, rope=None):
        B, T, C = x.size()
        hd = self.head_dim
        q, k, v = self.c_attn(x).split([self.n_head * hd, self.n_kv_head * hd, self.n_kv_head * hd], dim=2)
        q = q.view(B, T, self.n_head, hd).transpose(1, 2)
        k = k.view(B, T, self.n_kv_head, hd).transpose(1, 2)
        v = v.view(B, T, self.n_kv_head, hd).transpose(1, 2)
        if rope is not None:
            cos, sin = rope
            q, k = apply_rope(q, cos[:T], sin[:T]), apply_rope(k, cos[:T], sin[:T])
        if self.qk_norm:  # after the rotation, as nanochat: a rotation keeps the norm anyway
            q, k = F.rms_norm(q, (hd,)), F.rms_norm(k, (hd,))
        extra = {}
        if self.n_kv_head != self.n_head:
            if _SDPA_GQA:
                extra["enable_gqa"] = True
            else:  # torch < 2.5: each K/V head repeated for its group of query heads
                rep = self.n_head // self.n_kv_head
                k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                           is_causal=True, **extra)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


def mlp_hidden(n_embd: int, mlp: str) -> int:
    """Width of the MLP's hidden layer: 4 x n_embd (GPT-2, ReLU^2); for SwiGLU two thirds of that,
    rounded up to a multiple of 64, so its three matrices hold about as many parameters as the
    two of a 4x MLP (Shazeer 2020, 'GLU Variants Improve Transformer'; Llama's multiple_of rule)."""
    if mlp != "swiglu":
        return 4 * n_embd
    return -(-(8 * n_embd // 3) // 64) * 64


class MLP(nn.Module):
    """c_fc -> activation -> c_proj. SwiGLU's c_fc holds the gate and the up projection as one
    matrix (2 x hidden outputs): silu(gate) * up."""

    def __init__(self, config):
        super().__init__()
        self.kind = getattr(config, "mlp", "gelu")
        hidden = mlp_hidden(config.n_embd, self.kind)
        width = 2 * hidden if self.kind == "swiglu" else hidden
        self.c_fc = nn.Linear(config.n_embd, width, bias=config.bias)
        self.gelu = nn.GELU() if self.kind == "gelu" else None  # nanoGPT's module name
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        h = self.c_fc(x)
        if self.kind == "relu2":
            h = F.relu(h).square()
        elif self.kind == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = self.gelu(h)
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x, rope=None):
        x = x + self.attn(self.ln_1(x), rope)
        return x + self.mlp(self.ln_2(x))


def has_selective_checkpointing() -> bool:
    """Whether this torch has torch.utils.checkpoint.create_selective_checkpoint_contexts (>= 2.4)."""
    from torch.utils import checkpoint as ck
    return hasattr(ck, "create_selective_checkpoint_contexts")


def sac_context_fn():
    """The context_fn for torch.utils.checkpoint.checkpoint that saves SAC_SAVED_OPS' outputs and
    recomputes the rest. Raises RuntimeError on a torch without selective checkpointing."""
    from torch.utils import checkpoint as ck
    if not has_selective_checkpointing():
        raise RuntimeError(f"torch {torch.__version__} has no selective activation checkpointing")
    ops = [getattr(torch.ops.aten, n).default for n in SAC_SAVED_OPS if hasattr(torch.ops.aten, n)]
    return ck.create_selective_checkpoint_contexts(ops)
