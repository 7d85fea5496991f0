"""`extract DIR -o OUT`: memory to files, one per VMA or one sparse file per pid, with a JSON index.

The bytes go through the reader and its strategy (`PageReader.write_to`): the
local strategies copy them in the kernel (one `copy_file_range` per run
contiguous in a pages file and in the output), several files at once by a
few threads when the strategy allows it; pages that were not dumped stay
holes. OUT is built in a temporary directory beside it and renamed into
place only when complete.
"""

from __future__ import annotations

import argparse
import errno
import json
import operator
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CritPageReadError
from ..hookspecs import hookimpl
from ..memory import Area, Readers
from ..reader import Segment
from .common import add_common_options, atomic_dir, open_from_args, print_json, selected_pids
from .grep import mapping_name
from .memscan import Progress, add_vma_filters, vma_filter_from_args

if TYPE_CHECKING:
    from concurrent.futures import Future

#: Threads copying files in the kernel at once (the copies are bound by page-cache work, per core).
WRITERS = max(1, min(4, os.cpu_count() or 1))
INDEX = "index.json"
#: Default --min-hole: a gap of up to 4 pages costs less written as zeros than one more write call.
MIN_HOLE = 16 << 10


def _bytes_arg(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of bytes: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more: {text!r}")
    return value


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
    strategy serves), their bytes, and the lazy pages left out as holes (ranges, bytes)."""

    __slots__ = ("area", "bytes", "ends", "lazy", "lazy_bytes", "starts")

    def __init__(self, area: Area) -> None:
        self.area = area
        # From the memory maps by slices: no object per piece (a fragmented dump has 100,000 of them).
        self.starts, self.ends, self.lazy_bytes = area.reader.readable_runs(area.start, area.end)
        self.bytes = sum(self.ends) - sum(self.starts)
        self.lazy: list[list[int]] = []
        if self.lazy_bytes:  # rare: where they are, for the index
            self.lazy = _ranges([s for s in area.segments() if s[2] == "lazy"])


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


def _vma_entry(part: _Part, offset: int) -> dict[str, Any]:
    area = part.area
    vma = area.vma
    entry: dict[str, Any] = {
        "start": area.start, "end": area.end, "perms": vma.perms, "kind": vma.kind, "mapping": mapping_name(area),
        "file_offset": offset, "data": [[a, b] for a, b in zip(part.starts, part.ends, strict=True)],
        "bytes": part.bytes,
    }
    shmid = area.shmid
    if shmid is not None:
        entry["shmem"] = shmid
        entry["shmem_offset"] = area.start - vma.start + vma.pgoff
    if part.lazy:
        entry["lazy_not_written"] = part.lazy
    return entry


def _open_out(path: Path, size: int) -> int:
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
    out = Path(args.output)
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
                if not part.starts:
                    area = part.area
                    skipped.append({"pid": pid, "start": area.start, "end": area.end, "perms": vma.perms,
                                    "mapping": mapping_name(area),
                                    "reason": "lazy pages only" if part.lazy_bytes else "no dumped pages"})
                    continue
                plans[pid].append(part)
                total += part.bytes
        from concurrent.futures import ThreadPoolExecutor  # here: it imports logging (5 ms at start-up)

        progress = Progress("extract", total)
        files: list[dict[str, Any]] = []
        with atomic_dir(out) as tmp, ThreadPoolExecutor(WRITERS) as pool:
            # Files whose bytes all come from local pages files are written by WRITERS threads at once
            # when the strategy allows it (the kernel copies release the GIL); the others here.
            jobs: list[Future[None]] = []

            def write(path: Path, size: int, parts: list[_Part], base: int) -> None:
                if all(p.area.reader.strategy.concurrent_writes and not p.area.reader.strategy.serves_lazy
                       for p in parts):
                    jobs.append(pool.submit(_write_file, path, size, parts, progress, base, args.min_hole))
                else:
                    _write_file(path, size, parts, progress, base, args.min_hole)

            try:
                for pid, parts in plans.items():
                    if not parts:
                        continue
                    piddir = tmp / f"pid-{pid}"
                    if args.layout == "vma":
                        piddir.mkdir()
                        for part in parts:
                            area = part.area
                            name = f"{area.start:x}-{area.end:x}-{area.vma.perms}.bin"
                            write(piddir / name, area.end - area.start, [part], area.start)
                            files.append({"file": f"pid-{pid}/{name}", "pid": pid, "size": area.end - area.start,
                                          "vmas": [_vma_entry(part, 0)]})
                    else:
                        name = f"pid-{pid}.mem"
                        size = max(p.area.end for p in parts)
                        write(tmp / name, size, parts, 0)
                        files.append({"file": name, "pid": pid, "size": size,
                                      "vmas": [_vma_entry(p, p.area.start) for p in parts]})
                for job in jobs:
                    job.result()
            except BaseException:
                for job in jobs:
                    job.cancel()
                raise
            progress.finish()
            index = {
                "checkpoint": str(images.archive or images.path),
                "layout": args.layout,
                "page_size": images.page_size,
                "files": files,
                "skipped": skipped,
                "totals": {"files": len(files), "bytes": sum(v["bytes"] for f in files for v in f["vmas"])},
            }
            (tmp / INDEX).write_text(index_text(index))
    if lazy_bytes:
        print(f"crit-pageread: extract: {lazy_bytes // images.page_size} lazy pages left out as holes "
              "(their data is on a page server; use --strategy remote)", file=sys.stderr)
    if args.json:
        print_json({"checkpoint": index["checkpoint"], "output": str(out),
                    **{k: v for k, v in index.items() if k != "checkpoint"}})
    else:
        print(f"{out}: {len(files)} files, {index['totals']['bytes']} bytes of memory"
              + (f", {lazy_bytes // images.page_size} lazy pages left as holes" if lazy_bytes else "")
              + f" (index: {out / INDEX})")
    return 0


def index_text(index: dict[str, Any]) -> str:
    """The index as JSON with one line per file (json's C encoder: an index can list 100,000 ranges)."""
    head = ", ".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in index.items() if k != "files")
    files = ",\n  ".join(json.dumps(f) for f in index["files"])
    return f'{{{head},\n "files": [\n  {files}\n]}}\n' if files else f'{{{head}, "files": []}}\n'


def _write_file(path: Path, size: int, parts: list[_Part], progress: Progress, base: int, fill: int = 0) -> None:
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
            reader = parts[i].area.reader
            iov: list[tuple[int, int, int]] = []
            while i < len(parts) and parts[i].area.reader is reader:
                starts, ends = parts[i].starts, parts[i].ends
                iov += zip(starts, map(operator.sub, ends, starts), map((-base).__add__, starts), strict=True)
                i += 1
            progress.add(reader.write_to(fd, iov, holes="skip", fill=fill))
    finally:
        os.close(fd)
