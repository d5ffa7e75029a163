"""Memory that CUDA kernels and libraries allocate inside one op, through the caching allocator (so it
is in max_memory_allocated), but that no output of the op shows: the budgeted CPU device, which
counts the storages of the ops it dispatches, cannot see it, and the estimator's CPU calibration
does not contain it. Each term is counted here from torch's sources (docs/estimator.md cites each
file); the cuBLAS and flash SDPA terms are in the allocated peaks an H200 measured (2026-12-04,
docs/estimator.md: the estimate within 0.2-0.8 % at GPT-2 124M's size), not measured one by one.
`scripts/bench_estimate.py --kernel-terms` prints them.

Terms, per phase of autofit.planning.estimate (bytes):
- cuBLAS workspaces, every phase: one per (handle, stream), kept until cleared; handles are
  per thread, and a train step runs cuBLAS on two threads (the forward on the caller's, the
  backward on autograd's device thread), so two. 32 MiB each on Hopper and later (":4096:8"),
  4 MiB x 2 + 16 KiB x 8 before (":4096:2:16:8"); torch's CublasHandlePool.cpp,
  getChosenWorkspaceSize. cuBLASLt shares that workspace in the torch versions autofit supports
  here (CUDABlas.cpp); an older build's separate 1 MiB Lt workspace fits the budget's margin.
- SDPA backward, flash or memory-efficient (the backends torch picks for bf16/fp16 on sm80+;
  stage 1 of the GPU self-check records the choice): an fp32 dQ accumulator, batch x heads x
  T (rounded up to 128) x head dim (rounded up to 32), and the fp32 softmax_d, batch x heads x T
  (rounded), in the "backward (top block)" phase (flash_attn/flash_api.cpp, mha_bwd).
- SDPA math backend (fp32 or a shape no fused kernel takes): the attention probabilities are
  materialised, batch x heads x T x T: kept for backward in every block, plus their gradient in the
  top block's backward (attention.cpp, _scaled_dot_product_attention_math). Not the default.
- fused AdamW (what make_optimizer picks on CUDA): none; the tensor lists travel as kernel
  arguments (MultiTensorApply.cuh), the update is in place (FusedAdamWKernel.cu).
- chunked loss: none; trainer/model/gpt.py computes its log-sum-exp in place (torch.logsumexp
  allocated an n x V fp32 temporary inside its kernel: ReduceOps.cpp, logsumexp_out_impl).
"""
from __future__ import annotations

CUBLAS_WORKSPACE_BYTES = 32 * 2**20  # one, on Hopper (sm90) and later; the largest, so assumed everywhere
CUBLAS_WORKSPACE_PRE_HOPPER_BYTES = 4 * 2**20 * 2 + 16 * 2**10 * 8
CUBLAS_THREADS = 2  # forward (caller's thread) and backward (autograd's device thread)
SDPA_BACKENDS = ("flash", "efficient", "math")


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


def cublas_workspaces_bytes() -> int:
    """cuBLAS workspaces held during a train step (see the module doc): 2 x 32 MiB."""
    return CUBLAS_THREADS * CUBLAS_WORKSPACE_BYTES


def sdpa_backward_bytes(batch: int, n_head: int, block_size: int, head_dim: int, sdpa: str = "flash") -> int:
    """Bytes the fused SDPA backward allocates inside its kernel call for one block: the fp32 dQ
    accumulator and softmax_d of flash-attention 2 (the memory-efficient kernel's accumulators are
    of the same size). 'math': the gradient of the B x H x T x T probabilities (fp32 here: the math
    path upcasts under autocast's fp32 softmax). Raises ValueError for an unknown backend."""
    if sdpa not in SDPA_BACKENDS:
        raise ValueError(f"sdpa must be one of {SDPA_BACKENDS}, got {sdpa!r}")
    if sdpa == "math":
        return 4 * batch * n_head * block_size * block_size
    t = _round_up(block_size, 128)
    return 4 * batch * n_head * t * _round_up(head_dim, 32) + 4 * batch * n_head * t


def sdpa_math_saved_bytes(batch: int, n_head: int, block_size: int, elt: int) -> int:
    """Per block, what the math backend keeps for backward beyond the fused kernels' output and
    log-sum-exp: the B x H x T x T attention probabilities (in the compute dtype, `elt` bytes)."""
    return elt * batch * n_head * block_size * block_size


def cuda_kernel_terms(shape, micro_batch: int, amp: bool, sdpa: str = "flash") -> dict[str, dict[str, int]]:
    """{phase name: {term: bytes}} of the kernel-internal terms above for one micro-batch of
    `micro_batch` sequences of a ModelShape (autofit.planning.estimate); phases named as there,
    '*' for every phase. Under amp the fused backends run; in fp32 the memory-efficient one
    (flash takes 16-bit only), with the same accumulators."""
    H, T, C, L = shape.n_head, shape.block_size, shape.n_embd, shape.n_layer
    hd = C // max(H, 1)
    terms: dict[str, dict[str, int]] = {"*": {"cuBLAS workspaces (2 threads)": cublas_workspaces_bytes()}}
    if L > 0 and micro_batch > 0:
        top = {f"SDPA backward ({sdpa})": sdpa_backward_bytes(micro_batch, H, T, hd, sdpa)}
        if sdpa == "math":
            saved = sdpa_math_saved_bytes(micro_batch, H, T, 2 if amp else 4)
            for phase in ("forward (loss)", "backward start (loss)"):
                terms[phase] = {"SDPA math: saved probabilities, every block": L * saved}
            top["SDPA math: saved probabilities, every block"] = L * saved
        terms["backward (top block)"] = top
    return terms


def add_to_phases(phases: list[tuple[str, dict[str, int]]], terms: dict[str, dict[str, int]]) -> None:
    """Adds each phase's terms (and the '*' ones) to its 'workspace' component, in place."""
    for name, parts in phases:
        for _, b in {**terms.get("*", {}), **terms.get(name, {})}.items():
            parts["workspace"] = parts.get("workspace", 0) + b
