"""`grep DIR PATTERN`: search the dumped memory of every pid for bytes, a regex or printable strings.

Each run of dumped bytes (adjacent VMAs join, as a secret may cross from a
file mapping into the anonymous page after it) is streamed in 8 MiB chunks into one reused buffer;
consecutive chunks overlap by the longest match (plus the context),
so a match that crosses a page, pagemap-entry or VMA boundary is found once. Every byte comes
through the reader and the configured strategy; runs that lie back to back in a pages file are
searched in place where the strategy can (`PageReader.view_segments`: read-only maps for the local
strategies), all the runs of a window in one search. The search itself
is crit_pageread.search (Hyperscan where installed, else `bytes.find`/`re`) over whole
windows: no per-page work.
"""

from __future__ import annotations

import argparse
import json
import mmap
import sys
from bisect import bisect_left, bisect_right
from collections.abc import Callable
from typing import Any

from ..errors import ConfigError
from ..hookspecs import hookimpl
from ..memory import Area, Readers, Span, spans
from ..reader import Segment
from ..search import ENGINES, FAST_HINT, Searcher, SearchError, compile_search, hyperscan_module
from .common import add_common_options, open_from_args, selected_pids
from .memscan import Progress, add_vma_filters, vma_filter_from_args
from .progress import before_output

CHUNK = 8 << 20
#: Bytes of a pages file viewed at a time when runs that lie back to back in it are searched: small enough
#: that the local strategies' view (one positioned read into a reused buffer) stays in the CPU's cache.
STRETCH_WINDOW = 1 << 20
MAX_WINDOW = 1 << 20
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
    p.__class__ = _intermixed(type(p))


def _intermixed(cls: type[argparse.ArgumentParser]) -> type[argparse.ArgumentParser]:
    """`cls` parsing optionals and positionals intermixed (argparse's parse_known_intermixed_args)."""

    class Intermixed(cls):  # type: ignore[valid-type,misc]
        _mixing = False

        def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
            if self._mixing:  # parse_known_intermixed_args calls back here
                return super().parse_known_args(args, namespace)
            self._mixing = True
            try:
                return self.parse_known_intermixed_args(args, namespace)
            finally:
                self._mixing = False

    return Intermixed


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
#: Runs shorter than this are read in batches rather than one by one.
SMALL_RUN = 64 << 10


class ChunkBuffer:
    """The buffers of a search, made on first use: CHUNK bytes that runs are read into, and the scratch
    buffer that views of a pages file are read into by strategies that do not map it.

    Both are anonymous maps, so page-aligned: the kernel copied into a bytearray (16 bytes past a page
    boundary) at a quarter of the speed on this project's machines.
    """

    def __init__(self) -> None:
        self._buf: mmap.mmap | None = None
        self._scratch: mmap.mmap | None = None

    def get(self) -> mmap.mmap:
        if self._buf is None:
            self._buf = mmap.mmap(-1, CHUNK)
        return self._buf

    def scratch(self, size: int) -> mmap.mmap:
        if self._scratch is None or len(self._scratch) < size:
            self._scratch = mmap.mmap(-1, size)
        return self._scratch


