"""The pagemap index: entries, their offsets in the pages file, lookup by address.

Built once per pagemap image. Offsets in `pages-<id>.img` advance only on
entries with `PE_PRESENT`, as in CRIU. Both layouts are read: CRIU <= 4.1
keeps the page count in field 2; CRIU >= 4.2 writes 0 there and the count in
the uint64 field 5. The very old `in_parent` bool (field 3) is honoured.
"""

from __future__ import annotations

import _thread
import bisect
import itertools
import operator
import os
import stat
from array import array
from itertools import compress, repeat

from . import TYPE_CHECKING, _paths, native
from .errors import ImageError
from .imagefile import (
    _U32,
    MAX_ENTRY_SIZE,
    MAX_IMAGE_SIZE,
    check_magic,
    decode_varint_fields,
    encode_varint_fields,
    file_kind,
    frame,
    iter_entries,
    open_regular,
    read_image,
)

if TYPE_CHECKING:  # typing, re and pathlib are not imported at start-up
    import re
    from collections.abc import Callable, Iterable, Iterator
    from pathlib import Path
    from typing import Any, NamedTuple, overload

    class _EntryTuple(NamedTuple):
        vaddr: int
        nr_pages: int
        flags: int
        offset: int
        page_size: int
else:
    from collections import namedtuple

    _EntryTuple = namedtuple("PagemapEntry", ("vaddr", "nr_pages", "flags", "offset", "page_size"))

PE_PARENT = 1
PE_LAZY = 2
PE_PRESENT = 4
#: Every PE_* bit CRIU defines; an entry with any other bit is refused.
PE_KNOWN = PE_PARENT | PE_LAZY | PE_PRESENT
FLAG_NAMES = {PE_PARENT: "parent", PE_LAZY: "lazy", PE_PRESENT: "present"}

# Highest user address plus one on any 64-bit Linux (5-level paging): no entry ends past it.
ADDRESS_LIMIT = 1 << 57
LAYOUTS = ("4.1", "4.2")


def flag_names(flags: int) -> str:
    """`present|lazy` style text for a flags word."""
    names = [name for bit, name in FLAG_NAMES.items() if flags & bit]
    unknown = flags & ~(PE_PARENT | PE_LAZY | PE_PRESENT)
    if unknown:
        names.append(f"{unknown:#x}")
    return "|".join(names) or "none"


class PagemapEntry(_EntryTuple):
    """One run of pages: `nr_pages` pages from `vaddr`, with CRIU's PE_* flags.

    `offset` is the byte offset of the run's data in the pages file, or -1 when
    the entry has no data there (no `PE_PRESENT`). A named tuple (vaddr, nr_pages, flags, offset, page_size):
    an index of tens of thousands of entries is built at every open.
    """

    __slots__ = ()

    @property
    def end(self) -> int:
        return self.vaddr + self.nr_pages * self.page_size

    @property
    def size(self) -> int:
        return self.nr_pages * self.page_size

    @property
    def present(self) -> bool:
        return bool(self.flags & PE_PRESENT)

    @property
    def in_parent(self) -> bool:
        return bool(self.flags & PE_PARENT)

    @property
    def lazy(self) -> bool:
        return bool(self.flags & PE_LAZY)


#: The index's column types: int64 vaddr, size in bytes and pages-file offset, uint8 PE_* flags.
INT64, FLAGS = "q", "B"


def int64s(values: Any = ()) -> array[int]:
    """An int64 column (array('q')) of `values`."""
    return array(INT64, values)


class PagemapEntries:
    """A pagemap's entries as a read-only sequence of PagemapEntry, each made when it is asked for
    (the index keeps columns: no object per entry lives on)."""

    __slots__ = ("_pagemap",)

    def __init__(self, pagemap: Pagemap) -> None:
        self._pagemap = pagemap

    def __len__(self) -> int:
        return len(self._pagemap)

    if TYPE_CHECKING:
        @overload
        def __getitem__(self, i: int) -> PagemapEntry: ...
        @overload
        def __getitem__(self, i: slice) -> list[PagemapEntry]: ...

    def __getitem__(self, i: int | slice) -> PagemapEntry | list[PagemapEntry]:
        pm = self._pagemap
        if isinstance(i, slice):
            return [pm._entry(k) for k in range(*i.indices(len(pm)))]
        n = len(pm)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError("pagemap entry index out of range")
        return pm._entry(i)

    def __iter__(self) -> Iterator[PagemapEntry]:
        ps = self._pagemap.page_size
        return itertools.chain.from_iterable(
            map(PagemapEntry, starts, map(ps.__rfloordiv__, sizes), flags, offsets, repeat(ps))
            for starts, sizes, flags, offsets in self._pagemap.chunks())

    def __bool__(self) -> bool:
        return len(self._pagemap) > 0

    def __eq__(self, other: object) -> bool:
        if isinstance(other, PagemapEntries | list | tuple):
            return len(self) == len(other) and all(map(operator.eq, self, other))
        return NotImplemented

    def __repr__(self) -> str:
        return f"<PagemapEntries of {self._pagemap.path}: {len(self)}>"


