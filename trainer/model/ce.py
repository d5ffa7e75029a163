"""The language-model head's loss: cross-entropy of (x @ weight.T), optionally soft-capped, in
three ways that give the same loss and gradients:

- standard: the full B*T x V logits, then F.cross_entropy (fp32 under autocast, as torch's
  autocast runs cross_entropy); a soft-cap is applied before that fp32 copy (autoresearch#24:
  moving the cast after the cap saved ~2 GB on a 3090);
- torch's own chunked linear cross-entropy (F.linear_cross_entropy with
  LinearCrossEntropyOptions, torch >= 2.13): the full logits are never materialised. It has no
  soft-cap hook, so it serves models without one;
- the hand-written chunking below: a chunk of rows at a time, the cap applied per chunk, the
  gradient taken in the forward pass. It serves soft-capped models, and every model on a torch
  without F.linear_cross_entropy.
"""
from __future__ import annotations

import torch
from torch.nn import functional as F

HAS_TORCH_LCE = hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions")


def softcap(logits: torch.Tensor, cap: float) -> torch.Tensor:
    """cap * tanh(logits / cap) (Gemma 2; nanochat's cap of 15); the logits as they are for cap 0."""
    return cap * torch.tanh(logits / cap) if cap > 0 else logits


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """mean cross-entropy of softcap(x @ weight.T) against targets, a chunk of rows at a time.

    The gradient is computed in the forward pass, (softmax(s) - one_hot) * ds/dz per chunk with
    s = cap tanh(z / cap) and ds/dz = 1 - (s / cap)^2 (1 without a cap), so what is kept for
    backward is grad_x (N x C) and grad_weight (V x C, fp32) instead of the N x V logits, their
    fp32 copy and the saved log-softmax. Rows with target -1 are ignored, as in F.cross_entropy.
    """

    @staticmethod
    def forward(ctx, x, weight, targets, chunk_size: int, compute_dtype: torch.dtype, cap: float):
        n_rows = x.shape[0]
        valid = targets != -1
        n_valid = valid.sum().clamp(min=1).to(torch.float32)
        w = weight.to(compute_dtype)
        grad_x = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if ctx.needs_input_grad[1] else None
        loss_sum = torch.zeros((), dtype=torch.float32, device=x.device)
        for start in range(0, n_rows, chunk_size):
            end = min(start + chunk_size, n_rows)
            xc = x[start:end].to(compute_dtype)
            tc = targets[start:end].clamp(min=0)
            vc = valid[start:end]
            logits = (xc @ w.t()).float()  # (n, V): the only V-sized buffers, one chunk at a time
            slope = None
            if cap > 0:  # in place: one more chunk-sized buffer (the slope), no copies
                logits.div_(cap).tanh_()
                slope = logits.square().neg_().add_(1.0)  # ds/dz, before the tanh becomes the capped logits
                logits.mul_(cap)
            tgt = logits.gather(1, tc.unsqueeze(1)).squeeze(1)
            # log-sum-exp in place on the logits: torch.logsumexp allocates an n x V fp32 (self - max)
            # inside its kernel (ATen ReduceOps.cpp, logsumexp_out_impl), a chunk-sized temporary no
            # tracker of op outputs sees (docs/estimator.md). exp_ leaves exp(logits - max) behind.
            m = logits.amax(dim=-1, keepdim=True)
            z = logits.sub_(m).exp_().sum(dim=-1, keepdim=True)
            lse = (z.log() + m).squeeze(1)
            loss_sum += ((lse - tgt) * vc).sum()
            if grad_x is None and grad_w is None:
                continue
            # d(sum of losses)/d(capped logits) = softmax - one_hot, zero on ignored rows; in place.
            probs = logits.div_(z)
            probs[torch.arange(end - start, device=x.device), tc] -= 1.0
            probs.mul_(vc.unsqueeze(1))
            if slope is not None:
                probs.mul_(slope)
            g = probs.to(compute_dtype)
            del logits, probs, slope
            if grad_x is not None:
                grad_x[start:end] = (g @ w).to(x.dtype)
            if grad_w is not None:
                grad_w += (g.t() @ xc).float()
        ctx.save_for_backward(grad_x if grad_x is not None else torch.empty(0),
                              grad_w if grad_w is not None else torch.empty(0), n_valid)
        ctx.has = (grad_x is not None, grad_w is not None)
        ctx.weight_dtype = weight.dtype
        return loss_sum / n_valid

    @staticmethod
    def backward(ctx, grad_out):
        grad_x, grad_w, n_valid = ctx.saved_tensors
        scale = grad_out / n_valid
        gx = grad_x * scale.to(grad_x.dtype) if ctx.has[0] else None
        gw = (grad_w * scale).to(ctx.weight_dtype) if ctx.has[1] else None
        return gx, gw, None, None, None, None