def scan_span(span: Span, chunk: ChunkBuffer, matcher: Matcher, context: int, emit: Emit,
              progress: Progress) -> int:
    """Search every readable run of `span`; returns the number of matches.

    Every byte comes through the span's reader and its strategy. The span's
    segments are walked once: runs (maximal readable ranges of memory; a match
    may cross the page, entry and VMA boundaries inside one, never a hole) that
    lie back to back in one pages file (a fragmented dump's entries) are
    searched together in views of STRETCH_WINDOW bytes, the segments handed to
    the strategy as planned (`PageReader.view_segments`: an mmap window for the
    local strategies, a read into a buffer for others), one search per window
    for all its runs (`Searcher.find_many`). Other runs are read in windows of
    len(buf) bytes that overlap by the longest match plus the context; small
    ones are batched into buf.
    """
    reader = span.reader
    window = matcher.window + context
    found = 0

    def scan_run(rs: int, re_: int) -> None:
        nonlocal found
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

    def scan_small(batch: list[tuple[int, int, int]]) -> None:
        """Runs read together into buf with one sync (one preadv per contiguous file range)."""
        nonlocal found
        buf = chunk.get()
        reader.sync()
        for rs, off, n in batch:
            for s, e in matcher.find(buf, off, off + n):
                before = bytes(buf[max(off, s - context) : s]) if context else b""
                after = bytes(buf[e : min(off + n, e + context)]) if context else b""
                vaddr = rs + s - off
                emit(span.area_at(vaddr), vaddr, bytes(buf[s:e]), before, after)
                found += 1
            progress.add(n)

    def window_view(segs: list[Segment], lo: int, hi: int) -> Any:
        """The strategy's view of file bytes [lo, hi) of a stretch whose segments are `segs`."""
        a = max(0, bisect_right(seg_offsets, lo) - 1)
        b = bisect_left(seg_offsets, hi, a)
        part = segs[a:b]
        first = part[0]
        if first.offset < lo:
            cut = lo - first.offset
            part[0] = first._replace(vaddr=first.vaddr + cut, length=first.length - cut, offset=lo)
        last = part[-1]
        if last.offset + last.length > hi:
            part[-1] = last._replace(length=hi - last.offset)
        # A strategy that does not map the pages file reads into this (bounded, reused) buffer.
        return reader.view_segments(part, chunk.scratch(STRETCH_WINDOW + window + context))

    seg_offsets: list[int] = []

    def scan_stretch(pieces: list[tuple[int, int, int]], segs: list[Segment]) -> None:
        """Search of runs that lie back to back in one pages file (`(vaddr, end, file offset)` each, their
        segments `segs`), in views of STRETCH_WINDOW bytes: one search per window over all its runs,
        bounded by each run, so no match crosses from one run into the next (they are not adjacent in
        memory)."""
        nonlocal found, seg_offsets
        find_many = matcher.searcher.find_many
        size = matcher.window
        seg_offsets = [seg.offset for seg in segs]
        fstarts = [p[2] for p in pieces]
        fends = [p[2] + p[1] - p[0] for p in pieces]
        f_start = fstarts[0]
        f_end = fends[-1]
        last_end = f_start
        for ws in range(f_start, f_end, STRETCH_WINDOW):
            we = min(ws + STRETCH_WINDOW, f_end)
            lo = max(f_start, ws - context)
            hi = min(f_end, we + size - 1 + context)
            ja = bisect_right(fstarts, ws) - 1  # the run holding ws: the stretch has no gap in the file
            jb = bisect_left(fstarts, we, ja)  # runs that start before we
            with window_view(segs, lo, hi) as got:
                data = got.data
                map_start = lo - got.start  # data[x - map_start] is the byte at file offset x
                starts = [x - map_start for x in fstarts[ja:jb]]
                ends = [x - map_start for x in fends[ja:jb]]
                starts[0] = max(starts[0], ws - map_start, last_end - map_start)
                ends[-1] = min(ends[-1], we + size - 1 - map_start)  # only the last run reaches past we
                for i, j_end in find_many(data, starts, ends):
                    s = i + map_start
                    if s >= we:
                        break
                    e = j_end + map_start
                    k = bisect_right(fstarts, s, ja) - 1
                    vs, _, fs = pieces[k]
                    before = after = b""
                    if context:
                        before = bytes(data[max(fs, s - context) - map_start : i])
                        after = bytes(data[j_end : min(fends[k], e + context, hi) - map_start])
                    vaddr = vs + s - fs
                    emit(span.area_at(vaddr), vaddr, bytes(data[i:j_end]), before, after)
                    found += 1
                    last_end = e
            progress.add(we - ws)

    # One walk over the span's segments: its runs (maximal readable ranges, across VMA and entry
    # boundaries) and, for a run that is one range of one pages file, where.
    lazy_ok = reader.strategy.serves_lazy
    segs: list[Segment] = []
    runs: list[tuple[int, int, int, Any, int]] = []  # (start, end, index past its last segment, pages, offset)
    start = end = -1
    cur: Any = None
    offset = expect = -1
    for area in span.areas:
        for seg in area.segments():
            kind = seg.kind
            if kind != "present" and not (kind == "lazy" and lazy_ok):
                continue
            if seg.vaddr == end:
                end += seg.length
                if cur is not None and (seg.pages is not cur or seg.offset != expect):
                    cur = None  # this run is not one file range
                expect += seg.length
            else:
                if end > start:
                    runs.append((start, end, len(segs), cur, offset))
                start, end = seg.vaddr, seg.vaddr + seg.length
                cur, offset, expect = seg.pages, seg.offset, seg.offset + seg.length
            segs.append(seg)
    if end > start:
        runs.append((start, end, len(segs), cur, offset))

    # Runs back to back in one pages file are searched together (in place for the local strategies).
    stretch: list[tuple[int, int, int]] = []
    stretch_pages: Any = None
    stretch_end = stretch_first = -1
    first_seg = 0  # index of the run's first segment

    def flush_stretch(upto: int) -> None:
        nonlocal stretch, stretch_pages, stretch_end
        if stretch:
            scan_stretch(stretch, segs[stretch_first:upto])
        stretch, stretch_pages, stretch_end = [], None, -1

    # Small runs that are not one file range (lazy, or across files) are batched into buf, so the
    # cost per run is a deferred read and a search, not a system call of its own.
    batch: list[tuple[int, int, int]] = []
    used = 0
    for rs, re_, past, pages, offset in runs:
        n = re_ - rs
        if pages is not None:
            if batch:
                scan_small(batch)
                batch, used = [], 0
            if pages is not stretch_pages or offset != stretch_end:
                flush_stretch(first_seg)
                stretch_pages, stretch_first = pages, first_seg
            stretch.append((rs, re_, offset))
            stretch_end = offset + n
            first_seg = past
            continue
        flush_stretch(first_seg)
        first_seg = past
        if n >= SMALL_RUN or n > CHUNK:
            if batch:
                scan_small(batch)
                batch, used = [], 0
            scan_run(rs, re_)
            continue
        if used + n > CHUNK:
            scan_small(batch)
            batch, used = [], 0
        reader.readinto(rs, memoryview(chunk.get())[used : used + n], defer=True)
        batch.append((rs, used, n))
        used += n
    if batch:
        scan_small(batch)
    flush_stretch(first_seg)
    return found


def _escape(data: bytes) -> str:
    return "".join(chr(b) if 0x20 <= b < 0x7F and b != 0x5C else f"\\x{b:02x}" for b in data)


def _encode(data: bytes, hex_output: bool) -> tuple[str, str]:
    if not hex_output and all(b in PRINTABLE for b in data):
        return data.decode("ascii"), "text"
    return data.hex(), "hex"


def mapping_name(area: Area) -> str:
    return area.vma.name or f"[{area.vma.kind}]"


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
            out.write(json.dumps(obj) + "\n")
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
            serves_lazy = area.reader.strategy.serves_lazy
            for seg in area.segments():
                if seg.kind == "present" or (seg.kind == "lazy" and serves_lazy):
                    total += seg.length
                elif seg.kind == "lazy":
                    lazy_skipped += seg.length
        progress = Progress("grep", total)
        chunk = ChunkBuffer()
        for span in spans(areas):
            found += scan_span(span, chunk, matcher, context, emit, progress)
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
