"""YARA rules (yara-x) over the memory of checkpoints: one task per checkpoint, run here or anywhere.

A process's VMAs that are adjacent in memory and read by one reader form a
span; each readable run of a span (dumped, or lazy when the strategy serves
it; a run never crosses a hole) is scanned as contiguous memory, so a string
across a page, pagemap-entry or VMA boundary matches. A run longer than the
window is scanned in windows of `window` bytes that overlap by `overlap`
bytes; each window owns the matches that start before the next window does,
so a match of up to `overlap` bytes is found once. Short runs (up to
SMALL_RUN: fragmented memory) of one process are packed, PACK bytes at a time
with SEPARATOR zero bytes between them, and scanned together; a match that
leaves its run is dropped and that run is scanned again alone, so the matches
reported are the ones each run holds. A rule's condition is evaluated per
scan: a run, a window of a long run, or a pack (counts, `all of them`,
offsets and `filesize` refer to that run, window or pack).

Bytes are read through the reader and its strategy into one reused buffer,
and yara-x scans them there: runs up to a window are read several at a time
(BATCH bytes) and each is scanned on its own where it lies (`ScanBuffer`).
`scan_checkpoint` is the task: it takes and returns plain picklable values,
so a process pool or a Dask worker can run it; it never raises for a broken
checkpoint, it returns the error.
"""

from __future__ import annotations

import bisect
import io
import operator
import os
import resource
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from itertools import accumulate, compress, repeat
from pathlib import Path
from typing import Any

from .config import Config
from .errors import ConfigError, CritPageReadError
from .images import CheckpointImages, open_images
from .memory import Area, Span, VmaFilter, spans

INSTALL_HINT = "scan needs yara-x: pip install 'crit-pageread[scan]' (or pip install yara-x)"
DASK_HINT = "--dask needs dask.distributed: pip install 'crit-pageread[scan]' (or pip install 'dask[distributed]')"
#: Bytes scanned at once; longer runs are scanned in overlapping windows.
WINDOW = 16 << 20
#: Bytes shared by consecutive windows: the longest match found across a window edge.
OVERLAP = 64 << 10
#: Matches kept per pattern and window (yara-x stops recording after that many).
MAX_MATCHES = 1000
#: Runs up to this long are packed: read one after another into one buffer, scanned together.
SMALL_RUN = 64 << 10
#: Bytes of short runs scanned at once (a pack).
PACK = 1 << 20
#: Zero bytes between two runs of a pack (where a hole or an unmapped gap is).
SEPARATOR = 16
#: Short runs of a process kept waiting for packing at most (their addresses only).
PENDING_RUNS = 1 << 16
#: Runs of a span handed to the scanner at once (a fragmented VMA has millions).
SPAN_RUNS = 1 << 14
#: Bytes of longer runs (over SMALL_RUN, up to a window) read at once, each then scanned on its own where it lies:
#: fewer, larger reads, and the bytes still in the CPU's cache when yara-x scans them (big, CPU medians of 7:
#: 1 MiB 258 ms, 2 MiB 256, 4 MiB 249, 16 MiB 287; one run a read: 294).
BATCH = 4 << 20
#: Bytes of a match kept for the excerpt.
EXCERPT = 64
RULE_SUFFIXES = (".yar", ".yara")


def yara() -> Any:
    """The yara_x module, or a ConfigError with the install hint."""
    try:
        import yara_x
    except ImportError:
        raise ConfigError(INSTALL_HINT) from None
    return yara_x


# --- rules --------------------------------------------------------------------------------------


def rule_files(paths: Sequence[str]) -> list[Path]:
    """The rule files named: files as given, directories' *.yar/*.yara (sorted, not recursive)."""
    out: list[Path] = []
    for name in paths:
        p = Path(name)
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.suffix in RULE_SUFFIXES and f.is_file())
            if not found:
                raise ConfigError(f"{p}: no .yar or .yara files in this directory")
            out.extend(found)
        elif p.is_file():
            out.append(p)
        else:
            raise ConfigError(f"{p}: no such rules file")
    return out


