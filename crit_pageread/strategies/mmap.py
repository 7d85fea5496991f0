"""`mmap`: map bounded windows of each pages file read-only and copy from them."""

from __future__ import annotations

import mmap
from array import array

from .. import TYPE_CHECKING, native
from ..errors import ConfigError, ImageError
from ..hookspecs import hookimpl
from ..strategy import (
    AnyRequest,
    CopyRequest,
    PagesFile,
    PlannedRead,
    ReadRequest,
    Strategy,
    StrategyInfo,
    View,
)
from .kernel import VIEW_FLAGS, KernelCopies, file_range

if TYPE_CHECKING:
    from typing import Any

    from ..strategy import Scratch

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
    takes_plans = True

    def __init__(self, advice: str = "normal", window: int = WINDOW, max_windows: int = MAX_WINDOWS) -> None:
        self.advice = _ADVICE[advice]
        gran = mmap.ALLOCATIONGRANULARITY
        self.window = max(gran, window // gran * gran)
        self.max_windows = max(1, max_windows)
        self._maps: dict[tuple[PagesFile, int], tuple[mmap.mmap, memoryview]] = {}

    def _map(self, pages: PagesFile, length: int, start: int, flags: int = mmap.MAP_SHARED) -> mmap.mmap:
        """`length` bytes of `pages` from file offset `start`, read-only, with the configured advice."""
        try:
            mm = mmap.mmap(pages.fd, length, flags=flags, prot=mmap.PROT_READ, offset=start)
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

    def read_many(self, requests: list[AnyRequest]) -> None:
        for request in requests:
            if isinstance(request, PlannedRead) and native.fastio is not None:
                self._read_plan(request)
            else:
                Strategy.read_many(self, [request])

    submit_many = read_many

    def _read_plan(self, plan: PlannedRead) -> None:
        """Copy a plan's pieces from the windows by the native helper (memcpy without the GIL), mapping
        each window it lacks."""
        fast = native.fastio
        files = plan.files
        index = {pages: k for k, pages in enumerate(files)}
        bounds = array("q")
        for pages in files:
            bounds.append(pages.base)
            bounds.append(pages.end)
        at = skip = 0
        pieces: Any = None
        while True:
            windows = [(index[pages], start, entry[1]) for (pages, start), entry in self._maps.items()
                       if pages in index]
            status, at, skip = fast.copy_plan(windows[-16:], bounds, plan.pieces, plan.dest, at, skip)
            if not status:
                return
            if pieces is None:
                pieces = memoryview(plan.pieces).cast("q")
            pages, offset = files[pieces[4 * at]], pieces[4 * at + 1]
            if status == 4:
                where = max(offset, pages.end) - pages.base
                raise ImageError(pages.path, f"short pages file: no data at offset {where}")
            pos = offset + skip
            self._window(pages, pos - pos % self.window)

    def view(self, requests: list[CopyRequest], scratch: Scratch | None = None) -> View:
        """A mapping of just the planned range when the requests lie back to back in one file (released with the
        view, populated at map time): never the whole file."""
        run = file_range(requests)
        if run is None:
            return Strategy.view(self, requests, scratch)
        pages, offset, length = run
        end = offset + length
        if end > pages.end or offset < pages.base:  # offsets include the base of an archive member
            raise ImageError(pages.path, f"short pages file: no data at offset {max(offset, pages.end) - pages.base}")
        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        size = max(end - start, 1)
        mm = self._map(pages, size, start, VIEW_FLAGS)
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
