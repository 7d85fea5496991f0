"""A process's memory as commands scan it: VMAs with their readers, spans of adjacent VMAs, page counts.

A VMA's bytes are in the pid's pagemap, or for shared memory (anonymous
shared, memfd, SysV) in `pagemap-shmem-<id>.img` at the VMA's page offset.
An `Area` hides that: `reader` reads the VMA at `vaddr + delta`.
"""

from __future__ import annotations

import bisect
import fnmatch
from collections.abc import Iterator
from dataclasses import dataclass, field

from .errors import ConfigError
from .images import (
    VMA_ANON_SHARED,
    VMA_AREA_MEMFD,
    VMA_AREA_SYSVIPC,
    CheckpointImages,
    Vma,
)
from .pagemap import PE_LAZY, PE_PARENT, PE_PRESENT, Pagemap
from .reader import PageReader, Segment
from .strategy import PagesFile


@dataclass(eq=False, slots=True)
class Area:
    """[start, end) of `vma` in `pid`; its bytes are read by `reader` at `vaddr + delta`."""

    pid: int
    vma: Vma
    start: int
    end: int
    reader: PageReader
    delta: int
    _segments: list[Segment] | None = field(default=None, repr=False)

    @property
    def shmem(self) -> bool:
        return self.reader.target.kind == "shmem"

    def segments(self) -> list[Segment]:
        """Where each piece of the area is (addresses in the reader's space); planned once."""
        if self._segments is None:
            self._segments = list(self.reader.segments(self.start + self.delta, self.end - self.start))
        return self._segments


@dataclass
class Span:
    """Adjacent areas read by the same reader: a match may cross from one VMA into the next."""

    areas: list[Area]

    @property
    def reader(self) -> PageReader:
        return self.areas[0].reader

    @property
    def delta(self) -> int:
        return self.areas[0].delta

    def area_at(self, vaddr: int) -> Area:
        """The area that holds `vaddr` (the last one that starts at or before it)."""
        i = bisect.bisect_right([a.start for a in self.areas], vaddr) - 1
        return self.areas[max(i, 0)]

    def runs(self) -> Iterator[tuple[int, int, tuple[PagesFile, int] | None]]:
        """Maximal readable vaddr ranges of the span (present, or lazy if the strategy serves it; they may
        cross VMA boundaries), each with (pages file, offset) when its bytes are one contiguous range of one
        local pages file, else None: one pass over the planned segments."""
        lazy_ok = self.reader.strategy.serves_lazy
        delta = self.delta
        start = end = -1
        cur: PagesFile | None = None
        offset = expect = -1
        for area in self.areas:
            for seg in area.segments():
                kind = seg.kind
                if kind != "present" and not (kind == "lazy" and lazy_ok):
                    continue
                vaddr = seg.vaddr - delta
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
    """Group address-ordered areas of one pid into spans of adjacent areas with one reader."""
    out: list[Span] = []
    for area in areas:
        last = out[-1].areas[-1] if out else None
        if (
            last is not None
            and last.pid == area.pid
            and last.end == area.start
            and last.reader is area.reader
            and last.delta == area.delta
        ):
            out[-1].areas.append(area)
        else:
            out.append(Span([area]))
    return out


def shmem_id(images: CheckpointImages, vma: Vma) -> int | None:
    """The shmem pagemap id holding a shared VMA's pages, or None for private memory."""
    if vma.status & VMA_AREA_MEMFD:
        return images.memfd_shmids.get(vma.shmid)
    if vma.status & (VMA_ANON_SHARED | VMA_AREA_SYSVIPC):
        return vma.shmid
    return None


class Readers:
    """One reader per pid and per shmem segment, made on first use, closed together."""

    def __init__(self, images: CheckpointImages, strategy: str | None) -> None:
        self.images = images
        self.strategy = strategy
        self._pids: dict[int, PageReader] = {}
        self._shmem: dict[int, PageReader | None] = {}

    def pid(self, pid: int) -> PageReader:
        r = self._pids.get(pid)
        if r is None:
            r = self._pids[pid] = self.images.reader(pid, self.strategy)
        return r

    def shmem(self, shmid: int) -> PageReader | None:
        if shmid not in self._shmem:
            has = shmid in self.images.shmem_ids
            self._shmem[shmid] = self.images.shmem_reader(shmid, self.strategy) if has else None
        return self._shmem[shmid]

    def area(self, pid: int, vma: Vma, start: int | None = None, end: int | None = None) -> Area:
        s = vma.start if start is None else start
        e = vma.end if end is None else end
        sid = shmem_id(self.images, vma)
        if sid is not None:
            reader = self.shmem(sid)
            if reader is not None:
                return Area(pid, vma, s, e, reader, vma.pgoff - vma.start)
        return Area(pid, vma, s, e, self.pid(pid), 0)

    def close(self) -> None:
        for r in [*self._pids.values(), *self._shmem.values()]:
            if r is not None:
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


@dataclass
class VmaFilter:
    """Which VMAs (and which part of them) a command works on."""

    names: list[str]
    kinds: list[str]
    perms: str | None
    range: tuple[int, int] | None

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
    """page_counts for an area, in the pagemap that holds its pages."""
    return page_counts(area.reader.pagemap, area.start + area.delta, area.end + area.delta)
