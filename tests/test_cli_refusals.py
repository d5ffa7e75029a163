"""Flag combinations and values the `autofit` command refuses in one line before any work, and the
commands it suggests: what a new user hit on main (issue 11's leftovers)."""
import os

import pytest

from cli_run import cli

SMALL = ["--set", "n_layer=1", "--set", "n_embd=32", "--set", "n_head=2", "--set", "block_size=32",
         "--set", "batch_size=8", "--set", "gradient_accumulation_steps=2", "--set", "eval_iters=1",
         "--set", "eval_interval=100", "--set", "log_interval=1"]
CPU = ["--device", "cpu", "--budget", "64MiB"]


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOFIT_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)


@pytest.mark.parametrize("command", [["config"], ["probe", *CPU], ["run", *CPU, "--out", "o"]])
def test_preset_and_config_together_are_refused(tmp_path, monkeypatch, capsys, command):
    (tmp_path / "c.toml").write_text("n_layer = 1\n")
    code, out, err = cli(monkeypatch, capsys, *command, "--preset", "tiny", "--config", "c.toml")
    assert code == 2 and len(err.strip().splitlines()) == 1 and out == ""
    assert "--preset and --config both name a model; pick one" in err
    assert "trial:" not in err and not (tmp_path / "o").exists()


def test_preset_alone_and_config_alone_still_load(tmp_path, monkeypatch, capsys):
    import json
    (tmp_path / "c.toml").write_text("n_layer = 1\n")
    code, out, _ = cli(monkeypatch, capsys, "config", "--config", "c.toml", "--json")
    assert code == 0 and json.loads(out)["n_layer"] == 1
    code, out, _ = cli(monkeypatch, capsys, "config", "--preset", "tiny", "--set", "n_layer=2", "--json")
    assert code == 0 and json.loads(out)["n_layer"] == 2


@pytest.mark.parametrize("args, words", [
    (["--max-steps", "0"], "--max-steps 0 is not beyond it"),
    (["--max-steps", "0", "--no-probe"], "--max-steps 0 is not beyond it"),
    (["--set", "max_iters=0"], "max_iters 0 is not beyond it"),
    (["--set", "max_iters=0", "--max-steps", "5"], "max_iters 0 is not beyond it"),
])
def test_a_fresh_run_with_nothing_to_train_is_one_line_before_the_probe(tmp_path, monkeypatch, capsys, args, words):
    code, out, err = cli(monkeypatch, capsys, "run", *CPU, *SMALL, *args,
                         "--out", "o", "--no-progress")
    assert code == 2 and len(err.strip().splitlines()) == 1 and words in err, err
    assert "nothing to train: a new run starts at step 0" in err
    assert "trial:" not in err and not (tmp_path / "o").exists()  # no probe ran, nothing was written


def test_eval_only_still_runs_with_max_steps_0(tmp_path, monkeypatch, capsys):
    code, out, err = cli(monkeypatch, capsys, "run", "--device", "cpu", *SMALL, "--set", "eval_only=True",
                         "--max-steps", "0", "--out", "o", "--no-progress")
    assert code == 0 and "evaluated (eval_only) at step 0" in out, err


@pytest.mark.parametrize("args, words", [
    (["probe", "--device", "cpu", "--gpu-index", "1"], "--gpu-index 1 picks a GPU, and this run is on the CPU (--device cpu)"),
    (["probe", "--budget", "64MiB", "--gpu-index", "0"], "this run is on the CPU (--budget)"),
    (["probe", "--gpu", "rtx4070-12gb", "--gpu-index", "1"], "--gpu-index"),
    (["run", "--device", "cpu", "--gpu-index", "1", "--no-probe", "--out", "o"], "this run is on the CPU (--device cpu)"),
    (["run", "--device", "cpu", "--gpu-index", "1", "--out", "o"], "this run is on the CPU (--device cpu)"),
    (["run", "--nproc-per-node", "2", "--gpu-index", "1", "--out", "o"], "each rank takes the GPU of its LOCAL_RANK"),
])
def test_gpu_index_on_the_cpu_is_refused(tmp_path, monkeypatch, capsys, args, words):
    code, out, err = cli(monkeypatch, capsys, *args, *SMALL, "--no-progress" if args[0] == "run" else "--json")
    assert code == 2 and len(err.strip().splitlines()) == 1 and words in err, err
    assert "trial:" not in err and not (tmp_path / "o" / "ckpt.pt").exists()


