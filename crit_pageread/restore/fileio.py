"""File output: zero-copy file-to-file copies (copy_file_range, else sendfile, else preadv); atomic output is
the core's `crit_pageread.output` (re-exported here for the restore flows)."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

from ..errors import ImageError
from ..output import atomic_dir, atomic_file

__all__ = ["atomic_dir", "atomic_file", "chunks", "copy_range"]

_CHUNK = 1 << 30
_FALLBACK = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF}


def copy_range(src_fd: int, src_offset: int, dst_fd: int, dst_offset: int, length: int, src_path: Path | str) -> None:
    """Copy `length` bytes of `src_fd` at `src_offset` to `dst_fd` at `dst_offset`, in the kernel.

    A source that ends early is an ImageError naming `src_path`.
    """
    done = 0
    use_cfr = True
    while done < length:
        want = min(length - done, _CHUNK)
        if use_cfr:
            try:
                n = os.copy_file_range(src_fd, dst_fd, want, src_offset + done, dst_offset + done)
            except OSError as exc:
                if exc.errno not in _FALLBACK:
                    raise
                use_cfr = False
                continue
        else:
            n = _copy_slow(src_fd, src_offset + done, dst_fd, dst_offset + done, want)
        if n <= 0:
            raise ImageError(src_path, f"short file: no data at offset {src_offset + done}")
        done += n


_BUF = 1 << 20


def _copy_slow(src_fd: int, src_offset: int, dst_fd: int, dst_offset: int, length: int) -> int:
    """One bounded preadv/pwrite round (file systems without copy_file_range)."""
    buf = bytearray(min(length, _BUF))
    view = memoryview(buf)
    n = os.preadv(src_fd, [view], src_offset)
    if n <= 0:
        return n
    written = 0
    while written < n:
        written += os.pwrite(dst_fd, view[written:n], dst_offset + written)
    return n


def chunks(start: int, length: int, chunk: int) -> Iterator[tuple[int, int]]:
    """(position, size) pieces of [start, start+length), each at most `chunk` long."""
    end = start + length
    while start < end:
        n = min(chunk, end - start)
        yield start, n
        start += n
