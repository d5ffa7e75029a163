"""What `autofit profiles list` and `autofit profiles rm` do: every profile with its card and plan
count (built-ins, the user's, a user file that overrides a built-in, one that cannot be read), and
removing a user's profile or one plan from it, under the profile's lock."""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from autofit.profiles.files import (ProfileError, _is_valid_name, check_profiles_writable, drop_lock_file,
                                   locked as _locked, profile_path, profiles_dir)
from autofit.profiles.store import BuiltinLookup, _read_file, _write_atomic, clear_lessons

CPU_GPU_LABEL = "CPU (budgeted)"
MIN_PREFIX = 4  # the fewest characters of a fingerprint `profiles rm --plan` takes as a prefix


class ProfileEntry(BaseModel):
    name: str
    gpu: str
    memory_bytes: int | None
    n_plans: int
    location: str  # 'built-in', or the user file path (noting when it overrides a built-in)
    path: Path | None = None  # the user file; None for a built-in
    overrides_builtin: bool = False
    error: str = ""  # set when the user file cannot be read; the listing still shows it


def list_profiles(builtin_names: Iterable[str] = (), *,
                  builtin: BuiltinLookup | None = None) -> list[ProfileEntry]:
    """Built-in and user profiles, sorted by name; a user file with a built-in's name overrides it.
    `builtin` (name -> hardware dict) fills in the GPU and memory of built-ins."""
    builtins = set(builtin_names)
    entries: dict[str, ProfileEntry] = {}
    for name in builtins:
        hardware = builtin(name) if builtin is not None else None
        # Without a lookup a built-in's GPU is unknown here, not a CPU profile.
        gpu = _gpu_label(hardware) if hardware is not None else "?"
        entries[name] = ProfileEntry(name=name, gpu=gpu, memory_bytes=_memory(hardware), n_plans=0,
                                     location="built-in")
    directory = profiles_dir()
    paths = sorted(directory.glob("*.toml")) if directory.is_dir() else []
    for path in paths:
        if not _is_valid_name(path.stem):
            continue  # not a file autofit could have written
        overrides = path.stem in builtins
        location = f"{path} (overrides built-in)" if overrides else str(path)
        try:
            profile = _read_file(path)
        except ProfileError as exc:
            entries[path.stem] = ProfileEntry(name=path.stem, gpu="?", memory_bytes=None, n_plans=0,
                                              location=location, path=path,
                                              overrides_builtin=overrides, error=str(exc))
            continue
        if profile is None:
            continue  # removed while listing
        entries[path.stem] = ProfileEntry(name=path.stem, gpu=_gpu_label(profile.hardware),
                                          memory_bytes=_memory(profile.hardware),
                                          n_plans=len(profile.plans), location=location, path=path,
                                          overrides_builtin=overrides)
    return [entries[name] for name in sorted(entries)]


def _gpu_label(hardware: dict[str, Any] | None) -> str:
    return CPU_GPU_LABEL if hardware is None else str(hardware.get("gpu", "?"))


def _memory(hardware: dict[str, Any] | None) -> int | None:
    value = hardware.get("memory_bytes") if hardware else None
    return value if isinstance(value, int) else None


def remove_profile(name: str, fingerprint: str | None = None, *,
                   builtin_names: Iterable[str] = (), lessons: bool = False) -> str:
    """Remove the user's profile file, or one plan from it; returns what was done, in a line.
    `lessons`: remove only what runs learnt (the safe micro-batch, compile off) from that plan,
    or from every plan without `fingerprint`, keeping the plans. Built-in profiles are read-only.
    Raises ProfileError (one line) for a missing profile or plan, or a file that cannot be read."""
    path = profile_path(name)
    is_builtin = name in set(builtin_names)

    def missing() -> ProfileError:
        if is_builtin:
            return ProfileError(f"{name} is a built-in profile; built-ins are read-only "
                                f"(only user profiles in {path.parent} can be removed)")
        return ProfileError(f"no profile {name}: {path} does not exist")

    # Checked before the lock: a command that finds nothing to do writes nothing (no lock file).
    # A dangling link is there to remove (the link, not what it names); a folder is not ours to remove.
    if not path.exists() and not path.is_symlink():
        raise missing()
    if path.is_dir() and not path.is_symlink():
        raise ProfileError(f"{path} is a folder, not a profile file: move or remove it yourself")
    check_profiles_writable()
    with _locked(path):
        if not path.exists() and not path.is_symlink():  # removed by another process while we waited
            raise missing()
        if lessons:
            return _clear(path, fingerprint)
        if fingerprint is None:
            # Not read first: removing the whole file is also how a user gets rid of a corrupt one.
            try:
                path.unlink()
            except OSError as exc:
                raise ProfileError(f"cannot remove {path}: {exc.strerror or exc}") from None
            drop_lock_file(path)  # last under the lock: to a waiter its removal is the lock's release
            if is_builtin:
                return f"removed {path}; the built-in {name} applies again"
            return f"removed {path}"
        profile = _read_file(path)
        if profile is None:
            raise ProfileError(f"no profile {name}: {path} does not exist")
        fingerprint = _one_plan(profile, fingerprint, path)
        del profile.plans[fingerprint]
        _write_atomic(path, profile)
    return f"removed plan {fingerprint} from {path}"


def _clear(path: Path, fingerprint: str | None) -> str:
    """Clears the lessons of plan `fingerprint` (every plan's for None) in the file at `path`,
    held locked by the caller; returns what was done, in a line."""
    profile = _read_file(path)
    if profile is None:
        raise ProfileError(f"no profile {path.stem}: {path} does not exist")
    fps = [_one_plan(profile, fingerprint, path)] if fingerprint is not None else sorted(profile.plans)
    done = [f"plan {fp}: {'; '.join(words)}" for fp in fps if (words := clear_lessons(profile.plans[fp]))]
    if not done:
        return f"no lessons to clear in {'plan ' + fps[0] if fingerprint is not None else 'any plan'} of {path}"
    _write_atomic(path, profile)
    return f"cleared the lessons of runs in {path}: {' | '.join(done)}"


def _one_plan(profile, fingerprint: str, path: Path) -> str:
    """The one plan of `profile` that `fingerprint` (whole, or a unique prefix) names; ProfileError else."""
    # a unique prefix is the plan: `profiles show` cuts fingerprints to fit a narrow terminal
    # (to 7 at least); one that short of 4 characters (git's floor for a short hash) is refused,
    # as a typo that happens to be unique would remove a plan without a word
    found = [fp for fp in profile.plans if fp.startswith(fingerprint)] if fingerprint else []
    if fingerprint in profile.plans:
        found = [fingerprint]
    elif len(fingerprint) < MIN_PREFIX and (found or not fingerprint):
        raise ProfileError(f"--plan {fingerprint or repr('')}: give at least {MIN_PREFIX} characters of the plan's "
                           f"fingerprint (plans: {', '.join(sorted(profile.plans))})")
    if len(found) != 1:
        known = ", ".join(sorted(found or profile.plans)) or "none"
        raise ProfileError(f"profile file {path} has {'several plans starting with' if found else 'no plan'} "
                           f"{fingerprint} ({'give more of it: ' if found else 'plans: '}{known})")
    return found[0]