def test_gpu_index_without_a_gpu_is_refused_not_ignored(tmp_path, monkeypatch, capsys):
    from autofit.devices.device import DeviceError
    import autofit.devices.cuda

    def no_gpu(index):
        raise DeviceError("NVML found no GPU")
    monkeypatch.setattr(autofit.devices.cuda, "detect_gpu", no_gpu)  # a machine without a GPU, even where one is
    code, _, err = cli(monkeypatch, capsys, "probe", "--gpu-index", "1", *SMALL, "--json")
    assert code == 2 and "--gpu-index 1: no such GPU (NVML found no GPU)" in err and "trial:" not in err
    code, _, err = cli(monkeypatch, capsys, "probe", "--budget", "64MiB", *SMALL, "--json")
    assert code == 0, err  # no --gpu-index: the budgeted CPU, as before


def test_gpu_index_with_a_cpu_checkpoint_is_refused(tmp_path, monkeypatch, capsys):
    code, _, err = cli(monkeypatch, capsys, "run", "--no-probe", *CPU, *SMALL, "--max-steps", "1", "--out", "o",
                       "--no-progress")
    assert code == 0, err
    code, _, err = cli(monkeypatch, capsys, "run", "--resume", "--out", "o", "--gpu-index", "1", "--set", "max_iters=3",
                       "--no-progress")
    assert code == 2 and "this run is on the CPU (the checkpoint's device" in err, err


def _suggested(out: str) -> list[str]:
    """The argv of the command a probe suggests (the line after 'next:' or 'train with:')."""
    import shlex
    lines = [line.strip() for line in out.splitlines() if line.strip().startswith("autofit run ")]
    assert len(lines) == 1, out
    return shlex.split(lines[0])


def _run_params(argv: list[str]) -> dict:
    """What `autofit run` parses from `argv` (['autofit', 'run', ...]), without running it."""
    import typer.main

    from autofit.cli.app import app
    assert argv[:2] == ["autofit", "run"]
    return typer.main.get_command(app).commands["run"].make_context("run", argv[2:]).params


def test_estimate_suggests_a_command_that_reproduces_the_probe(tmp_path, monkeypatch, capsys):
    from autofit.cli.common import load_train_config
    folder = tmp_path / "my configs [v2]"
    folder.mkdir()
    (folder / "c.toml").write_text("n_layer = 2\nn_embd = 64\nn_head = 2\nblock_size = 64\n")
    path = str(folder / "c.toml")
    sets = ["--set", "batch_size=4", "--set", "wandb_run_name=a b'c"]
    levers = ["--dtype", "float32,bfloat16", "--loss", "chunked", "--checkpointing", "0,1", "--no-compile",
              "--margin", "0.2", "--checkpointing-policy", "selective"]
    code, out, err = cli(monkeypatch, capsys, "probe", "--gpu", "rtx4070-12gb", "--config", path, *sets, *levers)
    assert code == 0, err
    argv = _suggested(out)
    params = _run_params(argv)
    assert params["profile"] == "rtx4070-12gb" and params["config"] == folder / "c.toml"
    assert load_train_config(params["config"], params["preset"], params["overrides"]) == \
        load_train_config(folder / "c.toml", None, ["batch_size=4", "wandb_run_name=a b'c"])
    assert (params["dtype"], params["loss"], params["checkpointing"], params["compile"], params["margin"]) == \
        ("float32,bfloat16", "chunked", "0,1", False, 0.2)
    assert params["checkpointing_policy"] == "selective"


