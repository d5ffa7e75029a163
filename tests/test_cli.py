"""The `autofit` command end to end, in-process: exit codes, one-line errors, JSON output,
and the probe -> save -> run --profile flow on the budgeted CPU device."""
import json
import sys

import pytest

from autofit.cli import main

SEED = """batch_size = 16
gradient_accumulation_steps = 32
block_size = 1024
compile = True
dtype = 'bfloat16'
n_layer = 12
n_head = 12
n_embd = 576
"""
SMALL = ["--set", "n_layer=1", "--set", "n_embd=32", "--set", "n_head=2", "--set", "block_size=32",
         "--set", "batch_size=8", "--set", "gradient_accumulation_steps=2", "--set", "eval_iters=1",
         "--set", "eval_interval=100", "--set", "log_interval=1"]


def cli(monkeypatch, capsys, *args):
    monkeypatch.setattr(sys, "argv", ["autofit", *map(str, args)])
    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code or 0
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOFIT_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)


def test_seed_config_resolves(tmp_path, monkeypatch, capsys):
    (tmp_path / "seed.py").write_text(SEED)
    code, out, _ = cli(monkeypatch, capsys, "config", "--config", "seed.py", "--json")
    assert code == 0
    d = json.loads(out)
    assert (d["batch_size"], d["gradient_accumulation_steps"], d["block_size"], d["compile"], d["dtype"],
            d["n_layer"], d["n_head"], d["n_embd"]) == (16, 32, 1024, True, "bfloat16", 12, 12, 576)


def test_config_with_a_call_is_refused_and_nothing_runs(tmp_path, monkeypatch, capsys):
    (tmp_path / "evil.py").write_text('import os; os.system("touch pwned")\nbatch_size = 4\n')
    code, out, err = cli(monkeypatch, capsys, "config", "--config", "evil.py", "--json")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "evil.py:1" in err and "refused" in err
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("args, words", [
    (["config", "--config", "missing.py"], "not found"),
    (["config", "--set", "n_embed=3"], "n_embd"),
    (["config", "--set", "n_head=5"], "divisible"),
    (["probe", "--gpu", "rtx4070-12gbb"], "rtx4070-12gb"),
    (["probe", "--device", "cpu", "--budget", "lots"], "--budget"),
    (["run", "--profile", "no-such-card"], "no profile"),
    (["run", "--profile", "rtx4070-12gb"], "autofit probe --gpu rtx4070-12gb"),
    (["run", "--emulate"], "--profile"),
    (["profiles", "rm", "rtx4070-12gb"], "built-in"),
])
def test_bad_input_is_one_line_and_nonzero(monkeypatch, capsys, args, words):
    code, out, err = cli(monkeypatch, capsys, *args)
    assert code != 0
    assert words in err and err.strip().count("\n") == 0, err


def test_probe_seed_on_simulated_4070(tmp_path, monkeypatch, capsys):
    (tmp_path / "seed.py").write_text(SEED)
    code, out, _ = cli(monkeypatch, capsys, "probe", "--config", "seed.py", "--gpu", "rtx4070-12gb", "--json")
    assert code == 0
    d = json.loads(out)
    assert d["mode"] == "estimated"
    p = d["plan"]
    assert sum(p["micro_batches"]) == 512 == p["effective_batch"] and d["target"]["block_size"] == 1024
    assert p["estimated_peak_bytes"] <= d["budget_bytes"] < d["device"]["total_bytes"]
    assert p["measured_peak_bytes"] is None and p["dtype"] == "bfloat16"
    for key in ("micro_batch", "dtype", "compile", "checkpointing", "loss_impl", "status",
                "estimated_peak_bytes", "measured_peak_bytes", "tokens_per_s", "steps_run"):
        assert key in d["trials"][0]
    # human output explains where the memory goes and labels the figures
    code, out, _ = cli(monkeypatch, capsys, "probe", "--config", "seed.py", "--gpu", "rtx4070-12gb")
    assert "ESTIMATED" in out and "where the memory goes" in out and "logits_and_loss" in out


