"""`pread`: one positioned read per contiguous run, straight into the caller's buffer."""

from __future__ import annotations

import os
from array import array

from .. import TYPE_CHECKING, native
from ..errors import ConfigError, ImageError
from ..hookspecs import hookimpl
from ..strategy import AnyRequest, PlannedRead, ReadRequest, ScatterRequest, Strategy, StrategyInfo, read_fully
from .kernel import KernelCopies

if TYPE_CHECKING:
    from typing import Any

#: iovecs per call when the native helper reads a stretch of a plan's pieces
IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024


class PreadStrategy(KernelCopies, Strategy):
    """Every request is read at once, nothing queued: one `preadv` with a single iovec (pread into the
    buffer); a plan's pieces by the native helper without the GIL, one positioned read per stretch of
    pieces back to back in a pages file (a preadv of their iovecs: a fragmented dump's pages between holes)."""

    name = "pread"
    takes_plans = True

    def read(self, request: ReadRequest) -> None:
        pages = request.pages
        if pages is None:
            raise ConfigError("pread: strategy cannot serve lazy pages")
        read_fully(pages.fd, request.dest, request.offset, pages.location)

    def read_many(self, requests: list[AnyRequest]) -> None:
        preadv = os.preadv
        for request in requests:
            if isinstance(request, PlannedRead):
                read_plan(request)
                continue
            pages = request.pages
            if pages is None:
                raise ConfigError("pread: strategy cannot serve lazy pages")
            if isinstance(request, ScatterRequest):
                fd = pages.fd
                offset = request.offset
                dest = request.dest
                for start, n in zip(request.dest_offsets, request.lengths, strict=True):
                    piece = dest[start : start + n]
                    if preadv(fd, [piece], offset) != n:
                        read_fully(fd, piece, offset, pages.location)
                    offset += n
            else:
                read_fully(pages.fd, request.dest, request.offset, pages.location)

    submit_many = read_many


def read_plan(plan: PlannedRead) -> None:
    """Read a plan's pieces at once: by the native helper, one positioned read per stretch back to back in a
    file (again after a short read); without it, one pread each."""
    fast = native.fastio
    files = plan.files
    if fast is None:
        for piece in plan.requests():
            pages = piece.pages
            read_fully(pages.fd, piece.dest, piece.offset, pages.location)  # type: ignore[union-attr]
        return
    _calls, status, file, offset, err = fast.pread_plan(array("q", [f.fd for f in files]), plan.pieces, plan.dest,
                                                       IOV_MAX)
    if status == 1:
        raise ImageError(files[file].path, f"short pages file: no data at offset {offset}")
    if status:
        raise ImageError(files[file].path, f"cannot read at offset {offset}: {os.strerror(err)}")


def _factory(table: dict[str, Any]) -> Strategy:
    if table:
        raise ConfigError(f"[pread]: unknown key {sorted(table)[0]!r} (pread takes no options)")
    return PreadStrategy()


@hookimpl
def crit_pageread_strategies() -> list[StrategyInfo]:
    return [StrategyInfo("pread", _factory, "one positioned read per contiguous run")]
