"""The strategy interface: how bytes move from a file range (or a socket) into a buffer.

Like CRIU's `struct page_read`, the reader owns the cursor logic (index,
parents, lazy and hole rules) and a strategy owns only the I/O. Like an httpx
transport, a strategy is small: `read` (synchronous), `submit` (may be queued),
`sync` (complete what was submitted) and `close`; `read_many`/`submit_many` take
the requests of one multi-entry read at once, including `ScatterRequest`s (one
file range into many pieces of memory), by default one piece at a time.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from .errors import ImageError

TargetKind = Literal["pid", "shmem"]


class PagesFile:
    """An open `pages-<id>.img`: one descriptor shared by every reader of it."""

    def __init__(self, path: Path, writable: bool = False) -> None:
        self.path = path
        self.writable = writable
        try:
            self.fd = os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC)
        except FileNotFoundError:
            raise ImageError(path, "pages file is missing") from None
        except OSError as exc:
            raise ImageError(path, f"cannot open pages file: {exc.strerror}") from None
        self.size = os.fstat(self.fd).st_size

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __repr__(self) -> str:
        return f"PagesFile({str(self.path)!r})"


@dataclass(frozen=True, slots=True)
class Target:
    """Whose memory: a pid's (`kind="pid"`) or a shared-memory segment's (`"shmem"`)."""

    kind: TargetKind
    id: int

    def __str__(self) -> str:
        return f"{self.kind} {self.id}"


@dataclass(slots=True)
class ReadRequest:
    """Read `len(dest)` bytes of `target`'s memory at `vaddr` into `dest`.

    `pages`/`offset` locate the bytes in a local pages file; `pages` is None
    when the images hold no data for the range (lazy pages) and only a remote
    strategy can serve it.
    """

    pages: PagesFile | None
    offset: int
    dest: memoryview
    vaddr: int
    target: Target


@dataclass(slots=True)
class ScatterRequest:
    """Read back-to-back bytes of a pages file from `offset` into pieces of `dest`.

    Piece k is `dest[dest_offsets[k] : dest_offsets[k] + lengths[k]]`; its
    bytes follow piece k-1's in the file. `vaddr` is the address of `dest[0]`.
    The reader makes one for a stretch of pagemap entries that is contiguous
    in the file but not in memory (holes between them), so that a strategy
    can read it in one vectored call; `requests()` splits it for others.
    """

    pages: PagesFile
    offset: int
    dest: memoryview
    dest_offsets: list[int]
    lengths: list[int]
    vaddr: int
    target: Target

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


#: What `read_many`/`submit_many` get from the reader.
AnyRequest = ReadRequest | ScatterRequest


@dataclass
class StrategyInfo:
    """A strategy as a plugin contributes it: a name, a factory and a description."""

    name: str
    factory: Any  # Callable[[dict[str, Any]], Strategy]: called with the strategy's config table
    description: str = ""
    plugin: str = field(default="")


class Strategy(ABC):
    """How bytes get into caller buffers. Subclasses implement `read`; queueing ones `submit`/`sync`."""

    name: ClassVar[str] = "?"
    #: True if the strategy can serve ranges that have no local data (`ReadRequest.pages is None`).
    serves_lazy: ClassVar[bool] = False

    @abstractmethod
    def read(self, request: ReadRequest) -> None:
        """Fill `request.dest` completely before returning."""

    def submit(self, request: ReadRequest) -> None:
        """Fill `request.dest` now or later, at the latest when `sync()` returns."""
        self.read(request)

    def read_many(self, requests: list[AnyRequest]) -> None:
        """`read` each request, in order; a ScatterRequest piece by piece unless overridden."""
        for request in requests:
            if type(request) is ScatterRequest:
                for piece in request.requests():
                    self.read(piece)
            else:
                self.read(request)  # type: ignore[arg-type]

    def submit_many(self, requests: list[AnyRequest]) -> None:
        """`submit` each request, in order; a ScatterRequest piece by piece unless overridden."""
        for request in requests:
            if type(request) is ScatterRequest:
                for piece in request.requests():
                    self.submit(piece)
            else:
                self.submit(request)  # type: ignore[arg-type]

    def sync(self) -> None:
        """Complete every submitted request."""

    @property
    def pending(self) -> int:
        """Number of submitted requests not yet complete."""
        return 0

    def close(self) -> None:
        """Release what the strategy holds (maps, sockets). Pages files are not its own."""


def read_fully(fd: int, dest: memoryview, offset: int, path: Path) -> None:
    """preadv into `dest` until it is full; a short file is an ImageError."""
    done = 0
    total = len(dest)
    while done < total:
        n = os.preadv(fd, [dest[done:]], offset + done)
        if n <= 0:
            raise ImageError(path, f"short pages file: no data at offset {offset + done}")
        done += n
