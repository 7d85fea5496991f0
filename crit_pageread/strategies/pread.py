"""`pread`: one positioned read per contiguous run, straight into the caller's buffer."""

from __future__ import annotations

import os
from typing import Any

from ..errors import ConfigError
from ..hookspecs import hookimpl
from ..strategy import AnyRequest, ReadRequest, ScatterRequest, Strategy, StrategyInfo, read_fully
from .kernel import KernelCopies


class PreadStrategy(KernelCopies, Strategy):
    """Every request is read at once: one `preadv` with a single iovec (pread into the buffer)."""

    name = "pread"

    def read(self, request: ReadRequest) -> None:
        pages = request.pages
        if pages is None:
            raise ConfigError("pread: strategy cannot serve lazy pages")
        read_fully(pages.fd, request.dest, request.offset, pages.path)

    def read_many(self, requests: list[AnyRequest]) -> None:
        preadv = os.preadv
        for request in requests:
            pages = request.pages
            if pages is None:
                raise ConfigError("pread: strategy cannot serve lazy pages")
            if type(request) is ScatterRequest:
                fd = pages.fd
                offset = request.offset
                dest = request.dest
                for start, n in zip(request.dest_offsets, request.lengths, strict=True):
                    piece = dest[start : start + n]
                    if preadv(fd, [piece], offset) != n:
                        read_fully(fd, piece, offset, pages.path)
                    offset += n
            else:
                read_fully(pages.fd, request.dest, request.offset, pages.path)

    submit_many = read_many


def _factory(table: dict[str, Any]) -> Strategy:
    if table:
        raise ConfigError(f"[pread]: unknown key {sorted(table)[0]!r} (pread takes no options)")
    return PreadStrategy()


@hookimpl
def crit_pageread_strategies() -> list[StrategyInfo]:
    return [StrategyInfo("pread", _factory, "one positioned read per contiguous run")]
