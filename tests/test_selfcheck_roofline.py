"""The self-check report's roofline column: autofit's estimated tokens/s (its estimated mode's
roofline, autofit/planning/throughput.py) beside each measured one, and their ratio, computed from
the recorded figures. The fixture tests/data/selfcheck_h200 holds the H200 run of 2026-12-04
(docs/gpu-selfcheck.md) as its stage records (stages 1-3)."""
import json
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "data" / "selfcheck_h200"
sys.path.insert(0, str(REPO / "scripts" / "selfcheck"))
sys.path.insert(0, str(REPO / "scripts"))

import roofline  # noqa: E402
import selfcheck_report  # noqa: E402
from autofit.devices.hardware import load_builtin  # noqa: E402
from autofit.planning.estimate import ModelShape  # noqa: E402
from autofit.planning.throughput import step_floors  # noqa: E402

GPT2 = ModelShape(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304)
TINY = {"n_layer": 3, "n_head": 2, "n_embd": 64, "block_size": 64, "vocab_size": 256, "effective_batch": 32}


def expected(shape, split, hw_name="h200-141gb", dtype="bfloat16", **host) -> float:
    """The roofline's tokens/s of one step of `split`, written out here from step_floors (`host`:
    its compiled, loss_impl, ...)."""
    hw = load_builtin()[hw_name]
    seconds = sum(step_floors(shape, m, dtype, 0, hw, "full", True, sum(split), **host).seconds for m in split)
    return sum(split) * shape.block_size / seconds


def bound(shape, m, split, hw_name="h200-141gb", dtype="bfloat16", **host) -> str:
    hw = load_builtin()[hw_name]
    return roofline.BOUNDS[step_floors(shape, m, dtype, 0, hw, "full", True, sum(split), **host).bound]


def rows(text: str, first_cell: str) -> list[list[str]]:
    return [[c.strip() for c in line.split("|")[1:-1]] for line in text.splitlines()
            if line.startswith(f"| {first_cell}")]


def test_each_trials_measured_tokens_per_s_has_the_h200_rooflines_estimate_and_the_ratio():
    text, rc = selfcheck_report.report(FIXTURE, [1, 2, 3])
    assert rc == 0
    trials = json.loads((FIXTURE / "stage2_probe.json").read_text())["trials"]
    table = [r for r in rows(text, "") if len(r) == 16 and r[1] == "bfloat16"]
    assert [int(r[0]) for r in table] == [t["micro_batch"] for t in trials]
    for row, t in zip(table, trials):
        if not t["tokens_per_s"]:  # an OOM measured no rate: nothing to set beside it
            assert row[11:14] == ["-", "-", "-"]
            continue
        # the trial's own timed step: two micro-batches of its size (the effective batch is 512), its loss
        split = [t["micro_batch"]] * 2
        host = {"loss_impl": t["loss_impl"], "torch_lce": False}  # the H200's torch 2.11 had no F.linear_cross_entropy
        est = expected(GPT2, split, **host)
        assert row[11] == f"{t['tokens_per_s']:,.0f}"
        assert row[12] == f"{est:,.0f} ({bound(GPT2, t['micro_batch'], split, **host)})"
        assert row[13] == f"{t['tokens_per_s'] / est:.2f}x"
    # the 2026-12-04 figures: at micro-batch 1 the H200 ran at 0.88 of the roofline, bound by the host's
    # ops (0.56x of a compute floor while the host floor was 5 us a kernel), at 4 near it, compute-bound
    assert "| 86,793 | 98,424 (host) | 0.88x |" in text and "| 301,282 | 308,668 (compute) | 0.98x |" in text
    assert "tokens/s measured | tokens/s estimated (roofline) | measured / estimated" in text
    assert "built-in hardware profile h200-141gb, for 'NVIDIA H200' as recorded" in text


