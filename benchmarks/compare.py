"""Before/after: materialize with the package at a git ref against the working tree, interleaved.

The package at REF is unpacked (`git archive`) into a temporary directory with
today's `crit_pageread/cli/bench.py` added (the measuring code stays the same);
every round runs each strategy once with each version, each in its own process.

usage: python -m benchmarks.compare REF [--shapes big,frag,chain] [--runs 5] [--warmup 1] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.generate import SHAPES, generate

ROOT = Path(__file__).resolve().parent.parent
STRATEGIES = ["pread", "preadv", "mmap"]


def unpack(ref: str, dest: Path) -> None:
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "crit_pageread"], capture_output=True,
                             check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    shutil.copy(ROOT / "crit_pageread" / "cli" / "bench.py", dest / "crit_pageread" / "cli" / "bench.py")


def measure(pythonpath: str, directory: Path, method: str) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": pythonpath}
    with tempfile.TemporaryDirectory() as cwd:  # not ROOT: `-m` would put the working tree first
        res = subprocess.run([sys.executable, "-m", "benchmarks.worker", "materialize", str(directory), method],
                             capture_output=True, env=env, cwd=cwd)
    if res.returncode != 0:
        raise RuntimeError(res.stderr.decode()[-2000:])
    return json.loads(res.stdout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ref")
    parser.add_argument("--shapes", default="big,frag,chain")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    out: dict[str, Any] = {"ref": args.ref, "runs": args.runs, "shapes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        unpack(args.ref, Path(tmp))
        versions = {"before": f"{tmp}:{ROOT}", "after": str(ROOT)}
        for name in args.shapes.split(","):
            directory = generate(SHAPES[name])
            samples: dict[str, list[float]] = {f"{v} {s}": [] for s in STRATEGIES for v in versions}
            for round_ in range(args.warmup + args.runs):
                for strategy in STRATEGIES:
                    for version, path in versions.items():
                        res = measure(path, directory, strategy)
                        if round_ >= args.warmup:
                            samples[f"{version} {strategy}"].append(res["seconds"])
                            nbytes = res["bytes"]
            shape = {k: {"median_s": statistics.median(v), "min_s": min(v), "max_s": max(v),
                         "gb_per_s": nbytes / statistics.median(v) / 1e9} for k, v in samples.items()}
            out["shapes"][name] = shape
            print(f"{name} (median of {args.runs}, warm cache):")
            for strategy in STRATEGIES:
                b, a = shape[f"before {strategy}"], shape[f"after {strategy}"]
                print(f"  {strategy:<7} before {b['median_s']:.4f} s ({b['gb_per_s']:.2f} GB/s, min {b['min_s']:.4f})  "
                      f"after {a['median_s']:.4f} s ({a['gb_per_s']:.2f} GB/s, min {a['min_s']:.4f})  "
                      f"x{b['median_s'] / a['median_s']:.2f}")
            frag_ratio = shape["after preadv"]["gb_per_s"] / shape["after pread"]["gb_per_s"]
            print(f"  preadv/pread after: {frag_ratio:.2f}x", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
