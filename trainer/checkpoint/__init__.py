"""Checkpoints: autofit's ckpt.pt (ckpt: atomic save, restore, resume rules), nanoGPT's layout
both ways (nanogpt), torch.load(weights_only=True) with one-line refusals (safe_load), and every
field read back typed and checked once, with the format number (schema). May
import model/, config/, data/ and the bottom modules."""
