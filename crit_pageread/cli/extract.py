"""`extract DIR -o OUT`: memory to files, one per VMA or one sparse file per pid, with a JSON index.

The bytes go through the reader and its strategy (`PageReader.write_to`): the
local strategies copy them in the kernel (one `copy_file_range` per run
contiguous in a pages file and in the output), several files at once by a
few threads when the strategy allows it (the largest files first; the
index is written meanwhile); pages that were not dumped stay holes. OUT is
built in a temporary directory beside it and renamed into place only when
complete.
"""

from __future__ import annotations

import errno
import operator
import os
import sys
from array import array

from .. import TYPE_CHECKING, _paths
from ..errors import CritPageReadError
from ..hookspecs import hookimpl
from ..memory import Area, Readers
from ..reader import Segment
from .common import add_common_options, atomic_dir, json_dumps, open_from_args, selected_pids
from .memscan import Progress, add_vma_filters, mapping_name, vma_filter_from_args

if TYPE_CHECKING:  # not imported at start-up
    import argparse
    from collections.abc import Callable
    from typing import Any

#: Threads copying files in the kernel at once (the copies are bound by page-cache work, per core).
WRITERS = max(1, min(4, os.cpu_count() or 1))
INDEX = "index.json"
#: Default --min-hole: a gap of up to 4 pages costs less written as zeros than one more write call.
MIN_HOLE = 16 << 10
#: Runs handed to the reader's write_to at once, and written to the index at once (bounds what is planned
#: or encoded in memory: a fragmented VMA has millions of runs).
RUNS_AT_ONCE = 1 << 14


def _bytes_arg(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise _type_error(f"not a number of bytes: {text!r}") from None
    if value < 0:
        raise _type_error(f"must be 0 or more: {text!r}")
    return value


def _type_error(message: str) -> Exception:
    """argparse's ArgumentTypeError (imported only for a bad value: argparse then parses and says why)."""
    import argparse

    return argparse.ArgumentTypeError(message)


@hookimpl
def crit_pageread_add_commands(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "extract",
        help="write memory to files (per VMA or sparse per pid) with a JSON index",
        description="Write the dumped memory to OUT: one raw file per VMA named START-END-PERMS.bin "
        "(--layout vma) or one sparse file per pid with the data at vaddr offsets (--layout sparse). "
        "Pages that were not dumped are holes. OUT/index.json lists what was written.",
    )
    p.add_argument("dir", help="image directory or checkpoint archive")
    p.add_argument("-o", "--output", required=True, help="output directory (must not exist)")
    p.add_argument("--layout", choices=("vma", "sparse"), default="vma", help="one file per VMA, or per pid")
    p.add_argument("--min-hole", type=_bytes_arg, default=MIN_HOLE, metavar="BYTES",
                   help=f"holes shorter than this between small runs of pages are written as zeros: fewer, larger "
                        f"writes, the same bytes, but disk used there (default {MIN_HOLE}; 0: every hole stays "
                        "a hole)")
    add_vma_filters(p)
    add_common_options(p)
    p.set_defaults(func=run)


class _Part:
    """What extract writes of an area: its readable runs (starts, ends: dumped pages, or lazy ones the
    strategy serves; int64 arrays, 16 bytes a run), their bytes, and the lazy pages left out as holes
    (ranges, bytes)."""

    __slots__ = ("_ends", "_starts", "area", "bytes", "empty", "lazy", "lazy_bytes")

    def __init__(self, area: Area) -> None:
        self.area = area
        # From the memory maps by slices: no object per piece (a fragmented dump has millions of them).
        starts, ends, self.lazy_bytes = area.reader.readable_runs(area.start, area.end)
        self.bytes = sum(ends) - sum(starts)
        self.empty = not starts
        # Kept, unless the reader's index is windowed (a huge pagemap): then made again at each use.
        self._starts: array[int] | None = None
        self._ends: array[int] | None = None
        if not area.reader.windowed:
            self._starts, self._ends = array("q", starts), array("q", ends)
        del starts, ends
        self.lazy: list[list[int]] = []
        if self.lazy_bytes:  # rare: where they are, for the index
            self.lazy = _ranges([s for s in area.segments() if s[2] == "lazy"])

    def runs(self) -> tuple[array[int], array[int]]:
        """The readable runs (starts, ends)."""
        if self._starts is not None and self._ends is not None:
            return self._starts, self._ends
        starts, ends, _ = self.area.reader.readable_runs(self.area.start, self.area.end)
        return starts, ends


def _ranges(segs: list[Segment]) -> list[list[int]]:
    """[start, end] of each stretch of `segs` adjacent in memory."""
    out: list[list[int]] = []
    last: list[int] = [-1, -1]
    for seg in segs:
        start = seg[0]
        if last[1] == start:
            last[1] = start + seg[1]
        else:
            last = [start, start + seg[1]]
            out.append(last)
    return out


#: Where a VMA entry's "data" goes in its JSON text (json.dumps escapes the NULs: no name holds it).
_DATA = "\0data\0"


def _vma_json(write: Callable[[str], Any], part: _Part, offset: int) -> None:
    """Write the index entry of `part` as JSON (what json.dumps of it gives), its runs RUNS_AT_ONCE at a time."""
    area = part.area
    vma = area.vma
    entry: dict[str, Any] = {
        "start": area.start, "end": area.end, "perms": vma.perms, "kind": vma.kind, "mapping": mapping_name(area),
        "file_offset": offset, "data": _DATA, "bytes": part.bytes,
    }
    shmid = area.shmid
    if shmid is not None:
        entry["shmem"] = shmid
        entry["shmem_offset"] = area.start - vma.start + vma.pgoff
    if part.lazy:
        entry["lazy_not_written"] = part.lazy
    head, tail = json_dumps(entry).split(json_dumps(_DATA), 1)
    write(head + "[")
    starts, ends = part.runs()
    for k in range(0, len(starts), RUNS_AT_ONCE):
        pairs = json_dumps(list(map(list, zip(starts[k : k + RUNS_AT_ONCE], ends[k : k + RUNS_AT_ONCE], strict=True))))
        write((", " if k else "") + pairs[1:-1])
    write("]" + tail)


class _File:
    """An output file: its name in OUT, pid, size and the parts it holds with their file offsets."""

    __slots__ = ("name", "parts", "pid", "size")

    def __init__(self, name: str, pid: int, size: int, parts: list[tuple[_Part, int]]) -> None:
        self.name = name
        self.pid = pid
        self.size = size
        self.parts = parts

    def write_json(self, write: Callable[[str], Any]) -> None:
        """Write the file's index entry as JSON (json.dumps of {file, pid, size, vmas})."""
        write(json_dumps({"file": self.name, "pid": self.pid, "size": self.size})[:-1] + ', "vmas": [')
        for n, (part, offset) in enumerate(self.parts):
            if n:
                write(", ")
            _vma_json(write, part, offset)
        write("]}")


def _open_out(path: str, size: int) -> int:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        os.ftruncate(fd, size)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EFBIG, errno.EINVAL):
            raise CritPageReadError(
                f"{path}: the output file system cannot hold a file of {size:#x} bytes "
                "(ext4 stops at 16 TiB); use --layout vma or an output on tmpfs, xfs or btrfs"
            ) from None
        raise
    return fd


