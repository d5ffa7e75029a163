"""The GPU self-check (scripts/gpu_selfcheck.sh and scripts/selfcheck/): its dry run end to end
on this CPU, its time limits, and, with fakes for NVML and constructed records, the CUDA-side
logic that only a GPU machine runs for real."""
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts" / "selfcheck"))
sys.path.insert(0, str(REPO / "scripts"))

import common  # noqa: E402
import device_wheels  # noqa: E402
import env_check  # noqa: E402
import figures  # noqa: E402
import selfcheck_report  # noqa: E402
import stage1_device  # noqa: E402
import stage3_train  # noqa: E402

H200 = {"name": "NVIDIA H200", "uuid": "GPU-3f9a0c1e-55aa-4b7c-9d21-0e8f7a6b5c4d", "total_bytes": 150754820096,
        "free_bytes": 150000000000, "compute_capability": [9, 0], "v2_reserved_bytes": 550 * 2**20}
SYSTEM = {"driver_version": "580.159.04", "cuda_driver_api": 13000, "cuda_driver_api_text": "13.0"}
TORCH = {"name": "NVIDIA H200", "uuid": "3f9a0c1e-55aa-4b7c-9d21-0e8f7a6b5c4d", "total_bytes": 150198353920,
         "compute_capability": [9, 0], "cuda_driver_api": 13000}
DEVICE_TOOL_NAME = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


def selfcheck(out: Path, *flags: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / "scripts" / "gpu_selfcheck.sh"), *flags, str(out)],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "SELFCHECK_PYTHON": sys.executable, **env})


# ------------------------------------------------------------------ the dry run, end to end

def test_dry_run_runs_every_cpu_stage_for_real_and_exits_0(tmp_path):
    out = tmp_path / "out"
    res = selfcheck(out, "--dry-run")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    files = sorted(p.name for p in out.iterdir())
    # what the device tool brings back: at most 8 plain files, names of letters, digits, . _ -
    assert files == ["report.md", "selfcheck.log", "stage0_env.json", "stage1_device.json",
                     "stage2_probe.json", "stage2_trials.jsonl", "stage3_train.json", "stage4_ranks.json"]
    assert all(set(f) <= DEVICE_TOOL_NAME for f in files)
    recs = {n: json.loads((out / f).read_text()) for n, f in enumerate(f for f in files[2:] if f.endswith(".json"))}
    assert all(r["status"] == "ok" and r["dry_run"] for r in recs.values())
    assert not [c for r in recs.values() for c in r["checks"] if c["result"] == "FAIL"]

    # stage 1: the CUDA parts are skipped with a reason; the cuda-marked tests were collected
    assert {s["what"] for s in recs[1]["skipped"]} == {"device identity (NVML vs torch)", "context and workspace bytes"}
    assert recs[1]["cuda_tests"]["counts"].get("skipped", 0) >= 1
    # stage 2: a real probe on the budgeted CPU, its trials read back from the saved profile
    trials = recs[2]["trials"]
    assert trials and all(t["measured_peak_bytes"] and t["estimated_peak_bytes"] for t in trials if t["status"] == "fit")
    assert recs[2]["plan"]["effective_batch"] == 32
    # each trial's full record also reached OUT as it ended, appended by the probe itself
    appended = [json.loads(line) for line in (out / "stage2_trials.jsonl").read_text().splitlines()]
    key = lambda t: (t["micro_batch"], t["checkpointing"], t["loss_impl"], t["status"], t["measured_peak_bytes"])  # noqa: E731
    assert [key(t) for t in appended] == [key(t) for t in trials]
    assert all(t["type"] == "trial" and "leaked_bytes" in t and "measured_reserved_bytes" in t for t in appended)
    # stage 3: compile switched on, the injected OOM recovered by a shrink, the batch kept
    checks = {c["check"]: c for c in recs[3]["checks"]}
    assert checks["injected OOM at step 1 recovered"]["detail"] == "oom_shrink 8 -> 4"
    assert checks["torch.compile switched on at step 3"]["result"] == "PASS"
    assert recs[3]["figures"]["eager_tokens_per_s"] > 0 and recs[3]["figures"]["compiled_mfu"] is None

    report = (out / "report.md").read_text()
    assert "| 3 | injected OOM at step 1 recovered | PASS | oom_shrink 8 -> 4 |" in report
    assert "Result: all stages ok." in report and "**dry run**" in report
    assert "Result: all stages ok." in res.stdout  # the report is printed too, for the device tool's output

    # what the GPU stages would train, read from their own arguments: GPT-2 124M at vocab 50304
    for n in (2, 3):
        assert recs[n]["gpu_model"]["vocab_size"] == 50304 and recs[n]["gpu_model"]["n_embd"] == 768
        assert recs[n]["gpu_model"]["parameters"] == 124_373_760
    # the timing plan of the GPU run, within the call (>= 90 s left of 600) and the lease (2 runs)
    plan = next(line for line in res.stdout.splitlines() if line.startswith("timing plan of the GPU run"))
    assert "OVER" not in plan and "of a 600 s call" in plan
    # stage 3's raw records are in its JSON, copied as the run wrote them
    assert [r["step"] for r in recs[3]["raw_metrics"] if r["type"] == "train"] == list(range(8))


