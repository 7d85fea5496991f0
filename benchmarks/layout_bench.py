"""Is the readinto limit a fair yardstick for a fragmented dump? The same pages file read three ways into the
same kind of buffer `benchmarks.worker` materializes into, in one process, interleaved, CPU seconds:

- `limit`: `readinto` in 64 MiB chunks into contiguous memory (what `readinto-limit` does);
- `preadv-contiguous`: `os.preadv` of IOV_MAX 4 KiB buffers at a time, the buffers back to back in memory;
- `preadv-every-other-page`: the same calls, each page to every other page of the buffer (frag's layout: a
  hole between every two entries).

The first two differ only in the number of iovecs (the kernel's per-iovec work), the last two only in where
the pages land (the cost of writing every other page). The iovec lists are built before the timing.

usage: python -m benchmarks.layout_bench PAGES_FILE [--runs N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

from crit_pageread.cli.bench import CHUNK, allocate
from crit_pageread.strategies.preadv import IOV_MAX

PAGE = 4096


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pages_file")
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    size = os.path.getsize(args.pages_file) // PAGE * PAGE
    pages = size // PAGE
    buf = allocate(2 * size)
    view = memoryview(buf)
    fd = os.open(args.pages_file, os.O_RDONLY)

    def batches(stride: int) -> list[tuple[list[memoryview], int]]:
        out = []
        for first in range(0, pages, IOV_MAX):
            last = min(pages, first + IOV_MAX)
            out.append(([view[k * stride * PAGE : k * stride * PAGE + PAGE] for k in range(first, last)],
                        first * PAGE))
        return out

    plans = {"preadv-contiguous": batches(1), "preadv-every-other-page": batches(2)}

    def limit() -> None:
        with open(args.pages_file, "rb", buffering=0) as f:
            off = 0
            while n := f.readinto(view[off : off + CHUNK]):
                off += n

    def reader(plan: list[tuple[list[memoryview], int]]) -> Callable[[], None]:
        def reads() -> None:
            for bufs, offset in plan:
                os.preadv(fd, bufs, offset)

        return reads

    ways: dict[str, Callable[[], None]] = {"limit": limit}
    ways.update((name, reader(plan)) for name, plan in plans.items())
    cpu: dict[str, list[float]] = {name: [] for name in ways}
    for r in range(args.runs + 1):  # a warm-up round first
        for name, way in ways.items():
            start = time.process_time()
            way()
            if r:
                cpu[name].append(time.process_time() - start)
    base = statistics.median(cpu["limit"])
    print(f"{args.pages_file}: {size >> 20} MiB, {pages} pages, medians of {args.runs} (CPU s)")
    for name, samples in cpu.items():
        med = statistics.median(samples)
        print(f"{name:26s} {med * 1e3:8.2f} ms  {base / med:.2f}x of the limit")
    os.close(fd)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