def test_saved_plan_is_found_by_the_suggested_command(tmp_path, monkeypatch, capsys):
    code, out, err = cli(monkeypatch, capsys, "probe", *CPU, *SMALL, "--checkpointing", "0", "--loss", "standard",
                         "--save")
    assert code == 0, err
    argv = _suggested(out)
    assert "--set" in argv and "--loss" in argv  # the probed config and levers, not the default preset
    code, out, err = cli(monkeypatch, capsys, *argv[1:], "--max-steps", "1", "--out", "o", "--no-progress")
    assert code == 0, err
    assert "no probe needed" in out and "trial:" not in err  # the same fingerprint: the saved plan is used


def test_the_suggested_command_keeps_the_measured_gpu():
    from autofit.cli.common import _rerun_args
    assert _rerun_args(None, "tiny", [], None, None, None, None, 0.1, 1) == ["--preset", "tiny", "--gpu-index", "1"]
    assert _rerun_args(None, None, ["a=1"], None, True, None, None, 0.1) == ["--set", "a=1", "--compile"]


@pytest.mark.parametrize("command", [["probe", *CPU], ["run", *CPU, "--out", "o"]])
def test_an_unknown_dtype_is_refused_before_the_probe_says_anything(tmp_path, monkeypatch, capsys, command):
    """It came after the 'probing on ...' banner, as if the probe had started (a user's report)."""
    code, out, err = cli(monkeypatch, capsys, *command, *SMALL, "--dtype", "bf16")
    assert code == 2 and len(err.strip().splitlines()) == 1 and out == "", err
    assert "--dtype: unknown dtype 'bf16'" in err and "probing on" not in err
    assert not (tmp_path / "o" / "ckpt.pt").exists() and not (tmp_path / "o" / "metrics.jsonl").exists()


def test_a_run_that_ends_inside_its_warm_up_says_so(tmp_path, monkeypatch, capsys):
    """max_iters 5 with a 100-step warm-up trains at under 6 % of learning_rate: said before the
    run, not refused (nanoGPT runs it too); a warm-up that ends in time says nothing."""
    code, out, err = cli(monkeypatch, capsys, "run", *CPU, *SMALL, "--no-probe", "--no-progress", "--set",
                         "max_iters=5", "--set", "warmup_iters=100", "--out", "o")
    assert code == 0, err
    # on stdout, with the plan: stderr stays for what went wrong (one line when something does)
    assert "note: the run's last step is 4, inside its 100-step learning-rate warm-up: the rate reaches 5.0% " \
           "of learning_rate" in out and "warm-up" not in err
    import json
    last = [json.loads(line) for line in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()
            if '"train"' in line][-1]
    first = json.loads((tmp_path / "o" / "metrics.jsonl").read_text().splitlines()[0])
    assert last["step"] == 4 and f"{last['lr'] / first['config']['learning_rate']:.1%}" == "5.0%"  # the step said
    code, out, err = cli(monkeypatch, capsys, "run", *CPU, *SMALL, "--no-probe", "--no-progress", "--set",
                         "max_iters=5", "--set", "warmup_iters=2", "--out", "o2")
    assert code == 0 and "warm-up" not in out + err, err


# ------------------------------------------------------------------------------- the config's device


@pytest.mark.parametrize("device", [["--device", "cpu"], ["--set", "device=cpu"]])
def test_a_gpu_profile_with_a_cpu_device_is_one_line(tmp_path, monkeypatch, capsys, device):
    """--device (or the config's device) and --profile name different kinds of device: refused,
    not one of them silently ignored."""
    code, out, err = cli(monkeypatch, capsys, "run", "--profile", "rtx4070-12gb", *device, "--out", "o")
    assert code == 2 and "profile rtx4070-12gb is for a GPU, and this run asks for device 'cpu'" in err, err
    assert not (tmp_path / "o").exists()


