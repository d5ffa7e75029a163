"""Saved per-GPU profiles: a GPU's hardware description plus the plans fitted on it.

One TOML file per profile, `<profiles_dir>/<name>.toml`. Plans are keyed by a fingerprint of
everything that changes memory use (config summary, torch, CUDA and driver versions), so a plan
found for one config/software stack is never silently reused for another.

Files are written atomically (temp file, fsync, rename) under an exclusive per-profile lock, so
concurrent probes and trainers recording run-time OOMs never lose each other's updates. A file
that cannot be read as a profile is never overwritten.

Where files live, the lock and atomic writes are in autofit.profiles.files; fingerprints in
autofit.profiles.fingerprints (both re-exported here). No other autofit module but `records` is imported:
the hardware description is a plain dict (a HardwareSpec dumped with `model_dump(mode="json")`),
and built-in profiles are looked up through a callable the caller passes in.
"""
from __future__ import annotations

import shlex
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# Re-exported: callers know the fingerprint and file-location functions from here.
from autofit.profiles import fingerprints as _fingerprints
from autofit.profiles.fingerprints import _strip_none, explain_stale, fingerprint_inputs  # noqa: F401
from autofit.profiles.files import (NAME_MAX, NAME_RE, ProfileError, _is_valid_name,  # noqa: F401
                                   check_name, check_profiles_writable, first_problem, locked as _locked,
                                   newer_schema, profile_path, profiles_dir, write_text_atomic)
from autofit.profiles.hardware_table import MAX_MEMORY_BYTES, StoredHardware  # noqa: F401
from autofit.profiles.lessons import (Lesson, _as_utc, _now, clear_lessons, lesson_notes,  # noqa: F401
                                      merged as _merged)
from autofit.records import PlanRecord, TrialRecord
from trainer.paths import PathProblem, TomlProblem, input_file, parse_toml

# An assignment, not an import: several functions here take a `fingerprint` argument.
fingerprint = _fingerprints.fingerprint



# 2: searched_under and the lessons' stamps (safe_micro_batch_lesson, compile_failed_lesson).
# Version 1 files are read as they are (the new fields default: no search flags, lessons of an
# unknown date); every write is at SCHEMA_VERSION, so an older autofit reading it says "upgrade"
# instead of "corrupt, rm it". A field added to a profile's models bumps it
# (tests/test_profile_state.py pins the fields to the version).
SCHEMA_VERSION = 2


BuiltinLookup = Callable[[str], "dict[str, Any] | None"]


class FittedPlan(BaseModel):
    model_config = ConfigDict(extra="forbid")

    fingerprint: str
    fingerprint_inputs: dict[str, Any]
    config_summary: dict[str, Any]
    plan: PlanRecord
    trials: list[TrialRecord] = Field(default_factory=list)
    created: datetime = Field(default_factory=_now)
    # when the plan was last fitted (a probe's save): what 'fitted <date>' and 'profiles show' say;
    # a lesson or its clearing does not move it (each event carries its own time: t6's L1)
    updated: datetime = Field(default_factory=_now)
    # Lessons learnt at run time, each prefixed with its UTC time.
    events: list[str] = Field(default_factory=list)
    # Lowered by run-time OOMs: the trainer starts at most at this micro-batch next time.
    safe_micro_batch: int | None = Field(default=None, ge=1)
    # torch.compile OOMed at run time: start eager next time.
    compile_failed: bool = False
    # when and where each of the two was learnt (schema 2); None with a lesson set: a version 1
    # file's, of an unknown date, which any new probe clears
    safe_micro_batch_lesson: Lesson | None = None
    compile_failed_lesson: Lesson | None = None
    # the probe's search flags it was fitted under ('--loss chunked'): a run reusing the plan says
    # it is the best of a narrower search, and a narrower run's probe is not saved over a plan
    # fitted under fewer (launch.run.prepare_run)
    searched_under: list[str] = Field(default_factory=list)

    @field_validator("created", "updated")
    @classmethod
    def _utc(cls, value: datetime) -> datetime:
        return _as_utc(value)

    @field_validator("fingerprint_inputs", "config_summary")
    @classmethod
    def _no_none(cls, value: dict[str, Any]) -> dict[str, Any]:
        # TOML drops None; dropping it here too makes a plan equal to itself read back from disk.
        return _strip_none(value)


