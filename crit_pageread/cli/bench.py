"""`crit-pageread bench DIR`: every strategy materializing a checkpoint, against the physical limit.

Each strategy reads all pages of all pids (present and in-parent entries) into
one preallocated buffer laid out like memory: every entry at its place in a
span of neighbouring entries (holes between them stay untouched, as in a
restored process), `readinto(span, defer=True, holes="skip")` of each span
and one `sync()` per pid. The
time is the read phase: the checkpoint is opened and its pagemaps indexed
first and the plugins loaded (that time, the same for every strategy, is
reported apart as `open_s`). The limit is `readinto` of the same pages files (the whole chain)
in 64 MiB chunks into the same buffer. Methods run interleaved, one round per
run after a warm-up round; medians are reported. The functions here are also
what `benchmarks/` runs in subprocesses.
"""

from __future__ import annotations

import argparse
import math
import mmap
import os
import time
from pathlib import Path
from typing import Any

from ..config import Config, load_config
from ..errors import ConfigError, CritPageReadError
from ..hookspecs import hookimpl
from ..images import CheckpointImages, open_images
from ..pagemap import PE_PARENT, PE_PRESENT
from ..plugins import configure, make_strategy, strategies
from ..strategy import Target
from .common import add_common_options, print_json

LIMIT = "readinto-limit"
CHUNK = 64 << 20
DROP_CACHES = "/proc/sys/vm/drop_caches"


def chain_pages_files(images: CheckpointImages) -> list[Path]:
    """The pages files of the pids' pagemaps, in the image and its parents: what materializing may read
    (process memory; the pages files of shared memory segments are not, so they are not in the limit)."""
    out: list[Path] = []
    level: CheckpointImages | None = images
    while level is not None:
        if level.archive is not None:  # an archive's pages are byte ranges of the archive itself
            if level.archive not in out:
                out.append(level.archive)
            level = level.parent
            continue
        for pid in images.pids:
            if (level.path / f"pagemap-{pid}.img").exists():
                path = level.pagemap(pid).pages_path
                if path not in out and path.exists():
                    out.append(path)
        level = level.parent
    return out


def materialized_bytes(images: CheckpointImages) -> int:
    """Bytes of all present and in-parent entries of all pids."""
    total = 0
    for pid in images.pids:
        total += sum(e.size for e in images.pagemap(pid).entries if e.flags & (PE_PRESENT | PE_PARENT))
    return total


#: Entries at most this far apart share a span of the materializing buffer.
SPAN_GAP = 1 << 20

#: A span of memory: (vaddr, buffer offset, length, bytes of data in it).
Span = tuple[int, int, int, int]


def memory_layout(images: CheckpointImages) -> tuple[dict[int, list[Span]], int]:
    """Per pid, the spans of memory that materializing fills, and the buffer size.

    A span is a stretch of consecutive entries with data (present or in
    parent), less than SPAN_GAP apart; each entry lies at its distance from
    the span's start, so the destinations keep memory's holes between them.
    """
    layout: dict[int, list[Span]] = {}
    size = 0
    for pid in images.pids:
        spans: list[Span] = []
        start = end = data = -1
        for e in images.pagemap(pid).entries:
            if not e.flags & (PE_PRESENT | PE_PARENT):
                if start >= 0:
                    spans.append((start, size, end - start, data))
                    size += end - start
                    start = -1
                continue
            if start >= 0 and e.vaddr - end > SPAN_GAP:
                spans.append((start, size, end - start, data))
                size += end - start
                start = -1
            if start < 0:
                start, data = e.vaddr, 0
            end = e.vaddr + e.size
            data += e.size
        if start >= 0:
            spans.append((start, size, end - start, data))
            size += end - start
        layout[pid] = spans
    return layout, size


def materialize(
    images: CheckpointImages, strategy: str, view: memoryview, layout: dict[int, list[Span]]
) -> dict[str, Any]:
    """Read all pages of all pids into `view` at their `memory_layout` places with `strategy`
    (`readinto` of each span, holes left as they are, one `sync()` per pid); seconds (and CPU seconds), bytes,
    calls."""
    start = time.perf_counter()
    cpu = time.process_time()
    calls: dict[str, int] = {}
    nbytes = 0
    for pid, spans in layout.items():
        with images.reader(pid, strategy) as reader:
            for vaddr, off, length, data in spans:
                reader.readinto(vaddr, view[off : off + length], defer=True, holes="skip")
                nbytes += data
            reader.sync()
            calls[str(pid)] = getattr(reader.strategy, "calls", 0)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "cpu_s": time.process_time() - cpu, "bytes": nbytes, "calls": sum(calls.values()),
            "calls_by_pid": calls}


