"""What grep and extract share on the command line: VMA filter options (and the progress bar)."""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from ..memory import VmaFilter, parse_range
from .progress import Progress

__all__ = ["Progress", "add_vma_filters", "vma_filter_from_args"]


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
