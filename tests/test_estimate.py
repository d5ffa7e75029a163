"""The closed-form estimate against the budgeted CPU device's measured peak, and its invariants."""
from __future__ import annotations

import pytest
import torch

from autofit.devices.cpu_budget import BudgetedCpuDevice
from autofit.planning.search import ESTIMATE_ERROR_BOUND
from autofit.planning.estimate import COMPONENTS, ModelShape, estimate_peak, max_micro_batch, param_count
from trainer.model.gpt import GPT, GPTConfig
from trainer.step import make_optimizer, train_step

GiB = 2**30
SEED = ModelShape(n_layer=12, n_head=12, n_embd=576, block_size=1024, vocab_size=50304)


def measured_peak(shape: ModelShape, micro_batch: int, *, checkpointing: int = 0, loss_impl: str = "standard",
                  ce_chunk_size: int = 4096, steps: int = 2, dtype: str = "float32", optimizer: str = "adamw",
                  **model_kw) -> int:
    dev = BudgetedCpuDevice(budget_bytes=1 << 40)
    torch.manual_seed(0)
    with dev.tracking():
        model = GPT(GPTConfig(block_size=shape.block_size, vocab_size=shape.vocab_size, n_layer=shape.n_layer,
                              n_head=shape.n_head, n_embd=shape.n_embd, bias=shape.bias,
                              checkpointing=checkpointing, loss_impl=loss_impl, ce_chunk_size=ce_chunk_size,
                              dropout=shape.dropout, **model_kw))
        opt = make_optimizer(model, learning_rate=1e-3, weight_decay=0.1, betas=(0.9, 0.95), device_type="cpu",
                             optimizer=optimizer)
        x = torch.randint(0, shape.vocab_size, (2 * micro_batch, shape.block_size))
        y = torch.randint(0, shape.vocab_size, (2 * micro_batch, shape.block_size))
        dev.reset_peak()
        for _ in range(steps):
            train_step(model, opt, x, y, [micro_batch, micro_batch], grad_clip=1.0, dtype=dtype)
        peak = dev.peak_bytes()
    assert peak is not None
    return peak


def test_param_count_matches_the_model():
    for shape in (ModelShape(2, 2, 32, 16, 96), ModelShape(3, 4, 64, 32, 128, bias=True)):
        model = GPT(GPTConfig(block_size=shape.block_size, vocab_size=shape.vocab_size, n_layer=shape.n_layer,
                              n_head=shape.n_head, n_embd=shape.n_embd, bias=shape.bias))
        assert param_count(shape) == sum(p.numel() for p in model.parameters())  # tied weight once


@pytest.mark.parametrize("shape,micro_batch,kw", [
    (ModelShape(2, 2, 32, 32, 256), 4, {}),  # the loss head's backward dominates
    (ModelShape(3, 2, 32, 32, 32), 4, {}),  # small vocab: a block's backward dominates
    (ModelShape(4, 2, 32, 32, 256), 2, {"checkpointing": 2}),
    (ModelShape(2, 2, 32, 32, 512), 4, {"loss_impl": "chunked", "ce_chunk_size": 48}),
    # dropout: the CPU's SDPA takes its math path (B x H x T x T kept), the dropouts keep masks
    (ModelShape(3, 2, 32, 64, 32, dropout=0.1), 4, {}),
    (ModelShape(4, 2, 32, 64, 32, dropout=0.2), 2, {"checkpointing": 2}),
])
def test_cpu_estimate_matches_the_budgeted_device(shape, micro_batch, kw):
    est = estimate_peak(shape, micro_batch, dtype="float32", device="cpu", **{"checkpointing": 0,
                                                                              "loss_impl": "standard", **kw})
    meas = measured_peak(shape, micro_batch, **kw)
    # the bound the search prunes by (issue 18 asks it proven and tight: 1 %, it was 10 %)
    assert abs(est.peak_bytes - meas) <= ESTIMATE_ERROR_BOUND["cpu"] * meas, (est, meas)


