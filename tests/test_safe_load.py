"""Torch files from elsewhere are read with weights_only=True, and a refusal is our one line only:
no torch warning about the pickle protocol before it, no torch advice after it."""
import os
import pickle
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from trainer.checkpoint.safe_load import UnsafeOrUnreadable, load_weights_only


class Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def _refusal(path, **kw) -> str:
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with pytest.raises(UnsafeOrUnreadable) as e:
            load_weights_only(path, **kw)
    assert [str(w.message) for w in seen] == []  # torch's pickle-protocol warning is kept off the terminal
    assert "\n" not in str(e.value) and "weights_only=False" not in str(e.value) and "\x1b" not in str(e.value)
    return str(e.value)


def test_a_plain_pickle_is_refused_quietly_and_runs_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.pt").write_bytes(pickle.dumps(Evil()))
    (tmp_path / "b.pt").write_bytes(pickle.dumps({"model": {"w": 1}}))
    for name in ("a.pt", "b.pt"):
        assert "a pickle the weights_only loader refuses" in _refusal(tmp_path / name)
        assert "a pickle the weights_only loader refuses" in _refusal(tmp_path / name, mmap=True)
    assert not (tmp_path / "pwned").exists()


def test_a_pickled_class_is_named(tmp_path):
    torch.save({"model": {}, "a": np.zeros(3)}, tmp_path / "new.pt")
    torch.save({"model": {}, "a": np.zeros(3)}, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    assert "it pickles numpy" in _refusal(tmp_path / "new.pt", mmap=True)
    assert "it pickles numpy" in _refusal(tmp_path / "old.pt", mmap=True)  # torch cannot map the old format


def test_garbage_is_not_a_torch_file(tmp_path):
    (tmp_path / "g.pt").write_bytes(b"hello")
    assert "not a torch file" in _refusal(tmp_path / "g.pt")


def test_a_cut_short_torch_file_is_called_cut_short(tmp_path):
    """It was 'not a torch file': the zip's first entry is there, its end record is not."""
    torch.save({"w": torch.zeros(1000)}, tmp_path / "ok.pt")
    whole = (tmp_path / "ok.pt").read_bytes()
    for cut in (22, len(whole) // 2):
        (tmp_path / "cut.pt").write_bytes(whole[:-cut])
        for mmap in (False, True):
            assert f"a torch.save zip file cut short ({len(whole) - cut} bytes" in _refusal(tmp_path / "cut.pt", mmap=mmap)


def test_tensors_still_load_mapped_or_not(tmp_path):
    torch.save({"w": torch.arange(3)}, tmp_path / "ok.pt")
    torch.save({"w": torch.arange(3)}, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    for name in ("ok.pt", "old.pt"):
        assert load_weights_only(tmp_path / name, mmap=True)["w"].tolist() == [0, 1, 2]


@pytest.mark.parametrize("command", [["run", "--resume", "--out", "o", "--no-progress"],
                                     ["sample", "--out", "o", "--num-samples", "1", "--max-new-tokens", "2"]])
def test_the_commands_print_one_line_for_a_plain_pickle(tmp_path, command):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "ckpt.pt").write_bytes(pickle.dumps(Evil()))
    env = {**os.environ, "AUTOFIT_HOME": str(tmp_path / "home"), "PYTHONWARNINGS": "default"}
    proc = subprocess.run([sys.executable, "-m", "autofit", *command], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "o/ckpt.pt" in proc.stderr and "weights_only loader refuses" in proc.stderr
    assert not (tmp_path / "pwned").exists()
