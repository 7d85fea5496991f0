"""PageReader: read a pid's or a shmem segment's memory from CRIU images.

The reader owns CRIU's page-read semantics (the seed's `struct page_read`):
lookup in the pagemap index, `PE_PARENT` pages through the chain of parent
images, `PE_LAZY` pages (an error unless the strategy serves them), addresses
no entry covers (an error unless `zero_fill`), deferred reads completed by
`sync()`, and auto-dedup. How bytes move is the strategy's business.

One planner: on first use a reader resolves its target, through the whole
chain, into a `MemoryMap` (runs of memory and where their bytes are: which
level's pages file, which offset). Every read is planned from it as from a flat
dump, and `segments()` is a view of it.
"""

from __future__ import annotations

import _thread
import os
from array import array
from bisect import bisect_left, bisect_right

from . import TYPE_CHECKING, native
from .dedup import punch_hole
from .errors import ChainError, CritPageReadError, ImageError, LazyPageError, NotDumpedError
from .pagemap import END, PE_KNOWN, PE_PARENT, PE_PRESENT, Pagemap, _mask_of, int64s
from .strategy import (
    AnyRequest,
    CopyRequest,
    PagesFile,
    PlannedRead,
    ReadRequest,
    ScatterRequest,
    Strategy,
    Target,
    View,
    write_all,
)

if TYPE_CHECKING:  # typing is not imported at start-up
    from collections.abc import Iterable, Iterator
    from typing import Any, Literal, NamedTuple

    from .images import CheckpointImages
    from .strategy import Scratch, Sink

    SegmentKind = Literal["present", "lazy", "hole"]
    #: What a read does with addresses no entry covers: raise NotDumpedError, zero them, or leave the buffer as is.
    HolesMode = Literal["error", "zero", "skip"]

    class _SegmentTuple(NamedTuple):
        vaddr: int
        length: int
        kind: SegmentKind
        flags: int
        pages: PagesFile | None
        offset: int
        image: str
        depth: int
else:
    from collections import namedtuple

    _SegmentTuple = namedtuple("Segment", ("vaddr", "length", "kind", "flags", "pages", "offset", "image", "depth"))


