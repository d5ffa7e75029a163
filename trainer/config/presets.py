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
}
