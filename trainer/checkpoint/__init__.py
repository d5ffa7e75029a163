"""Checkpoints: autofit's ckpt.pt (ckpt: atomic save, restore, resume rules), nanoGPT's layout
both ways (nanogpt), and torch.load(weights_only=True) with one-line refusals (safe_load). May
import model/, config/, data/ and the bottom modules."""
