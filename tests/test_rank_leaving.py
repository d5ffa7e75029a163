"""Several ranks, in-process with the process group faked: a Trainer that fails after joining the
ranks leaves their group (r4, session 15), and a rank whose data fails mid-run tells the others
in the step's agreement (the real 2-rank runs are tests/test_multigpu.py's)."""
from __future__ import annotations

import pytest

from trainer.config.train_config import load_config
from trainer.data.tokenfiles import DataError
from trainer.distributed import multirank
from trainer.distributed import ranks as D
from trainer.errors import TrainError
from trainer.loop import Trainer

TINY = dict(n_layer=1, n_embd=16, n_head=2, block_size=16, batch_size=2, gradient_accumulation_steps=2,
            dataset="embedded", max_iters=2, eval_interval=0, dtype="float32", compile=False, device="cpu")


def _config(tmp_path, **over):
    return load_config(preset="tiny", overrides=[f"{k}={v}" for k, v in
                                                 {**TINY, "out_dir": tmp_path / "out", **over}.items()])


@pytest.fixture
def joined(monkeypatch):
    """Rank 0 of 2 whose RankGroup 'joined' the group (D.start answers True, as on the first
    join); returns the list D.stop appends to each time the group is left."""
    left: list[bool] = []
    for k, v in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(D, "start", lambda device_type, ranks=None: True)
    monkeypatch.setattr(D, "stop", lambda: left.append(True))
    return left


def test_a_trainer_that_fails_opening_its_data_leaves_the_group_it_joined(tmp_path, joined):
    with pytest.raises(DataError):
        Trainer(_config(tmp_path, dataset=str(tmp_path / "no-such-data")))
    assert joined == [True]


def test_a_trainer_refused_after_its_data_and_collectives_leaves_the_group_too(tmp_path, joined, monkeypatch):
    monkeypatch.setattr(multirank, "same_data", lambda data, ranks: None)  # the one collective before the refusal
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "ckpt.pt").write_bytes(b"")  # rank 0's 'ckpt.pt exists: --resume' refusal
    with pytest.raises(TrainError, match="exists: continue it with --resume"):
        Trainer(_config(tmp_path))
    assert joined == [True]


def test_a_trainer_that_did_not_join_the_group_leaves_nothing(tmp_path, monkeypatch):
    left: list[bool] = []
    monkeypatch.setattr(D, "stop", lambda: left.append(True))
    with pytest.raises(DataError):  # one process: no group of its own to leave
        Trainer(_config(tmp_path, dataset=str(tmp_path / "no-such-data")))
    assert left == []


def test_a_rank_whose_data_fails_mid_run_tells_the_others_its_line_in_the_steps_agreement(tmp_path):
    """Rank 1's step batch at step 3 fails with a DataError (outside the step's try, before r4's
    fix): rank 0 stops in that step's agreement with a line naming rank 1 and its error, not
    'lost contact' when rank 1's process ends; the checkpoint of step 2 stays as it was."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path
    import torch
    worker = Path(__file__).parent / "ranks" / "data_fault_worker.py"
    e = {k: v for k, v in os.environ.items() if not k.startswith(("AUTOFIT_", "RANK", "LOCAL_RANK", "WORLD_SIZE"))}
    e.update(OMP_NUM_THREADS="1", AUTOFIT_DIST_TIMEOUT="60", PYTHONPATH=str(Path(__file__).parents[1]))
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(worker), str(tmp_path)], env=e, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    zero, one = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert one["line"].startswith("data/embedded/train.bin changed") and "holds step 2: --resume" in one["line"]
    assert zero["error"] == "RankFailed" and zero["line"] == (
        "rank 0: rank 1 failed in this step (its own error says why); stopping here too "
        "(rank 1: data/embedded/train.bin changed since the run opened it (a fault of the test))")
    assert torch.load(tmp_path / "run" / "ckpt.pt", weights_only=False)["iter_num"] == 2
