# GPT-2 124M in the style of nanoGPT's config/train_gpt2.py, on one GPU: nanoGPT's 5 steps x 8
# GPUs of gradient accumulation become 40 steps here, so the effective batch stays
# 12 x 40 = 480 sequences of 1024 tokens (~0.5M tokens per optimizer step).
#
#   autofit probe --config configs/gpt2_124m.py --gpu a100-40gb    # estimate
#   autofit run --config configs/gpt2_124m.py                       # probe, then train here
#
# Parsed with ast, never executed: only literal assignments (arithmetic on numbers is allowed).
out_dir = 'out/gpt2-124m'
dataset = 'fineweb'  # python scripts/prepare_fineweb.py --out data/fineweb
wandb_log = False  # True: metrics.jsonl's records to Weights & Biases too (pip install wandb), as nanoGPT's
wandb_project = 'owt'
wandb_run_name = 'gpt2-124M'

batch_size = 12
block_size = 1024
gradient_accumulation_steps = 5 * 8

n_layer = 12
n_head = 12
n_embd = 768
dropout = 0.0
bias = False

learning_rate = 6e-4
max_iters = 600000
lr_decay_iters = 600000
min_lr = 6e-5
warmup_iters = 2000
weight_decay = 1e-1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0

eval_interval = 1000
eval_iters = 200
log_interval = 10

dtype = 'bfloat16'
compile = True
