"""The launch floor's kernel count follows the model's architecture and optimizer
(autofit/planning/launches.py): checked against the aten ops a tiny model's real training step
dispatches on this CPU (a TorchDispatchMode count, not a timing)."""
import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

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


class OpCount(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and func.overloadpacket.__name__ not in NO_KERNEL:
            self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def dispatched_ops(options: dict, n_layer: int = 2, dtype: str = "float32", micro: int = 2,
                   device: str = "cpu") -> collections.Counter:
    """Ops by name of the second optimizer step (the optimizer's state exists) of
    trainer.step.train_step over `micro` micro-batches of 2 sequences on `device`, the optimizer
    built as for CUDA (fused AdamW); the token ids start on the host, as the trainer's batches do."""
    torch.manual_seed(0)
    model_options = {k: v for k, v in options.items() if k != "optimizer"}
    cfg = GPTConfig(block_size=16, vocab_size=64, n_layer=n_layer, n_head=2, n_embd=32, **model_options)
    model = GPT(cfg).to(device)
    opt = make_optimizer(model, learning_rate=1e-3, weight_decay=0.1, betas=(0.9, 0.95), device_type="cuda",
                         optimizer=options.get("optimizer", "adamw"))
    x, y = torch.randint(0, 64, (2 * micro, 16)), torch.randint(0, 64, (2 * micro, 16))
    for _ in range(2):
        with OpCount() as c:
            train_step(model, opt, x, y, [2] * micro, grad_clip=1.0, dtype=dtype)
    return c.ops


def dispatched(options: dict, n_layer: int = 2, dtype: str = "float32", micro: int = 2, device: str = "cpu") -> int:
    return sum(dispatched_ops(options, n_layer, dtype, micro, device).values())


def formula(options: dict, n_layer: int = 2, dtype: str = "float32", micro: int = 2, device: str = "cpu") -> int:
    """The same step by launches.py. On the CPU: RMSNorm decomposed as the CPU runs it, less the two
    copies of x and y to the device a micro-batch makes on CUDA (a no-op on the CPU). On CUDA the
    table as the roofline takes it (fused RMSNorm where this torch has it, GQA's repeat, the copies)."""
    shape = ModelShape(n_layer=n_layer, n_head=2, n_embd=32, block_size=16, vocab_size=64,
                       **{k: v for k, v in options.items() if k != "loss_impl"})
    cuda = device == "cuda"
    fwd, bwd = ln.micro_batch_kernels(shape, dtype, fused_norm=None if cuda else False)
    return micro * (fwd + bwd - (0 if cuda else 2)) + (micro - 1) * ln.accumulate_kernels(shape) + ln.update_kernels(shape)


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
    # so its launch floor is higher on a card where launches bind
    assert tp.step_kernels(nano, "bfloat16") > tp.step_kernels(GPT2, "bfloat16")


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
    """Full recomputation launches a checkpointed block's forward again; selective keeps its 4 matmuls and SDPA."""
    base = tp.step_kernels(GPT2, "float32")
    assert tp.step_kernels(GPT2, "float32", checkpointing=1) - base == 12 * 10
    assert tp.step_kernels(GPT2, "float32", checkpointing=4, checkpointing_policy="selective") - base == 3 * 5


# CUDA-only counts that launches.py assumes (closing-15's open items), measured by stage 1 of
# scripts/gpu_selfcheck.sh (pytest -m cuda): F.rms_norm one fused op each way, and GQA's K/V repeat
# (2 + 2: the CPU's SDPA) on the SDPA backend CUDA picks. A failure names the ops that differ.
CUDA_COUNTED = {"rmsnorm": ({**NANOCHAT}, "bfloat16"), "gqa": ({"n_kv_head": 1}, "bfloat16"),
                "gpt2": ({}, "bfloat16")}


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
        shape = ModelShape(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64, **options)
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
