"""Kernel copies for the strategies that read local pages files (pread, preadv, mmap).

`write_to` joins requests that are contiguous both in one pages file and in
the output and moves each large run with `copy_file_range` (else a bounded
`preadv`/`pwrite`; a long run that starts off a 16-page boundary of the output
is two copies, up to the boundary and the rest: see COPY_ALIGN); small runs
(under SMALL_RUN) that follow each other in the output are read into a 256 KiB
buffer (one `preadv` per stretch back to back in a pages file) and written
with one `pwrite` per contiguous stretch of output, gaps the caller lets it
fill (`fill`) written as zeros. Measured here on 128 MiB in 4 KiB runs with 4
KiB holes: one copy_file_range per run 0.41 s, one pwrite per run from the
buffer 0.28 s, the buffer with its holes zeroed in 1 MiB pwrites 0.15 s (one
128 MiB copy: 0.07 s); from 64 KiB runs on, copy_file_range is the fastest
(CPU for 256 MiB in 1 MiB copies 0.16 s, cat's 128 KiB read/write 0.18 s).
`send` uses `sendfile` to a plain socket, pipe or file (a TLS socket goes
through the default buffered path); `view` of requests that lie back to back
in one pages file is one positioned read into the caller's scratch buffer, or
without one a read-only map of the range (populated at map time: a view is
searched whole).
"""

from __future__ import annotations

import errno
import mmap
import os
import sys

from .. import TYPE_CHECKING, native
from ..errors import ConfigError, ImageError
from ..strategy import CopyRequest, PagesFile, Strategy, View, read_fully

if TYPE_CHECKING:
    from typing import Any, ClassVar

    from ..strategy import Scratch, Sink

#: errnos after which copy_file_range (or sendfile) is not tried again by this strategy.
_FALLBACK = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF}
#: Largest single kernel copy (copy_file_range and sendfile take a size_t, but keep calls bounded).
_MAX_COPY = 1 << 30
_BUF = 1 << 20
#: Runs shorter than this go through the buffer (see the module docstring); longer ones are one kernel copy.
SMALL_RUN = 32 << 10
#: The buffer small runs go through: it stays in the CPU's cache (preadv + pwrite of 1 MiB buffers cost 3x
#: the CPU of 128 KiB ones here, 0.54 s against 0.18 s for 256 MiB).
_STAGE = 256 << 10
#: A kernel copy moves a file to a file through a pipe of 16 pages (64 KiB) per step; a step that starts off a
#: 16-page boundary of the output lands in several small page-cache folios instead of one (ext4: a 1 GiB copy to
#: an output offset of 9 pages cost 0.44 s of CPU, to offset 0 0.31 s). A long run that starts off the boundary is
#: copied in two calls: up to the boundary, then the rest, every step aligned.
COPY_ALIGN = 16 * mmap.PAGESIZE
#: iovecs per preadv (Linux's IOV_MAX).
_IOV_MAX = 1024
_ZEROS = bytes(SMALL_RUN * 2)
#: A view is read whole (searched): its page table is filled in one pass at map time (MAP_POPULATE)
#: rather than by a fault every few pages during the search.
VIEW_FLAGS = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)