def test_a_stage_past_its_time_limit_is_marked_and_fails_the_check(tmp_path):
    out = tmp_path / "out"
    res = selfcheck(out, "--dry-run", SELFCHECK_STAGES="2", SELFCHECK_LIMIT_2="1")
    assert res.returncode == 1
    rec = json.loads((out / "stage2_probe.json").read_text())
    assert rec["status"] == "timed_out"
    assert rec["checks"][-1] == {"check": "stage finished within its 1 s limit", "result": "FAIL",
                                 "detail": "stopped by timeout; the figures above are what it had measured"}
    assert "stopped after its 1 s limit" in res.stdout
    assert "Result: not ok in stage(s) 2." in (out / "report.md").read_text()


def test_a_command_past_its_share_of_the_stage_gets_sigterm_and_keeps_its_output(tmp_path, monkeypatch):
    # a stand-in for `python -m autofit.cli.app run`: prints a step, then on SIGTERM "saves" and exits
    # 143 (128 + SIGTERM), as the trainer does (it finishes the step and writes a checkpoint)
    fake = tmp_path / "python"
    fake.write_text("#!/bin/bash\ntrap 'echo checkpoint saved; exit 143' TERM\necho step 0\n"
                    "for i in $(seq 300); do sleep 0.1; done\n")
    fake.chmod(0o755)
    monkeypatch.setattr(common.sys, "executable", str(fake))
    res = common.run_cli(["run"], timeout=1)
    assert res["timed_out"] and res["rc"] == 143
    assert res["stdout"].splitlines() == ["step 0", "checkpoint saved"]
    assert common.share_of(200) == 175 and common.share_of(5) == 10 and common.share_of(None) is None


def test_usage_errors_are_one_line(tmp_path):
    res = subprocess.run(["bash", str(REPO / "scripts" / "gpu_selfcheck.sh")], capture_output=True, text=True)
    assert res.returncode == 2 and res.stderr.strip().count("\n") == 0 and "usage" in res.stderr


# ------------------------------------------------------------------ the wheels for the offline machine

def test_device_wheels_carry_what_the_device_lacks_and_what_that_needs():
    reqs = common.requirements(REPO / "pyproject.toml")
    carry = device_wheels.needed(reqs, device_wheels.device_packages(), device_wheels.device_env("3.12"))
    for name in ("pydantic", "pydantic-core", "annotated-types", "typing-inspection", "tomli-w"):
        assert name in carry
    assert "typing-extensions" in carry  # on the device, but pydantic needs a newer one than it may have
    for name in ("torch", "numpy", "typer", "rich", "nvidia-ml-py", "pytest", "tomli"):
        assert name not in carry  # the device's own, or (tomli) not needed on Python 3.12
    pins = device_wheels.pinned(carry)
    assert len(pins) == len(carry) and all("==" in p for p in pins)


def test_device_wheels_follow_pyproject_and_refuse_what_is_not_installed_here():
    env = device_wheels.device_env("3.12")
    fake = {"platformdirs": [], "filelock": [], "mylib": ["torch>=2", "helper>=1; python_version < '3.11'"]}
    carry = device_wheels.needed(["platformdirs>=3", "filelock>=3.12", "mylib"], device_wheels.device_packages(), env,
                                 requires=lambda n: fake[n])
    assert sorted(carry) == ["mylib", "platformdirs"]  # filelock is there; torch never; helper not on 3.12
    with pytest.raises(device_wheels.WheelListError, match="not-installed-anywhere"):
        device_wheels.pinned({"not-installed-anywhere": "not-installed-anywhere"})


def test_env_check_reads_each_requirement_against_what_is_installed():
    assert env_check.check_requirement("pytest>=7.4", None)["ok"] is True
    assert env_check.check_requirement("pytest>=999", None)["ok"] is False
    missing = env_check.check_requirement("surely-not-installed-here>=1", None)
    assert missing["ok"] is False and missing["where"] == "missing"
    assert env_check.check_requirement("tomli>=2.0; python_version < '3.0'", None)["ok"] is None


# ------------------------------------------------------------------ stage 1 with a fake NVML

def fake_pynvml(pids_used: dict[int, int], free: int = 149_000_000_000):
    class NVMLError(Exception):
        pass
    mem = types.SimpleNamespace(total=H200["total_bytes"], free=free, used=H200["total_bytes"] - free)
    m = types.SimpleNamespace(NVMLError=NVMLError, nvmlMemory_v2=0x02000028)
    m.nvmlDeviceGetCount = lambda: 1
    m.nvmlDeviceGetHandleByIndex = lambda i: "h0"
    m.nvmlDeviceGetName = lambda h: b"NVIDIA H200"  # older bindings return bytes
    m.nvmlDeviceGetUUID = lambda h: H200["uuid"]
    m.nvmlDeviceGetCudaComputeCapability = lambda h: (9, 0)
    m.nvmlDeviceGetPciInfo = lambda h: types.SimpleNamespace(busId=b"00000000:18:00.0")

    def memory(h, version=None):
        if version is None:
            return mem
        raise NVMLError("Function Not Found")  # an old driver without nvmlDeviceGetMemoryInfo_v2
    m.nvmlDeviceGetMemoryInfo = memory
    m.nvmlDeviceGetComputeRunningProcesses = lambda h: [types.SimpleNamespace(pid=p, usedGpuMemory=u)
                                                        for p, u in pids_used.items()]
    m.nvmlSystemGetCudaDriverVersion = lambda: 13000
    m.nvmlSystemGetDriverVersion = lambda: "580.159.04"
    return m