def test_probe_cpu_measures_and_save_then_run_profile_starts_at_once(tmp_path, monkeypatch, capsys):
    code, out, err = cli(monkeypatch, capsys, "probe", "--device", "cpu", "--budget", "1500KB", *SMALL,
                         "--dtype", "float32", "--checkpointing", "0", "--loss", "standard", "--save", "--json")
    assert code == 0, err
    d = json.loads(out)
    assert d["mode"] == "measured" and d["saved"]["profile"] == "cpu-2mb" or d["saved"]["profile"].startswith("cpu-")
    plan = d["plan"]
    assert plan["measured_peak_bytes"] <= d["budget_bytes"]
    assert any(t["status"] in ("oom", "over_budget") and t["micro_batch"] > plan["micro_batch"] for t in d["trials"])
    name = d["saved"]["profile"]

    code, out, err = cli(monkeypatch, capsys, "run", "--profile", name, *SMALL, "--max-steps", "3",
                         "--out", "o1", "--no-progress")
    assert code == 0, err
    assert "no probe needed" in out and "trial:" not in err
    recs = [json.loads(l) for l in (tmp_path / "o1" / "metrics.jsonl").read_text().splitlines()]
    run = recs[0]
    assert run["type"] == "run" and run["plan"]["source"] == "profile" and run["plan"]["profile"] == name
    trains = [r for r in recs if r["type"] == "train"]
    assert [r["step"] for r in trains] == [0, 1, 2]
    assert all(r["micro_batch"] == plan["micro_batch"] and r["effective_batch"] == 16 for r in trains)

    # a model field changed: the saved plan is stale, so the run probes again (and says why)
    code, out, err = cli(monkeypatch, capsys, "run", "--profile", name, *SMALL, "--set", "n_embd=48",
                         "--set", "n_head=2", "--max-steps", "1", "--out", "o2", "--no-progress")
    assert code == 0, err
    assert "stale" in err and "n_embd 32 -> 48" in err and "trial:" in err

    code, out, _ = cli(monkeypatch, capsys, "profiles", "show", name, "--json")
    assert len(json.loads(out)["plans"]) == 2