class SavedProfile(BaseModel):
    # Forbidding unknown keys makes hand-edit typos and foreign files fail loudly; new fields
    # come with a schema_version bump.
    model_config = ConfigDict(extra="forbid")

    schema_version: int = Field(default=SCHEMA_VERSION, ge=1, le=SCHEMA_VERSION)
    name: str
    hardware: dict[str, Any] | None = None  # None for CPU budget profiles such as 'cpu-2gb'
    device_note: str = ""
    plans: dict[str, FittedPlan] = Field(default_factory=dict)

    @field_validator("hardware")
    @classmethod
    def _typed_hardware(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            try:
                StoredHardware.model_validate(value)
            except ValidationError as exc:  # one line, with the field's path under 'hardware'
                raise ValueError(first_problem(exc, "hardware")) from None
        return value

    @field_validator("name")
    @classmethod
    def _name_is_slug(cls, value: str) -> str:
        if not _is_valid_name(value):
            raise ValueError(f"profile name {value!r} is not a slug ([a-z0-9][a-z0-9._-]*)")
        return value

    @model_validator(mode="after")
    def _keys_match_fingerprints(self) -> SavedProfile:
        for key, plan in self.plans.items():
            if key != plan.fingerprint:
                raise ValueError(f"plan key {key!r} differs from its fingerprint {plan.fingerprint!r}")
        return self


# ---------------------------------------------------------------- plans in a profile


def find_plan(profile: SavedProfile, fingerprint: str) -> FittedPlan | None:
    return profile.plans.get(fingerprint)


def nearest_plan(profile: SavedProfile, inputs: dict[str, Any]) -> tuple[FittedPlan, list[str]] | None:
    """The stored plan whose inputs differ least from `inputs`, with the differences; for telling
    the user why a saved plan is not reused ("torch 2.4.0 -> 2.5.1"). None if there are no plans."""
    best: tuple[FittedPlan, list[str]] | None = None
    for plan in profile.plans.values():
        changes = explain_stale(plan.fingerprint_inputs, inputs)
        if best is None or len(changes) < len(best[1]):
            best = (plan, changes)
    return best


# ---------------------------------------------------------------- reading


def _read_file(path: Path) -> SavedProfile | None:
    """The profile stored at `path`, None if there is no file; ProfileError if it is not one."""
    if not path.exists() and not path.is_symlink():
        return None
    try:  # a dangling or looping link, a FIFO (reading blocks), a device (reading never ends)
        data = input_file(path, "profile file").read_bytes()
    except FileNotFoundError:
        return None
    except PathProblem as exc:
        raise ProfileError(f"{exc}; {_clear_hint(path)}") from None
    except OSError as exc:
        raise ProfileError(f"cannot read profile file {path}: {exc.strerror or exc}") from None
    clear = f"autofit profiles rm {path.stem}"
    try:
        raw = parse_toml(data.decode("utf-8-sig"))
    except (TomlProblem, UnicodeDecodeError) as exc:
        raise ProfileError(f"profile file {path} is not valid TOML: {_one_line(str(exc))}; "
                           f"clear it with: {clear}") from None
    version = newer_schema(raw, SCHEMA_VERSION)  # before validation: a newer schema may fail our model
    if version is not None:
        raise ProfileError(f"{path} was written by a newer autofit (schema {version} > {SCHEMA_VERSION}); "
                           f"upgrade autofit, or clear it with: {clear}")
    try:
        profile = SavedProfile.model_validate(raw)
    except ValidationError as exc:
        raise ProfileError(f"{path} is not an autofit profile: {first_problem(exc, '(top level)')}; "
                           f"clear it with: {clear}") from None
    # The file name is how users address a profile; a renamed file takes its new name.
    if profile.name != path.stem:
        profile = profile.model_copy(update={"name": path.stem})
    return profile


def _clear_hint(path: Path) -> str:
    """How to be rid of what stands at a profile's path: `profiles rm` for a file or a link
    (only the link goes), never for a folder, which autofit did not write (the line before it
    already says it is a folder: t12's L8 read 'is a folder ...; it is a folder ...')."""
    if path.is_dir() and not path.is_symlink():
        return "move or remove it yourself"
    return f"clear it with: autofit profiles rm {path.stem}"


def _one_line(text: str) -> str:
    return " ".join(text.split())


def load_profile(name: str, *, builtin: BuiltinLookup | None = None) -> SavedProfile | None:
    """The user's profile file if present; else a plan-less profile from the built-in hardware
    lookup if it knows `name`; else None."""
    profile = _read_file(profile_path(name))
    if profile is not None:
        return profile
    hardware = builtin(name) if builtin is not None else None
    if hardware is not None:
        return SavedProfile(name=name, hardware=dict(hardware))
    return None


# ---------------------------------------------------------------- writing


def _write_atomic(path: Path, profile: SavedProfile) -> None:
    # Serialise first: if that fails, no temp file is ever created. Always at this autofit's
    # schema: a version 1 file read here and written back has version 2's fields.
    data = profile.model_dump(mode="json", exclude_none=True) | {"schema_version": SCHEMA_VERSION}
    text = tomli_w.dumps(_strip_none(data))
    write_text_atomic(path, text)


def save_plan(name: str, hardware: dict[str, Any] | None, plan: FittedPlan,
              hardware_defaults: dict[str, Any] | None = None, probed_since: datetime | None = None,
              on_cleared=None) -> Path:
    """Create or update profile `name` with `plan`; returns the file's path.

    A plan with the same fingerprint is replaced, keeping its `created`, its events, and the
    lessons runs learnt with it (the safe micro-batch, compile failed) that are newer than
    `probed_since` (the probe's start: a run may report while the probe runs); older ones are
    cleared, as the probe measured again (and an event says so); None keeps every lesson. Lessons
    of an unknown date (a version 1 file) count as older than any probe; on_cleared(words), where
    given, is told the cleared ones ('safe micro-batch 16 (step 1 of run r4, ...)'). Other plans are kept. `hardware`, when given, updates the stored
    description key by key (so peak rates written by `autofit profiles add` survive a save from a
    probe that knows only the card's name and memory); None keeps what is stored.
    `hardware_defaults` (a built-in card's table entry) fills in only the keys neither has, so it
    never overwrites what `profiles add` wrote. Raises ProfileError for a bad name, an unwritable
    directory, or a stored file that cannot be read: then the file is left as it is and the plan
    is kept in a side file `kept/<name>.plan-<fingerprint>.toml` under the profiles directory,
    which the message names."""
    path = profile_path(name)
    check_profiles_writable()
    with _locked(path):
        try:
            profile = _read_file(path) or SavedProfile(name=name)
        except ProfileError as exc:
            raise ProfileError(_keep_aside(path, hardware, plan, str(exc))) from None
        if hardware is not None or hardware_defaults:
            given = [{k: v for k, v in (d or {}).items() if v is not None}
                     for d in (hardware_defaults, profile.hardware, hardware)]
            profile.hardware = {**given[0], **given[1], **given[2]}
        old = profile.plans.get(plan.fingerprint)
        kept, cleared = ({}, []) if old is None else _merged(old, plan, probed_since)
        if cleared and on_cleared is not None:
            on_cleared(cleared)
        profile.plans[plan.fingerprint] = plan.model_copy(update={**kept, "updated": _now()})
        _write_atomic(path, profile)
    return path


def save_hardware(name: str, hardware: dict[str, Any]) -> tuple[Path, bool]:
    """Write `hardware` as profile `name`'s description, keeping any fitted plans (they were
    measured on the card itself). Returns (path, whether the file was new). Raises ProfileError
    for a bad name, an unwritable directory or an unreadable existing file (left as it is)."""
    path = profile_path(name)
    check_profiles_writable()
    with _locked(path):
        old = _read_file(path)
        profile = old or SavedProfile(name=name)
        profile.hardware = dict(hardware)
        _write_atomic(path, profile)
    return path, old is None


def side_file_path(path: Path, fingerprint: str) -> Path:
    """Where save_plan keeps a plan it could not add to the profile file at `path`."""
    # A subfolder: the listing (and every lookup by name) sees only <profiles_dir>/*.toml.
    return path.parent / "kept" / f"{path.stem}.plan-{fingerprint}.toml"


def _keep_aside(path: Path, hardware: dict[str, Any] | None, plan: FittedPlan, problem: str) -> str:
    """Write `plan` as a profile of its own next to the unreadable `path`; return the error line."""
    side = side_file_path(path, plan.fingerprint)
    kept = SavedProfile(name=path.stem, hardware=dict(hardware) if hardware is not None else None,
                        plans={plan.fingerprint: plan})
    try:
        side.parent.mkdir(exist_ok=True)
        _write_atomic(side, kept)
    except (OSError, ProfileError):
        return problem + "; the plan could not be kept"
    # The side file is a profile in its own right; renamed to <name>.toml it becomes that profile.
    repair = problem.split("; clear it with: ")[0].split("; upgrade autofit")[0]
    # quoted: a space in AUTOFIT_HOME would split the paths of a command pasted into a shell
    return (f"{repair}; the plan was kept in {side}; repair: autofit profiles rm {path.stem} && "
            f"mv {shlex.quote(str(side))} {shlex.quote(str(path))}")


def record_event(name: str, fingerprint: str, event: str, *, safe_micro_batch: int | None = None,
                 compile_failed: bool | None = None, step: int | None = None,
                 failed_micro_batch: int | None = None, run: str = "") -> None:
    """Append a run-time lesson to a saved plan; `event` is prefixed with the UTC time.
    `safe_micro_batch` only ever lowers the stored one (two runs reporting at once keep the
    safer value); `compile_failed`, when given, is stored as is. Each is stamped with a Lesson
    (now, `step`, `failed_micro_batch`, `run`: the run's --out), which a later probe compares with
    its start (save_plan). Raises ProfileError for a missing profile or plan, ValueError for a
    safe_micro_batch below 1."""
    path = profile_path(name)
    if not path.exists():  # checked before the lock: finding nothing to do writes nothing
        raise ProfileError(f"no profile file {path} to record the event in")
    with _locked(path):
        profile = _read_file(path)
        if profile is None:
            raise ProfileError(f"no profile file {path} to record the event in")
        plan = profile.plans.get(fingerprint)
        if plan is None:
            raise ProfileError(f"profile file {path} has no plan {fingerprint}")
        now = _now()
        lesson = Lesson(learned=now, step=step, failed_micro_batch=failed_micro_batch, run=run)
        plan.events.append(f"{now:%Y-%m-%dT%H:%MZ} {_one_line(event)}")
        if safe_micro_batch is not None:
            if safe_micro_batch < 1:
                raise ValueError(f"safe_micro_batch must be >= 1, got {safe_micro_batch}")
            current = plan.safe_micro_batch
            if current is None or safe_micro_batch <= current:  # the same again: its newer date
                plan.safe_micro_batch, plan.safe_micro_batch_lesson = safe_micro_batch, lesson
        if compile_failed is not None:
            plan.compile_failed = compile_failed
            plan.compile_failed_lesson = lesson if compile_failed else None
        _write_atomic(path, profile)

