"""Issue 19, mechanism 7: checks that need no probe come before it (with advice the next attempt
accepts), install hints that name what to install, and long phases (evaluation, probe trials,
data preparation) that stop at the next batch on Ctrl-C/SIGTERM and say how far they are."""
from __future__ import annotations

import pickle
import re
import shutil
import struct
from pathlib import Path

import pytest

from autofit.cli.app import main  # noqa: F401
from cli_run import cli

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--set", "n_layer=1", "--set", "n_embd=32", "--set", "n_head=2", "--set", "block_size=32",
        "--set", "batch_size=4", "--set", "gradient_accumulation_steps=2", "--set", "eval_iters=1",
        "--set", "eval_interval=100", "--set", "max_iters=8"]
CPU = ["--device", "cpu", "--budget", "64MiB", "--no-progress"]


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOFIT_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)


def char_dataset(folder: Path, vocab: int) -> None:
    """A nanoGPT character dataset: meta.pkl declaring `vocab`, ids 0..vocab-1 in both splits."""
    folder.mkdir(parents=True, exist_ok=True)
    body = struct.pack(f"<{vocab}H", *range(vocab)) * 20
    for split in ("train", "val"):
        (folder / f"{split}.bin").write_bytes(body)
        for side in folder.glob(f"{split}.bin.max.json"):
            side.unlink()
    (folder / "meta.pkl").write_bytes(pickle.dumps({"vocab_size": vocab}))


def test_a_nanogpt_checkpoint_of_another_vocab_is_refused_before_the_probe_with_advice_that_works(
        tmp_path, monkeypatch, capsys):
    from test_nanogpt_workflow import as_nanogpt
    char_dataset(tmp_path / "d", 65)
    code, _, err = cli(monkeypatch, capsys, "run", "--no-probe", *CPU, *TINY, "--set", f"dataset={tmp_path / 'd'}",
                       "--max-steps", "1", "--out", "run")
    assert code == 0, err
    as_nanogpt(tmp_path / "run" / "ckpt.pt")
    char_dataset(tmp_path / "d", 86)  # the same folder, prepared again from another text
    code, _, err = cli(monkeypatch, capsys, "run", "--resume", "--out", "run", *CPU)
    assert code == 2 and err.count("\n") == 1, err
    assert "trial" not in err  # refused before the probe
    assert "vocab_size 65 is smaller than dataset" in err and "which a resume cannot change" in err
    assert "set vocab_size" not in err  # the advice the resume itself would refuse
    code, _, err = cli(monkeypatch, capsys, "run", *CPU, *TINY, "--set", f"dataset={tmp_path / 'd'}",
                       "--max-steps", "1", "--out", "run2")  # the advice: a new run with another --out
    assert code == 0, err


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="a GPU is here")
def test_run_profile_of_a_gpu_says_there_is_none_before_asking_for_the_dataset(monkeypatch, capsys):
    code, _, err = cli(monkeypatch, capsys, "run", "--profile", "rtx4070-12gb", "--set", "dataset=shakespeare_char")
    assert code == 2 and err.count("\n") == 1
    assert "profile rtx4070-12gb is for a GPU, and none was found" in err and "data prepare" not in err


def test_install_hints_name_the_packages_and_the_checkouts_extra(monkeypatch, capsys):
    wrong = [f"{p.relative_to(ROOT)}:{i}" for p in [*ROOT.glob("autofit/**/*.py"), *ROOT.glob("trainer/**/*.py")]
             for i, line in enumerate(p.read_text().splitlines(), 1)
             if re.search(r"pip install ['\"]?autofit\[", line)]
    assert wrong == [], "an unrelated package named autofit is on the index: " + ", ".join(wrong)
    code, out, _ = cli(monkeypatch, capsys, "probe", "--help")
    assert code == 0 and 'pip install -e ".[plot]"' in " ".join(out.replace("│", " ").split())
    from autofit.report.plot import INSTALL
    assert INSTALL == 'pip install matplotlib (from an autofit checkout: pip install -e ".[plot]")'