def test_the_configs_device_is_the_probes_device(tmp_path, monkeypatch, capsys):
    """A config that says device='cuda' is not probed on the CPU: on a machine without a GPU it
    stops in one line, which says where the device came from."""
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the config's cuda is there")
    code, out, err = cli(monkeypatch, capsys, "probe", *SMALL, "--set", "device=cuda")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "trial:" not in err
    assert "no NVIDIA GPU found" in err and "(device 'cuda' from the config; --device to choose another)" in err


def test_a_device_flag_beats_the_configs_device(monkeypatch):
    from types import SimpleNamespace
    from autofit.cli.common import device_from_config
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cfg = SimpleNamespace(device="cuda:1")
    kind, index, source = device_from_config(cfg, None, None, None)
    assert (kind, index) == ("cuda", 1) and "from the config" in source
    assert device_from_config(cfg, "cpu", None, None) == ("cpu", None, None)  # --device
    assert device_from_config(cfg, "cuda:2", None, None) == ("cuda", 2, None)  # --device cuda:N
    assert device_from_config(cfg, None, "64MiB", None) == (None, None, None)  # --budget: the budgeted CPU
    assert device_from_config(cfg, None, None, 0) == (None, 0, None)  # --gpu-index
    assert device_from_config(cfg, None, None, None, several=True)[:2] == ("cuda", None)  # each rank its LOCAL_RANK
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert device_from_config(cfg, None, None, None)[:2] == ("cuda", None)
    assert device_from_config(SimpleNamespace(device="auto"), None, None, None) == (None, None, None)



# ------------------------------------------------------------------------------- flags a run would ignore


@pytest.mark.parametrize("flags, named", [(["--dtype", "bfloat16"], "--dtype"), (["--loss", "chunked"], "--loss"),
                                          (["--checkpointing", "1", "--compile"], "--compile/--no-compile"),
                                          (["--margin", "0.2"], "--margin")])
def test_search_flags_with_no_probe_are_one_line(tmp_path, monkeypatch, capsys, flags, named):
    """--no-probe trains the config as written: a probe's search flag would be silently ignored."""
    code, out, err = cli(monkeypatch, capsys, "run", "--no-probe", *CPU, *SMALL, *flags, "--out", "o")
    assert code == 2 and len(err.strip().splitlines()) == 1 and named in err and "--set" in err, err
    assert not (tmp_path / "o").exists()


def test_search_flags_with_the_resume_of_an_autofit_run_are_one_line(tmp_path, monkeypatch, capsys):
    code, _, err = cli(monkeypatch, capsys, "run", "--no-probe", *CPU, *SMALL, "--max-steps", "1", "--out", "o",
                       "--no-progress")
    assert code == 0, err
    before = (tmp_path / "o" / "ckpt.pt").read_bytes()
    code, _, err = cli(monkeypatch, capsys, "run", "--resume", "--out", "o", "--loss", "chunked", "--set", "max_iters=3",
                       "--no-progress")
    assert code == 2 and "--loss with --resume: the run goes on with its own plan" in err, err
    assert (tmp_path / "o" / "ckpt.pt").read_bytes() == before


def test_another_device_or_budget_with_the_resume_of_an_autofit_run_is_one_line(tmp_path, monkeypatch, capsys):
    """t4 (session 13): `run --resume --budget 1MiB` said the checkpoint's budget was used and
    trained on under it: a flag that would be ignored is refused, as --dtype is, before any work.
    The checkpoint's own device and budget again change nothing: accepted."""
    code, _, err = cli(monkeypatch, capsys, "run", "--no-probe", *CPU, *SMALL, "--max-steps", "1", "--out", "o",
                       "--no-progress")
    assert code == 0, err
    before = (tmp_path / "o" / "ckpt.pt").read_bytes()
    metrics = (tmp_path / "o" / "metrics.jsonl").read_text()
    for flags, named in ((["--budget", "1MiB"], "--budget 1.0 MiB with --resume"),
                         (["--device", "cuda"], "--device cuda with --resume"),
                         (["--device", "cuda", "--budget", "1MiB"], "--device cuda and --budget 1.0 MiB with --resume")):
        code, _, err = cli(monkeypatch, capsys, "run", "--resume", "--out", "o", *flags, "--set", "max_iters=3",
                           "--no-progress")
        assert code == 2 and len(err.strip().splitlines()) == 1 and named in err, err
        assert "the device it trained on (cpu-budgeted, budget 64.0 MiB)" in err and "another --out" in err, err
        assert (tmp_path / "o" / "ckpt.pt").read_bytes() == before
        assert (tmp_path / "o" / "metrics.jsonl").read_text() == metrics
    code, _, err = cli(monkeypatch, capsys, "run", "--resume", "--out", "o", *CPU, "--set", "max_iters=2",
                       "--no-progress")
    assert code == 0 and "resuming" in err and "--budget" not in err, err


