"""The built-in configs (`--preset NAME`): TrainConfig field values, applied before a config
file and --set."""
from __future__ import annotations

from typing import Any

PRESETS: dict[str, dict[str, Any]] = {
    # Byte-level model on the embedded text: trains on a laptop CPU in minutes, < 1M parameters.
    "tiny": dict(
        n_layer=4, n_head=4, n_embd=128, block_size=128, vocab_size=256, dropout=0.0,
        batch_size=16, gradient_accumulation_steps=2, learning_rate=1e-3, max_iters=300,
        warmup_iters=20, lr_decay_iters=300, min_lr=1e-4, eval_interval=100, eval_iters=10,
        log_interval=10, dtype="float32", compile=False, dataset="embedded", out_dir="out/tiny",
        weight_decay=0.1, beta2=0.99,
    ),
    # nanoGPT's config/train_gpt2.py on one GPU (its 5 x 8 GPUs of accumulation as 40 steps).
    "gpt2-124m": dict(
        n_layer=12, n_head=12, n_embd=768, block_size=1024, batch_size=12,
        gradient_accumulation_steps=40, max_iters=600000, lr_decay_iters=600000,
        eval_interval=1000, eval_iters=200, log_interval=10, weight_decay=0.1,
        dataset="fineweb", out_dir="out/gpt2-124m",
    ),
    # The config that ran out of memory on an RTX 4070 and started the project (DESIGN.md).
    "rtx4070-seed": dict(
        batch_size=16, gradient_accumulation_steps=32, block_size=1024, n_layer=12, n_head=12,
        n_embd=576, vocab_size=50304, compile=True, dtype="bfloat16", dataset="fineweb",
        out_dir="out/rtx4070-seed",
    ),
    # nanochat's depth-12 base model (karpathy/nanochat, nanochat/gpt.py and scripts/base_train.py):
    # 6 heads of 128, rotary positions, parameter-free RMSNorm, QK-norm, ReLU^2, untied embeddings,
    # logits soft-capped at 15, Muon for the blocks' matrices (0.02) and AdamW (0.004, betas 0.8/0.95)
    # for the rest; 2^19 tokens per step = 256 sequences of 2048 (device batch 32 x 8). Not as in
    # nanochat (read at its commit 92d63d4): its value embeddings, residual lambdas and sliding
    # windows; the RMSNorm after the token embedding and the 1.2x on q and k after QK-norm; its
    # AdamW rates per group (embeddings 0.2 x (768/d)^0.5, lm_head 0.004; here 0.004 for all) and
    # its initialisation (here GPT-2's, std 0.02); its Muon variant (Polar Express in place of
    # Newton-Schulz, a NorMuon-style second moment, cautious weight decay; here torch.optim.Muon),
    # its weight decay (0.28, scaled by batch and horizon; here 0) and its schedule (40 warm-up
    # steps, constant, then linear to 0 over the last 65 %; here cosine from step 0). Muon takes the fused c_attn's Q, K and V apart,
    # as nanochat's c_q, c_k, c_v (trainer.muon). The shapes, and so the memory autofit fits, are
    # nanochat's. The data here is
    # the embedded bytes (ids 0..255 of the 32768-token vocabulary, which the preset fixes: a smoke
    # run); set dataset to a folder tokenized with nanochat's tokenizer to train for real.
    "nanochat-d12": dict(
        n_layer=12, n_head=6, n_embd=768, block_size=2048, vocab_size=32768, pos_emb="rope",
        rope_base=100000.0, norm="rmsnorm", qk_norm=True, mlp="relu2", tie_embeddings=False,
        logit_softcap=15.0, optimizer="muon", muon_lr=0.02, learning_rate=0.004, beta1=0.8, beta2=0.95,
        weight_decay=0.0, warmup_iters=0, batch_size=32, gradient_accumulation_steps=8,
        max_iters=20000, lr_decay_iters=20000, min_lr=0.0, eval_interval=250, eval_iters=20,
        log_interval=10, dataset="embedded", out_dir="out/nanochat-d12",
    ),
}

# Keys whose preset value is part of the model, not a default a dataset's meta.pkl replaces
# (load_config otherwise takes the dataset's vocab_size).
PRESET_FIXED: dict[str, tuple[str, ...]] = {"nanochat-d12": ("vocab_size",)}
