"""A resume that changes the number of ranks or the batch: what it refuses says the whole fix
(a --set that changes the effective batch needs --allow-changes on a resume), and what it applies
is not called 'not applied'."""
import pytest

from autofit.launch import resume
from trainer.config.train_config import load_config
from trainer.distributed.ranks import Ranks
from trainer.errors import TrainError


def test_a_split_the_new_ranks_cannot_share_names_allow_changes_in_its_fix(monkeypatch):
    monkeypatch.setattr(resume.agree, "ranks", lambda: Ranks(rank=0, world_size=2, local_rank=0))
    cfg = load_config(preset="tiny", overrides=["batch_size=3", "gradient_accumulation_steps=3"])
    with pytest.raises(TrainError) as e:
        resume._check_split_change(cfg, before=1)
    assert str(e.value).endswith("(e.g. --set batch_size=5 --set gradient_accumulation_steps=2 --allow-changes)"), e.value
    resume._check_split_change(cfg, before=2)  # the same ranks: nothing to check


def test_a_new_effective_batch_taken_with_allow_changes_is_not_called_not_applied():
    saved = load_config(preset="tiny", overrides=["batch_size=3", "gradient_accumulation_steps=3"])
    new = load_config(preset="tiny", overrides=["batch_size=5", "gradient_accumulation_steps=2"])
    logs = []
    resume._say_not_applied({"batch_size": 5, "gradient_accumulation_steps": 2}, saved, new, {"kind": "cpu"}, 3,
                            logs.append)
    assert logs and all("is not applied" not in ln for ln in logs), logs
    assert "--set batch_size=5 counts in the effective batch (10); its split into micro-batches is the checkpoint's " \
           "plan's (micro-batch 3)" in logs[0]
    same = load_config(preset="tiny", overrides=["batch_size=9", "gradient_accumulation_steps=1"])
    logs.clear()
    resume._say_not_applied({"batch_size": 9, "gradient_accumulation_steps": 1}, saved, same, {"kind": "cpu"}, 3,
                            logs.append)
    assert logs[0] == "--resume: --set batch_size=9 is not applied: its plan splits the effective batch (micro-batch 3)"

