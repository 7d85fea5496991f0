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

import _signal  # signal.py imports enum: the built-in module has what `_created` needs
import contextlib
import errno
import os
import stat
from collections.abc import Iterator

from . import TYPE_CHECKING, _paths
from .errors import CritPageReadError

if TYPE_CHECKING:  # not imported at start-up (pathlib brings fnmatch, re, enum, urllib.parse, ipaddress)
    import re
    from pathlib import Path
    from typing import IO, Any

TEMP_TAG = "crit-pageread"
#: What every temporary name of ours holds (a name without it is not one: no regular expression is needed).
_TAG = f".{TEMP_TAG}-"
_TEMP_RE: list[re.Pattern[str]] = []  # compiled on first use


class OutputError(CritPageReadError):
    """An output cannot be created or written (names the output, not a temporary name)."""

    def __init__(self, path: object, problem: str) -> None:
        self.path = str(path)
        super().__init__(f"{self.path}: {problem}")


def temp_name(path: Path, n: int = 0) -> Path:
    """The temporary name of `path` for this process (`.NAME.crit-pageread-<pid>[.N].tmp`)."""
    return _paths.as_path(_temp_text(str(path), n))


def _temp_text(path: str, n: int = 0) -> str:
    """`temp_name` as text."""
    suffix = f".{n}" if n else ""
    return _paths.join(_paths.parent(path), f".{_paths.name(path)}{_TAG}{os.getpid()}{suffix}.tmp")


def parse_temp_name(name: str) -> tuple[str, int] | None:
    """(output name, pid) of a temporary name of ours, else None."""
    if _TAG not in name:
        return None
    if not _TEMP_RE:
        import re

        _TEMP_RE.append(re.compile(r"^\.(?P<name>.+)\." + TEMP_TAG + r"-(?P<pid>\d+)(?:\.\d+)?\.tmp$"))
    m = _TEMP_RE[0].match(name)
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
    return [_paths.as_path(p) for p in _stale(_paths.text(directory), name)]


def _stale(directory: str, name: str | None = None) -> list[str]:
    """`stale_temps` as text."""
    try:
        entries = os.listdir(directory)
    except OSError:
        return []
    out: list[str] = []
    for entry in sorted(entries):
        parsed = parse_temp_name(entry)
        if parsed is None or (name is not None and parsed[0] != name):
            continue
        if parsed[1] != os.getpid() and not pid_alive(parsed[1]):
            out.append(_paths.join(directory, entry))
    return out


def remove_stale(path: str | os.PathLike[str]) -> list[Path]:
    """Remove what killed runs left beside output `path`; return what was removed."""
    return [_paths.as_path(p) for p in _remove_stale(_paths.text(path))]


def _remove_stale(path: str) -> list[str]:
    """`remove_stale` as text."""
    removed: list[str] = []
    for tmp in _stale(_paths.parent(path), _paths.name(path)):
        try:
            if _paths.is_dir(tmp) and not _paths.is_symlink(tmp):
                import shutil

                shutil.rmtree(tmp)
            else:
                os.unlink(tmp)
            removed.append(tmp)
        except OSError:
            pass
    return removed


def _problem(exc: OSError) -> str:
    return exc.strerror or str(exc)


def _lstat(path: str) -> os.stat_result | None:
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


def _create_temp(final: str, st: os.stat_result | None, *, directory: bool = False) -> str:
    """Create this process's temporary name beside `final`, with the mode the output will have."""
    _remove_stale(final)
    mode = 0o777 if directory else 0o666
    for n in range(100):
        tmp = _temp_text(final, n)
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
def _created(make: Any) -> Iterator[str]:
    """Create a temporary name with SIGINT blocked, so that Ctrl-C lands either before it exists or
    inside the caller's clean-up (`make()` returns the path; it is removed if the body fails)."""
    old = _signal.pthread_sigmask(_signal.SIG_BLOCK, {_signal.SIGINT})
    try:
        tmp = make()
        try:
            _signal.pthread_sigmask(_signal.SIG_SETMASK, old)  # a pending Ctrl-C is raised here, inside the try
            yield tmp
        except BaseException:
            _discard(tmp)
            raise
    finally:
        _signal.pthread_sigmask(_signal.SIG_SETMASK, old)


def _discard(tmp: str) -> None:
    with contextlib.suppress(OSError):
        if _paths.is_dir(tmp) and not _paths.is_symlink(tmp):
            import shutil

            shutil.rmtree(tmp)
        else:
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A path to write the output `path` to, for code that opens it itself (crit's `-o`).

    Yields a temporary name (renamed into place on success, removed on failure),
    or `path` itself when it is a device, FIFO or other non-regular file.
    """
    text = _paths.text(path)
    st = _lstat(text)
    if _is_write_through(st):
        yield _paths.as_path(text)
        return
    with _created(lambda: _create_temp(text, st)) as tmp:
        yield _paths.as_path(tmp)
        try:
            os.replace(tmp, text)
        except OSError as exc:
            raise OutputError(text, f"cannot write: {_problem(exc)}") from None


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str], mode: str = "wb") -> Iterator[IO[Any]]:
    """Open the output `path` for writing: atomic for a regular file or new name, written through otherwise."""
    text = _paths.text(path)
    with atomic_path(text) as target:
        try:
            f = open(target, mode)
        except OSError as exc:
            raise OutputError(text, f"cannot open for writing: {_problem(exc)}") from None
        try:
            yield f
            try:
                f.close()
            except OSError as exc:
                raise OutputError(text, f"cannot write: {_problem(exc)}") from None
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
    with atomic_dir_text(path) as tmp:
        yield _paths.as_path(tmp)


@contextlib.contextmanager
def atomic_dir_text(path: str | os.PathLike[str]) -> Iterator[str]:
    """`atomic_dir` yielding the temporary directory as text (`str(Path(...))`), without importing pathlib."""
    text = _paths.text(path)
    if os.path.lexists(text):
        raise OutputError(text, "output already exists")
    with _created(lambda: _create_temp(text, None, directory=True)) as tmp:
        yield tmp
        try:
            os.rename(tmp, text)
        except OSError as exc:
            raise OutputError(text, f"cannot create: {_problem(exc)}") from None


@contextlib.contextmanager
def temp_dir_in(directory: str | os.PathLike[str], name: str) -> Iterator[Path]:
    """A private temporary directory of ours inside an existing `directory` (stale ones removed first),
    removed with what is left in it when the block ends."""
    text = _paths.join(_paths.text(directory), name)
    with _created(lambda: _create_temp(text, None, directory=True)) as tmp:
        yield _paths.as_path(tmp)
    _discard(tmp)


def publish(tmp: str | os.PathLike[str], final: str | os.PathLike[str]) -> None:
    """Move a finished file `tmp` to `final`: renamed over a regular file or new name, copied
    through a device, FIFO or symlink (which is then left in place); `tmp` is gone afterwards."""
    from pathlib import Path

    tmp, final = Path(tmp), Path(final)
    st = _lstat(str(final))
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
