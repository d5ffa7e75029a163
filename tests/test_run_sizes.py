"""What a trial's timing stands for (issue 18): contenders are the micro-batches a run really
uses, each trial's optimizer update is counted once per optimizer step of the run (not once per
trial), and a trial holds the gradients between steps as training does."""
import pytest

import autofit.planning.contest as contest
from autofit.devices.cpu_budget import BudgetedCpuDevice
from autofit.planning import planner
from autofit.planning.budget import compute_budget
from autofit.planning.candidates import Levers, Space
from autofit.planning.search import ESTIMATE_ERROR_BOUND, TrialRunner
from autofit.planning.split import run_size, run_sizes
from autofit.planning.trials import TrialSettings, run_trial
from autofit.records import TrialRecord
from tests.test_contest import Clock, cfg_for, contest_runner
from trainer.config.train_config import load_config

STD = Levers("float32", 0, "standard")


def test_run_sizes_are_the_largest_micro_batch_of_each_balanced_split():
    assert run_sizes(32) == [1, 2, 3, 4, 5, 6, 7, 8, 11, 16, 32]
    assert run_size(32, 10) == 8 and run_size(32, 12) == 11 and run_size(32, 20) == 16 and run_size(32, 40) == 32
    for E in (1, 7, 24, 100):
        assert all(run_size(E, m) == m for m in run_sizes(E))  # each is its own run size
        assert {run_size(E, m) for m in range(1, E + 1)} == set(run_sizes(E))


def test_a_reading_counts_the_optimizer_update_once_per_optimizer_step_of_the_run():
    t = TrialRecord(micro_batch=8, dtype="float32", compile=False, checkpointing=0, loss_impl="standard",
                    status="fit", tokens_per_step=100, step_seconds=[1.0, 2.0], update_seconds=[0.5, 0.2],
                    step_cpu_seconds=[2.0, 4.0], update_cpu_seconds=[1.0, 0.4], optimizer_step_tokens=400)
    # the micro-batches' time over the trial's tokens, the update's over the run's step
    assert contest.readings(t, cpu=False) == pytest.approx([0.5 / 100 + 0.5 / 400, 1.8 / 100 + 0.2 / 400])
    assert contest.seconds_per_token(t, cpu=True) == pytest.approx(1.0 / 100 + 1.0 / 400)
    assert contest.run_tokens_per_s(t) == pytest.approx(1 / (0.5 / 100 + 0.5 / 400))
    old = t.model_copy(update={"update_seconds": [], "update_cpu_seconds": []})  # a record from before
    assert contest.seconds_per_token(old, cpu=False) == pytest.approx(1.0 / 100)


class UpdateClock(Clock):
    """Every step's micro-batches cost the same per token at every size (a flat rate), and every
    step pays a fixed optimizer update of `update` seconds, as a small model's AdamW does."""

    def __init__(self, per_token, update):
        super().__init__(lambda c: per_token, p=0.0)
        self.update = update

    def record(self, cfg, cand, rank_batch, timed_steps, peak):
        rec = super().record(cfg, cand, rank_batch, timed_steps, peak)
        rec.step_cpu_seconds = [s + self.update for s in rec.step_cpu_seconds]
        rec.step_seconds = [s + self.update for s in rec.step_seconds]
        rec.update_cpu_seconds = rec.update_seconds = [self.update] * timed_steps
        rec.optimizer_step_tokens = rank_batch * cfg.block_size
        return rec


def test_a_large_optimizer_update_does_not_make_a_larger_micro_batch_look_faster(monkeypatch):
    """At a flat rate, 4 x 4 and 8 x 2 pay the same update once per optimizer step: the same speed,
    so the tie goes to the headroom of the smaller size. A figure that spread each trial's update
    over its own two micro-batches would call 8 a clear winner (the old bias)."""
    cfg = cfg_for(16)
    clock = UpdateClock(per_token=1e-5, update=0.01)
    runner = contest_runner(cfg, clock, monkeypatch)
    contenders = [clock.record(cfg, STD.candidate(m), 16, 2, 1000 * m) for m in (8, 4)]
    unprojected = [t.model_copy(update={"update_seconds": [], "update_cpu_seconds": []}) for t in contenders]
    assert contest.seconds_per_token(unprojected[1], True) > 1.2 * contest.seconds_per_token(unprojected[0], True)
    d = contest.decide(runner, contenders)
    assert d.winner.micro_batch == 4 and len(d.tied) == 2


def test_a_real_trial_times_its_optimizer_update_apart():
    cfg = cfg_for(16)
    dev = BudgetedCpuDevice(budget_bytes=1 << 30)
    r = run_trial(cfg, STD.candidate(4), dev, rank_batch=16, budget_bytes=1 << 30, settings=TrialSettings(steps=2))
    assert r.status == "fit" and len(r.update_seconds) == len(r.step_seconds) == 2
    assert len(r.update_cpu_seconds) == 2
    assert all(0 < u < s for u, s in zip(r.update_seconds, r.step_seconds))
    assert r.tokens_per_step == 8 * cfg.block_size and r.optimizer_step_tokens == 16 * cfg.block_size