def _data_segments(images: CheckpointImages, pid: int) -> list[tuple[int, int, int, int]]:
    """(pages file key, offset, end offset, vaddr) of every piece materializing reads for `pid`."""
    out: list[tuple[int, int, int, int]] = []
    with images.reader(pid, "pread") as reader:
        for entry in images.pagemap(pid).entries:
            if entry.flags & (PE_PRESENT | PE_PARENT):
                for seg in reader.segments(entry.vaddr, entry.size):
                    if seg.pages is not None:
                        out.append((id(seg.pages), seg.offset, seg.offset + seg.length, seg.vaddr))
    out.sort()
    return out


def run_counts(images: CheckpointImages) -> tuple[dict[int, int], dict[int, int]]:
    """Per pid, from one plan of the reads: file runs, the contiguous byte ranges of pages files that
    materializing reads (one preadv reads one: the fewest positioned reads that read no byte nobody asked
    for), and iovec runs, the ranges contiguous both in a pages file and in memory (what one iovec holds;
    runs back to back in a file share a preadv, IOV_MAX of them per call)."""
    files: dict[int, int] = {}
    iovecs: dict[int, int] = {}
    for pid in images.pids:
        n_files = n_iovecs = 0
        last_file: tuple[int, int] | None = None
        last_iovec: tuple[int, int, int] | None = None
        for key, start, end, vaddr in _data_segments(images, pid):
            if last_file != (key, start):
                n_files += 1
            if last_iovec != (key, start, vaddr):
                n_iovecs += 1
            last_file = (key, end)
            last_iovec = (key, end, vaddr + end - start)
        files[pid] = n_files
        iovecs[pid] = n_iovecs
    return files, iovecs


def allocate(size: int) -> mmap.mmap:
    """An anonymous buffer of `size` bytes, every page touched (no page faults while timing)."""
    buf = mmap.mmap(-1, max(size, 1))
    zeros = bytes(min(len(buf), CHUNK))
    for off in range(0, len(buf), CHUNK):
        n = min(CHUNK, len(buf) - off)
        buf[off : off + n] = zeros[:n]
    return buf


def open_indexed(path: str | os.PathLike[str], config: Config | None = None) -> tuple[CheckpointImages, float]:
    """The checkpoint opened with every pid's pagemap indexed (bulk-planning columns included), its VMAs
    parsed, the plugins and the readers' modules loaded, and the seconds that took."""
    start = time.perf_counter()
    images = open_images(path, config)
    try:
        from .. import memory  # noqa: F401 - the readers' code (reader, native helper), imported before the timing
        strategies()
        for pid in images.pids:
            images.pagemap(pid).present_runs()
            images.vmas(pid)  # a process reader's shared mappings come from them
        level = images.parent
        while level is not None:  # a chain's parents too (they may hold only pagemaps and pages)
            for pid in images.pids:
                try:
                    level.pagemap_for(Target("pid", pid)).present_runs()
                except CritPageReadError:
                    pass  # no pagemap for it there: a read that needs one reports it
            level = level.parent
    except BaseException:
        images.close()
        raise
    return images, time.perf_counter() - start


def read_limit(files: list[Path], view: memoryview) -> dict[str, Any]:
    """readinto of whole pages files in 64 MiB chunks into `view` (the physical limit)."""
    start = time.perf_counter()
    cpu = time.process_time()
    off = 0
    calls = 0
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while True:
                n = f.readinto(view[off : off + CHUNK])
                calls += 1
                if not n:
                    break
                off += n
    return {"seconds": time.perf_counter() - start, "cpu_s": time.process_time() - cpu, "bytes": off, "calls": calls}


def drop_caches() -> str | None:
    """Drop the page cache; None on success, else why not."""
    try:
        os.sync()
        with open(DROP_CACHES, "w") as f:
            f.write("3\n")
    except OSError as exc:
        return f"cannot drop caches ({DROP_CACHES}: {exc.strerror})"
    return None


