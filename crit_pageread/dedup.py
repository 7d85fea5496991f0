"""Auto-dedup: free pages of a parent image once they were read, as CRIU's `--auto-dedup` does."""

from __future__ import annotations

import os
from typing import Any

from .errors import ImageError
from .strategy import PagesFile

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
_libc: Any = None


def punch_hole(pages: PagesFile, offset: int, length: int) -> None:
    """Free [offset, offset+length) of a pages file, keeping its size (CRIU's dedup)."""
    global _libc
    import ctypes  # only auto-dedup needs libc
    import ctypes.util

    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        _libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    if not pages.writable:
        raise ImageError(pages.path, "auto-dedup needs the pages file opened writable")
    if _libc.fallocate(pages.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        err = ctypes.get_errno()
        raise ImageError(pages.path, f"cannot punch hole for dedup: {os.strerror(err)}")
