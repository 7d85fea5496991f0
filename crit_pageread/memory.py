"""A process's memory: the whole dumped address space of a pid, and what commands scan it by.

`ProcessReader` (what `images.reader(pid)` returns) reads a pid's memory as
`/proc/PID/mem` of the restored task has it: private pages from the pid's
pagemap (through the parent chain), shared mappings (anonymous shared, memfd,
SysV) from the segment's `pagemap-shmem-<id>.img` at the VMA's page offset,
lazy pages through a strategy that serves them. For a private mapping of a
shared object the pid's pagemap comes first (its copy-on-write pages) and the
segment fills what it lacks, in CRIU's restore order. A zombie has no memory.

`Area` (a part of a VMA), `Span` (adjacent VMAs), `Readers` (one process
reader per pid), `VmaFilter` and `page_counts` are what grep, extract and the
page tables scan by.
"""

from __future__ import annotations

import bisect
import operator
from array import array
from collections import namedtuple
from itertools import compress

from . import TYPE_CHECKING, native
from .errors import ConfigError, LazyPageError, NotDumpedError
from .images import (
    VMA_ANON_SHARED,
    VMA_AREA_MEMFD,
    VMA_AREA_SYSVIPC,
    CheckpointImages,
    Vma,
)
from .pagemap import PE_LAZY, PE_PARENT, PE_PRESENT, Pagemap, int64s
from .reader import BROKEN, LAZY, PRESENT, MemoryMap, PageReader, Segment
from .strategy import PagesFile, Strategy, Target

if TYPE_CHECKING:  # typing and dataclasses are not imported at start-up
    from collections.abc import Iterator
    from typing import Any

    from .reader import HolesMode
    from .strategy import AnyRequest


def shmem_id(images: CheckpointImages, vma: Vma) -> int | None:
    """The shmem pagemap id holding a shared VMA's pages (or a memfd's, mapped private or shared), or None."""
    if vma.status & VMA_AREA_MEMFD:
        return images.memfd_shmids.get(vma.shmid)
    if vma.status & (VMA_ANON_SHARED | VMA_AREA_SYSVIPC):
        return vma.shmid
    return None


#: A VMA whose pages the pid's pagemap lacks are in segment `shmid` at `vaddr + delta`.
_Overlay = namedtuple("_Overlay", ("start", "end", "delta", "shmid"))


#: A piece of a planned range: [start, stop) read by the pid's own pagemap (shmid None) or by a segment.
_Piece = tuple[int, int, "int | None", int]


