"""The micro-batch search on its own, with synthetic trials: a device whose peak is exactly
linear in the micro-batch, so every phase's answer is known in advance."""
import pytest

from autofit.planning.candidates import Levers
from autofit.planning.estimate import ModelShape, estimate_peak
from autofit.records import TrialRecord
from autofit.planning.search import MicroBatchSearch, TrialRunner
from autofit.planning.split import run_sizes
from autofit.planning.trials import TrialSettings
from trainer.config.train_config import load_config

LEVERS = Levers("float32", 0, "standard")


class FakeDevice:
    class info:  # noqa: N801 - a DeviceInfo stand-in
        kind, total_bytes = "cpu", 1 << 40


class LinearRunner(TrialRunner):
    """Trials that do not run: the peak is `scale` x the estimate, and fits iff within budget."""

    def __init__(self, cfg, budget_bytes, scale=1.0):
        super().__init__(cfg, FakeDevice(), budget_bytes, TrialSettings(spill_check=False))
        self.estimate_bound = None  # the estimate is wrong by `scale` on purpose: no bound holds
        self.scale = scale
        self.ran: list[int] = []

    def _trial(self, cand, est):
        self.ran.append(cand.micro_batch)
        peak = int(est * self.scale)
        fits = peak <= self.budget_bytes
        return TrialRecord(**cand.model_dump(), status="fit" if fits else "oom", estimated_peak_bytes=est,
                           measured_peak_bytes=peak if fits else None, tokens_per_s=1000.0 * cand.micro_batch)


def cfg_for(effective):
    return load_config(preset="tiny", overrides=["n_layer=1", "n_embd=32", "n_head=2", "block_size=32",
                                                 "vocab_size=256", f"batch_size={effective}",
                                                 "gradient_accumulation_steps=1"])


def truth(cfg, budget, scale):
    """The largest run size (a size a balanced split of the batch runs) whose (scaled) estimated
    peak fits: the right answer."""
    shape = ModelShape.from_config(cfg)
    best = 0
    for m in run_sizes(cfg.effective_batch):
        n_micro = 2 if cfg.effective_batch > m else 1
        est = estimate_peak(shape, m, dtype="float32", checkpointing=0, loss_impl="standard", device="cpu",
                            n_micro=n_micro).peak_bytes
        if int(est * scale) <= budget:
            best = m
    return best


@pytest.mark.parametrize("scale", [0.5, 1.0, 1.3, 2.0, 4.0])
def test_search_finds_the_largest_fit_whatever_the_estimate_error(scale):
    cfg = cfg_for(64)
    budget = 2_500_000
    want = truth(cfg, budget, scale)
    runner = LinearRunner(cfg, budget, scale)
    got = MicroBatchSearch(runner, LEVERS).run()
    assert got == want
    sizes = run_sizes(cfg.effective_batch)
    if 0 < want < cfg.effective_batch:  # bracketed on both sides: want fits, the next run size was tried and failed
        status = {t.micro_batch: t.status for t in runner.trials}
        assert status[want] == "fit" and status[sizes[sizes.index(want) + 1]] == "oom"
    assert len(runner.ran) == len(set(runner.ran))  # every size at most once
    assert set(runner.ran) <= set(sizes)  # never a size no run uses (at 64, 21 runs as 16s)


def test_the_search_tries_only_sizes_a_run_can_use():
    """At an effective batch of 32 a run capped at 9 or 10 runs 8 x 4: the largest fit the search
    reports is 8, even where 10 would fit, and no trial of 9 or 10 runs."""
    cfg = cfg_for(32)
    shape = ModelShape.from_config(cfg)
    est10 = estimate_peak(shape, 10, dtype="float32", checkpointing=0, loss_impl="standard", device="cpu",
                          n_micro=2).peak_bytes
    runner = LinearRunner(cfg, est10 + 1, 1.0)  # 10 fits, 11 does not
    assert MicroBatchSearch(runner, LEVERS).run() == 8
    assert not {9, 10} & set(runner.ran) and 11 in runner.ran
    assert run_sizes(32) == [1, 2, 3, 4, 5, 6, 7, 8, 11, 16, 32]


def test_accurate_estimate_needs_few_trials():
    cfg = cfg_for(64)
    runner = LinearRunner(cfg, 2_500_000, 1.0)
    got = MicroBatchSearch(runner, LEVERS).run()
    assert got == truth(cfg, 2_500_000, 1.0)
    assert len(runner.ran) <= 3  # the estimate, then one past it


def test_nothing_fits_is_zero():
    cfg = cfg_for(8)
    runner = LinearRunner(cfg, 10_000, 1.0)
    assert MicroBatchSearch(runner, LEVERS).run() == 0


def test_everything_fits_is_the_whole_batch():
    cfg = cfg_for(8)
    runner = LinearRunner(cfg, 1 << 34, 1.0)
    assert MicroBatchSearch(runner, LEVERS).run() == 8


def test_spill_check_backs_off_a_size_that_is_far_slower():
    cfg = cfg_for(16)

    class SlowAtTen(LinearRunner):
        def _trial(self, cand, est):
            rec = super()._trial(cand, est)
            if cand.micro_batch >= 10 and rec.status == "fit":
                rec.tokens_per_s = 10.0  # injected: 100x slower per token than below 10
            return rec

    runner = SlowAtTen(cfg, 1 << 34, 1.0)
    runner.spill_check = True
    got = MicroBatchSearch(runner, LEVERS).run()
    assert got < 10
    assert all(t.status == "spill" for t in runner.trials if t.micro_batch >= 10 and t.status != "oom")


def test_a_trials_log_line_shows_the_peak_it_was_judged_on_with_its_label():
    """On CUDA a trial is judged on its reserved peak: the line printed only the allocated one, so
    an over-budget trial could read '-> over_budget, measured peak <below the budget>'."""
    runner = TrialRunner(cfg_for(8), FakeDevice(), 3 << 20, TrialSettings(spill_check=False))
    lines = []
    runner.log = lines.append
    runner._trial = lambda cand, est: TrialRecord(**cand.model_dump(), status="over_budget",
                                                  measured_peak_bytes=2 << 20, measured_reserved_bytes=4 << 20)
    runner.estimate_bound = None
    runner.run(LEVERS.candidate(2))
    assert lines[-1].startswith("  -> over_budget, measured peak 2.0 MiB allocated, 4.0 MiB reserved"), lines