def fake_torch(reserved: int):
    cuda = types.SimpleNamespace(synchronize=lambda i=0: None, memory_reserved=lambda i=0: reserved)
    return types.SimpleNamespace(cuda=cuda)


def test_nvml_devices_and_system_from_a_fake_nvml():
    nv = fake_pynvml({})
    (d,) = stage1_device.nvml_devices(nv)
    assert d["name"] == "NVIDIA H200" and d["pci_bus_id"] == "00000000:18:00.0" and d["compute_capability"] == [9, 0]
    assert "v2_error" in d and "v2_reserved_bytes" not in d
    assert stage1_device.nvml_system(nv) == SYSTEM


def test_outside_allocator_bytes_from_our_nvml_entry_or_else_from_free_memory():
    own = stage1_device.own_usage(fake_pynvml({os.getpid(): 900 * 2**20, 1: 5 * 2**30}), "h0",
                                  fake_torch(reserved=400 * 2**20), free_before=0)
    assert own["outside_allocator_bytes"] == 500 * 2**20 and own["how"].startswith("measured: NVML per-process")
    hidden = stage1_device.own_usage(fake_pynvml({1: 5 * 2**30}, free=149_000_000_000), "h0",
                                     fake_torch(reserved=400 * 2**20), free_before=150_000_000_000)
    assert hidden["outside_allocator_bytes"] == 1_000_000_000 - 400 * 2**20
    assert "not in NVML's process list" in hidden["how"]


