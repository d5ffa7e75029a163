"""Today's small-GPT options of TrainConfig (RoPE, RMSNorm, QK-norm, ReLU^2/SwiGLU, GQA, untied
embeddings, logit soft-cap, Muon): the combinations that cannot work, refused in one line when the
config is built, before any work."""
from __future__ import annotations

from typing import Any

# GPT-2's value of each option: a config that keeps them all is nanoGPT's model
MODERN_DEFAULTS: dict[str, Any] = {"pos_emb": "learned", "rope_base": 10000.0, "norm": "layernorm",
                                   "qk_norm": False, "mlp": "gelu", "n_kv_head": None,
                                   "tie_embeddings": True, "logit_softcap": 0.0, "optimizer": "adamw",
                                   "checkpointing_policy": "full"}


def muon_available() -> bool:
    """Whether the installed torch ships torch.optim.Muon (torch >= 2.9)."""
    import torch
    return hasattr(torch.optim, "Muon")


def check_model_options(cfg, sources: dict[str, str] | None = None) -> None:
    """Raises ValueError (one line, naming the keys) for a combination of options that cannot be
    built or trained: n_kv_head not dividing n_head, RoPE on an odd head size, GPT-2 weights with a
    changed architecture, Muon on a torch without it or under FSDP2, muon_lr or rope_base given (by a
    file or --set; `sources`: key -> where its value came from) where it does nothing (another
    optimizer, learned positions)."""
    given = (sources or {}).get("muon_lr", "preset")
    if cfg.optimizer != "muon" and not given.startswith("preset"):
        raise ValueError(f"muon_lr ({given}) is torch.optim.Muon's learning rate, but optimizer is "
                         f"{cfg.optimizer!r}: drop muon_lr, or set optimizer = 'muon'")
    given = (sources or {}).get("rope_base", "preset")
    if cfg.pos_emb != "rope" and not given.startswith("preset"):
        raise ValueError(f"rope_base ({given}) is the rotary positions' base, but pos_emb is {cfg.pos_emb!r}: "
                         f"drop rope_base, or set pos_emb = 'rope'")
    if cfg.n_kv_head is not None:
        if cfg.n_kv_head > cfg.n_head or cfg.n_head % cfg.n_kv_head:
            raise ValueError(f"n_kv_head ({cfg.n_kv_head}) must divide n_head ({cfg.n_head}): each key/value "
                             f"head serves the same number of query heads")
    head = cfg.n_embd // cfg.n_head
    if cfg.pos_emb == "rope" and head % 2:
        raise ValueError(f"pos_emb 'rope' turns pairs of channels: the head size n_embd / n_head = {head} "
                         f"must be even")
    if cfg.init_from.startswith("gpt2"):
        changed = [k for k, v in MODERN_DEFAULTS.items()
                   if k not in ("optimizer", "rope_base", "checkpointing_policy") and getattr(cfg, k) != v]
        if changed:
            raise ValueError(f"init_from {cfg.init_from!r} loads GPT-2's architecture: "
                             f"{', '.join(f'{k}={getattr(cfg, k)!r}' for k in changed)} must keep GPT-2's value")
    if cfg.checkpointing_policy == "selective":
        from torch.utils import checkpoint as ck
        if not hasattr(ck, "create_selective_checkpoint_contexts"):
            raise ValueError("checkpointing_policy 'selective' needs torch.utils.checkpoint."
                             "create_selective_checkpoint_contexts (torch >= 2.4); use 'full'")
    if cfg.optimizer == "muon":
        if not muon_available():
            import torch
            raise ValueError(f"optimizer 'muon' needs torch.optim.Muon (torch >= 2.9); this torch "
                             f"{torch.__version__} has none: use optimizer = 'adamw' or upgrade torch")
        if cfg.parallelism == "fsdp2":
            raise ValueError("optimizer 'muon' with parallelism 'fsdp2': torch.optim.Muon orthogonalises "
                             "whole matrices and FSDP2 shards them; use parallelism = 'ddp'")


def lever_words(cfg) -> str:
    """The memory levers a run trains with where they are not the defaults, for its opening line
    (a --no-probe run has no plan line to say them): ', activation checkpointing every 2 blocks
    (selective), chunked loss'; '' when it uses none."""
    words = []
    if cfg.checkpointing:
        words.append(f"activation checkpointing every {cfg.checkpointing} block{'s' if cfg.checkpointing > 1 else ''} "
                     f"({cfg.checkpointing_policy})")
    if cfg.loss_impl != "standard":
        words.append(f"{cfg.loss_impl} loss")
    return "".join(f", {w}" for w in words)
