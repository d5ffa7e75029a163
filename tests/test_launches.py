"""The host floor's op counts follow the model's architecture, loss and optimizer
(autofit/planning/launches.py): checked against the aten ops a tiny model's real training step
dispatches on this CPU (a TorchDispatchMode count, not a timing), both the ops that launch a kernel
and those that launch none (views, detaches), which cost host time too."""
import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import trainer.model.ce as ce
from autofit.planning import launches as ln
from autofit.planning import throughput as tp
from autofit.planning.estimate import ModelShape
from trainer.model.gpt import GPT, GPTConfig
from trainer.step import make_optimizer, train_step

# ops that launch no kernel on CUDA (views are left out by OpOverload.is_view)
NO_KERNEL = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach", "lift_fresh",
             "_local_scalar_dense", "_unsafe_view", "_record_function_enter_new", "_record_function_exit"}
NANOCHAT = dict(pos_emb="rope", norm="rmsnorm", qk_norm=True, mlp="relu2", tie_embeddings=False,
                logit_softcap=15.0)
LOSS_OPTIONS = ("loss_impl", "ce_chunk_size")  # GPTConfig's, not ModelShape's


def python_custom_op(func):
    """The Python function behind a torch.library custom op (torch's F.linear_cross_entropy is one,
    torch_nn::_linear_cross_entropy_batch_chunked), whose ops a dispatch mode does not see inside
    it; None for any other op, or a torch whose custom-op registry differs."""
    try:
        from torch._library.custom_ops import OPDEFS
        opdef = OPDEFS.get(f"{func.namespace}::{func.overloadpacket.__name__}")
        return getattr(opdef, "_init_fn", None)
    except (ImportError, AttributeError):
        return None


