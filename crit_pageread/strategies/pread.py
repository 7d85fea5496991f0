"""`pread`: one positioned read per contiguous run, straight into the caller's buffer."""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from ..hookspecs import hookimpl
from ..strategy import ReadRequest, Strategy, StrategyInfo, read_fully


class PreadStrategy(Strategy):
    """Every request is read at once: one `preadv` with a single iovec (pread into the buffer)."""

    name = "pread"

    def read(self, request: ReadRequest) -> None:
        pages = request.pages
        if pages is None:
            raise ConfigError("pread: strategy cannot serve lazy pages")
        read_fully(pages.fd, request.dest, request.offset, pages.path)


def _factory(table: dict[str, Any]) -> Strategy:
    if table:
        raise ConfigError(f"[pread]: unknown key {sorted(table)[0]!r} (pread takes no options)")
    return PreadStrategy()


@hookimpl
def crit_pageread_strategies() -> list[StrategyInfo]:
    return [StrategyInfo("pread", _factory, "one positioned read per contiguous run")]