def test_no_smaller_micro_batch_left_on_the_budgeted_cpu_advises_a_resume_that_works(tmp_path, monkeypatch, capsys):
    """t11's M4 (session 17): the stop said '--resume continues from it (with more memory)', and
    the resume refused any other --budget, so nothing could give it more. Now the line names a
    larger --budget, and the resume takes one (a smaller one stays refused: a re-fit is a probe)."""
    monkeypatch.setenv("AUTOFIT_FAULT_OOM_AT_STEP", "1")
    code, _, err = cli(monkeypatch, capsys, "run", "--no-probe", *CPU, *SMALL, "--set", "batch_size=1",
                       "--set", "gradient_accumulation_steps=2", "--max-steps", "3", "--out", "o", "--no-progress")
    assert code == 2 and "no smaller micro-batch is left to try" in err, err
    assert "holds step 1: --resume with a --budget above 64.0 MiB continues from it with more memory" in err, err
    monkeypatch.delenv("AUTOFIT_FAULT_OOM_AT_STEP")
    before = (tmp_path / "o" / "ckpt.pt").read_bytes()
    code, _, err = cli(monkeypatch, capsys, "run", "--resume", "--out", "o", "--budget", "32MiB", "--no-progress")
    assert code == 2 and "--budget 32.0 MiB with --resume" in err and "a larger --budget is taken" in err, err
    assert (tmp_path / "o" / "ckpt.pt").read_bytes() == before
    code, out, err = cli(monkeypatch, capsys, "run", "--resume", "--out", "o", "--budget", "128MiB", "--max-steps", "3",
                         "--no-progress")
    assert code == 0, err
    assert "--resume with --budget 128.0 MiB: the run goes on under it (it trained under 64.0 MiB)" in err, err
    import torch
    ck = torch.load(tmp_path / "o" / "ckpt.pt", weights_only=True)
    assert ck["iter_num"] == 3 and ck["device"]["budget_bytes"] == 128 * 2**20 and max(ck["micro_batches"]) == 1
    # its next resume goes on under the budget it last ran under
    code, _, err = cli(monkeypatch, capsys, "run", "--resume", "--out", "o", "--budget", "64MiB", "--set", "max_iters=5",
                       "--no-progress")
    assert code == 2 and "cpu-budgeted, budget 128.0 MiB" in err, err


