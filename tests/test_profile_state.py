"""Profiles and checkpoints as state on disk (r3's review, session 14): links written through,
repair commands a shell can take, lessons that a fresh probe can undo, schema versions."""
import os
import shlex
import subprocess
import tomllib
from datetime import datetime, timedelta, timezone

import pytest
import tomli_w

from autofit.profiles import store as profiles
from autofit.profiles.manage import remove_profile
from autofit.profiles.store import ProfileError, load_profile, profile_path, record_event, save_plan
from trainer.writes import atomic_write

from test_profiles import HW_4070, make_plan


@pytest.fixture(autouse=True)
def autofit_home(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOFIT_HOME", str(tmp_path / "my home ü"))
    return tmp_path / "my home ü"


def test_a_symlinked_profile_is_written_through_and_stays_a_link(tmp_path):
    """r3's 7: reading follows the link; a lesson replaced the link by a file and the linked copy
    (a dotfiles repo) never had it."""
    plan = make_plan()
    dotfiles = tmp_path / "dotfiles"
    dotfiles.mkdir()
    real = save_plan("rtx4070-12gb", HW_4070, plan).rename(dotfiles / "rtx4070-12gb.toml")
    link = profile_path("rtx4070-12gb")
    link.symlink_to(real)
    record_event("rtx4070-12gb", plan.fingerprint, "step 3: oom_shrink 12 -> 8", safe_micro_batch=8)
    assert link.is_symlink() and load_profile("rtx4070-12gb").plans[plan.fingerprint].safe_micro_batch == 8
    assert "safe_micro_batch = 8" in real.read_text()
    assert not [p for p in link.parent.iterdir() if p.name.endswith(".tmp")]


def test_a_symlinked_checkpoint_is_replaced_at_its_target(tmp_path):
    """A ckpt.pt linked to a bigger disk stays there: the temp file goes beside the target."""
    big, out = tmp_path / "big", tmp_path / "out"
    big.mkdir(), out.mkdir()
    (big / "ckpt.pt").write_bytes(b"old")
    (out / "ckpt.pt").symlink_to(big / "ckpt.pt")
    atomic_write(out / "ckpt.pt", lambda f: f.write(b"new"))
    assert (out / "ckpt.pt").is_symlink() and (big / "ckpt.pt").read_bytes() == b"new"


def test_the_side_file_repair_command_is_shell_quoted(autofit_home, tmp_path):
    """r3's 8: with a space in AUTOFIT_HOME the printed `mv a b` split into four words; run through
    a shell as printed, it must make the kept plan the profile."""
    path = profile_path("rtx4070-12gb")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not = [toml")
    plan = make_plan()
    with pytest.raises(ProfileError) as info:
        save_plan("rtx4070-12gb", HW_4070, plan)
    side = profiles.side_file_path(path, plan.fingerprint)
    mv = str(info.value).split(" && ")[1]
    assert shlex.split(mv) == ["mv", str(side), str(path)]
    path.unlink()
    subprocess.run(mv, shell=True, check=True)
    assert plan.fingerprint in load_profile("rtx4070-12gb").plans and not os.path.exists(side)


# ---------------------------------------------------------------- lessons (r3's 1)


def _learn(plan, safe=8, compile_failed=None):
    record_event("rtx4070-12gb", plan.fingerprint, "step 3: oom_shrink 12 -> 8", safe_micro_batch=safe,
                 compile_failed=compile_failed, step=3, failed_micro_batch=12, run="out")


def test_a_probe_clears_the_lessons_from_before_it_and_keeps_those_learnt_while_it_ran():
    plan = make_plan()
    save_plan("rtx4070-12gb", HW_4070, plan)
    _learn(plan, compile_failed=True)
    got = load_profile("rtx4070-12gb").plans[plan.fingerprint]
    assert got.safe_micro_batch_lesson.step == 3 and got.safe_micro_batch_lesson.failed_micro_batch == 12
    assert got.compile_failed_lesson.run == "out"
    # a probe started after the lesson measured again: the lesson goes, an event says so
    started = datetime.now(timezone.utc)
    save_plan("rtx4070-12gb", HW_4070, make_plan(), probed_since=started)
    got = load_profile("rtx4070-12gb").plans[plan.fingerprint]
    assert got.safe_micro_batch is None and not got.compile_failed and got.safe_micro_batch_lesson is None
    assert "lessons from before the probe cleared: safe micro-batch 8 (step 3 of run out" in got.events[-1]
    # a run that reports while the probe runs: its lesson is newer than the probe's start and stays
    started = datetime.now(timezone.utc) - timedelta(seconds=1)
    _learn(plan, safe=4)
    save_plan("rtx4070-12gb", HW_4070, make_plan(), probed_since=started)
    assert load_profile("rtx4070-12gb").plans[plan.fingerprint].safe_micro_batch == 4


def test_a_version_1_profiles_lessons_are_older_than_any_probe_and_its_file_is_written_at_2():
    """A file of schema 1 (no lesson stamps, no searched_under) still loads; its lessons, of an
    unknown date, are cleared by a new probe (said in the event), and the file is written back at
    SCHEMA_VERSION so an older autofit says 'upgrade', not 'corrupt'."""
    plan = make_plan()
    path = save_plan("rtx4070-12gb", HW_4070, plan)
    raw = tomllib.loads(path.read_text())
    raw["schema_version"] = 1
    raw["plans"][plan.fingerprint].update(safe_micro_batch=2, compile_failed=True)
    path.write_text(tomli_w.dumps(raw))
    got = load_profile("rtx4070-12gb")
    assert got.schema_version == 1 and got.plans[plan.fingerprint].safe_micro_batch == 2
    save_plan("rtx4070-12gb", HW_4070, make_plan(), probed_since=datetime.now(timezone.utc))
    raw = tomllib.loads(path.read_text())
    assert raw["schema_version"] == profiles.SCHEMA_VERSION == 2
    fitted = load_profile("rtx4070-12gb").plans[plan.fingerprint]
    assert fitted.safe_micro_batch is None and not fitted.compile_failed
    assert "learnt at an unknown time" in fitted.events[-1]


def test_lessons_are_cleared_by_hand_keeping_the_plan_and_the_run_note_says_how():
    plan = make_plan()
    save_plan("rtx4070-12gb", HW_4070, plan)
    _learn(plan, compile_failed=True)
    fitted = load_profile("rtx4070-12gb").plans[plan.fingerprint]
    notes = profiles.lesson_notes(fitted, 12, True, "rtx4070-12gb")
    how = f"clear with: autofit profiles rm rtx4070-12gb --plan {plan.fingerprint} --lessons"
    assert len(notes) == 2 and all(how in n for n in notes)
    assert "micro-batch lowered to 8 by an earlier run-time OOM (step 3 of run out, micro-batch 12 ran out" in notes[0]
    # t11's L3 quoted the first note with its '(' unclosed; each note closes what it opens, and ends with it
    assert all(n.count("(") == n.count(")") and n.endswith("--lessons)") for n in notes), notes
    said = remove_profile("rtx4070-12gb", plan.fingerprint[:6], lessons=True)
    assert "cleared the lessons" in said and "safe micro-batch 8" in said and "compile off" in said
    fitted = load_profile("rtx4070-12gb").plans[plan.fingerprint]
    assert fitted.safe_micro_batch is None and not fitted.compile_failed and fitted.trials  # the plan stays
    assert "no lessons to clear" in remove_profile("rtx4070-12gb", lessons=True)


def test_the_cli_clears_lessons_and_a_run_note_names_the_command(monkeypatch, capsys):
    from cli_run import cli
    plan = make_plan()
    save_plan("rtx4070-12gb", HW_4070, plan)
    _learn(plan)
    code, out, err = cli(monkeypatch, capsys, "profiles", "rm", "rtx4070-12gb", "--plan", plan.fingerprint,
                         "--lessons")
    assert code == 0 and "cleared the lessons" in out, err
    assert load_profile("rtx4070-12gb").plans[plan.fingerprint].safe_micro_batch is None
    code, out, err = cli(monkeypatch, capsys, "profiles", "rm", "rtx4070-12gb", "--plan", "zzzz", "--lessons")
    assert code != 0 and "no plan zzzz" in err and len(err.strip().splitlines()) == 1


def test_show_lists_the_plan_a_run_runs_after_a_lesson_lowered_it(monkeypatch, capsys):
    """t6's L5: after a run-time OOM lowered a saved plan, `profiles show` listed the saved size's
    figures (32 x 1, 5.5 MiB, its tokens/s) while `run --profile` ran the lowered size with its own
    trial's: show now lists what the run runs (launch.lowered.run_plan), the saved size beside it."""
    import json

    from autofit.launch.lowered import run_plan
    from autofit.records import TrialRecord
    from cli_run import cli
    plan = make_plan()  # micro-batch 12, compile on, chunked loss, bfloat16
    plan.trials.append(TrialRecord(micro_batch=8, dtype="bfloat16", compile=True, checkpointing=0,
                                   loss_impl="chunked", status="fit", measured_peak_bytes=6_000_000_000,
                                   tokens_per_s=30_000.0, steps_run=3, seconds=2.0))
    save_plan("rtx4070-12gb", HW_4070, plan)
    _learn(plan)  # safe micro-batch 8, learnt at step 3 of run out
    fitted = load_profile("rtx4070-12gb").plans[plan.fingerprint]
    runs, _ = run_plan(fitted, None, "cuda")  # the trial of that size: no estimate, no config needed
    assert runs.micro_batch == 8 and runs.measured_peak_bytes == 6_000_000_000 and runs.tokens_per_s == 30_000
    monkeypatch.setenv("COLUMNS", "600")
    code, out, err = cli(monkeypatch, capsys, "profiles", "show", "rtx4070-12gb")
    assert code == 0, err
    learnt = f"{fitted.safe_micro_batch_lesson.learned:%Y-%m-%d %H:%M} UTC"
    assert f"{runs.split}" in out and "30,000" in out and "5.59 GiB" in out, out
    assert f"saved 512 = 42 × 12 + 8; lowered to 8 by a lesson of {learnt}" in out, out
    assert "41,234" not in out and "9.43 GiB" not in out, out  # the saved size's figures are not the run's
    code, out, err = cli(monkeypatch, capsys, "profiles", "show", "rtx4070-12gb", "--json")
    got = json.loads(out)["plans"][plan.fingerprint]
    assert got["plan"]["micro_batch"] == 12 and got["runs_as"]["micro_batch"] == 8, got["runs_as"]


# ---------------------------------------------------------------- schema versions (r3's 2)


def test_a_newer_profile_says_upgrade_not_corrupt():
    """A file of a newer schema whose fields this autofit does not know: 'upgrade autofit', not
    'is not an autofit profile' (whose fix, rm, would lose every plan)."""
    plan = make_plan()
    path = save_plan("rtx4070-12gb", HW_4070, plan)
    raw = tomllib.loads(path.read_text())
    raw["schema_version"] = profiles.SCHEMA_VERSION + 1
    raw["plans"][plan.fingerprint]["future_field"] = 1
    path.write_text(tomli_w.dumps(raw))
    with pytest.raises(ProfileError, match="written by a newer autofit .*upgrade autofit"):
        load_profile("rtx4070-12gb")
    raw["schema_version"] = profiles.SCHEMA_VERSION  # this version's, with a field it does not have
    path.write_text(tomli_w.dumps(raw))
    with pytest.raises(ProfileError, match=f"plans.{plan.fingerprint}.future_field: unknown field"):
        load_profile("rtx4070-12gb")


def test_the_profile_fields_are_pinned_to_the_schema_version():
    """A field added to the models that forbid unknown keys fails here until SCHEMA_VERSION is
    bumped (and this list updated): an older autofit then says 'upgrade' instead of 'corrupt, rm
    it'. (PlanRecord and TrialRecord ignore keys they do not know: an older autofit drops them.)"""
    from autofit.profiles.store import FittedPlan, Lesson, SavedProfile
    fields = {m.__name__: sorted(m.model_fields) for m in (SavedProfile, FittedPlan, Lesson)}
    pinned = {2: {
        "SavedProfile": ["device_note", "hardware", "name", "plans", "schema_version"],
        "FittedPlan": ["compile_failed", "compile_failed_lesson", "config_summary", "created", "events", "fingerprint",
                       "fingerprint_inputs", "plan", "safe_micro_batch", "safe_micro_batch_lesson", "searched_under",
                       "trials", "updated"],
        "Lesson": ["failed_micro_batch", "learned", "run", "step"]}}
    assert profiles.SCHEMA_VERSION in pinned, "SCHEMA_VERSION changed: pin its fields here"
    assert fields == pinned[profiles.SCHEMA_VERSION], "a profile field changed: bump SCHEMA_VERSION"
    for model in (SavedProfile, FittedPlan, Lesson):
        assert model.model_config.get("extra") == "forbid"


def test_probe_save_clears_a_lesson_from_before_it(monkeypatch, capsys):
    """The whole path: `probe --save` stamps the probe's start, and a lesson learnt before it (a
    transient OOM) no longer lowers the plan; r3 saw 'safe 1' survive every new probe."""
    import json

    from cli_run import cli
    args = ["probe", "--device", "cpu", "--budget", "64MiB", "--preset", "tiny", "--set", "n_layer=1", "--set",
            "n_embd=16", "--set", "n_head=2", "--set", "block_size=16", "--set", "batch_size=4", "--set",
            "gradient_accumulation_steps=1", "--dtype", "float32", "--no-compile", "--checkpointing", "0", "--loss",
            "standard",
            "--save", "--json"]
    code, out, err = cli(monkeypatch, capsys, *args)
    assert code == 0, err
    saved = json.loads(out)["saved"]
    record_event(saved["profile"], saved["fingerprint"], "step 3: oom_shrink 4 -> 1", safe_micro_batch=1, step=3)
    code, out, err = cli(monkeypatch, capsys, *args)
    assert code == 0, err
    fitted = load_profile(saved["profile"]).plans[saved["fingerprint"]]
    assert fitted.safe_micro_batch is None and "lessons from before the probe cleared" in fitted.events[-1]
    # t6's L2: the probe itself says so, in one line on stderr
    said = [ln for ln in err.splitlines() if "the new probe replaces lessons" in ln]
    assert len(said) == 1 and said[0].startswith(f"autofit: profile {saved['profile']}: the new probe replaces "
                                                 "lessons runs learnt before it: safe micro-batch 1 ("), err
    code, out, err = cli(monkeypatch, capsys, *args)  # nothing to clear: nothing said
    assert code == 0 and "the new probe replaces lessons" not in err


def test_fitted_is_when_the_plan_was_probed_not_its_last_lesson():
    """t6's L1: 'fitted <date>' (run) and 'profiles show' give `updated`, which a lesson and its
    clearing by hand moved: a plan probed at 20:33 read 'fitted 20:34' after a 20:34 lesson."""
    from autofit.profiles.lessons import clear_lessons
    plan = make_plan()
    save_plan("rtx4070-12gb", HW_4070, plan)
    fitted_at = load_profile("rtx4070-12gb").plans[plan.fingerprint].updated
    _learn(plan, compile_failed=True)
    got = load_profile("rtx4070-12gb").plans[plan.fingerprint]
    assert got.safe_micro_batch == 8 and got.updated == fitted_at
    clear_lessons(got)
    assert got.updated == fitted_at and "lessons cleared by hand" in got.events[-1]
    save_plan("rtx4070-12gb", HW_4070, make_plan(), probed_since=datetime.now(timezone.utc))
    assert load_profile("rtx4070-12gb").plans[plan.fingerprint].updated > fitted_at  # probed again


def test_a_resumed_profile_run_records_its_lessons(tmp_path):
    """r3's 5: a resumed `run --profile` set no event handler, so an OOM shrink after the resume
    never reached the profile, and the next run started again at the size that ran out."""
    import torch

    from autofit.launch.probe import ProbeOptions
    from autofit.launch.resume import prepare_resume
    from trainer.loop import RunOptions, train
    from test_writes import _cfg
    plan = make_plan()
    save_plan("rtx4070-12gb", HW_4070, plan)
    out = tmp_path / "o"
    train(_cfg(out), RunOptions(device=torch.device("cpu"), progress=False, max_steps=1,
                                plan_info={"profile": "rtx4070-12gb", "fingerprint": plan.fingerprint}))
    launch = prepare_resume(str(out), {}, probe_opts=ProbeOptions(), max_steps=None, progress=False,
                            log=lambda s: None)
    assert launch.opts.on_event is not None
    launch.opts.on_event({"event": "oom_shrink", "step": 2, "old_micro_batch": 4, "new_micro_batch": 2})
    fitted = load_profile("rtx4070-12gb").plans[plan.fingerprint]
    assert fitted.safe_micro_batch == 2 and fitted.safe_micro_batch_lesson.run == str(out)


# ---------------------------------------------------------------- writes cut short (r3's 4)


def test_checkpoint_writes_cut_short_are_removed_at_the_next_run_and_said(tmp_path, capsys):
    """A kill -9 during torch.save leaves '.ckpt.pt.XXXXXXXX.tmp' (as big as a checkpoint), one
    more per kill; the next run in that --out removes them, says so, and leaves the user's files."""
    import torch

    from trainer.loop import RunOptions, train
    from test_writes import _cfg
    out = tmp_path / "o"
    out.mkdir()
    cut = [out / ".ckpt.pt.k3j9x_2q.tmp", out / ".ckpt.pt.a0b1c2d3.tmp"]
    mine = [out / ".ckpt.pt.mine.tmp", out / "notes.tmp", out / ".ckpt.pt.k3j9x_2q.tmp.bak"]
    for p in cut + mine:
        p.write_bytes(b"\0" * 2**20)
    train(_cfg(out), RunOptions(device=torch.device("cpu"), progress=False, max_steps=1))
    assert not any(p.exists() for p in cut) and all(p.exists() for p in mine)
    assert f"removed 2 checkpoint writes cut short (2.0 MiB, measured on disk) in {out}" in capsys.readouterr().out


def test_profile_writes_cut_short_are_removed_under_the_lock():
    plan = make_plan()
    path = save_plan("rtx4070-12gb", HW_4070, plan)
    left = path.parent / f".{path.name}.k3j9x_2q.tmp"
    other = path.parent / ".other.toml.k3j9x_2q.tmp"  # another profile's: its own lock clears it
    left.write_text("x"), other.write_text("x")
    record_event("rtx4070-12gb", plan.fingerprint, "step 3: oom_shrink 12 -> 8", safe_micro_batch=8)
    assert not left.exists() and other.exists()


# ---------------------------------------------------------------- evaluation after a shrink (r3's 6)


def test_a_resume_after_an_oom_shrink_evaluates_as_the_uninterrupted_run(tmp_path):
    """The uninterrupted run built its evaluator before the shrink (micro-batch 4); a resume built it
    at the shrunk size (2), and summing other slices moved the val loss in the 7th digit, enough
    to flip a near-tie for the best checkpoint. The checkpoint now carries the evaluation's size."""
    import torch

    from trainer.loop import RunOptions, train
    from trainer.step import FaultInjector
    from test_writes import _cfg

    def run(out, steps, resume=False, fault=None, micro=4):
        cfg = _cfg(out, max_iters=4, eval_interval=2, eval_iters=2, dropout=0.1, batch_size=8, n_embd=64,
                   gradient_accumulation_steps=1)
        return train(cfg, RunOptions(device=torch.device("cpu"), progress=False, max_steps=steps, micro_batch=micro,
                                     resume=resume, fault=fault))

    whole = run(tmp_path / "a", 4, fault=FaultInjector(1))
    assert whole.micro_batches == [2] * 4  # shrunk from 4
    run(tmp_path / "b", 3, fault=FaultInjector(1))
    run(tmp_path / "b", None, resume=True, micro=2)  # as prepare_resume sizes it: the checkpoint's

    def evals(out):
        import json
        lines = (out / "metrics.jsonl").read_text().splitlines()
        return {r["step"]: r["val_loss"] for r in map(json.loads, lines) if r["type"] == "eval"}
    a, b = evals(tmp_path / "a"), evals(tmp_path / "b")
    assert a[4] == b[4]
    assert torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)["eval_micro_batch"] == 4


def test_checkpoint_writes_cut_short_beside_a_linked_checkpoints_target_are_removed(tmp_path, capsys):
    """A ckpt.pt linked to a bigger disk is written through (atomic_write's temp file sits beside
    the TARGET, named after it): a kill -9 there leaves '.run.pt.XXXXXXXX.tmp' in the target's
    folder, which the next run must find there (t6's M1); the user's look-alikes stay."""
    import torch

    from trainer.loop import RunOptions, train
    from test_writes import _cfg
    out, big = tmp_path / "o", tmp_path / "big"
    train(_cfg(out), RunOptions(device=torch.device("cpu"), progress=False, max_steps=1))
    big.mkdir()
    (out / "ckpt.pt").rename(big / "run.pt")
    (out / "ckpt.pt").symlink_to(big / "run.pt")
    cut = [big / ".run.pt.abcd1234.tmp", out / ".ckpt.pt.wxyz5678.tmp"]  # the second: before 9d9d6dd
    mine = [big / ".run.pt.mine.tmp", big / ".ckpt.pt.abcd1234.tmp", out / ".run.pt.abcd1234.tmp"]
    for p in cut + mine:
        p.write_bytes(b"\0" * 2**20)
    capsys.readouterr()
    train(_cfg(out), RunOptions(device=torch.device("cpu"), progress=False, max_steps=2, resume=True))
    assert not any(p.exists() for p in cut) and all(p.exists() for p in mine)
    assert (out / "ckpt.pt").is_symlink() and (big / "run.pt").is_file()
    assert f"removed 2 checkpoint writes cut short (2.0 MiB, measured on disk) in {big} and {out}" in capsys.readouterr().out


def test_profile_writes_cut_short_beside_a_linked_profiles_target_are_removed(tmp_path):
    """A profile linked from a dotfiles folder: its writes' temp files are beside the target."""
    plan = make_plan()
    path = save_plan("rtx4070-12gb", HW_4070, plan)
    dot = tmp_path / "dotfiles"
    dot.mkdir()
    path.rename(dot / "gpu.toml")
    path.symlink_to(dot / "gpu.toml")
    left, mine = dot / ".gpu.toml.k3j9x_2q.tmp", dot / f".{path.name}.k3j9x_2q.tmp"
    left.write_text("x"), mine.write_text("x")
    record_event("rtx4070-12gb", plan.fingerprint, "step 3: oom_shrink 12 -> 8", safe_micro_batch=8)
    assert not left.exists() and mine.exists() and path.is_symlink()
