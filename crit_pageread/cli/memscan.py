"""What grep and extract share on the command line: VMA filter options and a progress bar."""

from __future__ import annotations

import sys
import time
from typing import Any

from ..errors import ConfigError
from ..memory import VmaFilter, parse_range
from .common import progress_enabled


def add_vma_filters(parser: Any) -> None:
    parser.add_argument("--vma", dest="vma_names", action="append", default=[], metavar="NAME",
                        help="only VMAs whose mapping name contains NAME (or matches a glob, or is that kind)")
    parser.add_argument("--kind", dest="vma_kinds", action="append", default=[], metavar="KIND",
                        help="only VMAs of this kind (anon, heap, stack, file-private, memfd, sysv-shm, ...)")
    parser.add_argument("--perms", help="only VMAs with these permissions, e.g. rw or r-x")
    parser.add_argument("--range", dest="vrange", metavar="START-END", help="only this address range (hex)")


def vma_filter_from_args(args: Any) -> VmaFilter:
    perms = args.perms
    if perms is not None and (not perms or any(ch not in "rwxsp-" for ch in perms)):
        raise ConfigError(f"--perms {perms!r}: use the letters r, w, x, s, p (e.g. rw-p or rx)")
    return VmaFilter(
        list(args.vma_names), list(args.vma_kinds), perms, parse_range(args.vrange) if args.vrange else None
    )


class Progress:
    """A one-line progress bar on stderr, only when stderr is a TTY."""

    def __init__(self, label: str, total: int) -> None:
        self.label = label
        self.total = max(total, 1)
        self.done = 0
        self.enabled = progress_enabled()
        self._last = 0.0

    def add(self, n: int) -> None:
        self.done += n  # may come from several writer threads: a lost update only skews the bar
        if self.enabled:
            now = time.monotonic()
            if now - self._last >= 0.2:
                self._last = now
                self._draw()

    def _draw(self) -> None:
        frac = min(self.done / self.total, 1.0)
        bar = "#" * int(frac * 30)
        sys.stderr.write(f"\r{self.label} [{bar:<30}] {frac * 100:5.1f}% {self.done >> 20}/{self.total >> 20} MiB")
        sys.stderr.flush()

    def finish(self) -> None:
        if self.enabled:
            self._draw()
            sys.stderr.write("\n")
            sys.stderr.flush()
