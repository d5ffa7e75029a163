"""trainer: a nanoGPT-style GPT trainer that knows nothing of autofit (it never imports it). Its
parts, lowest first; a part imports only from parts below it (tests/test_layout.py checks this):

- errors, paths, interrupt, meter, clock, schedule, compiler, muon: what the train step stands on
- step: the one train step; writes: every file and stdout write, and the one line when the disk
  says no; phases: progress lines
- data/: datasets, token files, prepare, step batches
- config/: TrainConfig, its messages, the nanoGPT .py parser, presets
- model/: the GPT, its losses, GPT-2 weights
- checkpoint/: autofit's and nanoGPT's ckpt.pt, safe loading
- distributed/: ranks, agreement, DDP/FSDP2
- options, recovery, evaluate, metrics, sample, then redo, then loop: training as nanoGPT's
  train.py and sample.py
"""
