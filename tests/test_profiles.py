import multiprocessing as mp
import os
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import tomli_w

from autofit.profiles import files as profile_files
from autofit.profiles import store as profiles
from autofit.profiles.manage import list_profiles, remove_profile
from autofit.profiles.store import (FittedPlan, ProfileError, SavedProfile, explain_stale, find_plan,
                              fingerprint, fingerprint_inputs, load_profile,
                              nearest_plan, profile_path, profiles_dir, record_event, save_plan)
from autofit.records import PlanRecord, TrialRecord

HW_4070 = {
    "schema_version": 1, "name": "rtx4070-12gb", "gpu": "NVIDIA GeForce RTX 4070",
    "nvml_names": ["NVIDIA GeForce RTX 4070"], "memory_bytes": 12_878_086_144,
    "compute_capability": [8, 9], "bf16": True, "peak_bf16_tflops": 58.3, "peak_fp16_tflops": 58.3,
    "memory_bandwidth_gbs": 504.2, "source": "NVIDIA Ada whitepaper",
}
BUILTINS = {"rtx4070-12gb": HW_4070}

SUMMARY = {
    "n_layer": 12, "n_head": 12, "n_embd": 576, "block_size": 1024, "vocab_size": 50304,
    "bias": False, "dropout": 0.0, "dtype": "bfloat16", "compile": True, "checkpointing": 0,
    "loss_impl": "standard", "batch_size": 16, "gradient_accumulation_steps": 32,
    "effective_batch": 512,
}


