"""Other processes' load during a probe on the CPU (autofit.devices.host_load): measured from
/proc/stat, and said when it oversubscribed the cores (the contest's CPU-time figures then grow
with the load, and the choice may not be a quiet machine's)."""
from __future__ import annotations

import json
import os

import pytest

from autofit.cli.app import main  # noqa: F401
from autofit.devices import host_load
from autofit.devices.host_load import Load, LoadMeter, busy_seconds
from autofit.launch.probe import load_words
from cli_run import cli

TICK = os.sysconf("SC_CLK_TCK")


def _stat(path, per_core: dict[int, tuple[int, int, int, int]]) -> None:
    """A /proc/stat with cpuN lines of (user, system, idle, steal) ticks, and a total line to ignore."""
    lines = ["cpu  999999 0 999999 0 0 0 0 0 0 0"]
    lines += [f"cpu{c} {u} 0 {s} {i} 7 0 0 {st} 0 0" for c, (u, s, i, st) in sorted(per_core.items())]
    path.write_text("\n".join(lines + ["intr 1 2 3"]) + "\n")


def test_busy_seconds_sums_the_busy_ticks_of_the_cores_named_only(tmp_path):
    stat = tmp_path / "stat"
    _stat(stat, {0: (100, 20, 5000, 3), 1: (40, 10, 900, 0), 2: (1000, 1000, 0, 0)})
    # idle and iowait are not busy; core 2 is not ours
    assert busy_seconds([0, 1], str(stat)) == pytest.approx((123 + 50) / TICK)
    assert busy_seconds([5], str(stat)) is None
    assert busy_seconds([0], str(tmp_path / "missing")) is None


def test_the_meter_leaves_out_this_process_own_cpu_time(tmp_path, monkeypatch):
    stat = tmp_path / "stat"
    monkeypatch.setattr(host_load, "_cores", lambda: [0, 1])
    _stat(stat, {0: (0, 0, 0, 0), 1: (0, 0, 0, 0)})
    clock, own = iter([10.0, 20.0]), iter([1.0, 4.0])  # 10 s of wall time, 3 s of our own CPU time
    with LoadMeter(str(stat), clock=lambda: next(clock), own=lambda: next(own)) as m:
        _stat(stat, {0: (8 * TICK, 0, 0, 0), 1: (5 * TICK, 0, 0, 0)})  # 13 s busy on our 2 cores
    assert m.load == Load(others_cores=pytest.approx(1.0), cores=2, seconds=10.0)
    assert m.load.busy and "kept 1.0 of this process's 2 cores busy over 10 s (measured from /proc/stat)" in m.load.words()


@pytest.mark.parametrize("others, said", [(0.1, False), (0.4, False), (0.5, True), (1.8, True)])
def test_a_line_is_added_only_past_a_fifth_of_the_cores(others, said):
    line = load_words(Load(others_cores=others, cores=2, seconds=30.0), environ={})
    assert (line is not None) == said
    if said:
        assert line.startswith("load: other processes kept") and "probe again when it is quiet" in line
        assert "OMP_WAIT_POLICY=PASSIVE" in line  # the way out, named
    assert load_words(None, environ={}) is None


def test_with_sleeping_waits_the_line_says_the_figures_were_not_inflated():
    line = load_words(Load(others_cores=1.5, cores=2, seconds=30.0), environ={"OMP_WAIT_POLICY": "passive"})
    assert "OpenMP's waiting threads slept" in line and "did not count in the CPU-time figures" in line
    assert "probe again" not in line


def _choose(environ, average, cores=2, modules=()):
    return host_load.choose_openmp_wait(environ, loadavg=lambda: (average, 0.0, 0.0), cores=cores,
                                        loaded_modules=set(modules))


@pytest.mark.parametrize("average, passive", [(0.0, False), (0.4, False), (0.41, True), (3.0, True)])
def test_sleeping_waits_are_chosen_only_on_a_machine_loaded_at_start(average, passive, monkeypatch):
    monkeypatch.setitem(host_load._WAIT_SET, "line", None)
    env: dict[str, str] = {}
    line = _choose(env, average)
    assert (env.get("OMP_WAIT_POLICY") == "PASSIVE") == passive and (line is not None) == passive
    assert host_load.openmp_wait_line() == line
    if passive:
        assert f"load average {average:.1f} on 2 cores at start" in line and "set OMP_WAIT_POLICY yourself" in line


@pytest.mark.parametrize("env, modules", [({"OMP_WAIT_POLICY": "ACTIVE"}, ()), ({"GOMP_SPINCOUNT": "10k"}, ()),
                                          ({}, ("torch",))])
def test_a_users_own_policy_or_a_loaded_torch_is_left_as_it_is(env, modules, monkeypatch):
    monkeypatch.setitem(host_load._WAIT_SET, "line", None)
    before = dict(env)
    assert _choose(env, 9.0, modules=modules) is None and env == before and host_load.openmp_wait_line() is None


def test_no_load_average_sets_nothing():
    def none():
        raise OSError("no load average")
    env: dict[str, str] = {}
    assert host_load.choose_openmp_wait(env, loadavg=none, cores=2, loaded_modules=set()) is None and env == {}


def test_the_entry_point_chooses_before_the_cli_and_torch_load(monkeypatch):
    """autofit.__main__.run asks before it imports the CLI (which the commands' torch follows): libgomp
    reads the policy once, when torch loads it."""
    import autofit.__main__ as entry
    seen = []
    monkeypatch.setattr(host_load, "choose_openmp_wait", lambda: seen.append("chosen"))
    import autofit.cli.app as app
    monkeypatch.setattr(app, "main", lambda: seen.append("main"))
    with pytest.raises(SystemExit):
        entry.run()
    assert seen == ["chosen", "main"]


def test_a_probe_on_a_loaded_cpu_says_so_in_its_notes(tmp_path, monkeypatch, capsys):
    """The line reaches the user (stderr) and the JSON's notes; the meter is faked to read a load."""
    class Busy(LoadMeter):
        def __exit__(self, *exc):
            self.load = Load(others_cores=1.5, cores=2, seconds=12.0)
    monkeypatch.setattr("autofit.launch.probe.LoadMeter", Busy)
    monkeypatch.setenv("AUTOFIT_HOME", str(tmp_path / "home"))
    small = ["--set", "n_layer=1", "--set", "n_embd=32", "--set", "n_head=2", "--set", "block_size=32",
             "--set", "batch_size=4", "--set", "gradient_accumulation_steps=2"]
    code, out, err = cli(monkeypatch, capsys, "probe", "--device", "cpu", "--budget", "64MiB", *small,
                         "--dtype", "float32", "--checkpointing", "0", "--loss", "standard", "--json")
    assert code == 0, err
    notes = json.loads(out)["notes"]
    assert any(n.startswith("load: other processes kept 1.5 of this process's 2 cores busy") for n in notes), notes