class ProcessReader(PageReader):
    """A pid's whole dumped address space, like `/proc/PID/mem` of the restored task.

    The same API as `PageReader` (`read`, `readinto`, `readv`, `segments`,
    defer/`sync`, `holes=`, `write_to`, `send`, `view`, close, `with`); its
    `pagemap` is the pid's own. Reads that touch a shared mapping are planned
    across the pid's pagemap and the segments' pagemaps in one batch, so an
    error about any piece is raised before any I/O. Segment readers share this
    reader's strategy, its dedup queue and its lifetime.
    """

    def __init__(
        self,
        images: CheckpointImages,
        pid: int,
        pagemap: Pagemap,
        strategy: Strategy,
        *,
        zero_fill: bool = False,
        auto_dedup: bool = False,
        observe: Any = None,
        owns_strategy: bool = True,
        zombie: bool = False,
    ) -> None:
        super().__init__(images, Target("pid", pid), pagemap, strategy, zero_fill=zero_fill,
                         auto_dedup=auto_dedup, observe=observe, owns_strategy=owns_strategy)
        self.pid = pid
        #: True for a zombie (a pstree task without memory images): every address is a hole.
        self.zombie = zombie
        self._overlay_list: list[_Overlay] | None = None
        self._overlay_starts: list[int] = []
        self._segment_readers: dict[int, PageReader] = {}

    @property
    def _overlays(self) -> list[_Overlay]:
        """The VMAs read through a segment, from mm-<pid>.img on first use (none without it: a level of
        a chain may hold only pagemaps)."""
        if self._overlay_list is None:
            images = self.images
            overlays = []
            if not self.zombie and images.has_image(f"mm-{self.pid}.img"):
                have = set(images.shmem_ids)
                for vma in images.vmas(self.pid):
                    sid = shmem_id(images, vma)
                    if sid is not None and sid in have:
                        overlays.append(_Overlay(vma.start, vma.end, vma.pgoff - vma.start, sid))
            self._overlay_starts = [o.start for o in overlays]
            self._overlay_list = overlays
        return self._overlay_list

    @property
    def source(self) -> str:
        if self.zombie:
            return f"{self.images._path}: pid {self.pid} (a zombie: no memory)"
        return self.pagemap.location

    def segment_reader(self, shmid: int) -> PageReader:
        """The reader of segment `shmid` this reader reads shared mappings with (same strategy and lifetime)."""
        r = self._segment_readers.get(shmid)
        if r is None:
            r = self._segment_readers[shmid] = PageReader(
                self.images, Target("shmem", shmid), self.images.shmem_pagemap(shmid), self.strategy,
                auto_dedup=self.auto_dedup, root=self, owns_strategy=False,
            )
        return r

    def shmem_at(self, vaddr: int) -> tuple[int, int] | None:
        """(shmid, offset in the segment) of a shared mapping's address, or None for private memory."""
        overlays = self._overlays
        i = bisect.bisect_right(self._overlay_starts, vaddr) - 1
        if i >= 0 and overlays[i].end > vaddr:
            o = overlays[i]
            return o.shmid, vaddr + o.delta
        return None

    # --- planning: split a range between the pid's pagemap and the segments -------------------

    def _pieces(self, vaddr: int, end: int) -> list[_Piece] | None:
        """The pieces of [vaddr, end), or None when it touches no shared mapping (all the pid's own)."""
        overlays = self._overlays
        if not overlays:
            return None
        i = bisect.bisect_right(self._overlay_starts, vaddr) - 1
        if i < 0 or overlays[i].end <= vaddr:
            i += 1
        if i >= len(overlays) or overlays[i].start >= end:
            return None
        out: list[_Piece] = []

        def add(start: int, stop: int, shmid: int | None, delta: int) -> None:
            if start >= stop:
                return
            if out and out[-1][1] == start and out[-1][2] == shmid and out[-1][3] == delta:
                out[-1] = (out[-1][0], stop, shmid, delta)
            else:
                out.append((start, stop, shmid, delta))

        pos = vaddr
        pagemap = self.pagemap
        while pos < end:
            if i >= len(overlays) or overlays[i].start >= end:
                add(pos, end, None, 0)
                break
            o = overlays[i]
            add(pos, max(pos, o.start), None, 0)
            pos = max(pos, o.start)
            stop = min(o.end, end)
            # The pid's own entries first (a private mapping's copy-on-write pages), the segment elsewhere.
            for entry in pagemap.entries_in(pos, stop):
                if not entry.flags:
                    continue
                a, b = max(entry.vaddr, pos), min(entry.end, stop)
                add(pos, a, o.shmid, o.delta)
                add(a, b, None, 0)
                pos = b
            add(pos, stop, o.shmid, o.delta)
            pos = stop
            i += 1
        return out

    def _requests(
        self, vaddr: int, dest: memoryview, holes_mode: HolesMode
    ) -> tuple[list[AnyRequest], list[tuple[int, int]]]:
        pieces = self._pieces(vaddr, vaddr + len(dest))
        if pieces is None:
            return super()._requests(vaddr, dest, holes_mode)
        requests: list[AnyRequest] = []
        holes: list[tuple[int, int]] = []
        for start, stop, shmid, delta in pieces:
            view = dest[start - vaddr : stop - vaddr]
            if shmid is None:
                got, zeros = super()._requests(start, view, holes_mode)
            else:
                segment = self.segment_reader(shmid)
                try:
                    got, zeros = segment._requests(start + delta, view, holes_mode)
                except (NotDumpedError, LazyPageError) as exc:  # name the caller's address and the segment's
                    where = f"{exc.source} (segment offset {exc.start:#x}, mapped by pid {self.pid})"
                    raise type(exc)(where, exc.start - delta, exc.end - delta) from None
                zeros = [(a - delta, b - delta) for a, b in zeros]
            requests.extend(got)
            holes.extend(zeros)
        return requests, holes

    def segments(self, vaddr: int, length: int) -> Iterator[Segment]:
        """Where each piece of [vaddr, vaddr+length) is: the pid's pages or a segment's, in this address space."""
        pieces = self._pieces(vaddr, vaddr + length) if length > 0 else None
        if pieces is None:
            yield from super().segments(vaddr, length)
            return
        for start, stop, shmid, delta in pieces:
            if shmid is None:
                yield from super().segments(start, stop - start)
                continue
            for seg in self.segment_reader(shmid).segments(start + delta, stop - start):
                yield seg._replace(vaddr=seg.vaddr - delta)

    def readable_runs(self, start: int, end: int) -> tuple[array[int], array[int], int]:
        """The maximal readable ranges of [start, end) (dumped, or lazy when the strategy serves them;
        shared mappings through their segment) as (starts, ends) in address order, int64 arrays, and the
        bytes of lazy pages left out. Taken from the memory maps: no object per piece, nothing cached."""
        lazy_ok = self.strategy.serves_lazy
        pieces = self._pieces(start, end) if end > start else None
        if pieces is None:
            return _reader_runs(self, start, end, lazy_ok)
        starts, ends = int64s(), int64s()
        lazy = 0
        for a, b, shmid, delta in pieces:
            reader = self if shmid is None else self.segment_reader(shmid)
            ss, ee, skipped = _reader_runs(reader, a + delta, b + delta, lazy_ok)
            lazy += skipped
            if not ss:
                continue
            if delta:
                ss = int64s(map((-delta).__add__, ss))
                ee = int64s(map((-delta).__add__, ee))
            if ends and ends[-1] == ss[0]:  # a run goes on from the pid's pages into a segment's
                ends[-1] = ee[0]
                ss, ee = ss[1:], ee[1:]
            starts += ss
            ends += ee
        return starts, ends, lazy

    def readable_bytes(self, start: int, end: int) -> tuple[int, int]:
        """The bytes of [start, end) that `readable_runs` gives, and the bytes of lazy pages it leaves out,
        counted on the memory maps (no list of runs); a broken run raises its error."""
        lazy_ok = self.strategy.serves_lazy
        pieces = self._pieces(start, end) if end > start else None
        if pieces is None:
            return _reader_bytes(self, start, end, lazy_ok)
        readable = lazy = 0
        for a, b, shmid, delta in pieces:
            reader = self if shmid is None else self.segment_reader(shmid)
            got, skipped = _reader_bytes(reader, a + delta, b + delta, lazy_ok)
            readable += got
            lazy += skipped
        return readable, lazy

    def page_counts(self, start: int, end: int) -> dict[str, int]:
        """Pages of [start, end) present, in a parent image, lazy only or not dumped, shared mappings
        counted in their segment."""
        pieces = self._pieces(start, end) or [(start, end, None, 0)]
        counts = dict.fromkeys(PAGE_CLASSES, 0)
        for a, b, shmid, delta in pieces:
            pm = self.pagemap if shmid is None else self.images.shmem_pagemap(shmid)
            for k, n in page_counts(pm, a + delta, b + delta).items():
                counts[k] += n
        return counts

    def __repr__(self) -> str:
        return f"<ProcessReader pid {self.pid} of {self.images.path} via {self.strategy.name}>"


