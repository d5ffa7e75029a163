"""Every write of autofit and the trainer, and the one answer when the disk says no.

Checkpoints, metrics.jsonl, profiles, datasets, plots and the terminal's stdout are written
through this module. A write either completes, or ends in a WriteError whose message is one line:
what was being written, why the system refused (strerror and errno name: ENOSPC, EROFS, EIO,
EACCES, ...), and what is kept:

    cannot write checkpoint out/ckpt.pt (step 210): No space left on device [ENOSPC]; the
    previous checkpoint out/ckpt.pt is kept as it was

Files are replaced atomically (temp file beside the target, fsync, rename, fsync of the folder):
a failed write leaves the old file whole and no temp file behind. A write killed outright (kill -9)
leaves its temp file; cut_writes finds those, for the next writer that holds the lock to remove. Appends (metrics.jsonl) write
whole lines only, and a line cut short by an earlier crash is ended before the next is added.
"""
from __future__ import annotations

import contextlib
import errno
import os
import sys
import tempfile
from pathlib import Path
from typing import IO, Callable, Iterator

from trainer.errors import TrainError


class WriteError(TrainError, OSError):
    """The system refused a write (an OSError underneath): one line naming what was written, the
    reason and what is kept. Also an OSError, so code that handled the raw error still does.
    `what`: 'checkpoint out/ckpt.pt'; `reason`: 'No space left on device [ENOSPC]'; `kept`: a
    clause ('the previous checkpoint ... is kept as it was') or '' when the caller adds it later."""

    def __init__(self, what: str, reason: str, kept: str = "", code: int | None = None):
        self.what, self.reason, self.kept, self.code = what, reason, kept, code
        super().__init__(f"cannot write {what}: {reason}" + (f"; {kept}" if kept else ""))

    def with_kept(self, kept: str) -> "WriteError":
        """The same refusal, saying what is kept (when it does not say so already)."""
        return self if self.kept else WriteError(self.what, self.reason, kept, self.code)


def reason(exc: BaseException) -> str:
    """'No space left on device [ENOSPC]': the system's words and the errno's name, for an
    OSError; str(exc) for one raised without an errno."""
    code = getattr(exc, "errno", None)
    if isinstance(exc, FileExistsError) and exc.filename and not os.path.isdir(exc.filename):
        # mkdir(exist_ok=True) of a folder that is a file: "File exists" reads as no problem at all
        return f"{exc.filename} is a file, not a folder [ENOTDIR]"
    name = errno.errorcode.get(code, "") if isinstance(code, int) else ""
    words = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return f"{words} [{name}]" if name else words


def refused(exc: OSError, what: str, kept: str = "") -> WriteError:
    """The WriteError for `exc` raised while writing `what`."""
    if isinstance(exc, WriteError):
        return exc.with_kept(kept)
    return WriteError(what, reason(exc), kept, getattr(exc, "errno", None))