class KernelCopies:
    """Mixin (before `Strategy` in the bases): `write_to`, `send` and `view` without a Python buffer."""

    concurrent_writes: ClassVar[bool] = True
    maps_views: ClassVar[bool] = True
    writes_plans: ClassVar[bool] = True
    #: Kernel copy system calls issued by write_to/send (for benchmarks and tests).
    copies = 0
    _no_copy_file_range = False
    _no_sendfile = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # A subclass that changes write_to but not write_plan gets CopyRequests, as it expects.
        if "write_to" in cls.__dict__ and "write_plan" not in cls.__dict__:
            cls.writes_plans = False

    def write_plan(self, files: list[PagesFile], pieces: bytes, fd: int, fill: int = 0) -> None:
        """`write_to` for the native helper's plan (`_fastio.plan_copies`: pieces of file index, offset,
        output offset, length, in output order): the same copies, made in C without the GIL."""
        fast = native.fastio
        status, index, offset, err, copies, no_cfr = fast.write_pieces(
            [f.fd for f in files], pieces, fd, fill, SMALL_RUN, _STAGE, COPY_ALIGN, _MAX_COPY,
            self._no_copy_file_range)
        self.copies += copies
        if no_cfr:
            self._no_copy_file_range = True
        if status == 1:
            pages = files[index]
            raise ImageError(pages.path, f"short pages file: no data at offset {offset}")
        if status:
            raise OSError(err, os.strerror(err))

    def write_to(self, requests: list[CopyRequest], fd: int, fill: int = 0) -> None:
        # One pass over the requests, no object per request: a fragmented dump has tens of thousands.
        count = len(requests)
        buf: memoryview | None = None
        i = 0
        while i < count:
            req = requests[i]
            pages, offset, length, out = req.pages, req.offset, req.length, req.out_offset
            if pages is None:
                raise ConfigError("local strategies cannot serve lazy pages")
            j = i + 1
            if length < SMALL_RUN:
                # Small runs that follow in the output within one buffer: one read per file stretch, one
                # write per output stretch.
                end = out + length
                limit = out + _STAGE
                while j < count:
                    nxt = requests[j]
                    at = nxt.out_offset
                    if nxt.length >= SMALL_RUN or at < end or at + nxt.length > limit or nxt.pages is None:
                        break
                    end = at + nxt.length
                    j += 1
            if j > i + 1:
                if buf is None:
                    buf = memoryview(bytearray(_STAGE))  # per call: write_to may run in several threads
                self._buffered(requests, i, j, buf, fd, fill)
            else:
                # A large run (or a lone small one): the requests contiguous with it in the pages file and
                # in the output join it, one kernel copy.
                while j < count:
                    nxt = requests[j]
                    if nxt.pages is not pages or nxt.offset != offset + length or nxt.out_offset != out + length:
                        break
                    length += nxt.length
                    j += 1
                self._copy_run(pages, offset, length, fd, out)
            i = j

    def _buffered(self, requests: list[CopyRequest], i: int, j: int, buf: memoryview, fd: int, fill: int) -> None:
        """Read requests[i:j] (in output order, within _STAGE bytes of output) into `buf` at their output
        positions, then write each stretch of output, gaps of at most `fill` bytes written as zeros."""
        base = requests[i].out_offset
        k = i
        while k < j:
            first = requests[k]
            pages = first.pages
            assert pages is not None
            offset = first.offset
            iov = []
            want = 0
            m = k
            while m < j and m - k < _IOV_MAX:
                req = requests[m]
                if req.pages is not pages or req.offset != offset + want:
                    break
                at = req.out_offset - base
                iov.append(buf[at : at + req.length])
                want += req.length
                m += 1
            self.copies += 1
            got = os.preadv(pages.fd, iov, offset)
            if got < want:  # a short read (end of file): the rest piece by piece, or a one-line error
                for piece, req in zip(iov, requests[k:m], strict=True):
                    read_fully(pages.fd, piece, req.offset, pages.location)
            k = m
        start = end = base
        for k in range(i, j):
            req = requests[k]
            at = req.out_offset
            gap = at - end
            if gap > fill:
                self._pwrite(fd, buf[start - base : end - base], start)
                start = at
            elif gap:
                buf[end - base : at - base] = _ZEROS[:gap] if gap <= len(_ZEROS) else bytes(gap)
            end = at + req.length
        self._pwrite(fd, buf[start - base : end - base], start)

    def _pwrite(self, fd: int, data: memoryview, pos: int) -> None:
        while data:
            self.copies += 1
            n = os.pwrite(fd, data, pos)
            data = data[n:]
            pos += n

    def _copy_run(self, pages: PagesFile, offset: int, length: int, fd: int, out: int) -> None:
        src = pages.fd
        head = -out % COPY_ALIGN
        step = head if head and length > head + COPY_ALIGN else _MAX_COPY  # see COPY_ALIGN
        while length:
            n = self._copy_step(src, offset, fd, out, min(length, step))
            step = _MAX_COPY
            if n <= 0:
                raise ImageError(pages.path, f"short pages file: no data at offset {offset}")
            offset += n
            out += n
            length -= n

    def _copy_step(self, src: int, src_pos: int, dst: int, dst_pos: int, count: int) -> int:
        self.copies += 1
        if not self._no_copy_file_range:
            try:
                return os.copy_file_range(src, dst, count, src_pos, dst_pos)
            except OSError as exc:
                if exc.errno not in _FALLBACK:
                    raise
                self._no_copy_file_range = True
        buf = bytearray(min(count, _BUF))
        n = os.preadv(src, [buf], src_pos)
        view = memoryview(buf)[: max(n, 0)]
        while view:
            w = os.pwrite(dst, view, dst_pos)
            view = view[w:]
            dst_pos += w
        return n

    def send(self, requests: list[CopyRequest], out: Sink) -> None:
        ssl = sys.modules.get("ssl")
        if self._no_sendfile or (ssl is not None and isinstance(out, ssl.SSLSocket)):
            Strategy.send(self, requests, out)  # type: ignore[arg-type]
            return
        if isinstance(out, int):
            fd, timeout = out, None
        else:
            fd, timeout = out.fileno(), out.gettimeout()
        # In a stream every request follows the last: requests contiguous in one pages file join.
        for pages, offset, length in _stream_runs(requests):
            done = self._sendfile(pages, offset, length, fd, timeout)
            if done < length:  # sendfile refused this output: the rest through a buffer
                rest = CopyRequest(pages, offset + done, length - done, requests[0].vaddr, requests[0].target)
                Strategy.send(self, [rest], out)  # type: ignore[arg-type]

    def _sendfile(self, pages: PagesFile, offset: int, count: int, fd: int, timeout: float | None) -> int:
        """sendfile `count` bytes; returns how many were sent (fewer only once sendfile is refused)."""
        poller = None
        done = 0
        while done < count and not self._no_sendfile:
            self.copies += 1
            try:
                sent = os.sendfile(fd, pages.fd, offset + done, min(count - done, _MAX_COPY))
            except BlockingIOError:
                if poller is None:
                    import select

                    poller = select.poll()
                    poller.register(fd, select.POLLOUT)
                if not poller.poll(None if timeout is None else int(timeout * 1000)):
                    raise TimeoutError(f"output stopped reading for {timeout:g} s") from None
                continue
            except OSError as exc:
                if exc.errno not in _FALLBACK:
                    raise
                self._no_sendfile = True
                break
            if sent == 0:
                raise ImageError(pages.path, f"short pages file: no data at offset {offset + done}")
            done += sent
        return done

    def view(self, requests: list[CopyRequest], scratch: Scratch | None = None) -> View:
        """One range of one pages file: read into `scratch` with one positioned read when the caller gives
        one large enough (a reused buffer: cheaper here than mapping and unmapping the range), else an
        mmap window of the range, populated at map time. Other requests are read piece by piece."""
        run = file_range(requests)
        if run is None:  # not one range of one pages file: read the pieces
            return Strategy.view(self, requests, scratch)  # type: ignore[arg-type]
        pages, offset, length = run
        if offset + length > pages.end:  # offsets include the base (archive members)
            raise ImageError(pages.path, f"short pages file: no data at offset {pages.size}")
        if scratch is not None and len(scratch) >= length:
            with memoryview(scratch) as dest:
                read_fully(pages.fd, dest[:length], offset, pages.location)
            return View(scratch, 0, length)
        shift = offset % mmap.ALLOCATIONGRANULARITY
        try:
            mm = mmap.mmap(pages.fd, length + shift, flags=VIEW_FLAGS, prot=mmap.PROT_READ, offset=offset - shift)
        except OSError:  # a file system that cannot map: read instead
            return Strategy.view(self, requests, scratch)  # type: ignore[arg-type]
        return View(mm, shift, length, mm.close)


def file_range(requests: list[CopyRequest]) -> tuple[PagesFile, int, int] | None:
    """(pages, offset, length) if the requests lie back to back in one pages file, else None."""
    if not requests:
        return None
    first = requests[0]
    pages = first.pages
    if pages is None:
        raise ConfigError("local strategies cannot serve lazy pages")
    end = first.offset + first.length
    for req in requests[1:]:
        if req.pages is not pages:
            if req.pages is None:
                raise ConfigError("local strategies cannot serve lazy pages")
            return None
        if req.offset != end:
            return None
        end += req.length
    return pages, first.offset, end - first.offset


def _stream_runs(requests: list[CopyRequest]) -> list[list[Any]]:
    """[pages, offset, length] runs of requests that follow each other in one pages file."""
    out: list[list[Any]] = []
    last: list[Any] | None = None
    for req in requests:
        if req.pages is None:
            raise ConfigError("local strategies cannot serve lazy pages")
        if last is not None and last[0] is req.pages and last[1] + last[2] == req.offset:
            last[2] += req.length
        else:
            last = [req.pages, req.offset, req.length]
            out.append(last)
    return out
