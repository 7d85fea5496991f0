"""The strategy interface: how bytes move from a file range (or a socket) into a buffer.

Like CRIU's `struct page_read`, the reader owns the cursor logic (index,
parents, lazy and hole rules) and a strategy owns only the I/O. Like an httpx
transport, a strategy is small: `read` (synchronous), `submit` (may be queued),
`sync` (complete what was submitted) and `close`; `read_many`/`submit_many` take
the requests of one multi-entry read at once, including `ScatterRequest`s (one
file range into many pieces of memory), by default one piece at a time.

Consumers that need the bytes elsewhere than in a buffer of theirs use three
more operations on `CopyRequest`s (planned ranges without a buffer):
`write_to` (positioned writes into a regular file), `send` (in order to a
socket, pipe or file) and `view` (a read-only window for in-place search:
an mmap window when the requests lie back to back in one pages file).
Their defaults are built on `read`/`submit` through a bounded buffer, so a
strategy that implements only `read` serves every command; the local
strategies override them with kernel copies (strategies/kernel.py).
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod

from . import TYPE_CHECKING, _paths
from .errors import ImageError
from .imagefile import open_regular

if TYPE_CHECKING:  # not imported at start-up: a sink is checked by `isinstance(out, int)`; typing neither
    import mmap
    import socket
    from collections.abc import Iterator
    from pathlib import Path
    from typing import Any, ClassVar, Literal

    TargetKind = Literal["pid", "shmem"]
    #: Where `send` writes: a file descriptor (pipe, socket, file at its position) or a socket object (TLS too).
    Sink = int | socket.socket
    #: A buffer a view may be read into: a bytearray, or an anonymous map (page-aligned: kernel copies into a
    #: buffer that is not 32-byte aligned ran 4x slower on this project's machines).
    Scratch = bytearray | mmap.mmap


def __getattr__(name: str) -> object:
    """The typing aliases above, made on first use (typing is not imported at start-up)."""
    if name not in ("TargetKind", "Sink", "Scratch"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from typing import Literal, Union

    value = {"TargetKind": Literal["pid", "shmem"], "Sink": Union[int, "socket.socket"],
             "Scratch": Union[bytearray, "mmap.mmap"]}[name]
    globals()[name] = value
    return value

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_libc: Any = None


class PagesFile:
    """An open `pages-<id>.img`: one descriptor shared by every reader of it.

    The pages are `size` bytes at `base` of the descriptor's file: base 0 for
    a pages file, the member's data offset for one inside an uncompressed tar
    archive (`path` is then an `archive.Member`, shown as `ARCHIVE: MEMBER`).
    Pagemap entry offsets already include `base` (folded in once, by
    `load_pagemap`), so requests and segments address the descriptor directly.
    """

    def __init__(self, path: Path, writable: bool = False) -> None:
        #: As given: a Path, an `archive.Member`, or a path as text (`_paths.Text`: `path` makes its Path).
        self._path: Any = path
        #: `str(path)`, for messages (no pathlib).
        self.location = str(path)
        self.writable = writable
        self.base = 0
        #: Byte ranges (of the pages, from `base`) that hold data, if not all: a pages file an archive unpacked
        #: sparse (`archive.open_archive(pages_wanted=...)`); the reader refuses reads of the rest.
        self.present: list[tuple[int, int]] | None = getattr(path, "present", None)
        source = getattr(path, "source", None)
        if source is not None:  # an archive member: a byte range of the archive (`archive.Member`)
            if writable:
                raise ImageError(path, "cannot punch holes in an archive member (auto-dedup changes its input)")
            self.base = path.offset  # type: ignore[attr-defined]
            # Never blocks (a FIFO is refused at once) and is a regular file, or a one-line ImageError.
            self.fd = open_regular(source, "archive")
            self.size: int = path.size  # type: ignore[attr-defined]
        else:
            # Never blocks (a FIFO is refused at once) and is a regular file, or a one-line ImageError.
            self.fd = open_regular(path, "pages file", writable=writable)
            self.size = os.fstat(self.fd).st_size

    @property
    def path(self) -> Path:
        """The pages file: a Path, or an `archive.Member` (shown as `ARCHIVE: MEMBER`)."""
        if isinstance(self._path, _paths.Text):
            self._path = _paths.as_path(self._path)
        return self._path

    @path.setter
    def path(self, value: Any) -> None:
        self._path = value
        self.location = str(value)

    @property
    def end(self) -> int:
        """Offset in the descriptor's file just past the pages."""
        return self.base + self.size

    def punch_hole(self, offset: int, length: int) -> None:
        """Free [offset, offset+length), keeping the size (`fallocate(PUNCH_HOLE|KEEP_SIZE)`: auto-dedup)."""
        global _libc
        import ctypes  # only auto-dedup needs libc
        import ctypes.util

        if _libc is None:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            _libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        if not self.writable:
            raise ImageError(self.path, "auto-dedup needs the pages file opened writable")
        if _libc.fallocate(self.fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) != 0:
            err = ctypes.get_errno()
            raise ImageError(self.path, f"cannot punch hole for dedup: {os.strerror(err)}")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __repr__(self) -> str:
        return f"PagesFile({self.location!r})"


