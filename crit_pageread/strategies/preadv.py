"""`preadv`: queue reads and complete them in as few `preadv` calls as the file allows.

CRIU's restore batching: requests that are contiguous in the same pages file
join one run; a run is read with one `os.preadv` of at most IOV_MAX iovecs
(more calls only past that); a destination contiguous with the previous one
extends its iovec instead of adding one. A request that starts at most
`max_gap` bytes after the end of its file's run joins the run too: the gap is
read into a scratch buffer, trading a few unwanted bytes for a system call
(parent images of a chain are full of such small gaps). Short reads advance
the iovecs and continue. The queue is flushed on `sync()`, before any
synchronous read, and when it holds `max_queue` requests.
"""

from __future__ import annotations

import ctypes
import os
from typing import Any

from ..errors import ConfigError, ImageError
from ..hookspecs import hookimpl
from ..strategy import PagesFile, ReadRequest, Strategy, StrategyInfo, read_fully

IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024
#: Largest gap in a pages file bridged by reading it into scratch memory (0: never).
DEFAULT_MAX_GAP = 0


addressof = ctypes.addressof
c_char = ctypes.c_char


def _address(view: memoryview) -> int:
    return addressof(c_char.from_buffer(view))


class _Run:
    """Requests contiguous in one pages file; iovecs are [address, length, view-or-None].

    A merged iovec (None) spans several caller views; `holders` keeps those alive until the read.
    """

    __slots__ = ("holders", "iovecs", "length", "offset", "pages")

    def __init__(self, pages: PagesFile, offset: int) -> None:
        self.pages = pages
        self.offset = offset
        self.length = 0
        self.iovecs: list[list[Any]] = []
        self.holders: list[memoryview] = []


class PreadvStrategy(Strategy):
    """Queues requests; `sync()` reads each contiguous run with few preadv calls."""

    name = "preadv"

    def __init__(self, iov_max: int = IOV_MAX, max_queue: int = 65536, max_gap: int = DEFAULT_MAX_GAP) -> None:
        self.iov_max = iov_max
        self.max_queue = max_queue
        self.max_gap = max_gap
        self._scratch = memoryview(bytearray(max_gap)) if max_gap else None
        #: Unwanted bytes read to bridge gaps (for benchmarks and tests).
        self.gap_bytes = 0
        self._runs: list[_Run] = []
        # Per pages file, the newest run: a request contiguous with it in the file joins it, even when
        # requests for other files (parent images of a chain) came in between.
        self._tails: dict[PagesFile, _Run] = {}
        self._count = 0
        #: preadv system calls issued so far (for benchmarks and tests).
        self.calls = 0

    @property
    def pending(self) -> int:
        return self._count

    def read(self, request: ReadRequest) -> None:
        if self._count:
            self.sync()
        pages = request.pages
        if pages is None:
            raise ConfigError("preadv: strategy cannot serve lazy pages")
        self.calls += 1
        read_fully(pages.fd, request.dest, request.offset, pages.path)

    def submit(self, request: ReadRequest) -> None:
        pages = request.pages
        if pages is None:
            raise ConfigError("preadv: strategy cannot serve lazy pages")
        dest = request.dest
        length = len(dest)
        if not length:
            return
        addr = addressof(c_char.from_buffer(dest))
        offset = request.offset
        run = self._tails.get(pages)
        if run is not None and 0 < offset - (run.offset + run.length) <= self.max_gap:
            gap = offset - (run.offset + run.length)
            assert self._scratch is not None
            scratch = self._scratch[:gap]
            run.iovecs.append([addressof(c_char.from_buffer(scratch)), gap, scratch])
            run.length += gap
            self.gap_bytes += gap
        if run is not None and run.offset + run.length == offset:
            last = run.iovecs[-1]
            if last[0] + last[1] == addr:
                # Spans two caller views: rebuilt from the address at flush; the views stay referenced.
                if last[2] is not None:
                    run.holders.append(last[2])
                    last[2] = None
                run.holders.append(dest)
                last[1] += length
            else:
                run.iovecs.append([addr, length, dest])
            run.length += length
        else:
            run = self._tails[pages] = _Run(pages, offset)
            run.iovecs.append([addr, length, dest])
            run.length = length
            self._runs.append(run)
        self._count += 1
        if self._count >= self.max_queue:
            self.sync()

    def sync(self) -> None:
        runs, self._runs = self._runs, []
        self._tails = {}
        self._count = 0
        for run in runs:
            self._read_run(run)

    def _read_run(self, run: _Run) -> None:
        fd = run.pages.fd
        offset = run.offset
        iovecs = run.iovecs
        if len(iovecs) == 1:
            addr, length, view = iovecs[0]
            iovs: list[Any] = [view if view is not None else memoryview((c_char * length).from_address(addr))]
        elif len(iovecs) <= self.iov_max:
            iovs = [
                view if view is not None else memoryview((c_char * length).from_address(addr))
                for addr, length, view in iovecs
            ]
        else:
            iovs = []
        if iovs:
            # Common case: the whole run in one call.
            got = os.preadv(fd, iovs, offset)
            self.calls += 1
            if got == run.length:
                run.holders.clear()
                return
            if got <= 0:
                raise ImageError(run.pages.path, f"short pages file: no data at offset {offset}")
            self._continue(run, iovs, 0, offset, got)
            return
        iovs = [
            view if view is not None else memoryview((c_char * length).from_address(addr))
            for addr, length, view in iovecs
        ]
        self._continue(run, iovs, 0, offset, 0)

    def _continue(self, run: _Run, iovs: list[Any], i: int, offset: int, got: int) -> None:
        """Finish a run after `got` bytes at `offset` (iovecs from index `i`): short reads, IOV_MAX batches."""
        fd = run.pages.fd
        iov_max = self.iov_max
        while True:
            offset += got
            while i < len(iovs) and got >= len(iovs[i]):
                got -= len(iovs[i])
                i += 1
            if got:
                iovs[i] = iovs[i][got:]
            if i >= len(iovs):
                break
            batch = iovs[i : i + iov_max]
            got = os.preadv(fd, batch, offset)
            self.calls += 1
            if got <= 0:
                raise ImageError(run.pages.path, f"short pages file: no data at offset {offset}")
        run.holders.clear()

    def close(self) -> None:
        self._runs = []
        self._tails = {}
        self._count = 0


def _factory(table: dict[str, Any]) -> Strategy:
    unknown = set(table) - {"iov_max", "max_queue", "max_gap"}
    if unknown:
        raise ConfigError(f"[preadv]: unknown key {sorted(unknown)[0]!r} (known: iov_max, max_queue, max_gap)")
    iov_max = table.get("iov_max", IOV_MAX)
    max_queue = table.get("max_queue", 65536)
    max_gap = table.get("max_gap", DEFAULT_MAX_GAP)
    for key, value, low, high in (
        ("iov_max", iov_max, 1, IOV_MAX),
        ("max_queue", max_queue, 1, 1 << 24),
        ("max_gap", max_gap, 0, 1 << 26),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ConfigError(f"[preadv]: key {key!r} must be an integer from {low} to {high}, not {value!r}")
    return PreadvStrategy(iov_max, max_queue, max_gap)


@hookimpl
def crit_pageread_strategies() -> list[StrategyInfo]:
    return [StrategyInfo("preadv", _factory, "queue reads, merge contiguous file ranges into preadv calls")]