def _compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else weight.dtype


def chunked_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          chunk_size: int = 4096, cap: float = 0.0) -> torch.Tensor:
    """Mean CE of softcap(x @ weight.T) (x: N x C, weight: V x C, targets: N, -1 ignored) without
    materialising the N x V logits: at most chunk_size x V fp32 values at a time. Under autocast
    the matmuls run in the autocast dtype, the cap and softmax in fp32, as the standard path does."""
    compute_dtype = _compute_dtype(x, weight)
    if not torch.is_grad_enabled():  # evaluation: no gradient to take in the forward (the head's
        x, weight = x.detach(), weight.detach()  # weight still requires grad, so it would be made)
    with torch.autocast(device_type=x.device.type, enabled=False):
        return _ChunkedLinearCrossEntropy.apply(x, weight, targets, chunk_size, compute_dtype, float(cap))


def torch_linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                               chunk_size: int = 4096) -> torch.Tensor:
    """Mean CE of x @ weight.T through torch's chunked F.linear_cross_entropy (torch >= 2.13),
    batch_chunk_size rows at a time, accumulated in fp32. torch's autocast does not list the op,
    so under autocast x and weight are cast to the autocast dtype here (what F.linear would do).
    Returns an fp32 scalar. Raises RuntimeError on a torch without it (check HAS_TORCH_LCE).

    torch returns the mean in the input dtype: under bf16 autocast the training loss is the fp32
    mean rounded once to bf16 (within 2^-9 of it: steps of 1/64 between 2 and 4; the gradient is
    not rounded). Without a gradient (evaluation, whose val loss picks the best checkpoint) each
    token's loss is taken (reduction 'none', the same forward peak) and averaged in fp32, exact.
    Not in training: there reduction 'none' makes torch's backward hold a whole row chunk of fp32
    logits (measured: 90 MiB against 12.5 MiB for 4096 rows x 32768 vocab on the CPU)."""
    if not HAS_TORCH_LCE:
        raise RuntimeError(f"torch {torch.__version__} has no F.linear_cross_entropy")
    dt = _compute_dtype(x, weight)
    opts = torch.nn.LinearCrossEntropyOptions(batch_chunk_size=chunk_size, acc_dtype=torch.float32)
    exact = not torch.is_grad_enabled()
    with torch.autocast(device_type=x.device.type, enabled=False):
        loss = F.linear_cross_entropy(x.to(dt), weight.to(dt), targets, ignore_index=-1, options=opts,
                                      reduction="none" if exact else "mean")
    if exact:  # ignored rows are 0 in 'none'; the mean is over the counted ones, as 'mean' takes it
        return loss.float().sum() / (targets != -1).sum().clamp(min=1)
    return loss.float()


def lm_loss(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *, impl: str = "standard",
            chunk_size: int = 4096, cap: float = 0.0) -> torch.Tensor:
    """The mean next-token loss of hidden states x (N x C) through the head weight (V x C):
    impl 'standard' materialises the logits; 'chunked' goes through torch's F.linear_cross_entropy
    where the installed torch has it and there is no soft-cap, else through chunked_cross_entropy."""
    if impl == "chunked":
        if cap == 0 and HAS_TORCH_LCE:
            return torch_linear_cross_entropy(x, weight, targets, chunk_size)
        return chunked_cross_entropy(x, weight, targets, chunk_size, cap)
    logits = softcap(F.linear(x, weight), cap)
    return F.cross_entropy(logits, targets, ignore_index=-1)


def chunked_path(cap: float) -> str:
    """Which chunked loss a model with soft-cap `cap` runs on this torch, in words for plans."""
    if cap == 0 and HAS_TORCH_LCE:
        return "torch F.linear_cross_entropy (chunked)"
    return "autofit's chunked CE" + (f" with soft-cap {cap:g} per chunk" if cap else "")
