"""The loss head's phases for autofit.planning.estimate: what the cross-entropy over the logits
holds at the forward's end and at the start of backward, per loss (trainer.model.ce.lm_loss):
the standard F.cross_entropy on the full logits, autofit's own chunking, torch's
F.linear_cross_entropy. Each returns [(phase, activations bytes, loss-head bytes)], where
activations are the blocks' saved tensors (`blk`, estimate._Blocks) plus what the head keeps of
them; N tokens per micro-batch, C channels, V vocabulary."""
from __future__ import annotations

from autofit.planning import arch_terms as arch
from trainer.model.ce import HAS_TORCH_LCE


def standard_head(N: int, C: int, V: int, amp: bool, blk, cuda: bool) -> list[tuple[str, int, int]]:
    """(phase, activations, loss-head bytes) of F.cross_entropy on the full logits."""
    NV, VC, blocks = N * V, V * C, blk.saved
    # lm_head keeps its input (fp32, or a 16-bit copy plus the 16-bit weight copy under autocast).
    head_in = (2 * N * C + 2 * VC) if amp else 4 * N * C
    # ln_f's fp32 output is still bound in GPT.forward, and autocast's cache still holds the
    # weight copies of checkpointed blocks.
    fwd_extra = (4 * N * C + blk.n_ckpt * blk.w16) if amp else 0
    if amp and cuda:
        # CUDA's log_softmax reads the 16-bit logits and writes fp32 itself (no fp32 copy of the
        # logits), and its backward writes a 16-bit gradient: forward 2 + 4 bytes per logit,
        # backward start the saved fp32 log-softmax, its fp32 grad and the 16-bit grad of the
        # logits, 4 + 4 + 2. Measured on an H200 (torch 2.11, bf16, GPT-2 124M at vocab 50304):
        # 12 bytes per logit over-estimated every standard-loss trial by exactly 2 x N x V bytes.
        fwd, bwd = 6 * NV, 10 * NV
    else:
        # forward: logits (+ their fp32 upcast under CPU autocast) and the saved fp32 log-softmax;
        # backward start: saved log-softmax, grad of it, grad of the logits: 3 fp32 N x V buffers.
        fwd, bwd = (10 if amp else 8) * NV, 12 * NV
    return [("forward (loss)", blocks + blk.ln_f + fwd_extra, head_in + fwd),
            ("backward start (loss)", blocks + blk.ln_f, head_in + bwd)]


def chunked_head(N: int, C: int, V: int, amp: bool, blk, ce_chunk_size: int,
                 capped: bool) -> list[tuple[str, int, int]]:
    """(phase, activations, loss-head bytes) of trainer.model.ce._ChunkedLinearCrossEntropy:
    grad_x (N x C, fp32) and grad_w (V x C, fp32) for the whole batch, plus the largest moment of
    any one chunk, walked chunk by chunk as the loop runs them (the last chunk is usually
    smaller). In each chunk the previous chunk's gradient is still bound to `g` while the new
    logits are made (and, under a soft-cap, the new slope 1 - tanh^2), and until `g` is rebound."""
    VC, blocks = V * C, blk.saved
    keep = 4 * N * C + 4 * VC  # grad_x, grad_w
    work, prev = 0, 0
    for s in range(0, N, ce_chunk_size):
        n = min(ce_chunk_size, N - s)
        slope = 4 * n * V if capped else 0  # fp32, alive from the cap until g is made
        if amp:  # xc (16-bit) throughout; the previous g is 16-bit
            moments = (2 * prev * V + 2 * n * C + max(6 * n * V, 4 * n * V + slope),  # 16-bit logits -> fp32, slope
                       2 * prev * V + 2 * n * C + 4 * n * V + slope + 2 * n * V,  # probs -> the new 16-bit g
                       2 * n * V + 2 * n * C + 6 * VC)  # g.t() @ xc (16-bit) and its fp32 upcast
        else:  # g is the probs themselves (the .to() is a no-op)
            moments = (4 * (prev + n) * V + slope, 4 * n * V + 4 * n * C, 4 * n * V + 4 * VC)
        work, prev = max(work, *moments), n
    head_fwd = (2 * VC if amp else 0) + keep + work  # amp: the 16-bit copy of the weight
    # as in the standard head: autocast's cache still holds the checkpointed blocks' 16-bit weight
    # copies (found on the H200: 16 MB per checkpointed block of GPT-2 124M short without this term;
    # the budgeted CPU device shows them too, tests/test_estimate.py::test_bf16_checkpointed_chunked_*)
    wcache = blk.n_ckpt * blk.w16 if amp else 0
    # backward: the saved grads and their scaled copies
    return [("forward (loss)", blocks + blk.ln_f + 4 * N * C + wcache, head_fwd),
            ("backward start (loss)", blocks + blk.ln_f, 2 * keep)]