def summarize(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Median seconds and GB/s (10^9 bytes per second) of runs that read the same bytes."""
    seconds = [s["seconds"] for s in samples]
    import statistics  # only here: it costs start-up time to every command

    med = statistics.median(seconds)
    nbytes = samples[0]["bytes"]
    return {
        "runs": len(samples),
        "bytes": nbytes,
        "median_s": med,
        "min_s": min(seconds),
        "max_s": max(seconds),
        "gb_per_s": nbytes / med / 1e9 if med > 0 else math.inf,
        "calls": samples[0].get("calls"),
        "calls_by_pid": samples[0].get("calls_by_pid"),
    }


def run_bench(path: str, methods: list[str], runs: int, warmup: int, cold: bool, config: Config) -> dict[str, Any]:
    """Interleaved rounds of every method; medians and ratios against the limit."""
    images, open_s = open_indexed(path, config)
    with images:  # kept open: an archive stays unpacked
        files = chain_pages_files(images)
        need = materialized_bytes(images)
        runs_by_pid, iovecs_by_pid = run_counts(images)
        layout, span_bytes = memory_layout(images)
        file_bytes = sum(p.stat().st_size for p in files)
        buf = allocate(max(span_bytes, file_bytes))
        view = memoryview(buf)
        samples: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
        try:
            for round_ in range(warmup + runs):
                for method in methods:
                    if cold:
                        why = drop_caches()
                        if why:
                            raise ConfigError(f"--cold: {why}")
                    if method == LIMIT:
                        sample = read_limit(files, view)
                    else:
                        sample = materialize(images, method, view, layout)
                    if round_ >= warmup:
                        samples[method].append(sample)
        finally:
            view.release()
            buf.close()
    results = {m: summarize(s) for m, s in samples.items()}
    limit = results.get(LIMIT)
    for res in results.values():
        res["vs_limit"] = res["gb_per_s"] / limit["gb_per_s"] if limit else None
    return {
        "checkpoint": str(path),
        "cache": "cold" if cold else "warm",
        "warmup": warmup,
        "pids": len(runs_by_pid),
        "materialized_bytes": need,
        "buffer_bytes": max(span_bytes, file_bytes),
        "open_s": open_s,
        "pages_file_bytes": file_bytes,
        "file_runs": sum(runs_by_pid.values()),
        "file_runs_by_pid": {str(k): v for k, v in runs_by_pid.items()},
        "iovec_runs": sum(iovecs_by_pid.values()),
        "iovec_runs_by_pid": {str(k): v for k, v in iovecs_by_pid.items()},
        "methods": results,
    }


def format_table(report: dict[str, Any]) -> str:
    """The human-readable table of a `run_bench` report."""
    lines = [
        f"{report['checkpoint']}: {report['materialized_bytes'] / 2**20:.1f} MiB materialized from "
        f"{report['pages_file_bytes'] / 2**20:.1f} MiB of pages files, {report['file_runs']} file runs, "
        f"{report['cache']} cache, median of {next(iter(report['methods'].values()))['runs']} runs; "
        f"open + index {report['open_s']:.3f} s (before every strategy's read phase)",
        f"{'method':<16} {'median s':>9} {'GB/s':>7} {'vs limit':>9} {'calls':>7}",
    ]
    for name, res in report["methods"].items():
        ratio = f"{res['vs_limit']:.2f}x" if res["vs_limit"] is not None else "-"
        calls = "" if not res["calls"] else str(res["calls"])
        lines.append(f"{name:<16} {res['median_s']:>9.4f} {res['gb_per_s']:>7.2f} {ratio:>9} {calls:>7}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    overrides = {"strategy": args.strategy} if args.strategy else {}
    config = load_config(args.config, overrides)
    configure(config)
    if args.runs < 1 or args.warmup < 0:
        raise ConfigError("--runs must be >= 1 and --warmup >= 0")
    names = [args.strategy] if args.strategy else [n for n in strategies() if not _needs_server(n, config)]
    report = run_bench(args.dir, [LIMIT, *names], args.runs, args.warmup, args.cold, config)
    if args.json:
        print_json(report)
    else:
        print(format_table(report))
    return 0


def _needs_server(name: str, config: Config) -> bool:
    """Strategies that serve lazy pages need a page server: benched only when named or the default."""
    if name == config.strategy:
        return False
    try:
        strategy = make_strategy(name, config)
    except CritPageReadError:
        return True
    try:
        return bool(strategy.serves_lazy)
    finally:
        strategy.close()


@hookimpl
def crit_pageread_add_commands(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "bench",
        help="time every strategy materializing a checkpoint, against readinto of its pages files",
        description=__doc__.splitlines()[0] if __doc__ else None,
    )
    p.add_argument("dir", help="image directory (or checkpoint archive)")
    add_common_options(p, pid=False)
    p.add_argument("--runs", type=int, default=5, help="timed rounds (median reported; default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    p.add_argument("--cold", action="store_true", help="drop the page cache before every run (root)")
    p.set_defaults(func=run)
