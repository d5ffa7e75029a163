"""A GPT in the shape of nanoGPT's model.py, so a nanoGPT checkpoint's state dict loads as is, with
today's small-GPT options beside it (trainer/model/layers.py: RoPE, RMSNorm, QK-norm, ReLU^2 or
SwiGLU, grouped-query attention; here: untied embeddings and the logit soft-cap).

Two memory levers live here because they change what the forward pass keeps for backward:
- activation checkpointing (`checkpointing=k`: every k-th block recomputes its activations);
- chunked cross-entropy (`loss_impl='chunked'`, trainer/model/ce.py): the full B*T x V logits and
  their fp32 copies never exist. For GPT-2's 50304-token vocabulary that is most of the memory of
  a training step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from trainer.model.ce import chunked_cross_entropy, lm_loss, softcap  # noqa: F401  (chunked_cross_entropy: re-exported)
from trainer.model.layers import Block, LayerNorm, make_norm, rope_tables, sac_context_fn  # noqa: F401


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
    checkpointing_policy: str = "full"  # "full": recompute the whole block; "selective": keep matmuls and SDPA
    loss_impl: str = "standard"  # "standard" or "chunked"
    ce_chunk_size: int = 4096  # rows of B*T per chunk for the chunked loss
    # today's small GPTs (nanochat, modded-nanogpt); the defaults are GPT-2's
    pos_emb: str = "learned"  # "learned" (wpe) or "rope"
    rope_base: float = 10000.0
    norm: str = "layernorm"  # "layernorm" or "rmsnorm" (parameter-free)
    qk_norm: bool = False
    mlp: str = "gelu"  # "gelu", "relu2" or "swiglu"
    n_kv_head: int | None = None  # None: n_head (no grouping)
    tie_embeddings: bool = True
    logit_softcap: float = 0.0  # 0: off

    @classmethod
    def from_train_config(cls, cfg) -> "GPTConfig":
        return cls(**{f: getattr(cfg, f) for f in cls.__dataclass_fields__})


# nanoGPT's GPTConfig fields: a GPT-2-shaped checkpoint's model_args hold exactly these, so
# nanoGPT's GPTConfig(**model_args) reads them
MODEL_ARGS = ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size", "dropout")
# today's options with their GPT-2 values: model_args carry those that differ (a nanoGPT checkpoint
# has none of them and loads as GPT-2)
MODERN_ARGS: dict[str, Any] = {"pos_emb": "learned", "rope_base": 10000.0, "norm": "layernorm",
                               "qk_norm": False, "mlp": "gelu", "n_kv_head": None,
                               "tie_embeddings": True, "logit_softcap": 0.0}
_MODERN_TYPES = {"pos_emb": str, "rope_base": float, "norm": str, "qk_norm": bool, "mlp": str,
                 "n_kv_head": int, "tie_embeddings": bool, "logit_softcap": float}


def model_args_of(source: Any) -> dict[str, Any]:
    """The model args of a TrainConfig, a GPTConfig, or a mapping (extra keys, like a TrainConfig
    dict's, are dropped): nanoGPT's seven, plus each MODERN_ARGS option whose value is not GPT-2's
    (rope_base only with RoPE; n_kv_head only when it differs from n_head). A missing option is
    GPT-2's. Raises ValueError if one of the seven is missing or a value is not of its type."""
    get = source.get if isinstance(source, Mapping) else (lambda k, d=None: getattr(source, k, d))
    missing = [k for k in MODEL_ARGS if get(k) is None]
    if missing:
        raise ValueError(f"model args lack {', '.join(missing)}")
    args = {k: get(k) for k in MODEL_ARGS}
    try:
        for k in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size"):
            args[k] = int(args[k])
        args["bias"], args["dropout"] = bool(args["bias"]), float(args["dropout"])
        for k, default in MODERN_ARGS.items():
            v = get(k, default)
            v = default if v is None else _MODERN_TYPES[k](v)
            if k == "n_kv_head" and v == args["n_head"] or k == "rope_base" and get("pos_emb", "learned") != "rope":
                continue
            if v != default:
                args[k] = v
    except (TypeError, ValueError) as e:
        raise ValueError(f"model args are not numbers ({e})") from None
    return args



class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        parts = dict(wte=nn.Embedding(config.vocab_size, config.n_embd))
        if config.pos_emb == "learned":  # RoPE turns q and k inside attention instead
            parts["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        parts.update(drop=nn.Dropout(config.dropout),
                     h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                     ln_f=make_norm(config))
        self.transformer = nn.ModuleDict(parts)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:  # tied, as in GPT-2 and nanoGPT; nanochat unties them
            self.transformer.wte.weight = self.lm_head.weight
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
        if config.tie_embeddings:  # to_empty made two tensors of the tied one
            model.transformer.wte.weight = model.lm_head.weight
        return model

    def fused_rows(self) -> dict[str, list[int]]:
        """{parameter name: its row blocks} of the matrices that hold several projections in one:
        each block's c_attn (query, key, value rows) and, with SwiGLU, c_fc (gate, up rows). An
        optimizer that treats a matrix as one operator (Muon: trainer.muon) takes them block by
        block, as models with separate c_q, c_k, c_v (nanochat) would have them."""
        out = {}
        for i, block in enumerate(self.transformer.h):
            a = block.attn
            out[f"transformer.h.{i}.attn.c_attn.weight"] = [a.n_head * a.head_dim] + [a.n_kv_head * a.head_dim] * 2
            if block.mlp.kind == "swiglu":
                out[f"transformer.h.{i}.mlp.c_fc.weight"] = [block.mlp.c_fc.weight.shape[0] // 2] * 2
        return out

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameters (tied ones once); without the learned position table if non_embedding."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and "wpe" in self.transformer:
            n -= self.transformer.wpe.weight.numel()
        return n

    def hidden(self, idx: torch.Tensor) -> torch.Tensor:
        """Final hidden states (after ln_f), B x T x C."""
        _, t = idx.size()
        if t > self.config.block_size:
            raise ValueError(f"sequence of length {t} exceeds block_size {self.config.block_size}")
        x = self.transformer.wte(idx)
        rope = None
        if "wpe" in self.transformer:
            x = x + self.transformer.wpe(torch.arange(0, t, dtype=torch.long, device=idx.device))
        else:  # cos/sin for t positions: (t, head_dim/2) each, recomputed per call (cheap, no buffer)
            rope = rope_tables(t, self.config.n_embd // self.config.n_head, self.config.rope_base, idx.device)
        x = self.transformer.drop(x)
        k = self.config.checkpointing
        recompute = k > 0 and self.training and torch.is_grad_enabled()
        for i, block in enumerate(self.transformer.h):
            if recompute and i % k == 0:
                extra = {"context_fn": sac_context_fn} if self.config.checkpointing_policy == "selective" else {}
                x = checkpoint(block, x, rope, use_reentrant=False, **extra)
            else:
                x = block(x, rope)
        return self.transformer.ln_f(x)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """With targets: the mean loss only (the logits are never handed back, so they cannot be
        kept alive through backward). Without: the logits of every position."""
        x = self.hidden(idx)
        cap = self.config.logit_softcap
        if targets is None:
            return softcap(self.lm_head(x), cap)
        return lm_loss(x.view(-1, x.size(-1)), self.lm_head.weight, targets.reshape(-1),
                       impl=self.config.loss_impl, chunk_size=self.config.ce_chunk_size, cap=cap)

    def crop_block_size(self, block_size: int) -> None:
        """Shrink the context to `block_size` positions by keeping the first rows of wpe, as
        nanoGPT's crop_block_size does (e.g. GPT-2's 1024 positions cut to 256 for fine-tuning).
        Raises ValueError if block_size is not in 1..config.block_size."""
        if not 1 <= block_size <= self.config.block_size:
            raise ValueError(f"block_size can only shrink: {block_size} is not in 1..{self.config.block_size}")
        self.config.block_size = block_size
        if "wpe" in self.transformer:  # RoPE has no table to cut
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
