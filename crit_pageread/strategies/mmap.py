"""`mmap`: map each pages file read-only once and copy from the mapping."""

from __future__ import annotations

import mmap
from typing import Any

from ..errors import ConfigError, ImageError
from ..hookspecs import hookimpl
from ..strategy import CopyRequest, PagesFile, ReadRequest, Strategy, StrategyInfo, View
from .kernel import KernelCopies, file_range

_ADVICE = {
    "normal": mmap.MADV_NORMAL,
    "sequential": mmap.MADV_SEQUENTIAL,
    "random": mmap.MADV_RANDOM,
    "willneed": mmap.MADV_WILLNEED,
}


class MmapStrategy(KernelCopies, Strategy):
    """Copies from a read-only shared mapping of the pages file (one copy, no syscalls per read)."""

    name = "mmap"

    def __init__(self, advice: str = "normal") -> None:
        self.advice = _ADVICE[advice]
        self._maps: dict[PagesFile, tuple[mmap.mmap, memoryview]] = {}

    def _view(self, pages: PagesFile) -> memoryview:
        entry = self._maps.get(pages)
        if entry is None:
            mm = mmap.mmap(pages.fd, 0, prot=mmap.PROT_READ)
            if self.advice != mmap.MADV_NORMAL:
                mm.madvise(self.advice)
            entry = (mm, memoryview(mm))
            self._maps[pages] = entry
        return entry[1]

    def read(self, request: ReadRequest) -> None:
        pages = request.pages
        if pages is None:
            raise ConfigError("mmap: strategy cannot serve lazy pages")
        view = self._view(pages)
        end = request.offset + len(request.dest)
        if end > len(view):
            raise ImageError(pages.path, f"short pages file: no data at offset {len(view)}")
        request.dest[:] = view[request.offset : end]

    def view(self, requests: list[CopyRequest], scratch: bytearray | None = None) -> View:
        """A window of the whole-file map when the requests lie back to back in one file: no system call."""
        run = file_range(requests)
        if run is None:
            return Strategy.view(self, requests, scratch)
        pages, offset, length = run
        self._view(pages)
        mm = self._maps[pages][0]
        if offset + length > len(mm):
            raise ImageError(pages.path, f"short pages file: no data at offset {len(mm)}")
        return View(mm, offset, length)

    def close(self) -> None:
        for mm, view in self._maps.values():
            view.release()
            mm.close()
        self._maps.clear()


def _factory(table: dict[str, Any]) -> Strategy:
    unknown = set(table) - {"advice"}
    if unknown:
        raise ConfigError(f"[mmap]: unknown key {sorted(unknown)[0]!r} (known: advice)")
    advice = table.get("advice", "normal")
    if advice not in _ADVICE:
        raise ConfigError(f"[mmap]: key 'advice' must be one of {', '.join(_ADVICE)}, not {advice!r}")
    return MmapStrategy(advice)


@hookimpl
def crit_pageread_strategies() -> list[StrategyInfo]:
    return [StrategyInfo("mmap", _factory, "map pages files read-only and copy from them")]
