"""Where profile files live, their names, the per-profile lock and atomic writes.

- profiles_dir(): $AUTOFIT_HOME/profiles if set, else platformdirs' per-user data directory.
- The lock: filelock.FileLock on `<file>.lock` (fcntl where the platform has it, a lock file that
  is removed on release elsewhere); `profiles rm` of a whole profile removes its lock file too,
  where filelock makes that safe (drop_lock_file).
- Writes: temp file in the same directory, fsync, rename, fsync of the directory.
Every failure a user can cause is a ProfileError with one line that names the file.
"""
from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from pathlib import Path

import filelock
import platformdirs

NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]*")
NAME_MAX = 100
# How long a writer waits for another's lock before telling the user it looks stale. With fcntl
# a lock dies with its process, so only the lock-file fallback (no fcntl) can be stale.
LOCK_TIMEOUT_S = 30.0
# filelock.FileLock is the fcntl lock where there is fcntl, a plain lock file (SoftFileLock) elsewhere.
_LOCK_CLASS: type[filelock.BaseFileLock] = filelock.FileLock


class ProfileError(ValueError):
    """A profile problem the user can fix; the message is one line and names the file."""


def newer_schema(raw: dict, supported: int) -> int | None:
    """A TOML file's `schema_version` when it is newer than `supported` (an int, not a bool), else
    None. Checked before validation: a newer schema may legitimately fail this autofit's model."""
    version = raw.get("schema_version")
    newer = isinstance(version, int) and not isinstance(version, bool) and version > supported
    return version if newer else None


def first_problem(exc, top: str) -> str:
    """'<field.path>: <message>' of pydantic's first error in `exc` (a ValidationError), on one
    line; `top` names the place when the error is not about one field."""
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or top
    if first["type"] == "extra_forbidden":  # pydantic's "Extra inputs are not permitted"
        return f"{where}: unknown field (a typo, or written by a newer autofit)"
    return f"{where}: {' '.join(str(first['msg']).split()).removeprefix('Value error, ')}"


def profiles_dir() -> Path:
    """Where user profiles live: $AUTOFIT_HOME/profiles if set, else platformdirs' per-user data
    directory + /profiles (on Linux $XDG_DATA_HOME/autofit/profiles, by default
    ~/.local/share/autofit/profiles)."""
    home = os.environ.get("AUTOFIT_HOME")
    if home:
        try:
            where = Path(home).expanduser()
        except RuntimeError:  # '~nosuchuser/h': no folder to put them in (not one named '~nosuchuser' here)
            raise ProfileError(f"AUTOFIT_HOME={home}: no home folder for its '~' (no such user); give a "
                               f"folder that exists or can be made") from None
        if not where.is_absolute():  # as a relative XDG_DATA_HOME below: profiles would follow the cwd
            raise ProfileError(f"AUTOFIT_HOME={home} is a relative path: the profiles found would depend on the "
                               f"folder each command runs from; give an absolute one (e.g. {Path.cwd() / home})")
        return where / "profiles"
    data = platformdirs.user_data_path("autofit", appauthor=False)
    # The XDG spec says a relative $XDG_DATA_HOME is invalid and must be ignored; platformdirs
    # takes it as given, which would put profiles under whatever the current directory is.
    if not data.is_absolute():
        data = Path.home() / ".local" / "share" / "autofit"
    return data / "profiles"


def check_profiles_writable(name: str | None = None) -> Path:
    """Raise ProfileError (one line) unless a profile can be saved; call it before expensive work.

    The profiles directory must be a writable directory, or be creatable under a writable one;
    nothing is created (a temporary file is written and deleted: os.access says yes to root
    everywhere). `name`, when given, must be a valid profile name. Returns the directory."""
    if name is not None:
        check_name(name)
    from trainer.paths import PathProblem, output_dir
    directory = profiles_dir()
    try:  # links followed, FIFOs and files on the way refused, writability tested by writing
        output_dir(directory, "profiles folder")
    except PathProblem as e:
        raise ProfileError(f"cannot save profiles: {e}; set AUTOFIT_HOME to a writable directory, "
                           f"or fix the permissions") from None
    return directory