def uses_torch_lce(shape, loss_impl: str) -> bool:
    """Whether `loss_impl` runs as torch's fused F.linear_cross_entropy (torch >= 2.13, no logit
    soft-cap: trainer.model.ce.lm_loss's rule), whose memory was not yet measured on a GPU."""
    return loss_impl == "chunked" and shape.logit_softcap == 0 and HAS_TORCH_LCE


def head_phases(shape, N: int, amp: bool, blk, loss_impl: str, cuda: bool,
          ce_chunk_size: int) -> list[tuple[str, int, int]]:
    """The loss head's phases as trainer.model.ce.lm_loss runs it: standard (+ the soft-cap's
    buffer), torch's F.linear_cross_entropy (chunked, no cap, torch >= 2.13) or autofit's chunking."""
    C, V = shape.n_embd, shape.vocab_size
    if loss_impl == "standard":
        head, extra = standard_head(N, C, V, amp, blk, cuda), arch.softcap_head_extra(shape, N, amp)
    elif uses_torch_lce(shape, loss_impl):
        head, extra = torch_lce_head(N, C, V, blk, cuda, ce_chunk_size, amp), (0, 0)
    else:
        head, extra = chunked_head(N, C, V, amp, blk, ce_chunk_size, shape.logit_softcap > 0), (0, 0)
    return [(name, acts, b + e) for (name, acts, b), e in zip(head, extra)]


def torch_lce_head(N: int, C: int, V: int, blk, cuda: bool, ce_chunk_size: int,
                   amp: bool = False) -> list[tuple[str, int, int]]:
    """(phase, activations, loss-head bytes) of torch's chunked F.linear_cross_entropy (torch >= 2.13,
    trainer.model.ce.torch_linear_cross_entropy): it computes grad_x (N x C) and grad_w (V x C) in
    the forward and hands them back in an in-place backward, so those two fp32 buffers are what
    the budgeted CPU device measures (the chunk's logits are made inside the one op, where its
    dispatch-mode tracker does not see them). On CUDA the caching allocator does see them: one
    chunk's fp32 logits, turned into their gradient in place as trainer.model.ce's own chunking
    does, are added there (assumed: the H200 checked in 2026-12 had torch 2.11, without this op)."""
    keep = 4 * N * C + 4 * V * C
    chunk = 4 * min(ce_chunk_size, N) * V if cuda else 0
    # backward: the grads and their fp32 results; under autocast grad_x is handed back in 16 bits
    # and cast (measured on the budgeted CPU device: 2 bytes per N x C element, not 8)
    back = (2 * N * C + 6 * V * C) if amp else 2 * keep
    wcache = blk.n_ckpt * blk.w16 if amp else 0  # autocast's cached weight copies of checkpointed blocks
    return [("forward (loss)", blk.saved + blk.ln_f + 4 * N * C + wcache, keep + chunk),
            ("backward start (loss)", blk.saved + blk.ln_f, back)]
