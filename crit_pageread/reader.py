"""PageReader: read a pid's or a shmem segment's memory from CRIU images.

The reader owns CRIU's page-read semantics (the seed's `struct page_read`):
lookup in the pagemap index, `PE_PARENT` pages through the chain of parent
images, `PE_LAZY` pages (an error unless the strategy serves them), addresses
no entry covers (an error unless `zero_fill`), deferred reads completed by
`sync()`, and auto-dedup. How bytes move is the strategy's business.
"""

from __future__ import annotations

import os
from bisect import bisect_right
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from .errors import ChainError, CritPageReadError, ImageError, LazyPageError, NotDumpedError
from .pagemap import PE_PARENT, PE_PRESENT, Pagemap
from .strategy import PagesFile, ReadRequest, Strategy, Target

if TYPE_CHECKING:
    from .images import CheckpointImages

SegmentKind = Literal["present", "lazy", "hole"]
MAX_CHAIN_DEPTH = 256
_ZEROS = bytes(1 << 20)


@dataclass(frozen=True, slots=True)
class Segment:
    """A piece of an address range and where its bytes are.

    `kind` is "present" (in `pages` at `offset`), "lazy" (on a page server
    only) or "hole" (not dumped). `image` is the image directory that holds
    the entry, `depth` its distance from the newest image (0 = newest).
    """

    vaddr: int
    length: int
    kind: SegmentKind
    flags: int
    pages: PagesFile | None
    offset: int
    image: str
    depth: int

    @property
    def end(self) -> int:
        return self.vaddr + self.length