def test_a_resume_on_ranks_that_cannot_share_its_batch_is_refused_before_they_start(tmp_path, monkeypatch, capsys):
    """t11's L4 (session 17): an effective batch of 15 resumed on 2 ranks was refused by rank 0
    after torchrun had started both (3 lines); a fresh run is refused in the launcher. Now the
    resume is too, on the checkpoint's config with its --set values: the suggested --set with
    --allow-changes goes through to the launch."""
    from autofit.launch import launcher
    launched = []
    # ckpt: the folder's checkpoint, which the launcher names where the ranks stop without a word (t12's L6)
    monkeypatch.setattr(launcher, "relaunch", lambda argv, n, log, ckpt: launched.append((n, ckpt)) or 0)
    code, _, err = cli(monkeypatch, capsys, "run", "--no-probe", *CPU, *SMALL, "--set", "batch_size=5",
                       "--set", "gradient_accumulation_steps=3", "--max-steps", "1", "--out", "o", "--no-progress")
    assert code == 0, err
    code, _, err = cli(monkeypatch, capsys, "run", "--resume", "--out", "o", "--nproc-per-node", "2", "--max-steps", "2",
                       "--no-progress")
    assert code == 2 and len(err.strip().splitlines()) == 1 and not launched, err
    assert "the effective batch of 15 sequences (batch_size x gradient_accumulation_steps) does not divide among 2 " \
           "ranks; the nearest that do are 14 or 16" in err and "--allow-changes" in err and "rank 0" not in err, err
    code, _, err = cli(monkeypatch, capsys, "run", "--resume", "--out", "o", "--nproc-per-node", "2", "--max-steps", "2",
                       "--set", "batch_size=8", "--set", "gradient_accumulation_steps=2", "--no-progress")
    assert code == 2 and "--allow-changes" in err and not launched, err  # a change of what it trains: refused here too
    code, _, err = cli(monkeypatch, capsys, "run", "--resume", "--out", "o", "--nproc-per-node", "2", "--max-steps", "2",
                       "--set", "batch_size=8", "--set", "gradient_accumulation_steps=2", "--allow-changes",
                       "--no-progress")
    from pathlib import Path
    assert launched == [(2, Path("o") / "ckpt.pt")], err


def test_a_repeated_value_in_a_lever_list_is_searched_once(monkeypatch, capsys):
    import json
    code, once, _ = cli(monkeypatch, capsys, "probe", "--gpu", "rtx4070-12gb", "--loss", "chunked",
                        "--dtype", "bfloat16", "--json")
    code2, twice, _ = cli(monkeypatch, capsys, "probe", "--gpu", "rtx4070-12gb", "--loss", "chunked,chunked",
                          "--dtype", "bfloat16,bfloat16", "--json")
    assert code == code2 == 0
    assert json.loads(twice)["trials"] == json.loads(once)["trials"]


@pytest.mark.parametrize("args, words", [
    (["--allow-changes"], "--allow-changes goes with --resume"),
    (["--out", "o", "--set", "out_dir=elsewhere"], "--out and --set out_dir name two folders"),
])
def test_flags_a_run_would_ignore_are_one_line(tmp_path, monkeypatch, capsys, args, words):
    code, _, err = cli(monkeypatch, capsys, "run", *CPU, *SMALL, *args)
    assert code == 2 and len(err.strip().splitlines()) == 1 and words in err, err
    assert not (tmp_path / "o").exists() and not (tmp_path / "elsewhere").exists()


def test_a_model_that_does_not_fit_without_a_probe_is_one_line(tmp_path, monkeypatch, capsys):
    """--no-probe on a budget the model alone exceeds: one line, not a traceback from inside the
    model's constructor."""
    code, _, err = cli(monkeypatch, capsys, "run", "--no-probe", "--device", "cpu", "--budget", "64KiB", *SMALL,
                       "--max-steps", "1", "--out", "o", "--no-progress")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "out of memory making the model on cpu, before any step" in err and "Traceback" not in err


def test_the_compile_notice_is_said_once(tmp_path, monkeypatch, capsys):
    code, out, err = cli(monkeypatch, capsys, "run", "--no-probe", *CPU, *SMALL, "--set", "compile=True",
                         "--max-steps", "1", "--out", "o", "--no-progress")
    assert code == 0, err
    assert (out + err).count("torch.compile cannot run under the budgeted CPU device") == 1