class Target:
    """Whose memory: a pid's (`kind="pid"`) or a shared-memory segment's (`"shmem"`). Immutable, hashable.

    (The classes of this module are written out, not dataclasses: dataclasses imports inspect at start-up.)
    """

    __slots__ = ("id", "kind")
    kind: TargetKind
    id: int

    def __init__(self, kind: TargetKind, id: int) -> None:
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "id", id)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"cannot assign to field {name!r} of a Target")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"cannot delete field {name!r} of a Target")

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not Target:
            return NotImplemented
        return self.kind == other.kind and self.id == other.id

    def __hash__(self) -> int:
        return hash((self.kind, self.id))

    def __reduce__(self) -> tuple[type[Target], tuple[str, int]]:
        return Target, (self.kind, self.id)

    def __repr__(self) -> str:
        return f"Target(kind={self.kind!r}, id={self.id!r})"

    def __str__(self) -> str:
        return f"{self.kind} {self.id}"


class ReadRequest:
    """Read `len(dest)` bytes of `target`'s memory at `vaddr` into `dest`.

    `pages`/`offset` locate the bytes in a local pages file; `pages` is None
    when the images hold no data for the range (lazy pages) and only a remote
    strategy can serve it.
    """

    __slots__ = ("dest", "offset", "pages", "target", "vaddr")
    pages: PagesFile | None
    offset: int
    dest: memoryview
    vaddr: int
    target: Target

    def __init__(self, pages: PagesFile | None, offset: int, dest: memoryview, vaddr: int, target: Target) -> None:
        self.pages = pages
        self.offset = offset
        self.dest = dest
        self.vaddr = vaddr
        self.target = target

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not ReadRequest:
            return NotImplemented
        return _fields(self) == _fields(other)

    def __repr__(self) -> str:
        return _repr(self)


class ScatterRequest:
    """Read back-to-back bytes of a pages file from `offset` into pieces of `dest`.

    Piece k is `dest[dest_offsets[k] : dest_offsets[k] + lengths[k]]`; its
    bytes follow piece k-1's in the file. `vaddr` is the address of `dest[0]`.
    The reader makes one for a stretch of pagemap entries that is contiguous
    in the file but not in memory (holes between them), so that a strategy
    can read it in one vectored call; `requests()` splits it for others.
    """

    __slots__ = ("dest", "dest_offsets", "lengths", "offset", "pages", "target", "vaddr")
    pages: PagesFile
    offset: int
    dest: memoryview
    dest_offsets: list[int]
    lengths: list[int]
    vaddr: int
    target: Target

    def __init__(self, pages: PagesFile, offset: int, dest: memoryview, dest_offsets: list[int], lengths: list[int],
                 vaddr: int, target: Target) -> None:
        self.pages = pages
        self.offset = offset
        self.dest = dest
        self.dest_offsets = dest_offsets
        self.lengths = lengths
        self.vaddr = vaddr
        self.target = target

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not ScatterRequest:
            return NotImplemented
        return _fields(self) == _fields(other)

    def __repr__(self) -> str:
        return _repr(self)

    @property
    def length(self) -> int:
        """Bytes to read from the pages file."""
        return sum(self.lengths)

    def requests(self) -> list[ReadRequest]:
        """The pieces as plain requests, in file order."""
        out = []
        offset = self.offset
        dest = self.dest
        for start, n in zip(self.dest_offsets, self.lengths, strict=True):
            out.append(ReadRequest(self.pages, offset, dest[start : start + n], self.vaddr + start, self.target))
            offset += n
        return out


