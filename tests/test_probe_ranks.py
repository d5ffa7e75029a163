"""`autofit probe --nproc-per-node N`: a plan for N ranks is probed on N ranks and saved where
`run --profile ... --nproc-per-node N` finds it (the run's hint said to probe with these options,
and probe had no such flag); a plan for other ranks is named as such, not 'stale'."""
import os
import subprocess
import sys
from pathlib import Path

from autofit.cli.app import main  # noqa: F401
from autofit.profiles.fingerprints import explain_stale
from autofit.launch.run import _for_other_ranks
from cli_run import cli

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--preset", "tiny", "--set", "n_layer=1", "--set", "n_embd=32", "--set", "n_head=2", "--set", "block_size=32",
        "--set", "batch_size=4", "--set", "gradient_accumulation_steps=2"]
LEVERS = ["--checkpointing", "0", "--loss", "standard", "--dtype", "float32", "--no-compile"]


def test_a_probe_on_two_ranks_saves_a_plan_the_hinted_run_uses(tmp_path):
    env = {**os.environ, "AUTOFIT_HOME": str(tmp_path / "home"), "PYTHONPATH": str(ROOT), "COLUMNS": "400"}
    run = lambda *a: subprocess.run([sys.executable, "-m", "autofit", *a], cwd=tmp_path, env=env,  # noqa: E731
                                    capture_output=True, text=True, timeout=300)
    p = run("probe", *TINY, "--device", "cpu", "--budget", "64MiB", *LEVERS, "--save", "--nproc-per-node", "2")
    assert p.returncode == 0, p.stderr
    # the trial lines are the agreed record's: they say whose figure they give
    assert "measured peak" in p.stderr and "(the largest rank's)" in p.stderr and "tok/s per rank (the slowest)" in p.stderr
    hint = p.stdout.split("train with:")[1].strip().splitlines()[0]
    assert hint.startswith("autofit run --profile cpu-64mb") and hint.endswith("--nproc-per-node 2"), hint
    r = run(*hint.split()[1:], "--max-steps", "1", "--out", "o", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "plan: saved plan" in r.stdout and "no probe needed" in r.stdout, r.stdout


def test_probe_refuses_ranks_with_a_simulated_card_or_a_batch_they_cannot_share(tmp_path, monkeypatch, capsys):
    from autofit.launch import launcher
    monkeypatch.setattr(launcher, "relaunch", lambda *a, **k: (_ for _ in ()).throw(AssertionError("launched")))
    code, _, err = cli(monkeypatch, capsys, "probe", *TINY, "--gpu", "rtx4070-12gb", "--nproc-per-node", "2")
    assert code == 2 and "--gpu estimates one simulated card; --nproc-per-node measures" in err, err
    code, _, err = cli(monkeypatch, capsys, "probe", *TINY, "--set", "batch_size=3", "--set",
                       "gradient_accumulation_steps=1", "--device", "cpu", "--budget", "64MiB", "--nproc-per-node", "2")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "3" in err, err


def test_a_saved_plan_for_other_ranks_is_named_so():
    one = {"n_embd": 32, "torch_version": "2.13.0"}
    two = {**one, "world_size": 2, "parallelism": "auto"}
    assert explain_stale(two, one) == ["ranks 2 -> 1"]
    assert explain_stale(one, two) == ["ranks 1 -> 2"]
    assert explain_stale(two, {**two, "parallelism": "fsdp2"}) == ["parallelism auto -> fsdp2"]
    assert explain_stale(two, {**one, "world_size": 4, "parallelism": "fsdp2", "n_embd": 64}) == [
        "ranks 2 -> 4", "n_embd 32 -> 64", "parallelism auto -> fsdp2"]
    assert _for_other_ranks(["ranks 2 -> 1"]) == ("its saved plan is for 2 ranks, this run has 1 "
                                                  "(add --nproc-per-node 2 to use it)")
    assert _for_other_ranks(["ranks 1 -> 2"]) == "its saved plan is for 1 rank, this run has 2"
    assert _for_other_ranks(["ranks 2 -> 1", "n_embd 32 -> 64"]) is None


def test_a_stale_plans_model_option_at_its_default_is_named_by_its_value():
    """t3 (session 12): 'mlp relu2 -> unset': a default model option is not in the fingerprint."""
    assert explain_stale({"mlp": "relu2", "n_embd": 64}, {"n_embd": 64}) == ["mlp relu2 -> gelu"]
    assert explain_stale({"n_embd": 64}, {"n_embd": 64, "optimizer": "muon"}) == ["optimizer adamw -> muon"]


def test_probe_v_says_why_fsdp2_is_left_out_under_muon():
    """t5 L8: with parallelism 'auto' on 2 ranks, AdamW searches FSDP2 beside DDP; Muon leaves it
    out, and the notes (printed by probe -v and logged) say so with the reason, as for other levers."""
    from autofit.planning.candidates import candidate_space
    from trainer.config.train_config import load_config
    adamw = candidate_space(load_config(preset="tiny"), "cpu", False, dtype="float32", world_size=2)
    assert adamw.sharded == [False, True] and not any("FSDP2" in n for n in adamw.notes)
    muon = candidate_space(load_config(preset="tiny", overrides=["optimizer=muon"]), "cpu", False,
                           dtype="float32", world_size=2)
    assert muon.sharded == [False]
    assert any(n.startswith("FSDP2 not searched: optimizer 'muon'") for n in muon.notes), muon.notes
    one = candidate_space(load_config(preset="tiny", overrides=["optimizer=muon"]), "cpu", False, dtype="float32")
    assert not any("FSDP2" in n for n in one.notes)  # one rank: nothing to shard, nothing left out