def _is_valid_name(name: str) -> bool:
    return len(name) <= NAME_MAX and NAME_RE.fullmatch(name) is not None


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _is_valid_name(name):
        raise ProfileError(f"bad profile name {name!r}: use lowercase letters, digits, '.', '_', '-' "
                           f"(starting with a letter or digit, at most {NAME_MAX} characters)")
    return name


def profile_path(name: str) -> Path:
    return profiles_dir() / f"{check_name(name)}.toml"


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Exclusive lock on `<path>.lock` around a read-modify-write of `path`.

    filelock takes an fcntl lock where the platform has one (the lock file stays in place, so a
    waiting process never locks a file another has unlinked; but for drop_lock_file, where
    filelock's acquirers drop a lock on an unlinked file) and an O_EXCL lock file elsewhere.
    Raises ProfileError when the lock is not had within LOCK_TIMEOUT_S."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock_path = path.with_name(path.name + ".lock")
    lock = _LOCK_CLASS(str(lock_path), timeout=LOCK_TIMEOUT_S)
    try:
        lock.acquire()
    except filelock.Timeout:
        raise ProfileError(f"timed out waiting for lock {lock_path}; if no autofit is running, "
                           "delete it") from None
    except OSError as exc:
        raise ProfileError(f"cannot lock profile file {path}: {exc.strerror or exc}") from None
    from trainer.writes import cut_writes
    for tmp in cut_writes(path):  # a writer killed mid-write; with the lock held, none is in flight
        with contextlib.suppress(OSError):
            tmp.unlink()
    try:
        yield
    finally:
        lock.release()


# From filelock 3.20.4 on, its Unix (flock) lock takes a lock only on the file its path still names:
# an acquirer whose flock lands on a file a holder unlinked (removed while it held the lock) drops it and
# opens the path again (tox-dev/filelock#408, 'deleted-before-flock'; kept when 3.29.5 stopped removing
# lock files on release). Before, such an acquirer kept its lock while a newcomer locked a new file at the
# path: two holders. Where the lock is that class and that version, a lock file may go with its profile.
_DROP_SAFE_FROM = (3, 20, 4)


def _version(text: str) -> tuple[int, ...]:
    """'4.3.2' -> (4, 3, 2); the leading numbers of a version string ('3.20.4.dev1' -> (3, 20, 4))."""
    return tuple(int(n) for n in re.findall(r"\d+", text)[:3])


def lock_file_may_go() -> bool:
    """Whether a profile's `<file>.lock` may be removed by its holder (drop_lock_file): the lock
    is filelock's Unix flock lock (elsewhere filelock removes its own lock file on release:
    Windows' and the lock-file fallback's) and of a version whose acquirers drop a lock on an
    unlinked file (_DROP_SAFE_FROM)."""
    return (_LOCK_CLASS is filelock.FileLock and filelock.FileLock is filelock.UnixFileLock
            and _version(filelock.__version__) >= _DROP_SAFE_FROM)


def drop_lock_file(path: Path) -> None:
    """Removes `<path>.lock` after `path` itself was removed, as the last act under locked(path):
    to every other process the removal is the lock's release (a waiter then locks a new file at
    the path), so nothing may follow it but leaving locked(). Kept where that could let two
    processes hold the lock at once (lock_file_may_go), and where it cannot be removed (it does
    no harm: the next locked() uses it)."""
    if lock_file_may_go():
        with contextlib.suppress(OSError):
            path.with_name(path.name + ".lock").unlink()


def write_text_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` (UTF-8) atomically through trainer.writes.atomic_write (temp file
    beside it, fsync, rename, fsync of the folder). On any failure the old file is untouched and
    no temp file is left; the disk's refusal becomes a ProfileError of one line."""
    from trainer.writes import WriteError, atomic_write
    try:
        atomic_write(path, lambda f: f.write(text.encode("utf-8")), what=f"profile file {path}",
                     kept=f"{path} is as it was" if path.exists() else "no profile file was written")
    except WriteError as exc:
        raise ProfileError(str(exc)) from None