class Pagemap:
    """A parsed, validated pagemap image and the pages file it names.

    The index is typed columns (array('q') of each entry's vaddr, size in bytes
    and pages-file offset, array('B') of its flags: 25 bytes an entry);
    `entries` is a sequence view of them as PagemapEntry tuples, each made on
    access (a fragmented dump has millions of entries; the reader plans from
    the columns). Past WINDOWED_ABOVE entries the columns are held in windows
    (`windowed`): a table of where each window of about WINDOW_ENTRIES entries
    starts, and the last few windows decoded from the image again when asked
    for (`chunks`, `columns_over`; `columns()` then joins them all).
    """

    def __init__(
        self,
        path: Any,
        pages_id: int,
        entries: list[PagemapEntry] | None,
        layout: str,
        page_size: int,
        starts: Any = None,
        columns: tuple[Any, Any, Any] | None = None,
        windows: _Windows | None = None,
    ) -> None:
        #: The pagemap image as given: a path as text (`path` makes its Path on first use), a Path, or an
        #: `archive.Member` (str() is `ARCHIVE: MEMBER`).
        self._path: Any = path
        self.pages_id = pages_id
        self.layout = layout
        self.page_size = page_size
        if entries is not None:
            starts = [e.vaddr for e in entries]
            columns = ([e.nr_pages * e.page_size for e in entries], [e.flags for e in entries],
                       [e.offset for e in entries])
        #: The index in windows (a pagemap of more than WINDOWED_ABOVE entries), or None: kept whole.
        self._win: _Windows | None = windows
        if windows is not None:
            starts, columns = int64s(), (int64s(), array(FLAGS), int64s())
        assert starts is not None and columns is not None, "Pagemap needs its entries or its columns"
        self._starts: array[int] = starts if type(starts) is array else int64s(starts)
        sizes, flags, offsets = columns
        self._columns: tuple[array[int], array[int], array[int]] = (
            sizes if type(sizes) is array else int64s(sizes),
            flags if type(flags) is array else array(FLAGS, flags),
            offsets if type(offsets) is array else int64s(offsets),
        )
        self._runs: tuple[array[int], array[int]] | None = None
        self._mask = -1
        #: What the loader read as CRIU does but that no CRIU writes (one line each; `check` lists them).
        self.anomalies: list[str] = []

    @property
    def entries(self) -> PagemapEntries:
        """The entries in address order: a sequence view of the columns (each entry made on access)."""
        return PagemapEntries(self)

    def columns(self) -> tuple[array[int], array[int], array[int], array[int]]:
        """The index as columns (the reader's planning works on them, not on entries): each entry's
        vaddr, size in bytes, flags and pages-file offset (-1 without data). Read-only: shared.

        Of a windowed index, every window decoded and joined, not kept (25 bytes an entry, for callers
        off the streaming paths; those take `chunks()`, `columns_over()` or the reader's maps)."""
        if self._win is not None:
            out = (int64s(), int64s(), array(FLAGS), int64s())
            for part in self.chunks():
                for column, got in zip(out, part, strict=True):
                    column += got
            return out
        return (self._starts, *self._columns)

    @property
    def windowed(self) -> bool:
        """The index is held in windows decoded on demand (more than WINDOWED_ABOVE entries), not whole."""
        return self._win is not None

    def chunks(self) -> Iterator[tuple[array[int], array[int], array[int], array[int]]]:
        """The index as `columns()` in parts, in address order: the whole columns, or one window at a time."""
        win = self._win
        if win is None:
            yield self.columns()
            return
        for w in range(len(win.firsts)):
            yield win.window(self, w)

    def bounds(self) -> array[int]:
        """Where the index's windows start, from the second on (empty when it is whole): every one the
        start of an entry."""
        return self._win.firsts[1:] if self._win is not None else int64s()

    def flag_mask(self) -> int:
        """Bit `f` set for each flags word `f` some entry has (which kinds of entries there are)."""
        if self._mask < 0:
            if self._win is not None:
                self._mask = self._win.mask
            else:
                self._mask = _mask_of(self._columns[1])
        return self._mask

    def span(self) -> tuple[int, int] | None:
        """(first vaddr, end of the last entry), or None without entries."""
        if self._win is not None:
            return self._win.firsts[0], self._win.end
        if not self._starts:
            return None
        return self._starts[0], self._starts[-1] + self._columns[0][-1]

    def columns_over(self, lo: int, hi: int) -> tuple[array[int], array[int], array[int], array[int]]:
        """`columns()` of the entries that overlap [lo, hi), copied, the first and the last clipped to it
        (a window of a windowed index as it is, shared, when [lo, hi) is its addresses)."""
        win = self._win
        if win is not None:
            w = win.window_of(lo)
            if win.limits(w) == (lo, hi):
                return win.window(self, w)
        out = (int64s(), int64s(), array(FLAGS), int64s())
        parts: Iterable[tuple[Any, ...]]
        if win is None:
            parts = (self.columns(),)
        else:
            w = win.window_of(lo)
            parts = (win.window(self, k) for k in range(w, len(win.firsts)) if k == w or win.firsts[k] < hi)
        for starts, sizes, flags, offsets in parts:
            i = bisect.bisect_right(starts, lo) - 1
            if i < 0 or starts[i] + sizes[i] <= lo:
                i += 1
            j = bisect.bisect_left(starts, hi, i)
            if i < j:
                for column, got in zip(out, (starts, sizes, flags, offsets), strict=True):
                    column += got[i:j]
        starts, sizes, _, offsets = out
        if starts:
            cut = lo - starts[0]
            if cut > 0:
                starts[0] = lo
                sizes[0] -= cut
                if offsets[0] >= 0:
                    offsets[0] += cut
            over = starts[-1] + sizes[-1] - hi
            if over > 0:
                sizes[-1] -= over
        return out

    @property
    def path(self) -> Path:
        """The pagemap image: a Path, or an `archive.Member`."""
        if isinstance(self._path, _paths.Text):
            self._path = _paths.as_path(self._path)
        return self._path

    @path.setter
    def path(self, value: Any) -> None:
        self._path = value

    @property
    def location(self) -> str:
        """`str(path)`, for messages (no pathlib)."""
        return str(self._path)

    @property
    def pages_path(self) -> Path:
        return _paths.as_path(self._pages_file())

    def _pages_file(self) -> str:
        """`str(pages_path)`: pages-<pages_id>.img beside the pagemap image."""
        return _paths.join(_paths.parent(_paths.text(self._path)), f"pages-{self.pages_id}.img")

    @property
    def present_bytes(self) -> int:
        if self._win is not None:
            return self._win.offsets[-1] - self._win.offsets[0]
        _, sizes, flags, _ = self.columns()
        return sum(compress(sizes, [f & PE_PRESENT for f in flags]))

    def present_runs(self) -> tuple[array[int], array[int]]:
        """Columns for bulk planning: each entry's size in bytes and, per entry, the index past the
        last of the consecutive `PE_PRESENT` entries it is in (its own index if not present).

        Consecutive present entries are back to back in the pages file, so any
        stretch of them is one contiguous file range. Built on first use.
        """
        if self._runs is None:
            _, sizes, flags, _ = self.columns()
            n = len(sizes)
            run_end = int64s(range(n))
            end = n
            for k in range(n - 1, -1, -1):
                if flags[k] & PE_PRESENT:
                    run_end[k] = end
                else:
                    end = k
            self._runs = (sizes, run_end)
        return self._runs

    def _part(self, vaddr: int) -> tuple[int, tuple[array[int], array[int], array[int], array[int]]]:
        """(index of its first entry, columns) of the part of the index that would hold `vaddr`."""
        win = self._win
        if win is None:
            return 0, (self._starts, *self._columns)
        w = win.window_of(vaddr)
        return win.numbers[w], win.window(self, w)

    def index_at(self, vaddr: int) -> int:
        """Index of the first entry whose end is above `vaddr` (len(entries) if none)."""
        base, (starts, sizes, _, _) = self._part(vaddr)
        i = bisect.bisect_right(starts, vaddr) - 1
        if i >= 0 and starts[i] + sizes[i] > vaddr:
            return base + i
        return base + i + 1

    def _entry(self, i: int) -> PagemapEntry:
        win = self._win
        if win is None:
            starts, sizes, flags, offsets = self.columns()
        else:
            w = bisect.bisect_right(win.numbers, i) - 1
            starts, sizes, flags, offsets = win.window(self, w)
            i -= win.numbers[w]
        return PagemapEntry(starts[i], sizes[i] // self.page_size, flags[i], offsets[i], self.page_size)

    def find(self, vaddr: int) -> PagemapEntry | None:
        """The entry that covers `vaddr`, or None."""
        _, (starts, sizes, flags, offsets) = self._part(vaddr)
        i = bisect.bisect_right(starts, vaddr) - 1
        if i >= 0 and starts[i] + sizes[i] > vaddr:
            return PagemapEntry(starts[i], sizes[i] // self.page_size, flags[i], offsets[i], self.page_size)
        return None

    def entries_in(self, start: int, end: int) -> Iterator[PagemapEntry]:
        """Entries that overlap [start, end), in address order."""
        win = self._win
        if win is not None:
            ps = self.page_size
            w = win.window_of(start)
            first = True
            while w < len(win.firsts) and (first or win.firsts[w] < end):
                starts, sizes, flags, offsets = win.window(self, w)
                i = bisect.bisect_right(starts, start) - 1
                if i < 0 or starts[i] + sizes[i] <= start:
                    i += 1
                while i < len(starts) and starts[i] < end:
                    yield PagemapEntry(starts[i], sizes[i] // ps, flags[i], offsets[i], ps)
                    i += 1
                w += 1
                first = False
            return
        starts = self._starts
        i = self.index_at(start)
        n = len(starts)
        while i < n and starts[i] < end:
            yield self._entry(i)
            i += 1

    def __len__(self) -> int:
        if self._win is not None:
            return self._win.numbers[-1]
        return len(self._starts)

    def __iter__(self) -> Iterator[PagemapEntry]:
        return iter(self.entries)


def _mask_of(flags: Any) -> int:
    """Bit `f` set for each flags word `f` (1..PE_KNOWN) in `flags` (bytes-like: memchr per word)."""
    data = flags if isinstance(flags, bytes) else memoryview(flags).cast("B").tobytes()
    return sum(1 << f for f in range(1, PE_KNOWN + 1) if bytes((f,)) in data)


#: Past this many entries a pagemap's index is held in windows, not whole (CRIT_PAGEREAD_WINDOWED_ABOVE in the
#: environment sets it): a sparse table of where each window starts, its entries decoded from the image again
#: when asked for (the native parser, a window at a time), the last WINDOW_CACHE windows kept.
WINDOWED_ABOVE = int(os.environ.get("CRIT_PAGEREAD_WINDOWED_ABOVE", 1 << 20))
#: Entries of a window of a windowed index (CRIT_PAGEREAD_WINDOW_ENTRIES): at least this many, but the last,
#: and fewer than twice as many.
WINDOW_ENTRIES = int(os.environ.get("CRIT_PAGEREAD_WINDOW_ENTRIES", 1 << 14))
#: Windows of an index kept decoded (the least recently used dropped first).
WINDOW_CACHE = 8
#: Past every address: the end of the last window.
END = 1 << 63


class _Windows:
    """A windowed index: per window the vaddr of its first entry, and at its start the entry number, the
    position in the pagemap image, the pages-file offset and the end of the entry before it (each with one
    more item: the totals); the union of the entries' flags; a few windows decoded (`window`)."""

    __slots__ = ("cache", "end", "firsts", "last", "lock", "mask", "numbers", "offsets", "positions", "prev_ends")

    def __init__(self) -> None:
        self.firsts = int64s()
        self.numbers = int64s()
        self.positions = int64s()
        self.offsets = int64s()
        self.prev_ends = int64s()
        self.mask = 0
        self.end = 0
        self.cache: dict[int, tuple[array[int], array[int], array[int], array[int]]] = {}
        self.last: tuple[int, Any] = (-1, None)
        #: Held while the cache changes (extract's writer threads share a reader).
        self.lock = _thread.allocate_lock()

    def window_of(self, vaddr: int) -> int:
        """The window that would hold `vaddr` (the first for addresses below every entry)."""
        w = bisect.bisect_right(self.firsts, vaddr) - 1
        return w if w > 0 else 0

    def limits(self, w: int) -> tuple[int, int]:
        """The addresses window `w` answers for: from its first entry (0 for the first window) up to the
        next window's first (END for the last)."""
        firsts = self.firsts
        return (firsts[w] if w else 0), (firsts[w + 1] if w + 1 < len(firsts) else END)

    def window(self, pagemap: Pagemap, w: int) -> tuple[array[int], array[int], array[int], array[int]]:
        """Window `w`'s columns, decoded from the image if it is not among the last used."""
        last = self.last
        if last[0] == w:
            return last[1]
        with self.lock:
            cache = self.cache
            cols = cache.pop(w, None)
            if cols is None:
                cols = self._decode(pagemap, w)
                while len(cache) >= WINDOW_CACHE:
                    del cache[next(iter(cache))]
            cache[w] = cols
            self.last = (w, cols)
        return cols

    def _decode(self, pagemap: Pagemap, w: int) -> tuple[array[int], array[int], array[int], array[int]]:
        """Parse window `w` from the pagemap image again (it was validated whole when it was loaded)."""
        path = pagemap.location
        at, stop = self.positions[w], self.positions[w + 1]
        fd = open_regular(path)
        try:
            data = os.pread(fd, stop - at, at)
        except OSError as exc:
            raise ImageError(path, f"cannot read pagemap image: {exc.strerror}") from None
        finally:
            os.close(fd)
        count = self.numbers[w + 1] - self.numbers[w]
        fast = native.fastio
        got: Any
        if fast is not None:
            got = fast.parse_pagemap(data, 0, self.offsets[w], pagemap.page_size, ADDRESS_LIMIT, self.prev_ends[w],
                                     pagemap.layout, count)
            if got is not None and (len(got[2]) != count or got[5] != self.offsets[w + 1] or got[6] != len(data)):
                got = None
            cols: tuple[Any, ...] = (int64s(), int64s(), array(FLAGS), int64s())
            if got is not None:
                for column, raw in zip(cols, got[:4], strict=True):
                    column.frombytes(raw)
        else:
            got = _parse_canonical(data, 0, self.offsets[w], pagemap.page_size)
            if got is not None and (len(got[2]) != count or got[5] != self.offsets[w + 1]):
                got = None
            cols = got[:4] if got is not None else ()
        if got is None or cols[0][0] != self.firsts[w] or cols[0][0] < self.prev_ends[w]:
            raise ImageError(path, f"changed while it was read: entries {self.numbers[w] + 1}-{self.numbers[w + 1]} "
                             "are not what they were")
        return cols


#: A pagemap entry as CRIU writes it, framed: a one-byte size (then three zero bytes), vaddr (field 1),
#: nr_pages (field 2; 0 in the 4.2 layout), flags (field 4, below 128) and, in the 4.2 layout, the uint64
#: nr_pages (field 5). A pagemap of such entries only is parsed by one regular-expression pass (DOTALL),
#: compiled on first use (`_patterns`: the native helper parses without it, and re is not imported at start-up).
_CANONICAL_PATTERN = (
    rb"(.)\x00\x00\x00\x08([\x80-\xff]{0,9}[\x00-\x7f])\x10([\x80-\xff]{0,4}[\x00-\x7f])\x20([\x00-\x7f])"
    rb"(?:\x28([\x80-\xff]{0,9}[\x00-\x7f]))?"
)
_CANONICAL: re.Pattern[bytes] | None = None
#: Flag words CRIU accepts (no unknown bit, not present and parent at once).
_VALID_FLAGS = frozenset(f for f in range(1, PE_KNOWN + 1) if f & (PE_PRESENT | PE_PARENT) != PE_PRESENT | PE_PARENT)


def _varint(data: bytes) -> int:
    value = shift = 0
    for byte in data:
        value |= (byte & 0x7F) << shift
        shift += 7
    return value


#: Entries parsed at once by `_parse_canonical` (its lists of matches are the memory it adds).
CHUNK_ENTRIES = 4096
#: Up to CHUNK_ENTRIES canonical entries back to back.
_CHUNK: re.Pattern[bytes] | None = None


def _patterns() -> tuple[re.Pattern[bytes], re.Pattern[bytes]]:
    """(_CANONICAL, _CHUNK), compiled on first use."""
    global _CANONICAL, _CHUNK
    if _CANONICAL is None or _CHUNK is None:
        import re

        _CANONICAL = _CANONICAL or re.compile(_CANONICAL_PATTERN, re.DOTALL)
        _CHUNK = _CHUNK or re.compile(rb"(?:" + _CANONICAL_PATTERN + rb"){1,%d}" % CHUNK_ENTRIES, re.DOTALL)
    return _CANONICAL, _CHUNK


def _addresses(varints: list[bytes]) -> list[int]:
    """Decode address varints; the bytes past the third (bits 21 and up, shared by neighbouring entries)
    once per distinct value, the rest in one comprehension (no call per entry)."""
    if min(map(len, varints)) <= 3:
        return list(map(_varint, varints))
    high = {rest: _varint(rest) << 21 for rest in {v[3:] for v in varints}}
    return [high[v[3:]] | (v[0] & 0x7F) | (v[1] & 0x7F) << 7 | (v[2] & 0x7F) << 14 for v in varints]


def _parse_canonical(data: bytes, pos: int, offset: int, page_size: int) -> tuple[Any, ...] | None:
    """The entries of `data` from `pos` on if every one is canonical (see _CANONICAL) and valid, as
    (starts, sizes, flags, offsets, layout, end offset); None if any is not (the general decoder
    then reads them and names what is wrong). Column by column: no Python loop body per entry;
    CHUNK_ENTRIES entries at a time, so what parsing adds to the index's memory stays bounded. The native
    helper, when built, does the same in one pass in C (crit_pageread/native.py)."""
    fast = native.fastio
    if fast is not None:
        return _parse_native(fast, data, pos, offset, page_size)
    columns = (int64s(), int64s(), array(FLAGS), int64s())
    layout = None
    prev_end = 0
    while pos < len(data):
        chunk = _patterns()[1].match(data, pos)  # up to CHUNK_ENTRIES canonical frames back to back from pos
        if chunk is None:
            return None
        got = _parse_chunk(data, pos, chunk.end(), offset, page_size)
        if got is None or layout not in (None, got[4]) or got[0][0] < prev_end:
            return None
        layout, offset = got[4], got[5]
        prev_end = got[0][-1] + got[1][-1]
        for column, part in zip(columns, got[:4], strict=True):
            column.extend(part)
        pos = chunk.end()
    if layout is None:
        return None
    return (*columns, layout, offset)


def _parse_native(fast: Any, data: bytes, pos: int, offset: int, page_size: int) -> tuple[Any, ...] | None:
    """`_parse_canonical` by the native helper, CHUNK_ENTRIES entries at a time: its columns (bytes) appended
    to the index's arrays."""
    columns = (int64s(), int64s(), array(FLAGS), int64s())
    layout, prev_end = "", 0
    while pos < len(data):
        got = fast.parse_pagemap(data, pos, offset, page_size, ADDRESS_LIMIT, prev_end, layout, CHUNK_ENTRIES)
        if got is None:
            return None
        layout, offset, pos, prev_end = got[4:]
        for column, raw in zip(columns, got[:4], strict=True):
            column.frombytes(raw)
    if not layout:
        return None
    return (*columns, layout, offset)


def _parse_chunk(data: bytes, pos: int, end: int, offset: int, page_size: int) -> tuple[Any, ...] | None:
    """`_parse_canonical` of the frames in data[pos:end]."""
    found = _patterns()[0].findall(data, pos, end)
    if not found:
        return None
    # The size byte must be the payload's (tag bytes, the flags byte, the varints), and the matches must
    # cover the data: else the framing is not what the pattern read.
    if sum(t[0][0] for t in found) + 4 * len(found) != end - pos:
        return None
    if found[0][4]:  # 4.2: field 2 is 0, the page count is field 5
        layout = "4.2"
        if not all(t[2] == b"\x00" and t[4] and t[0][0] == 6 + len(t[1]) + len(t[4]) for t in found):
            return None
        counts = [t[4] for t in found]
    else:
        layout = "4.1"
        if not all(not t[4] and t[0][0] == 4 + len(t[1]) + len(t[2]) for t in found):
            return None
        counts = [t[2] for t in found]
    table = {c: _varint(c) for c in set(counts)}
    nrs = list(map(table.__getitem__, counts))
    flags = [t[3][0] for t in found]
    if not set(flags) <= _VALID_FLAGS or min(nrs) < 1 or (layout == "4.1" and max(nrs) > 0xFFFFFFFF):
        return None
    starts = _addresses([t[1] for t in found])
    by_count = {n: n * page_size for n in table.values()}  # one int object per distinct size
    sizes = list(map(by_count.__getitem__, nrs))
    ends = list(map(operator.add, starts, sizes))
    mask = page_size - 1
    if (any(map(mask.__and__, starts)) or not all(map(operator.le, ends[:-1], starts[1:]))
            or ends[-1] > ADDRESS_LIMIT):
        return None
    present = [f & PE_PRESENT for f in flags]
    cum = list(itertools.accumulate(map(operator.mul, sizes, map(bool, present)), initial=offset))
    offsets = [c if f else -1 for c, f in zip(cum, present, strict=False)]
    return starts, sizes, flags, offsets, layout, cum[-1]


def load_pagemap(
    path: str | os.PathLike[str], page_size: int,
    locate: Callable[[int], tuple[int, int, str] | None] | None = None, *, canonical_fast_path: bool = True,
) -> Pagemap:
    """Parse and validate a pagemap image; check its pages file holds every present page.

    `locate(pages_id)` gives (base, size, name) of the pages file's bytes, or None
    if it is missing (default: the file beside the pagemap, base 0). Entry offsets
    include the base: this is the one place where an archive member's position
    is folded into the offsets every reader, strategy and consumer uses.
    Entries as CRIU writes them are parsed in one pass (`_parse_canonical`);
    any other image entry by entry (`canonical_fast_path=False`: always).
    """
    path = path if hasattr(path, "read_bounded") else _paths.text(path)  # a path as text, or an archive Member
    fast_io = native.fastio
    if canonical_fast_path and fast_io is not None and not hasattr(path, "read_bounded"):
        streamed = _load_streamed(fast_io, path, page_size, locate)
        if streamed is not None:
            return streamed
    data = read_image(path, "PAGEMAP")
    start = check_magic(path, data, "PAGEMAP")
    payloads = iter_entries(path, data, start)
    head = next(payloads, None)
    if head is None:
        raise ImageError(path, "empty pagemap: no pagemap_head entry")
    head_fields = decode_varint_fields(path, head)
    if 1 not in head_fields:
        raise ImageError(path, "pagemap_head has no pages_id")
    pages_id = head_fields[1]
    starts = int64s()
    extent = locate(pages_id) if locate is not None else None
    base = extent[0] if extent is not None else 0
    offset = base
    fast = _parse_canonical(data, start + 4 + len(head), base, page_size) if canonical_fast_path else None
    if fast is not None:
        pagemap = Pagemap(path, pages_id, None, fast[4], page_size, fast[0], (fast[1], fast[2], fast[3]))
        _check_size(pagemap, fast[5], base, locate, extent)
        return pagemap
    prev_end = 0
    layout = "4.1"
    mask = page_size - 1
    append_start = starts.append
    pagemap_anomalies: list[str] = []
    sizes = int64s()
    flag_col = array(FLAGS)
    offsets = int64s()
    append_size, append_flags, append_offset = sizes.append, flag_col.append, offsets.append
    for number, payload in enumerate(payloads, 1):
        f = decode_varint_fields(path, payload)
        if 1 not in f:
            raise ImageError(path, f"entry {number} has no vaddr")
        vaddr = f[1]
        compat = f.get(2, 0)
        if compat > 0xFFFFFFFF:
            raise ImageError(path, f"entry {number} at {vaddr:#x}: compat_nr_pages {compat} does not fit uint32")
        if 5 in f:
            layout = "4.2"
            nr = f[5]
            if compat and compat != nr:
                # CRIU (init_compat_pagemap_entry) takes field 5 when it is there; so do we, and say so.
                pagemap_anomalies.append(
                    f"entry {number} at {vaddr:#x}: compat_nr_pages (field 2) is {compat} but nr_pages "
                    f"(field 5) is {nr}; read as {nr} pages, as CRIU does"
                )
        else:
            nr = compat
        if 4 in f:
            flags = f[4] | (PE_PARENT if f.get(3) else 0)  # as CRIU's init_compat_pagemap_entry
        else:
            flags = PE_PARENT if f.get(3) else PE_PRESENT
        if nr <= 0:
            raise ImageError(path, f"entry {number} at {vaddr:#x} has no pages (nr_pages 0)")
        if flags & ~PE_KNOWN or not flags or flags & (PE_PRESENT | PE_PARENT) == PE_PRESENT | PE_PARENT:
            what = (f"unknown flag bits {flags & ~PE_KNOWN:#x}" if flags & ~PE_KNOWN else
                    "no PE_* flag" if not flags else "both present and in parent")
            raise ImageError(
                path, f"entry {number} at {vaddr:#x}: {what} (flags {flags:#x}; CRIU knows parent 1, lazy 2, present 4)"
            )
        if vaddr & mask:
            raise ImageError(path, f"entry {number} at {vaddr:#x} is not aligned to {page_size}-byte pages")
        end = vaddr + nr * page_size
        if vaddr < prev_end or end > ADDRESS_LIMIT:
            if end > ADDRESS_LIMIT:
                raise ImageError(path, f"entry {number} at {vaddr:#x}: absurd nr_pages {nr}")
            what = "overlaps the previous entry" if starts and vaddr >= starts[-1] else "is out of order"
            raise ImageError(path, f"entry {number} at {vaddr:#x} {what}")
        size = end - vaddr
        if flags & PE_PRESENT:
            append_offset(offset)
            offset += size
        else:
            append_offset(-1)
        append_start(vaddr)
        append_size(size)
        append_flags(flags)
        prev_end = end
    pagemap = Pagemap(path, pages_id, None, layout, page_size, starts, (sizes, flag_col, offsets))
    pagemap.anomalies = pagemap_anomalies
    _check_size(pagemap, offset, base, locate, extent)
    return pagemap


#: Bytes of a pagemap image read at a time by `_load_streamed`.
STREAM_READ = 1 << 20


def _load_streamed(fast: Any, path: Any, page_size: int, locate: Any) -> Pagemap | None:
    """`load_pagemap` of an image file whose entries are all as CRIU writes them, read STREAM_READ bytes at a
    time and parsed as it is read by the native helper (the image is never in memory whole); None for any
    other image (too large, truncated, empty, an entry not canonical): the caller reads it whole and the
    general decoder names what is wrong."""
    fd = open_regular(path)
    try:
        size = os.fstat(fd).st_size
        if size > MAX_IMAGE_SIZE["PAGEMAP"]:
            return None
        done = 0

        def more(data: bytes, pos: int) -> bytes:
            nonlocal done
            try:
                chunk = os.read(fd, min(STREAM_READ, size - done))
            except OSError:
                chunk = b""
            done += len(chunk)
            return data[pos:] + chunk if chunk else data
        data = more(b"", 0)
        start = check_magic(path, data, "PAGEMAP")
        head_size = _U32.unpack_from(data, start)[0] if len(data) >= start + 4 else -1
        if not 0 <= head_size <= MAX_ENTRY_SIZE or len(data) < start + 4 + head_size:
            return None
        head_fields = decode_varint_fields(path, memoryview(data)[start + 4 : start + 4 + head_size])
        if 1 not in head_fields:
            return None
        pages_id = head_fields[1]
        extent = locate(pages_id) if locate is not None else None
        base = extent[0] if extent is not None else 0
        offset = base
        columns: tuple[array[int], ...] | None = (int64s(), int64s(), array(FLAGS), int64s())
        # Where each window starts (all along: past WINDOWED_ABOVE entries the columns are dropped).
        win = _Windows()
        count = min(CHUNK_ENTRIES, WINDOW_ENTRIES)
        layout, prev_end, pos = "", 0, start + 4 + head_size
        n = mark = mask = 0
        while True:
            at, was_offset, was_end = done - len(data) + pos, offset, prev_end
            got = fast.parse_pagemap(data, pos, offset, page_size, ADDRESS_LIMIT, prev_end, layout, count, True)
            if got is None:
                return None
            layout, offset, pos, prev_end = got[4:]
            got_n = len(got[2])
            if got_n:
                if n == 0 or n - mark >= WINDOW_ENTRIES:
                    mark = n
                    win.firsts.append(int.from_bytes(got[0][:8], "little", signed=True))
                    win.numbers.append(n)
                    win.positions.append(at)
                    win.offsets.append(was_offset)
                    win.prev_ends.append(was_end)
                n += got_n
                mask |= _mask_of(got[2])
                if columns is not None:
                    for column, raw in zip(columns, got[:4], strict=True):
                        column.frombytes(raw)
                    if n > WINDOWED_ABOVE:
                        columns = None  # from here on the index is windowed
            if got_n == count:
                continue
            if done >= size:  # all read: entries to its end, or one cut short (the general decoder says so)
                if pos < len(data) or not layout:
                    return None
                break
            grown = more(data, pos)
            if grown is data:
                return None
            data, pos = grown, 0
    finally:
        os.close(fd)
    if columns is not None:
        pagemap = Pagemap(path, pages_id, None, layout, page_size, columns[0], (columns[1], columns[2], columns[3]))
    else:
        win.numbers.append(n)
        win.positions.append(done - len(data) + pos)
        win.offsets.append(offset)
        win.mask, win.end = mask, prev_end
        pagemap = Pagemap(path, pages_id, None, layout, page_size, windows=win)
        pagemap._mask = mask
    _check_size(pagemap, offset, base, locate, extent)
    return pagemap


def _check_size(pagemap: Pagemap, offset: int, base: int, locate: Any, extent: tuple[int, int, str] | None) -> None:
    if locate is None:
        check_pages_size(pagemap, offset)
    else:
        _check_member_size(pagemap, offset - base, extent)


def _check_member_size(pagemap: Pagemap, needed: int, extent: tuple[int, int, str] | None) -> None:
    """`check_pages_size` for a pages file that is a byte range (an archive member): exactly `needed` bytes."""
    if extent is None:
        if needed:
            name = f"pages-{pagemap.pages_id}.img"
            raise ImageError(pagemap.path, f"pages file {name} (pages_id {pagemap.pages_id}) is missing")
        return
    _, size, label = extent
    if size < needed:
        raise ImageError(label, f"short pages file: {size} bytes, {pagemap.path.name} needs {needed}")
    if size > needed:
        raise ImageError(
            label,
            f"pages file is {size} bytes but {pagemap.path.name} accounts for {needed} "
            f"({size - needed} bytes more): an entry dropped or its flags changed would shift every later page",
        )


def check_pages_size(pagemap: Pagemap, needed: int) -> None:
    """The pages file must hold exactly the present pages of its pagemap (as every CRIU-written one does).

    Shorter: pages are missing (CRIU's restore fails too). Longer: CRIU would read
    its offsets and restore, but a longer file is the mark of an edited pagemap (a
    dropped entry, flags changed), which shifts every later entry's data: refused.
    """
    pages = pagemap._pages_file()
    try:
        st = os.stat(pages)
        size = st.st_size
        if not stat.S_ISREG(st.st_mode):
            raise ImageError(pages, f"is {file_kind(st.st_mode)}, not a pages file (a regular file)")
    except FileNotFoundError:
        if not needed:
            return
        raise ImageError(
            pagemap.location, f"pages file {_paths.name(pages)} (pages_id {pagemap.pages_id}) is missing"
        ) from None
    except OSError as exc:
        raise ImageError(pages, f"cannot stat pages file: {exc.strerror}") from None
    if size < needed:
        raise ImageError(pages, f"short pages file: {size} bytes, {_paths.name(pagemap.location)} needs {needed}")
    if size > needed:
        raise ImageError(
            pages,
            f"pages file is {size} bytes but {pagemap.path.name} accounts for {needed} "
            f"({size - needed} bytes more): an entry dropped or its flags changed would shift every later page",
        )


def encode_pagemap(pages_id: int, entries: Iterable[tuple[int, int, int]], layout: str = "4.1") -> bytes:
    """A pagemap image from (vaddr, nr_pages, flags) runs, in the 4.1 or 4.2 layout."""
    return b"".join(encode_pagemap_parts(pages_id, entries, layout))


def encode_entries(vaddrs: array[int], counts: array[int], flags: array[int], layout: str = "4.1") -> bytes:
    """`encode_pagemap`'s entries without the head, from columns (int64 vaddrs and page counts, uint8 flags):
    encoded by the native helper in one call where it is built."""
    fast = native.fastio
    if fast is None:
        parts = encode_pagemap_parts(0, zip(vaddrs, counts, flags, strict=True), layout)
        next(parts)  # the head
        return b"".join(parts)
    if layout not in LAYOUTS:
        raise ValueError(f"unknown pagemap layout {layout!r}")
    return fast.encode_entries(vaddrs, counts, flags, layout == "4.2")


def encode_pagemap_parts(pages_id: int, entries: Iterable[tuple[int, int, int]], layout: str = "4.1"
                         ) -> Iterator[bytes]:
    """`encode_pagemap`'s bytes in parts of CHUNK_ENTRIES entries (what is encoded at once stays bounded)."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown pagemap layout {layout!r}")
    yield frame("PAGEMAP", [encode_varint_fields([(1, pages_id)])])
    part: list[bytes] = []
    size = _U32.pack
    for vaddr, nr, flags in entries:
        if layout == "4.1":
            payload = encode_varint_fields([(1, vaddr), (2, nr), (4, flags)])
        else:
            payload = encode_varint_fields([(1, vaddr), (2, 0), (4, flags), (5, nr)])
        part += (size(len(payload)), payload)
        if len(part) >= 2 * CHUNK_ENTRIES:
            yield b"".join(part)
            part = []
    if part:
        yield b"".join(part)