def _reader_runs(reader: PageReader, start: int, end: int, lazy_ok: bool) -> tuple[array[int], array[int], int]:
    """`_map_runs` over the reader's map: whole, or window by window (runs back to back across joined)."""
    maps = reader.maps(start, end)
    starts, ends, lazy = _map_runs(next(maps), start, end, lazy_ok)
    for flat in maps:
        ss, ee, skipped = _map_runs(flat, start, end, lazy_ok)
        lazy += skipped
        if not ss:
            continue
        if ends and ends[-1] == ss[0]:
            ends[-1] = ee[0]
            ss, ee = ss[1:], ee[1:]
        starts += ss
        ends += ee
    return starts, ends, lazy


def _reader_bytes(reader: PageReader, start: int, end: int, lazy_ok: bool) -> tuple[int, int]:
    """`_map_bytes` over the reader's map: whole, or window by window."""
    readable = lazy = 0
    for flat in reader.maps(start, end):
        got, skipped = _map_bytes(flat, start, end, lazy_ok)
        readable += got
        lazy += skipped
    return readable, lazy


def _map_runs(flat: MemoryMap, start: int, end: int, lazy_ok: bool) -> tuple[array[int], array[int], int]:
    """`readable_runs` of one memory map: its runs over [start, end) clipped, runs back to back joined (by
    the native helper, else C-level slices and maps: no Python per run); a broken run raises its error, as
    reading it would."""
    i = flat.index_at(start)
    j = bisect.bisect_left(flat.starts, end, i)
    if i >= j:
        return int64s(), int64s(), 0
    fast = native.fastio
    if fast is not None and start >= 0 and end < 1 << 63:
        raw_starts, raw_ends, lazy, broken = fast.runs(flat.starts, flat.sizes, flat.kinds, i, j, start, end, lazy_ok)
        if broken >= 0:
            raise flat.broken[broken]
        starts, ends = int64s(), int64s()
        starts.frombytes(raw_starts)
        ends.frombytes(raw_ends)
        return starts, ends, lazy
    starts_l, ends_l, lazy = _py_map_runs(flat, i, j, start, end, lazy_ok)
    return int64s(starts_l), int64s(ends_l), lazy