def run(args: argparse.Namespace) -> int:
    vfilter = vma_filter_from_args(args)
    out = _paths.text(args.output)
    with open_from_args(args) as images, Readers(images, args.strategy) as readers:
        # Plan everything first: a broken image fails here, before OUT exists.
        plans: dict[int, list[_Part]] = {}
        skipped: list[dict[str, Any]] = []
        total = 0
        lazy_bytes = 0
        for pid in selected_pids(images, args):
            plans[pid] = []
            for vma in images.vmas(pid):
                clipped = vfilter.clip(vma)
                if clipped is None:
                    continue
                part = _Part(readers.area(pid, vma, *clipped))
                lazy_bytes += part.lazy_bytes
                if part.empty:
                    area = part.area
                    skipped.append({"pid": pid, "start": area.start, "end": area.end, "perms": vma.perms,
                                    "mapping": mapping_name(area),
                                    "reason": "lazy pages only" if part.lazy_bytes else "no dumped pages"})
                    continue
                plans[pid].append(part)
                total += part.bytes

        files: list[_File] = []
        for pid, parts in plans.items():
            if not parts:
                continue
            if args.layout == "vma":
                for part in parts:
                    area = part.area
                    name = f"pid-{pid}/{area.start:x}-{area.end:x}-{area.vma.perms}.bin"
                    files.append(_File(name, pid, area.end - area.start, [(part, 0)]))
            else:
                files.append(_File(f"pid-{pid}.mem", pid, max(p.area.end for p in parts),
                                   [(p, p.area.start) for p in parts]))
        checkpoint = str(images.archive) if images.archive is not None else images.path_text
        head = {"checkpoint": checkpoint, "layout": args.layout, "page_size": images.page_size, "skipped": skipped,
                "totals": {"files": len(files), "bytes": total}}
        progress = Progress("extract", total)
        # Files whose bytes all come from local pages files are written by WRITERS threads at once when the
        # strategy allows it (the kernel copies release the GIL) and there are two or more, the largest first
        # (one large file alone would otherwise be left for last); the others here, then the index.
        jobs = [(f, f.parts[0][0].area.start if args.layout == "vma" else 0) for f in files]
        threaded = [all(p.area.reader.strategy.concurrent_writes and not p.area.reader.strategy.serves_lazy
                        for p, _ in f.parts) for f, _ in jobs]
        if sum(threaded) < 2:
            threaded = [False] * len(jobs)
        by_size = sorted((job for job, t in zip(jobs, threaded, strict=True) if t),
                         key=lambda job: -sum(p.bytes for p, _ in job[0].parts))
        with atomic_dir(out) as tmp:
            for directory in dict.fromkeys(_paths.parent(f.name) for f in files):
                if directory != ".":
                    os.mkdir(_paths.join(tmp, directory))

            def write_one(job: tuple[_File, int]) -> None:
                f, base = job
                _write_file(_paths.join(tmp, f.name), f.size, [p for p, _ in f.parts], progress, base,
                            args.min_hole)

            writers = _Writers(write_one, by_size, WRITERS) if by_size else None
            try:
                for job, t in zip(jobs, threaded, strict=True):
                    if not t:
                        write_one(job)
                with open(_paths.join(tmp, INDEX), "w") as index_file:
                    write_index(index_file.write, head, files)
                if writers is not None:
                    writers.join()
            finally:
                if writers is not None:
                    writers.stop()
            progress.finish()
    if lazy_bytes:
        print(f"crit-pageread: extract: {lazy_bytes // images.page_size} lazy pages left out as holes "
              "(their data is on a page server; use --strategy remote)", file=sys.stderr)
    if args.json:
        # One line, as print_json writes it: the files' entries written as they are encoded.
        write = sys.stdout.write
        write(json_dumps({"checkpoint": head["checkpoint"], "output": str(out), "layout": args.layout,
                          "page_size": images.page_size})[:-1] + ', "files": [')
        for n, f in enumerate(files):
            if n:
                write(", ")
            f.write_json(write)
        write("], " + json_dumps({"skipped": skipped, "totals": head["totals"]})[1:] + "\n")
    else:
        print(f"{out}: {len(files)} files, {total} bytes of memory"
              + (f", {lazy_bytes // images.page_size} lazy pages left as holes" if lazy_bytes else "")
              + f" (index: {_paths.join(out, INDEX)})")
    return 0


