"""A GPT in the shape of nanoGPT's model.py, so a nanoGPT checkpoint's state dict loads as is.

Two memory levers live here because they change what the forward pass keeps for backward:
- activation checkpointing (`checkpointing=k`: every k-th block recomputes its activations);
- chunked cross-entropy (`loss_impl='chunked'`): the B*T x V logits are produced a chunk of rows at
  a time and their gradient is taken at once, so neither the full logits nor their fp32 copies
  ever exist. For GPT-2's 50304-token vocabulary that is most of the memory of a training step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = False
    checkpointing: int = 0  # 0 off, k: every k-th block (block i is checkpointed when i % k == 0)
    loss_impl: str = "standard"  # "standard" or "chunked"
    ce_chunk_size: int = 4096  # rows of B*T per chunk for the chunked loss

    @classmethod
    def from_train_config(cls, cfg) -> "GPTConfig":
        return cls(**{f: getattr(cfg, f) for f in cls.__dataclass_fields__})


# nanoGPT's GPTConfig fields: a checkpoint's model_args hold exactly these (GPTConfig(**model_args))
MODEL_ARGS = ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size", "dropout")


def model_args_of(source: Any) -> dict[str, Any]:
    """The seven nanoGPT model args of a TrainConfig, a GPTConfig, or a mapping (extra keys,
    like a TrainConfig dict's, are dropped). Raises ValueError if one is missing."""
    get = source.get if isinstance(source, Mapping) else (lambda k, d=None: getattr(source, k, d))
    missing = [k for k in MODEL_ARGS if get(k) is None]
    if missing:
        raise ValueError(f"model args lack {', '.join(missing)}")
    args = {k: get(k) for k in MODEL_ARGS}
    try:
        for k in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size"):
            args[k] = int(args[k])
        args["bias"], args["dropout"] = bool(args["bias"]), float(args["dropout"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"model args are not numbers ({e})") from None
    return args



class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's has no bias=False before 2.1)."""

    def __init__(self, ndim: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.dropout = config.dropout

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                           is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """mean cross-entropy of (x @ weight.T) against targets, computed a chunk of rows at a time.

    The gradient is computed in the forward pass (softmax - one_hot per chunk), so what is kept for
    backward is grad_x (N x C) and grad_weight (V x C, fp32) instead of the N x V logits, their
    fp32 copy and the saved log-softmax. Rows with target -1 are ignored, as in F.cross_entropy.
    """

    @staticmethod
    def forward(ctx, x, weight, targets, chunk_size: int, compute_dtype: torch.dtype):
        n_rows = x.shape[0]
        valid = targets != -1
        n_valid = valid.sum().clamp(min=1).to(torch.float32)
        w = weight.to(compute_dtype)
        grad_x = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if ctx.needs_input_grad[1] else None
        loss_sum = torch.zeros((), dtype=torch.float32, device=x.device)
        for start in range(0, n_rows, chunk_size):
            end = min(start + chunk_size, n_rows)
            xc = x[start:end].to(compute_dtype)
            tc = targets[start:end]
            vc = valid[start:end]
            logits = (xc @ w.t()).float()  # (n, V): the only V-sized buffer, one chunk at a time
            tgt = logits.gather(1, tc.clamp(min=0).unsqueeze(1)).squeeze(1)
            # log-sum-exp in place on the logits: torch.logsumexp allocates an n x V fp32 (self - max)
            # inside its kernel (ATen ReduceOps.cpp, logsumexp_out_impl), a chunk-sized temporary no
            # tracker of op outputs sees (docs/estimator.md). exp_ leaves exp(logits - max) behind.
            m = logits.amax(dim=-1, keepdim=True)
            z = logits.sub_(m).exp_().sum(dim=-1, keepdim=True)
            lse = (z.log() + m).squeeze(1)
            loss_sum += ((lse - tgt) * vc).sum()
            if grad_x is None and grad_w is None:
                continue
            # d(sum of losses)/d(logits) = softmax - one_hot, zero on ignored rows; in place.
            probs = logits.div_(z)
            probs[torch.arange(end - start, device=x.device), tc.clamp(min=0)] -= 1.0
            probs.mul_(vc.unsqueeze(1))
            g = probs.to(compute_dtype)
            del logits, probs
            if grad_x is not None:
                grad_x[start:end] = (g @ w).to(x.dtype)
            if grad_w is not None:
                grad_w += (g.t() @ xc).float()
        ctx.save_for_backward(grad_x if grad_x is not None else torch.empty(0),
                              grad_w if grad_w is not None else torch.empty(0), n_valid)
        ctx.has = (grad_x is not None, grad_w is not None)
        ctx.weight_dtype = weight.dtype
        return loss_sum / n_valid

    @staticmethod
    def backward(ctx, grad_out):
        grad_x, grad_w, n_valid = ctx.saved_tensors
        scale = grad_out / n_valid
        gx = grad_x * scale.to(grad_x.dtype) if ctx.has[0] else None
        gw = (grad_w * scale).to(ctx.weight_dtype) if ctx.has[1] else None
        return gx, gw, None, None, None


def chunked_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          chunk_size: int = 4096) -> torch.Tensor:
    """Mean CE of the logits x @ weight.T (x: N x C, weight: V x C) without materialising them.
    Under autocast the matmuls run in the autocast dtype, the softmax in fp32, as the standard
    path does."""
    dev = x.device.type
    compute_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else weight.dtype
    with torch.autocast(device_type=dev, enabled=False):
        return _ChunkedLinearCrossEntropy.apply(x, weight, targets, chunk_size, compute_dtype)


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # tied, as in GPT-2 and nanoGPT
        self.apply(self._init_weights)
        for pn, p in self.named_parameters():
            if pn.endswith("c_proj.weight"):  # GPT-2's scaled init of residual projections
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @classmethod
    def empty(cls, config: GPTConfig, device: torch.device | str = "cpu") -> "GPT":
        """A GPT whose tensors are allocated on `device` but not initialised, for loading weights
        into: the random init (minutes on a CPU for gpt2-xl) is skipped. Every parameter must
        be overwritten before use; the tied wte/lm_head stays one tensor."""
        with torch.device("meta"):
            model = cls(config)
        model.to_empty(device=device)
        model.transformer.wte.weight = model.lm_head.weight  # to_empty made two tensors of the tied one
        return model

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def hidden(self, idx: torch.Tensor) -> torch.Tensor:
        """Final hidden states (after ln_f), B x T x C."""
        _, t = idx.size()
        if t > self.config.block_size:
            raise ValueError(f"sequence of length {t} exceeds block_size {self.config.block_size}")
        pos = torch.arange(0, t, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        k = self.config.checkpointing
        recompute = k > 0 and self.training and torch.is_grad_enabled()
        for i, block in enumerate(self.transformer.h):
            if recompute and i % k == 0:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.transformer.ln_f(x)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """With targets: the mean loss only (the logits are never handed back, so they cannot be
        kept alive through backward). Without: the logits of every position."""
        x = self.hidden(idx)
        if targets is None:
            return self.lm_head(x)
        if self.config.loss_impl == "chunked":
            return chunked_cross_entropy(x.view(-1, x.size(-1)), self.lm_head.weight,
                                         targets.reshape(-1), self.config.ce_chunk_size)
        logits = self.lm_head(x)
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)

    def crop_block_size(self, block_size: int) -> None:
        """Shrink the context to `block_size` positions by keeping the first rows of wpe, as
        nanoGPT's crop_block_size does (e.g. GPT-2's 1024 positions cut to 256 for fine-tuning).
        Raises ValueError if block_size is not in 1..config.block_size."""
        if not 1 <= block_size <= self.config.block_size:
            raise ValueError(f"block_size can only shrink: {block_size} is not in 1..{self.config.block_size}")
        self.config.block_size = block_size
        self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size].detach().clone())

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None) -> torch.Tensor:
        for _ in range(max_new_tokens):
            idx_cond = idx[:, -self.config.block_size:]
            logits = self(idx_cond)[:, -1, :] / temperature
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("inf")
            idx = torch.cat((idx, torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)), dim=1)
        return idx


def clean_state_dict(state_dict: dict) -> dict:
    """A nanoGPT (or our own) state dict made loadable: torch.compile's `_orig_mod.` prefix is
    stripped and the causal-mask buffers (`attn.bias`) of nanoGPT's non-flash path are dropped."""
    out = {}
    for k, v in state_dict.items():
        if k.startswith("_orig_mod."):
            k = k[len("_orig_mod."):]
        if k.endswith(".attn.bias") and v.dim() == 4:
            continue
        out[k] = v
    return out
