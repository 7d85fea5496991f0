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

With the native helper (crit_pageread/native.py) the queue is the reader's
plans as they are and, for plain requests, bytearrays of (fd, offset, address,
length) records; `sync()` is one call that merges them into runs and issues
the preadv calls without the GIL, in bounded memory (each run's iovecs are
read IOV_MAX at a time as they are gathered); without it, the same batching in
Python over ctypes iovecs.
"""

from __future__ import annotations

import os
from array import array

from .. import TYPE_CHECKING, native
from ..errors import ConfigError, ImageError
from ..hookspecs import hookimpl
from ..strategy import (
    AnyRequest,
    PagesFile,
    PlannedRead,
    ReadRequest,
    ScatterRequest,
    Strategy,
    StrategyInfo,
    read_fully,
)
from .kernel import KernelCopies

if TYPE_CHECKING:
    from typing import Any

IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024
#: Largest gap in a pages file bridged by reading it into scratch memory (0: never).
DEFAULT_MAX_GAP = 0


# ctypes, for the batching in Python when the native helper is absent: set by `_load_ctypes` (start-up).
addressof: Any = None
c_char: Any = None
c_size_t: Any = None
_IOVEC_BYTES = 16  # struct iovec: a pointer and a size_t (set by `_load_ctypes`)
_UNSET: Any = object()
_libc_preadv: Any = _UNSET


def _load_ctypes() -> None:
    """Import ctypes for the Python batching (not at start-up: with the native helper it is not used)."""
    global addressof, c_char, c_size_t, _IOVEC_BYTES
    if addressof is None:
        import ctypes

        c_char, c_size_t = ctypes.c_char, ctypes.c_size_t
        _IOVEC_BYTES = 2 * ctypes.sizeof(c_size_t)
        addressof = ctypes.addressof


def _preadv_function() -> Any:
    """libc's preadv(2) taking a ctypes iovec array (no memoryview per iovec), or None."""
    global _libc_preadv
    if _libc_preadv is _UNSET:
        import ctypes

        try:
            func = ctypes.CDLL(None, use_errno=True).preadv
            func.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int64]
            func.restype = ctypes.c_ssize_t
            _libc_preadv = func
        except (OSError, AttributeError):
            _libc_preadv = None
    return _libc_preadv


class _Run:
    """Requests contiguous in one pages file, as iovecs: parallel lists of addresses and lengths.

    `holders` keeps the caller's buffers (exported memoryviews: they can be
    neither freed nor resized) alive until the run is read.
    """

    __slots__ = ("addrs", "holders", "length", "lens", "offset", "pages")

    def __init__(self, pages: PagesFile, offset: int) -> None:
        self.pages = pages
        self.offset = offset
        self.length = 0
        self.addrs: list[int] = []
        self.lens: list[int] = []
        self.holders: list[memoryview] = []


