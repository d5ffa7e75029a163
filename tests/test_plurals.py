"""No '(s)' in what a user reads (closing-14's 'not done', k12): one helper,
trainer.errors.counted, says '1 GPU' and '2 GPUs'; each line that said 'GPU(s)', 'rank(s)',
'round(s)', ... now says the number's own word. The lines checked here are those no other test
reaches without a GPU or a contest; test_sample, test_bounds_read, test_interrupts,
test_launcher and test_cli check the others in place."""
import pytest

from trainer.errors import counted


def test_counted_says_the_word_in_the_number_it_takes():
    assert [counted(n, "GPU") for n in (0, 1, 2)] == ["0 GPUs", "1 GPU", "2 GPUs"]
    assert counted(1, "alternating round") == "1 alternating round"
    assert counted(3, "body", "bodies") == "3 bodies" and counted(1, "body", "bodies") == "1 body"


def test_the_contests_why_counts_its_rounds():
    from autofit.planning.contest import _why
    winner = object()  # alone in the contest at the end: nothing of it is read
    why = lambda rounds: _why(winner, [winner], [winner], rounds, 2, True, None)  # noqa: E731
    assert "re-timed in 1 alternating round;" in why(1) and "re-timed in 3 alternating rounds;" in why(3)
    assert "(s)" not in why(1) + why(3)


def test_the_rank_budgets_variable_counts_budgets_and_ranks(monkeypatch):
    from autofit.devices import ranks
    from autofit.devices.info import DeviceError
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv(ranks.RANK_BUDGETS_ENV, "3MiB,2MiB")
    monkeypatch.setattr(ranks, "under_torchrun", lambda: True, raising=False)
    with pytest.raises(DeviceError, match=r"names 2 budgets for 1 rank; give one per rank"):
        ranks.rank_budget(None)


def test_a_gpu_index_out_of_range_counts_the_gpus(monkeypatch):
    import torch

    from autofit.devices.cuda import query_torch_cuda
    from autofit.devices.device import DeviceError
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(DeviceError, match=r"torch.cuda sees 1 GPU \(indices 0..0\)"):
        query_torch_cuda(3)


def test_checkpointing_deeper_than_the_model_counts_its_layers():
    from autofit.planning.candidates import PlanError, candidate_space
    from trainer.config.train_config import load_config
    cfg = load_config(preset="tiny", overrides=["n_layer=1", "n_embd=32", "n_head=2"])
    with pytest.raises(PlanError, match=r"the model has 1 layer; activation checkpointing intervals go from 0"):
        candidate_space(cfg, "cpu", False, checkpointing=[2])


def test_the_kept_best_line_counts_the_steps_since():
    from trainer.metrics import describe_event
    ev = {"event": "kept_best", "best_step": 5, "val_loss": 1.25}
    assert describe_event({**ev, "steps_not_saved": 1}).endswith("so the 1 step since went unsaved")
    assert describe_event({**ev, "steps_not_saved": 7}).endswith("so the 7 steps since went unsaved")
