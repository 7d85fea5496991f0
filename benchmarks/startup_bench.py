"""Start-up of `--version`, `ps` and `read` on a small checkpoint, side by side for one or more source trees.

Interleaved rounds (a warm-up round first): a bare `python -c pass` (the interpreter's own start-up), then each
command from each tree (`python -m crit_pageread` with the tree as the working directory, as in
commands_bench). Each run is its own process, reaped with wait4: wall and CPU seconds (user + system), medians.
The checkpoint is the test corpus's single-process dump unless --dir names one. A tree must be byte-compiled
(`python -m compileall crit_pageread`: PYTHONDONTWRITEBYTECODE may be set).

usage: python -m benchmarks.startup_bench [--runs 20] [--tree NAME=DIR ...] [--dir DIR] [--json]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

from benchmarks.commands_bench import PY, ROOT, run_child


def small_checkpoint() -> Path:
    found = sorted(glob.glob(os.path.expanduser("~/.cache/crit-pageread/corpus/*/cases/a_single")))
    if not found:
        raise SystemExit("no test corpus checkpoint: run the tests once, or pass --dir")
    return Path(found[0])


def first_address(directory: Path) -> str:
    from crit_pageread import open_images

    with open_images(directory) as images:
        pm = images.pagemap(images.pids[0])
        starts, _, flags, _ = pm.columns()
        return next(f"{v:x}" for v, f in zip(starts, flags, strict=True) if f & 4)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--tree", action="append", default=[], metavar="NAME=DIR")
    parser.add_argument("--dir", type=Path, help="a small checkpoint (default: the test corpus's a_single)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    trees = {"this": ROOT} if not args.tree else {
        t.split("=", 1)[0]: Path(t.split("=", 1)[1]).resolve() for t in args.tree}
    directory = args.dir or small_checkpoint()
    addr = first_address(directory)
    cmds: dict[str, tuple[list[str], Path]] = {"python -c pass": ([PY, "-c", "pass"], ROOT)}
    for what, extra in (("--version", ["--version"]), ("ps", ["ps", str(directory)]),
                        ("read", ["read", str(directory), addr, "64"])):
        for name, tree in trees.items():
            cmds[f"{what} [{name}]"] = ([PY, "-m", "crit_pageread", *extra], tree)
    samples: dict[str, list[dict[str, Any]]] = {k: [] for k in cmds}
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    for round_ in range(args.warmup + args.runs):
        for name, (cmd, cwd) in cmds.items():
            res = run_child(cmd, None, cwd)
            if res["code"] != 0:
                raise RuntimeError(f"{name} failed ({res['code']}): {res['stderr'].decode()[-500:]}")
            if round_ >= args.warmup:
                samples[name].append(res)
    out = {"checkpoint": str(directory), "runs": args.runs, "loadavg_before": load_before,
           "loadavg_after": Path("/proc/loadavg").read_text().split()[:3], "results": {
               name: {"wall_median_ms": round(1000 * statistics.median(r["seconds"] for r in got), 1),
                      "cpu_median_ms": round(1000 * statistics.median(r["cpu"] for r in got), 1),
                      "wall_min_ms": round(1000 * min(r["seconds"] for r in got), 1)}
               for name, got in samples.items()}}
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        print(f"{directory}: medians of {args.runs}, load {' '.join(load_before)} -> {' '.join(out['loadavg_after'])}")
        for name, r in out["results"].items():
            print(f"  {name:24} wall {r['wall_median_ms']:6.1f} ms (min {r['wall_min_ms']:.1f})  "
                  f"cpu {r['cpu_median_ms']:6.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