@pytest.mark.parametrize("checkpointing, loss", [(0, "standard"), (1, "chunked")])
def test_a_whole_batch_trial_measures_the_gradients_training_holds(checkpointing, loss):
    """With one micro-batch per step, training's backward makes the gradients (zero_grad sets
    them to None between steps): a trial that kept the primed zero gradients measured one
    gradient copy more than training holds (7.4 % of this model's peak). The estimate, which
    follows training, is within its proven bound of the trial."""
    cfg = load_config(preset="tiny", overrides=["n_layer=2", "n_embd=32", "n_head=2", "block_size=32",
                                                "vocab_size=512", "batch_size=16", "gradient_accumulation_steps=1"])
    dev = BudgetedCpuDevice(budget_bytes=1 << 30)
    runner = TrialRunner(cfg, dev, 1 << 30, TrialSettings())
    cand = Levers("float32", checkpointing, loss).candidate(16)
    r = run_trial(cfg, cand, dev, rank_batch=16, budget_bytes=1 << 30)
    est = runner.estimate(cand)
    assert r.status == "fit" and abs(est - r.measured_peak_bytes) <= ESTIMATE_ERROR_BOUND["cpu"] * r.measured_peak_bytes


def test_the_probe_runs_and_plans_only_sizes_a_run_uses():
    """A budget where 9 fits at an effective batch of 32: a run capped at 9 or 10 runs 8 x 4, so
    the probe runs no trial of 9 or 10, and the plan's micro-batch is a run size it measured."""
    cfg = load_config(preset="tiny", overrides=["n_layer=2", "n_embd=64", "n_head=2", "block_size=64"])
    dev = BudgetedCpuDevice(budget_bytes=10 * 2**20)
    space = Space(dtypes=["float32"], compile=[False], checkpointing=[0], loss_impls=["standard"])
    res = planner.probe_measured(cfg, dev, compute_budget(dev.info, 0.1), space, settings=TrialSettings())
    ran = {t.micro_batch for t in res.trials if t.status != "pruned"}
    assert ran <= set(run_sizes(32)) and not {9, 10} & ran
    assert res.plan.micro_batch in {t.micro_batch for t in res.trials if t.status == "fit"}
    assert sum(res.plan.micro_batches) == 32


@pytest.mark.parametrize("steep", [True, False])
def test_a_half_size_far_slower_in_its_search_readings_is_not_re_timed(steep, monkeypatch):
    """A combination's half size whose search readings take more than 1.25x the time per token of
    its largest fit cannot make a faster plan: it is not re-timed (a wrong drop costs headroom
    only). One within that is a contender and is re-timed."""
    from tests.test_contest import plan_with
    cfg = cfg_for(64)
    space = Space(dtypes=["float32"], compile=[False], checkpointing=[0], loss_impls=["standard"])
    largest = {}
    clock = Clock(lambda c: 1.0 if c.micro_batch >= largest.get("m", 10**9) else (1.6 if steep else 1.1), p=0.0)
    orig = clock.record
    seen = []

    def record(cfg, cand, rank_batch, timed_steps, peak):
        seen.append(cand.micro_batch)
        return orig(cfg, cand, rank_batch, timed_steps, peak)
    clock.record = record
    # the largest fit under this budget, found first with a flat clock
    flat, _ = plan_with(cfg, 2_500_000, space, Clock(lambda c: 1.0, p=0.0), monkeypatch)
    largest["m"] = max(t.micro_batch for t in flat.trials if t.status == "fit")
    res, runner = plan_with(cfg, 2_500_000, space, clock, monkeypatch)
    half = run_size(64, largest["m"] // 2)
    assert (seen.count(half) == 1) == steep  # the search's trial only, or re-timed too
    assert max(res.plan.micro_batches) == largest["m"]  # 1.1x slower still loses the contest


def test_run_sizes_are_every_size_a_cap_runs_found_without_trying_every_cap():
    """The sizes a run can run, by jumping between the values of ceil(B / n): the same set as
    trying every cap 1..B, which took the probe minutes and gigabytes at B = 2^30."""
    from autofit.planning.split import run_size, run_sizes
    for b in list(range(1, 200)) + [511, 512, 1000, 4099]:
        assert run_sizes(b) == sorted({run_size(b, m) for m in range(1, b + 1)}), b
    assert run_sizes(32) == [1, 2, 3, 4, 5, 6, 7, 8, 11, 16, 32]
    assert len(run_sizes(2**20)) < 2 * 2**10 + 1


def _timed(m: int, step_s: float, update_s: float = 0.0) -> TrialRecord:
    """A fitting trial of micro-batch m at block 10: two micro-batches in `step_s`, its update apart."""
    return TrialRecord(micro_batch=m, dtype="float32", compile=False, checkpointing=0, loss_impl="standard",
                       status="fit", tokens_per_step=2 * m * 10, step_seconds=[step_s], update_seconds=[update_s],
                       optimizer_step_tokens=32 * 10, tokens_per_s=2 * m * 10 / step_s)


def test_an_uneven_plans_tokens_per_s_is_its_whole_steps_not_its_largest_sizes():
    from autofit.planning.split import plan_tokens_per_s
    eleven, ten = _timed(11, 0.22), _timed(10, 0.4)  # 1,000 and 500 tokens/s
    # 10 not run: timed at 11's rate, so the step runs at 11's rate
    assert plan_tokens_per_s([11, 11, 10], 10, [eleven]) == pytest.approx(1000.0)
    # 10 run: 220 tokens at 1,000/s and 100 at 500/s, 320 tokens in 0.42 s
    assert plan_tokens_per_s([11, 11, 10], 10, [eleven, ten]) == pytest.approx(320 / 0.42)
    # one size: its own run figure (the update paid once per optimizer step of 320 tokens)
    with_update = _timed(16, 0.5, update_s=0.1)
    assert plan_tokens_per_s([16, 16], 10, [with_update]) == pytest.approx(contest.run_tokens_per_s(with_update))
    assert plan_tokens_per_s([16, 16], 10, []) is None