def __getattr__(name: str) -> object:
    """`SegmentKind` and `HolesMode`, made on first use."""
    if name not in ("SegmentKind", "HolesMode"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from typing import Literal

    value = Literal["present", "lazy", "hole"] if name == "SegmentKind" else Literal["error", "zero", "skip"]
    globals()[name] = value
    return value

_HOLES_MODES = ("error", "zero", "skip")
_HOLES_CODE = {"error": 0, "zero": 1, "skip": 2}  # the native planner's
_NATIVE_END = 1 << 62  # ranges the native planner takes (int64); addresses past it are holes, planned in Python
MAX_CHAIN_DEPTH = 256
#: Windows of a windowed reader's memory map kept (the least recently used dropped first).
MAP_WINDOWS = 8
#: `Pagemap.flag_mask()` bits of the flags words with PE_PARENT.
_PARENT_WORDS = sum(1 << f for f in range(1, PE_KNOWN + 1) if f & PE_PARENT)
_PRESENT_WORDS = sum(1 << f for f in range(1, PE_KNOWN + 1) if f & PE_PRESENT)
_ZEROS = bytes(1 << 20)


class Segment(_SegmentTuple):
    """A piece of an address range and where its bytes are.

    `kind` is "present" (in `pages` at `offset`), "lazy" (on a page server
    only) or "hole" (not dumped). `image` is the image directory that holds
    the entry, `depth` its distance from the newest image (0 = newest). A
    named tuple (vaddr, length, kind, flags, pages, offset, image, depth): a fragmented dump has tens of
    thousands of them.
    """

    __slots__ = ()

    @property
    def end(self) -> int:
        return self.vaddr + self.length

PRESENT, LAZY, BROKEN, HOLE = 0, 1, 2, 3


#: Column types of a MemoryMap besides its int64 ones: uint8 kinds and flags, uint16 depths.
_BYTE, _DEPTH = "B", "H"

#: One zero of each column type, to make columns of n zeros (`_ZERO_Q * n`: one allocation, one pass).
_ZERO_Q, _ZERO_B, _ZERO_H = int64s([0]), array(_BYTE, [0]), array(_DEPTH, [0])


class MemoryMap:
    """A target's memory resolved through its chain: runs in address order, each with where its bytes are.

    Typed columns, one item per run (a pagemap entry, or the part of a parent's
    run that an entry of a newer image has in parent): int64 `starts`, `sizes`
    and `offsets` (where a present run's bytes are in its pages file), uint8
    `kinds` (PRESENT, LAZY, or BROKEN: a newer image has the range in parent
    but the chain lacks it, `broken` holds the error a read raises) and `flags`
    (the entry's PE_* flags), uint16 `depths` (the level that holds the bytes,
    0 = newest). `table[depth]` is that level's pages file (one per level).
    Addresses no run covers are holes. 30 bytes a run, no object per run.

    A windowed reader's map (`PageReader.maps`) is in windows: each answers for the addresses [lo, hi)
    (a whole map for all: 0 to END) and holds the runs there; `cut` says its first run goes on from the
    last of the window before (a run of the whole map split at lo: joined again by `segments` and by
    `_joined`).
    """

    __slots__ = ("_cont_end", "_file_end", "_one_file", "broken", "cut", "depths", "flags", "hi", "images", "kinds",
                 "lo", "offsets", "sizes", "starts", "table", "window")

    def __init__(self) -> None:
        self.starts: array[int] = int64s()
        self.sizes: array[int] = int64s()
        self.kinds: array[int] = array(_BYTE)
        self.flags: array[int] = array(_BYTE)
        self.offsets: array[int] = int64s()
        self.depths: array[int] = array(_DEPTH)
        #: The pages file of each depth (None where this map has no present run of that depth).
        self.table: list[PagesFile | None] = []
        self.broken: dict[int, CritPageReadError] = {}
        self.images: list[str] = []
        self._cont_end: array[int] | None = None
        self._file_end: array[int] | None = None
        #: Every run is present, one after another in one pages file (a flat dump's map).
        self._one_file = False
        self.lo, self.hi, self.cut, self.window = 0, END, False, 0

    def __len__(self) -> int:
        return len(self.starts)

    def pages(self, k: int) -> PagesFile | None:
        """The pages file of run `k` (None unless it is present)."""
        return self.table[self.depths[k]] if self.kinds[k] == PRESENT else None

    def index_at(self, vaddr: int) -> int:
        """Index of the first run whose end is above `vaddr` (len(self) if none)."""
        i = bisect_right(self.starts, vaddr) - 1
        if i >= 0 and self.starts[i] + self.sizes[i] > vaddr:
            return i
        return i + 1

    def add(self, start: int, size: int, kind: int, flags: int, offset: int, depth: int) -> None:
        self.starts.append(start)
        self.sizes.append(size)
        self.kinds.append(kind)
        self.flags.append(flags)
        self.offsets.append(offset)
        self.depths.append(depth)

    def add_broken(self, start: int, size: int, flags: int, depth: int, error: CritPageReadError) -> None:
        self.broken[len(self.starts)] = error
        self.add(start, size, BROKEN, flags, -1, depth)

    def set_table(self, depth: int, pages: PagesFile | None, parent: MemoryMap | None = None) -> None:
        """`table` from the parent's (if any) with `pages` as the file of `depth`."""
        table = list(parent.table) if parent is not None else []
        if len(table) <= depth:
            table += [None] * (depth + 1 - len(table))
        table[depth] = pages
        self.table = table

    def gap_free(self) -> array[int]:
        """Per run, the index past the last run of the gap-free stretch it is in (covering checks)."""
        if self._cont_end is None:
            starts, sizes = self.starts, self.sizes
            n = len(starts)
            cont = int64s(range(1, n + 1))
            for k in range(n - 2, -1, -1):
                if starts[k] + sizes[k] == starts[k + 1]:
                    cont[k] = cont[k + 1]
            self._cont_end = cont
        return self._cont_end

    def file_runs(self) -> array[int]:
        """Per run, the index past the last of the following runs that are present and back to back
        with it in the same pages file (its own index + 1 if none): a stretch one file range holds."""
        if self._file_end is None and self._one_file:
            n = len(self.starts)
            self._file_end = int64s([n]) * n
        if self._file_end is None:
            starts, kinds, depths, offsets, sizes = self.starts, self.kinds, self.depths, self.offsets, self.sizes
            n = len(starts)
            out = int64s(range(1, n + 1))
            for k in range(n - 2, -1, -1):
                if (kinds[k] == PRESENT and kinds[k + 1] == PRESENT and depths[k] == depths[k + 1]
                        and offsets[k] + sizes[k] == offsets[k + 1]):
                    out[k] = out[k + 1]
            self._file_end = out
        return self._file_end

    def copy_into(self, out: MemoryMap, start: int, end: int, child: PageReader) -> None:
        """Append this map's runs over [start, end) to `out` (clipped); gaps are BROKEN runs naming
        `child`, the newer image that has the range in parent."""
        starts, sizes = self.starts, self.sizes
        i = self.index_at(start)
        j = bisect_left(starts, end, i)
        cont = self.gap_free()
        if i < j and starts[i] <= start and cont[i] >= j and starts[j - 1] + sizes[j - 1] >= end:
            # Covered without a gap (the usual case): slices, then clip the first and the last run.
            n0 = len(out.starts)
            out.starts += starts[i:j]
            out.sizes += sizes[i:j]
            out.kinds += self.kinds[i:j]
            out.flags += self.flags[i:j]
            out.offsets += self.offsets[i:j]
            out.depths += self.depths[i:j]
            for k, error in self.broken.items():
                if i <= k < j:
                    out.broken[n0 + k - i] = error
            cut = start - starts[i]
            if cut:
                out.starts[n0] = start
                out.sizes[n0] -= cut
                if out.offsets[n0] >= 0:
                    out.offsets[n0] += cut
            over = out.starts[-1] + out.sizes[-1] - end
            if over > 0:
                out.sizes[-1] -= over
            return
        pos = start
        for k in range(i, j):
            s = max(starts[k], start)
            if s > pos:
                out.add_broken(pos, s - pos, 0, child.depth, child._lacks(pos, s))
            e = min(starts[k] + sizes[k], end)
            if k in self.broken:
                out.broken[len(out.starts)] = self.broken[k]
            out.add(s, e - s, self.kinds[k], self.flags[k],
                    self.offsets[k] + s - starts[k] if self.offsets[k] >= 0 else -1, self.depths[k])
            pos = e
        if pos < end:
            out.add_broken(pos, end - pos, 0, child.depth, child._lacks(pos, end))


def _joined(maps: list[MemoryMap]) -> MemoryMap:
    """Windows of a map, one after another, as one map: a run they split (`cut`) is one run again."""
    if len(maps) == 1:
        return maps[0]
    out = MemoryMap()
    out.lo, out.hi, out.cut, out.window = maps[0].lo, maps[-1].hi, maps[0].cut, -1
    out.images = maps[0].images
    table: list[PagesFile | None] = []
    for flat in maps:
        for depth, pages in enumerate(flat.table):
            if depth >= len(table):
                table.append(pages)
            elif table[depth] is None:
                table[depth] = pages
        skip = 0
        if (flat.cut and out.starts and flat.starts and flat.starts[0] == out.starts[-1] + out.sizes[-1]
                and flat.kinds[0] == out.kinds[-1] and flat.depths[0] == out.depths[-1]):
            out.sizes[-1] += flat.sizes[0]
            skip = 1
        n0 = len(out.starts) - skip
        out.starts += flat.starts[skip:]
        out.sizes += flat.sizes[skip:]
        out.kinds += flat.kinds[skip:]
        out.flags += flat.flags[skip:]
        out.offsets += flat.offsets[skip:]
        out.depths += flat.depths[skip:]
        for k, error in flat.broken.items():
            if k >= skip:
                out.broken[n0 + k] = error
    out.table = table
    return out


def _restrict(flat: MemoryMap, pages: PagesFile) -> MemoryMap:
    """`flat` with the runs of `pages` (a pages file unpacked sparse) cut to the bytes it holds: the rest
    become BROKEN runs, whose reads raise an ImageError naming it (never zeros)."""
    present = pages.present or []
    out = MemoryMap()
    out.images = flat.images
    out.table = flat.table
    for k in range(len(flat.starts)):
        vaddr, flags, depth = flat.starts[k], flat.flags[k], flat.depths[k]
        if flat.pages(k) is not pages:
            if k in flat.broken:
                out.broken[len(out.starts)] = flat.broken[k]
            out.add(vaddr, flat.sizes[k], flat.kinds[k], flags, flat.offsets[k], depth)
            continue
        pos = flat.offsets[k] - pages.base  # the run's bytes in the pages: [pos, end)
        end = pos + flat.sizes[k]
        shift = vaddr - pos  # vaddr of byte p of the pages is p + shift
        i = max(bisect_right(present, (pos, end)) - 1, 0)
        while pos < end:
            while i < len(present) and present[i][1] <= pos:
                i += 1
            a, b = present[i] if i < len(present) else (end, end)
            if a > pos:
                stop = min(a, end)
                out.add_broken(pos + shift, stop - pos, flags, depth, ImageError(
                    pages.path, f"pages at {pos + shift:#x}-{stop + shift:#x} were not unpacked "
                    "(the archive was opened for some ranges only)"))
            else:
                stop = min(b, end)
                out.add(pos + shift, stop - pos, flat.kinds[k], flags, pages.base + pos, depth)
            pos = stop
    return out


def _lacks(parent: PageReader, child: PageReader, start: int, end: int) -> ChainError:
    return ChainError(parent.source, f"lacks pages at {start:#x}-{end:#x} that {child.source} has in parent")


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
        owns_strategy: bool = True,
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
        self._map: MemoryMap | None = None
        #: Whether the map is in windows (this level's index or a parent's is windowed): None until known.
        self._windowed: bool | None = None
        self._bounds: array[int] | None = None
        self._windows: dict[int, MemoryMap] = {}
        self._last: MemoryMap | None = None
        #: While a window is built: its [lo, hi) (a broken run's message names the range as a whole map has it).
        self._clip: tuple[int, int] | None = None
        self._lock = _thread.allocate_lock()
        self._observe = observe
        #: False for a strategy passed in by the caller: its maker closes it, not this reader.
        self.owns_strategy = owns_strategy
        self._closed = False
        # Owned by the root reader: ranges read from parent images, to punch once read.
        self._dedup_pending: list[tuple[PagesFile, int, int]] = []

    # --- structure -------------------------------------------------------------------------

    @property
    def source(self) -> str:
        """The pagemap image this reader reads, for messages."""
        return self.pagemap.location

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

    # --- planning: one map, one planner ------------------------------------------------------

    def memory_map(self) -> MemoryMap:
        """Where every page of this target lives, resolved through the chain: built on first use,
        by one sweep over each level's index (runs, not pages), then shared by every read.

        A windowed reader's (`maps`) is its windows joined, made at each call and not kept (30 bytes a
        run: for callers off the streaming paths)."""
        flat = self._map
        if flat is None:
            if self._is_windowed():
                return _joined(list(self.maps(0, END)))
            flat = self._map = self._build_map()
        return flat

    # --- windows: the map of a windowed reader, built per address window ------------------------

    def _is_windowed(self) -> bool:
        """The map is held in windows: this level's index is windowed, or a parent's its entries read."""
        windowed = self._windowed
        if windowed is None:
            pm = self.pagemap
            windowed = pm.windowed
            if not windowed and pm.flag_mask() & _PARENT_WORDS:
                try:
                    windowed = self.parent._is_windowed()
                except CritPageReadError:
                    windowed = False
            self._windowed = windowed
        return windowed

    @property
    def windowed(self) -> bool:
        """The memory map is held in windows (`maps`): this level's pagemap, or a parent's its entries
        read, has more than `pagemap.WINDOWED_ABOVE` entries. Consumers keep no whole list of runs then."""
        return self._map is None and self._is_windowed()

    def _window_bounds(self) -> array[int]:
        """Where the map's windows start (from the second on): where this level's index windows start and,
        if it has pages in a parent, where the parent's map windows do (each window lies in one of its)."""
        bounds = self._bounds
        if bounds is None:
            bounds = self.pagemap.bounds()
            if self.pagemap.flag_mask() & _PARENT_WORDS:
                try:
                    parent = self.parent
                    if parent._is_windowed():
                        bounds = int64s(sorted({*bounds, *parent._window_bounds()}))
                except CritPageReadError:
                    pass
            self._bounds = bounds
        return bounds

    def _window(self, k: int) -> MemoryMap:
        """Window `k` of the map, built if it is not among the last MAP_WINDOWS used."""
        with self._lock:  # extract's writer threads share a reader
            windows = self._windows
            flat = windows.pop(k, None)
            if flat is None:
                flat = self._build_window(k)
                while len(windows) >= MAP_WINDOWS:
                    del windows[next(iter(windows))]
            windows[k] = flat
            self._last = flat
        return flat

    def _map_at(self, vaddr: int) -> MemoryMap:
        """The window of the map that answers for `vaddr`."""
        last = self._last
        if last is not None and last.lo <= vaddr < last.hi:
            return last
        return self._window(bisect_right(self._window_bounds(), vaddr))

    def _build_window(self, k: int) -> MemoryMap:
        bounds = self._window_bounds()
        lo = bounds[k - 1] if k else 0
        hi = bounds[k] if k < len(bounds) else END
        pm = self.pagemap
        cols = pm.columns_over(lo, hi)
        self._clip = (lo, hi)
        try:
            flat = self._build_map(cols, lambda: self.parent._map_at(lo))
        finally:
            self._clip = None
        flat.lo, flat.hi, flat.window = lo, hi, k
        if lo and cols[0] and cols[0][0] == lo:
            entry = pm.find(lo)
            if entry is not None and entry.vaddr < lo:  # an entry goes on from the window before
                if not entry.flags & PE_PARENT:
                    flat.cut = True
                else:
                    flat.cut = self._parent_cut(lo, entry.vaddr)
        return flat

    def _parent_cut(self, lo: int, since: int) -> bool:
        """Whether the run the whole map has at `lo`, inside an entry of this level (from `since`) in
        parent, starts before `lo`: the parent's run there does, or lo is in its hole and the broken run
        (the parent's gap within the entry) does."""
        try:
            up = self.parent._map_at(lo)
        except CritPageReadError:
            return True  # one broken run for the whole entry
        k = up.index_at(lo)
        if k < len(up.starts) and up.starts[k] <= lo:
            return up.starts[k] < lo or (k == 0 and up.lo == lo and up.cut)
        ppm = self.parent.pagemap
        i = ppm.index_at(lo)
        return max(since, ppm.entries[i - 1].end if i else 0) < lo

    def _lacks(self, start: int, end: int) -> ChainError:
        """The error of reading [start, end), which this level has in parent and the parent lacks; in a
        window, the range as the whole map has it (the parent's gap and this level's entry, unclipped)."""
        clip = self._clip
        if clip is not None and (start == clip[0] or end == clip[1]):
            ppm = self.parent.pagemap
            if start == clip[0]:
                entry = self.pagemap.find(start)
                i = ppm.index_at(start)
                gap = ppm.entries[i - 1].end if i else 0
                start = max(entry.vaddr if entry is not None else start, gap)
            if end == clip[1]:
                entry = self.pagemap.find(end - 1)
                i = ppm.index_at(end - 1)
                gap = ppm.entries[i].vaddr if i < len(ppm) else END
                end = min(entry.end if entry is not None else end, gap)
        return _lacks(self.parent, self, start, end)

    def maps(self, start: int, end: int) -> Iterator[MemoryMap]:
        """The map over [start, end) in address order: the whole map, or the windows that answer for it."""
        flat = self._map
        if flat is not None or not self._is_windowed():
            yield flat or self.memory_map()
            return
        pos = start
        while True:
            flat = self._map_at(pos)
            yield flat
            if flat.hi >= end:
                return
            pos = flat.hi

    def _map_over(self, start: int, end: int) -> MemoryMap:
        """A map that holds every run over [start, end): the whole map, its window, or windows joined."""
        flat = self._map
        if flat is not None:
            return flat
        if not self._is_windowed():
            return self.memory_map()
        flat = self._map_at(start)
        if end <= flat.hi:
            return flat
        return _joined(list(self.maps(start, end)))

    def _build_map(self, cols: Any = None, parent_map: Any = None) -> MemoryMap:
        """The map of this level's entries (`cols`, default all of them), resolved over the parent's map
        (`parent_map()`, default the parent's whole map)."""
        flat = MemoryMap()
        vaddrs, sizes, fl, offs = cols if cols is not None else self.pagemap.columns()
        if parent_map is None:
            parent_map = self._parent_map
        if vaddrs and not _mask_of(fl) & ~_PRESENT_WORDS:
            # Every entry has its data here (a flat dump, a chain's oldest level): the map is the
            # index's columns (shared, never changed), built without a loop in Python; runs one after
            # another are back to back in the one pages file.
            n = len(vaddrs)
            flat.starts, flat.sizes, flat.flags, flat.offsets = vaddrs, sizes, fl, offs
            flat.kinds = array(_BYTE, bytes(n))  # PRESENT is 0
            flat.depths = array(_DEPTH, [self.depth]) * n
            first = self._pages or self._pages_file()
            flat.set_table(self.depth, first)
            flat.images = [self.images.location]
            flat._one_file = True
            return flat if first is None or first.present is None else _restrict(flat, first)
        fast = native.fastio
        if fast is not None:
            resolved = self._resolve_native(flat, fast, (vaddrs, sizes, fl, offs), parent_map)
            if resolved is not None:
                return resolved
        add = flat.add
        depth = self.depth
        parent: MemoryMap | None = None
        parent_error: CritPageReadError | None = None
        pages: PagesFile | None = None
        pstarts: Any = ()
        for vaddr, size, f, offset in zip(vaddrs, sizes, fl, offs, strict=True):
            if f & PE_PRESENT:
                if pages is None:
                    pages = self._pages or self._pages_file()
                add(vaddr, size, PRESENT, f, offset, depth)
            elif f & PE_PARENT:
                if parent is None and parent_error is None:
                    try:
                        parent = parent_map()
                    except CritPageReadError as exc:  # no parent link, no pagemap there: only reads of it fail
                        parent_error = exc
                    else:
                        pstarts, psizes, pkinds, pflags, poffsets, pdepths = (
                            parent.starts, parent.sizes, parent.kinds, parent.flags, parent.offsets, parent.depths)
                if parent is None:
                    flat.add_broken(vaddr, size, f, depth, parent_error)  # type: ignore[arg-type]
                    continue
                # Usually the range lies inside one run of the parent's map: take it, clipped.
                i = bisect_right(pstarts, vaddr) - 1
                if i >= 0 and vaddr + size <= pstarts[i] + psizes[i] and pkinds[i] != BROKEN:
                    off = poffsets[i]
                    add(vaddr, size, pkinds[i], pflags[i], off + vaddr - pstarts[i] if off >= 0 else -1, pdepths[i])
                else:
                    parent.copy_into(flat, vaddr, vaddr + size, self)
            elif f:  # PE_LAZY alone: data only on a page server
                add(vaddr, size, LAZY, f, -1, depth)
        flat.set_table(depth, pages, parent)
        return self._finish_map(flat, pages)

    def _parent_map(self) -> MemoryMap:
        return self.parent.memory_map()

    def _resolve_native(self, flat: MemoryMap, fast: Any, cols: Any, parent_map: Any) -> MemoryMap | None:
        """`_build_map`'s sweep by the native helper (None: the parent cannot be read, the Python sweep
        makes the runs that need it broken)."""
        vaddrs, sizes, fl, offs = cols
        kinds = _mask_of(fl)
        parent: MemoryMap | None = None
        if kinds & _PARENT_WORDS:
            try:
                parent = parent_map()
            except CritPageReadError:
                return None
        pages = (self._pages or self._pages_file()) if kinds & _PRESENT_WORDS else None
        columns = (parent.starts, parent.sizes, parent.kinds, parent.flags, parent.offsets,
                   parent.depths) if parent is not None else None
        # Its length first, then the runs written into the map's own columns: no other copy of them.
        n = fast.resolve_count(vaddrs, sizes, fl, offs, self.depth, columns)
        flat.starts, flat.sizes, flat.offsets = _ZERO_Q * n, _ZERO_Q * n, _ZERO_Q * n
        flat.kinds, flat.flags, flat.depths = _ZERO_B * n, _ZERO_B * n, _ZERO_H * n
        broken = fast.resolve(vaddrs, sizes, fl, offs, self.depth, columns,
                              (flat.starts, flat.sizes, flat.kinds, flat.flags, flat.offsets, flat.depths))
        for index, start, stop, k in broken:
            flat.broken[index] = parent.broken[k] if k >= 0 else self._lacks(start, stop)  # type: ignore[union-attr]
        flat.set_table(self.depth, pages, parent)
        return self._finish_map(flat, pages)

    def _finish_map(self, flat: MemoryMap, pages: PagesFile | None) -> MemoryMap:
        """The map with its chain's image locations; cut to what `pages` holds if it was unpacked sparse."""
        if self._parent is not None and self._clip is None:
            self._parent._map = None  # the parent's own map served only to build this one
        flat.images = [self.images.location]
        level = self._parent
        while level is not None:
            flat.images.append(level.images.location)
            level = level._parent
        return flat if pages is None or pages.present is None else _restrict(flat, pages)

    def segments(self, vaddr: int, length: int) -> Iterator[Segment]:
        """Where each piece of [vaddr, vaddr+length) is, resolved through the chain (a view of the map)."""
        if self._map is None and self._is_windowed():
            return self._window_segments(vaddr, vaddr + length)
        return self._segments_of(None, vaddr, vaddr + length)

    def _window_segments(self, vaddr: int, end: int) -> Iterator[Segment]:
        """`segments` window by window: a segment the windows split (a hole, or a run `cut`) joined again."""
        if vaddr < 0 or end < vaddr:
            raise ValueError("negative address or length")
        pending: Segment | None = None
        pos = vaddr
        while pos < end:
            flat = self._map_at(pos)
            stop = min(end, flat.hi)
            first = pending is not None
            for seg in self._segments_of(flat, pos, stop):
                if first:
                    first = False
                    assert pending is not None
                    if seg.kind == pending.kind and (seg.kind == "hole" or flat.cut):
                        pending = pending._replace(length=pending.length + seg.length)
                        continue
                if pending is not None:
                    yield pending
                pending = seg
            pos = stop
        if pending is not None:
            yield pending

    def _segments_of(self, flat: MemoryMap | None, vaddr: int, end: int) -> Iterator[Segment]:
        """`segments` of [vaddr, end) from `flat`, which holds every run there (None: the whole map)."""
        if flat is None:
            if vaddr < 0 or end < vaddr:
                raise ValueError("negative address or length")
            flat = self.memory_map()
        pos = vaddr
        starts, sizes, kinds = flat.starts, flat.sizes, flat.kinds
        image = flat.images[0]
        i = flat.index_at(vaddr)
        count = len(starts)
        while pos < end:
            if i >= count or starts[i] >= end:
                yield Segment(pos, end - pos, "hole", 0, None, -1, image, self.depth)
                return
            start = starts[i]
            if start > pos:
                yield Segment(pos, start - pos, "hole", 0, None, -1, image, self.depth)
                pos = start
            stop = min(start + sizes[i], end)
            kind = kinds[i]
            if kind == BROKEN:
                raise flat.broken[i]
            d = flat.depths[i]
            if kind == PRESENT:
                yield Segment(pos, stop - pos, "present", flat.flags[i], flat.table[d],
                              flat.offsets[i] + pos - start, flat.images[d - self.depth], d)
            else:
                yield Segment(pos, stop - pos, "lazy", flat.flags[i], None, -1, flat.images[d - self.depth], d)
            pos = stop
            i += 1

    def _requests(
        self, vaddr: int, dest: memoryview, holes_mode: HolesMode
    ) -> tuple[list[AnyRequest], list[tuple[int, int]]]:
        """Plan a read: requests for the strategy (merged where the file is contiguous) and holes."""
        end = vaddr + len(dest)
        flat = self._map or self._map_over(vaddr, end)
        # Fast path (most reads): the range lies inside one run with data.
        i = bisect_right(flat.starts, vaddr) - 1
        if i >= 0 and end <= flat.starts[i] + flat.sizes[i] and flat.kinds[i] == PRESENT and dest:
            pages = flat.table[flat.depths[i]]
            offset = flat.offsets[i] + vaddr - flat.starts[i]
            if flat.depths[i] and self.auto_dedup:
                self._root._dedup_pending.append((pages, offset, len(dest)))  # type: ignore[arg-type]
            return [ReadRequest(pages, offset, dest, vaddr, self.target)], []
        fast = native.fastio
        if (fast is not None and not self.auto_dedup and self.strategy.takes_plans
                and 0 <= vaddr and end < _NATIVE_END):
            # The native planner: one PlannedRead of pieces, no Python per piece.
            status, a, b, pieces, zeros, files = fast.plan(
                flat.starts, flat.sizes, flat.kinds, flat.depths, flat.offsets, flat.table, vaddr, end,
                _HOLES_CODE[holes_mode])
            if status == 0:
                planned: list[Any] = [PlannedRead(files, pieces, dest, vaddr, self.target)] if pieces else []
                if not zeros:
                    return planned, []
                z = memoryview(zeros).cast("q").tolist()
                return planned, list(zip(z[0::2], z[1::2], strict=True))
            if status == 1:
                raise NotDumpedError(self.source, a, b)
            if status == 3:
                raise flat.broken[a]
            if not self.strategy.serves_lazy:
                raise LazyPageError(self._root.source, a, b)
            # lazy pages a strategy serves: planned below
        requests: list[AnyRequest] = []
        holes: list[tuple[int, int]] = []
        # Parent ranges to punch once read; owed only if the whole plan succeeds.
        dedup: list[tuple[PagesFile, int, int]] | None = [] if self.auto_dedup else None
        self._plan(flat, vaddr, end, dest, requests, holes, dedup, holes_mode)
        if dedup:
            self._root._dedup_pending.extend(dedup)
        return requests, holes

    def _plan(
        self,
        flat: MemoryMap,
        vaddr: int,
        end: int,
        dest: memoryview,
        requests: list[AnyRequest],
        holes: list[tuple[int, int]],
        dedup: list[tuple[PagesFile, int, int]] | None,
        holes_mode: HolesMode = "error",
    ) -> None:
        """Append to `requests` what [vaddr, end) needs (`dest[0]` is at `vaddr`): requests contiguous in
        both file and memory are merged, and a stretch of runs back to back in one pages file with holes
        between them in memory becomes one ScatterRequest (unless holes are errors)."""
        starts, sizes, kinds, offsets = flat.starts, flat.sizes, flat.kinds, flat.offsets
        table, run_depths = flat.table, flat.depths
        count = len(starts)
        i = flat.index_at(vaddr)
        base = pos = vaddr
        target = self.target
        # The request the next piece may extend: its end in the file, and in memory.
        last: ScatterRequest | None = None
        last_end = last_pos = -1
        scatter = holes_mode != "error"
        depths = flat.depths if dedup is not None else None
        while pos < end:
            if i >= count or starts[i] >= end:
                stop = end
                kind = HOLE
            else:
                start = starts[i]
                if start > pos:
                    stop = start
                    kind = HOLE
                else:
                    stop = start + sizes[i]
                    if stop > end:
                        stop = end
                    kind = kinds[i]
                    i += 1
            if kind == PRESENT:
                k = i - 1
                pages = table[run_depths[k]]
                offset = offsets[k] + pos - starts[k]
                if scatter and i < count and starts[i] < end and kinds[i] == PRESENT:
                    j = bisect_left(starts, end, i, flat.file_runs()[k])
                    if j > i:
                        # Runs back to back in one file follow within the range: one file range, many
                        # pieces of memory (offsets and lengths by slicing: no per-piece Python).
                        offs = [pos - base]
                        offs += map((-base).__add__, starts[i:j])  # C-level iteration
                        lens = [stop - pos]
                        lens += sizes[i:j]
                        stretch_end = starts[j - 1] + sizes[j - 1]
                        if stretch_end > end:
                            lens[-1] -= stretch_end - end
                            stretch_end = end
                        if holes_mode == "zero":
                            for n in range(len(offs) - 1):
                                if offs[n] + lens[n] < offs[n + 1]:
                                    holes.append((base + offs[n] + lens[n], base + offs[n + 1]))
                        last = ScatterRequest(pages, offset, dest, offs, lens, base, target)  # type: ignore[arg-type]
                        requests.append(last)
                        total = sum(lens)
                        if depths is not None and depths[k]:
                            dedup.append((pages, offset, total))  # type: ignore[union-attr,arg-type]
                        last_end = offset + total
                        last_pos = pos = stretch_end
                        i = j
                        continue
                n = stop - pos
                if last is not None and last.pages is pages and last_end == offset:
                    # Continues the previous piece in the file: same request (same iovec if adjacent in memory).
                    if last_pos == pos:
                        last.lengths[-1] += n
                    else:
                        last.dest_offsets.append(pos - base)
                        last.lengths.append(n)
                else:
                    last = ScatterRequest(pages, offset, dest, [pos - base], [n], base, target)  # type: ignore[arg-type]
                    requests.append(last)
                last_end = offset + n
                last_pos = stop
                if depths is not None and depths[k]:
                    dedup.append((pages, offset, n))  # type: ignore[union-attr,arg-type]
            elif kind == LAZY:
                if not self.strategy.serves_lazy:
                    raise LazyPageError(self._root.source, pos, stop)
                requests.append(ReadRequest(None, -1, dest[pos - base : stop - base], pos, target))
                last = None
            elif kind == BROKEN:
                raise flat.broken[i - 1]
            elif holes_mode == "zero":
                holes.append((pos, stop))
                last = None
            elif holes_mode == "error":
                raise NotDumpedError(self.source, pos, stop)
            else:
                last = None
            pos = stop

    # --- reading ---------------------------------------------------------------------------

    def read(self, vaddr: int, length: int) -> bytes:
        """The bytes of [vaddr, vaddr+length)."""
        buf = bytearray(length)
        self.readinto(vaddr, buf)
        return bytes(buf)

    def readinto(self, vaddr: int, buffer: Any, *, defer: bool = False, holes: HolesMode | None = None) -> int:
        """Fill `buffer` with memory from `vaddr`; with `defer`, complete at `sync()`.

        Returns the number of bytes (len of buffer). Errors about the range
        (not dumped, lazy, chain) are raised before any I/O is queued.
        `holes` says what to do where no entry covers the range: "error"
        (NotDumpedError), "zero", or "skip" (leave those bytes of `buffer` as
        they are, like memory that was never written); by default "zero" if
        the reader was made with `zero_fill`, else "error".
        """
        self._check_open()
        holes_mode = self._holes_mode(holes)
        dest = _byte_view(buffer, "readinto")
        observe = self._root._observe
        if observe is not None:
            observe.crit_pageread_before_read(reader=self, vaddr=vaddr, length=len(dest), deferred=defer)
        if not defer and self.strategy.pending:
            # Flush first: the queue's punches must not include this read's parent pages.
            self._root.sync()
        requests, zeros = self._requests(vaddr, dest, holes_mode)
        for start, stop in zeros:
            _zero(dest[start - vaddr : stop - vaddr])
        self._issue(requests, defer)
        if observe is not None and not defer:
            observe.crit_pageread_after_read(reader=self, vaddr=vaddr, data=dest)
        return len(dest)

    def readv(self, iov: Iterable[tuple[int, Any]], *, defer: bool = False, holes: HolesMode | None = None) -> int:
        """Fill each `(vaddr, buffer)` pair like `readinto`, as one batch; returns the bytes.

        The whole batch is planned before any I/O (an error about any range
        reads nothing) and handed to the strategy at once, so a queueing
        strategy merges ranges that are contiguous in a pages file, whatever
        lies between them in memory (CRIU's restore pattern).
        """
        self._check_open()
        holes_mode = self._holes_mode(holes)
        observe = self._root._observe
        if not defer and self.strategy.pending:
            self._root.sync()
        requests: list[AnyRequest] = []
        zero: list[memoryview] = []
        views: list[tuple[int, memoryview]] = []
        total = 0
        pending = self._root._dedup_pending
        mark = len(pending)
        try:
            for vaddr, buffer in iov:
                dest = _byte_view(buffer, "readv")
                if observe is not None:
                    observe.crit_pageread_before_read(reader=self, vaddr=vaddr, length=len(dest), deferred=defer)
                    views.append((vaddr, dest))
                got, zeros = self._requests(vaddr, dest, holes_mode)
                requests.extend(got)
                for start, stop in zeros:
                    zero.append(dest[start - vaddr : stop - vaddr])
                total += len(dest)
        except BaseException:
            del pending[mark:]  # nothing of this batch was read: punch none of it
            raise
        for view in zero:
            _zero(view)
        self._issue(requests, defer)
        if observe is not None and not defer:
            for vaddr, dest in views:
                observe.crit_pageread_after_read(reader=self, vaddr=vaddr, data=dest)
        return total

    def read_packed(self, starts: list[int], ends: list[int], first: int, buffer: Any, *, gap: int = 0,
                    defer: bool = False) -> tuple[int, int]:
        """Read the ranges [starts[k], ends[k]) from k = `first` on into `buffer` one after another, `gap`
        zero bytes after each, as many as fit with their gaps (the first must); returns the index past
        the last range read and the bytes of `buffer` used, gaps included.

        For many short ranges at once (a scan's pack of fragmented memory): the native helper plans
        them in one call, one PlannedRead for the strategy (no Python per range); otherwise, or where
        a range is not all data of this reader's own map (holes, lazy pages, shared mappings of a
        process), it is `readv` of the ranges, with its errors.
        """
        self._check_open()
        dest = _byte_view(buffer, "read_packed")
        fast = native.fastio
        if (fast is not None and not self.auto_dedup and self.strategy.takes_plans
                and self._root._observe is None and 0 <= first < len(starts)):
            if self._map is not None or not self._is_windowed():
                flat = self._map or self.memory_map()
                status, _, _, nxt, used, pieces, addresses, files = fast.pack(
                    flat.starts, flat.sizes, flat.kinds, flat.depths, flat.offsets, flat.table, starts, ends, first,
                    dest, gap)
                if status == 0:
                    if not defer and self.strategy.pending:
                        self._root.sync()
                    if pieces:
                        self._issue([PlannedRead(files, pieces, dest, starts[first], self.target, addresses)], defer)  # type: ignore[list-item]
                    return nxt, used
            else:
                got = self._pack_windows(fast, starts, ends, first, dest, gap)
                if got is not None:
                    planned, nxt, used = got
                    if not defer and self.strategy.pending:
                        self._root.sync()
                    if planned:
                        self._issue(planned, defer)
                    return nxt, used
        iov: list[tuple[int, memoryview]] = []
        gaps: list[int] = []
        used = 0
        k = first
        room = len(dest) - gap
        while k < len(starts):
            n = ends[k] - starts[k]
            if n <= 0:
                raise ValueError("a range is empty or reversed")
            if used + n > room:
                break
            iov.append((starts[k], dest[used : used + n]))
            gaps.append(used + n)
            used += n + gap
            k += 1
        if k == first:
            raise ValueError("the first range and its gap do not fit the buffer")
        self.readv(iov, defer=defer)
        if gap:
            zeros = bytes(gap)
            for at in gaps:
                dest[at : at + gap] = zeros
        return k, used

    def _pack_windows(self, fast: Any, starts: Any, ends: Any, first: int, dest: memoryview, gap: int
                      ) -> tuple[list[Any], int, int] | None:
        """`read_packed`'s native plan over a windowed map: the ranges that end in the window of the next
        range packed at once, window after window while they fit (a PlannedRead per window); None if the
        first window's cannot be planned so (readv then reads them, with their errors)."""
        planned: list[Any] = []
        k, used, n = first, 0, len(starts)
        while k < n and (k == first or ends[k] - starts[k] + gap <= len(dest) - used):
            flat = self._map_over(starts[k], ends[k])
            stop = bisect_right(ends, flat.hi, k)  # the ranges that end in this window
            part = dest[used:]
            status, _, _, nxt, got, pieces, addresses, files = fast.pack(
                flat.starts, flat.sizes, flat.kinds, flat.depths, flat.offsets, flat.table, starts, ends, k,
                part, gap, stop)
            if status != 0:
                if k == first:
                    return None
                break  # the next call plans (or reads) from k on
            if pieces:
                planned.append(PlannedRead(files, pieces, part, starts[k], self.target, addresses))
            k, used = nxt, used + got
            if k < stop:
                break  # the buffer is full
        return planned, k, used

    def _issue(self, requests: list[AnyRequest], defer: bool) -> None:
        """Hand planned requests to the strategy: queued, or read now and what auto-dedup owes punched."""
        strategy = self.strategy
        single = len(requests) == 1 and type(requests[0]) is ReadRequest
        if defer:
            if single:
                strategy.submit(requests[0])  # type: ignore[arg-type]
            else:
                strategy.submit_many(requests)
            return
        try:
            if single:
                strategy.read(requests[0])  # type: ignore[arg-type]
            else:
                strategy.read_many(requests)
        except BaseException:
            self._root._dedup_pending.clear()  # never punch what may not have been read
            raise
        self._root._punch_pending()

    # --- moving bytes elsewhere: planned here, moved by the strategy -------------------------

    def copy_plan(
        self, iov: Iterable[tuple[int, int, int]], holes: HolesMode | None = None
    ) -> tuple[list[CopyRequest], list[tuple[int, int]]]:
        """Plan copies of `(vaddr, length, out_offset)` ranges: the strategy's requests and the holes.

        Requests are in iov order, one per piece contiguous in memory, in one
        pages file and in the output; holes are `(out_offset, length)` pairs,
        returned only with holes="zero" ("error" raises NotDumpedError, "skip"
        drops them). Lazy pieces are requests with `pages` None if the strategy
        serves them, else a LazyPageError. Nothing is read.
        """
        holes_mode = self._holes_mode(holes)
        lazy_ok = self.strategy.serves_lazy
        target = self.target
        requests: list[CopyRequest] = []
        zeros: list[tuple[int, int]] = []
        dedup = self._root._dedup_pending if self.auto_dedup else None
        last: CopyRequest | None = None
        pm = self.pagemap
        win = pm._win
        if win is None:
            starts, sizes, flags, offsets = pm.columns()
            lo, hi = 0, END
        else:
            lo = hi = -1  # a windowed index: the window of each range's start
        pages = self._pages
        for vaddr, length, out in iov:
            if not lo <= vaddr < hi:
                w = win.window_of(vaddr)  # type: ignore[union-attr]
                starts, sizes, flags, offsets = win.window(pm, w)  # type: ignore[union-attr]
                lo, hi = win.limits(w)  # type: ignore[union-attr]
            i = bisect_right(starts, vaddr) - 1
            if i >= 0 and flags[i] & PE_PRESENT and vaddr + length <= starts[i] + sizes[i]:
                # Fast path (most ranges): inside one entry with data in this image.
                if pages is None:
                    pages = self._pages_file()
                offset = offsets[i] + vaddr - starts[i]
                last = _join_copy(requests, last, pages, offset, length, vaddr, target, out)
                continue
            for seg in self.segments(vaddr, length):
                kind = seg.kind
                pos = out + seg.vaddr - vaddr
                if kind == "present":
                    seg_pages = seg.pages
                    assert seg_pages is not None
                    last = _join_copy(requests, last, seg_pages, seg.offset, seg.length, seg.vaddr, target, pos)
                    if dedup is not None and seg.depth:
                        dedup.append((seg_pages, seg.offset, seg.length))
                    continue
                last = None
                if kind == "lazy":
                    if not lazy_ok:
                        raise LazyPageError(self._root.source, seg.vaddr, seg.end)
                    requests.append(CopyRequest(None, -1, seg.length, seg.vaddr, target, pos))
                elif holes_mode == "error":
                    raise NotDumpedError(self.source, seg.vaddr, seg.end)
                elif holes_mode == "zero":
                    zeros.append((pos, seg.length))
        return requests, zeros

    def write_to(
        self, fd: int, iov: Iterable[tuple[int, int, int]], *, holes: HolesMode | None = None, fill: int = 0
    ) -> int:
        """Copy each `(vaddr, length, out_offset)` range of memory to `out_offset` of the regular file `fd`.

        The strategy moves the bytes (`Strategy.write_to`: kernel copies for
        the local strategies). Holes follow `holes` as in `readinto`; "skip"
        leaves the output as it is there (a sparse file keeps its holes).
        `fill` > 0 promises that `fd` reads as zeros where nothing is copied
        (a new file): the strategy may then write zeros over gaps up to `fill`
        bytes between copies, for fewer, larger writes (`Strategy.write_to`).
        Returns the bytes of memory covered (holes included unless skipped).
        """
        self._check_open()
        ranges = list(iov)
        observe = self._root._observe
        if observe is not None:
            for vaddr, length, _ in ranges:
                observe.crit_pageread_before_read(reader=self, vaddr=vaddr, length=length, deferred=False)
        if self.strategy.pending:
            self._root.sync()
        if ranges and observe is None and self._holes_mode(holes) == "skip":
            done = self._write_planned(fd, ranges, fill)
            if done is not None:
                return done
        pending = self._root._dedup_pending
        mark = len(pending)
        try:
            requests, zeros = self.copy_plan(ranges, holes)
        except BaseException:
            del pending[mark:]
            raise
        for out, n in zeros:
            _pwrite_zeros(fd, out, n)
        self._moved(lambda: self._write(requests, fd, fill))
        if observe is not None:
            for vaddr, length, _ in ranges:
                observe.crit_pageread_after_copy(reader=self, vaddr=vaddr, length=length)
        return sum(r.length for r in requests) + sum(n for _, n in zeros)

    def _write_planned(self, fd: int, ranges: list[tuple[int, int, int]], fill: int) -> int | None:
        """`write_to` of ranges that are all data of this reader's own map, planned by the native helper in
        one call and handed to the strategy's `write_plan` (no object per piece); None where it does not
        apply (no helper, auto-dedup, a windowed map, a strategy without `write_plan`, or a range with a
        hole, lazy or broken pages: the caller plans those as usual, with their errors)."""
        fast = native.fastio
        strategy = self.strategy
        if fast is None or not strategy.writes_plans or self.auto_dedup or (self._map is None and self._is_windowed()):
            return None
        vaddrs, lengths, outs = zip(*ranges, strict=True)
        flat = self._map or self.memory_map()
        status, _, _, pieces, files, total = fast.plan_copies(
            flat.starts, flat.sizes, flat.kinds, flat.depths, flat.offsets, flat.table, int64s(vaddrs),
            int64s(lengths), int64s(outs))
        if status:
            return None
        if pieces:
            self._moved(lambda: strategy.write_plan(files, pieces, fd, fill))  # type: ignore[attr-defined]
        return total

    def write_segments(self, fd: int, pieces: Iterable[tuple[Segment, int]], fill: int = 0) -> int:
        """`write_to` for ranges already planned: each `(segment, out_offset)` with a segment from this
        reader's `segments()`, copied to `out_offset` of the regular file `fd`.

        Present segments (and lazy ones, when the strategy serves them) go to
        the strategy's `write_to` (pieces contiguous in a pages file and in the
        output join); holes and lazy pages it cannot serve are skipped. For
        consumers that walk the segments anyway (extract, squash, coredump): no
        second planning pass. `fill` as in `write_to`. Returns the bytes copied.
        """
        self._check_open()
        lazy_ok = self.strategy.serves_lazy
        target = self.target
        requests: list[CopyRequest] = []
        last: CopyRequest | None = None
        dedup = self._root._dedup_pending if self.auto_dedup else None
        mark = len(dedup) if dedup is not None else 0
        for seg, out in pieces:
            vaddr, length, kind, _, pages, offset, _, depth = seg
            if kind == "present":
                last = _join_copy(requests, last, pages, offset, length, vaddr, target, out)  # type: ignore[arg-type]
                if dedup is not None and depth:
                    dedup.append((pages, offset, length))  # type: ignore[arg-type]
            elif kind == "lazy" and lazy_ok:
                last = None
                requests.append(CopyRequest(None, -1, length, vaddr, target, out))
        observe = self._root._observe
        if observe is not None:
            try:
                for r in requests:
                    observe.crit_pageread_before_read(reader=self, vaddr=r.vaddr, length=r.length, deferred=False)
            except BaseException:
                if dedup is not None:
                    del dedup[mark:]
                raise
        if self.strategy.pending:
            self._root.sync()
        self._moved(lambda: self._write(requests, fd, fill))
        if observe is not None:
            for r in requests:
                observe.crit_pageread_after_copy(reader=self, vaddr=r.vaddr, length=r.length)
        return sum(r.length for r in requests)

    def _write(self, requests: list[CopyRequest], fd: int, fill: int) -> None:
        # `fill` only when asked: a third-party strategy's write_to may predate the argument.
        if fill:
            self.strategy.write_to(requests, fd, fill)
        else:
            self.strategy.write_to(requests, fd)

    def send(self, out: Sink, vaddr: int, length: int, *, holes: HolesMode | None = None) -> int:
        """Write [vaddr, vaddr+length) in address order to `out`: a socket object (TLS too) or a file
        descriptor (pipe, socket, or a file at its position).

        The strategy moves the bytes (`Strategy.send`: sendfile for the local
        strategies). With holes="zero" holes are sent as zeros; with "skip"
        they are left out of the stream. Returns the bytes sent.
        """
        self._check_open()
        observe = self._root._observe
        if observe is not None:
            observe.crit_pageread_before_read(reader=self, vaddr=vaddr, length=length, deferred=False)
        if self.strategy.pending:
            self._root.sync()
        pending = self._root._dedup_pending
        mark = len(pending)
        try:
            requests, zeros = self.copy_plan([(vaddr, length, 0)], holes)
        except BaseException:
            del pending[mark:]
            raise
        strategy = self.strategy

        def move() -> None:
            if not zeros:
                strategy.send(requests, out)
                return
            # Requests and zero runs in stream order (both sorted by out_offset).
            items: list[Any] = sorted([*requests, *zeros], key=lambda x: x[0] if type(x) is tuple else x.out_offset)
            group: list[CopyRequest] = []
            for item in items:
                if type(item) is tuple:
                    if group:
                        strategy.send(group, out)
                        group = []
                    for _, n in _zero_chunks(item[1]):
                        write_all(out, _ZEROS[:n])
                else:
                    group.append(item)
            if group:
                strategy.send(group, out)

        self._moved(move)
        if observe is not None:
            observe.crit_pageread_after_copy(reader=self, vaddr=vaddr, length=length)
        return sum(r.length for r in requests) + sum(n for _, n in zeros)

    def view(self, vaddr: int, length: int, scratch: Scratch | None = None) -> View:
        """A read-only view of [vaddr, vaddr+length) for in-place search (close it when done).

        The strategy's view (an mmap window of the pages file for the local
        strategies) when the range is one range of one pages file; otherwise
        (several files, holes, lazy pages) read into `scratch` (or a new
        buffer) like `readinto`. The caller bounds `length`.
        """
        return self.view_ranges([(vaddr, length)], scratch)

    def view_ranges(self, ranges: list[tuple[int, int]], scratch: Scratch | None = None) -> View:
        """A read-only view of several `(vaddr, length)` ranges, their bytes back to back in order.

        In place (the strategy's view) when the ranges lie back to back in one
        pages file, as the entries of a fragmented dump do; else read like
        `readv` into `scratch` (or a new buffer).
        """
        self._check_open()
        pending = self._root._dedup_pending
        mark = len(pending)
        iov, pos = [], 0
        for vaddr, length in ranges:
            iov.append((vaddr, length, pos))
            pos += length
        total = pos
        try:
            requests, zeros = self.copy_plan(iov)
        except CritPageReadError:
            requests, zeros = [], [(0, 0)]  # readv below raises it again, or zeroes what it may
        # A view of parent pages that auto-dedup punches would show the punched zeros: those are copied.
        if not zeros and requests and not self.auto_dedup and all(r.pages is not None for r in requests):
            return self._view(requests, ranges, scratch)
        del pending[mark:]  # readv plans (and owes) its own
        buf = scratch if scratch is not None and len(scratch) >= total else bytearray(total)
        dest = memoryview(buf)
        self.readv([(vaddr, dest[at : at + length]) for (vaddr, length, at) in iov])
        return View(buf, 0, total)

    def view_segments(self, segments: list[Segment], scratch: Scratch | None = None) -> View:
        """`view_ranges` for ranges already planned: segments from this reader's `segments()` (present ones,
        lazy ones if the strategy serves them), their bytes back to back in order.

        The segments go to the strategy's view as they are (pieces contiguous
        in a pages file and in memory join): no second planning pass. For
        consumers that walk the segments anyway (grep). A hole, or a lazy
        segment the strategy cannot serve, is an error.
        """
        self._check_open()
        lazy_ok = self.strategy.serves_lazy
        target = self.target
        requests: list[CopyRequest] = []
        last: CopyRequest | None = None
        pos = 0
        parent_pages = False
        for seg in segments:
            kind = seg.kind
            if kind == "present":
                last = _join_copy(requests, last, seg.pages, seg.offset, seg.length, seg.vaddr, target, pos)  # type: ignore[arg-type]
                if seg.depth:
                    parent_pages = True
            elif kind == "lazy" and lazy_ok:
                last = None
                requests.append(CopyRequest(None, -1, seg.length, seg.vaddr, target, pos))
            elif kind == "lazy":
                raise LazyPageError(self._root.source, seg.vaddr, seg.end)
            else:
                raise NotDumpedError(self.source, seg.vaddr, seg.end)
            pos += seg.length
        if parent_pages and self.auto_dedup:
            # A view of parent pages that auto-dedup punches would show the punched zeros: copied (and
            # punched once read).
            buf = scratch if scratch is not None and len(scratch) >= pos else bytearray(pos)
            dest = memoryview(buf)
            self.readv([(r.vaddr, dest[r.out_offset : r.out_offset + r.length]) for r in requests])
            return View(buf, 0, pos)
        return self._view(requests, None, scratch)

    def _view(self, requests: list[CopyRequest], ranges: list[tuple[int, int]] | None,
              scratch: Scratch | None) -> View:
        """The strategy's view of planned `requests`; observers see `ranges` (the requests' own if None)."""
        observe = self._root._observe
        pieces: list[tuple[int, int]] = []
        if observe is not None:
            pieces = ranges if ranges is not None else [(r.vaddr, r.length) for r in requests]
            for vaddr, length in pieces:
                observe.crit_pageread_before_read(reader=self, vaddr=vaddr, length=length, deferred=False)
        if self.strategy.pending:
            self._root.sync()
        view = self._moved(lambda: self.strategy.view(requests, scratch))
        if observe is not None:
            with memoryview(view.data) as data:
                at = view.start
                for vaddr, length in pieces:
                    observe.crit_pageread_after_read(reader=self, vaddr=vaddr, data=data[at : at + length])
                    at += length
        return view

    def _moved(self, op: Any) -> Any:
        """Run a strategy operation and return its result; punch what auto-dedup owes only if it succeeded."""
        try:
            result = op()
        except BaseException:
            self._root._dedup_pending.clear()
            raise
        self._root._punch_pending()
        return result

    def _holes_mode(self, holes: HolesMode | None) -> HolesMode:
        if holes is None:
            return "zero" if self.zero_fill else "error"
        if holes not in _HOLES_MODES:
            raise ValueError(f"holes must be one of {', '.join(_HOLES_MODES)}, not {holes!r}")
        return holes

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
        pending.sort(key=lambda r: (id(r[0]), r[1]))
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
        """Close the reader, and its strategy if it made it; reads still queued in a strategy it owns make
        this an error (call `sync()` first)."""
        if self._closed:
            return
        if self._root is not self:
            return
        self._closed = True
        if not self.owns_strategy:
            return
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
        if exc_type is not None and self.owns_strategy and self.strategy.pending:
            # Already failing: drop the queue rather than mask the error.
            self._closed = True
            self.strategy.close()
            return
        self.close()

    def __repr__(self) -> str:
        return f"<PageReader {self.target} of {self.images.path} via {self.strategy.name}>"


def _join_copy(
    requests: list[CopyRequest],
    last: CopyRequest | None,
    pages: PagesFile,
    offset: int,
    length: int,
    vaddr: int,
    target: Target,
    out: int,
) -> CopyRequest:
    """Extend `last` by a piece that follows it in the pages file, in memory and in the output; else append
    a new request. Returns the request that now ends the list."""
    if (
        last is not None
        and last.pages is pages
        and last.offset + last.length == offset
        and last.vaddr + last.length == vaddr
        and last.out_offset + last.length == out
    ):
        last.length += length
        return last
    new = CopyRequest(pages, offset, length, vaddr, target, out)
    requests.append(new)
    return new


def _byte_view(buffer: Any, what: str) -> memoryview:
    """`buffer` as a writable one-dimensional byte view."""
    dest = memoryview(buffer)
    if dest.readonly:
        raise TypeError(f"{what} needs a writable buffer")
    if dest.format != "B" or dest.ndim != 1:
        dest = dest.cast("B")
    return dest


def _zero_chunks(length: int) -> Iterator[tuple[int, int]]:
    done = 0
    while done < length:
        n = min(length - done, len(_ZEROS))
        yield done, n
        done += n


def _pwrite_zeros(fd: int, pos: int, length: int) -> None:
    for done, n in _zero_chunks(length):
        data = memoryview(_ZEROS)[:n]
        at = pos + done
        while data:
            w = os.pwrite(fd, data, at)
            data = data[w:]
            at += w


def _zero(view: memoryview) -> None:
    done = 0
    while done < len(view):
        n = min(len(view) - done, len(_ZEROS))
        view[done : done + n] = _ZEROS[:n]
        done += n