# ---------------------------------------------------------------- long phases stop and speak


def _loop_cfg(out, **over):
    from trainer.config.train_config import load_config
    base = dict(n_layer=1, n_embd=32, n_head=2, block_size=32, batch_size=4, gradient_accumulation_steps=2,
                eval_iters=40, eval_interval=2, log_interval=1, dataset="embedded", out_dir=str(out), max_iters=4,
                dtype="float32", compile=False, device="cpu")
    base.update(over)
    return load_config(preset="tiny", overrides=[f"{k}={v}" for k, v in base.items()])


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("eval_only", [False, True])
def test_a_signal_during_evaluation_is_acted_on_when_the_batch_ends(tmp_path, monkeypatch, capfd, sig, eval_only):
    import os
    import signal

    import torch

    from trainer.evaluate import Evaluator
    from trainer.loop import RunOptions, train
    calls = []
    real = Evaluator.batch_loss

    def batch_loss(self, model, x, y):
        calls.append(1)
        if len(calls) == 3:  # the third of 80 batches: the signal arrives while it runs
            os.kill(os.getpid(), getattr(signal, sig))
        return real(self, model, x, y)
    monkeypatch.setattr(Evaluator, "batch_loss", batch_loss)
    res = train(_loop_cfg(tmp_path, eval_only=eval_only), RunOptions(device=torch.device("cpu"), progress=False))
    assert len(calls) == 3  # the batch in flight finished, no other began
    assert res.status == "interrupted" and res.steps == 0
    assert (res.checkpoint is None) == eval_only  # training: the steps done (none) are checkpointed
    lines = (tmp_path / "metrics.jsonl").read_text()
    assert '"type": "eval"' not in lines and '"type": "interrupted"' in lines  # no half evaluation recorded
    from trainer.interrupt import EVAL_STOP_NOTICE, STOP_NOTICE
    err = capfd.readouterr().err  # eval_only promised a checkpoint it never writes
    assert (EVAL_STOP_NOTICE in err, STOP_NOTICE in err) == (eval_only, not eval_only), err


def test_a_long_evaluation_says_its_count_and_eta(tmp_path, monkeypatch):
    import torch

    from trainer import evaluate, phases
    from trainer.loop import RunOptions, train
    now = [0.0]

    def clock():
        now[0] += 4.0  # one reading per batch: each batch takes 4 s
        return now[0]
    monkeypatch.setattr(evaluate, "PhaseProgress", lambda *a, **k: phases.PhaseProgress(*a, clock=clock, **k))
    said = []
    monkeypatch.setattr("trainer.metrics.Progress.print", lambda self, msg: said.append(msg))
    train(_loop_cfg(tmp_path, eval_iters=10, max_iters=1, eval_interval=100),
          RunOptions(device=torch.device("cpu"), progress=False))
    lines = [s for s in said if s.startswith("evaluation at step 0:")]
    assert lines == ["evaluation at step 0: 8/20 batches, ETA 48s (from the rate measured so far)",  # after 32 s
                     "evaluation at step 0: 16/20 batches, ETA 16s (from the rate measured so far)"]


def test_phase_progress_is_quiet_for_a_short_phase_and_counts_a_long_one():
    from trainer.phases import PhaseProgress, fmt_seconds
    t = [0.0]
    said = []
    p = PhaseProgress("prepare", 10, said.append, unit="MB", every_s=30, clock=lambda: t[0])
    for step in range(10):
        t[0] = 20.0 * (step + 1)
        p.tick()
    assert said == ["prepare: 2/10 MB, ETA 2m 40s (from the rate measured so far)",
                    "prepare: 4/10 MB, ETA 2m 00s (from the rate measured so far)",
                    "prepare: 6/10 MB, ETA 1m 20s (from the rate measured so far)",
                    "prepare: 8/10 MB, ETA 40s (from the rate measured so far)"]
    assert fmt_seconds(7500) == "2h 05m"


