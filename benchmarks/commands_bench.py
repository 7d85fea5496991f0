"""extract, squash, coredump and grep against `cat FILES > file`, side by side, for one or more source trees.

For each cached benchmark checkpoint (benchmarks/generate.py shapes), interleaved rounds of
`crit-pageread extract` (both layouts), `squash` and `coredump` against `cat` of the same pages
files (a chain's: every level's) into one file on the same file system (and `grep` against `grep -c -a -F`); with
`--tree NAME=DIR` (repeatable) each command runs from each source tree (`python -m crit_pageread`
with DIR as the working directory), so a change is measured against the code before it in the
same run. Every measurement is its own process (peak
RSS from wait4), one warm-up round, medians of the timed rounds; before each command the outputs are
emptied and set aside (deleted only at the end: see `set_aside`) and the page cache written back (`sync`).

usage: python -m benchmarks.commands_bench [--shapes frag,big,plain] [--runs 5] [--tree NAME=DIR ...]
                                           [--commands extract,extract-sparse,squash,coredump,grep] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.generate import SHAPES, cache_root, generate
from benchmarks.spawn import spawn

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
COMMANDS = ("extract", "squash", "coredump", "grep")  # extract-sparse: needs tmpfs, xfs or btrfs (ext4 stops at 16 TiB)
PATTERN = "CRIT-PAGEREAD-SECRET-7-spans"  # the victim's secret (seed 7): a rare literal


def run_child(cmd: list[str], stdout_path: str | None, cwd: Path) -> dict[str, Any]:
    """Run `cmd` from the small spawner (benchmarks/spawn.py), reaped with wait4: wall seconds, CPU seconds
    (user + system: less sensitive to a loaded machine than wall time), exit code, stderr, peak RSS (MiB)."""
    r = spawn(cmd, stdout_path or os.devnull, cwd)
    return {"seconds": r["seconds"], "cpu": r["cpu_s"], "code": r["code"], "stderr": r["stderr"],
            "rss_mib": r["rss_mib"]}


def set_aside(path: Path, trash: Path) -> None:
    """Empty `path` (a file, or every file in a directory) and move it into `trash`, rather than delete it.

    ext4 without a journal (this machine's) does not reuse an inode for 60 s after it is freed (5 min while
    its inode table block is dirty): each file created scans past every such inode of its group. Deleting
    the 415 files of big's extract every round made each later round's creates cost 0.17 s of CPU against
    0.011 s with nothing recently deleted (`cat`'s one file pays almost nothing either way): a cost of the
    benchmark's own loop, not of the command. Emptied files free their blocks and page cache but keep their
    inodes until the whole run ends (`trash` is removed with the scratch directory)."""
    if not path.exists():
        return
    if path.is_dir():
        for parent, _, names in os.walk(path):
            for name in names:
                os.truncate(os.path.join(parent, name), 0)
    else:
        os.truncate(path, 0)
    trash.mkdir(exist_ok=True)
    path.rename(trash / f"{len(os.listdir(trash))}-{path.name}")


def pages_files(directory: Path) -> list[str]:
    """The pages files of an image directory and of every level of its chain (`parent` links), newest first:
    what `cat` reads for a chain is what the reader may read."""
    files: list[str] = []
    level: Path | None = directory
    seen: set[Path] = set()
    while level is not None and level.resolve() not in seen:
        seen.add(level.resolve())
        files += sorted(str(p) for p in level.glob("pages-*.img"))
        parent = level / "parent"
        level = (level / os.readlink(parent)) if parent.is_symlink() else None
    return files


def command(name: str, directory: Path, out: Path) -> list[str]:
    cli = [PY, "-m", "crit_pageread"]
    if name == "extract":
        return [*cli, "extract", str(directory), "-o", str(out)]
    if name == "extract-sparse":
        return [*cli, "extract", str(directory), "-o", str(out), "--layout", "sparse"]
    if name == "squash":
        return [*cli, "squash", str(directory), str(out)]
    if name == "coredump":
        return [*cli, "coredump", str(directory), "-o", str(out)]
    if name == "grep":
        return [*cli, "grep", str(directory), PATTERN]
    raise ValueError(name)


def bench_shape(directory: Path, trees: dict[str, Path], commands: list[str], runs: int, warmup: int,
                scratch: Path) -> dict[str, Any]:
    files = pages_files(directory)
    nbytes = sum(os.path.getsize(f) for f in files)
    pairs: dict[str, tuple[list[str], Path | None, str | None]] = {"cat > file": (["cat", *files], None, "cat.out")}
    if "grep" in commands:
        # stdout to a file: GNU grep stops at the first match when its output is /dev/null
        pairs["grep -c -a -F"] = (["grep", "-c", "-a", "-F", PATTERN, *files], None, "grep.out")
    for cmd in commands:
        for tree_name, tree in trees.items():
            pairs[f"{cmd} [{tree_name}]"] = (command(cmd, directory, scratch / "out"), tree,
                                             "grep.out" if cmd == "grep" else None)
    samples: dict[str, list[dict[str, Any]]] = {k: [] for k in pairs}
    for round_ in range(warmup + runs):
        for name, (cmd, cwd, stdout_name) in pairs.items():
            set_aside(scratch / "out", scratch / "trash")
            set_aside(scratch / "cat.out", scratch / "trash")
            os.sync()
            res = run_child(cmd, stdout_path=str(scratch / stdout_name) if stdout_name else None, cwd=cwd or ROOT)
            if res["code"] not in (0, 1) or (res["code"] == 1 and "grep" not in name):
                raise RuntimeError(f"{name} failed ({res['code']}): {res['stderr'].decode()[-2000:]}")
            if round_ >= warmup:
                samples[name].append(res)
    set_aside(scratch / "out", scratch / "trash")
    set_aside(scratch / "cat.out", scratch / "trash")
    cat = statistics.median(r["seconds"] for r in samples["cat > file"])
    cat_cpu = statistics.median(r["cpu"] for r in samples["cat > file"])
    out: dict[str, Any] = {"pages_file_bytes": nbytes, "results": {}}
    for name, got in samples.items():
        secs = sorted(r["seconds"] for r in got)
        med = statistics.median(secs)
        out["results"][name] = {
            "median_s": round(med, 4), "min_s": round(secs[0], 4), "max_s": round(secs[-1], 4),
            "vs_cat": round(cat / med, 3), "peak_rss_mib": round(max(r["rss_mib"] for r in got), 1),
            "cpu_median_s": round(statistics.median(r["cpu"] for r in got), 4),
            "cpu_vs_cat": round(cat_cpu / max(statistics.median(r["cpu"] for r in got), 1e-6), 3),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="frag,big,plain")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--tree", action="append", default=[], metavar="NAME=DIR",
                        help="a source tree to run the commands from (default: this checkout)")
    parser.add_argument("--commands", default=",".join(COMMANDS))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    trees = {"this": ROOT} if not args.tree else {
        t.split("=", 1)[0]: Path(t.split("=", 1)[1]).resolve() for t in args.tree}
    commands = [c for c in args.commands.split(",") if c]
    results: dict[str, Any] = {"loadavg_before": Path("/proc/loadavg").read_text().split()[:3], "shapes": {}}
    scratch = Path(tempfile.mkdtemp(prefix="commands-", dir=cache_root()))
    try:
        for name in [s for s in args.shapes.split(",") if s]:
            directory = generate(SHAPES[name])
            res = bench_shape(directory, trees, commands, args.runs, args.warmup, scratch)
            results["shapes"][name] = res
            if not args.json:
                print(f"{name}: {res['pages_file_bytes'] / 2**20:.0f} MiB of pages files, medians of {args.runs}")
                for cmd, r in res["results"].items():
                    print(f"  {cmd:28} {r['median_s']:7.3f} s  ({r['min_s']:.3f}-{r['max_s']:.3f})  "
                          f"{r['vs_cat']:5.2f}x cat  cpu {r['cpu_median_s']:.3f} s  rss {r['peak_rss_mib']:.0f} MiB",
                          flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    results["loadavg_after"] = Path("/proc/loadavg").read_text().split()[:3]
    if args.json:
        print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
