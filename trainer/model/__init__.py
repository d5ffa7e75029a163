"""The model: nanoGPT's GPT with activation checkpointing (gpt), its block and the small-GPT
options (layers), what selective checkpointing saves (sac_ops), the loss head's cross-entropy
(ce), the step losses read back from the device (losses), GPT-2's published weights
(pretrained). May import the bottom modules only."""