def test_training_phases_get_the_roofline_of_their_steady_steps_split_and_compiled_its_own_host_floor():
    text, _ = selfcheck_report.report(FIXTURE, [1, 2, 3])
    # steps 2-3 and 5-9 ran 8 x 8 (the injected OOM shrank 16 to 8 at step 1); step 0's 16 x 4 is not steady
    est = expected(GPT2, [8] * 8)
    assert est != pytest.approx(expected(GPT2, [16] * 4), rel=1e-3)
    # compile lowers only the host floor, which 8 x 1024 tokens do not reach on an H200: both compute-bound
    assert expected(GPT2, [8] * 8, compiled=True) == est
    eager, compiled = rows(text, "eager")[0], rows(text, "compiled")[0]
    assert eager[1:4] == ["368,607", f"{est:,.0f} (compute)", f"{368607 / est:.2f}x"]
    assert compiled[1:4] == ["415,448", f"{est:,.0f} (compute)", f"{415448 / est:.2f}x"]
    assert "compile changes only the host floor" in text


def test_a_trial_step_shares_the_update_by_the_trials_own_two_micro_batches():
    # a tiny model on the H200 is host-bound, where the optimizer update's share of the step counts
    hw = load_builtin()["h200-141gb"]
    roof = roofline.Roofline({1: {"card": {"name": "NVIDIA H200", "total_bytes": hw.memory_bytes}}})
    shape = roofline.model_shape(TINY)
    got = roof.trial({"micro_batch": 4, "dtype": "float32", "checkpointing": 0, "tokens_per_s": 1e5}, TINY)
    assert got["micro_batches"] == [4, 4] and got["bound"] == "host"
    assert got["tokens_per_s"] == pytest.approx(expected(shape, [4, 4], dtype="float32"))
    wrong = 8 * 64 / (2 * step_floors(shape, 4, "float32", 0, hw, "full", True, 32).seconds)  # the update shared by 32
    assert got["tokens_per_s"] != pytest.approx(wrong, rel=1e-3)
    # a trial whose size holds the whole batch times one micro-batch
    assert roof.trial({"micro_batch": 32, "dtype": "float32", "tokens_per_s": 1e5}, TINY)["micro_batches"] == [32]


def test_the_card_is_the_one_the_self_check_ran_on_from_stage_1_or_else_stage_3(tmp_path):
    out = tmp_path / "out"
    shutil.copytree(FIXTURE, out)
    (out / "stage1_device.json").unlink()  # a rerun of stages 2-3 only: stage 3 named the card too
    text, _ = selfcheck_report.report(out, [2, 3])
    assert "built-in hardware profile h200-141gb" in text and rows(text, "eager")[0][2] != "-"
    for n in (1, 3):  # a card no built-in profile describes: every estimate '-', and the line says why
        path = out / f"stage{n}_{selfcheck_report.NAMES[n]}.json"
        rec = json.loads((FIXTURE / path.name).read_text())
        rec["card"]["name"] = "NVIDIA Nosuch"
        path.write_text(json.dumps(rec))
    text, _ = selfcheck_report.report(out, [1, 2, 3])
    assert "estimated (roofline): not computed: no built-in hardware profile names 'NVIDIA Nosuch'" in text
    assert rows(text, "eager")[0][2:4] == ["-", "-"]
    # the kind the device tool lends first, by the name and total memory NVML gives an H100 SXM
    assert roofline.card_spec("NVIDIA H100 80GB HBM3", 85520809984)[0].name == "h100-80gb"


def test_the_devices_reports_leave_the_roofline_out_and_say_how_to_add_it():
    text, _ = selfcheck_report.report(FIXTURE, [1, 2, 3], roofline=False)
    assert "not computed here (--no-roofline" in text and "(compute)" not in text
    assert rows(text, "eager")[0][1:4] == ["368,607", "-", "-"]
    # the device's report has 3 s, and the roofline imports torch: every report call there passes --no-roofline
    script = (REPO / "scripts" / "gpu_selfcheck.sh").read_text()
    calls = [line for line in script.splitlines() if "selfcheck_report.py" in line and "timeout" in line]
    assert len(calls) == 2 and all("--no-roofline" in c for c in calls)