def _py_map_runs(flat: MemoryMap, i: int, j: int, start: int, end: int, lazy_ok: bool
                 ) -> tuple[list[int], list[int], int]:
    """`_map_runs` without the native helper, as lists."""
    kinds = flat.kinds[i:j]
    if BROKEN in kinds:
        raise flat.broken[i + kinds.index(BROKEN)]
    starts = flat.starts[i:j].tolist()
    ends = list(map(operator.add, starts, flat.sizes[i:j]))
    starts[0] = max(starts[0], start)
    ends[-1] = min(ends[-1], end)
    lazy = 0
    if LAZY in kinds and not lazy_ok:
        keep = [k == PRESENT for k in kinds]
        lazy = sum(compress(ends, map(operator.not_, keep))) - sum(compress(starts, map(operator.not_, keep)))
        starts = list(compress(starts, keep))
        ends = list(compress(ends, keep))
        if not starts:
            return [], [], lazy
    # Join runs back to back: a new run starts where the previous one does not end there.
    new = list(map(operator.ne, ends[:-1], starts[1:]))
    if all(new):
        return starts, ends, lazy
    return [starts[0], *compress(starts[1:], new)], [*compress(ends[:-1], new), ends[-1]], lazy


def _map_bytes(flat: MemoryMap, start: int, end: int, lazy_ok: bool) -> tuple[int, int]:
    """`readable_bytes` of one memory map: the sizes of its runs over [start, end), clipped, summed (C-level)."""
    i = flat.index_at(start)
    j = bisect.bisect_left(flat.starts, end, i)
    if i >= j:
        return 0, 0
    kinds = flat.kinds[i:j]
    if BROKEN in kinds:
        raise flat.broken[i + kinds.index(BROKEN)]
    sizes = flat.sizes[i:j]
    sizes[0] -= max(0, start - flat.starts[i])
    sizes[-1] -= max(0, flat.starts[j - 1] + flat.sizes[j - 1] - end)
    total = sum(sizes)
    if lazy_ok or LAZY not in kinds:
        return total, 0
    lazy = sum(compress(sizes, map(LAZY.__eq__, kinds)))
    return total - lazy, lazy