class PreadvStrategy(KernelCopies, Strategy):
    """Queues requests; `sync()` reads each contiguous run with few preadv calls."""

    name = "preadv"
    takes_plans = True

    def __init__(self, iov_max: int = IOV_MAX, max_queue: int = 65536, max_gap: int = DEFAULT_MAX_GAP) -> None:
        self._fast = native.fastio
        # The native queue: plans (fds, pieces, dest) and bytearrays of records, in the order queued; the
        # buffers records point into (kept alive until read); files by fd.
        self._items: list[Any] = []
        self._holders: list[Any] = []
        self._by_fd: dict[int, PagesFile] = {}
        self.iov_max = iov_max
        self.max_queue = max_queue
        self.max_gap = max_gap
        self._scratch = bytearray(max_gap) if max_gap else None
        self._scratch_addr = -1  # its address, taken by `_run_for` (ctypes)
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
        read_fully(pages.fd, request.dest, request.offset, pages.location)

    def read_many(self, requests: list[AnyRequest]) -> None:
        if self._count:
            self.sync()
        self.submit_many(requests)
        self.sync()

    def _run_for(self, pages: PagesFile, offset: int) -> _Run:
        """The run a request at `offset` of `pages` joins (bridging a small gap), or a new one."""
        run = self._tails.get(pages)
        if run is not None:
            gap = offset - (run.offset + run.length)
            if not gap:
                return run
            if 0 < gap <= self.max_gap:
                if self._scratch_addr < 0:
                    _load_ctypes()
                    self._scratch_addr = addressof(c_char.from_buffer(self._scratch)) if self._scratch else 0
                run.addrs.append(self._scratch_addr)
                run.lens.append(gap)
                run.length += gap
                self.gap_bytes += gap
                return run
        run = self._tails[pages] = _Run(pages, offset)
        self._runs.append(run)
        return run

    def submit(self, request: ReadRequest) -> None:
        pages = request.pages
        if pages is None:
            raise ConfigError("preadv: strategy cannot serve lazy pages")
        if self._fast is not None:
            self._queue(request)
            if self._count >= self.max_queue:
                self.sync()
            return
        dest = request.dest
        length = len(dest)
        if not length:
            return
        _load_ctypes()
        addr = addressof(c_char.from_buffer(dest))
        run = self._run_for(pages, request.offset)
        run.holders.append(dest)
        if run.addrs and run.addrs[-1] + run.lens[-1] == addr:
            run.lens[-1] += length  # continues the previous destination: one iovec
        else:
            run.addrs.append(addr)
            run.lens.append(length)
        run.length += length
        self._count += 1
        if self._count >= self.max_queue:
            self.sync()

    def _queue(self, request: AnyRequest) -> None:
        """Add a request to the native queue."""
        fast = self._fast
        dest = request.dest
        items = self._items
        if isinstance(request, PlannedRead):  # queued as it is: no copy of its pieces
            files = request.files
            by_fd = self._by_fd
            for pages in files:
                by_fd[pages.fd] = pages
            n = len(request)
            if n:
                items.append((array("q", [f.fd for f in files]), request.pieces, dest))
                self._count += n
            return
        pages = request.pages
        if pages is None:
            raise ConfigError("preadv: strategy cannot serve lazy pages")
        self._by_fd[pages.fd] = pages
        if not items or type(items[-1]) is not bytearray:
            items.append(bytearray())
        records = items[-1]
        if isinstance(request, ScatterRequest):
            n = fast.queue_scatter(records, pages.fd, request.offset, dest, request.dest_offsets, request.lengths)
        else:
            n = fast.queue_scatter(records, pages.fd, request.offset, dest, None, None)
        if n:
            self._holders.append(dest)
            self._count += n

    def submit_many(self, requests: list[AnyRequest]) -> None:
        if self._fast is not None:
            for request in requests:
                self._queue(request)
                if self._count >= self.max_queue:
                    self.sync()
            return
        # A scatter request's pieces become iovecs by arithmetic on its buffer's address: no
        # per-piece Python object. The reader's requests of one plan share one buffer, so its
        # address is taken once.
        _load_ctypes()
        last_dest: Any = None
        base = 0
        tails = self._tails
        for request in requests:
            if isinstance(request, PlannedRead):  # planned while the native helper was there
                for piece in request.requests():
                    self.submit(piece)
                continue
            if type(request) is not ScatterRequest:
                self.submit(request)  # type: ignore[arg-type]
                continue
            pages = request.pages
            dest = request.dest
            if dest is not last_dest:
                base = addressof(c_char.from_buffer(dest))
                last_dest = dest
            offset = request.offset
            run = tails.get(pages)
            if run is None or run.offset + run.length != offset:
                run = self._run_for(pages, offset)
            if not run.holders or run.holders[-1] is not dest:
                run.holders.append(dest)
            offs = request.dest_offsets
            lens = request.lengths
            if len(offs) == 1:
                addr = base + offs[0]
                n = lens[0]
                if run.addrs and run.addrs[-1] + run.lens[-1] == addr:
                    run.lens[-1] += n  # continues the previous destination: one iovec
                else:
                    run.addrs.append(addr)
                    run.lens.append(n)
                run.length += n
                self._count += 1
            else:
                run.addrs += map(base.__add__, offs)  # C-level iteration, no bytecode per piece
                run.lens += lens
                run.length += sum(lens)
                self._count += len(lens)
            if self._count >= self.max_queue:
                self.sync()

    def _sync_native(self) -> None:
        items, self._items = self._items, []
        holders, self._holders = self._holders, []
        by_fd, self._by_fd = self._by_fd, {}
        self._count = 0
        try:
            calls, gap, status, fd, offset, err = self._fast.preadv_queue(items, self.iov_max, self.max_gap,
                                                                         self._scratch)
        finally:
            items.clear()
            holders.clear()
        self.calls += calls
        self.gap_bytes += gap
        if status == 1:
            raise ImageError(by_fd[fd].path, f"short pages file: no data at offset {offset}")
        if status:
            raise ImageError(by_fd[fd].path, f"cannot read at offset {offset}: {os.strerror(err)}")

    def sync(self) -> None:
        if self._fast is not None:
            if self._items:
                self._sync_native()
            self._count = 0
            return
        runs, self._runs = self._runs, []
        self._tails = {}
        self._count = 0
        if not runs:
            return
        _load_ctypes()
        try:
            preadv = _preadv_function()
            if preadv is None:
                for run in runs:
                    self._read_run_views(run)
                return
            # Every run's iovecs in one array, built by slice assignment; one preadv per run (per
            # IOV_MAX iovecs of it), pointing into the array.
            addrs: list[int] = []
            lens: list[int] = []
            for run in runs:
                addrs += run.addrs
                lens += run.lens
            total = len(addrs)
            iovecs = (c_size_t * (2 * total))()
            iovecs[0::2] = addrs  # ctypes converts the ints
            iovecs[1::2] = lens
            base = addressof(iovecs)
            iov_max = self.iov_max
            first = 0
            for run in runs:
                n = len(run.addrs)
                if n <= iov_max:
                    got = preadv(run.pages.fd, base + first * _IOVEC_BYTES, n, run.offset)
                    self.calls += 1
                    if got != run.length:
                        self._finish_run(run, iovecs, first, got)
                else:
                    self._finish_run(run, iovecs, first, None)
                first += n
        finally:
            for run in runs:
                run.holders.clear()

    def _finish_run(self, run: _Run, iovecs: Any, first: int, got: int | None) -> None:
        """Read what is left of `run` (its iovecs from `first` in `iovecs`): more than IOV_MAX iovecs
        (`got` None: nothing read yet), or a short read of `got` bytes (signals, NFS)."""
        preadv = _preadv_function()
        fd = run.pages.fd
        addrs, lens = run.addrs, run.lens
        n = len(addrs)
        base = addressof(iovecs) + first * _IOVEC_BYTES
        offset = run.offset
        i = 0
        while True:
            if got is not None:
                if got < 0:
                    import ctypes

                    err = ctypes.get_errno()
                    raise ImageError(run.pages.path, f"cannot read at offset {offset}: {os.strerror(err)}")
                if got == 0:
                    raise ImageError(run.pages.path, f"short pages file: no data at offset {offset}")
                # Skip what was read, trim the iovec it stopped in, go on.
                offset += got
                while i < n and got >= lens[i]:
                    got -= lens[i]
                    i += 1
                if i >= n:
                    return
                if got:
                    addrs[i] += got
                    lens[i] -= got
                    iovecs[2 * (first + i)] = addrs[i]
                    iovecs[2 * (first + i) + 1] = lens[i]
            count = min(self.iov_max, n - i)
            got = preadv(fd, base + i * _IOVEC_BYTES, count, offset)
            self.calls += 1

    def _read_run_views(self, run: _Run) -> None:
        """`_read_run` without libc's preadv: os.preadv over memoryviews of the iovecs."""
        done = 0
        views = [memoryview((c_char * n).from_address(a)).cast("B") for a, n in zip(run.addrs, run.lens, strict=True)]
        i = 0
        while i < len(views):
            batch = views[i : i + self.iov_max]
            got = os.preadv(run.pages.fd, batch, run.offset + done)
            self.calls += 1
            if got <= 0:
                raise ImageError(run.pages.path, f"short pages file: no data at offset {run.offset + done}")
            done += got
            while i < len(views) and got >= len(views[i]):
                got -= len(views[i])
                i += 1
            if got:
                views[i] = views[i][got:]

    def close(self) -> None:
        self._items = []
        self._holders = []
        self._by_fd = {}
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
