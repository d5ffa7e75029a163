"""The estimated throughput's roofline (autofit/planning/throughput.py, t5's L3 in session 14): a
micro-batch takes at least its FLOPs at the card's peak x MFU, at least the bytes it moves over
the card's memory bandwidth, and at least the host's time to issue its ops (per op, per kernel
launch). Card figures are injected."""
from types import SimpleNamespace

import pytest

from autofit.planning import throughput as tp
from autofit.planning.estimate import ModelShape


def card(tflops=100.0, gbs=1000.0, **kw):
    return SimpleNamespace(name="test-1gb", peak_bf16_tflops=tflops, peak_fp16_tflops=tflops,
                           compute_capability=(8, 9), memory_bandwidth_gbs=gbs, **kw)


MID = ModelShape(n_layer=2, n_head=2, n_embd=64, block_size=64, vocab_size=256)
TINY = ModelShape(n_layer=1, n_head=2, n_embd=32, block_size=32, vocab_size=256)  # ~31k parameters, as t5's


def test_a_bandwidth_starved_card_is_bound_by_its_bandwidth():
    f = tp.step_floors(MID, 8, "bfloat16", 0, card(tflops=1000.0, gbs=1.0))
    assert f.bound == "memory bandwidth" and f.memory > f.compute and f.memory > f.host
    rate = tp.estimated_tokens_per_s(MID, 8, "bfloat16", 0, card(tflops=1000.0, gbs=1.0))
    assert rate == pytest.approx(8 * 64 / f.memory)
    # half the bandwidth, half the rate; twice the TFLOP/s, the same rate
    assert tp.estimated_tokens_per_s(MID, 8, "bfloat16", 0, card(tflops=1000.0, gbs=0.5)) == pytest.approx(rate / 2)
    assert tp.estimated_tokens_per_s(MID, 8, "bfloat16", 0, card(tflops=2000.0, gbs=1.0)) == pytest.approx(rate)


def test_a_tiny_model_is_bound_by_its_hosts_ops():
    """t5: 5,150,463 tokens/s for a 31k-parameter model on a GTX 1650, from TFLOP/s alone. Every op
    the step dispatches costs host time, a view as much as a matmul; a kernel costs its launch more."""
    hw = card(tflops=8.9, gbs=192.0)
    f = tp.step_floors(TINY, 16, "float32", 0, hw, step_batch=16)
    assert f.bound == "host overhead"
    ops = tp.host_ops(TINY, "float32")
    assert ops.eager > ops.kernels > 0 and ops.compiled == 0
    assert f.host == pytest.approx(ops.eager * tp.HOST_OP_SECONDS + ops.kernels * tp.LAUNCH_SECONDS)
    rate = tp.estimated_tokens_per_s(TINY, 16, "float32", 0, hw, step_batch=16)
    assert rate == pytest.approx(16 * 32 / f.host) and rate < 2e6
    assert tp.estimated_tokens_per_s(TINY, 16, "float32", 0, card(tflops=89.0, gbs=1920.0), step_batch=16) \
        == pytest.approx(rate)  # a faster card does not help a launch-bound step


def test_the_optimizer_steps_share_is_spread_over_its_micro_batches():
    """Sixteen micro-batches of one sequence share one optimizer update: each pays a sixteenth."""
    alone = tp.step_floors(TINY, 1, "float32", 0, card(), step_batch=1)
    shared = tp.step_floors(TINY, 1, "float32", 0, card(), step_batch=16)
    from autofit.planning import launches
    # the shared one pays a sixteenth of the update and, as 15 in 16 micro-batches do, accumulates its
    # gradients: an add (a kernel) for each gradient the first micro-batch hands over by a detach (an op)
    update = launches.update_kernels(TINY) * (tp.HOST_OP_SECONDS + tp.LAUNCH_SECONDS) \
        + launches.update_views(TINY) * tp.HOST_OP_SECONDS - launches.accumulate_kernels(TINY) * tp.LAUNCH_SECONDS
    assert alone.host - shared.host == pytest.approx(update * 15 / 16)


def test_a_power_limited_card_runs_at_its_sustained_rate():
    hw = card(tflops=65.0, sustained_tflops=24.0)
    assert tp.peak_tflops(hw, "float16") == pytest.approx(24.0)
    assert tp.peak_tflops(hw, "float32", tf32=False) == pytest.approx(24.0 / 4)  # the clock slows every unit
    assert tp.peak_tflops(card(tflops=65.0), "float16") == 65.0


