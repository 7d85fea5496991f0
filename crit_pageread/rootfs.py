"""Files of a container's filesystem: a path opened as if `root` were `/`.

Symlinks are followed inside the root (an absolute target restarts at the
root, `..` stops at it), like openat2's RESOLVE_IN_ROOT: a container's
`/usr/lib -> lib` or `/lib64/ld-linux-x86-64.so.2 -> /lib/...` resolves in the
container, never on the host.
"""

from __future__ import annotations

import errno
import os
import stat

MAX_SYMLINKS = 40


def resolve_in_root(root: str | os.PathLike[str], path: str) -> str:
    """The host path of `path` inside `root`, every symlink resolved within the root."""
    root = os.path.realpath(root)
    todo = [p for p in path.split("/") if p not in ("", ".")]
    done: list[str] = []
    links = 0
    while todo:
        part = todo.pop(0)
        if part == "..":
            if done:
                done.pop()
            continue
        candidate = os.path.join(root, *done, part)
        try:
            st = os.lstat(candidate)
        except FileNotFoundError:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path) from None
        if stat.S_ISLNK(st.st_mode):
            links += 1
            if links > MAX_SYMLINKS:
                raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), path)
            target = os.readlink(candidate)
            if target.startswith("/"):
                done = []
            todo = [p for p in target.split("/") if p not in ("", ".")] + todo
            continue
        done.append(part)
    return os.path.join(root, *done)


def open_in_root(root: str | os.PathLike[str], path: str) -> int:
    """A read-only descriptor of `path` inside `root` (a regular file; never blocks on a FIFO)."""
    host = resolve_in_root(root, path)
    fd = os.open(host, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file", path)
    return fd