@pytest.mark.parametrize("flag", [["--preset", "tiny"], ["--profile", "rtx4070-12gb"]])
def test_init_from_resume_refuses_a_preset_or_profile_as_resume_does(tmp_path, monkeypatch, capsys, flag):
    """`--resume` refused them; nanoGPT's init_from='resume', which README calls the same, dropped a
    --preset's whole config without a word."""
    code, out, err = cli(monkeypatch, capsys, "run", *flag, "--set", "init_from=resume", "--out", "o",
                         "--no-progress")
    assert code == 2 and len(err.strip().splitlines()) == 1 and out == "", err
    assert f"init_from = 'resume' continues the checkpoint's own config and plan: drop {flag[0]}" in err


def test_a_refused_run_leaves_no_output_folder_it_made(tmp_path, monkeypatch, capsys):
    """The refusal was one line, but o/ was made and left holding .autofit.lock."""
    from filelock import FileLock
    real, held_at_release = FileLock.release, []

    def release(self, *a, **k):  # the folder is removed while the lock is still held (r3, session 14)
        held_at_release.append(os.path.exists(self.lock_file))
        return real(self, *a, **k)
    monkeypatch.setattr(FileLock, "release", release)
    code, out, err = cli(monkeypatch, capsys, "run", *CPU, *SMALL, "--set", "dataset=nope", "--out", "o")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists() and held_at_release and not any(held_at_release), held_at_release
    (tmp_path / "kept").mkdir()  # a folder that was there before stays, lock and all
    code, out, err = cli(monkeypatch, capsys, "run", *CPU, *SMALL, "--set", "dataset=nope", "--out", "kept")
    assert code == 2 and (tmp_path / "kept").is_dir()


def test_a_ctrl_c_after_probe_save_says_what_is_on_disk(tmp_path, monkeypatch, capsys):
    """A Ctrl-C while the plot is drawn, after --save wrote the profile: the line said 'nothing was
    saved' (the probe's phase line), though the profile held the new plan."""
    import autofit.report.plot as plot

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(plot, "plot_probe", interrupted)
    monkeypatch.setattr(plot, "check_plot_target", lambda path: None)  # matplotlib need not be installed
    code, _, err = cli(monkeypatch, capsys, "probe", *CPU, *SMALL, "--checkpointing", "0", "--loss", "standard",
                       "--save", "--plot", "x.png")
    assert code == 130, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("autofit: interrupted before the plan was shown; the plan is saved in profile cpu-"), last
    assert "nothing was saved" not in err


def test_a_gpu_profile_without_the_card_suggests_an_estimate_of_the_same_model(tmp_path, monkeypatch, capsys):
    """The suggested `autofit probe --gpu NAME` dropped --config/--set: it estimated the tiny preset."""
    import torch
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the profile's card may be too")
    (tmp_path / "c.toml").write_text("n_layer = 2\n")
    code, _, err = cli(monkeypatch, capsys, "run", "--profile", "rtx4070-12gb", "--config", "c.toml",
                       "--set", "n_embd=768", "--loss", "chunked", "--max-steps", "1")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.strip().endswith("run: autofit probe --gpu rtx4070-12gb --config c.toml --set n_embd=768 --loss chunked"), err


@pytest.mark.parametrize("args, words", [
    (["--batch_size=32"], "No such option: --batch_size; a config value is set with --set batch_size=32"),
    # click offered --max-steps, another run (it stops early and keeps max_iters' schedule)
    (["--max_iters=100"], "No such option: --max_iters; a config value is set with --set max_iters=100"),
    (["--compile=False"], "--compile=False: --compile takes no value; a config value is set with --set compile=False"),
    (["c.py"], "a config file is given with --config c.py"),
    (["--out_dir=x"], "No such option: --out_dir; the run's folder is given with --out DIR"),  # t8: not --set
])
def test_nanogpt_command_line_habits_get_the_flag_they_meant(tmp_path, monkeypatch, capsys, args, words):
    """t7's M4: `python train.py config/x.py --batch_size=32` is how nanoGPT users pass settings;
    here it was 'No such option' without a word of --set or --config."""
    (tmp_path / "c.py").write_text("n_layer = 1\n")
    code, out, err = cli(monkeypatch, capsys, "run", *CPU, "--preset", "tiny", *args)
    assert code == 2 and len(err.strip().splitlines()) == 1 and words in err, err
    assert "Possible options" not in err


