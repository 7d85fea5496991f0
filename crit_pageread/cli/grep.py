"""`grep DIR PATTERN`: search the dumped memory of every pid for bytes, a regex or printable strings.

Each run of dumped bytes (adjacent VMAs join, as a secret may cross from a
file mapping into the anonymous page after it) is streamed in 8 MiB chunks into one reused buffer;
consecutive chunks overlap by the longest match (plus the context),
so a match that crosses a page, pagemap-entry or VMA boundary is found once. Every byte comes
through the reader and the configured strategy; runs that lie back to back in a pages file are
searched in place where the strategy can (`PageReader.view_segments`: read-only maps for the local
strategies), all the runs of a window in one search; runs of at most 64 KiB (fragmented memory) are
read many at a time back to back into one buffer and searched together (`Packer`). The search itself
is crit_pageread.search (Hyperscan where installed, else `bytes.find`/`re`) over whole
windows: no per-page work.
"""

from __future__ import annotations

import mmap
import operator
import os
import sys
from bisect import bisect_left, bisect_right
from collections.abc import Callable
from itertools import accumulate

from .. import TYPE_CHECKING
from ..errors import ConfigError
from ..hookspecs import hookimpl
from ..memory import Area, Readers, Span, spans
from ..reader import Segment
from ..search import ENGINES, FAST_HINT, Searcher, SearchError, compile_search, hyperscan_module
from .common import add_common_options, json_dumps, open_from_args, selected_pids
from .fastargs import intermix
from .memscan import Progress, add_vma_filters, mapping_name, vma_filter_from_args
from .progress import before_output

if TYPE_CHECKING:  # not imported at start-up
    import argparse
    from typing import Any

CHUNK = 8 << 20
#: Bytes of a pages file viewed at a time when runs that lie back to back in it are searched: the local
#: strategies map them (populated at map time), large enough that mapping costs less than copying.
STRETCH_WINDOW = 8 << 20
MAX_WINDOW = 1 << 20
#: Search stretch windows in a second thread where the engine releases the GIL and a second CPU is there.
SEARCH_THREAD = True
PRINTABLE = frozenset(range(0x20, 0x7F)) | {9, 10, 13}


