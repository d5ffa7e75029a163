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


def test_t7s_plurals_and_examples_read_right(tmp_path, monkeypatch):
    """t7 (session 15): 'runs 1 sequences at a time', 'the text has 1 characters', a stage's
    'e.g. 64 or 64', and a missing profile's line that listed only the built-ins."""
    from autofit.records import PlanRecord
    from autofit.report.render import plan_changes
    from trainer.config.train_config import load_config
    from trainer.data.text_tokens import _split_text
    from trainer.data.tokenfiles import DataError
    cfg = load_config(preset="tiny", overrides=["batch_size=2", "gradient_accumulation_steps=1"])
    plan = PlanRecord(mode="measured", micro_batch=1, grad_accum=2, micro_batches=[1, 1], effective_batch=2,
                      block_size=128, dtype="float32", compile=False, compile_after=0, checkpointing=0,
                      loss_impl="standard", budget_bytes=10**8, split="2 = 1 × 2")
    from types import SimpleNamespace
    res = SimpleNamespace(device=SimpleNamespace(kind="cpu", bf16_supported=False), compiled_fit_sizes=[], trials=[])
    assert any(w.startswith("runs 1 sequence at a time, 2 times per step") for w in plan_changes(plan, cfg, res))
    with pytest.raises(DataError, match="the text has 1 character: too few"):
        _split_text("a")
    from trainer.config.pyfile import ConfigError
    with pytest.raises(ConfigError, match=r"block_size \(64\): e\.g\. 64$"):
        load_config(preset="tiny", overrides=["stages=[dict(block_size=64, tokens_per_step=32)]"])
    monkeypatch.setenv("AUTOFIT_HOME", str(tmp_path))
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "cpu-64mb.toml").write_text('name = "cpu-64mb"\n[hardware]\nkind = "cpu"\n')
    from autofit.launch.profile_gpu import no_profile_words
    words = no_profile_words("cpu-32mb")
    assert words.startswith("no profile named 'cpu-32mb' (yours: cpu-64mb; built-in: ") and "rtx4070-12gb" in words


def test_a_config_compile_the_cpu_device_cannot_measure_says_why_without_v():
    """t7's L14: compile = true in the config became 'runs eager (compile off)' on the budgeted CPU
    device, the reason only in -v's why."""
    from types import SimpleNamespace
    from autofit.records import PlanRecord
    from autofit.report.render import plan_changes
    from trainer.config.train_config import load_config
    cfg = load_config(preset="tiny", overrides=["compile=True"])
    plan = PlanRecord(mode="measured", micro_batch=16, grad_accum=2, micro_batches=[16, 16], effective_batch=32,
                      block_size=128, dtype="float32", compile=False, compile_after=0, checkpointing=0,
                      loss_impl="standard", budget_bytes=10**8, split="32 = 16 × 2")
    res = SimpleNamespace(device=SimpleNamespace(kind="cpu", bf16_supported=False), mode="measured",
                          compiled_fit_sizes=[], trials=[])
    words = "; ".join(plan_changes(plan, cfg, res))
    assert "runs eager (compile off: torch.compile cannot be measured on the budgeted CPU device" in words


def test_t11s_one_token_and_one_sequence_read_right(tmp_path):
    """t11 (session 17): 'the train split of 'shakespeare_char' has 1 tokens'; and its kin, each
    reachable with a 1: a 1-byte .bin, an effective batch of 1 sequence in the plan's words and
    the config's, a 1-character vocabulary in sample's refusal."""
    import numpy as np

    from autofit.records import PlanRecord
    from autofit.report.render import plan_changes
    from trainer.config.stages import batch_words
    from trainer.config.train_config import load_config
    from trainer.data.datasets import load_dataset
    from trainer.data.tokenfiles import DataError, read_nanogpt_bin
    d = tmp_path / "d"
    d.mkdir()
    np.array([0], dtype="<u2").tofile(d / "train.bin")
    np.array([0, 0, 0], dtype="<u2").tofile(d / "val.bin")
    with pytest.raises(DataError, match=r"the train split of '.*' has 1 token, fewer than block_size \+ 1 = 3"):
        load_dataset(str(d)).check_block_size(2)
    (tmp_path / "odd.bin").write_bytes(b"x")
    with pytest.raises(DataError, match=r"has an odd size \(1 byte\)"):
        read_nanogpt_bin(tmp_path / "odd.bin")
    cfg = load_config(preset="tiny", overrides=["batch_size=1", "gradient_accumulation_steps=1"])
    assert batch_words(cfg).startswith("effective batch: 1 sequence = 128 tokens")
    plan = PlanRecord(mode="measured", micro_batch=1, grad_accum=1, micro_batches=[1], effective_batch=1,
                      block_size=128, dtype="float32", compile=False, compile_after=0, checkpointing=0,
                      loss_impl="standard", budget_bytes=10**8, split="1 = 1 × 1")
    from types import SimpleNamespace
    res = SimpleNamespace(device=SimpleNamespace(kind="cpu", bf16_supported=False), compiled_fit_sizes=[], trials=[])
    words = plan_changes(plan, cfg, res)
    assert words[0].startswith("keeps your effective batch of 1 sequence (128 tokens"), words
    two = plan.model_copy(update={"world_size": 2, "parallelism": "ddp"})  # 2 x 1 on two ranks: 1 each
    words = plan_changes(two, load_config(preset="tiny", overrides=["batch_size=2", "gradient_accumulation_steps=1"]),
                         res)
    assert any(w.startswith("runs 1 sequence at once (no gradient accumulation)") for w in words), words
