"""The seed case (DESIGN.md, "The problem, in numbers") as a config file's text: the tests that
read it write it where they need it. configs/rtx4070_seed.py is the same model, commented."""

SEED = """\
batch_size = 16
gradient_accumulation_steps = 32
block_size = 1024
compile = True
dtype = 'bfloat16'
n_layer = 12
n_head = 12
n_embd = 576
"""