def test_identity_checks_agree_and_catch_each_mismatch():
    rows = {name: ok for name, ok, _ in stage1_device.compare_identity(H200, SYSTEM, TORCH)}
    assert all(rows.values()), rows
    bad = stage1_device.compare_identity(H200, SYSTEM, {**TORCH, "uuid": "00000000-0000-0000-0000-000000000000",
                                                        "total_bytes": H200["total_bytes"] // 2, "cuda_driver_api": 12080})
    assert [name for name, ok, _ in bad if ok is False] == [
        "UUID: NVML and torch agree", "total memory: NVML and torch within 3%",
        "CUDA driver API version: NVML and libcuda agree"]


def test_pytest_summary_is_read_from_the_closing_line():
    text = "....\n=== short test summary ===\n3 passed, 1 skipped, 200 deselected, 1 error in 4.10s\n"
    assert stage1_device.parse_pytest_summary(text) == {"passed": 3, "skipped": 1, "deselected": 200, "error": 1}


# ------------------------------------------------------------------ figures

def test_flops_per_token_counts_every_matmul_weight_of_the_model():
    import torch

    from trainer.model.gpt import GPT, GPTConfig
    cfg = {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 16, "vocab_size": 256}
    model = GPT(GPTConfig(**cfg))
    matmul = sum(p.numel() for n, p in model.named_parameters() if p.dim() >= 2 and "wpe" not in n)
    flops, n, _ = figures.flops_per_token(cfg)
    assert n == matmul  # 12·L·C² + V·C: the blocks' matrices and the tied head
    assert flops == 6 * n + 12 * 2 * 32 * 16
    assert isinstance(model.transformer.wpe, torch.nn.Embedding)


def test_mfu_is_achieved_over_peak_flops():
    assert figures.mfu(10_000, 1e9, 100.0) == pytest.approx(0.1)
    assert figures.mfu(10_000, 1e9, None) is None and figures.mfu(None, 1e9, 100.0) is None
    assert figures.peak_for({"peak_bf16_tflops": 989.4, "peak_fp16_tflops": 989.4}, "bfloat16") == 989.4
    assert figures.peak_for({"peak_bf16_tflops": 989.4}, "float32") is None


def test_the_cards_peak_comes_from_its_builtin_profile(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOFIT_HOME", str(tmp_path / "home"))
    hw, how = figures.find_card_profile("NVIDIA H200", 150754820096)
    assert hw["peak_bf16_tflops"] == 989.4 and "h200-141gb" in how
    hw, how = figures.find_card_profile("NVIDIA H200", 24 * 2**30)  # right name, wrong memory
    assert hw is None and "no hardware profile" in how


def test_trial_rows_keep_baseline_fields_and_compare_the_estimate_like_with_like():
    rows = figures.trial_rows([{"micro_batch": 8, "status": "fit", "estimated_peak_bytes": 110, "measured_peak_bytes": 100,
                                "allocated_after_bytes": 5, "baseline_bytes": 5},
                               {"micro_batch": 16, "status": "oom", "estimated_peak_bytes": 200}])
    assert rows[0]["estimate_error"] == pytest.approx(0.1) and rows[0]["allocated_after_bytes"] == 5
    assert rows[1]["estimate_error"] is None and rows[0]["reserved_estimate_error"] is None
    # CUDA: an estimate that is exactly right, allocated 10 GiB plus 5% slack, against 10 GiB allocated
    # and 10.5 GiB reserved, reads 0 both ways (it read +5% against the allocated peak before)
    (cuda,) = figures.trial_rows([{"micro_batch": 8, "status": "fit", "estimated_peak_bytes": round(10.5 * 2**30),
                                   "measured_peak_bytes": 10 * 2**30, "measured_reserved_bytes": round(10.5 * 2**30)}],
                                 slack=0.05)
    assert cuda["estimate_error"] == pytest.approx(0, abs=1e-9) and cuda["reserved_estimate_error"] == 0
    assert cuda["estimated_allocated_bytes"] == 10 * 2**30
    tol = figures.leak_tolerance("cpu")
    assert figures.leaked_bytes(rows[0]) == 0 and figures.leaked_bytes(rows[1]) is None
    assert figures.baseline_summary(rows, tol)[0] is True
    assert figures.baseline_summary([{"micro_batch": 8, "note": ""}], tol)[0] is None
    leak = {"allocated_before_bytes": 100, "allocated_after_bytes": 100 + 64 * 2**20, "note": ""}
    assert figures.leaked_bytes(leak) == 64 * 2**20
    ok, detail = figures.baseline_summary([rows[0], leak], figures.leak_tolerance("cuda"))
    assert ok is False and "1 kept more than 8 MiB (run_trial's tolerance)" in detail
    assert figures.baseline_summary([{"leaked_bytes": 0, "note": "memory leak: 3 tensors"}], tol)[0] is False


def test_the_self_check_judges_baselines_by_run_trials_own_tolerance():
    from autofit.planning.trials import LEAK_TOLERANCE_BYTES
    assert figures.leak_tolerance("cuda") == LEAK_TOLERANCE_BYTES["cuda"]
    assert figures.leak_tolerance("cpu") == LEAK_TOLERANCE_BYTES["cpu"]
    # the cuBLAS workspaces (2 x 32 MiB on Hopper) are freed by the device's cleanup, so a trial that
    # kept them is a leak, not something tolerated
    assert LEAK_TOLERANCE_BYTES["cuda"] < 32 * 2**20


# ------------------------------------------------------------------ stage 3's judgement, GPU-shaped records

def gpu_run_records():
    recs = [{"type": "run", "effective_batch": 64, "dtype": "bfloat16", "config": {}}]
    for step in range(10):
        if step == 3:
            recs.append({"type": "event", "event": "compile_on", "step": 3})
        if step == 7:
            recs.append({"type": "event", "event": "oom_shrink", "step": 7, "injected": True,
                         "old_micro_batch": 16, "new_micro_batch": 8})
        compiled = step >= 3
        tps = {0: 1e5, 3: 1e3, 7: 2e3}.get(step, 6e5 if compiled else 4e5)
        recs.append({"type": "train", "step": step, "loss": 10.0 - step * 0.1, "tokens_per_s": tps,
                     "step_s": 65536 / tps, "effective_batch": 64, "compiled": compiled, "peak_mem_bytes": 2**34})
    return recs


def test_stage3_checks_and_figures_on_a_gpu_shaped_run(tmp_path):
    st = common.Stage(tmp_path, 3, "train", dry_run=False)
    recs = gpu_run_records()
    trains = stage3_train.judge(st, recs, compile_after=3, oom_at=7, steps=10)
    assert [c["result"] for c in st.rec["checks"]] == ["PASS"] * 6
    cfg = {"n_layer": 12, "n_embd": 768, "block_size": 1024, "vocab_size": 50304}
    hw = {"peak_bf16_tflops": 989.4}
    stage3_train.throughput(st, trains, [r for r in recs if r["type"] == "event"], cfg, "bfloat16", hw, "profile")
    f = st.rec["figures"]
    # steps 0 (warm-up), 3 (compiling) and 7 (the redone step) never count as steady
    assert f["eager_tokens_per_s"] == 4e5 and f["eager_steps_used"] == 2
    assert f["compiled_tokens_per_s"] == 6e5 and f["compiled_steps_used"] == 5
    assert f["compiled_mfu"] == pytest.approx(6e5 * f["flops_per_token"] / 989.4e12)
    assert f["first_compiled_step_minus_steady_s"] == pytest.approx(65536 / 1e3 - 65536 / 6e5)


def test_stage3_fails_a_run_whose_oom_was_not_recovered(tmp_path):
    st = common.Stage(tmp_path, 3, "train", dry_run=False)
    recs = [r for r in gpu_run_records() if not (r["type"] == "train" and r["step"] >= 7) and r.get("event") != "oom_shrink"]
    stage3_train.judge(st, recs, compile_after=3, oom_at=7, steps=10)
    failed = [c["check"] for c in st.rec["checks"] if c["result"] == "FAIL"]
    assert failed == ["all 10 optimizer steps finished", "injected OOM at step 7 recovered"]
    assert st.finish() == 1 and json.loads(st.path.read_text())["status"] == "failed"


# ------------------------------------------------------------------ the report, from GPU-shaped records

def write_gpu_records(out: Path):
    common.write_json(out / "stage0_env.json", {"stage": 0, "status": "ok", "python": "3.12.3", "torch": "2.11.0+cu130",
                                                 "commit": "abc1234", "checks": [], "skipped": [], "seconds": 2})
    card = {"name": "NVIDIA H200", "total_bytes": H200["total_bytes"], "compute_capability": [9, 0],
            "driver": "580.159.04", "cuda_driver_api": "13.0", "torch": "2.11.0+cu130", "cuda_build": "13.0",
            "cudnn": 91002}
    ctx = {"reserved_bytes": 2**21, "nvml_process_bytes": 600 * 2**20, "outside_allocator_bytes": 598 * 2**20,
           "how": "measured: NVML per-process usedGpuMemory minus torch.cuda.memory_reserved"}
    common.write_json(out / "stage1_device.json", {
        "stage": 1, "status": "ok", "started": "2026-12-02T10:00:00+0000", "card": card, "skipped": [],
        "checks": [{"check": "UUID: NVML and torch agree", "result": "PASS", "detail": "x | y"}],
        "outside_allocator": {"context": ctx}, "sdpa_backends": {"CUDNN_ATTENTION": "RuntimeError: NOT_SUPPORTED"}})
    trial = {"micro_batch": 24, "dtype": "bfloat16", "loss_impl": "chunked", "checkpointing": 0, "status": "fit",
             "estimated_peak_bytes": 9 * 2**30, "measured_peak_bytes": 10 * 2**30, "estimate_error": -0.1,
             "measured_reserved_bytes": 10.5 * 2**30, "tokens_per_s": 250000.0, "note": ""}
    common.write_json(out / "stage2_probe.json", {"stage": 2, "status": "ok", "checks": [], "skipped": [],
                                                  "trials": [trial], "estimate_error_max": 0.1, "estimate_error_median": 0.1,
                                                  "estimate_error_n": 1, "plan": {"split": "512 = 24 × 21 + 8"}})
    figs = {"eager_tokens_per_s": 4e5, "compiled_tokens_per_s": 6e5, "eager_mfu": 0.35, "compiled_mfu": 0.52,
            "eager_steps_used": 2, "compiled_steps_used": 5, "flops_per_token": 8.6e8, "flops_formula": "6·N + 12·L·C·T",
            "peak_tflops": 989.4, "dtype": "bfloat16", "peak_source": "hardware profile h200-141gb",
            "first_compiled_step_minus_steady_s": 48.0, "peak_mem_bytes_max": 2**34, "how": "measured: ..."}
    common.write_json(out / "stage3_train.json", {"stage": 3, "status": "failed", "checks": [
        {"check": "injected OOM at step 7 recovered", "result": "FAIL", "detail": "no recovery event"}],
        "skipped": [], "figures": figs})


def test_report_of_a_gpu_run_names_the_card_and_every_figure(tmp_path):
    write_gpu_records(tmp_path)
    text, rc = selfcheck_report.report(tmp_path, [0, 1, 2, 3])
    assert text.startswith("### 2026-12-02: NVIDIA H200 (140.40 GiB, cc 9.0), driver 580.159.04 (CUDA 13.0), "
                           "torch 2.11.0+cu130 (CUDA 13.0, cuDNN 91002)")
    assert "| 1 | UUID: NVML and torch agree | PASS | x \\| y |" in text  # cells escape the pipe
    assert "| context | 598 MiB | 2 MiB | 600 MiB |" in text
    assert "| 24 | bfloat16 | chunked | 0 | fit | 9.00 GiB | 10.00 GiB | -10.0% |" in text
    # no run records in stage 3 here, so no roofline estimate beside the measured tokens/s
    assert "| compiled | 600,000 | - | - | 52.0% | 5 |" in text and "989.4 TFLOP/s dense bfloat16" in text
    assert rc == 1 and "Result: not ok in stage(s) 3." in text


def test_report_says_which_stage_left_no_record(tmp_path):
    write_gpu_records(tmp_path)
    (tmp_path / "stage2_probe.json").unlink()
    text, rc = selfcheck_report.report(tmp_path, [0, 1, 2])
    assert "| 2 | stage probe left a record | FAIL |" in text and rc == 1


def test_a_report_without_stage_0_still_names_the_commit_and_python(tmp_path, monkeypatch):
    # a rerun of some stages (SELFCHECK_STAGES="1 2 3") has no stage 0 record: the H200 run of
    # 2026-12-04 printed "Python ?, commit ?" although the command named SELFCHECK_COMMIT
    write_gpu_records(tmp_path)
    (tmp_path / "stage0_env.json").unlink()
    monkeypatch.setenv("SELFCHECK_COMMIT", "feed123")
    text, _ = selfcheck_report.report(tmp_path, [1, 2, 3], roofline=False)  # on the device, as gpu_selfcheck.sh runs it
    assert f"Python {sys.version.split()[0]}, commit feed123 (SELFCHECK_COMMIT)" in text
    # t10's L1: a report made later from a copy (with the roofline's columns, off the device) does not
    # name this checkout and Python as the run's
    text, _ = selfcheck_report.report(tmp_path, [1, 2, 3])
    assert "Python ? (not recorded), commit ? (not recorded; this checkout is feed123 (SELFCHECK_COMMIT))" in text


# ------------------------------------------------------------------ timing, processes, raw records

def test_the_default_limits_fit_the_call_and_the_lease_and_bad_ones_are_refused(tmp_path):
    plan = common.timing_plan([15, 55, 100, 120, 20])  # the script's defaults
    assert plan["call_ok"] and common.CALL_S - plan["worst_s"] >= 90
    assert plan["lease_ok"] and common.START_S + 2 * plan["worst_s"] <= 900
    assert not common.timing_plan([15, 55, 180, 240, 20])["call_ok"]  # the old limits: no room for a rerun
    res = selfcheck(tmp_path / "out", "--dry-run", SELFCHECK_LIMIT_3="400")
    assert res.returncode == 2 and "do not fit the device call and lease" in res.stdout


def test_no_process_of_a_stage_outlives_it(tmp_path):
    # a stand-in interpreter: stage 1 leaves a child running (as an autofit run writing a checkpoint
    # would); everything else is the real Python
    pidfile = tmp_path / "child.pid"
    fake = tmp_path / "python"
    fake.write_text(f"""#!/bin/bash
if [ "$1" = scripts/selfcheck/stage1_device.py ]; then
  sleep 300 & echo $! > {pidfile}
  exit 0
fi
exec {sys.executable} "$@"
""")
    fake.chmod(0o755)
    res = selfcheck(tmp_path / "out", "--dry-run", SELFCHECK_STAGES="1", SELFCHECK_PYTHON=str(fake))
    pid = int(pidfile.read_text())
    alive = True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        alive = False
    if alive:  # a zombie not yet reaped by init counts as gone
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] if Path(f"/proc/{pid}").exists() else "X"
        alive = state not in ("Z", "X")
    assert not alive, res.stdout
    assert (tmp_path / "out" / "report.md").exists()  # written after the stage, as after every stage


def test_a_stage_cut_short_keeps_the_raw_records_it_had(tmp_path, monkeypatch):
    metrics = tmp_path / "metrics.jsonl"
    fake = tmp_path / "python"  # a run that logs two steps, then hangs until stopped
    fake.write_text(f"#!/bin/bash\ntrap 'exit 143' TERM\n"
                    f"echo '{{\"type\": \"run\"}}' >> {metrics}\n"
                    f"echo '{{\"type\": \"train\", \"step\": 0}}' >> {metrics}\n"
                    f"echo '{{\"type\": \"train\", \"step\": 1}}' >> {metrics}\n"
                    "for i in $(seq 300); do sleep 0.1; done\n")
    fake.chmod(0o755)
    monkeypatch.setattr(common.sys, "executable", str(fake))
    monkeypatch.setattr(common, "FOLLOW_S", 0.2)
    st = common.Stage(tmp_path, 3, "train", dry_run=True)
    res = common.run_cli(["run"], timeout=2, follow=common.follow_jsonl(st, metrics, "raw_metrics"))
    assert res["timed_out"]
    saved = json.loads(st.path.read_text())["raw_metrics"]
    assert [r.get("step") for r in saved] == [None, 0, 1]


# ------------------------------------------------------------------ stage 1: driver, SDPA default, allocator

def test_the_driver_api_version_is_asked_of_libcuda():
    import ctypes

    class Lib:
        def cuDriverGetVersion(self, ref):
            ctypes.cast(ref, ctypes.POINTER(ctypes.c_int))[0] = 13000
            return 0
    assert stage1_device.driver_api_version(lambda name: Lib()) == (13000, "libcuda.so.1 cuDriverGetVersion (ctypes)")

    def missing(name):
        raise OSError(f"{name}: cannot open shared object file")
    v, how = stage1_device.driver_api_version(missing)
    assert v is None and "not loadable" in how
    rows = {n: ok for n, ok, _ in stage1_device.compare_identity(H200, SYSTEM, {**TORCH, "cuda_driver_api": 13000})}
    assert rows["CUDA driver API version: NVML and libcuda agree"] is True


def fake_sdpa_torch(choice: int, snapshot=None):
    backends = types.SimpleNamespace(cudnn=types.SimpleNamespace(version=lambda: 91500))
    cuda = types.SimpleNamespace(memory_snapshot=lambda: snapshot or [])
    return types.SimpleNamespace(_fused_sdp_choice=lambda q, k, v, is_causal: choice, backends=backends, cuda=cuda,
                                 _C=types.SimpleNamespace())


def test_a_failing_default_sdpa_backend_gives_stages_2_and_3_a_fallback(tmp_path):
    from torch.nn.attention import SDPBackend
    st = common.Stage(tmp_path, 1, "device", dry_run=False)
    tried = {"FLASH_ATTENTION": "ran", "EFFICIENT_ATTENTION": "ran", "CUDNN_ATTENTION": "RuntimeError: NOT_SUPPORTED"}
    stage1_device.sdpa_default(st, fake_sdpa_torch(int(SDPBackend.CUDNN_ATTENTION)), None, None, None, tried)
    assert st.rec["sdpa_default"] == "CUDNN_ATTENTION" and st.rec["checks"][-1]["result"] == "FAIL"
    assert st.rec["env_for_later_stages"] == {"TORCH_CUDNN_SDPA_DEPRIORITIZED": "1"}
    assert common.stage_env(st.path) == "export TORCH_CUDNN_SDPA_DEPRIORITIZED=1\n"
    (tmp_path / "b").mkdir()
    ok = common.Stage(tmp_path / "b", 1, "device", dry_run=False)
    stage1_device.sdpa_default(ok, fake_sdpa_torch(int(SDPBackend.FLASH_ATTENTION)), None, None, None, tried)
    assert ok.rec["checks"][-1]["result"] == "PASS" and "env_for_later_stages" not in ok.rec
    assert common.stage_env(ok.path) == ""


def test_stage_env_exports_only_known_names(tmp_path):
    common.write_json(tmp_path / "s.json", {"env_for_later_stages": {"LD_PRELOAD": "/x.so", "TORCH_CUDNN_SDPA_DEPRIORITIZED": "1; rm -rf /"}})
    assert common.stage_env(tmp_path / "s.json") == "export TORCH_CUDNN_SDPA_DEPRIORITIZED='1; rm -rf /'\n"


def test_expandable_segments_are_checked_on_the_allocator_itself(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTORCH_ALLOC_CONF", "expandable_segments:True")
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    st = common.Stage(tmp_path, 1, "device", dry_run=False)
    stage1_device.allocator_checks(st, fake_sdpa_torch(0, snapshot=[{"is_expandable": True}]))
    assert st.rec["checks"][-1]["result"] == "PASS" and st.rec["allocator"]["expandable"] is True
    stage1_device.allocator_checks(st, fake_sdpa_torch(0, snapshot=[{"is_expandable": False}]))
    assert st.rec["checks"][-1]["result"] == "FAIL"  # the setting was ignored: the plan's assumptions are off


def test_the_cuda_cleanup_frees_cublas_workspaces(monkeypatch):
    import torch

    from trainer.meter import CudaMeter
    calls = []
    monkeypatch.setattr(torch._C, "_cuda_clearCublasWorkspaces", lambda: calls.append("workspaces"), raising=False)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty_cache"))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda d=None: calls.append("reset"))
    CudaMeter(torch.device("cuda", 0)).cleanup()
    assert calls == ["workspaces", "empty_cache", "reset"]  # freed before the cache is emptied


def test_a_probe_cut_short_keeps_the_trial_lines_it_printed(tmp_path, monkeypatch):
    fake = tmp_path / "python"  # the probe's own lines, then a hang inside the next trial
    fake.write_text("#!/bin/bash\ntrap 'exit 143' TERM\necho 'probing on X'\n"
                    "echo 'trial: micro-batch 8, bfloat16, compile=False (estimated peak 9.1 GiB)' >&2\n"
                    "echo '  -> fit, measured peak 9.3 GiB' >&2\necho 'trial: micro-batch 16' >&2\n"
                    "for i in $(seq 300); do sleep 0.1; done\n")
    fake.chmod(0o755)
    monkeypatch.setattr(common.sys, "executable", str(fake))
    monkeypatch.setattr(common, "FOLLOW_S", 0.2)
    st = common.Stage(tmp_path, 2, "probe", dry_run=False)
    res = common.run_cli(["run"], timeout=2, follow=common.both(
        common.follow_jsonl(st, tmp_path / "none.jsonl", "raw_metrics"),
        common.follow_lines(st, "raw_trial_lines", ("trial:", "  -> "))))
    assert res["timed_out"]
    assert json.loads(st.path.read_text())["raw_trial_lines"] == [
        "trial: micro-batch 8, bfloat16, compile=False (estimated peak 9.1 GiB)", "  -> fit, measured peak 9.3 GiB",
        "trial: micro-batch 16"]


# A sitecustomize for the probe's interpreter: once the probe has finished STOP_AFTER trials, it
# writes MARKER and hangs inside the next one, as a trial that outlasts its stage's limit does.
# It only holds the probe; it writes no record (that is the code under test's job).
HANG_AFTER_TRIALS = """
import importlib.abc, importlib.util, os, sys, time


class _Hook(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "autofit.planning.search":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        real_exec = spec.loader.exec_module

        def exec_module(module):
            real_exec(module)
            real_run = module.TrialRunner.run

            def run(self, cand):
                if len(self.trials) >= int(os.environ["STOP_AFTER"]):
                    open(os.environ["MARKER"], "w").close()
                    while True:
                        time.sleep(1)
                return real_run(self, cand)
            module.TrialRunner.run = run
        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _Hook())
"""


def test_a_probe_stage_killed_mid_way_leaves_each_finished_trials_record_and_the_report_shows_them(tmp_path):
    import signal
    import time
    import typing

    from autofit.records import TrialStatus
    STATUSES = typing.get_args(TrialStatus)
    inject, out, work, marker = tmp_path / "inject", tmp_path / "out", tmp_path / "work", tmp_path / "hung"
    for d in (inject, out, work):
        d.mkdir()
    (inject / "sitecustomize.py").write_text(HANG_AFTER_TRIALS)
    env = {**os.environ, "PYTHONPATH": f"{inject}:{REPO}", "AUTOFIT_HOME": str(work / "home"), "STOP_AFTER": "2",
           "MARKER": str(marker)}
    # the stage as gpu_selfcheck.sh runs it: in a process group of its own, which its limit ends
    # with SIGTERM and, 3 s later, SIGKILL (here sent once the probe hangs: no clock decides it)
    stage = subprocess.Popen([sys.executable, "scripts/selfcheck/stage2_probe.py", str(out), str(work), "--dry-run",
                              "--limit", "600"], cwd=REPO, env=env, start_new_session=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for _ in range(2400):  # the probe's 2 trials on a loaded CPU; the wait ends as soon as it hangs
            if marker.exists() or stage.poll() is not None:
                break
            time.sleep(0.25)
        assert marker.exists(), stage.communicate(timeout=60)[0][-3000:]
        os.killpg(stage.pid, signal.SIGTERM)
        time.sleep(3)  # timeout's --kill-after grace
    finally:
        try:
            os.killpg(stage.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        stage.communicate(timeout=60)
    common.mark_timed_out(out / "stage2_probe.json", 600)

    records = [json.loads(line) for line in (out / "stage2_trials.jsonl").read_text().splitlines()]
    # every finished trial, whole, though the probe never saved its profile (and the planner's pruned
    # records beside them: the chunked loss is not searched where the standard loss holds the batch)
    assert len([r for r in records if r["status"] != "pruned"]) == 2, records
    for r in records:
        assert r["type"] == "trial" and r["status"] in STATUSES
        assert {"estimated_peak_bytes", "measured_peak_bytes", "measured_reserved_bytes", "leaked_bytes",
                "tokens_per_s", "note"} <= set(r)
    measured = [r for r in records if r["measured_peak_bytes"]]
    assert measured and all(r["leaked_bytes"] is not None for r in measured)
    rec = json.loads((out / "stage2_probe.json").read_text())
    assert rec["status"] == "timed_out" and "trials" not in rec  # the stage never got to read a profile

    text, rc = selfcheck_report.report(out, [2])
    assert rc == 1 and "read from stage2_trials.jsonl, the trials that finished before the stage was stopped" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and line.split("|")[5].strip() in STATUSES]
    assert [int(row.split("|")[1]) for row in rows] == [r["micro_batch"] for r in records]
    for row, r in zip(rows, records):
        assert row.split("|")[5].strip() == r["status"]
        assert row.split("|")[7].strip() == selfcheck_report.gib(r["measured_peak_bytes"])
        assert row.split("|")[15].strip() == selfcheck_report.mib(r["leaked_bytes"], ".1f")


def test_stage1s_pytest_keeps_each_failures_whole_message_in_its_tail(tmp_path):
    """Three failing tests with long messages (as the cuda-marked op counts give): stage 1's pytest
    arguments leave each message whole within the tail its record keeps (full tracebacks pushed
    them out, and -ra's summary cut them to 80 columns)."""
    msg = "gqa: 512 ops dispatched on this device, launches.py counts 498; ops: " + ", ".join(
        f"op{i} {i}" for i in range(40))
    (tmp_path / "test_x.py").write_text("import pytest\n"
                                        "@pytest.mark.parametrize('i', range(3))\n"
                                        "def test_count(i):\n" + "".join(f"    x{j} = {j}\n" for j in range(12))
                                        + f"    assert x0 == x1, {msg!r}\n")
    proc = subprocess.run([sys.executable, "-m", "pytest", *stage1_device.PYTEST_ARGS, str(tmp_path)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=60)
    kept = common.tail(proc.stdout + proc.stderr, stage1_device.TESTS_TAIL)
    assert kept.count(msg) >= 3
    assert stage1_device.parse_pytest_summary(proc.stdout) == {"failed": 3}


def test_a_stage_killed_mid_write_leaves_no_ninth_file_in_out(tmp_path):
    """write_json's temp file, left by a stage killed before its rename, is gone once the stage is
    marked timed out: the device tool brings back 8 files, and OUT's own 8 must all be among them."""
    st = common.Stage(tmp_path, 2, "probe", False)
    st.set(trials=[1, 2])
    (tmp_path / "stage2_probe.json.tmp4242").write_text('{"half": ')
    (tmp_path / "stage2_trials.jsonl").write_text("{}\n")  # another file's name: kept
    common.mark_timed_out(st.path, 100)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stage2_probe.json", "stage2_trials.jsonl"]
    rec = common.read_json(st.path)
    assert rec["status"] == "timed_out" and rec["trials"] == [1, 2]