class Area:
    """[start, end) of `vma` in `pid`, read by the pid's process reader."""

    __slots__ = ("_segments", "end", "pid", "reader", "start", "vma")
    pid: int
    vma: Vma
    start: int
    end: int
    reader: ProcessReader
    _segments: list[Segment] | None

    def __init__(self, pid: int, vma: Vma, start: int, end: int, reader: ProcessReader,
                 _segments: list[Segment] | None = None) -> None:
        self.pid = pid
        self.vma = vma
        self.start = start
        self.end = end
        self.reader = reader
        self._segments = _segments

    def __repr__(self) -> str:
        return (f"Area(pid={self.pid!r}, vma={self.vma!r}, start={self.start!r}, end={self.end!r}, "
                f"reader={self.reader!r})")

    @property
    def shmid(self) -> int | None:
        """The segment that holds the area's shared pages (None for private memory)."""
        at = self.reader.shmem_at(self.start)
        return at[0] if at is not None else None

    @property
    def shmem(self) -> bool:
        return self.shmid is not None

    def segments(self) -> list[Segment]:
        """Where each piece of the area is (planned at each call: a fragmented area has millions)."""
        if self._segments is not None:
            return self._segments
        return list(self.reader.segments(self.start, self.end - self.start))

    def readable_bytes(self) -> tuple[int, int]:
        """The area's readable bytes and lazy bytes left out (`ProcessReader.readable_bytes`)."""
        return self.reader.readable_bytes(self.start, self.end)


class Span:
    """Adjacent areas of one pid: a match may cross from one VMA into the next."""

    areas: list[Area]

    def __init__(self, areas: list[Area]) -> None:
        self.areas = areas

    def __eq__(self, other: object) -> bool:
        return self.areas == other.areas if other.__class__ is Span else NotImplemented

    def __repr__(self) -> str:
        return f"Span(areas={self.areas!r})"

    @property
    def reader(self) -> ProcessReader:
        return self.areas[0].reader

    def area_at(self, vaddr: int) -> Area:
        """The area that holds `vaddr` (the last one that starts at or before it)."""
        i = bisect.bisect_right([a.start for a in self.areas], vaddr) - 1
        return self.areas[max(i, 0)]

    def readable_runs(self) -> tuple[array[int], array[int], int]:
        """The span's readable runs as (starts, ends) and the lazy bytes left out (`ProcessReader.readable_runs`)."""
        return self.reader.readable_runs(self.areas[0].start, self.areas[-1].end)

    def runs(self) -> Iterator[tuple[int, int, tuple[PagesFile, int] | None]]:
        """Maximal readable vaddr ranges of the span (present, or lazy if the strategy serves it; they may
        cross VMA boundaries), each with (pages file, offset) when its bytes are one contiguous range of one
        local pages file, else None: one pass over the planned segments."""
        lazy_ok = self.reader.strategy.serves_lazy
        start = end = -1
        cur: PagesFile | None = None
        offset = expect = -1
        for area in self.areas:
            for seg in area.segments():
                kind = seg.kind
                if kind != "present" and not (kind == "lazy" and lazy_ok):
                    continue
                vaddr = seg.vaddr
                if vaddr == end:
                    end += seg.length
                    if cur is not None and (kind != "present" or seg.pages is not cur or seg.offset != expect):
                        cur = None  # this run is not one file range
                    expect += seg.length
                    continue
                if end > start:
                    yield start, end, ((cur, offset) if cur is not None else None)
                start, end = vaddr, vaddr + seg.length
                if kind == "present" and seg.pages is not None:
                    cur, offset, expect = seg.pages, seg.offset, seg.offset + seg.length
                else:
                    cur = None
        if end > start:
            yield start, end, ((cur, offset) if cur is not None else None)


def spans(areas: list[Area]) -> list[Span]:
    """Group address-ordered areas into spans of adjacent areas of one pid."""
    out: list[Span] = []
    for area in areas:
        last = out[-1].areas[-1] if out else None
        if last is not None and last.pid == area.pid and last.end == area.start:
            out[-1].areas.append(area)
        else:
            out.append(Span([area]))
    return out


