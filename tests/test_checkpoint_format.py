"""Every reader of an autofit ckpt.pt refuses a newer autofit's format as --resume does (closing-14's
'not done'): `autofit sample`, a config's init_from = 'resume', and --resume --nproc-per-node
before its ranks start. Only --resume checked it; sample read the file's nanoGPT keys as nanoGPT
would, silently, whatever a newer autofit meant by them. A nanoGPT checkpoint (no format key)
still loads everywhere."""
import pytest
import torch

from autofit.cli.app import main  # noqa: F401
from cli_run import cli
from test_bounds_read import _checkpoint
from trainer.checkpoint.nanogpt import CheckpointError, read_nanogpt_checkpoint
from trainer.checkpoint.schema import CHECKPOINT_FORMAT, FORMAT_KEY
from trainer.sample import SampleOptions, generate_samples

NEWER = CHECKPOINT_FORMAT + 1
NANO_KEYS = ("model", "optimizer", "model_args", "iter_num", "best_val_loss", "config")


def _newer(tmp_path):
    """A real 1-layer autofit checkpoint in o/, its format bumped and a sampler key this autofit
    does not know (what a newer format would add)."""
    (tmp_path / "o").mkdir()
    return _checkpoint(tmp_path / "o", **{FORMAT_KEY: NEWER}, sampler=lambda ck: {**ck["sampler"], "shuffle": "v2"})


def _upgrade(path) -> str:
    return f"{path}: written by a newer autofit (format {NEWER}; this one reads up to {CHECKPOINT_FORMAT}): upgrade autofit"


def _one_line(code, err, path):
    assert code != 0 and err.strip().splitlines() == [f"autofit: error: {_upgrade(path)}"], err
    assert "Traceback" not in err


def test_the_nanogpt_reader_refuses_a_newer_format_and_still_reads_nanogpts_files(tmp_path):
    path = _newer(tmp_path)
    with pytest.raises(CheckpointError) as e:
        read_nanogpt_checkpoint(path)
    assert str(e.value) == _upgrade(path)
    with pytest.raises(CheckpointError, match="upgrade autofit"):  # sample's library entry, before any model
        generate_samples(tmp_path / "o", SampleOptions(num_samples=1, max_new_tokens=1))
    ck = torch.load(path, weights_only=True)
    torch.save({k: ck[k] for k in NANO_KEYS}, path)  # nanoGPT's train.py's keys: no format, format 1
    assert read_nanogpt_checkpoint(path).layout == "nanogpt"
    torch.save({**ck, FORMAT_KEY: CHECKPOINT_FORMAT, "sampler": {k: v for k, v in ck["sampler"].items()
                                                                  if k != "shuffle"}}, path)
    assert read_nanogpt_checkpoint(path).layout == "autofit"  # this autofit's own format reads


def test_sample_says_upgrade_in_one_line(tmp_path, monkeypatch, capsys):
    _newer(tmp_path)
    monkeypatch.chdir(tmp_path)
    code, out, err = cli(monkeypatch, capsys, "sample", "--out", "o", "--num-samples", "1", "--max-new-tokens", "1")
    _one_line(code, err, "o/ckpt.pt")
    assert out == ""


def test_init_from_resume_in_a_config_says_upgrade(tmp_path, monkeypatch, capsys):
    _newer(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AUTOFIT_HOME", str(tmp_path / "home"))
    code, _, err = cli(monkeypatch, capsys, "run", "--out", "o", "--set", "init_from=resume", "--device", "cpu",
                       "--budget", "64MiB", "--no-progress", "--max-steps", "2")
    _one_line(code, err, "o/ckpt.pt")


def test_resume_on_ranks_says_upgrade_before_any_rank_starts(tmp_path, monkeypatch, capsys):
    from autofit.launch import launcher
    monkeypatch.setattr(launcher, "relaunch", lambda *a, **k: (_ for _ in ()).throw(AssertionError("launched")))
    _newer(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AUTOFIT_HOME", str(tmp_path / "home"))
    code, _, err = cli(monkeypatch, capsys, "run", "--resume", "--out", "o", "--nproc-per-node", "2", "--device", "cpu",
                       "--no-progress", "--max-steps", "2")
    _one_line(code, err, "o/ckpt.pt")
