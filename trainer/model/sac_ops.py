"""What selective activation checkpointing saves, without importing torch (the plan's words are
printed by commands that load no torch, e.g. `autofit profiles show`).

Inside a checkpointed block the outputs of these aten ops are saved and everything else (norms,
activations, RoPE, residual adds) is recomputed in backward: the matmuls and attention are the
expensive ops to redo, the rest is cheap elementwise work. torchtitan's default save list has the
same core (matmuls, SDPA's kernels). trainer/model/layers.py sac_context_fn turns the names into
torch.utils.checkpoint.create_selective_checkpoint_contexts' policy (torch >= 2.4).
"""
from __future__ import annotations

SAC_SAVED_OPS = ("mm", "addmm", "bmm", "_scaled_dot_product_flash_attention",
                 "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
                 "_scaled_dot_product_flash_attention_for_cpu")


def saved_ops_words(ops: tuple[str, ...] | None = None) -> str:
    """What a selectively checkpointed block keeps, in words read from `ops` (SAC_SAVED_OPS when
    None): 'matmuls (mm, addmm, bmm) and attention outputs (4 SDPA kernels) kept, the rest
    recomputed'. An op that is neither a matmul nor an SDPA kernel is named as it is."""
    ops = SAC_SAVED_OPS if ops is None else ops
    attn = [n for n in ops if n.startswith("_scaled_dot_product")]
    mm = [n for n in ops if n in ("mm", "addmm", "bmm", "matmul", "baddbmm")]
    other = [n for n in ops if n not in attn and n not in mm]
    parts = ([f"matmuls ({', '.join(mm)})"] if mm else []) + \
        ([f"attention outputs ({len(attn)} SDPA kernel{'s' if len(attn) != 1 else ''})"] if attn else []) + other
    if not parts:
        return "nothing kept, all recomputed"
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"{text} kept, the rest recomputed"