def test_a_t4_is_estimated_slower_than_an_rtx_4070_on_nanochat_d12():
    """t5: the T4 (65 TFLOP/s at a boost clock its 70 W cannot hold) gave 24,264 tokens/s against
    the 4070's 21,047. Each card in the dtype the plan uses there (the T4 has no bf16)."""
    from autofit.devices.hardware import get_hardware
    from trainer.config.train_config import load_config
    shape = ModelShape.from_config(load_config(preset="nanochat-d12"))
    t4, rtx = get_hardware("t4-16gb"), get_hardware("rtx4070-12gb")
    assert t4.peak_fp16_tflops > rtx.peak_bf16_tflops  # the datasheets alone put the T4 first
    for m in (4, 16):
        assert tp.estimated_tokens_per_s(shape, m, "bfloat16", 0, rtx, step_batch=256) > \
            2 * tp.estimated_tokens_per_s(shape, m, "float16", 0, t4, step_batch=256)


def test_a_saved_profile_keeps_a_sustained_rate():
    """A profile saved on a T4 (probe --save writes the card's figures) reads back with its sustained rate."""
    from autofit.devices.hardware import get_hardware, spec_from_profile
    from autofit.profiles.hardware_table import StoredHardware
    t4 = get_hardware("t4-16gb")
    assert t4.sustained_tflops == 24.0
    table = t4.model_dump(mode="json")
    table["compute_capability"] = list(table["compute_capability"])
    StoredHardware.model_validate(table)
    assert spec_from_profile("t4-16gb", table, "test").sustained_tflops == 24.0


def test_the_estimated_plan_line_names_the_rate_the_estimate_used(tmp_path, monkeypatch, capsys):
    """t6's L3: a T4 (sustained_tflops 24 of 65) is estimated at its sustained rate, but the plan
    line said 'the card's peak TFLOP/s x 40%'; now it names the sustained rate, and a card without
    one still reads 'peak'."""
    from cli_run import cli
    monkeypatch.setenv("AUTOFIT_HOME", str(tmp_path / "home"))
    lines = {}
    for gpu in ("t4-16gb", "a100-40gb"):
        code, out, err = cli(monkeypatch, capsys, "probe", "--preset", "tiny", "--gpu", gpu)
        assert code == 0, err
        lines[gpu] = next(ln for ln in out.splitlines() if "tokens/s (estimated: roofline" in ln)
    assert "the card's sustained TFLOP/s (its power limit's, below its peak) x 40% assumed MFU" in lines["t4-16gb"]
    assert "peak TFLOP/s" not in lines["t4-16gb"]
    assert "the card's peak TFLOP/s x 40% assumed MFU" in lines["a100-40gb"]


def test_the_gpu_fills_by_tokens_not_by_sequences():
    """t8 (session 15): the fill was m / (m + 2) by sequences, so one 2048-token sequence counted
    as a third full. By tokens, block 1024 keeps that fill, a 2048-token sequence is half full and
    a long micro-batch of short sequences no fuller than its tokens make it."""
    hw = card(tflops=10.0, gbs=1e6)
    def fill(shape, m):
        f = tp.step_floors(shape, m, "bfloat16", 0, hw)
        full = m * shape.block_size * tp.flops_per_token(shape) / (10e12 * tp.ASSUMED_MFU)
        return full / f.compute
    gpt2 = ModelShape(n_layer=2, n_head=2, n_embd=64, block_size=1024, vocab_size=256)
    assert [fill(gpt2, m) for m in (1, 4, 12)] == pytest.approx([m / (m + 2) for m in (1, 4, 12)])
    long = ModelShape(n_layer=2, n_head=2, n_embd=64, block_size=2048, vocab_size=256)
    assert fill(long, 1) == pytest.approx(0.5)
    short = ModelShape(n_layer=2, n_head=2, n_embd=64, block_size=64, vocab_size=256)
    assert fill(short, 16) == pytest.approx(1024 / 3072)


GPT2 = ModelShape(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304)