class Readers:
    """One process reader per pid, made on first use, closed together."""

    def __init__(self, images: CheckpointImages, strategy: str | Strategy | None) -> None:
        self.images = images
        self.strategy = strategy
        self._pids: dict[int, ProcessReader] = {}

    def pid(self, pid: int) -> ProcessReader:
        r = self._pids.get(pid)
        if r is None:
            r = self._pids[pid] = self.images.reader(pid, self.strategy)
        return r

    def area(self, pid: int, vma: Vma, start: int | None = None, end: int | None = None) -> Area:
        return Area(pid, vma, vma.start if start is None else start, vma.end if end is None else end, self.pid(pid))

    def close(self) -> None:
        for r in self._pids.values():
            r.close()

    def __enter__(self) -> Readers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def parse_range(text: str) -> tuple[int, int]:
    """`START-END` in hex (with or without 0x) to a pair."""
    start_s, sep, end_s = text.partition("-")
    try:
        start, end = parse_addr(start_s), parse_addr(end_s)
    except ValueError:
        start = end = -1
    if not sep or start < 0 or end <= start:
        raise ConfigError(f"--range {text!r}: expected START-END in hex with START < END")
    return start, end


def parse_addr(text: str) -> int:
    """An address: hex (`0x7f..` or bare `7f..`, as tables print them)."""
    text = text.strip().lower()
    return int(text[2:] if text.startswith("0x") else text, 16)


class VmaFilter:
    """Which VMAs (and which part of them) a command works on."""

    names: list[str]
    kinds: list[str]
    perms: str | None
    range: tuple[int, int] | None

    def __init__(self, names: list[str], kinds: list[str], perms: str | None, range: tuple[int, int] | None) -> None:
        self.names = names
        self.kinds = kinds
        self.perms = perms
        self.range = range

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not VmaFilter:
            return NotImplemented
        return (self.names, self.kinds, self.perms, self.range) == (
            other.names, other.kinds, other.perms, other.range)

    def __repr__(self) -> str:
        return f"VmaFilter(names={self.names!r}, kinds={self.kinds!r}, perms={self.perms!r}, range={self.range!r})"

    def clip(self, vma: Vma) -> tuple[int, int] | None:
        """The part of `vma` selected, or None."""
        if self.names and not any(_name_matches(p, vma) for p in self.names):
            return None
        if self.kinds and vma.kind not in self.kinds:
            return None
        if self.perms and not all(ch == "-" or ch in vma.perms for ch in self.perms):
            return None
        start, end = vma.start, vma.end
        if self.range is not None:
            start, end = max(start, self.range[0]), min(end, self.range[1])
            if start >= end:
                return None
        return start, end


def _name_matches(pattern: str, vma: Vma) -> bool:
    name = vma.name
    if any(ch in pattern for ch in "*?["):
        import fnmatch  # re: only for a pattern

        return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name.rsplit("/", 1)[-1], pattern)
    return pattern in name or pattern == vma.kind


PAGE_CLASSES = ("present", "parent", "lazy", "not_dumped")


def page_counts(pagemap: Pagemap, start: int, end: int) -> dict[str, int]:
    """Pages of [start, end) that are present, in the parent image, lazy only, or not dumped."""
    ps = pagemap.page_size
    counts = dict.fromkeys(PAGE_CLASSES, 0)
    total = (end - start) // ps
    for e in pagemap.entries_in(start, end):
        n = (min(e.end, end) - max(e.vaddr, start)) // ps
        if e.flags & PE_PRESENT:
            counts["present"] += n
        elif e.flags & PE_PARENT:
            counts["parent"] += n
        elif e.flags & PE_LAZY:
            counts["lazy"] += n
    counts["not_dumped"] = total - counts["present"] - counts["parent"] - counts["lazy"]
    return counts


def area_page_counts(area: Area) -> dict[str, int]:
    """page_counts for an area; shared pages counted in their segment."""
    return area.reader.page_counts(area.start, area.end)
