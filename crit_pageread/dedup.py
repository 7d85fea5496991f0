"""Auto-dedup: free pages of a parent image once they were read, as CRIU's `--auto-dedup` does."""

from __future__ import annotations

from .strategy import PagesFile


def punch_hole(pages: PagesFile, offset: int, length: int) -> None:
    """Free [offset, offset+length) of a pages file, keeping its size (CRIU's dedup)."""
    pages.punch_hole(offset, length)
