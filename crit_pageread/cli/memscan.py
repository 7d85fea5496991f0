"""What grep and extract share on the command line: VMA filter options, mapping names (and the progress bar)."""

from __future__ import annotations

from .. import TYPE_CHECKING
from ..errors import ConfigError
from ..memory import VmaFilter, parse_range
from .progress import Progress

if TYPE_CHECKING:  # not imported at start-up
    from typing import Any

    from ..memory import Area

__all__ = ["Progress", "add_vma_filters", "mapping_name", "vma_filter_from_args"]


def mapping_name(area: Area) -> str:
    """The VMA's mapping name, or its kind in brackets (`[anon]`)."""
    return area.vma.name or f"[{area.vma.kind}]"


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