def test_injected_oom_is_survived_with_exact_effective_batch(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("AUTOFIT_FAULT_OOM_AT_STEP", "2")
    code, out, err = cli(monkeypatch, capsys, "run", "--device", "cpu", "--budget", "64MiB", *SMALL,
                         "--dtype", "float32", "--checkpointing", "0", "--loss", "standard",
                         "--max-steps", "4", "--out", "o", "--no-progress")
    assert code == 0, err
    recs = [json.loads(l) for l in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()]
    trains = {r["step"]: r for r in recs if r["type"] == "train"}
    assert sorted(trains) == [0, 1, 2, 3]
    shrink = [r for r in recs if r.get("event") == "oom_shrink"]
    assert len(shrink) == 1 and shrink[0]["step"] == 2
    assert trains[2]["micro_batch"] < trains[1]["micro_batch"]
    assert {r["effective_batch"] for r in trains.values()} == {16}


def test_profiles_list_shows_builtins(monkeypatch, capsys):
    code, out, _ = cli(monkeypatch, capsys, "profiles", "list", "--json")
    names = {e["name"] for e in json.loads(out)}
    assert {"rtx4070-12gb", "rtx3060-12gb", "rtx4060ti-16gb", "rtx3090-24gb", "rtx4090-24gb", "l4-24gb",
            "t4-16gb", "a100-40gb", "a100-80gb", "h100-80gb"} <= names


def test_larger_gpu_than_profile_needs_emulate(monkeypatch, capsys):
    import autofit.cuda as cuda
    from autofit.device import DeviceInfo
    h100 = DeviceInfo(kind="cuda", name="NVIDIA H100 80GB HBM3", index=0, total_bytes=81559 * 2**20,
                              free_bytes=80000 * 2**20, used_by_others_bytes=0, compute_capability=(9, 0),
                              driver_version="550.54", cuda_version="12.4", source="nvml")
    monkeypatch.setattr(cuda, "detect_gpu", lambda index=0: h100)
    code, _, err = cli(monkeypatch, capsys, "run", "--profile", "rtx4070-12gb")
    assert code == 2 and "--emulate" in err and "h100-80gb" in err
    smaller = h100.model_copy(update={"name": "NVIDIA GeForce RTX 3060 Ti", "total_bytes": 8192 * 2**20,
                                      "compute_capability": (8, 6)})
    monkeypatch.setattr(cuda, "detect_gpu", lambda index=0: smaller)
    code, _, err = cli(monkeypatch, capsys, "run", "--profile", "rtx4070-12gb")
    assert code == 2 and "rtx3060ti" in err and "not rtx4070-12gb" in err


def test_injected_oom_is_not_written_into_the_profile(tmp_path, monkeypatch, capsys):
    code, out, err = cli(monkeypatch, capsys, "probe", "--device", "cpu", "--budget", "64MiB", *SMALL,
                         "--checkpointing", "0", "--loss", "standard", "--save", "--json")
    assert code == 0, err
    name = json.loads(out)["saved"]["profile"]
    monkeypatch.setenv("AUTOFIT_FAULT_OOM_AT_STEP", "1")
    code, out, err = cli(monkeypatch, capsys, "run", "--profile", name, *SMALL, "--max-steps", "2",
                         "--out", "o", "--no-progress")
    assert code == 0, err
    assert "not recorded" in err
    code, out, _ = cli(monkeypatch, capsys, "profiles", "show", name, "--json")
    plan = next(iter(json.loads(out)["plans"].values()))
    assert plan.get("safe_micro_batch") is None and not plan.get("events")


def test_compile_cannot_be_forced_on_the_cpu_device(monkeypatch, capsys):
    code, _, err = cli(monkeypatch, capsys, "probe", "--device", "cpu", "--budget", "64MiB", *SMALL, "--compile")
    assert code == 2 and "--compile" in err and "budgeted CPU" in err


def test_resume_continues_the_same_plan_without_probing(tmp_path, monkeypatch, capsys):
    code, out, err = cli(monkeypatch, capsys, "run", "--device", "cpu", "--budget", "1500KB", *SMALL,
                         "--checkpointing", "0", "--max-steps", "2", "--out", "o", "--no-progress")
    assert code == 0, err
    first = [json.loads(l) for l in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()]
    plan = first[0]["plan"]
    # a fresh run into the same directory is refused before any probe
    code, _, err = cli(monkeypatch, capsys, "run", "--device", "cpu", "--budget", "1500KB", *SMALL,
                       "--out", "o", "--no-progress")
    assert code == 2 and "--resume" in err and "trial:" not in err
    code, out, err = cli(monkeypatch, capsys, "run", "--resume", "--out", "o", "--max-steps", "4", "--no-progress")
    assert code == 0, err
    assert "trial:" not in err and "no probe" in err
    recs = [json.loads(l) for l in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()]
    runs = [r for r in recs if r["type"] == "run"]
    assert len(runs) == 2 and runs[1]["resumed_at"] == 2 and runs[1]["plan"]["resumed"]
    assert runs[1]["plan"]["loss_impl"] == plan["loss_impl"] and runs[1]["config"] == runs[0]["config"]
    steps = [r for r in recs if r["type"] == "train"]
    assert [r["step"] for r in steps] == [0, 1, 2, 3]
    assert all(r["peak_mem_bytes"] for r in steps)  # still on the budgeted device


def test_no_probe_run_still_enforces_the_cpu_budget(tmp_path, monkeypatch, capsys):
    code, out, err = cli(monkeypatch, capsys, "run", "--no-probe", "--device", "cpu", "--budget", "1MB", *SMALL,
                         "--set", "batch_size=16", "--set", "gradient_accumulation_steps=1",
                         "--max-steps", "2", "--out", "o", "--no-progress")
    recs = [json.loads(l) for l in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("event") == "oom_shrink" for r in recs) or code != 0
    assert all(r["peak_mem_bytes"] <= 1_000_000 for r in recs if r["type"] == "train")