class PageReader:
    """Reads one target's memory. Made by `CheckpointImages.reader()`/`shmem_reader()`."""

    def __init__(
        self,
        images: CheckpointImages,
        target: Target,
        pagemap: Pagemap,
        strategy: Strategy,
        *,
        zero_fill: bool = False,
        auto_dedup: bool = False,
        depth: int = 0,
        root: PageReader | None = None,
        observe: Any = None,
    ) -> None:
        self.images = images
        self.target = target
        self.pagemap = pagemap
        self.strategy = strategy
        self.zero_fill = zero_fill
        self.auto_dedup = auto_dedup
        self.depth = depth
        self._root = root or self
        self._parent: PageReader | None = None
        self._pages: PagesFile | None = None
        self._observe = observe
        self._closed = False
        # Owned by the root reader: ranges read from parent images, to punch once read.
        self._dedup_pending: list[tuple[PagesFile, int, int]] = []

    # --- structure -------------------------------------------------------------------------

    @property
    def source(self) -> str:
        """The pagemap image this reader reads, for messages."""
        return str(self.pagemap.path)

    @property
    def page_size(self) -> int:
        return self.pagemap.page_size

    def _pages_file(self) -> PagesFile:
        if self._pages is None:
            writable = self.auto_dedup and self.depth > 0
            self._pages = self.images.pages_file(self.pagemap.pages_id, writable=writable)
        return self._pages

    @property
    def parent(self) -> PageReader:
        """The reader of the same target in the parent image (for `PE_PARENT` pages)."""
        if self._parent is None:
            if self.depth + 1 > MAX_CHAIN_DEPTH:
                raise ChainError(self.images.path, f"parent chain deeper than {MAX_CHAIN_DEPTH}")
            parent_images = self.images.parent
            if parent_images is None:
                raise ChainError(
                    self.pagemap.path, "has pages in the parent image but the directory has no parent link"
                )
            pagemap = parent_images.pagemap_for(self.target)
            self._parent = PageReader(
                parent_images,
                self.target,
                pagemap,
                self.strategy,
                zero_fill=False,
                auto_dedup=self.auto_dedup,
                depth=self.depth + 1,
                root=self._root,
            )
        return self._parent

    # --- planning --------------------------------------------------------------------------

    def segments(self, vaddr: int, length: int) -> Iterator[Segment]:
        """Where each piece of [vaddr, vaddr+length) is, resolved through the chain."""
        if vaddr < 0 or length < 0:
            raise ValueError("negative address or length")
        end = vaddr + length
        pos = vaddr
        image = str(self.images.path)
        for entry in self.pagemap.entries_in(vaddr, end):
            if entry.vaddr > pos:
                yield Segment(pos, entry.vaddr - pos, "hole", 0, None, -1, image, self.depth)
                pos = entry.vaddr
            stop = min(entry.end, end)
            flags = entry.flags
            if flags & PE_PRESENT:
                yield Segment(
                    pos, stop - pos, "present", flags, self._pages_file(),
                    entry.offset + (pos - entry.vaddr), image, self.depth,
                )
            elif flags & PE_PARENT:
                got = pos
                for seg in self.parent.segments(pos, stop - pos):
                    if seg.kind == "hole":
                        raise ChainError(
                            self.parent.source,
                            f"lacks pages at {seg.vaddr:#x}-{seg.end:#x} that {self.source} has in parent",
                        )
                    got = seg.end
                    yield seg
                assert got == stop
            elif flags:  # PE_LAZY alone: data only on a page server
                yield Segment(pos, stop - pos, "lazy", flags, None, -1, image, self.depth)
            else:
                yield Segment(pos, stop - pos, "hole", 0, None, -1, image, self.depth)
            pos = stop
        if pos < end:
            yield Segment(pos, end - pos, "hole", 0, None, -1, image, self.depth)

    def _requests(self, vaddr: int, dest: memoryview) -> tuple[list[ReadRequest], list[Segment]]:
        """Plan a read: requests for the strategy (merged where the file is contiguous) and holes."""
        # Fast path (most reads): the range lies inside one entry with data, here or in a parent.
        reader = self
        end = vaddr + len(dest)
        while dest:
            pagemap = reader.pagemap
            i = bisect_right(pagemap._starts, vaddr) - 1
            if i < 0:
                break
            entry = pagemap.entries[i]
            if end > entry.vaddr + entry.nr_pages * entry.page_size:
                break
            if entry.flags & PE_PRESENT:
                pages = reader._pages or reader._pages_file()
                offset = entry.offset + vaddr - entry.vaddr
                if reader.depth and self.auto_dedup:
                    self._root._dedup_pending.append((pages, offset, len(dest)))
                return [ReadRequest(pages, offset, dest, vaddr, self.target)], []
            if not entry.flags & PE_PARENT:
                break
            reader = reader.parent
        requests: list[ReadRequest] = []
        holes: list[Segment] = []
        serves_lazy = self.strategy.serves_lazy
        last: Segment | None = None
        last_start = 0
        # Parent ranges to punch once read; owed only if the whole plan succeeds.
        dedup: list[tuple[PagesFile, int, int]] = []
        for seg in self.segments(vaddr, len(dest)):
            if seg.kind == "hole":
                if not self.zero_fill:
                    raise NotDumpedError(self.source, seg.vaddr, seg.end)
                holes.append(seg)
                continue
            if seg.kind == "lazy" and not serves_lazy:
                raise LazyPageError(self.source, seg.vaddr, seg.end)
            if (
                last is not None
                and seg.kind == "present"
                and last.kind == "present"
                and seg.pages is last.pages
                and seg.offset == last.offset + (seg.vaddr - last_start)
                and seg.depth == last.depth
                and requests[-1].vaddr + len(requests[-1].dest) == seg.vaddr
            ):
                req = requests[-1]
                req.dest = dest[req.vaddr - vaddr : seg.end - vaddr]
            else:
                view = dest[seg.vaddr - vaddr : seg.end - vaddr]
                requests.append(ReadRequest(seg.pages, seg.offset, view, seg.vaddr, self.target))
                last_start = seg.vaddr
            last = seg
            if seg.depth > 0 and self.auto_dedup and seg.pages is not None:
                dedup.append((seg.pages, seg.offset, seg.length))
        self._root._dedup_pending.extend(dedup)
        return requests, holes

    # --- reading ---------------------------------------------------------------------------

    def read(self, vaddr: int, length: int) -> bytes:
        """The bytes of [vaddr, vaddr+length)."""
        buf = bytearray(length)
        self.readinto(vaddr, buf)
        return bytes(buf)

    def readinto(self, vaddr: int, buffer: Any, *, defer: bool = False) -> int:
        """Fill `buffer` with memory from `vaddr`; with `defer`, complete at `sync()`.

        Returns the number of bytes (len of buffer). Errors about the range
        (not dumped, lazy, chain) are raised before any I/O is queued.
        """
        self._check_open()
        dest = memoryview(buffer)
        if dest.readonly:
            raise TypeError("readinto needs a writable buffer")
        if dest.format != "B" or dest.ndim != 1:
            dest = dest.cast("B")
        observe = self._root._observe
        if observe is not None:
            observe.crit_pageread_before_read(reader=self, vaddr=vaddr, length=len(dest), deferred=defer)
        strategy = self.strategy
        if not defer and strategy.pending:
            # Flush first: the queue's punches must not include this read's parent pages.
            self._root.sync()
        requests, holes = self._requests(vaddr, dest)
        for seg in holes:
            _zero(dest[seg.vaddr - vaddr : seg.end - vaddr])
        if defer:
            for req in requests:
                strategy.submit(req)
        else:
            try:
                for req in requests:
                    strategy.read(req)
            except BaseException:
                self._root._dedup_pending.clear()  # never punch what may not have been read
                raise
            self._root._punch_pending()
            if observe is not None:
                observe.crit_pageread_after_read(reader=self, vaddr=vaddr, data=dest)
        return len(dest)

    def sync(self) -> None:
        """Complete every deferred read (and punch what auto-dedup owes)."""
        root = self._root
        if root is not self:
            root.sync()
            return
        pending = self.strategy.pending
        try:
            self.strategy.sync()
        except BaseException:
            self._dedup_pending.clear()  # never punch what may not have been read
            raise
        self._punch_pending()
        if self._observe is not None:
            self._observe.crit_pageread_synced(reader=self, requests=pending)

    def _punch_pending(self) -> None:
        pending = self._dedup_pending
        if not pending:
            return
        self._dedup_pending = []
        pending.sort(key=lambda r: (r[0].fd, r[1]))
        merged: list[list[Any]] = []
        for pages, offset, length in pending:
            if merged and merged[-1][0] is pages and merged[-1][1] + merged[-1][2] >= offset:
                merged[-1][2] = max(merged[-1][2], offset + length - merged[-1][1])
            else:
                merged.append([pages, offset, length])
        for pages, offset, length in merged:
            punch_hole(pages, offset, length)

    # --- lifetime --------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._root._closed:
            raise CritPageReadError(f"{self.source}: reader is closed")

    def close(self) -> None:
        """Close the reader; reads still queued make this an error (call `sync()` first)."""
        if self._closed:
            return
        if self._root is not self:
            return
        self._closed = True
        pending = self.strategy.pending
        try:
            if pending:
                raise CritPageReadError(
                    f"{self.source}: closed with {pending} deferred reads not synced (call sync() first)"
                )
        finally:
            self.strategy.close()

    def __enter__(self) -> PageReader:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None and self.strategy.pending:
            # Already failing: drop the queue rather than mask the error.
            self._closed = True
            self.strategy.close()
            return
        self.close()

    def __repr__(self) -> str:
        return f"<PageReader {self.target} of {self.images.path} via {self.strategy.name}>"


def _zero(view: memoryview) -> None:
    done = 0
    while done < len(view):
        n = min(len(view) - done, len(_ZEROS))
        view[done : done + n] = _ZEROS[:n]
        done += n


FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
_libc: Any = None


def punch_hole(pages: PagesFile, offset: int, length: int) -> None:
    """Free [offset, offset+length) of a pages file, keeping its size (CRIU's dedup)."""
    global _libc
    import ctypes  # only auto-dedup needs libc
    import ctypes.util

    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        _libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    if not pages.writable:
        raise ImageError(pages.path, "auto-dedup needs the pages file opened writable")
    if _libc.fallocate(pages.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        err = ctypes.get_errno()
        raise ImageError(pages.path, f"cannot punch hole for dedup: {os.strerror(err)}")