def compile_rules(paths: Sequence[str]) -> bytes:
    """Compile the rule files into yara-x's serialized form (what every task receives)."""
    yx = yara()
    compiler = yx.Compiler()
    for path in rule_files(paths):
        try:
            source = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read rules: {exc}") from None
        try:
            compiler.add_include_dir(str(path.parent))  # `include "x.yar"` next to the file
            compiler.add_source(source, origin=str(path))
        except yx.CompileError as exc:
            raise ConfigError(f"{path}: {_one_line(str(exc))}") from None
    rules = compiler.build()
    out = io.BytesIO()
    rules.serialize_into(out)
    return out.getvalue()


def _one_line(message: str) -> str:
    """yara-x's multi-line diagnostic as one line: the error and where it is."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    where = next((line[4:] for line in lines if line.startswith("--> ")), "")
    head = lines[0] if lines else "compile error"
    return f"{head} (at {where})" if where else head


_RULES_CACHE: dict[str, Any] = {}


def _rules(blob: bytes) -> Any:
    """Deserialized rules, once per process (a worker runs many tasks with the same rules)."""
    import hashlib

    key = hashlib.sha256(blob).hexdigest()
    rules = _RULES_CACHE.get(key)
    if rules is None:
        _RULES_CACHE.clear()
        rules = _RULES_CACHE[key] = yara().Rules.deserialize_from(io.BytesIO(blob))
    return rules


# --- checkpoints --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """A checkpoint to scan: `name` as the user sees it, `path` what is opened."""

    name: str
    path: str


def _images_dir(p: Path) -> Path | None:
    """The directory of CRIU images `p` is (or holds under `checkpoint/`, as Podman/kubelet lay it out).
    Only a dump has pstree.img: a pre-dump (a chain's parent, inventory and pages only) is not one."""
    for d in (p, p / "checkpoint"):
        if (d / "pstree.img").is_file():
            return d
    return None


def expand_checkpoints(args: Sequence[str]) -> tuple[list[Target], list[tuple[str, str]]]:
    """Checkpoints named by `args` (directories, archives, globs, directories of those), in order,
    each once; and (name, error) for the arguments that name none."""
    import glob

    from .archive import is_archive

    targets: list[Target] = []
    errors: list[tuple[str, str]] = []
    seen: set[str] = set()

    def add(name: str, path: Path) -> None:
        key = os.path.realpath(path)
        if key not in seen:
            seen.add(key)
            targets.append(Target(name, str(path)))

    for arg in args:
        names = sorted(glob.glob(arg)) if glob.has_magic(arg) else [arg]
        if not names:
            errors.append((arg, "no file matches this pattern"))
        for name in names:
            p = Path(name)
            if is_archive(p):
                add(name, p)
                continue
            if not p.is_dir():
                errors.append((name, "no such checkpoint" if not p.exists() else "not a checkpoint archive"))
                continue
            d = _images_dir(p)
            if d is not None:
                add(name, d)
                continue
            found = 0
            for child in sorted(p.iterdir()):
                if child.is_file() and is_archive(child):
                    add(str(child), child)
                    found += 1
                elif child.is_dir() and (cd := _images_dir(child)) is not None:
                    add(str(child), cd)
                    found += 1
            if not found:
                errors.append((name, "no CRIU images (pstree.img) or checkpoint archives in this directory"))
    return targets, errors


# --- the task -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScanOptions:
    """What every task of one scan shares (picklable)."""

    config: Config
    pids: tuple[int, ...] = ()
    vfilter: VmaFilter = field(default_factory=lambda: VmaFilter([], [], None, None))
    window: int = WINDOW
    overlap: int = OVERLAP
    max_matches: int = MAX_MATCHES
    timeout: int = 0


@dataclass(frozen=True)
class Match:
    """One match of one rule's string (identifier None: a rule that matched with no string match)."""

    pid: int
    vaddr: int
    length: int
    rule: str
    namespace: str
    tags: tuple[str, ...]
    metadata: tuple[tuple[str, Any], ...]
    identifier: str | None
    start: int
    end: int
    perms: str
    kind: str
    mapping: str
    data: bytes

    def sort_key(self) -> tuple[Any, ...]:
        return (self.pid, self.vaddr, self.namespace, self.rule, self.identifier or "", self.length)


@dataclass
class CheckpointResult:
    """What a task returns: the matches sorted, the counts, or the error that stopped it."""

    checkpoint: str
    matches: list[Match] = field(default_factory=list)
    error: str | None = None
    pids: int = 0
    spans: int = 0
    bytes: int = 0
    lazy_skipped: int = 0
    seconds: float = 0.0
    #: Peak RSS of the process that ran the task, MiB (ru_maxrss so far).
    peak_rss_mib: float = 0.0
    #: Matches not recorded because a pattern had more than max_matches in a window.
    truncated: bool = False

    @property
    def rules(self) -> int:
        return len({(m.namespace, m.rule) for m in self.matches})


def mapping_name(vma: Any) -> str:
    return str(vma.name) if vma.name else f"[{vma.kind}]"


def scan_checkpoint(target: Target, rules_blob: bytes, options: ScanOptions) -> CheckpointResult:
    """Scan every selected process of one checkpoint; errors come back in the result."""
    t0 = time.perf_counter()
    result = CheckpointResult(target.name)
    scanner: _Scanner | None = None
    try:
        from .plugins import configure

        configure(options.config)
        scanner = _Scanner(_rules(rules_blob), options)
        with open_images(target.path, options.config) as images:
            _scan_images(images, scanner, options, result)
        result.matches.sort(key=Match.sort_key)
        result.truncated = scanner.truncated
    except CritPageReadError as exc:
        result.error = str(exc)
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        result.error = f"{where}{exc.strerror or exc}"
    except Exception as exc:  # one bad checkpoint must not end a fleet scan: report it, go on
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        if scanner is not None:
            scanner.close()  # yara-x's scanner must be freed by the thread that made it (a Dask worker's)
    if result.error is not None:
        result.matches = []
        for prefix in (f"{target.name}: ", f"{target.path}: "):  # the CLI names the checkpoint already
            if result.error.startswith(prefix):
                result.error = result.error[len(prefix) :]
    result.seconds = time.perf_counter() - t0
    result.peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def _scan_images(images: CheckpointImages, scanner: _Scanner, options: ScanOptions, result: CheckpointResult) -> None:
    """Scan each selected process through its own process reader, closed before the next (memory stays that of
    one process's map)."""
    wanted = set(options.pids)
    pids = [p for p in images.pids if not wanted or p in wanted]
    result.pids = len(pids)
    vfilter = options.vfilter
    for pid in pids:
        reader = images.reader(pid, options.config.strategy)
        with reader:
            areas: list[Area] = []
            for vma in images.vmas(pid):
                clipped = vfilter.clip(vma)
                if clipped is not None:
                    areas.append(Area(pid, vma, clipped[0], clipped[1], reader))
            rule_only: set[tuple[str, str]] = set()
            for span in spans(areas):
                result.spans += 1
                starts, ends, lazy = span.readable_runs()  # int64 arrays: 16 bytes a run
                result.lazy_skipped += lazy
                for k in range(0, len(starts), SPAN_RUNS):  # as lists, SPAN_RUNS at a time
                    result.bytes += scanner.scan_runs(span, starts[k : k + SPAN_RUNS].tolist(),
                                                      ends[k : k + SPAN_RUNS].tolist(), result.matches, rule_only)
                del starts, ends
            scanner.flush(result.matches, rule_only)  # the last packs of this process's short runs


class _Scanner:
    """yara-x's scanner over the runs of spans, with one reused buffer (`ScanBuffer`).

    A run longer than SMALL_RUN and up to a window is scanned on its own, but
    read with the process's others: BATCH bytes of them at a time, one after
    another with GAP bytes after each (`PageReader.read_packed`: one plan for
    the strategy), each then scanned where it lies, in address order. A run
    longer than a window is read and scanned window by window. Shorter runs (fragmented memory) are
    packed, with no Python per run: the reader reads PACK bytes of them at
    a time into the window buffer, one after another with SEPARATOR zero
    bytes after each (`PageReader.read_packed`: one plan for the strategy),
    and they are scanned at once. A match that does not lie inside one run (it overlaps a
    separator: in memory it would cross a hole) is dropped, and the run where
    it starts is scanned again on its own, so each run's matches are the ones
    it holds.
    """

    def __init__(self, rules: Any, options: ScanOptions) -> None:
        if options.overlap < 0 or options.window <= options.overlap:
            raise ConfigError(f"window {options.window} must be larger than the overlap {options.overlap}")
        self.scanner = yara().Scanner(rules)
        self.max_matches = options.max_matches
        self.scanner.max_matches_per_pattern(options.max_matches)
        if options.timeout:
            self.scanner.set_timeout(options.timeout)
        self.window = options.window
        self.overlap = options.overlap
        self.buffer: Any = ScanBuffer.take(FIRST + self.window + GAP)
        self.batch = min(BATCH, self.window)
        self.pack_size = min(PACK, self.window)
        self.small = min(SMALL_RUN, self.pack_size - SEPARATOR)
        self.truncated = False
        # Short runs not scanned yet (one process's): their starts and ends, and (index past its last run, span)
        # per span they come from.
        self._starts: list[int] = []
        self._ends: list[int] = []
        self._spans: list[tuple[int, Span]] = []
        # The same for the longer runs up to a window (`_scan_whole`), and the bytes they take in the buffer.
        self._whole_starts: list[int] = []
        self._whole_ends: list[int] = []
        self._whole_spans: list[tuple[int, Span]] = []
        self._whole_bytes = 0

    def close(self) -> None:
        """Drop yara-x's scanner now, in this thread; the buffer is free for the next scanner."""
        self.scanner = None
        if self.buffer is not None:
            self.buffer.give_back()
            self.buffer = None

    def scan_runs(self, span: Span, starts: list[int], ends: list[int], out: list[Match],
                  rule_only: set[tuple[str, str]]) -> int:
        """Scan the readable runs [starts[k], ends[k]) of `span`: longer ones in address order (up to a window
        each: batched with the process's others, read and scanned when a window of them waits; longer than
        a window: now), short ones packed with the process's others (scanned at `flush` or when PENDING_RUNS
        wait); append the matches; return the bytes."""
        if not starts:
            return 0
        lens = list(map(operator.sub, ends, starts))
        small = self.small
        if max(lens) > small:
            window = self.window
            for k in [k for k, n in enumerate(lens) if n > small]:
                if lens[k] > window:
                    self._own(span)
                    self._scan_whole(out, rule_only)  # the runs before it first: scans stay in address order
                    self.scan_run(span, starts[k], ends[k], out, rule_only)
                    continue
                self._whole_starts.append(starts[k])
                self._whole_ends.append(ends[k])
                self._whole_bytes += lens[k] + GAP
            self._own(span)
            if self._whole_bytes >= self.batch:
                self._scan_whole(out, rule_only)
            keep = list(map(operator.le, lens, repeat(small)))
            starts, ends = list(compress(starts, keep)), list(compress(ends, keep))
        if starts:
            self._starts += starts
            self._ends += ends
            self._spans.append((len(self._starts), span))
            if len(self._starts) >= PENDING_RUNS:
                self.flush(out, rule_only)
        return sum(lens)

    def _own(self, span: Span) -> None:
        """Note that the longer runs pending since the last note are `span`'s."""
        n = len(self._whole_starts)
        if n and (not self._whole_spans or self._whole_spans[-1][0] < n):
            self._whole_spans.append((n, span))

    def flush(self, out: list[Match], rule_only: set[tuple[str, str]]) -> None:
        """Scan the pending runs: the longer ones (`_scan_whole`), then the short ones PACK bytes of them at a
        time: the reader lays each pack's runs one after another in the buffer with SEPARATOR zero bytes after
        each (`read_packed`)."""
        self._scan_whole(out, rule_only)
        starts, ends, owners = self._starts, self._ends, self._spans
        if not starts:
            return
        self._starts, self._ends, self._spans = [], [], []
        owner_ends = [e for e, _ in owners]
        reader = owners[0][1].reader
        count = len(starts)
        i = 0
        while i < count:
            pack = self.buffer.view[FIRST : FIRST + self.pack_size]
            j, used = reader.read_packed(starts, ends, i, pack, gap=SEPARATOR)
            results, data = self.buffer.scan(self.scanner, FIRST, used - SEPARATOR)
            if results.matching_rules:
                self._scan_pack(results, data, starts, ends, i, j, owners, owner_ends, out, rule_only)
            i = j

    def _scan_whole(self, out: list[Match], rule_only: set[tuple[str, str]]) -> None:
        """Scan each pending longer run (over SMALL_RUN, up to a window) on its own, reading as many at a time as
        a window holds: one `read_packed` (one plan for the strategy) lays them one after another in the buffer
        with GAP bytes after each, and yara-x scans each where it lies (`ScanBuffer.scan`: no copy)."""
        starts, ends, owners = self._whole_starts, self._whole_ends, self._whole_spans
        if not starts:
            return
        self._whole_starts, self._whole_ends, self._whole_spans, self._whole_bytes = [], [], [], 0
        reader = owners[0][1].reader
        buffer = self.buffer
        scanner = self.scanner
        report = self._report
        count = len(starts)
        i = o = 0
        while i < count:
            room = FIRST + max(self.batch, ends[i] - starts[i]) + GAP
            j, _ = reader.read_packed(starts, ends, i, buffer.view[FIRST:room], gap=GAP)
            at = FIRST
            for k in range(i, j):
                rs, re_ = starts[k], ends[k]
                results, data = buffer.scan(scanner, at, re_ - rs)
                if results.matching_rules:
                    while owners[o][0] <= k:
                        o += 1
                    report(results, data, owners[o][1], rs, rs, re_, out, rule_only)
                at += re_ - rs + GAP
            i = j

    def _scan_pack(self, results: Any, data: bytes, starts: list[int], ends: list[int], i: int, j: int,
                   owners: list[tuple[int, Span]], owner_ends: list[int], out: list[Match],
                   rule_only: set[tuple[str, str]]) -> None:
        """yara-x's `results` over the packed runs i..j-1 (`data`): keep the matches inside one run; scan again
        alone each run where a match starts that leaves it."""
        lens = list(map(operator.sub, ends[i:j], starts[i:j]))
        # offsets[k - i]: where run k starts in the pack (a separator after each)
        offsets = list(accumulate(map(operator.add, lens, repeat(SEPARATOR)), initial=0))
        tainted: set[int] = set()
        found: list[tuple[int, Match]] = []
        for rule, identifier, m in self._matches(results):
            if m is None:
                _rule_only(owners[bisect.bisect_right(owner_ends, i)][1], rule, starts[i], out, rule_only)
                continue
            off = m.offset
            k = bisect.bisect_right(offsets, off) - 1
            inside = off - offsets[k]
            if inside >= lens[k]:
                continue  # starts in a separator: not memory
            if inside + m.length > lens[k]:
                tainted.add(k)  # in memory it would cross a hole: the run is scanned again alone
                continue
            span = owners[bisect.bisect_right(owner_ends, i + k)][1]
            found.append((k, _match(span, rule, identifier, starts[i + k] + inside, m.length,
                                    data[off : off + min(m.length, EXCERPT)])))
        out.extend(m for k, m in found if k not in tainted)
        for k in sorted(tainted):
            a = offsets[k]
            run = data[a : a + lens[k]]  # a copy: the window buffer is scanned again
            span = owners[bisect.bisect_right(owner_ends, i + k)][1]
            self._report(self.scanner.scan(run), run, span, starts[i + k], starts[i + k], ends[i + k], out,
                         rule_only)

    def scan_run(self, span: Span, rs: int, re_: int, out: list[Match], rule_only: set[tuple[str, str]]) -> None:
        """Scan [rs, re_) of `span` (all readable) window by window; append the matches each owns.

        Each window owns [own_start, own_end): up to `overlap` bytes before its end, the rest
        is the next window's. A run's last window is moved back to be a full one when the run is
        long enough.
        """
        reader = span.reader
        window = self.window
        own_start = rs
        while True:
            base = own_start if re_ - own_start >= window else max(rs, re_ - window)
            n = min(window, re_ - base)
            last = base + n >= re_
            own_end = re_ if last else base + n - self.overlap
            reader.readinto(base, self.buffer.view[FIRST : FIRST + n])
            results, data = self.buffer.scan(self.scanner, FIRST, n)
            self._report(results, data, span, base, own_start, own_end, out, rule_only)
            if last:
                return
            own_start = own_end

    def _report(self, results: Any, data: bytes, span: Span, base: int, own_start: int, own_end: int,
                out: list[Match], rule_only: set[tuple[str, str]]) -> None:
        """Append yara-x's matches over `data` (memory from `base`) that start in [own_start, own_end)."""
        for rule, identifier, m in self._matches(results):
            if m is None:
                _rule_only(span, rule, base, out, rule_only)
                continue
            vaddr = base + m.offset
            if own_start <= vaddr < own_end:
                out.append(_match(span, rule, identifier, vaddr, m.length,
                                  data[m.offset : m.offset + min(m.length, EXCERPT)]))

    def _matches(self, results: Any) -> Iterator[tuple[Any, str | None, Any]]:
        """yara-x's string matches in `results` as (rule, identifier, match); (rule, None, None) for a matching
        rule without any (a condition such as `not $a`). Notes a pattern cut at `max_matches`."""
        for rule in results.matching_rules:
            any_match = False
            for pattern in rule.patterns:
                matches = pattern.matches
                if not matches:
                    continue
                any_match = True
                if len(matches) >= self.max_matches:
                    self.truncated = True
                identifier = pattern.identifier
                for m in matches:
                    yield rule, identifier, m
            if not any_match:
                yield rule, None, None


def _rule_only(span: Span, rule: Any, vaddr: int, out: list[Match], rule_only: set[tuple[str, str]]) -> None:
    """A rule that holds with no string match (e.g. `not $a`, `filesize > 0`): reported once per process."""
    key = (rule.namespace, rule.identifier)
    if key not in rule_only:
        rule_only.add(key)
        out.append(_match(span, rule, None, vaddr, 0, b""))


def _match(span: Span, rule: Any, identifier: str | None, vaddr: int, length: int, data: bytes) -> Match:
    area = span.area_at(vaddr)
    vma = area.vma
    return Match(
        pid=area.pid, vaddr=vaddr, length=length, rule=rule.identifier, namespace=rule.namespace,
        tags=tuple(rule.tags), metadata=tuple(rule.metadata), identifier=identifier, start=vma.start,
        end=vma.end, perms=vma.perms, kind=vma.kind, mapping=mapping_name(vma), data=bytes(data),
    )


#: Where a scan's bytes start in the scan buffer: room for a bytes object's header before them (32 bytes on
#: CPython), the data 64-byte aligned (kernel copies to addresses 16 bytes off a 32-byte boundary ran 4x slower).
FIRST = 64
#: Bytes after each run read in a batch (`_Scanner._scan_whole`): its NUL, and the next one's header.
GAP = 64
#: The reference count of a bytes object laid in a scan buffer: it never reaches zero, so it is never freed.
_REFS = 1 << 30
#: Scan buffers not in use, by size (one per scanning thread at most), for the next scanner.
_FREE: dict[int, list[ScanBuffer]] = {}
#: Maps in which yara-x kept a bytes object after its scan: never written again.
_KEPT: list[Any] = []


class _NoScan:
    """A scanner that looks at nothing (`ScanBuffer` counts the references a scan leaves with it)."""

    @staticmethod
    def scan(data: bytes) -> None:
        return None


class ScanBuffer:
    """A page-aligned buffer that the reader fills and yara-x scans in place, reused for every scan.

    yara-x's Python `scan()` takes only `bytes`, and a new bytes object per
    scan costs an allocation, its page faults and one more copy (measured:
    more time than the scan itself). So on CPython the bytes yara-x scans are
    a bytes object laid in the buffer itself: `scan(scanner, at, n)` writes a
    bytes object's header (reference count, type, length `n`) in the 32 bytes
    before `at` and a NUL after the data, and hands that object to yara-x;
    runs read in one batch are each scanned where they lie. The reference
    count never reaches zero, so CPython never frees the object, and the
    buffer's map is never unmapped, not even at exit (`take`/`give_back`
    reuse buffers), so the object is in mapped memory whenever its last
    reference goes. After each scan the
    object must be referenced by nobody else (checked: if yara-x kept it, its
    map is kept as it is, never written again, and the scans from then on
    copy into a new bytes object, as they do where CPython's layout is not
    found).
    """

    def __init__(self, size: int) -> None:
        import mmap

        self.size = size
        self._map: Any = mmap.mmap(-1, size)
        self.view = memoryview(self._map)
        self._expect = -1  # the references a scan leaves on the object: counted on the first (`_calibrate`)
        try:
            self._place = self._placer()
        except (ImportError, ValueError, TypeError):
            self._place = None
        if self._place is not None:
            self._calibrate()

    @classmethod
    def take(cls, size: int) -> ScanBuffer:
        """A free buffer of `size` bytes, or a new one."""
        try:
            return _FREE.get(size, []).pop()
        except IndexError:
            return cls(size)

    def give_back(self) -> None:
        """Free for the next scanner: its pages are released (reading as zeros), its map stays."""
        import mmap

        if hasattr(mmap, "MADV_DONTNEED"):
            self._map.madvise(mmap.MADV_DONTNEED)
        _FREE.setdefault(self.size, []).append(self)

    def _placer(self) -> Any:
        """A function (at, n) -> the bytes object over view[at : at + n], or None where the layout is not
        CPython's."""
        import ctypes
        import struct

        head = bytes.__basicsize__ - 1  # where the bytes start in a bytes object
        header = struct.Struct("nPnn")  # ob_refcnt, ob_type, ob_size, ob_shash
        if sys.implementation.name != "cpython" or header.size != head or head > FIRST:
            return None
        # The map is never unmapped, not even when the interpreter exits: one reference to it is never dropped.
        ctypes.pythonapi.Py_IncRef(ctypes.py_object(self._map))
        base = ctypes.addressof(ctypes.c_char.from_buffer(self._map))
        slot = bytearray(8)
        pointer = ctypes.py_object.from_buffer(slot)  # reads the object whose address is in `slot`
        address = struct.Struct("P")
        view = self.view
        kind = id(bytes)

        def place(at: int, n: int, pack: Any = header.pack_into, put: Any = address.pack_into) -> bytes:
            pack(view, at - head, _REFS, kind, n, -1)
            view[at + n] = 0
            put(slot, 0, base + at - head)
            return pointer.value  # type: ignore[return-value]

        return place

    def _calibrate(self) -> None:
        """Check the layout on this buffer and count the references a scan leaves (Python versions differ)."""
        sample = b"crit-pageread"
        self.view[FIRST : FIRST + len(sample)] = sample
        _, data = self.scan(_NoScan, FIRST, len(sample))
        if not (type(data) is bytes and len(data) == len(sample) and data == sample and data[-1:] == b"d"):
            self._place = None
        del data
        self.view[: FIRST + len(sample) + 1] = bytes(FIRST + len(sample) + 1)

    def scan(self, scanner: Any, at: int, n: int) -> tuple[Any, bytes]:
        """yara-x's results for view[at : at + n] (`at` >= FIRST; view[at + n] is set to 0), and a bytes object
        with those bytes at their offsets (valid until the buffer is next written)."""
        place = self._place
        if place is None:
            data = bytes(self.view[at : at + n])
            return scanner.scan(data), data
        data = place(at, n)
        results = scanner.scan(data)
        refs = sys.getrefcount(data)
        if refs != self._expect:
            self._kept(refs)
        return results, data

    def _kept(self, refs: int) -> None:
        """The first scan's count is the expected one; later, more references mean yara-x kept the object:
        its map is kept as it is, the scans from then on copy (from a new map holding the same bytes)."""
        import mmap

        if self._expect < 0:
            self._expect = refs
            return
        old = self.view
        _KEPT.append(self._map)
        self._place = None
        self._map = mmap.mmap(-1, self.size)
        self.view = memoryview(self._map)
        self.view[:] = old  # the runs of the batch not scanned yet


# --- many checkpoints ---------------------------------------------------------------------------


def run_local(targets: Sequence[Target], rules_blob: bytes, options: ScanOptions,
              jobs: int) -> Iterator[tuple[int, CheckpointResult]]:
    """(index, result) of every target as each finishes, in `jobs` worker processes (inline for 1)."""
    if jobs <= 1 or len(targets) <= 1:
        for i, target in enumerate(targets):
            yield i, scan_checkpoint(target, rules_blob, options)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    # forkserver: workers start from a clean process (no threads of ours or of yara-x forked)
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["crit_pageread.scan"])
    # the rules go to each worker once, not with every task
    with ProcessPoolExecutor(max_workers=min(jobs, len(targets)), mp_context=ctx, initializer=_worker_rules,
                             initargs=(rules_blob,)) as pool:
        futures = {pool.submit(_scan_with_worker_rules, t, options): i for i, t in enumerate(targets)}
        try:
            for fut in as_completed(futures):
                try:
                    res = fut.result()
                except Exception as exc:  # the worker died (killed, out of memory)
                    res = CheckpointResult(targets[futures[fut]].name, error=f"worker failed: {exc}")
                yield futures[fut], res
        except BaseException:
            for fut in futures:
                fut.cancel()
            raise


