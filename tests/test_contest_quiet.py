"""Readings taken on a quiet host (other processes' load on our cores measured from /proc/stat,
autofit.devices.host_load) need no re-timing to be trusted: a contender clearly slower on them is
out before the contest re-times anything; wherever the host was not measured quiet, or the
readings disagree, or the gap is small, the contest re-times as before. Load spans are injected."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

import autofit.planning.contest as contest
from autofit.devices.host_load import QUIET_MIN_SECONDS, QUIET_SHARE, Span
from autofit.planning.candidates import Levers
from autofit.planning.search import TrialRunner
from autofit.planning.trials import TrialSettings
from autofit.records import TrialRecord
from test_contest import Clock, FakeDevice, cfg_for

STD = Levers("float32", 0, "standard")
QUIET = Span(wall=QUIET_MIN_SECONDS, others=0.0, cores=2)
BUSY = Span(wall=QUIET_MIN_SECONDS, others=2 * QUIET_SHARE * 2 * QUIET_MIN_SECONDS, cores=2)


def _runner(cfg, clock, monkeypatch, spans):
    """A contest runner whose search trials ran over the injected load `spans` (candidate -> Span);
    its re-timings come from `clock` and are counted in `retimed`."""
    logs, retimed = [], []

    def retime_trial(cfg, cand, device, *, rank_batch, budget_bytes, settings, **kw):
        retimed.append(cand)
        return clock.record(cfg, cand, rank_batch, settings.steps, 1000 * cand.micro_batch)
    monkeypatch.setattr(contest, "run_trial", retime_trial)
    runner = SimpleNamespace(cfg=cfg, device=None, rank_batch=cfg.effective_batch, budget_bytes=1 << 40,
                             settings=TrialSettings(), kind="cpu", log=logs.append, thirds=set(), host=dict(spans))
    return runner, logs, retimed


def _contest(monkeypatch, cost, spans, second=1.0):
    """decide() on a trial of each candidate in `cost` (true seconds per token): two readings,
    the second of micro-batch 8's `second` times its first (a burst of load in it)."""
    cfg = cfg_for(32)
    clock = Clock(cost.__getitem__, p=0.0, seed=3)
    recs = [clock.record(cfg, c, 32, 2, 1000 * c.micro_batch) for c in cost]
    for r in recs:
        if r.micro_batch == 8:
            r.step_cpu_seconds = [r.step_cpu_seconds[0], second * r.step_cpu_seconds[0]]
    runner, logs, retimed = _runner(cfg, clock, monkeypatch, {c: spans(c) for c in cost})
    return contest.decide(runner, recs), logs, retimed


def test_a_clearly_slower_half_read_on_a_quiet_host_is_out_without_re_timing(monkeypatch):
    cost = {STD.candidate(16): 1.0, STD.candidate(8): 1.15}
    d, logs, retimed = _contest(monkeypatch, cost, lambda c: QUIET)
    assert d.winner.candidate() == STD.candidate(16) and d.rounds == 0 and retimed == []
    assert "others out on their first readings" in d.why
    assert any("not re-timed" in ln and "1.15x" in ln and "quiet host" in ln and "/proc/stat" in ln for ln in logs)


@pytest.mark.parametrize("why, cost, spans, second", [
    ("a busy host", {STD.candidate(16): 1.0, STD.candidate(8): 1.15}, lambda c: BUSY, 1.0),
    ("one trial unmeasured", {STD.candidate(16): 1.0, STD.candidate(8): 1.15},
     lambda c: QUIET if c.micro_batch == 16 else None, 1.0),
    ("a span too short to judge", {STD.candidate(16): 1.0, STD.candidate(8): 1.15},
     lambda c: Span(wall=0.4 * QUIET_MIN_SECONDS, others=0.0, cores=2), 1.0),
    ("a gap inside CLEAR", {STD.candidate(16): 1.0, STD.candidate(8): 1.06}, lambda c: QUIET, 1.0),
    ("readings that disagree", {STD.candidate(16): 1.0, STD.candidate(8): 1.15}, lambda c: QUIET, 1.3),
])
def test_otherwise_the_contender_is_re_timed(monkeypatch, why, cost, spans, second):
    d, logs, retimed = _contest(monkeypatch, cost, spans, second)
    assert retimed, why
    assert not any("quiet host" in ln for ln in logs), why


def test_a_truly_faster_contender_is_never_cut_by_the_quiet_rule(monkeypatch):
    """The rule only cuts contenders slower than the leader on their own readings: the fastest one,
    whatever its size, is kept and wins."""
    cost = {STD.candidate(16): 1.15, STD.candidate(8): 1.0}
    d, logs, retimed = _contest(monkeypatch, cost, lambda c: QUIET)
    assert d.winner.candidate() == STD.candidate(8) and retimed == []


def test_the_runner_adds_each_trial_s_load_to_its_candidate(monkeypatch):
    """TrialRunner.measured: the search trial and each re-timing of a candidate are summed, from
    the injected sampler (wall, our cores' busy seconds, this process's CPU seconds)."""
    samples = iter([(0.0, 0.0, 0.0), (0.3, 0.7, 0.6), (1.0, 1.0, 0.9), (1.3, 1.5, 1.2)])

    def sample():
        return next(samples)
    sample.cores = 2
    runner = TrialRunner(cfg_for(32), FakeDevice(), 1 << 30, TrialSettings(host_load=sample))
    cand = STD.candidate(4)
    rec = TrialRecord(**cand.model_dump(), status="fit")
    assert runner.measured(cand, lambda: rec) is rec
    assert runner.measured(cand, lambda: rec) is rec
    s = runner.host[cand]
    assert (s.wall, s.others, s.cores) == (pytest.approx(0.6), pytest.approx(0.3), 2)
    # without a sampler (a GPU, several ranks) nothing is measured, so nothing is ever judged quiet
    plain = TrialRunner(cfg_for(32), FakeDevice(), 1 << 30, TrialSettings())
    assert plain.measured(cand, lambda: rec) is rec and plain.host == {}
