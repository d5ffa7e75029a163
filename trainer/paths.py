"""Paths as they really are: the one check of a file to read or a folder to write, before any work.

A path a user names may be a symbolic link (dangling, looping, pointing at a file where a folder
is wanted), a FIFO (opening it blocks until someone writes), a device file (/dev/zero never ends)
or a folder this process cannot write in (as root, os.access says yes even to /proc). Every
command checks its inputs with `input_file` and its output folders with `output_dir`, and gets
one line naming the path, what it was for and what it really is.
"""
from __future__ import annotations

import errno
import os
import stat
import tempfile
from pathlib import Path


class PathProblem(ValueError):
    """A path that cannot be used as asked (one line: what it was for, the path, what it is)."""


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder")):
        if test(mode):
            return name
    return "a file" if stat.S_ISREG(mode) else "not a regular file"


def expand_user(path: str | Path) -> Path:
    """`path` with a leading ~ or ~user made the home folder, as Path.expanduser does; where that
    home cannot be found (no such user, no HOME), the path as written, so the check that follows
    says it does not exist, in one line (Path.expanduser raises RuntimeError there)."""
    try:
        return Path(path).expanduser()
    except RuntimeError:
        return Path(path)


def real_stat(path: Path, what: str) -> os.stat_result | None:
    """os.stat following links; None when nothing is there; PathProblem (one line, beginning with
    `what`) for a dangling link, a loop, or a path through a file."""
    try:
        return os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise PathProblem(f"{what} {path}: a symbolic link to {os.readlink(path)}, which does not exist") from None
        return None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise PathProblem(f"{what} {path}: a loop of symbolic links") from None
        if e.errno == errno.ENOTDIR:
            raise PathProblem(f"{what} {path}: a part of the path is a file, not a folder") from None
        raise PathProblem(f"{what} {path}: {e.strerror or e}") from None


def input_file(path: str | Path, what: str) -> Path:
    """`path`, checked to be a regular file to read (after following symbolic links): not missing,
    not a dangling link or a loop, not a folder, FIFO, socket or device (whose reading blocks or
    never ends). Returns the path as given. Raises PathProblem (one line, beginning with `what`)."""
    path = Path(path)
    st = real_stat(path, what)
    if st is None:
        raise PathProblem(f"{what} {path}: no such file")
    if not stat.S_ISREG(st.st_mode):
        link = f" (a symbolic link to {os.readlink(path)})" if path.is_symlink() else ""
        raise PathProblem(f"{what} {path}{link} is {_kind(st.st_mode)}, not a regular file")
    return path


def nearest_existing(path: str | Path) -> Path:
    """`path` itself if it exists, else its nearest existing parent (where a folder to be made
    would be created, so where a test write tells whether it can be)."""
    existing = Path(path)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    return existing


def output_dir(path: str | Path, what: str) -> Path:
    """`path`, checked to be a folder this process can create files in (or create): what exists of
    it is a folder after following links (not a dangling link, a loop, a file, FIFO or device),
    and a temporary file can really be written in the nearest existing folder (deleted at once;
    os.access is not asked, it says yes to root everywhere). Returns the path as given. Raises
    PathProblem (one line, beginning with `what`)."""
    path = Path(path)
    existing = path
    while (st := real_stat(existing, what)) is None and existing != existing.parent:
        existing = existing.parent
    if st is None or not stat.S_ISDIR(st.st_mode):
        kind = _kind(st.st_mode) if st is not None else "missing"
        raise PathProblem(f"{what} {path}: {existing} is {kind}, not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise PathProblem(f"{what} {path}: {existing} is not writable ({e.strerror or e})") from None
    return path


class TomlProblem(ValueError):
    """Text that is not TOML, or TOML nested too deeply to read (one line)."""


def read_user_text(path: str | Path, what: str) -> str:
    """The text of a file a user names: `input_file`'s checks, then UTF-8 with or without a byte
    order mark (Notepad writes one; TOML and Python allow it). Raises PathProblem (one line)."""
    path = input_file(path, what)
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise PathProblem(f"{what} {path}: not UTF-8 text (byte {e.start} is {e.object[e.start]:#04x})") from None
    except OSError as e:
        raise PathProblem(f"{what} {path}: cannot read it ({e.strerror or e})") from None


def parse_toml(text: str) -> dict:
    """tomllib.loads, with a byte order mark allowed and both of its failures one line: a syntax
    error, and nesting deeper than Python's recursion limit (tomllib recurses per level). Raises
    TomlProblem."""
    import sys
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - pyproject installs tomli on 3.10
        import tomli as tomllib
    try:
        return tomllib.loads(text.removeprefix("\ufeff"))
    except tomllib.TOMLDecodeError as e:
        raise TomlProblem(" ".join(str(e).split())) from None
    except RecursionError:
        raise TomlProblem("arrays or tables nested too deeply to read (more than a few hundred levels)") from None