def test_autofit_s_own_flags_on_a_command_without_them_are_not_called_nanogpt_s(monkeypatch, capsys):
    """t9's L1: `config --device cpu` was told '(nanoGPT's --device=...)', though --device is a flag of
    run, probe and sample."""
    code, _, err = cli(monkeypatch, capsys, "config", "--preset", "tiny", "--device", "cpu")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "No such option: --device for this command (run, probe and sample take it)" in err
    assert err.strip().endswith("the config's key is set with --set device=cpu") and "nanoGPT" not in err
    # t10's L4: the '=' form reads the same; a command without --set is not told to use it
    code, _, err2 = cli(monkeypatch, capsys, "config", "--preset", "tiny", "--device=cpu")
    assert code == 2 and err2 == err, err2
    code, _, err = cli(monkeypatch, capsys, "profiles", "list", "--device", "cpu")
    assert code == 2 and err.strip().endswith("(run, probe and sample take it)") and "--set" not in err, err


@pytest.mark.parametrize("command", [["probe", *CPU], ["run", *CPU, "--out", "o"]])
def test_a_vocab_uint16_files_cannot_hold_and_a_dataset_named_embedded_are_refused_first(tmp_path, monkeypatch,
                                                                                         capsys, command):
    """s18 (k24): a vocab_size above 65,536 on nanoGPT's uint16 .bin files (a cl100k_base-sized
    tokenizer), and dataset='embedded' beside the user's own data/embedded/, are one line each,
    before the probe, and the run's folder is not made. A probe alone draws random tokens and
    reads no data: the name's conflict is the run's to say."""
    import numpy as np
    for name in ("cl", "embedded"):
        (tmp_path / "data" / name).mkdir(parents=True)
        for split, n in (("train", 5000), ("val", 500)):
            (np.arange(n) % 65536).astype(np.uint16).tofile(tmp_path / "data" / name / f"{split}.bin")
    cases = [(["--set", "dataset=cl", "--set", "vocab_size=100277"], "vocab_size 100,277 is above the 65,536 token ids"),
             (["--set", "dataset=embedded", "--set", "vocab_size=256"], "dataset 'embedded' names both")]
    for sets, words in cases[:1 + (command[0] == "run")]:
        code, out, err = cli(monkeypatch, capsys, *command, *SMALL, *sets)
        assert code == 2 and out == "" and err.count("\n") == 1 and words in err, err
        assert "trial" not in err and not (tmp_path / "o").exists()


def test_a_resume_of_a_built_in_corpus_run_beside_your_data_embedded_is_told_to_rename_it(tmp_path, monkeypatch,
                                                                                         capsys):
    """r8 (session 18): a run on the built-in corpus, resumed after the user made data/embedded/,
    was refused with 'set dataset='data/embedded' (a path) to train on yours': for a resume that
    is other data under a checkpoint trained on the built-in corpus. The line says what resumes it."""
    import numpy as np
    code, out, err = cli(monkeypatch, capsys, "run", *CPU, "--out", "o", "--preset", "tiny", *SMALL, "--no-probe",
                         "--max-steps", "1")
    assert code == 0, err
    (tmp_path / "data" / "embedded").mkdir(parents=True)
    for split in ("train", "val"):
        (np.arange(500) % 256).astype(np.uint16).tofile(tmp_path / "data" / "embedded" / f"{split}.bin")
    code, out, err = cli(monkeypatch, capsys, "run", "--resume", "--out", "o", "--max-steps", "2")
    assert code == 2 and err.count("\n") == 1, err
    assert err == ("autofit: error: dataset 'embedded' names both autofit's built-in corpus, which o/ckpt.pt trained "
                   "on, and your dataset in data/embedded: rename that folder to resume it (a run on yours is a new "
                   "run: another --out, dataset='data/embedded')\n")