_WORKER_RULES = b""


def _worker_rules(blob: bytes) -> None:
    global _WORKER_RULES
    _WORKER_RULES = blob


def _scan_with_worker_rules(target: Target, options: ScanOptions) -> CheckpointResult:
    return scan_checkpoint(target, _WORKER_RULES, options)


def run_dask(targets: Sequence[Target], rules_blob: bytes, options: ScanOptions,
             address: str) -> Iterator[tuple[int, CheckpointResult]]:
    """The same tasks on an existing dask.distributed cluster; results as they finish."""
    try:
        from distributed import Client, as_completed
    except ImportError:
        raise ConfigError(DASK_HINT) from None
    try:
        client = Client(address, timeout="10s")
    except (OSError, TimeoutError) as exc:
        raise ConfigError(f"--dask {address}: cannot connect to the scheduler: {exc}") from None
    try:
        [blob] = client.scatter([rules_blob], broadcast=True)
        import uuid

        run_id = uuid.uuid4().hex
        futures = {
            client.submit(scan_checkpoint, t, blob, options, pure=False, key=f"crit-pageread-scan-{i}-{run_id}"): i
            for i, t in enumerate(targets)
        }
        for fut in as_completed(futures):
            try:
                res = fut.result()
            except Exception as exc:  # the worker died or could not import crit_pageread
                res = CheckpointResult(targets[futures[fut]].name, error=f"dask task failed: {exc}")
            yield futures[fut], res
    finally:
        client.close()
