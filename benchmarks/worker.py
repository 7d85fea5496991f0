"""One measurement in a fresh process (so its peak RSS is its own); prints one JSON object.

usage: python -m benchmarks.worker materialize DIR METHOD   (METHOD: readinto-limit, a strategy, or baseline:
                                                             no reads, for counting the other syscalls;
                                                             timed: the read phase, open + index apart)
       python -m benchmarks.worker plan DIR                 (sizes, file runs, entries per pid)
"""

from __future__ import annotations

import json
import sys

from crit_pageread import open_images
from crit_pageread.cli.bench import (
    LIMIT,
    allocate,
    chain_pages_files,
    materialize,
    materialized_bytes,
    memory_layout,
    open_indexed,
    run_counts,
)
from crit_pageread.pagemap import PE_PARENT, PE_PRESENT
from crit_pageread.strategies.preadv import IOV_MAX


def plan(path: str) -> dict[str, object]:
    with open_images(path) as images:
        files = chain_pages_files(images)
        runs, iovecs = run_counts(images)
        entries = {str(pid): len(images.pagemap(pid).entries) for pid in images.pids}
        read_entries = {
            str(pid): sum(1 for e in images.pagemap(pid).entries if e.flags & (PE_PRESENT | PE_PARENT))
            for pid in images.pids
        }
        vmas = {str(pid): len(images.vmas(pid)) for pid in images.pids}
        return {
            "materialized_bytes": materialized_bytes(images),
            "pages_files": [str(p) for p in files],
            "pages_file_bytes": sum(p.stat().st_size for p in files),
            "file_runs_by_pid": {str(k): v for k, v in runs.items()},
            "iovec_runs_by_pid": {str(k): v for k, v in iovecs.items()},
            "entries_by_pid": entries,
            "read_entries_by_pid": read_entries,
            "vmas_by_pid": vmas,
            "iov_max": IOV_MAX,
            "levels": len({p.parent for p in files}),
        }


def main(argv: list[str]) -> int:
    if argv[0] == "plan":
        print(json.dumps(plan(argv[1])))
        return 0
    if argv[0] != "materialize":
        raise SystemExit(__doc__)
    path, method = argv[1], argv[2]
    images, open_s = open_indexed(path)
    with images:
        files = chain_pages_files(images)
        layout, span_bytes = memory_layout(images)
        size = max(span_bytes, sum(p.stat().st_size for p in files))
        buf = allocate(size)
        view = memoryview(buf)
        if method == "baseline":  # everything but the reads: what strace counts besides them
            result = {"seconds": 0.0, "bytes": 0, "calls": 0}
        elif method == LIMIT:
            from crit_pageread.cli.bench import read_limit

            result = read_limit(files, view)
        else:
            result = materialize(images, method, view, layout)
        result["buffer_bytes"] = size
        result["open_s"] = open_s
        view.release()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
