# The config that started autofit (DESIGN.md, "The problem, in numbers"): nanoGPT-style, ~77M
# parameters, run on an RTX 4070 (12 GB). As written it runs out of memory in the first backward
# pass, allocating the logits buffer (16 x 1024 x 50304 x 2 bytes = 1.54 GiB); the whole step
# needs ~13.5 GiB (estimated) against ~11.5 GiB usable.
#
#   autofit probe --config configs/rtx4070_seed.py --gpu rtx4070-12gb   # estimate, no GPU needed
#   autofit run --profile rtx4070-12gb --config configs/rtx4070_seed.py  # on the card itself
#
# Parsed with ast, never executed: only literal assignments.
out_dir = 'out/rtx4070-seed'
dataset = 'fineweb'  # python scripts/prepare_fineweb.py --out data/fineweb

batch_size = 16
gradient_accumulation_steps = 32  # effective batch 16 x 32 = 512 sequences, kept exact
block_size = 1024

n_layer = 12
n_head = 12
n_embd = 576
vocab_size = 50304

compile = True
dtype = 'bfloat16'
