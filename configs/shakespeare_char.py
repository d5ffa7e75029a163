# A character-level baby GPT on Shakespeare, after nanoGPT's config/train_shakespeare_char.py
# (6 layers, 6 heads, 384 wide, 256 characters of context: ~10.7M parameters).
#
# Data: `autofit data prepare shakespeare_char` (or nanoGPT's data/shakespeare_char/prepare.py)
# writes train.bin, val.bin and meta.pkl (65 characters) to data/shakespeare_char.
#
#   autofit run --config configs/shakespeare_char.py            # probe, then train here
#   autofit probe --config configs/shakespeare_char.py --gpu t4-16gb
#
# Parsed with ast, never executed: only literal assignments.
out_dir = 'out/shakespeare-char'
eval_interval = 250
eval_iters = 200
log_interval = 10
always_save_checkpoint = False

dataset = 'shakespeare_char'
# Tiny Shakespeare's 65 distinct characters, so that a GPU estimate (--gpu) before the data is
# prepared has the model's size; for your own text (--input FILE) drop this line: meta.pkl gives it
vocab_size = 65
gradient_accumulation_steps = 1
batch_size = 64
block_size = 256

n_layer = 6
n_head = 6
n_embd = 384
dropout = 0.2

learning_rate = 1e-3
max_iters = 5000
lr_decay_iters = 5000
min_lr = 1e-4
beta2 = 0.99
warmup_iters = 100
