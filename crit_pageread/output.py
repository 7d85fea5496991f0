"""Outputs that never destroy what the user named: the one atomic-output helper of every command.

- A new name, or an existing regular file: written under a temporary name
  beside it (`.NAME.crit-pageread-<pid>.tmp`) and renamed into place only when
  complete. An existing file keeps its mode (and owner, as root); a new one
  gets `0666 & ~umask`, as `crit -o` and the shell give it.
- Anything else (a device such as /dev/null, a FIFO, a socket, a symlink):
  opened and written through, never replaced (a symlink stays a symlink).
- Temporary names left by a killed run are recognisable; the next run on the
  same output removes those whose pid is no longer alive (`stale_temps` lists them).
- A failure to create an output names the output, never the temporary name.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
import stat
from collections.abc import Iterator
from pathlib import Path

from . import TYPE_CHECKING
from .errors import CritPageReadError

if TYPE_CHECKING:  # not imported at start-up
    from typing import IO, Any

TEMP_TAG = "crit-pageread"
_TEMP_RE = re.compile(r"^\.(?P<name>.+)\." + TEMP_TAG + r"-(?P<pid>\d+)(?:\.\d+)?\.tmp$")


class OutputError(CritPageReadError):
    """An output cannot be created or written (names the output, not a temporary name)."""

    def __init__(self, path: object, problem: str) -> None:
        self.path = str(path)
        super().__init__(f"{self.path}: {problem}")


def temp_name(path: Path, n: int = 0) -> Path:
    """The temporary name of `path` for this process (`.NAME.crit-pageread-<pid>[.N].tmp`)."""
    suffix = f".{n}" if n else ""
    return path.parent / f".{path.name}.{TEMP_TAG}-{os.getpid()}{suffix}.tmp"


def parse_temp_name(name: str) -> tuple[str, int] | None:
    """(output name, pid) of a temporary name of ours, else None."""
    m = _TEMP_RE.match(name)
    return (m.group("name"), int(m.group("pid"))) if m else None


def pid_alive(pid: int) -> bool:
    """Whether a process `pid` exists (a pid we may not signal counts as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale_temps(directory: str | os.PathLike[str], name: str | None = None) -> list[Path]:
    """Temporary names of ours in `directory` (for output `name`, or any) whose process is dead."""
    try:
        entries = os.listdir(directory)
    except OSError:
        return []
    out = []
    for entry in sorted(entries):
        parsed = parse_temp_name(entry)
        if parsed is None or (name is not None and parsed[0] != name):
            continue
        if parsed[1] != os.getpid() and not pid_alive(parsed[1]):
            out.append(Path(directory) / entry)
    return out


def remove_stale(path: str | os.PathLike[str]) -> list[Path]:
    """Remove what killed runs left beside output `path`; return what was removed."""
    path = Path(path)
    removed = []
    for tmp in stale_temps(path.parent, path.name):
        try:
            if tmp.is_dir() and not tmp.is_symlink():
                import shutil

                shutil.rmtree(tmp)
            else:
                tmp.unlink()
            removed.append(tmp)
        except OSError:
            pass
    return removed


def _problem(exc: OSError) -> str:
    return exc.strerror or str(exc)


def _lstat(path: Path) -> os.stat_result | None:
    """The output name's own stat (a symlink is not followed), or None when nothing is there."""
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise OutputError(path, _problem(exc)) from None


def _is_write_through(st: os.stat_result | None) -> bool:
    """A device, FIFO, socket or symlink: written through, never replaced."""
    return st is not None and not stat.S_ISREG(st.st_mode)


def _create_temp(final: Path, st: os.stat_result | None, *, directory: bool = False) -> Path:
    """Create this process's temporary name beside `final`, with the mode the output will have."""
    remove_stale(final)
    mode = 0o777 if directory else 0o666
    for n in range(100):
        tmp = temp_name(final, n)
        try:
            if directory:
                os.mkdir(tmp, mode)
            else:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
                try:
                    if st is not None:
                        os.fchmod(fd, stat.S_IMODE(st.st_mode))
                        if os.geteuid() == 0:
                            with contextlib.suppress(OSError):
                                os.fchown(fd, st.st_uid, st.st_gid)
                finally:
                    os.close(fd)
            return tmp
        except FileExistsError:
            continue
        except OSError as exc:
            raise OutputError(final, f"cannot create: {_problem(exc)}") from None
    raise OutputError(final, "cannot create: 100 temporary names in use")


@contextlib.contextmanager
def _created(make: Any) -> Iterator[Path]:
    """Create a temporary name with SIGINT blocked, so that Ctrl-C lands either before it exists or
    inside the caller's clean-up (`make()` returns the path; it is removed if the body fails)."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        tmp = make()
        try:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)  # a pending Ctrl-C is raised here, inside the try
            yield tmp
        except BaseException:
            _discard(tmp)
            raise
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _discard(tmp: Path) -> None:
    with contextlib.suppress(OSError):
        if tmp.is_dir() and not tmp.is_symlink():
            import shutil

            shutil.rmtree(tmp)
        else:
            tmp.unlink()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A path to write the output `path` to, for code that opens it itself (crit's `-o`).

    Yields a temporary name (renamed into place on success, removed on failure),
    or `path` itself when it is a device, FIFO or other non-regular file.
    """
    path = Path(path)
    st = _lstat(path)
    if _is_write_through(st):
        yield path
        return
    with _created(lambda: _create_temp(path, st)) as tmp:
        yield tmp
        try:
            os.replace(tmp, path)
        except OSError as exc:
            raise OutputError(path, f"cannot write: {_problem(exc)}") from None


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str], mode: str = "wb") -> Iterator[IO[Any]]:
    """Open the output `path` for writing: atomic for a regular file or new name, written through otherwise."""
    path = Path(path)
    with atomic_path(path) as target:
        try:
            f = open(target, mode)
        except OSError as exc:
            raise OutputError(path, f"cannot open for writing: {_problem(exc)}") from None
        try:
            yield f
            try:
                f.close()
            except OSError as exc:
                raise OutputError(path, f"cannot write: {_problem(exc)}") from None
        except BaseException:
            with contextlib.suppress(OSError):
                f.close()
            raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Build a new directory under a temporary name beside `path`; rename it into place on success.

    `path` must not exist (an existing name of any kind, a dangling symlink too,
    is an error): OUT is complete or absent.
    """
    path = Path(path)
    if os.path.lexists(path):
        raise OutputError(path, "output already exists")
    with _created(lambda: _create_temp(path, None, directory=True)) as tmp:
        yield tmp
        try:
            os.rename(tmp, path)
        except OSError as exc:
            raise OutputError(path, f"cannot create: {_problem(exc)}") from None


@contextlib.contextmanager
def temp_dir_in(directory: str | os.PathLike[str], name: str) -> Iterator[Path]:
    """A private temporary directory of ours inside an existing `directory` (stale ones removed first),
    removed with what is left in it when the block ends."""
    directory = Path(directory)
    with _created(lambda: _create_temp(directory / name, None, directory=True)) as tmp:
        yield tmp
    _discard(tmp)


def publish(tmp: str | os.PathLike[str], final: str | os.PathLike[str]) -> None:
    """Move a finished file `tmp` to `final`: renamed over a regular file or new name, copied
    through a device, FIFO or symlink (which is then left in place); `tmp` is gone afterwards."""
    tmp, final = Path(tmp), Path(final)
    st = _lstat(final)
    try:
        if not _is_write_through(st):
            if st is not None:
                with contextlib.suppress(OSError):
                    os.chmod(tmp, stat.S_IMODE(st.st_mode))
            os.replace(tmp, final)
            return
        with open(tmp, "rb") as src, open(final, "wb") as out:
            import shutil

            shutil.copyfileobj(src, out, 1 << 20)
        os.unlink(tmp)
    except OSError as exc:
        if exc.errno == errno.ENOENT and exc.filename == str(tmp):
            raise
        raise OutputError(final, f"cannot write: {_problem(exc)}") from None