class OpCount(TorchDispatchMode):
    """Aten ops by name: `ops` those that launch a kernel on CUDA, `other` those that launch none;
    a Python custom op counted by the ops it runs."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()
        self.other = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inside = python_custom_op(func)
        if inside is not None:
            with OpCount() as c:
                out = inside(*args, **(kwargs or {}))
            self.ops.update(c.ops)
            self.other.update(c.other)
            return out
        name = func.overloadpacket.__name__
        (self.other if func.is_view or name in NO_KERNEL else self.ops)[name] += 1
        return func(*args, **(kwargs or {}))


def counted_step(options: dict, n_layer: int = 2, dtype: str = "float32", micro: int = 2,
                 device: str = "cpu") -> OpCount:
    """The ops of the second optimizer step (the optimizer's state exists) of
    trainer.step.train_step over `micro` micro-batches of 2 sequences on `device`, the optimizer
    built as for CUDA (fused AdamW), fp16 with the trainer's GradScaler; the token ids start on the
    host, as the trainer's batches do."""
    torch.manual_seed(0)
    model_options = {k: v for k, v in options.items() if k != "optimizer"}
    cfg = GPTConfig(block_size=16, vocab_size=64, n_layer=n_layer, n_head=2, n_embd=32, **model_options)
    model = GPT(cfg).to(device)
    opt = make_optimizer(model, learning_rate=1e-3, weight_decay=0.1, betas=(0.9, 0.95), device_type="cuda",
                         optimizer=options.get("optimizer", "adamw"))
    scaler = torch.amp.GradScaler(device) if dtype == "float16" else None
    x, y = torch.randint(0, 64, (2 * micro, 16)), torch.randint(0, 64, (2 * micro, 16))
    for _ in range(2):
        with OpCount() as c:
            train_step(model, opt, x, y, [2] * micro, grad_clip=1.0, dtype=dtype, scaler=scaler)
    return c


def dispatched_ops(options: dict, n_layer: int = 2, dtype: str = "float32", micro: int = 2,
                   device: str = "cpu") -> collections.Counter:
    """The kernel-launching ops by name of counted_step."""
    return counted_step(options, n_layer, dtype, micro, device).ops


def dispatched(options: dict, n_layer: int = 2, dtype: str = "float32", micro: int = 2, device: str = "cpu") -> int:
    return sum(dispatched_ops(options, n_layer, dtype, micro, device).values())


def tiny(options: dict, n_layer: int = 2) -> ModelShape:
    return ModelShape(n_layer=n_layer, n_head=2, n_embd=32, block_size=16, vocab_size=64,
                      **{k: v for k, v in options.items() if k not in LOSS_OPTIONS})


def loss_args(options: dict) -> dict:
    """launches' loss arguments for a micro-batch of 2 sequences of counted_step's model."""
    impl = options.get("loss_impl", "standard")
    return {"loss_impl": impl, "n_chunks": ln.chunks(2, tiny(options), options.get("ce_chunk_size", 4096))}


def formula(options: dict, n_layer: int = 2, dtype: str = "float32", micro: int = 2, device: str = "cpu") -> int:
    """The same step by launches.py. On the CPU: RMSNorm decomposed as the CPU runs it, less the two
    copies of x and y to the device a micro-batch makes on CUDA (a no-op on the CPU). On CUDA the
    table as the roofline takes it (fused RMSNorm where this torch has it, GQA's repeat, the copies)."""
    shape = tiny(options, n_layer)
    cuda = device == "cuda"
    fwd, bwd = ln.micro_batch_kernels(shape, dtype, fused_norm=None if cuda else False, **loss_args(options))
    return micro * (fwd + bwd - (0 if cuda else 2)) + (micro - 1) * ln.accumulate_kernels(shape) \
        + ln.update_kernels(shape, dtype)


def views_formula(options: dict, n_layer: int = 2, micro: int = 2) -> int:
    """The ops of the same step that launch no kernel, by launches.py (the CPU's decomposed RMSNorm):
    an accumulating micro-batch adds each gradient where the first hands it over by a detach."""
    shape = tiny(options, n_layer)
    per_micro = n_layer * sum(ln.block_views(shape, fused_norm=False)) \
        + sum(ln.outside_views(shape, fused_norm=False, **loss_args(options)))
    return micro * per_micro - (micro - 1) * ln.accumulate_kernels(shape) + ln.update_views(shape)


GPT2 = ModelShape(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304)


def test_a_gpt2_block_counts_its_dispatched_ops():
    """GPT-2 (fp32): 10 forward and 15 backward ops a block, 18 outside it, 15 per optimizer step
    (train_step's 3, clipping's 8 and fused AdamW's 4). The count before (35 a block, 21 outside, 12 a block and 23 per step)
    counted _unsafe_view (a view: no kernel, 4 a block) and the gradient adds of an accumulating
    micro-batch as every micro-batch's, and per-parameter .item() calls of foreach AdamW on the CPU
    (CUDA's fused AdamW makes none)."""
    per_block = ln.block_rows(GPT2)
    assert sum(f for f, _ in per_block.values()) == 10 and sum(b for _, b in per_block.values()) == 15
    fwd, bwd = ln.micro_batch_kernels(GPT2)
    assert fwd + bwd == 25 * 12 + 18 + 5  # + the trainer's 5 (copies, the share's mul, the loss sum)
    assert ln.update_kernels(GPT2) == 15 and ln.accumulate_kernels(GPT2) == 6 * 12 + 3
    assert dispatched({}, n_layer=2) == formula({}, n_layer=2)
    assert dispatched({}, n_layer=3) - dispatched({}, n_layer=2) == 25 * 2 + 6  # two micro-batches, one accumulating


def test_a_nanochat_block_counts_its_rope_qk_norm_and_relu2():
    nano = ModelShape(n_layer=12, n_head=6, n_embd=768, block_size=2048, vocab_size=32768, optimizer="muon",
                      **NANOCHAT)
    gpt2_rows, nano_rows = ln.block_rows(GPT2, fused_norm=True), ln.block_rows(nano, fused_norm=True)
    total = lambda rows: sum(f + b for f, b in rows.values())  # noqa: E731
    # CUDA's fused RMSNorm costs a LayerNorm's two ops; RoPE, QK-norm's two norms, ReLU^2's square
    assert total(nano_rows) - total(gpt2_rows) == sum(ln.ROPE) + 2 * 2 + (6 - 2)
    # where RMSNorm decomposes (the CPU; CUDA torch without _fused_rms_norm), 16 ops a norm, four a block
    decomposed = ln.block_rows(nano, fused_norm=False)
    assert total(decomposed) - total(nano_rows) == 4 * (16 - 2)
    # Muon: 23 ops per matrix and step, six matrices a block (c_attn's q, k, v taken apart)
    assert ln.update_kernels(nano) - ln.update_kernels(ModelShape(**{**nano.__dict__, "optimizer": "adamw"})) \
        == 23 * 6 * 12
    # so its host floor is higher on a card where the host binds
    assert tp.host_ops(nano, "bfloat16").seconds > tp.host_ops(GPT2, "bfloat16").seconds


@pytest.mark.parametrize("options,dtype", [({}, "float32"), ({}, "bfloat16"), (NANOCHAT, "float32"),
                                           (NANOCHAT, "bfloat16"), ({"mlp": "swiglu", "n_kv_head": 1}, "float32"),
                                           ({"bias": True}, "float32")])
def test_the_count_matches_a_tiny_models_dispatched_ops(options, dtype):
    """Forward, backward, accumulation and fused AdamW of a real train_step, within 2 %."""
    assert dispatched(options, dtype=dtype) == pytest.approx(formula(options, dtype=dtype), rel=0.02)


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon needed")
@pytest.mark.parametrize("options", [{"optimizer": "muon"}, {**NANOCHAT, "optimizer": "muon", "mlp": "swiglu"}])
def test_muons_newton_schulz_kernels_are_counted(options):
    assert dispatched(options) == pytest.approx(formula(options), rel=0.02)


def test_checkpointing_recounts_the_recomputed_forward():
    """Full recomputation launches a checkpointed block's forward again; selective keeps its 4 matmuls and SDPA.
    Either runs the forward's 22 views again too."""
    base = tp.host_ops(GPT2, "float32", fused_norm=True)
    full = tp.host_ops(GPT2, "float32", checkpointing=1, fused_norm=True)
    assert full.kernels - base.kernels == 12 * 10 and full.eager - base.eager == 12 * (10 + 22)
    sel = tp.host_ops(GPT2, "float32", checkpointing=4, checkpointing_policy="selective", fused_norm=True)
    assert sel.kernels - base.kernels == 3 * 5 and sel.eager - base.eager == 3 * (5 + 22)


@pytest.mark.parametrize("options,dtype", [({}, "float32"), ({}, "bfloat16"), (NANOCHAT, "float32"),
                                           ({"mlp": "swiglu", "n_kv_head": 1}, "float32"), ({"bias": True}, "float32"),
                                           ({"optimizer": "muon"}, "float32"),
                                           ({"loss_impl": "chunked", "ce_chunk_size": 8}, "float32")])
def test_the_ops_that_launch_no_kernel_match_a_tiny_models(options, dtype):
    """Views, detaches and the like (host time, no launch): the tables against a real train_step, within 2 %.
    GPT-2's block has more of them (61) than kernels (25)."""
    if options.get("optimizer") == "muon" and not hasattr(torch.optim, "Muon"):
        pytest.skip("torch.optim.Muon needed")
    got = sum(counted_step(options, dtype=dtype).other.values())
    assert got == pytest.approx(views_formula(options), rel=0.02)
    assert sum(ln.block_views(GPT2)) == 61 > sum(map(sum, ln.block_rows(GPT2).values())) == 25


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("chunk", [32, 8])  # a micro-batch's 32 rows in one chunk, and in four
@pytest.mark.parametrize("path", ["autofit", "torch", "autofit, soft-capped"])
def test_the_chunked_losses_kernels_are_counted_per_chunk(monkeypatch, path, chunk, dtype):
    """autofit's chunking (trainer/model/ce.py) and torch's F.linear_cross_entropy (counted inside its
    custom op) replace the head's and the loss's rows: ops once a micro-batch and per chunk."""
    if path == "torch" and not ce.HAS_TORCH_LCE:
        pytest.skip("torch's F.linear_cross_entropy needed (torch >= 2.13)")
    monkeypatch.setattr(ce, "HAS_TORCH_LCE", path == "torch")
    options = {"loss_impl": "chunked", "ce_chunk_size": chunk, **({"logit_softcap": 15.0} if "capped" in path else {})}
    assert ln.chunked_path(tiny(options), torch_lce=ce.HAS_TORCH_LCE) == path.split(",")[0]
    assert dispatched(options, dtype=dtype) == pytest.approx(formula(options, dtype=dtype), rel=0.02)
    # four chunks cost three chunks' ops more than one, which the standard loss never pays
    rows = lambda n: sum(map(sum, ln.loss_rows(tiny(options), dtype, "chunked", n, ce.HAS_TORCH_LCE).values()))  # noqa: E731
    per_chunk = (ln.AUTOFIT_CHUNKED if path != "torch" else ln.TORCH_CHUNKED)[
        "float32" if dtype == "float32" else "autocast"][1] + (ln.AUTOFIT_CHUNKED_SOFTCAP if "capped" in path else 0)
    assert rows(4) - rows(1) == 3 * per_chunk and per_chunk >= 19


def test_a_micro_batch_walks_its_tokens_in_chunks_of_ce_chunk_size():
    assert [ln.chunks(m, GPT2, 4096) for m in (1, 4, 9, 16, 18)] == [1, 1, 3, 4, 5]


@pytest.mark.parametrize("options", [{}, {"optimizer": "muon"}])
def test_fp16s_grad_scaler_is_counted(options):
    """fp16 trains with a GradScaler (trainer.loop): the loss scaled each micro-batch, and per step
    unscale_, the inf check and the scale's update (with fused AdamW, which takes found_inf, 3 more)."""
    if options and not hasattr(torch.optim, "Muon"):
        pytest.skip("torch.optim.Muon needed")
    fp16, bf16 = dispatched(options, dtype="float16"), dispatched(options, dtype="bfloat16")
    assert fp16 == pytest.approx(formula(options, dtype="float16"), rel=0.02)
    shape = tiny(options)
    scaler = 2 * sum(ln.GRAD_SCALER) + ln.update_kernels(shape, "float16") - ln.update_kernels(shape, "bfloat16")
    assert fp16 - bf16 == scaler == 2 * 2 + 10 + (3 if not options else 0)


# CUDA-only counts that launches.py assumes (closing-15's open items), measured by stage 1 of
# scripts/gpu_selfcheck.sh (pytest -m cuda): F.rms_norm one fused op each way, and GQA's K/V repeat
# (2 + 2: the CPU's SDPA) on the SDPA backend CUDA picks. A failure names the ops that differ.
CUDA_COUNTED = {"rmsnorm": ({**NANOCHAT}, "bfloat16"), "gqa": ({"n_kv_head": 1}, "bfloat16"),
                "gpt2": ({}, "bfloat16"), "chunked": ({"loss_impl": "chunked", "ce_chunk_size": 8}, "bfloat16"),
                "fp16": ({}, "float16")}


def count_gap(got: collections.Counter, want: int, what: str) -> str:
    """The failure line of a count that differs: totals and every op by name, most frequent first."""
    return (f"{what}: {sum(got.values())} ops dispatched on this device, launches.py counts {want}; ops: "
            + ", ".join(f"{name} {n}" for name, n in got.most_common()))


def test_count_gap_names_every_op_and_both_totals():
    line = count_gap(collections.Counter({"mm": 3, "_fused_rms_norm": 1}), 5, "rmsnorm")
    assert line.startswith("rmsnorm: 4 ops dispatched on this device, launches.py counts 5")
    assert line.endswith("ops: mm 3, _fused_rms_norm 1")


def test_the_cuda_formula_counts_the_copies_and_the_fused_norm():
    """The CUDA prediction is the CPU one plus x's and y's copy per micro-batch, less what a fused
    RMSNorm saves (16 - 2 ops per norm: two a block, QK-norm's two, the final one) where torch fuses it."""
    for options, dtype in CUDA_COUNTED.values():
        shape = tiny(options)
        norms = (2 * 2 + (2 * 2 if shape.qk_norm else 0) + 1) if shape.norm == "rmsnorm" else 0
        saved = norms * (16 - 2) if ln.fused_rms_norm() else 0
        assert formula(options, dtype=dtype, device="cuda") == formula(options, dtype=dtype) + 2 * 2 - 2 * saved


@pytest.mark.cuda
@pytest.mark.parametrize("what", sorted(CUDA_COUNTED))
def test_the_count_matches_a_tiny_models_dispatched_ops_on_cuda(what):
    options, dtype = CUDA_COUNTED[what]
    got = dispatched_ops(options, dtype=dtype, device="cuda")
    want = formula(options, dtype=dtype, device="cuda")
    assert sum(got.values()) == pytest.approx(want, rel=0.02), count_gap(got, want, what)