@hookimpl
def crit_pageread_add_commands(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "grep",
        help="search checkpointed memory for bytes, a regex or strings",
        description="Search every pid's dumped memory (across page and pagemap-entry boundaries). "
        "Prints pid, vaddr, VMA and mapping per match; exit 0 if something matched, 1 if not.",
    )
    p.add_argument("dir", help="image directory or checkpoint archive")
    p.add_argument("pattern", nargs="?", help="literal bytes (default), a regex with -E, hex with --hex; "
                   "with --strings, only strings that contain it (\"\" for all); optional with -f")
    p.add_argument("-f", "--file", dest="pattern_files", action="append", default=[], metavar="FILE",
                   help="patterns from FILE, one a line (like grep -f); searched at once, with PATTERN if given")
    p.add_argument("--engine", choices=ENGINES, default="auto",
                   help="search engine: hyperscan (the 'fast' extra), python, or auto (hyperscan if installed)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("-E", "--regex", action="store_true", help="PATTERN is a regex over bytes (Python re syntax)")
    mode.add_argument("--hex", action="store_true", help="PATTERN is hex bytes (spaces allowed); matches shown in hex")
    p.add_argument("--strings", action="store_true",
                   help="print printable strings that contain PATTERN, like strings(1)")
    p.add_argument("-n", "--min-len", type=int, default=4, metavar="MIN", help="shortest string for --strings (4)")
    p.add_argument("-i", "--ignore-case", action="store_true", help="ASCII case-insensitive")
    p.add_argument("-C", "--context", type=int, default=0, metavar="N", help="show N bytes before and after")
    p.add_argument("--max-match", type=int, default=4096, metavar="BYTES",
                   help="longest regex/string match found whole across chunk boundaries (4096)")
    add_vma_filters(p)
    add_common_options(p)
    p.set_defaults(func=run)
    # PATTERN is optional (with -f): positionals are parsed wherever they are, as `grep DIR -E PATTERN` needs.
    intermix(p)


class Matcher:
    """The patterns of the command line, compiled once (crit_pageread.search); `window` is the longest
    match it needs whole."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.hex_output = bool(args.hex)
        texts: list[str] = []
        if args.pattern is not None and (args.pattern or not args.strings or not args.pattern_files):
            texts.append(args.pattern)
        for path in args.pattern_files or ():
            texts.extend(_pattern_lines(path))
        if args.pattern is None and not args.pattern_files:
            raise ConfigError("grep: no PATTERN (give one, or -f FILE)")
        patterns: list[bytes] = []
        for text in texts:
            if args.hex:
                try:
                    patterns.append(bytes.fromhex(text.replace(":", " ")))
                except ValueError:
                    raise ConfigError(f"--hex pattern {text!r}: not hex bytes") from None
            else:
                patterns.append(text.encode("utf-8", "surrogateescape"))
        if not args.strings and (not patterns or not all(patterns)):
            raise ConfigError("grep: empty PATTERN (allowed only with --strings)")
        if args.strings and len(patterns) > 1:
            raise ConfigError("grep --strings: one PATTERN only")
        if not 1 <= args.max_match <= MAX_WINDOW:
            raise ConfigError(f"--max-match {args.max_match}: must be 1..{MAX_WINDOW}")
        if args.strings and args.min_len < 1:
            raise ConfigError(f"--min-len {args.min_len}: must be >= 1")
        engine = args.engine
        self.hint: str | None = None
        if engine == "auto" and hyperscan_module() is None:
            self.hint = FAST_HINT
        try:
            self.searcher: Searcher = compile_search(
                patterns, regex=bool(args.regex), ignore_case=bool(args.ignore_case), strings=bool(args.strings),
                min_len=args.min_len, max_match=args.max_match, engine=engine,
            )
        except SearchError as exc:
            what = f"grep -E {texts[0]!r}" if args.regex and len(texts) == 1 else "grep"
            raise ConfigError(f"{what}: {exc}") from None
        self.window = self.searcher.window
        if self.window > MAX_WINDOW:
            raise ConfigError(f"grep: PATTERN longer than {MAX_WINDOW} bytes")
        self.find = self.searcher.find


def _pattern_lines(path: str) -> list[str]:
    """Patterns of a -f FILE: one a line, like grep (a trailing newline ends the last; "-" is stdin)."""
    try:
        if path == "-":
            text = sys.stdin.buffer.read()
        else:
            with open(path, "rb") as f:
                text = f.read(64 << 20)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read patterns: {exc.strerror}") from None
    lines = text.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    if not lines:
        raise ConfigError(f"{path}: no patterns")
    return [line.decode("utf-8", "surrogateescape") for line in lines]


Emit = Callable[[Area, int, bytes, bytes, bytes], None]
#: Runs of at most this many bytes are packed (`Packer`): read many at a time and searched together.
PACK_RUN = 64 << 10
#: Short runs held before they are searched (bounded memory whatever the dump).
PENDING_RUNS = 1 << 16
#: A span's runs taken from its memory maps as lists this many at a time.
SPAN_RUNS = 1 << 14


class ChunkBuffer:
    """The buffers of a search, made on first use: CHUNK bytes that runs are read into, the scratch
    buffers (two) that views of a pages file are read into by strategies that do not map it, and the
    pack buffers (two) that short runs are read into (`Packer`).

    Both are anonymous maps, so page-aligned: the kernel copied into a bytearray (16 bytes past a page
    boundary) at a quarter of the speed on this project's machines.
    """

    def __init__(self) -> None:
        self._buf: mmap.mmap | None = None
        self._scratch: list[mmap.mmap | None] = [None, None]
        self._pack: list[mmap.mmap | None] = [None, None]

    def get(self) -> mmap.mmap:
        if self._buf is None:
            self._buf = mmap.mmap(-1, CHUNK)
        return self._buf

    def pack(self, which: int = 0) -> mmap.mmap:
        """Pack buffer `which` (CHUNK bytes; two: one is read into while the other is searched)."""
        buf = self._pack[which]
        if buf is None:
            buf = self._pack[which] = mmap.mmap(-1, CHUNK)
        return buf

    def scratch(self, size: int, which: int = 0) -> mmap.mmap:
        """Scratch buffer `which` (0 or 1: one is read into while the other is searched)."""
        buf = self._scratch[which]
        if buf is None or len(buf) < size:
            buf = self._scratch[which] = mmap.mmap(-1, size)
        return buf



def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class _Stretch:
    """Runs that lie back to back in one pages file of one reader (a fragmented dump's entries, and the
    runs of consecutive spans): `pieces` are `(vaddr, end, file offset)`, `spans` the span of each,
    `segs` their segments; `last_end` is the file offset where the last match emitted in them ends
    (the next match starts at or after it). The runs and segments before the windows still to search
    or emit are dropped as the search goes on (`trim`): `dropped` runs so far."""

    __slots__ = ("dropped", "f_end", "f_start", "fends", "fstarts", "last_end", "next_ws", "pages", "pieces",
                 "reader", "seg_offsets", "segs", "spans")

    def __init__(self, reader: Any, pages: Any, offset: int) -> None:
        self.reader = reader
        self.pages = pages
        self.pieces: list[tuple[int, int, int]] = []
        self.spans: list[Span] = []
        self.fstarts: list[int] = []
        self.fends: list[int] = []
        self.segs: list[Segment] = []
        self.seg_offsets: list[int] = []
        self.f_start = offset
        self.f_end = offset
        self.last_end = offset
        self.next_ws = offset  # where the next window starts
        self.dropped = 0

    def trim(self, keep: int) -> None:
        """Drop the runs before index `keep` (once there are enough of them to be worth it)."""
        if keep < TRIM_RUNS:
            return
        for column in (self.pieces, self.spans, self.fstarts, self.fends):
            del column[:keep]
        self.dropped += keep

    def trim_segments(self, keep: int) -> None:
        """Drop the segments before index `keep` (as `trim`)."""
        if keep >= TRIM_RUNS:
            del self.segs[:keep]
            del self.seg_offsets[:keep]

    def add(self, span: Span, rs: int, re_: int, offset: int, segs: list[Segment]) -> None:
        self.pieces.append((rs, re_, offset))
        self.spans.append(span)
        self.fstarts.append(offset)
        self.f_end = offset + re_ - rs
        self.fends.append(self.f_end)
        self.segs.extend(segs)
        self.seg_offsets.extend(seg.offset for seg in segs)


#: Runs (and segments) of a stretch dropped at once, when the windows searched have left them behind.
TRIM_RUNS = 1024


class _Window:
    """File bytes [ws, we) of a stretch, viewed as [lo, hi) (`view`), and the runs searched in them:
    `starts`/`ends` index `view.data`; `data[x - map_start]` is the byte at file offset x."""

    __slots__ = ("ends", "hi", "ja", "map_start", "starts", "stretch", "view", "we", "ws")

    def __init__(self, stretch: _Stretch, ws: int, we: int, hi: int, ja: int, view: Any, map_start: int,
                 starts: list[int], ends: list[int]) -> None:
        self.stretch = stretch
        self.ws = ws
        self.we = we
        self.hi = hi
        self.ja = ja
        self.view = view
        self.map_start = map_start
        self.starts = starts
        self.ends = ends


def _search_window(searcher: Searcher, data: Any, starts: list[int], ends: list[int],
                   stop: int) -> list[tuple[int, int]]:
    """The matches `searcher.find_many` finds in the runs, up to the first that starts at `stop`."""
    hits = []
    for i, j in searcher.find_many(data, starts, ends):
        if i >= stop:
            break
        hits.append((i, j))
    return hits


def _search_thread(searcher: Searcher, jobs: Any, done: Any) -> None:
    """Search each `(data, starts, ends, stop)` job in turn; results (or the exception) in order to `done`."""
    while True:
        job = jobs.get()
        if job is None:
            return
        try:
            hits: Any = _search_window(searcher, *job)
        except BaseException as exc:  # handed to the main thread, which raises it
            hits = exc
        done.put(hits)


class Windows:
    """The in-place search: runs that lie back to back in one pages file (a fragmented dump's entries,
    and consecutive spans: `add`) are searched together in views of STRETCH_WINDOW bytes, the segments
    handed to the strategy as planned (`PageReader.view_segments`: an mmap window for the local
    strategies, a read into a buffer for others), one search per window for all its runs
    (`Searcher.find_many`), bounded by each run, so no match crosses from one run into the next (they
    are not adjacent in memory). Matches are emitted in order, by the caller's thread.

    Where the engine releases the GIL while it searches (Hyperscan: `Searcher.thread_copy`) and a second
    CPU is there, a thread searches each window while this one reads the next through the strategy
    (the strategy is only ever called from this thread). The thread searches a window from its first
    byte; if the last match of the window before ends inside it (a match across the window edge), the
    window is searched again here from that match's end, so the matches are exactly those of one
    search after the other.
    """

    def __init__(self, matcher: Matcher, chunk: ChunkBuffer, context: int, emit: Emit, progress: Progress) -> None:
        self.searcher = matcher.searcher
        self.size = matcher.window
        self.context = context
        self.chunk = chunk
        self.emit = emit
        self.progress = progress
        self.found = 0
        self._open: _Stretch | None = None
        self._pending: _Window | None = None
        self._flip = 0
        self._jobs: Any = None
        self._done: Any = None
        self._thread: Any = None
        self._threaded: bool | None = None  # decided at the first window

    def add(self, span: Span, rs: int, re_: int, pages: Any, offset: int, segs: list[Segment]) -> None:
        """Run [rs, re_) of `span`, at `offset` of `pages`, its segments `segs`: searched with the runs
        before it if it follows them in the same pages file."""
        st = self._open
        if st is not None and (span.reader is not st.reader or pages is not st.pages or offset != st.f_end):
            self.end_stretch()
            st = None
        if st is None:
            st = self._open = _Stretch(span.reader, pages, offset)
        st.add(span, rs, re_, offset, segs)
        # Windows whose bytes (and the overlap past them) are all there are searched now, not at the end.
        reach = self.size - 1 + self.context
        while st.next_ws + STRETCH_WINDOW + reach <= st.f_end:
            ws = st.next_ws
            we = st.next_ws = ws + STRETCH_WINDOW
            self._window(st, ws, we, max(st.f_start, ws - self.context), we + reach)

    def end_stretch(self) -> None:
        """Search what is left of the runs added since the last call (the last window may still be being
        searched: `flush`)."""
        st, self._open = self._open, None
        if st is None:
            return
        size = self.size
        context = self.context
        f_start = st.f_start
        f_end = st.f_end
        for ws in range(st.next_ws, f_end, STRETCH_WINDOW):
            we = min(ws + STRETCH_WINDOW, f_end)
            self._window(st, ws, we, max(f_start, ws - context), min(f_end, we + size - 1 + context))

    def flush(self) -> None:
        """Search every run added, and emit the matches (before the caller emits others)."""
        self.end_stretch()
        self._collect()

    def threaded(self) -> bool:
        """Whether searches go to the search thread (started on first use); decided once."""
        if self._threaded is None:
            self._threaded = self._start()
        return self._threaded

    def submit(self, data: Any, starts: list[int], ends: list[int], stop: int) -> None:
        """Hand a search to the thread (`threaded()` must be true, nothing of the windows' own pending)."""
        self._jobs.put((data, starts, ends, stop))

    def result(self) -> list[tuple[int, int]]:
        """The hits of the oldest search handed over (its exception raised here)."""
        hits = self._done.get()
        if isinstance(hits, BaseException):
            raise hits
        return hits

    def _start(self) -> bool:
        helper = self.searcher.thread_copy() if SEARCH_THREAD and _cpus() > 1 else None
        if helper is None:
            return False
        import threading
        from queue import SimpleQueue

        self._jobs, self._done = SimpleQueue(), SimpleQueue()
        self._thread = threading.Thread(target=_search_thread, args=(helper, self._jobs, self._done),
                                        name="crit-pageread grep search", daemon=True)
        self._thread.start()
        return True

    def _view(self, st: _Stretch, lo: int, hi: int, scratch: Any) -> Any:
        """The strategy's view of file bytes [lo, hi) of `st`."""
        offsets = st.seg_offsets
        a = max(0, bisect_right(offsets, lo) - 1)
        b = bisect_left(offsets, hi, a)
        part = st.segs[a:b]
        st.trim_segments(a)  # later windows start further on
        first = part[0]
        if first.offset < lo:
            cut = lo - first.offset
            part[0] = first._replace(vaddr=first.vaddr + cut, length=first.length - cut, offset=lo)
        last = part[-1]
        if last.offset + last.length > hi:
            part[-1] = last._replace(length=hi - last.offset)
        return st.reader.view_segments(part, scratch)

    def _window(self, st: _Stretch, ws: int, we: int, lo: int, hi: int) -> None:
        """Search file bytes [ws, we) of `st` (matches that start there), viewed as [lo, hi)."""
        threaded = self.threaded()
        # Two scratch buffers when threaded: one window is read while the one before is searched.
        which = self._flip
        if threaded:
            self._flip ^= 1
        # Runs before this window's and the pending one's are no longer needed.
        keep = bisect_right(st.fstarts, lo) - 1
        pending = self._pending
        if pending is not None and pending.stretch is st:
            keep = min(keep, pending.ja - st.dropped)
        st.trim(keep)
        # A strategy that maps views maps the window (no copy); others read it into a scratch buffer.
        scratch = None
        if not st.reader.strategy.maps_views:
            scratch = self.chunk.scratch(STRETCH_WINDOW + self.size + 2 * self.context, which)
        view = self._view(st, lo, hi, scratch)
        try:
            map_start = lo - view.start
            ja = bisect_right(st.fstarts, ws) - 1  # the run holding ws: the stretch has no gap in the file
            jb = bisect_left(st.fstarts, we, ja)  # runs that start before we
            starts = [x - map_start for x in st.fstarts[ja:jb]]
            ends = [x - map_start for x in st.fends[ja:jb]]
            starts[0] = max(starts[0], ws - map_start)
            ends[-1] = min(ends[-1], we + self.size - 1 - map_start)  # only the last run reaches past we
            w = _Window(st, ws, we, hi, ja + st.dropped, view, map_start, starts, ends)
        except BaseException:
            view.close()
            raise
        if not threaded:
            self._emit(w, None)
            return
        self._jobs.put((view.data, starts, ends, we - map_start))
        self._collect()
        self._pending = w

    def _collect(self) -> None:
        """Emit the matches of the window the thread searches."""
        w = self._pending
        if w is None:
            return
        self._pending = None
        hits = self._done.get()
        if isinstance(hits, BaseException):
            w.view.close()
            raise hits
        self._emit(w, hits)

    def _emit(self, w: _Window, hits: list[tuple[int, int]] | None) -> None:
        """Emit the window's matches (searched here if `hits` is None or the last match ends inside it)."""
        st = w.stretch
        map_start = w.map_start
        context = self.context
        emit = self.emit
        with w.view as view:
            data = view.data
            found: Any = hits
            if hits is None or st.last_end > w.ws:
                starts = w.starts
                if st.last_end > w.ws:
                    starts = [max(starts[0], st.last_end - map_start), *starts[1:]]
                found = self.searcher.find_many(data, starts, w.ends)
            fstarts, fends, pieces, spans_ = st.fstarts, st.fends, st.pieces, st.spans
            we = w.we
            try:
                for i, j_end in found:
                    s = i + map_start
                    if s >= we:
                        break
                    e = j_end + map_start
                    k = bisect_right(fstarts, s, w.ja - st.dropped) - 1
                    vs, _, fs = pieces[k]
                    before = after = b""
                    if context:
                        before = bytes(data[max(fs, s - context) - map_start : i])
                        after = bytes(data[j_end : min(fends[k], e + context, w.hi) - map_start])
                    vaddr = vs + s - fs
                    emit(spans_[k].area_at(vaddr), vaddr, bytes(data[i:j_end]), before, after)
                    self.found += 1
                    st.last_end = e
            finally:
                close = getattr(found, "close", None)
                if close is not None:
                    close()  # the search's hold on a mapped view goes before the view does
        self.progress.add(we - w.ws)

    def close(self) -> None:
        """Stop the thread (after the window it searches) and release a window not emitted."""
        w, self._pending = self._pending, None
        self._open = None
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join()
            self._thread = None
        if w is not None:
            w.view.close()


def scan_span(span: Span, chunk: ChunkBuffer, matcher: Matcher, context: int, emit: Emit,
              progress: Progress, windows: Windows, packer: Packer) -> int:
    """Search every readable run of `span`; returns the number of matches it emitted itself (`windows`
    and `packer` count and emit theirs: `Windows.flush`, `Packer.flush`).

    Every byte comes through the span's reader and its strategy. The span's
    runs (maximal readable ranges of memory; a match may cross the page,
    entry and VMA boundaries inside one, never a hole) come from its memory
    maps as arrays (`Span.readable_runs`: no object per run). Runs of at most
    PACK_RUN bytes go to `packer` (read many at a time, back to back, and
    searched together). Of the longer ones, those that are one range of one
    pages file are searched in place (`Windows`), with the runs before them
    that lie back to back in that file; the others are read in windows of
    len(buf) bytes that overlap by the longest match plus the context.
    """
    reader = span.reader
    window = matcher.window + context
    found = 0

    def scan_run(rs: int, re_: int) -> None:
        nonlocal found
        windows.flush()  # their matches come first
        buf = chunk.get()
        view = memoryview(buf)
        pos = base = rs
        covered = rs
        while True:
            n = min(len(buf), re_ - base)
            reader.readinto(base, view[:n])
            last = base + n >= re_
            cutoff = n if last else n - window
            last_end = pos - base
            for s, e in matcher.find(buf, pos - base, n):
                if s >= cutoff:
                    break
                before = bytes(buf[max(0, s - context) : s]) if context else b""
                after = bytes(buf[e : min(n, e + context)]) if context else b""
                vaddr = base + s
                emit(span.area_at(vaddr), vaddr, bytes(buf[s:e]), before, after)
                found += 1
                last_end = e
            progress.add(base + n - covered)
            covered = base + n
            if last:
                break
            pos = base + max(cutoff, last_end)
            base = max(rs, pos - context)

    all_starts, all_ends, _ = span.readable_runs()  # int64 arrays: 16 bytes a run
    small = min(PACK_RUN, CHUNK)  # a pack holds at least one run
    cursor: _SegmentCursor | None = None
    for k in range(0, len(all_starts), SPAN_RUNS):  # as lists, SPAN_RUNS at a time
        starts = all_starts[k : k + SPAN_RUNS].tolist()
        ends = all_ends[k : k + SPAN_RUNS].tolist()
        lens = list(map(operator.sub, ends, starts))
        if max(lens) <= small:
            packer.add(span, starts, ends)
            continue
        if cursor is None:
            cursor = _SegmentCursor(span)
        a = 0
        for b in [i for i, n in enumerate(lens) if n > small]:
            if b > a:
                packer.add(span, starts[a:b], ends[a:b])
            a = b + 1
            rs, re_ = starts[b], ends[b]
            packer.flush()  # the runs before it first: matches stay in address order
            pages, offset, segs = cursor.layout(rs, re_)
            if pages is not None:
                windows.add(span, rs, re_, pages, offset, segs)
            else:
                windows.end_stretch()
                scan_run(rs, re_)
        if a < len(starts):
            packer.add(span, starts[a:], ends[a:])
    return found


class _SegmentCursor:
    """The segments of a span, walked once in address order (only where the span has runs longer than
    PACK_RUN: a span of short runs is not walked at all), taken run by run (`layout`)."""

    def __init__(self, span: Span) -> None:
        self._segments = (seg for area in span.areas for seg in area.reader.segments(area.start, area.end - area.start))
        self._next: Segment | None = None

    def layout(self, rs: int, re_: int) -> tuple[Any, int, list[Segment]]:
        """Where readable run [rs, re_) lies: (pages file, offset, its segments) if it is one range of one
        pages file, else (None, -1, [])."""
        segs: list[Segment] = []
        while True:
            seg = self._next if self._next is not None else next(self._segments, None)
            self._next = None
            if seg is None:
                break
            if seg.vaddr + seg.length <= rs:
                continue  # before the run: a hole, unserved lazy pages, or a short run's
            if seg.vaddr >= re_:
                self._next = seg
                break
            segs.append(seg)
        if not segs:
            return None, -1, []
        first = segs[0]
        expect = first.offset
        for seg in segs:
            if seg.kind != "present" or seg.pages is not first.pages or seg.offset != expect:
                return None, -1, []
            expect += seg.length
        return first.pages, first.offset, segs


class Packer:
    """Short runs of one reader (at most PACK_RUN bytes each: fragmented memory, single pages between
    holes), searched CHUNK bytes of them at a time with no Python per run: the reader reads them back to
    back into one buffer (`PageReader.read_packed`: one plan for the strategy) and one `find_many` bounded
    by each run searches them all, so no match crosses from one run into the next (they are not adjacent
    in memory), and a string or `-C` context ends where its run does. Matches are emitted in address
    order, after those of the in-place windows before them (`Windows.flush`)."""

    def __init__(self, matcher: Matcher, chunk: ChunkBuffer, context: int, emit: Emit, progress: Progress,
                 windows: Windows) -> None:
        self.searcher = matcher.searcher
        self.chunk = chunk
        self.context = context
        self.emit = emit
        self.progress = progress
        self.windows = windows
        self.found = 0
        self._starts: list[int] = []
        self._ends: list[int] = []
        self._owners: list[tuple[int, Span]] = []  # (index past its last run, span) per span added

    def add(self, span: Span, starts: list[int], ends: list[int]) -> None:
        """Runs [starts[k], ends[k]) of `span`, in address order after those added before."""
        if self._owners and self._owners[-1][1].reader is not span.reader:
            self.flush()  # one reader's runs per pack
        self._starts += starts
        self._ends += ends
        self._owners.append((len(self._starts), span))
        if len(self._starts) >= PENDING_RUNS:
            self.flush()

    def flush(self) -> None:
        """Search the runs added since the last flush (the in-place windows' matches first). With the search
        thread (`Windows.threaded`), each pack is searched there while the next is read into the other
        pack buffer; the matches are emitted here, in order."""
        starts, ends, owners = self._starts, self._ends, self._owners
        if not starts:
            return
        windows = self.windows
        windows.flush()
        self._starts, self._ends, self._owners = [], [], []
        reader = owners[0][1].reader
        threaded = windows.threaded()
        find_many = self.searcher.find_many
        count = len(starts)
        i = flip = owner = 0  # owner: the index in owners of the last match's span
        pending: tuple[Any, int, list[int], list[int], int] | None = None
        try:
            while True:
                job = None
                if i < count:
                    buf = self.chunk.pack(flip)
                    flip ^= threaded
                    j, used = reader.read_packed(starts, ends, i, buf)
                    pends = list(accumulate(map(operator.sub, ends[i:j], starts[i:j])))
                    pstarts = [0, *pends[:-1]]
                    job = (buf, i, pstarts, pends, used)
                    i = j
                    if not threaded:
                        owner = self._emit(job, find_many(buf, pstarts, pends), starts, owners, owner)
                        continue
                    windows.submit(buf, pstarts, pends, used)
                if pending is not None:
                    done, pending = pending, None
                    owner = self._emit(done, windows.result(), starts, owners, owner)
                if job is None:
                    break
                pending = job
        finally:
            if pending is not None:  # an error while the thread searched: take its answer, so none is left
                try:
                    windows.result()
                except BaseException:  # the error being raised is the one to report
                    pass

    def _emit(self, job: tuple[Any, int, list[int], list[int], int], hits: Any, starts: list[int],
              owners: list[tuple[int, Span]], o: int) -> int:
        """Emit the matches `hits` (offsets in the pack buffer) of one pack; `o` is the index in `owners` of
        the span of the last match before them, and the one of its own last match is returned."""
        buf, first, pstarts, pends, used = job
        context = self.context
        emit = self.emit
        k = 0
        for s, e in hits:
            k = bisect_right(pstarts, s, k) - 1
            vaddr = starts[first + k] + s - pstarts[k]
            while owners[o][0] <= first + k:
                o += 1
            before = bytes(buf[max(pstarts[k], s - context) : s]) if context else b""
            after = bytes(buf[e : min(pends[k], e + context)]) if context else b""
            emit(owners[o][1].area_at(vaddr), vaddr, bytes(buf[s:e]), before, after)
            self.found += 1
        self.progress.add(used)
        return o


def _escape(data: bytes) -> str:
    return "".join(chr(b) if 0x20 <= b < 0x7F and b != 0x5C else f"\\x{b:02x}" for b in data)


def _encode(data: bytes, hex_output: bool) -> tuple[str, str]:
    if not hex_output and all(b in PRINTABLE for b in data):
        return data.decode("ascii"), "text"
    return data.hex(), "hex"


def run(args: argparse.Namespace) -> int:
    matcher = Matcher(args)
    context = args.context
    if not 0 <= context <= MAX_WINDOW:
        raise ConfigError(f"-C {context}: must be 0..{MAX_WINDOW}")
    vfilter = vma_filter_from_args(args)
    out = sys.stdout
    hex_output = matcher.hex_output

    def emit(area: Area, vaddr: int, match: bytes, before: bytes, after: bytes) -> None:
        before_output()  # a progress bar on the terminal is erased before the line
        vma = area.vma
        if args.json:
            text, enc = _encode(match, hex_output)
            obj: dict[str, Any] = {
                "pid": area.pid, "vaddr": vaddr, "start": vma.start, "end": vma.end, "perms": vma.perms,
                "kind": vma.kind, "mapping": mapping_name(area), "match": text, "encoding": enc,
                "length": len(match),
            }
            if context:
                obj["before"] = _encode(before, hex_output)[0] if before else ""
                obj["after"] = _encode(after, hex_output)[0] if after else ""
            out.write(json_dumps(obj) + "\n")
            return
        if hex_output:
            shown = match.hex(" ")
            if context:
                shown = f"{before.hex(' ')} [{shown}] {after.hex(' ')}".strip()
        else:
            shown = _escape(match)
            if context:
                shown = f"{_escape(before)}[{shown}]{_escape(after)}"
        out.write(f"{area.pid}:{vaddr:#x}:{vma.start:x}-{vma.end:x} {vma.perms} {mapping_name(area)}: {shown}\n")

    found = 0
    lazy_skipped = 0
    with open_from_args(args) as images, Readers(images, args.strategy) as readers:
        areas: list[Area] = []
        for pid in selected_pids(images, args):
            for vma in images.vmas(pid):
                clipped = vfilter.clip(vma)
                if clipped is not None:
                    areas.append(readers.area(pid, vma, *clipped))
        total = 0
        for area in areas:
            readable, lazy = area.readable_bytes()  # counted on the memory map: no segment kept
            total += readable
            lazy_skipped += lazy
        progress = Progress("grep", total)
        chunk = ChunkBuffer()
        windows = Windows(matcher, chunk, context, emit, progress)
        packer = Packer(matcher, chunk, context, emit, progress, windows)
        try:
            for span in spans(areas):
                found += scan_span(span, chunk, matcher, context, emit, progress, windows, packer)
            packer.flush()
            windows.flush()
        finally:
            windows.close()
        found += windows.found + packer.found
        progress.finish()
        page_size = images.page_size
    if matcher.hint:
        print(f"crit-pageread: grep: {matcher.hint}", file=sys.stderr)
    if lazy_skipped:
        print(
            f"crit-pageread: grep: {lazy_skipped // page_size} lazy pages not searched "
            "(their data is on a page server; use --strategy remote)",
            file=sys.stderr,
        )
    return 0 if found else 1