class PlannedRead:
    """Many pieces of pages files into one buffer: a read as the native planner plans it (crit_pageread/native.py).

    `pieces` is bytes of int64 quadruples (file, offset, dest_offset, length),
    in address order: `length` bytes at `offset` of `files[file]` go to
    `dest[dest_offset : dest_offset + length]`; pieces contiguous both in a
    file and in memory are joined. `vaddr` is the address of `dest[0]`; for
    ranges laid one after another (`PageReader.read_packed`) `addresses` is
    bytes of int64, each piece's own address. Only a strategy with
    `takes_plans` gets these (the local ones, which hand them to the compiled
    helper); `requests()` gives the same reads as plain requests.
    """

    __slots__ = ("addresses", "dest", "files", "pieces", "target", "vaddr")

    def __init__(self, files: list[PagesFile], pieces: bytes, dest: memoryview, vaddr: int, target: Target,
                 addresses: bytes | None = None) -> None:
        self.files = files
        self.pieces = pieces
        self.dest = dest
        self.vaddr = vaddr
        self.target = target
        self.addresses = addresses

    def __len__(self) -> int:
        return len(self.pieces) // 32

    @property
    def length(self) -> int:
        """Bytes the plan reads."""
        return sum(memoryview(self.pieces).cast("q")[3::4])

    def requests(self) -> list[ReadRequest]:
        """The pieces as plain requests, in address order."""
        q = memoryview(self.pieces).cast("q").tolist()
        files, dest, target = self.files, self.dest, self.target
        if self.addresses is None:
            addrs = [self.vaddr + d for d in q[2::4]]
        else:
            addrs = memoryview(self.addresses).cast("q").tolist()
        return [ReadRequest(files[q[k]], q[k + 1], dest[q[k + 2] : q[k + 2] + q[k + 3]], addrs[k // 4], target)
                for k in range(0, len(q), 4)]


#: What `read_many`/`submit_many` get from the reader (and PlannedReads if the strategy `takes_plans`).
AnyRequest = ReadRequest | ScatterRequest

#: Bytes the default `write_to`/`send` move per round through their buffer.
COPY_CHUNK = 1 << 20


class CopyRequest:
    """Move `length` bytes of `target`'s memory at `vaddr` to `out_offset` of an output.

    Like `ReadRequest` but without a buffer: `pages`/`offset` locate the bytes
    in a local pages file (`pages` None: lazy, only a strategy that serves
    lazy pages has them). The range is contiguous in memory. `out_offset` is
    the position in the output file for `write_to`; `send` writes requests in
    order and ignores it.
    """

    __slots__ = ("length", "offset", "out_offset", "pages", "target", "vaddr")
    pages: PagesFile | None
    offset: int
    length: int
    vaddr: int
    target: Target
    out_offset: int

    def __init__(self, pages: PagesFile | None, offset: int, length: int, vaddr: int, target: Target,
                 out_offset: int = 0) -> None:
        self.pages = pages
        self.offset = offset
        self.length = length
        self.vaddr = vaddr
        self.target = target
        self.out_offset = out_offset

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not CopyRequest:
            return NotImplemented
        return _fields(self) == _fields(other)

    def __repr__(self) -> str:
        return _repr(self)

    def read_request(self, dest: memoryview, skip: int = 0) -> ReadRequest:
        """The plain read of this request's bytes from `skip` on into `dest`."""
        offset = self.offset + skip if self.pages is not None else -1
        return ReadRequest(self.pages, offset, dest, self.vaddr + skip, self.target)


class View:
    """Read-only bytes of a planned range: `data[start : start + length]`.

    `data` is an mmap window of a pages file or a buffer (both have `find`
    and the buffer protocol); do not write to it. `close()` (or leaving the
    `with` block) releases a window; slices taken from `data` must be copied
    (`bytes(...)`) before that.
    """

    __slots__ = ("_release", "data", "length", "start")

    def __init__(self, data: Any, start: int, length: int, release: Any = None) -> None:
        self.data = data
        self.start = start
        self.length = length
        self._release = release

    def close(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()

    def __enter__(self) -> View:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class StrategyInfo:
    """A strategy as a plugin contributes it: a name, a factory and a description."""

    name: str
    factory: Any  # Callable[[plugins.StrategyContext], Strategy]: called each time the strategy is made
    description: str
    plugin: str

    def __init__(self, name: str, factory: Any, description: str = "", plugin: str = "") -> None:
        self.name = name
        self.factory = factory
        self.description = description
        self.plugin = plugin

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not StrategyInfo:
            return NotImplemented
        return _fields(self) == _fields(other)

    def __repr__(self) -> str:
        return _repr(self, ("name", "factory", "description", "plugin"))


def _fields(obj: Any) -> tuple[Any, ...]:
    names = obj.__slots__ if hasattr(obj.__class__, "__slots__") else tuple(vars(obj))
    return tuple(getattr(obj, name) for name in names)


def _repr(obj: Any, names: tuple[str, ...] | None = None) -> str:
    """`Class(field=value, ...)` in the order of `__init__`'s arguments, as a dataclass shows itself."""
    code = obj.__class__.__init__.__code__
    names = names or code.co_varnames[1 : code.co_argcount]
    return f"{obj.__class__.__qualname__}({', '.join(f'{n}={getattr(obj, n)!r}' for n in names)})"


class Strategy(ABC):
    """How bytes get into caller buffers. Subclasses implement `read`; queueing ones `submit`/`sync`."""

    name: ClassVar[str] = "?"
    #: True if the strategy can serve ranges that have no local data (`ReadRequest.pages is None`).
    serves_lazy: ClassVar[bool] = False
    #: True if `write_to` may run in several threads at once (each with its own output).
    concurrent_writes: ClassVar[bool] = False
    #: True if `read_many`/`submit_many` take `PlannedRead`s (when the native helper plans; see native.py).
    takes_plans: ClassVar[bool] = False
    #: True if `view` without a scratch buffer maps one range of a pages file (no copy) rather than
    #: reading it into a new buffer.
    maps_views: ClassVar[bool] = False
    #: True if the strategy has `write_plan(files, pieces, fd, fill)`: `write_to` for a plan of the native
    #: helper (`_fastio.plan_copies`'s pieces), which the reader then hands it instead of CopyRequests.
    writes_plans: ClassVar[bool] = False

    @abstractmethod
    def read(self, request: ReadRequest) -> None:
        """Fill `request.dest` completely before returning."""

    def submit(self, request: ReadRequest) -> None:
        """Fill `request.dest` now or later, at the latest when `sync()` returns."""
        self.read(request)

    def read_many(self, requests: list[AnyRequest]) -> None:
        """`read` each request, in order; a ScatterRequest (or PlannedRead) piece by piece unless overridden."""
        for request in requests:
            if isinstance(request, ReadRequest):
                self.read(request)
            else:  # a ScatterRequest, or a PlannedRead
                for piece in request.requests():
                    self.read(piece)

    def submit_many(self, requests: list[AnyRequest]) -> None:
        """`submit` each request, in order; a ScatterRequest (or PlannedRead) piece by piece unless overridden."""
        for request in requests:
            if isinstance(request, ReadRequest):
                self.submit(request)
            else:  # a ScatterRequest, or a PlannedRead
                for piece in request.requests():
                    self.submit(piece)

    def sync(self) -> None:
        """Complete every submitted request."""

    @property
    def pending(self) -> int:
        """Number of submitted requests not yet complete."""
        return 0

    def close(self) -> None:
        """Release what the strategy holds (maps, sockets). Pages files are not its own."""

    # --- moving bytes elsewhere: defaults on read/submit, a bounded buffer -------------------

    def write_to(self, requests: list[CopyRequest], fd: int, fill: int = 0) -> None:
        """Write each request's bytes at its `out_offset` of the regular file `fd`.

        `fill` > 0 says the output reads as zeros between the requests (a new
        file): a strategy may write zeros over a gap of at most `fill` bytes
        between requests, to make fewer, larger writes (the bytes are the same;
        the file uses disk there). Default: requests are read (`submit`,
        `sync`) into a buffer of at most COPY_CHUNK bytes, then written with
        `pwrite`; `fill` is not used.
        """
        for batch, buf in _batches(self, requests):
            for req, start, skip, n in batch:
                _pwrite_all(fd, buf[start : start + n], req.out_offset + skip)

    def send(self, requests: list[CopyRequest], out: Sink) -> None:
        """Write the requests' bytes, in order, to `out` (a socket object, or a pipe, socket or file fd).

        A socket's timeout bounds each wait for it to drain (TimeoutError).
        Default: read through a bounded buffer, then `sendall`/`write`.
        """
        for batch, buf in _batches(self, requests):
            start = batch[0][1]
            end = batch[-1][1] + batch[-1][3]
            write_all(out, buf[start:end])

    def view(self, requests: list[CopyRequest], scratch: Scratch | None = None) -> View:
        """A read-only view of the requests' bytes back to back, in order (for in-place search).

        The caller bounds the total length. Default: the bytes are read
        (`submit` each, `sync`) into `scratch` if it is large enough, else a new
        buffer.
        """
        total = sum(r.length for r in requests)
        buf = scratch if scratch is not None and len(scratch) >= total else bytearray(total)
        dest = memoryview(buf)
        pos = 0
        for req in requests:
            self.submit(req.read_request(dest[pos : pos + req.length]))
            pos += req.length
        self.sync()
        return View(buf, 0, total)


_Piece = tuple[CopyRequest, int, int, int]


def _batches(strategy: Strategy, requests: list[CopyRequest]) -> Iterator[tuple[list[_Piece], memoryview]]:
    """Read `requests` through `strategy` into one reused buffer, a buffer-full at a time.

    Yields (pieces, buffer) once the pieces are read; a piece is (request, start
    in the buffer, offset in the request, length), pieces in request order and
    back to back in the buffer.
    """
    if not requests:
        return
    size = min(COPY_CHUNK, max(sum(r.length for r in requests), 1))
    buf = memoryview(bytearray(size))
    batch: list[_Piece] = []
    used = 0
    for req in requests:
        skip = 0
        while skip < req.length:
            if used == size:
                strategy.sync()
                yield batch, buf
                batch, used = [], 0
            n = min(req.length - skip, size - used)
            strategy.submit(req.read_request(buf[used : used + n], skip))
            batch.append((req, used, skip, n))
            used += n
            skip += n
    if batch:
        strategy.sync()
        yield batch, buf


def _pwrite_all(fd: int, data: memoryview, pos: int) -> None:
    while data:
        n = os.pwrite(fd, data, pos)
        data = data[n:]
        pos += n


def write_all(out: Sink, data: memoryview | bytes) -> None:
    """Write all of `data` to a socket object or a file descriptor (waiting out a full non-blocking one)."""
    if not isinstance(out, int):
        out.sendall(data)
        return
    view = memoryview(data)
    while view:
        try:
            n = os.write(out, view)
        except BlockingIOError:
            import select

            select.select([], [out], [])
            continue
        view = view[n:]


def read_fully(fd: int, dest: memoryview, offset: int, path: object) -> None:
    """preadv into `dest` until it is full; a short file is an ImageError."""
    done = 0
    total = len(dest)
    while done < total:
        n = os.preadv(fd, [dest[done:]], offset + done)
        if n <= 0:
            raise ImageError(path, f"short pages file: no data at offset {offset + done}")
        done += n
