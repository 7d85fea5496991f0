"""Paths as text, shown and tested as pathlib does, without importing pathlib (start-up: it imports fnmatch,
re, enum, urllib.parse and ipaddress). Objects that keep a path as text make the Path on first use (`as_path`)."""

from __future__ import annotations

import os
import stat

from . import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path

#: The errors pathlib's exists() and is_*() take for "not there" (pathlib._IGNORED_ERRNOS).
_ABSENT = (2, 20, 9, 40)  # ENOENT, ENOTDIR, EBADF, ELOOP


class Text(str):
    """A path as text made here (`text`, `join`, `parent`): an object keeping one as its `path` attribute makes
    the Path on first use (`as_path`); a str given by a caller stays a str."""

    __slots__ = ()


def _split(path: str) -> tuple[str, list[str]]:
    """(root, parts) as PurePosixPath parses `path`: "//" is a root of its own, "." and empty parts go."""
    root = ""
    if path.startswith("/"):
        root = "//" if path.startswith("//") and not path.startswith("///") else "/"
    return root, [part for part in path.split("/") if part and part != "."]


def _show(root: str, parts: list[str]) -> Text:
    return Text((root + "/".join(parts)) or ".")


def text(path: str | os.PathLike[str]) -> Text:
    """`str(pathlib.Path(path))`: the same TypeError for what is not a str path."""
    value = os.fspath(path)
    if not isinstance(value, str):
        raise TypeError(f"argument should be a str object or an os.PathLike object returning str, not {type(value)!r}")
    return _show(*_split(value))


def join(directory: str, name: str) -> Text:
    """`str(Path(directory) / name)` (an absolute `name` replaces `directory`)."""
    root, parts = _split(name)
    if root:
        return _show(root, parts)
    base_root, base = _split(directory)
    return _show(base_root, base + parts)


def name(path: str) -> str:
    """`Path(path).name`."""
    parts = _split(path)[1]
    return parts[-1] if parts else ""


def parent(path: str) -> Text:
    """`str(Path(path).parent)`."""
    root, parts = _split(path)
    return _show(root, parts[:-1]) if parts else _show(root, parts)


def _mode(path: str, follow: bool = True) -> int | None:
    """st_mode of `path` (text as `text` gives it: pathlib tests the normalized path), or None where pathlib's
    exists()/is_*() say False (absent, a loop, a name with NUL); other errors (EACCES...) raise, as there."""
    try:
        return (os.stat(path) if follow else os.lstat(path)).st_mode
    except OSError as exc:
        if exc.errno not in _ABSENT:
            raise
        return None
    except ValueError:
        return None


def exists(path: str) -> bool:
    """`Path(path).exists()`."""
    return _mode(path) is not None


def is_dir(path: str) -> bool:
    """`Path(path).is_dir()`."""
    return stat.S_ISDIR(_mode(path) or 0)


def is_file(path: str) -> bool:
    """`Path(path).is_file()`."""
    return stat.S_ISREG(_mode(path) or 0)


def is_symlink(path: str) -> bool:
    """`Path(path).is_symlink()`."""
    return stat.S_ISLNK(_mode(path, follow=False) or 0)


def as_path(path: str) -> Path:
    """The Path of a path kept as text."""
    from pathlib import Path

    return Path(path)
