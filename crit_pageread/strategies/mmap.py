"""`mmap`: map bounded windows of each pages file read-only and copy from them."""

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


#: Bytes of a pages file mapped at once; a file of any size is read through windows of this size.
WINDOW = 64 << 20
#: Windows kept mapped (least recently used goes first): bounded address space whatever the files.
MAX_WINDOWS = 8


class MmapStrategy(KernelCopies, Strategy):
    """Copies from read-only shared mappings of the pages file, one bounded window at a time.

    Never maps a whole pages file: a window is `WINDOW` bytes aligned to the
    mapping granularity, at most `MAX_WINDOWS` are kept, so a (sparse) pages file
    larger than the address space is read like any other. Errors name the file.
    """

    name = "mmap"

    def __init__(self, advice: str = "normal", window: int = WINDOW, max_windows: int = MAX_WINDOWS) -> None:
        self.advice = _ADVICE[advice]
        gran = mmap.ALLOCATIONGRANULARITY
        self.window = max(gran, window // gran * gran)
        self.max_windows = max(1, max_windows)
        self._maps: dict[tuple[PagesFile, int], tuple[mmap.mmap, memoryview]] = {}

    def _map(self, pages: PagesFile, length: int, start: int) -> mmap.mmap:
        """`length` bytes of `pages` from file offset `start`, read-only, with the configured advice."""
        try:
            mm = mmap.mmap(pages.fd, length, prot=mmap.PROT_READ, offset=start)
        except (OSError, ValueError) as exc:
            problem = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise ImageError(pages.path, f"cannot map {length} bytes at offset {start}: {problem}") from None
        if self.advice != mmap.MADV_NORMAL:
            mm.madvise(self.advice)
        return mm

    def _window(self, pages: PagesFile, start: int) -> memoryview:
        key = (pages, start)
        entry = self._maps.pop(key, None)
        if entry is None:
            length = min(self.window, pages.end - start)  # an archive member: never past its bytes
            mm = self._map(pages, length, start)
            entry = (mm, memoryview(mm))
            while len(self._maps) >= self.max_windows:
                oldest = next(iter(self._maps))
                old_mm, old_view = self._maps.pop(oldest)
                old_view.release()
                old_mm.close()
        self._maps[key] = entry  # most recently used last
        return entry[1]

    def read(self, request: ReadRequest) -> None:
        pages = request.pages
        if pages is None:
            raise ConfigError("mmap: strategy cannot serve lazy pages")
        dest = request.dest
        offset = request.offset
        end = offset + len(dest)
        if end > pages.end or offset < pages.base:  # offsets include the base of an archive member
            raise ImageError(pages.path, f"short pages file: no data at offset {max(offset, pages.end) - pages.base}")
        done = 0
        while offset + done < end:
            pos = offset + done
            start = pos - pos % self.window
            view = self._window(pages, start)
            n = min(end - pos, start + len(view) - pos)
            dest[done : done + n] = view[pos - start : pos - start + n]
            done += n

    def view(self, requests: list[CopyRequest], scratch: bytearray | None = None) -> View:
        """A mapping of just the planned range when the requests lie back to back in one file (released with the
        view): never the whole file."""
        run = file_range(requests)
        if run is None:
            return Strategy.view(self, requests, scratch)
        pages, offset, length = run
        end = offset + length
        if end > pages.end or offset < pages.base:  # offsets include the base of an archive member
            raise ImageError(pages.path, f"short pages file: no data at offset {max(offset, pages.end) - pages.base}")
        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        size = max(end - start, 1)
        mm = self._map(pages, size, start)
        return View(mm, offset - start, length, mm.close)

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