def atomic_write(path: str | Path, fill: Callable[[IO[bytes]], None], what: str | None = None,
                 kept: str = "", mode: int = 0o666) -> None:
    """Replace `path` by what fill(binary file) writes: a temp file in the same folder, fsync,
    rename, fsync of the folder. `mode` is masked by the umask (mkstemp's 0o600 would make a
    dataset or a plot private). On any failure the old file (or none) stays, the temp file is
    removed, and an OSError becomes a WriteError naming `what` (default: the path) and `kept`
    (default: none; a caller that knows more adds it with WriteError.with_kept). A symlink is
    written through: its target is replaced (beside the target), and the link stays, as reading
    follows it (a ckpt.pt linked to a bigger disk stays there; a profile linked from dotfiles too)."""
    what = what or str(path)
    path = Path(os.path.realpath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise refused(e, what, kept) from None
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, mode & ~umask)
        with os.fdopen(fd, "wb") as f:
            fill(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise refused(e, what, kept) from None
        if isinstance(e, RuntimeError) and isinstance(e.__context__, OSError):
            # torch.save's zip writer: a full disk's OSError, raised again as "unexpected pos"
            raise refused(e.__context__, what, kept) from None
        raise
    with contextlib.suppress(OSError):  # the rename itself made durable, where a folder can be fsynced
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def cut_writes(path: str | Path) -> list[Path]:
    """The temp files that atomic_write(`path`) left when it was killed mid-write (kill -9, the
    OOM killer, a power loss: nothing ran to remove them), by the names mkstemp gives them here
    ('.ckpt.pt.k3j9x_2q.tmp'), regular files only: never a file of the user's. atomic_write writes
    through a symlink, its temp file beside the link's TARGET and named after it
    ('.run.pt.k3j9x_2q.tmp' for a ckpt.pt linked to big/run.pt), so the path is resolved the same
    way here; beside a link, its own name is looked for too (what an autofit before 9d9d6dd left).
    Only safe to remove while no other process can be writing `path` (the caller holds its lock;
    a link's target folder is outside it, so a target shared by two runs at once is the user's risk)."""
    import re
    path = Path(path)
    places, real = [path], Path(os.path.realpath(path))
    if real != Path(os.path.realpath(path.parent)) / path.name:  # path itself is a link
        places.insert(0, real)
    found: dict[str, Path] = {}  # by real path: a folder reached both ways is listed once
    for place in places:
        name = re.compile(re.escape(f".{place.name}.") + r"[a-z0-9_]{8}\.tmp")
        try:
            for p in place.parent.iterdir():
                if name.fullmatch(p.name) and p.is_file() and not p.is_symlink():
                    found.setdefault(os.path.realpath(p), p)
        except OSError:  # no folder yet, or not readable: nothing to clear
            pass
    return list(found.values())


def append_lines(path: str | Path, lines: list[str], what: str | None = None, kept: str = "") -> None:
    """Append whole lines (each without its newline) to `path`, creating it. A file whose last
    line was cut short (a crash, a full disk) is ended with a newline first, so no new record is
    glued onto a broken one. A failed append is undone (the file is cut back to its old length,
    where the system lets it) and raised as a WriteError."""
    path = Path(path)
    what = what or str(path)
    text = "".join(line + "\n" for line in lines).encode("utf-8")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # os-level, unbuffered: a buffered file's truncate() flushes the bytes a full disk refused
        # first, fails again, and the cut never happens; here nothing waits in a buffer
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            start = os.lseek(fd, 0, os.SEEK_END)
            if start and _last_byte(path) != b"\n":
                text = b"\n" + text
            try:
                _write_all(fd, text)
            except OSError:
                with contextlib.suppress(OSError):  # the part that was written goes
                    os.ftruncate(fd, start)
                raise
        finally:
            os.close(fd)
    except OSError as e:
        raise refused(e, what, kept) from None


def _write_all(fd: int, data: bytes) -> None:
    """os.write until every byte of `data` is written (a write may take only a part)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _last_byte(path: Path) -> bytes:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1)


def check_room(folder: str | Path, what: str, nbytes: int = 1 << 16) -> None:
    """Raises WriteError unless `nbytes` can really be written in `folder` (a temporary file,
    written, fsynced and deleted): a full disk or a read-only file system is found before any
    work, where a 0-byte test file would still be created on a full disk."""
    try:
        with tempfile.TemporaryFile(dir=folder) as f:
            f.write(b"\0" * nbytes)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise refused(e, what, "nothing was written") from None


class GuardedStream:
    """A text stream (sys.stdout) whose write and flush turn an OSError into a WriteError naming
    the stream: `autofit probe > /dev/full` ends in one line on stderr, not a traceback. After a
    failure the stream's file descriptor points to os.devnull, so that the interpreter's final
    flush has nowhere to fail. A closed pipe (EPIPE, `| head`) is the reader's choice: it ends
    the command quietly (exit status 1, as rich does), except while `on_broken_pipe` is set
    (training, broken_pipe_calls): then that is called once, and this write and every later one
    are dropped, so that the caller can stop where its work is kept. Other attributes are the
    stream's."""

    def __init__(self, stream, name: str = "stdout"):
        self._stream = stream
        self._name = name
        self.on_broken_pipe: Callable[[], None] | None = None

    def write(self, s: str) -> int:
        try:
            return self._stream.write(s)
        except OSError as e:
            if self._dropped(e):
                return len(s)
            raise self._failed(e) from None

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError as e:
            if not self._dropped(e):
                raise self._failed(e) from None

    def _dropped(self, e: OSError) -> bool:
        """A closed pipe while on_broken_pipe is set: told, and the write dropped (the stream now
        writes to os.devnull, so no second EPIPE follows)."""
        if self.on_broken_pipe is None or getattr(e, "errno", None) != errno.EPIPE:
            return False
        self._failed(e)
        self.on_broken_pipe()
        return True

    def _failed(self, e: OSError) -> BaseException:
        with contextlib.suppress(OSError, ValueError, AttributeError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())
            os.close(devnull)
        if getattr(e, "errno", None) == errno.EPIPE:
            return SystemExit(1)
        return refused(e, f"to {self._name}")  # what is kept: the command's phase knows (cli.app._train)

    def __getattr__(self, name):
        return getattr(self._stream, name)


@contextlib.contextmanager
def broken_pipe_calls(hook: Callable[[], None]) -> Iterator[None]:
    """Within it, a closed pipe on sys.stdout (a GuardedStream: the CLI's) calls hook() instead of
    ending the process: training's reader going away (`autofit run | head`) then stops at the step
    boundary with a checkpoint, as a Ctrl-C does, where a quiet exit lost every step since the last
    one. Outside it (probe, config, sample) the quiet exit stands. A plain sys.stdout: no change."""
    stream = sys.stdout
    if not isinstance(stream, GuardedStream):
        yield
        return
    old, stream.on_broken_pipe = stream.on_broken_pipe, hook
    try:
        yield
    finally:
        stream.on_broken_pipe = old


@contextlib.contextmanager
def guarded_stdout() -> Iterator[None]:
    """sys.stdout as a GuardedStream for a command, flushed at its end (where a full disk is one
    line, not an error at the interpreter's exit), then put back. Raises WriteError when stdout is
    closed (`>&-`): a file opened later would take its descriptor, and prints would land in it."""
    if sys.stdout is None:
        raise WriteError("to stdout", "it is closed", "nothing was done; send the output to a file or to "
                         "/dev/null instead of closing it")
    old = sys.stdout
    guard = sys.stdout = old if isinstance(old, GuardedStream) else GuardedStream(old)
    try:
        yield
    except BaseException:
        with contextlib.suppress(OSError, SystemExit):  # the error in flight is the one to say
            guard.flush()
        raise
    else:
        guard.flush()
    finally:
        sys.stdout = old
