"""The OOM policy on its own: which micro-batches come after an OOM, and the thrash detector."""
import pytest

from trainer.errors import TrainError
from trainer.recovery import THRASH_STEPS, Recovery, ThrashDetector, shrink_policy


def test_shrink_to_known_fits_then_halves():
    shrink = shrink_policy([3, 5, 8])
    assert shrink(8) == 5 and shrink(5) == 3 and shrink(3) == 1 and shrink(1) is None


def test_ordinary_oom_shrinks_and_keeps_the_batch_exact():
    r = Recovery(rank_batch=12, micro_batch=12, shrink=shrink_policy([5]))
    kind, info = r.after_oom(step=4, compiled=False, reason="x")
    # at most the known fit 5, balanced: 12 = 4 x 3 (not 5 + 5 + 2)
    assert kind == "oom_shrink" and info["old_micro_batch"] == 12 and info["new_micro_batch"] == 4
    assert r.micro_batches == [4, 4, 4] and info["micro_batches"] == [4, 4, 4]


def test_oom_in_the_compile_window_blames_compilation():
    r = Recovery(rank_batch=8, micro_batch=4, compiled_fit_sizes=[2])
    r.compiled_at(10)
    kind, info = r.after_oom(step=11, compiled=True, reason="x")
    assert kind == "compile_oom_shrink" and info["new_micro_batch"] == 2
    r = Recovery(rank_batch=8, micro_batch=4, compiled_fit_sizes=[])
    r.compiled_at(10)
    kind, info = r.after_oom(step=10, compiled=True, reason="x")
    assert kind == "compile_fallback_eager" and r.micro_batches == [4, 4]
    kind, _ = r.after_oom(step=20, compiled=True, reason="x")  # past the window: an ordinary shrink
    assert kind == "oom_shrink" and r.micro_batches == [2, 2, 2, 2]


def test_a_compile_oom_shrink_restarts_the_compile_window():
    """The smaller compiled micro-batch's shapes compile at the redone step: an OOM in their
    compile is compilation's too (the next compiled fit, else eager), not a steady-state shrink
    (a lesson that lowers the profile's safe micro-batch). Found by r2 (session 14)."""
    r = Recovery(rank_batch=16, micro_batch=16, shrink=shrink_policy([4, 8]), compiled_fit_sizes=[4, 8])
    r.compiled_at(20)  # the window: steps 20, 21, 22
    kind, info = r.after_oom(step=22, compiled=True, reason="x")
    assert (kind, info["new_micro_batch"]) == ("compile_oom_shrink", 8)
    kind, info = r.after_oom(step=23, compiled=True, reason="x")  # 8's shapes compiling since step 22
    assert (kind, info["new_micro_batch"]) == ("compile_oom_shrink", 4)
    r = Recovery(rank_batch=16, micro_batch=16, shrink=shrink_policy([4, 8]), compiled_fit_sizes=[8])
    r.compiled_at(20)
    r.after_oom(step=22, compiled=True, reason="x")
    kind, info = r.after_oom(step=24, compiled=True, reason="x")  # no smaller compiled fit: eager at 8
    assert (kind, info) == ("compile_fallback_eager", {"micro_batch": 8}) and r.micro_batches == [8, 8]
    kind, _ = r.after_oom(step=25, compiled=True, reason="x")  # past the new window: an ordinary shrink
    assert kind == "oom_shrink" and r.micro_batches == [4] * 4


def test_nothing_smaller_is_a_train_error():
    r = Recovery(rank_batch=4, micro_batch=1)
    with pytest.raises(TrainError, match="no smaller micro-batch"):
        r.after_oom(step=0, compiled=False, reason="boom")


def test_a_stage_of_shorter_sequences_shrinks_in_the_plans_units():
    """Fit sizes count sequences of the fitted block (64); a 16-token stage's micro-batches its
    own. Each shrink is one fit step in tokens, compiled or eager; below one fitted sequence only
    the stage's own sequences halve."""
    r = Recovery(rank_batch=48, micro_batch=6, shrink=shrink_policy([1, 2, 4, 6]), compiled_fit_sizes=[2])
    r.micro_batches, r.blocks = [24, 24], (16, 64)  # as StagedRun.enter sets them: 24 x 16 = 6 x 64 tokens
    kind, info = r.after_oom(step=4, compiled=False, reason="x")
    assert (kind, info["new_micro_batch"], info["micro_batch_at_block_size"], info["stage_max_tokens"]) == \
        ("oom_shrink", 16, 4, 256)
    r.compiled_at(5)
    kind, info = r.after_oom(step=5, compiled=True, reason="x")  # 16 x 16 = 4 x 64: the compiled fit below, 2
    assert (kind, info["new_micro_batch"], info["micro_batch_at_block_size"]) == ("compile_oom_shrink", 8, 2)
    r.micro_batches = [6] * 8  # 96 tokens: 1.5 of the fitted sequences, rounded up to 2; the fit below is 1
    kind, info = r.after_oom(step=20, compiled=False, reason="x")
    assert (info["new_micro_batch"], info["micro_batch_at_block_size"], info["stage_max_tokens"]) == (4, 1, 64)
    kind, info = r.after_oom(step=21, compiled=False, reason="x")  # 64 tokens failed: halve the stage's 4
    assert (info["new_micro_batch"], info["micro_batch_at_block_size"], info["stage_max_tokens"]) == (2, 1, 32)
    r.after_oom(step=22, compiled=False, reason="x")
    with pytest.raises(TrainError, match="no smaller micro-batch"):
        r.after_oom(step=23, compiled=False, reason="x")


def test_thrash_detector_needs_rises_in_a_row():
    t = ThrashDetector()
    seen = [t.observe(v) for v in [0, 1, 1, 2, 3, 4, 5, 6, 7]]
    # rises at values 2, 3, 4 (after a flat step) trip it once; then it counts afresh
    assert seen.index(True) == 5 and THRASH_STEPS == 3
    assert seen.count(True) == 2


def test_the_fp16_scaler_after_an_oom_keeps_its_scale_and_growth_count():
    """The fresh scaler an OOM's clean-up makes started its growth count again: an fp16 run that
    ran out of memory grew its scale later than one that did not."""
    from types import SimpleNamespace

    import torch

    from trainer.redo import RedoneStep
    old = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12, growth_interval=5)
    old._lazy_init_scale_growth_tracker(torch.device("cpu"))
    old._growth_tracker.fill_(3)
    fake = SimpleNamespace(optimizer=SimpleNamespace(zero_grad=lambda set_to_none: None), scaler=old,
                           device=torch.device("cpu"), meter=SimpleNamespace(cleanup=lambda: None))
    RedoneStep._cleanup_after_oom(fake)
    assert fake.scaler is not old
    state = fake.scaler.state_dict()
    assert (state["scale"], state["_growth_tracker"], state["growth_interval"]) == (2.0 ** 12, 3, 5)
