"""Profiles and checkpoints as state on disk (r3's review, session 14): links written through,
repair commands a shell can take, lessons that a fresh probe can undo, schema versions."""
import os
import shlex
import subprocess

import pytest

from autofit.profiles import store as profiles
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