def test_the_h200s_micro_batch_1_step_is_host_bound_and_its_floor_stays_below_it():
    """The H200 self-check (2026-12-04, tests/data/selfcheck_h200): GPT-2 124M bf16, a trial step of
    two micro-batches of 1 and the update took 2048 / 86,793 tokens/s = 23.6 ms. The floor before,
    5 us per kernel, said 5.4 ms (0.56x of the rate: the compute floor bound); per op it is host-bound
    at 0.88x, still a floor (below the measured time), and at micro-batch 4 compute binds as before."""
    from autofit.devices.hardware import load_builtin
    hw = load_builtin()["h200-141gb"]
    floors = [tp.step_floors(GPT2, 1, "bfloat16", 0, hw, step_batch=2) for _ in range(2)]
    assert all(f.bound == "host overhead" for f in floors)
    step = sum(f.seconds for f in floors)
    ops = tp.host_ops(GPT2, "bfloat16", share=0.5, fused_norm=True)
    assert 2 * ops.eager == pytest.approx(2508) and 2 * ops.kernels == pytest.approx(1084)
    measured = 2048 / 86_793
    assert step < measured and step / measured == pytest.approx(0.88, abs=0.01)  # a floor, below the measured
    assert step == pytest.approx(2 * (ops.eager * tp.HOST_OP_SECONDS + ops.kernels * tp.LAUNCH_SECONDS))
    assert tp.step_floors(GPT2, 4, "bfloat16", 0, hw, step_batch=8).bound == "compute"


def test_compiled_blocks_pay_less_host_time_than_eager_ones():
    """Compiled blocks (inductor, no CUDA graphs) pay a launch per kernel and a call per graph, no
    per-op Python or dispatcher; the rest of the micro-batch and the update stay eager."""
    eager, compiled = tp.host_ops(GPT2, "bfloat16", fused_norm=True), tp.host_ops(GPT2, "bfloat16", compiled=True,
                                                                                   fused_norm=True)
    assert compiled.graphs == 2 * 12 and compiled.compiled == 12 * 39
    assert eager.kernels - compiled.kernels == compiled.compiled  # the blocks' kernels moved, the rest eager
    assert compiled.seconds < eager.seconds / 2
    hw = card(tflops=1000.0, gbs=1e6)
    assert tp.estimated_tokens_per_s(GPT2, 1, "bfloat16", 0, hw, compiled=True) > \
        tp.estimated_tokens_per_s(GPT2, 1, "bfloat16", 0, hw)


def test_the_chunked_loss_costs_host_time_per_chunk():
    """A micro-batch's chunks of ce_chunk_size rows each run the chunked loss's per-chunk ops."""
    hw = card(tflops=1e6, gbs=1e9)  # host-bound
    one, four = (tp.step_floors(GPT2, 4, "bfloat16", 0, hw, loss_impl="chunked", ce_chunk_size=c, torch_lce=False).host
                 for c in (4096, 1024))
    from autofit.planning import launches as ln
    per_chunk = ln.AUTOFIT_CHUNKED["autocast"][1] * (tp.HOST_OP_SECONDS + tp.LAUNCH_SECONDS) \
        + ln.CHUNKED_VIEWS["autofit"][1] * tp.HOST_OP_SECONDS
    assert four - one == pytest.approx(3 * per_chunk)


def test_the_why_line_gives_the_compute_rate_it_assumed_and_the_figure_it_is_a_share_of(tmp_path, monkeypatch,
                                                                                        capsys):
    """t11's L6: -v's why said 'compute at 58.3 TFLOP/s bfloat16' on a 4070, the card's peak, which
    read as the rate reached; the estimate takes 40 % of it. Now both, each named: the rate
    assumed, and the peak (or a T4's sustained rate) it is a share of."""
    from cli_run import cli
    monkeypatch.setenv("AUTOFIT_HOME", str(tmp_path / "home"))
    why = {}
    for gpu, preset in (("rtx4070-12gb", "rtx4070-seed"), ("t4-16gb", "tiny")):
        code, out, err = cli(monkeypatch, capsys, "probe", "--preset", preset, "--gpu", gpu, "-v")
        assert code == 0, err
        why[gpu] = next(ln for ln in out.splitlines() if "estimated rate is bound by" in ln)
    assert "(compute at 23.3 TFLOP/s, an assumed 40% MFU of the card's 58.3 TFLOP/s bfloat16 peak;" in why["rtx4070-12gb"]
    assert "(compute at 2.4 TFLOP/s, an assumed 40% MFU of the 6 TFLOP/s float32 t4-16gb sustains at its power " \
           "limit (24 of 65 fp16);" in why["t4-16gb"]