def write_index(write: Callable[[str], Any], head: dict[str, Any], files: list[_File]) -> None:
    """The index as JSON with one line per file, written as it is encoded (an index can list millions of
    ranges): the keys of `head`, then "files"."""
    text = ", ".join(f"{json_dumps(k)}: {json_dumps(v)}" for k, v in head.items())
    if not files:
        write(f'{{{text}, "files": []}}\n')
        return
    write(f'{{{text},\n "files": [\n  ')
    for n, f in enumerate(files):
        if n:
            write(",\n  ")
        f.write_json(write)
    write("\n]}\n")


class _Writers:
    """Threads calling `work` on each of `jobs`, taken in order, `count` at once (concurrent.futures without
    its import, which brings logging: 50 M instructions). `join()` waits for them and raises the first
    error; after an error, or `stop()`, no job is started."""

    def __init__(self, work: Callable[[Any], None], jobs: list[Any], count: int) -> None:
        import threading

        self._work = work
        self._jobs = iter(jobs)
        self._lock = threading.Lock()
        self._error: BaseException | None = None
        self._stopped = False
        self._threads: list[threading.Thread] = [threading.Thread(target=self._run, name=f"extract-writer-{n}")
                                                 for n in range(min(count, len(jobs)))]
        for thread in self._threads:
            thread.start()

    def _run(self) -> None:
        while True:
            with self._lock:
                job = None if self._stopped else next(self._jobs, None)
            if job is None:
                return
            try:
                self._work(job)
            except BaseException as exc:  # handed to join(), in the main thread
                with self._lock:
                    self._stopped = True
                    if self._error is None:
                        self._error = exc
                return

    def stop(self) -> None:
        """Start no more jobs and wait for those running (a Ctrl-C while waiting is let through)."""
        with self._lock:
            self._stopped = True
        for thread in self._threads:
            thread.join()

    def join(self) -> None:
        """Wait for every job; raise the first error of one."""
        for thread in self._threads:
            thread.join()
        if self._error is not None:
            raise self._error


def _write_file(path: str, size: int, parts: list[_Part], progress: Progress, base: int, fill: int = 0) -> None:
    """Write the readable runs of `parts` into a new file of `size` bytes; file offset = vaddr - base.

    The runs go to the reader's `write_to`, so the strategy moves the bytes (for the local strategies one
    kernel copy per large run, small runs through a buffer with holes of at most `fill` bytes between them
    written as zeros: the file is new, so it reads as zeros there anyway)."""
    fd = _open_out(path, size)
    try:
        i = 0
        while i < len(parts):
            # Consecutive areas of one reader in one call: in the sparse layout, runs of adjacent VMAs that
            # are back to back in the pages file become one copy.
            # (RUNS_AT_ONCE runs at a time: what is planned at once stays bounded).
            reader = parts[i].area.reader
            iov: list[tuple[int, int, int]] = []
            while i < len(parts) and parts[i].area.reader is reader:
                starts, ends = parts[i].runs()
                for k in range(0, len(starts), RUNS_AT_ONCE):
                    s, e = starts[k : k + RUNS_AT_ONCE], ends[k : k + RUNS_AT_ONCE]
                    iov += zip(s, map(operator.sub, e, s), map((-base).__add__, s), strict=True)
                    if len(iov) >= RUNS_AT_ONCE:
                        progress.add(reader.write_to(fd, iov, holes="skip", fill=fill))
                        iov = []
                i += 1
            if iov:
                progress.add(reader.write_to(fd, iov, holes="skip", fill=fill))
    finally:
        os.close(fd)