@pytest.mark.parametrize("micro_batch,step_batch", [(1, 64), (2, 16)])
def test_cpu_estimate_counts_the_whole_steps_token_ids(micro_batch, step_batch):
    """Training on the CPU device holds the whole step's x, y (trainer.data.batches.held_rows);
    the estimate counted two micro-batches' ids: 3.4 % low at micro-batch 1 of 64, past the 1 %
    bound the search prunes by."""
    shape = ModelShape(2, 2, 32, 32, 256)
    dev = BudgetedCpuDevice(budget_bytes=1 << 40)
    torch.manual_seed(0)
    with dev.tracking():
        model = GPT(GPTConfig(block_size=32, vocab_size=256, n_layer=2, n_head=2, n_embd=32, bias=shape.bias))
        opt = make_optimizer(model, learning_rate=1e-3, weight_decay=0.1, betas=(0.9, 0.95), device_type="cpu")
        x, y = (torch.randint(0, 256, (step_batch, 32)) for _ in range(2))
        dev.reset_peak()
        for _ in range(2):
            train_step(model, opt, x, y, [micro_batch] * (step_batch // micro_batch), grad_clip=1.0)
        meas = dev.peak_bytes()
    est = estimate_peak(shape, micro_batch, dtype="float32", device="cpu", checkpointing=0, loss_impl="standard",
                        step_batch=step_batch).peak_bytes
    assert abs(est - meas) <= ESTIMATE_ERROR_BOUND["cpu"] * meas, (est, meas)


@pytest.mark.parametrize("checkpointing,cap", [(2, 0.0), (1, 15.0)])  # torch's chunked loss; autofit's
def test_bf16_checkpointed_chunked_loss_counts_autocasts_cached_weight_copies(checkpointing, cap):
    # autocast keeps the checkpointed blocks' 16-bit weight copies through the loss's forward: the
    # H200 found the chunked losses' estimate short by them (5 %), and so was the CPU's (2-5.5 %)
    shape = ModelShape(4, 2, 64, 64, 1024, logit_softcap=cap)
    est = estimate_peak(shape, 4, dtype="bfloat16", checkpointing=checkpointing, loss_impl="chunked", device="cpu",
                        ce_chunk_size=128)
    meas = measured_peak(shape, 4, checkpointing=checkpointing, loss_impl="chunked", ce_chunk_size=128,
                         dtype="bfloat16", logit_softcap=cap)
    assert abs(est.peak_bytes - meas) <= ESTIMATE_ERROR_BOUND["cpu"] * meas, (est.peak_bytes, meas)

@pytest.mark.parametrize("micro_batch", [3, 5, 4])  # 96, 160 and 128 rows in chunks of 64
def test_soft_capped_chunked_loss_is_walked_chunk_by_chunk(micro_batch):
    """The last chunk is usually smaller: its logits and slope, beside the previous chunk's
    gradient, make the peak; counting a full chunk there over-estimated nanochat-d12 at
    micro-batch 52, block 128 by 13 % (1.60 GiB against 1.41 GiB measured)."""
    shape = ModelShape(2, 2, 32, 32, 2048, logit_softcap=15.0)
    est = estimate_peak(shape, micro_batch, dtype="float32", device="cpu", checkpointing=0,
                        loss_impl="chunked", ce_chunk_size=64)
    meas = measured_peak(shape, micro_batch, loss_impl="chunked", ce_chunk_size=64, logit_softcap=15.0)
    assert abs(est.peak_bytes - meas) <= 0.01 * meas, (est, meas)


@pytest.mark.parametrize("mlp,checkpointing", [("relu2", 0), ("relu2", 1), ("swiglu", 1)])
def test_relu2_and_swiglu_backward_temporaries_are_counted(mlp, checkpointing):
    """A small vocabulary puts the peak in the top block's backward, where ReLU^2's square and
    SwiGLU's product hold more hidden-wide temporaries than GELU's backward (5-17 % under when
    they were counted as GELU's)."""
    shape = ModelShape(4, 2, 32, 64, 64, mlp=mlp)
    est = estimate_peak(shape, 8, dtype="float32", device="cpu", checkpointing=checkpointing, loss_impl="standard")
    meas = measured_peak(shape, 8, checkpointing=checkpointing, mlp=mlp)
    assert est.phase == "backward (top block)"
    assert abs(est.peak_bytes - meas) <= 0.002 * meas, (est, meas)


@pytest.mark.parametrize("micro_batch,dtype,optimizer", [(2, "float32", "adamw"), (1, "float32", "muon"),
                                                          (1, "bfloat16", "muon")])
def test_swiglu_c_fc_weight_gradient_is_counted_where_tokens_are_few(micro_batch, dtype, optimizer):
    """SwiGLU's c_fc weight gradient (2 x hidden x C, twice c_proj's) is the top block's backward
    peak where a micro-batch has few tokens against C; counted as c_proj's, L2 C128 T16 was 0.8 %
    under at micro-batch 2 and 2.1 % under at micro-batch 1 with Muon (whose smaller state makes
    that backward the step's peak), past the 1 % bound the search prunes by."""
    shape = ModelShape(2, 2, 128, 16, 64, mlp="swiglu", optimizer=optimizer)
    est = estimate_peak(shape, micro_batch, dtype=dtype, device="cpu", checkpointing=0, loss_impl="standard")
    meas = measured_peak(shape, micro_batch, dtype=dtype, optimizer=optimizer, mlp="swiglu")
    assert est.phase == "backward (top block)"
    assert abs(est.peak_bytes - meas) <= 0.002 * meas, (est, meas)


@pytest.mark.parametrize("mlp,block_size", [("gelu", 16), ("relu2", 8)])
def test_bf16_mlp_weight_gradients_upcast_is_counted_where_tokens_are_few(mlp, block_size):
    """Under autocast the MLP's 16-bit weight gradient is cast up to fp32 (4 x hidden x C) in the
    top block's backward; where a micro-batch has few tokens against C that is the step's peak
    (with Muon's smaller state): L2 C128 T16 at micro-batch 1 was 1.7 % under without it."""
    shape = ModelShape(2, 2, 128, block_size, 64, mlp=mlp, optimizer="muon")
    est = estimate_peak(shape, 1, dtype="bfloat16", device="cpu", checkpointing=0, loss_impl="standard")
    meas = measured_peak(shape, 1, dtype="bfloat16", optimizer="muon", mlp=mlp)
    assert est.phase == "backward (top block)"
    assert abs(est.peak_bytes - meas) <= 0.002 * meas, (est, meas)


def test_breakdown_sums_to_peak_and_names_every_component():
    for device in ("cpu", "cuda"):
        for loss_impl in ("standard", "chunked"):
            est = estimate_peak(SEED, 8, dtype="bfloat16", checkpointing=1, loss_impl=loss_impl, device=device)
            assert tuple(est.breakdown) == COMPONENTS
            assert sum(est.breakdown.values()) == est.peak_bytes
            assert all(v >= 0 for v in est.breakdown.values())
            assert est.phase and est.basis
    cpu = estimate_peak(SEED, 8, dtype="bfloat16", checkpointing=0, loss_impl="standard", device="cpu")
    cuda = estimate_peak(SEED, 8, dtype="bfloat16", checkpointing=0, loss_impl="standard", device="cuda")
    assert cpu.breakdown["allocator_slack"] == 0 and cuda.breakdown["allocator_slack"] > 0


def test_monotone_in_micro_batch():
    for dtype in ("float32", "bfloat16"):
        for loss_impl in ("standard", "chunked"):
            peaks = [estimate_peak(SEED, b, dtype=dtype, checkpointing=0, loss_impl=loss_impl).peak_bytes
                     for b in range(1, 33)]
            assert all(a < b for a, b in zip(peaks, peaks[1:]))


def test_chunked_loss_below_standard_for_a_big_vocabulary():
    shape = ModelShape(2, 2, 64, 128, 32768)
    for device in ("cpu", "cuda"):
        std = estimate_peak(shape, 8, dtype="float32", checkpointing=0, loss_impl="standard", device=device)
        chk = estimate_peak(shape, 8, dtype="float32", checkpointing=0, loss_impl="chunked", device=device)
        # the fixed workspaces (64 MiB of cuBLAS on CUDA) left out: they are the same for both
        fixed = lambda e: e.peak_bytes - e.breakdown["workspace"] - e.breakdown["allocator_slack"]  # noqa: E731
        assert fixed(chk) < 0.5 * fixed(std)


def test_cuda_kernel_terms_are_in_the_phases_they_belong_to():
    """cuBLAS's two workspaces in every phase; the SDPA backward's fp32 dQ accumulator and
    softmax_d (flash-attention 2's mha_bwd) only in the top block's backward; math adds B x H x T x T."""
    from autofit.planning.kernel_terms import cuda_kernel_terms, sdpa_backward_bytes
    shape = ModelShape(12, 12, 768, 1024, 50304)
    terms = cuda_kernel_terms(shape, 16, amp=True)
    assert terms["*"] == {"cuBLAS workspaces (2 threads)": 64 * 2**20}
    assert terms["backward (top block)"] == {"SDPA backward (flash)": 4 * 16 * 1024 * 768 + 4 * 16 * 12 * 1024}
    assert sdpa_backward_bytes(1, 1, 100, 40) == 4 * 128 * 64 + 4 * 128  # T to 128, head dim to 32
    flash = estimate_peak(shape, 16, dtype="bfloat16", checkpointing=0, loss_impl="chunked", device="cuda")
    math = estimate_peak(shape, 16, dtype="bfloat16", checkpointing=0, loss_impl="chunked", device="cuda", sdpa="math")
    assert math.peak_bytes > flash.peak_bytes + 12 * 2 * 16 * 12 * 1024 * 1024  # every block keeps its probabilities
    cpu = estimate_peak(shape, 16, dtype="bfloat16", checkpointing=0, loss_impl="chunked", device="cpu", sdpa="math")
    assert cpu == estimate_peak(shape, 16, dtype="bfloat16", checkpointing=0, loss_impl="chunked", device="cpu")
    with pytest.raises(ValueError, match="sdpa"):
        estimate_peak(shape, 16, dtype="bfloat16", checkpointing=0, loss_impl="chunked", device="cuda", sdpa="cudnn")


def test_checkpointing_below_none_for_a_deep_model():
    shape = ModelShape(24, 8, 512, 1024, 512)
    none = estimate_peak(shape, 8, dtype="bfloat16", checkpointing=0, loss_impl="chunked")
    every = estimate_peak(shape, 8, dtype="bfloat16", checkpointing=1, loss_impl="chunked")
    half = estimate_peak(shape, 8, dtype="bfloat16", checkpointing=2, loss_impl="chunked")
    assert every.peak_bytes < half.peak_bytes < none.peak_bytes
    assert every.breakdown["activations"] < 0.25 * none.breakdown["activations"]


def test_max_micro_batch_agrees_with_estimate_peak():
    kw = dict(dtype="bfloat16", checkpointing=0, loss_impl="standard", device="cuda")
    for budget in (3 * GiB, 10 * GiB, int(11.5 * GiB)):
        m = max_micro_batch(SEED, budget, **kw)
        assert m >= 1
        assert estimate_peak(SEED, m, **kw).peak_bytes <= budget
        assert estimate_peak(SEED, m + 1, **kw).peak_bytes > budget
    assert max_micro_batch(SEED, 100 * 2**20, **kw) == 0  # not even the weights fit


def test_seed_case_against_design_numbers():
    # DESIGN.md: batch 16, bf16, standard loss does not fit a 12 GB RTX 4070 (DESIGN.md said ~15 GiB;
    # 13.5 GiB since the H200 measured 10 bytes per logit, not 12)
    std = estimate_peak(SEED, 16, dtype="bfloat16", checkpointing=0, loss_impl="standard", device="cuda")
    assert std.peak_bytes > 12 * GiB
    assert std.phase == "backward start (loss)"
    # the head alone: 16 x 1024 x 50304 logits at 10 bytes each (CUDA, 16-bit; see the H200 test) ~7.7 GiB
    assert std.breakdown["logits_and_loss"] > 7.5 * GiB
    assert 0.9 * GiB < std.breakdown["weights"] + std.breakdown["gradients"] + std.breakdown["optimizer_state"] \
        < 1.3 * GiB  # ~77M parameters: fp32 weights + grads + AdamW state ~1.15 GiB
    small = estimate_peak(SEED, 4, dtype="bfloat16", checkpointing=0, loss_impl="chunked", device="cuda")
    assert small.peak_bytes < 6 * GiB


def test_n_micro_one_has_no_gradients_during_the_backward():
    one = estimate_peak(SEED, 8, dtype="float32", checkpointing=0, loss_impl="standard", n_micro=1)
    two = estimate_peak(SEED, 8, dtype="float32", checkpointing=0, loss_impl="standard", n_micro=2)
    assert one.breakdown["gradients"] == 0 < two.breakdown["gradients"]
    assert one.peak_bytes < two.peak_bytes


def test_model_shape_from_config_and_bad_arguments():
    assert ModelShape.from_config(GPTConfig(n_layer=3, n_embd=48, n_head=3)) == \
        ModelShape(3, 3, 48, 1024, 50304, bias=False, dropout=0.0)
    with pytest.raises(ValueError):
        estimate_peak(SEED, 1, dtype="int8", checkpointing=0, loss_impl="standard")
    with pytest.raises(ValueError):
        estimate_peak(SEED, 1, dtype="float32", checkpointing=0, loss_impl="fused")


# Allocated peaks measured on an NVIDIA H200 (torch 2.11.0+cu130, bf16 autocast, GPT-2 124M at
# vocab 50304, block 1024, two micro-batches per trial): the self-check of 2026-12-04
# (docs/gpu-selfcheck.md). torch 2.11 has no F.linear_cross_entropy, so its chunked loss is autofit's.
H200_ALLOCATED_PEAKS = {(1, "standard"): 3164668928, (4, "standard"): 5745812480, (8, "standard"): 9187337216,
                        (9, "standard"): 10047718400, (9, "chunked"): 7263462400, (16, "chunked"): 9713377280,
                        (18, "chunked"): 10413352960}


@pytest.mark.parametrize("micro_batch,loss_impl", sorted(H200_ALLOCATED_PEAKS))
def test_the_cuda_estimate_meets_the_peaks_measured_on_an_h200(micro_batch, loss_impl, monkeypatch):
    import autofit.planning.estimate as estimate
    import autofit.planning.loss_head as loss_head
    monkeypatch.setattr(loss_head, "HAS_TORCH_LCE", False)  # the H200's torch 2.11 ran autofit's chunking
    shape = ModelShape(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304)
    est = estimate_peak(shape, micro_batch, dtype="bfloat16", checkpointing=0, loss_impl=loss_impl, device="cuda",
                        n_micro=2)
    allocated = est.peak_bytes / (1 + estimate.CUDA_ALLOCATOR_SLACK)  # the slack is for reserved bytes
    # the standard loss's 12 bytes per logit (the CPU's) over-estimated these by 2 x N x V (~8 %)
    assert abs(allocated / H200_ALLOCATED_PEAKS[micro_batch, loss_impl] - 1) < 0.005


# Peaks of 3 train_steps of GPT-2 124M's shape (block 1024, vocab 50304; micro-batch 4 x 2, bf16
# unless the row says), allocated bytes less those before the model, measured on the same H200 by
# `scripts/bench_estimate.py --device cuda --only-gpu-sized` (torch 2.11: the chunked loss is autofit's).
# Before the fixes they name, the first four rows were estimated 5-10 % short.
NANOCHAT = dict(pos_emb="rope", norm="rmsnorm", qk_norm=True, mlp="relu2", tie_embeddings=False, logit_softcap=15.0,
                optimizer="muon")
H200_BENCH_PEAKS = [
    ({"mlp": "relu2"}, 6364798976),  # CUDA autocast runs ReLU^2's pow in fp32 and saves its input
    ({**NANOCHAT}, 7435746816),
    ({**NANOCHAT, "loss_impl": "chunked"}, 7202408960),
    ({"checkpointing": 1, "loss_impl": "chunked"}, 3915086848),  # autocast's cached weight copies
    ({"checkpointing": 2, "loss_impl": "chunked"}, 4509963264),
    ({"checkpointing": 1, "checkpointing_policy": "selective", "loss_impl": "chunked"}, 4664175616),
    ({**NANOCHAT, "checkpointing": 1, "loss_impl": "chunked"}, 4998552064),
    ({}, 5762064384),
    ({"dtype": "float16"}, 5764161536),  # fp16 holds what bf16 holds
    ({"checkpointing": 1}, 4376686592),
    ({"micro_batch": 2, "dtype": "float32"}, 4528679936),
    ({"n_micro": 1}, 5257950208),
    ({"pos_emb": "rope"}, 5982453248),
    ({"qk_norm": True}, 5994061824),
    ({"tie_embeddings": False}, 6386098688),
    ({"logit_softcap": 15.0}, 6176120832),
    ({"optimizer": "muon"}, 5421252608),
]


@pytest.mark.parametrize("row,measured", H200_BENCH_PEAKS, ids=[str(r) for r, _ in H200_BENCH_PEAKS])
def test_the_cuda_estimate_meets_the_h200_bench_rows(row, measured, monkeypatch):
    import autofit.planning.loss_head as loss_head
    monkeypatch.setattr(loss_head, "HAS_TORCH_LCE", False)
    run = {"micro_batch": 4, "n_micro": 2, "dtype": "bfloat16", "checkpointing": 0, "loss_impl": "standard"}
    assert set(row) <= set(run) | set(NANOCHAT) | {"checkpointing_policy"}, row  # no key left unused
    run.update({k: v for k, v in row.items() if k in run or k == "checkpointing_policy"})
    shape = ModelShape(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304,
                       **{k: v for k, v in row.items() if k in NANOCHAT})
    est = estimate_peak(shape, device="cuda", **run)
    allocated = est.peak_bytes - est.breakdown["allocator_slack"]
    # every row came out 0.2-0.8 % under (a few MB the estimate does not name); 1 % is the bound
    assert abs(allocated / measured - 1) < 0.01


# Reserved peaks of the same H200 trials (expandable segments on), 2026-12-04 (02e830f's run)
H200_RESERVED_PEAKS = {(1, "standard"): 3294625792, (4, "standard"): 6190792704, (8, "standard"): 10074718208,
                       (9, "standard"): 10494148608, (9, "chunked"): 7306477568, (16, "chunked"): 9766436864,
                       (18, "chunked"): 10439622656}


def test_the_cuda_error_bound_is_twice_what_the_h200_showed(monkeypatch):
    # the search skips a size estimated over budget by more than ESTIMATE_ERROR_BOUND["cuda"]: the
    # estimate (allocator slack included) must stay within half of it of each reserved peak
    import autofit.planning.loss_head as loss_head
    monkeypatch.setattr(loss_head, "HAS_TORCH_LCE", False)
    shape = ModelShape(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304)
    for (micro_batch, loss_impl), reserved in H200_RESERVED_PEAKS.items():
        est = estimate_peak(shape, micro_batch, dtype="bfloat16", checkpointing=0, loss_impl=loss_impl, device="cuda",
                            n_micro=2)
        assert abs(est.peak_bytes / reserved - 1) <= ESTIMATE_ERROR_BOUND["cuda"] / 2, (micro_batch, loss_impl)