@pytest.fixture(autouse=True)
def autofit_home(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOFIT_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def make_plan(n_embd: int = 576, micro_batch: int = 12, cuda: str | None = "12.4") -> FittedPlan:
    summary = {**SUMMARY, "n_embd": n_embd}
    inputs = fingerprint_inputs(summary, "2.5.1", cuda, None)  # no driver: a None that TOML drops
    plan = PlanRecord(
        mode="measured", micro_batch=micro_batch, grad_accum=43, micro_batches=[micro_batch] * 42 + [8],
        effective_batch=micro_batch * 42 + 8, block_size=1024, dtype="bfloat16", compile=True,
        compile_after=5, checkpointing=0, loss_impl="chunked", estimated_peak_bytes=10_500_000_000,
        measured_peak_bytes=10_123_456_789, tokens_per_s=41_234.5, budget_bytes=11_000_000_000,
        split=f"{micro_batch * 42 + 8} = 42 × {micro_batch} + 8", reason="fastest that fits",
    )
    trials = [
        TrialRecord(micro_batch=micro_batch, dtype="bfloat16", compile=True, checkpointing=0,
                    loss_impl="chunked", status="fit", estimated_peak_bytes=10_500_000_000,
                    measured_peak_bytes=10_123_456_789, measured_reserved_bytes=10_700_000_000,
                    tokens_per_s=41_234.5, steps_run=3, seconds=12.5, compile_seconds=40.2),
        TrialRecord(micro_batch=16, dtype="bfloat16", compile=False, checkpointing=0,
                    loss_impl="standard", status="oom", estimated_peak_bytes=15_000_000_000,
                    steps_run=0, seconds=1.5, note="OOM in first backward (logits)"),
        TrialRecord(micro_batch=32, dtype="float32", compile=False, checkpointing=2,
                    loss_impl="standard", status="pruned"),
    ]
    return FittedPlan(fingerprint=fingerprint(inputs), fingerprint_inputs=inputs,
                      config_summary=summary, plan=plan, trials=trials)


def _files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# ---------------------------------------------------------------- round trip


def test_round_trip_keeps_everything_including_none_fields():
    plan = make_plan()
    path = save_plan("rtx4070-12gb", HW_4070, plan)
    assert path == profiles_dir() / "rtx4070-12gb.toml"
    assert "null" not in path.read_text() and "None" not in path.read_text()

    loaded = load_profile("rtx4070-12gb")
    assert loaded.schema_version == profiles.SCHEMA_VERSION and loaded.name == "rtx4070-12gb"
    assert loaded.hardware == HW_4070
    got = find_plan(loaded, plan.fingerprint)
    assert got.model_dump(exclude={"updated"}) == plan.model_dump(exclude={"updated"})
    assert got.trials[1].measured_peak_bytes is None and got.trials[1].tokens_per_s is None
    assert got.trials[2].compile_seconds is None
    assert got.created.tzinfo is not None and got.updated >= plan.created
    # The None driver/cuda versions vanish on disk, yet the plan still matches its fingerprint.
    assert "driver_version" not in got.fingerprint_inputs
    assert fingerprint(got.fingerprint_inputs) == plan.fingerprint
    assert find_plan(loaded, "000000000000") is None


def test_cpu_profile_has_no_hardware():
    save_plan("cpu-2gb", None, make_plan(cuda=None))
    loaded = load_profile("cpu-2gb")
    assert loaded.hardware is None and len(loaded.plans) == 1


def test_same_fingerprint_replaces_keeping_created_and_others():
    first, other = make_plan(micro_batch=12), make_plan(n_embd=768)
    first = first.model_copy(update={"created": datetime(2025, 1, 1, tzinfo=timezone.utc)})
    save_plan("rtx4070-12gb", HW_4070, first)
    save_plan("rtx4070-12gb", None, other)  # None hardware keeps the stored description

    reprobe = make_plan(micro_batch=10)
    assert reprobe.fingerprint == first.fingerprint
    save_plan("rtx4070-12gb", HW_4070, reprobe)

    loaded = load_profile("rtx4070-12gb")
    assert set(loaded.plans) == {first.fingerprint, other.fingerprint}
    replaced = loaded.plans[first.fingerprint]
    assert replaced.plan.micro_batch == 10
    assert replaced.created == datetime(2025, 1, 1, tzinfo=timezone.utc)
    assert replaced.updated > replaced.created
    assert loaded.plans[other.fingerprint].config_summary["n_embd"] == 768
    assert loaded.hardware == HW_4070


def test_load_profile_builtin_fallback_and_missing():
    assert load_profile("rtx4070-12gb") is None
    builtin = load_profile("rtx4070-12gb", builtin=BUILTINS.get)
    assert builtin.hardware == HW_4070 and builtin.plans == {}
    assert load_profile("h100-80gb", builtin=BUILTINS.get) is None
    # A user file wins over the built-in.
    save_plan("rtx4070-12gb", {**HW_4070, "memory_bytes": 1}, make_plan())
    assert load_profile("rtx4070-12gb", builtin=BUILTINS.get).hardware["memory_bytes"] == 1


# ---------------------------------------------------------------- fingerprints


def test_fingerprint_stable_across_orderings():
    inputs = fingerprint_inputs(SUMMARY, "2.5.1", "12.4", "550.54")
    reordered = dict(reversed(list(inputs.items())))
    assert list(reordered) != list(inputs)
    assert fingerprint(reordered) == fingerprint(inputs)
    assert len(fingerprint(inputs)) == 12 and int(fingerprint(inputs), 16) >= 0


def test_fingerprint_changes_when_any_input_changes():
    inputs = fingerprint_inputs(SUMMARY, "2.5.1", "12.4", "550.54")
    base = fingerprint(inputs)
    for key, value in inputs.items():
        changed = {**inputs, key: (not value) if isinstance(value, bool) else f"{value}x"}
        assert fingerprint(changed) != base, key
    # None and absent are the same (TOML cannot store None), but a value is not.
    no_driver = fingerprint_inputs(SUMMARY, "2.5.1", "12.4", None)
    without_key = {k: v for k, v in no_driver.items() if k != "driver_version"}
    assert fingerprint(no_driver) == fingerprint(without_key) != base


def test_fingerprint_inputs_rejects_clashing_keys():
    with pytest.raises(ValueError):
        fingerprint_inputs({**SUMMARY, "torch_version": "x"}, "2.5.1", None, None)


def test_explain_stale_names_each_change():
    old = fingerprint_inputs(SUMMARY, "2.4.0", "12.1", None)
    new = fingerprint_inputs({**SUMMARY, "n_embd": 768}, "2.5.1", "12.1", "550.54")
    assert explain_stale(old, new) == ["driver unset -> 550.54", "n_embd 576 -> 768",
                                       "torch 2.4.0 -> 2.5.1"]
    assert explain_stale(old, dict(old)) == []


def test_nearest_plan_explains_why_not_reused():
    profile = SavedProfile(name="x")
    assert nearest_plan(profile, {}) is None
    a, b = make_plan(), make_plan(n_embd=768)
    profile.plans = {a.fingerprint: a, b.fingerprint: b}
    wanted = {**a.fingerprint_inputs, "torch_version": "2.6.0"}
    plan, changes = nearest_plan(profile, wanted)
    assert plan is a and changes == ["torch 2.5.1 -> 2.6.0"]


# ---------------------------------------------------------------- bad files


BAD_FILES = {
    "corrupt": (b"schema_version = 1\nname = \"x\n[plans", "is not valid TOML"),
    "not utf-8": (b"name = \"\xff\xfe\"\n", "is not valid TOML"),
    "foreign": (b"[project]\nname = \"something-else\"\n", "is not an autofit profile"),
    "wrong type": (b"schema_version = 1\nname = \"rtx4070-12gb\"\nplans = 3\n",
                   "is not an autofit profile: plans"),
    "newer": (b"schema_version = 3\nname = \"rtx4070-12gb\"\n[future]\nx = 1\n",
              "was written by a newer autofit (schema 3 > 2)"),
}


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_bad_file_errors_name_the_file_and_nothing_is_overwritten(kind):
    content, expected = BAD_FILES[kind]
    path = profile_path("rtx4070-12gb")
    path.parent.mkdir(parents=True)
    path.write_bytes(content)

    for action in (lambda: load_profile("rtx4070-12gb", builtin=BUILTINS.get),
                   lambda: save_plan("rtx4070-12gb", HW_4070, make_plan()),
                   lambda: record_event("rtx4070-12gb", "abc", "oom"),
                   lambda: remove_profile("rtx4070-12gb", "abc")):
        with pytest.raises(ProfileError) as info:
            action()
        message = str(info.value)
        assert str(path) in message and expected in message and "\n" not in message
    assert path.read_bytes() == content
    assert [p for p in _files(path.parent) if p.endswith(".tmp")] == []

    # The listing still shows the broken file instead of failing.
    [entry] = list_profiles()
    assert entry.name == "rtx4070-12gb" and expected in entry.error


def test_plan_key_must_match_fingerprint():
    plan = make_plan()
    path = save_plan("rtx4070-12gb", HW_4070, plan)
    path.write_text(path.read_text().replace(f"[plans.{plan.fingerprint}", "[plans.deadbeef0000"))
    with pytest.raises(ProfileError, match="is not an autofit profile"):
        load_profile("rtx4070-12gb")


def test_renamed_file_takes_its_file_name():
    path = save_plan("rtx4070-12gb", HW_4070, make_plan())
    path.rename(path.with_name("my-4070.toml"))
    assert load_profile("my-4070").name == "my-4070"


# ---------------------------------------------------------------- atomic writes


def test_failed_serialisation_leaves_old_file_and_no_temp(monkeypatch):
    path = save_plan("rtx4070-12gb", HW_4070, make_plan())
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(tomli_w, "dumps", boom)
    with pytest.raises(RuntimeError):
        save_plan("rtx4070-12gb", HW_4070, make_plan(n_embd=768))
    assert path.read_bytes() == before
    assert _files(path.parent) == ["rtx4070-12gb.toml", "rtx4070-12gb.toml.lock"]


def test_failed_rename_leaves_old_file_and_no_temp(monkeypatch):
    path = save_plan("rtx4070-12gb", HW_4070, make_plan())
    before = path.read_bytes()
    written = []
    real_write = os.fdopen

    def spy_fdopen(fd, *args, **kwargs):
        written.append(fd)
        return real_write(fd, *args, **kwargs)

    def no_replace(src, dst):
        assert Path(src).parent == path.parent and Path(src).read_bytes() != before
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fdopen", spy_fdopen)
    monkeypatch.setattr(os, "replace", no_replace)
    with pytest.raises(ProfileError, match=f"cannot write profile file {path}: No space left"):
        save_plan("rtx4070-12gb", HW_4070, make_plan(n_embd=768))
    assert written, "the new content was written to a temp file first"
    assert path.read_bytes() == before
    assert _files(path.parent) == ["rtx4070-12gb.toml", "rtx4070-12gb.toml.lock"]


# ---------------------------------------------------------------- concurrency


def _save_worker(barrier, worker: int, per_worker: int) -> None:
    barrier.wait()
    for i in range(per_worker):
        save_plan("rtx4070-12gb", HW_4070, make_plan(n_embd=64 * (1 + worker * per_worker + i)))


def test_concurrent_savers_lose_no_plan():
    workers, per_worker = 4, 3
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(workers)
    procs = [ctx.Process(target=_save_worker, args=(barrier, w, per_worker)) for w in range(workers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    loaded = load_profile("rtx4070-12gb")
    assert sorted(p.config_summary["n_embd"] for p in loaded.plans.values()) == \
        [64 * (1 + k) for k in range(workers * per_worker)]
    assert [n for n in _files(profiles_dir()) if n.endswith(".tmp")] == []


def test_lock_file_fallback_without_fcntl(monkeypatch):
    # filelock's SoftFileLock is what FileLock is on a platform without fcntl.
    import filelock
    monkeypatch.setattr(profile_files, "_LOCK_CLASS", filelock.SoftFileLock)
    path = save_plan("rtx4070-12gb", HW_4070, make_plan())
    assert _files(path.parent) == ["rtx4070-12gb.toml"]  # the O_EXCL lock is released by removal

    lock = path.with_name("rtx4070-12gb.toml.lock")
    lock.touch()  # another process holds it
    monkeypatch.setattr(profile_files, "LOCK_TIMEOUT_S", 0.1)
    with pytest.raises(ProfileError, match=f"timed out waiting for lock {lock}"):
        save_plan("rtx4070-12gb", HW_4070, make_plan(n_embd=768))
    assert len(load_profile("rtx4070-12gb").plans) == 1


# ---------------------------------------------------------------- run-time events


def test_record_event_lowers_safe_micro_batch_and_appends():
    plan = make_plan()
    save_plan("rtx4070-12gb", HW_4070, plan)
    record_event("rtx4070-12gb", plan.fingerprint, "run OOM at step 40 with micro_batch 12; safe 8",
                 safe_micro_batch=8)
    record_event("rtx4070-12gb", plan.fingerprint, "another run OOM; reported 10", safe_micro_batch=10)
    record_event("rtx4070-12gb", plan.fingerprint, "compile OOM at step 1", compile_failed=True)

    got = load_profile("rtx4070-12gb").plans[plan.fingerprint]
    assert got.safe_micro_batch == 8  # a later, larger report never raises it
    assert got.compile_failed is True
    assert len(got.events) == 3
    stamp, text = got.events[0].split(" ", 1)
    assert text == "run OOM at step 40 with micro_batch 12; safe 8"
    when = datetime.strptime(stamp, "%Y-%m-%dT%H:%MZ").replace(tzinfo=timezone.utc)
    assert abs(datetime.now(timezone.utc) - when) < timedelta(minutes=5)
    assert got.plan.micro_batch == 12  # the plan itself is untouched


def test_record_event_unknown_profile_or_plan():
    with pytest.raises(ProfileError, match="no profile file"):
        record_event("rtx4070-12gb", "abc", "oom")
    save_plan("rtx4070-12gb", HW_4070, make_plan())
    with pytest.raises(ProfileError, match="has no plan abc"):
        record_event("rtx4070-12gb", "abc", "oom")


# ---------------------------------------------------------------- list and remove


def test_list_profiles_builtins_users_and_overrides():
    save_plan("cpu-2gb", None, make_plan(cuda=None))
    save_plan("rtx4070-12gb", HW_4070, make_plan())
    save_plan("rtx4070-12gb", HW_4070, make_plan(n_embd=768))
    entries = list_profiles(["rtx4070-12gb", "h100-80gb"], builtin=BUILTINS.get)
    by_name = {e.name: e for e in entries}
    assert [e.name for e in entries] == ["cpu-2gb", "h100-80gb", "rtx4070-12gb"]
    assert by_name["cpu-2gb"].gpu == "CPU (budgeted)" and by_name["cpu-2gb"].memory_bytes is None
    assert by_name["cpu-2gb"].location == str(profile_path("cpu-2gb"))
    assert by_name["h100-80gb"].location == "built-in" and by_name["h100-80gb"].n_plans == 0
    over = by_name["rtx4070-12gb"]
    assert over.gpu == "NVIDIA GeForce RTX 4070" and over.memory_bytes == 12_878_086_144
    assert over.n_plans == 2 and over.overrides_builtin
    assert over.location == f"{profile_path('rtx4070-12gb')} (overrides built-in)"


def test_remove_plan_then_profile():
    a, b = make_plan(), make_plan(n_embd=768)
    save_plan("cpu-2gb", None, a)
    save_plan("cpu-2gb", None, b)
    assert remove_profile("cpu-2gb", a.fingerprint) == f"removed plan {a.fingerprint} from {profile_path('cpu-2gb')}"
    assert set(load_profile("cpu-2gb").plans) == {b.fingerprint}
    with pytest.raises(ProfileError, match=f"has no plan {a.fingerprint} \\(plans: {b.fingerprint}\\)"):
        remove_profile("cpu-2gb", a.fingerprint)
    remove_profile("cpu-2gb")
    assert load_profile("cpu-2gb") is None
    with pytest.raises(ProfileError, match="no profile cpu-2gb"):
        remove_profile("cpu-2gb")


def test_rm_of_a_whole_profile_takes_its_lock_file_and_leaves_the_lock_exclusive(monkeypatch):
    """t11's L7 (session 17): `profiles rm NAME` left NAME.toml.lock behind. It goes with the
    profile, removed while held: a process that opened the old lock file before (waiting) finds
    it unlinked, which filelock >= 3.20.4 takes as 'open the path again'; the next holders of the
    path's lock still exclude each other. With an older filelock the file stays."""
    import filelock
    save_plan("cpu-2gb", None, make_plan())
    lock_path = profile_path("cpu-2gb").with_name("cpu-2gb.toml.lock")
    assert lock_path.exists()
    waiter = os.open(lock_path, os.O_RDWR)  # a waiter between its polls holds the old file open
    try:
        remove_profile("cpu-2gb")
        assert not lock_path.exists() and not profile_path("cpu-2gb").exists()
        assert os.fstat(waiter).st_nlink == 0  # what filelock's acquire checks after its flock
    finally:
        os.close(waiter)
    with profile_files.locked(profile_path("cpu-2gb")):  # a new lock file at the path, held
        with pytest.raises(filelock.Timeout):
            filelock.FileLock(str(lock_path), timeout=0).acquire()
    save_plan("cpu-2gb", None, make_plan())
    monkeypatch.setattr(filelock, "__version__", "3.12.0")  # acquirers that keep a lock on an unlinked file
    remove_profile("cpu-2gb")
    assert lock_path.exists() and not profile_path("cpu-2gb").exists()


def test_remove_refuses_builtin_but_removes_user_override():
    with pytest.raises(ProfileError, match="rtx4070-12gb is a built-in profile; built-ins are read-only"):
        remove_profile("rtx4070-12gb", builtin_names=BUILTINS)
    save_plan("rtx4070-12gb", HW_4070, make_plan())
    message = remove_profile("rtx4070-12gb", builtin_names=BUILTINS)
    assert "built-in rtx4070-12gb applies again" in message
    assert not profile_path("rtx4070-12gb").exists()


def test_remove_whole_corrupt_file_is_allowed():
    path = profile_path("broken")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not = [toml")
    remove_profile("broken")
    assert not path.exists()


# ---------------------------------------------------------------- locations and names


def test_profiles_dir_resolution(monkeypatch, tmp_path):
    assert profiles_dir() == tmp_path / "home" / "profiles"
    monkeypatch.delenv("AUTOFIT_HOME")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert profiles_dir() == tmp_path / "xdg" / "autofit" / "profiles"
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    monkeypatch.setenv("XDG_DATA_HOME", "relative/dir")  # invalid per the XDG spec: ignored
    assert profiles_dir() == tmp_path / "user" / ".local" / "share" / "autofit" / "profiles"
    monkeypatch.delenv("XDG_DATA_HOME")
    assert profiles_dir() == tmp_path / "user" / ".local" / "share" / "autofit" / "profiles"
    monkeypatch.setenv("AUTOFIT_HOME", str(tmp_path / "again"))
    save_plan("cpu-2gb", None, make_plan())
    assert (tmp_path / "again" / "profiles" / "cpu-2gb.toml").is_file()


@pytest.mark.parametrize("name", ["", "RTX4070", "../evil", "a/b", ".hidden", "-x", "x y", "a" * 101])
def test_bad_profile_name(name):
    for action in (lambda: load_profile(name), lambda: save_plan(name, None, make_plan()),
                   lambda: record_event(name, "abc", "x"), lambda: remove_profile(name)):
        with pytest.raises(ProfileError, match="bad profile name"):
            action()
    assert not profiles_dir().exists()


# ---------------------------------------------------------------- nothing to do writes nothing


def test_rm_of_a_missing_profile_writes_nothing(autofit_home):
    with pytest.raises(ProfileError, match="no profile nope"):
        remove_profile("nope")
    assert not autofit_home.exists()  # no directory, no nope.toml.lock
    profiles_dir().mkdir(parents=True)
    with pytest.raises(ProfileError, match="no profile nope"):
        remove_profile("nope", "abc")
    with pytest.raises(ProfileError, match="no profile file"):
        record_event("nope", "abc", "oom")
    assert _files(profiles_dir()) == []


# ---------------------------------------------------------------- writability


def test_profiles_dir_under_a_file_is_one_line_before_anything(autofit_home):
    autofit_home.parent.mkdir(parents=True, exist_ok=True)
    autofit_home.write_text("not a directory")
    with pytest.raises(ProfileError, match="is a file, not a folder; set AUTOFIT_HOME"):
        profiles.check_profiles_writable()
    with pytest.raises(ProfileError, match="is a file, not a folder"):
        save_plan("cpu-2gb", None, make_plan())
    assert autofit_home.read_text() == "not a directory"


def _deny_writes_to(monkeypatch, directory: Path) -> None:
    # Root may write a 0o555 directory, and writability is tested by writing (os.access says yes to
    # root everywhere), so the test also makes the test write fail there.
    import tempfile
    import trainer.paths
    real = tempfile.TemporaryFile

    def refuse(*a, dir=None, **kw):
        if dir is not None and Path(dir) == directory:
            raise PermissionError(13, "Permission denied")
        return real(*a, dir=dir, **kw)
    monkeypatch.setattr(trainer.paths.tempfile, "TemporaryFile", refuse)


def test_read_only_profiles_dir_refuses_save_and_rm_in_one_line(monkeypatch):
    path = save_plan("cpu-2gb", None, make_plan())
    before = path.read_bytes()
    directory = profiles_dir()
    directory.chmod(0o555)
    try:
        _deny_writes_to(monkeypatch, directory)
        with pytest.raises(ProfileError, match=f"cannot save profiles: profiles folder {directory}: {directory} "
                                               "is not writable"):
            profiles.check_profiles_writable("cpu-2gb")
        with pytest.raises(ProfileError, match="not writable"):
            save_plan("cpu-2gb", None, make_plan(n_embd=768))
        with pytest.raises(ProfileError, match="not writable"):
            remove_profile("cpu-2gb")
    finally:
        directory.chmod(0o755)
    assert path.read_bytes() == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores permission bits")
def test_read_only_profiles_dir_for_real():
    save_plan("cpu-2gb", None, make_plan())
    profiles_dir().chmod(0o555)
    try:
        with pytest.raises(ProfileError, match="not writable"):
            remove_profile("cpu-2gb")
    finally:
        profiles_dir().chmod(0o755)


def test_not_yet_created_dir_is_checked_at_its_existing_parent(autofit_home, monkeypatch):
    autofit_home.mkdir(parents=True)
    assert profiles.check_profiles_writable() == autofit_home / "profiles"
    assert not (autofit_home / "profiles").exists()  # checking creates nothing
    _deny_writes_to(monkeypatch, autofit_home)
    with pytest.raises(ProfileError, match=f"profiles folder {autofit_home / 'profiles'}: {autofit_home} is not writable"):
        profiles.check_profiles_writable()


# ---------------------------------------------------------------- corrupt files: repair and keep


@pytest.mark.parametrize("kind", ["corrupt", "newer"])
def test_errors_say_how_to_clear_the_file(kind):
    content, _ = BAD_FILES[kind]
    path = profile_path("rtx4070-12gb")
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    with pytest.raises(ProfileError, match="autofit profiles rm rtx4070-12gb") as info:
        load_profile("rtx4070-12gb")
    assert str(path) in str(info.value)


def test_save_onto_a_corrupt_file_keeps_the_plan_aside_and_says_how_to_repair():
    path = profile_path("rtx4070-12gb")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not = [toml")
    plan = make_plan()
    with pytest.raises(ProfileError) as info:
        save_plan("rtx4070-12gb", HW_4070, plan)
    side = profiles.side_file_path(path, plan.fingerprint)
    message = str(info.value)
    assert str(path) in message and f"kept in {side}" in message and "\n" not in message
    assert f"autofit profiles rm rtx4070-12gb && mv {side} {path}" in message
    assert path.read_bytes() == b"not = [toml"
    assert [e.name for e in list_profiles()] == ["rtx4070-12gb"]  # the side file is not listed
    # the repair the message gives works: the kept file becomes the profile
    remove_profile("rtx4070-12gb")
    side.rename(path)
    assert find_plan(load_profile("rtx4070-12gb"), plan.fingerprint).plan == plan.plan


def test_hardware_is_updated_key_by_key():
    full = {**HW_4070, "name": "gtx1650-4gb", "gpu": "GeForce GTX 1650", "peak_fp16_tflops": 8.9}
    save_plan("gtx1650-4gb", full, make_plan())
    probe_view = {"name": "gtx1650-4gb", "gpu": "NVIDIA GeForce GTX 1650", "kind": "cuda",
                  "memory_bytes": 4_294_639_616, "compute_capability": [7, 5]}
    save_plan("gtx1650-4gb", probe_view, make_plan(n_embd=768))
    hw = load_profile("gtx1650-4gb").hardware
    assert hw["peak_fp16_tflops"] == 8.9 and hw["source"] == HW_4070["source"]
    assert hw["gpu"] == "NVIDIA GeForce GTX 1650" and hw["memory_bytes"] == 4_294_639_616


def test_default_dir_comes_from_platformdirs(monkeypatch, tmp_path):
    import platformdirs
    monkeypatch.delenv("AUTOFIT_HOME")
    monkeypatch.setattr(platformdirs, "user_data_path", lambda app, appauthor=None: tmp_path / "pd" / app)
    assert profiles_dir() == tmp_path / "pd" / "autofit" / "profiles"


# ---------------------------------------------------------------- user hardware profiles


GTX1650 = {"schema_version": 1, "name": "gtx1650-4gb", "gpu": "GeForce GTX 1650",
           "nvml_names": ["NVIDIA GeForce GTX 1650"], "memory_bytes": 4 * 2**30,
           "compute_capability": [7, 5], "bf16": False, "peak_fp16_tflops": 8.9,
           "memory_bandwidth_gbs": 192.0, "source": "user"}


def test_user_hardware_profile_is_found_like_a_builtin():
    from autofit.devices.hardware import get_hardware, known_hardware, match_hardware
    from autofit.devices.device import DeviceInfo
    save_plan("gtx1650-4gb", GTX1650, make_plan())
    spec = get_hardware("gtx1650-4gb")
    assert spec.memory_bytes == 4 * 2**30 and spec.compute_capability == (7, 5) and spec.bf16 is False
    assert "gtx1650-4gb" in known_hardware() and "rtx4070-12gb" in known_hardware()
    info = DeviceInfo(kind="cuda", name="NVIDIA GeForce GTX 1650", index=0, total_bytes=4096 * 2**20,
                      free_bytes=4000 * 2**20, used_by_others_bytes=0, compute_capability=(7, 5),
                      driver_version="550", cuda_version="12.4", source="nvml")
    assert match_hardware(info).name == "gtx1650-4gb"


def test_user_profiles_without_a_complete_gpu_are_refused_in_one_line():
    from autofit.devices.hardware import HardwareError, get_hardware
    save_plan("cpu-2gb", {"name": "cpu-2gb", "gpu": "CPU (budgeted)", "kind": "cpu", "memory_bytes": 2**31},
              make_plan(cuda=None))
    with pytest.raises(HardwareError, match="describes no GPU.*autofit profiles add cpu-2gb"):
        get_hardware("cpu-2gb")
    partial = {k: v for k, v in GTX1650.items() if k != "peak_fp16_tflops"}
    save_plan("gtx1650-4gb", partial, make_plan())
    with pytest.raises(HardwareError, match="no complete GPU description \\(peak_fp16_tflops"):
        get_hardware("gtx1650-4gb")
    # an incomplete user file under a built-in's name leaves the built-in in force
    save_plan("rtx4070-12gb", {"name": "rtx4070-12gb", "gpu": "x", "kind": "cuda"}, make_plan())
    assert get_hardware("rtx4070-12gb").peak_bf16_tflops == 58.3


def test_corrupt_user_file_named_by_get_hardware():
    from autofit.devices.hardware import HardwareError, get_hardware
    path = profile_path("gtx1650-4gb")
    path.parent.mkdir(parents=True)
    path.write_text("oops = [")
    with pytest.raises(ProfileError, match="autofit profiles rm gtx1650-4gb"):
        get_hardware("gtx1650-4gb")
    with pytest.raises(HardwareError, match="add your own with autofit profiles add"):
        get_hardware("gtx9999-4gb")


# ---------------------------------------------------------------- packaging of profiles/


def test_builtin_profiles_come_from_the_top_level_folder():
    from autofit.devices.hardware import builtin_profiles_dir, load_builtin
    top = Path(__file__).parent.parent / "profiles"
    # an editable install (this checkout) reads profiles/ itself; a wheel carries a copy
    assert builtin_profiles_dir() in (top, Path(profiles.__file__).parents[1] / "builtin_profiles")
    assert set(load_builtin()) == {p.stem for p in top.glob("*.toml")}


def test_wheel_carries_every_builtin_profile(tmp_path):
    import subprocess
    import sys
    import zipfile
    pytest.importorskip("setuptools")
    root = Path(__file__).parent.parent
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", str(root), "--no-deps", "--no-build-isolation",
                           "-q", "-w", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    [wheel] = tmp_path.glob("autofit-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {f"autofit/builtin_profiles/{p.name}" for p in (root / "profiles").glob("*.toml")}
    assert len(shipped) >= 11 and shipped <= names
    assert "autofit/report/plot.py" in names and "trainer/embedded/train.bin.gz" in names


def test_a_builtin_cards_table_entry_fills_in_and_never_overwrites_what_profiles_add_wrote():
    """A probe of a built-in card hands its table entry as defaults: a peak rate written by
    `autofit profiles add` stays, and keys the profile lacks come from the table."""
    mine = {**HW_4070, "peak_fp16_tflops": 50.0}
    mine.pop("bandwidth_gbs", None)
    save_plan("rtx4070-12gb", mine, make_plan())
    save_plan("rtx4070-12gb", None, make_plan(n_embd=768), hardware_defaults=HW_4070)
    hw = load_profile("rtx4070-12gb").hardware
    assert hw["peak_fp16_tflops"] == 50.0
    if "bandwidth_gbs" in HW_4070:
        assert hw["bandwidth_gbs"] == HW_4070["bandwidth_gbs"]


def test_a_plan_probed_again_keeps_what_runs_learned_with_it():
    """Two runs of one config: one saved the plan and recorded an OOM shrink while the other
    probed; the second save of the same fingerprint keeps the lesson (it replaced the entry)."""
    plan = make_plan()
    save_plan("rtx4070-12gb", HW_4070, plan)
    record_event("rtx4070-12gb", plan.fingerprint, "step 5: oom_shrink 12 -> 8", safe_micro_batch=8)
    save_plan("rtx4070-12gb", HW_4070, make_plan())
    got = find_plan(load_profile("rtx4070-12gb"), plan.fingerprint)
    assert got.safe_micro_batch == 8 and any("oom_shrink" in e for e in got.events)


def test_rm_takes_a_dangling_link_and_refuses_a_folder_as_the_listing_says(tmp_path, monkeypatch):
    """The listing's advice for a dangling link or a folder at a profile's path was
    'clear it with: autofit profiles rm NAME', which then said 'does not exist' or 'Is a directory'."""
    monkeypatch.setenv("AUTOFIT_HOME", str(tmp_path / "home"))
    d = profiles_dir()
    d.mkdir(parents=True, exist_ok=True)
    (d / "z.toml").symlink_to(tmp_path / "nowhere")
    (d / "f.toml").mkdir()
    entries = {e.name: e.error for e in list_profiles()}
    assert "clear it with: autofit profiles rm z" in entries["z"]
    # t12's L8 (session 18): '... is a folder, not a regular file; it is a folder, not a profile file': once now
    assert entries["f"].endswith("is a folder, not a regular file; move or remove it yourself"), entries["f"]
    assert entries["f"].count("folder") == 1, entries["f"]
    with pytest.raises(ProfileError) as e:
        load_profile("f")
    assert str(e.value).count("folder") == 1 and str(e.value).endswith("move or remove it yourself"), e.value
    assert remove_profile("z") == f"removed {d / 'z.toml'}" and not (d / "z.toml").is_symlink()
    with pytest.raises(ProfileError, match="f.toml is a folder, not a profile file: move or remove it yourself"):
        remove_profile("f")
    assert (d / "f.toml").is_dir()


def test_a_relative_autofit_home_is_refused_in_one_line(monkeypatch, tmp_path):
    """AUTOFIT_HOME=myhome put profiles under whatever folder a command ran from: probe --save in
    one folder, run --profile in another found no plan."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AUTOFIT_HOME", "myhome")
    with pytest.raises(ProfileError, match=r"AUTOFIT_HOME=myhome is a relative path: .* give an absolute one "
                                           r"\(e.g. .*/myhome\)"):
        profile_files.profiles_dir()
    assert not (tmp_path / "myhome").exists()
    monkeypatch.setenv("AUTOFIT_HOME", str(tmp_path / "abs"))
    assert profile_files.profiles_dir() == tmp_path / "abs" / "profiles"


def test_remove_takes_a_unique_prefix_of_a_plan_as_show_cuts_it():
    """`profiles show` on a narrow terminal cuts fingerprints ('df74a23…'); rm refused the prefix.
    A prefix shorter than 4 characters is refused even where unique (t2, session 11: `--plan d`
    removed a plan without a word); an ambiguous one names every match."""
    plans = [make_plan(n_embd=576 + 64 * i) for i in range(3)]
    for p in plans:
        save_plan("cpu-2gb", None, p)
    fps = [p.fingerprint for p in plans]
    target = next(fp for fp in fps if not any(o != fp and o.startswith(fp[:7]) for o in fps))
    assert remove_profile("cpu-2gb", target[:7]) == f"removed plan {target} from {profile_path('cpu-2gb')}"
    assert target not in load_profile("cpu-2gb").plans
    left = sorted(fp for fp in fps if fp != target)
    with pytest.raises(ProfileError, match="has no plan zzzz"):
        remove_profile("cpu-2gb", "zzzz")
    with pytest.raises(ProfileError, match="--plan '': give at least 4 characters"):
        remove_profile("cpu-2gb", "")
    for short in (left[0][:1], left[0][:3]):
        with pytest.raises(ProfileError, match=f"--plan {short}: give at least 4 characters of the plan's "
                                               f"fingerprint \\(plans: {', '.join(left)}\\)"):
            remove_profile("cpu-2gb", short)
    assert len(load_profile("cpu-2gb").plans) == 2
    # two plans sharing 4 characters: written by hand, as no hash can be made to share them
    path = profile_path("cpu-2gb")
    text = path.read_text()
    for fp, new in zip(left, ("abcd12", "abcd34")):
        text = text.replace(fp, new)
    path.write_text(text)
    with pytest.raises(ProfileError, match="has several plans starting with abcd \\(give more of it: abcd12, abcd34\\)"):
        remove_profile("cpu-2gb", "abcd")
    assert remove_profile("cpu-2gb", "abcd3") == f"removed plan abcd34 from {path}"


def test_show_gives_the_split_as_it_runs_and_a_cpu_profile_is_no_card(monkeypatch, capsys):
    """'micro x accum' read '12 x 43 (512 = 42 × 12 + 8)': 12 x 43 is 516, not the 512 run; an empty
    CPU profile told the user to run 'on this card'."""
    from autofit.cli.app import main  # noqa: F401
    from cli_run import cli
    save_plan("cpu-2gb", None, make_plan())
    monkeypatch.setenv("COLUMNS", "400")
    code, out, err = cli(monkeypatch, capsys, "profiles", "show", "cpu-2gb")
    assert code == 0, err
    assert "512 = 42 × 12 + 8" in out and "12 x 43" not in out and "micro-batches" in out, out
    remove_profile("cpu-2gb", make_plan().fingerprint)
    code, out, err = cli(monkeypatch, capsys, "profiles", "show", "cpu-2gb")
    assert code == 0 and "no fitted plans yet" in out and "on this card" not in out, out


def test_show_names_the_model_options_that_tell_plans_apart():
    """t3 (session 12): plans for a ReLU²+Muon and a SwiGLU+AdamW model of one shape had the same
    config column, so `profiles rm --plan` could not tell which to remove."""
    from autofit.cli.profiles import _plan_row
    plan = make_plan()
    gpt2 = _plan_row(plan.fingerprint, plan)[1]
    nanochat = plan.model_copy(update={"config_summary": {**plan.config_summary, "mlp": "relu2", "optimizer": "muon"}})
    assert _plan_row(plan.fingerprint, nanochat)[1] == gpt2 + ", mlp=relu2, optimizer=muon"
    assert "mlp=" not in gpt2 and "optimizer=" not in gpt2  # a GPT-2 config's column names no model option


def test_another_models_plan_is_not_called_stale():
    """t5's L7 (session 14): `run --profile cpu-64mb --set mlp=relu2` said 'saved plans are stale (mlp
    swiglu -> relu2)', though the swiglu plan is another model's, kept and still good for it."""
    from autofit.profiles.fingerprints import not_reused_words
    old = {"n_embd": 32, "mlp": "swiglu", "torch_version": "2.4.0", "cuda_version": None, "driver_version": None}
    assert not_reused_words(explain_stale(old, {**old, "mlp": "relu2"})) == \
        "no saved plan for this model (mlp swiglu -> relu2)"
    assert not_reused_words(explain_stale(old, {**old, "mlp": "relu2", "torch_version": "2.5.1"})) == \
        "no saved plan for this model (mlp swiglu -> relu2; torch 2.4.0 -> 2.5.1)"
    assert not_reused_words(explain_stale(old, {**old, "torch_version": "2.5.1", "allocator": "expandable"})) == \
        "saved plans are stale (allocator unset -> expandable; torch 2.4.0 -> 2.5.1)"