def test_data_prepare_piped_says_count_and_eta_lines(monkeypatch):
    import sys

    from trainer.data import prepare
    from trainer.phases import LineBar
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    said = []
    assert isinstance(prepare._progress(True, said.append), LineBar)  # piped: lines, not a silent bar
    t = [0.0]
    bar = LineBar(said.append, clock=lambda: t[0])
    task = bar.add_task("tokenizing (tokens)", total=1000)
    t[0] = 40.0
    bar.advance(task, 250)
    t[0] = 80.0
    bar.update(task, completed=500)
    unknown = bar.add_task("downloading input.txt (bytes)", total=None)
    t[0] = 120.0
    bar.advance(unknown, 2048)
    assert said == ["tokenizing (tokens): 250/1,000, ETA 2m 00s (from the rate measured so far)",
                    "tokenizing (tokens): 500/1,000, ETA 1m 20s (from the rate measured so far)",
                    "downloading input.txt (bytes): 2,048 so far"]


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_signal_during_a_probe_trial_is_acted_on_when_the_trial_ends(monkeypatch, capsys, sig):
    import os
    import signal

    from autofit.planning import search
    ran, finished = [], []
    real = search.run_trial

    def run_trial(*args, **kwargs):
        ran.append(1)
        if len(ran) == 2:  # the signal arrives while the second trial runs
            os.kill(os.getpid(), getattr(signal, sig))
        record = real(*args, **kwargs)
        finished.append(record.status)
        return record
    monkeypatch.setattr(search, "run_trial", run_trial)
    before = signal.getsignal(signal.SIGTERM)
    code, out, err = cli(monkeypatch, capsys, "probe", *CPU[:4], *TINY, "--checkpointing", "0", "--save")
    # the trial in flight finished, no other began; the exit code names the signal (130, 143)
    assert len(ran) == 2 and len(finished) == 2 and code == 128 + getattr(signal, sig)
    assert err.strip().splitlines()[-1] == ("autofit: interrupted during the probe; nothing was saved (the plan is "
                                            "saved only after the probe)")
    assert out == "" and signal.getsignal(signal.SIGTERM) is before


def test_each_trial_record_leaves_the_probe_as_it_ends_so_a_stopped_probe_keeps_them(monkeypatch, capsys, tmp_path):
    # AUTOFIT_TRIALS_JSONL (the GPU self-check's stage 2 sets it): a probe stopped after its second
    # trial has already written both records whole, though it saved no profile
    import json
    import os
    import signal

    from autofit.planning import search
    finished = []
    real = search.run_trial

    def run_trial(*args, **kwargs):
        if len(finished) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        finished.append(real(*args, **kwargs))
        return finished[-1]
    monkeypatch.setattr(search, "run_trial", run_trial)
    monkeypatch.setenv("AUTOFIT_TRIALS_JSONL", str(tmp_path / "trials.jsonl"))
    code, _, _ = cli(monkeypatch, capsys, "probe", *CPU[:4], *TINY, "--checkpointing", "0", "--save")
    assert code == 143 and len(finished) == 2  # 128 + SIGTERM
    records = [json.loads(line) for line in (tmp_path / "trials.jsonl").read_text().splitlines()]
    assert [r.pop("type") for r in records] == ["trial", "trial"]
    assert records == [t.model_dump(mode="json") for t in finished]  # the full records, as the probe made them

    monkeypatch.setattr(search, "run_trial", lambda *a, **k: pytest.fail("a trial ran"))
    (tmp_path / "a_file").write_text("x")
    monkeypatch.setenv("AUTOFIT_TRIALS_JSONL", str(tmp_path / "a_file" / "trials.jsonl"))
    code, _, err = cli(monkeypatch, capsys, "probe", *CPU[:4], *TINY, "--checkpointing", "0")
    assert code == 2 and err.count("\n") == 1 and "cannot write AUTOFIT_TRIALS_JSONL file" in err, err
