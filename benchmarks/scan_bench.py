"""`crit-pageread scan` against yara-x scanning the extracted memory files of the same checkpoint.

Side by side on real CRIU checkpoints (benchmarks/generate.py), warm cache, rounds interleaved after a
warm-up, medians. Each method runs in its own process (peak RSS from wait4), on one core:

- scan: `crit-pageread scan --rules RULES DIR --jobs 1` (open, read through the strategy, yara-x);
- yara-x on files: a Python process that compiles the same rules and runs `Scanner.scan_file` on every
  file of `crit-pageread extract DIR --layout vma` (made once, not timed): the same memory as plain files.

Throughput is bytes of memory scanned per second, one process on one core, two ways: end to end (the
process's wall time: start-up, rule compilation, opening the checkpoint, reading, scanning) and the scan
phase (scan: the task's time from its summary line, which includes opening the checkpoint and indexing its
pagemaps; yara-x: its loop of scan_file calls, timed inside). The ratio is scan's throughput over
yara-x's on files (>= 0.8 is the target). The files hold a checkpoint's holes as zeros, which yara-x scans
too, so `time ratio` also gives yara-x's scan-phase seconds over scan's: the same checkpoint, in time.

`--before TREE` adds `scan` of another checkout of crit-pageread (its package first on PYTHONPATH) to every
round, for before/after figures in one run. `--entries N,M,...` measures instead scan's peak RSS on synthetic
checkpoints of one process with N single-page entries, a hole after each (the pages file sparse: its zeros
cost no disk), to show how memory grows with the number of pagemap entries; with `--commands scan,grep,...`
the peak RSS of each of those commands (scan, grep, extract, squash, coredump, read) on the same checkpoints,
their outputs written under `--out DIR` (default: a temporary directory) and removed after each run.

usage: python -m benchmarks.scan_bench [--shapes plain,big,frag] [--runs 5] [--rules FILE] [--before TREE]
                                       [--entries N,... [--commands scan,grep,...] [--out DIR]] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.generate import SHAPES, generate
from benchmarks.run import run_child

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
PIN = ["taskset", "-c", "0"] if shutil.which("taskset") else []

YARA_FILES = """
import sys, time, yara_x
rules = yara_x.Compiler()
rules.add_source(open(sys.argv[1]).read())
scanner = yara_x.Scanner(rules.build())
scanner.max_matches_per_pattern(1000)
n = hits = 0
t0 = time.perf_counter()
for path in sys.argv[2:]:
    res = scanner.scan_file(path)
    hits += sum(len(m.matches) for r in res.matching_rules for m in r.patterns)
    n += 1
print(n, hits, time.perf_counter() - t0)
"""


def scan_cmd(rules: Path, images: Path, tree: str | None = None) -> list[str]:
    """`crit-pageread scan` of this checkout, or of `tree`, on one core. `python -m` puts the working
    directory first on sys.path: run_child runs it in the tree whose package it must import (see cwd_of)."""
    env = ["env", f"PYTHONPATH={tree}"] if tree else []
    return [*PIN, *env, PY, "-m", "crit_pageread", "scan", "--rules", str(rules), str(images), "--jobs", "1", "--json"]


def cwd_of(name: str, before: str | None) -> Path:
    """The working directory of a method: the other tree for a `-before` method, this one otherwise."""
    return Path(before) if name.endswith("-before") and before else ROOT


#: The streaming commands `--commands` measures: what each runs on a synthetic checkpoint (`{images}`, `{out}`:
#: a path under --out that does not exist yet, `{addr}`: an address with data) and the exit codes that are success.
COMMANDS: dict[str, tuple[list[str], tuple[int, ...]]] = {
    "scan": (["scan", "--rules", "{rules}", "{images}", "--jobs", "1", "--json"], (0, 1)),
    "grep": (["grep", "{images}", "no such bytes here"], (0, 1)),
    "extract": (["extract", "{images}", "-o", "{out}"], (0,)),
    "squash": (["squash", "{images}", "{out}"], (0,)),
    "coredump": (["coredump", "{images}", "-o", "{out}"], (0,)),
    "read": (["read", "{images}", "{addr}", "-o", "{out}"], (0,)),
}


def command_cmd(command: str, rules: Path, images: Path, out: Path, addr: int, tree: str | None = None) -> list[str]:
    """`crit-pageread COMMAND` of this checkout, or of `tree`, on one core (see scan_cmd)."""
    env = ["env", f"PYTHONPATH={tree}"] if tree else []
    args = [a.format(rules=rules, images=images, out=out, addr=f"{addr:x}") for a in COMMANDS[command][0]]
    return [*PIN, *env, PY, "-m", "crit_pageread", *args]


def synthetic(entries: int, work: Path | str, nvmas: int = 64) -> Path:
    """One process, `entries` single-page present entries with a hole after each, over `nvmas` VMAs."""
    from crit_pageread.imagefile import frame
    from crit_pageread.pagemap import PE_PRESENT, encode_pagemap
    from crit_pageread.testing import ImageBuilder, VmaSpec, _message

    out = Path(work) / f"entries-{entries}"
    per = -(-entries // nvmas)
    base = 0x7F0000000000
    vmas = [VmaSpec(base + i * 2 * (per + 1) * 4096, base + i * 2 * (per + 1) * 4096 + 2 * per * 4096)
            for i in range(nvmas)]
    ImageBuilder(out).process(10, vmas=vmas).write()
    # a thread's core image (x86_64 registers of zeros) for coredump
    regs = [*((n, 0) for n in range(1, 28)), (28, 1)]  # mode 1: native x86_64
    info = [(1, 0), (2, regs), (3, [(n, 0) for n in range(1, 9)])]
    core = [(1, 1), (2, info), (3, [(1, 1), (2, 0), (3, 0), (4, 0), (5, 0), (6, "synthetic")])]
    (out / "core-10.img").write_bytes(frame("CORE", [_message(core)]))
    pages = [(v.start + 2 * k * 4096, 1, PE_PRESENT) for v in vmas for k in range(per)][:entries]
    (out / "pagemap-10.img").write_bytes(encode_pagemap(1, pages))
    with open(out / "pages-1.img", "wb") as f:
        f.truncate(len(pages) * 4096)
    return out


def measure_entries(counts: list[int], runs: int, rules: Path, work: Path, before: str | None) -> list[dict[str, Any]]:
    """Peak RSS (and seconds) of scan on synthetic checkpoints with many entries, rounds interleaved."""
    out = []
    for n in counts:
        # made in a child process: this one stays small (a child's ru_maxrss counts the parent's pages
        # between fork and exec)
        subprocess.run([PY, "-c", f"from benchmarks.scan_bench import synthetic; synthetic({n}, {str(work)!r})"],
                       check=True, cwd=ROOT)
        images = work / f"entries-{n}"
        methods = {"scan": scan_cmd(rules, images)}
        if before:
            methods["scan-before"] = scan_cmd(rules, images, before)
        samples: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
        for _ in range(runs):
            for name, cmd in methods.items():
                r = run_child(cmd, cwd=cwd_of(name, before))
                if r["code"] not in (0, 1):
                    raise SystemExit(f"{name} failed ({r['code']}): {r['stderr'].decode()[-500:]}")
                samples[name].append(r)
        row: dict[str, Any] = {"entries": n, "bytes": n * 4096}
        for name, rs in samples.items():
            row[name] = {"peak_rss_mib": round(max(r["rss_mib"] for r in rs), 1),
                         "median_s": round(statistics.median(r["seconds"] for r in rs), 3),
                         "cpu_median_s": round(statistics.median(r["cpu_s"] for r in rs), 3)}
        out.append(row)
        shutil.rmtree(images)
    return out


def settle(path: Path) -> None:
    """Read a file once (1 MiB at a time): the first command measured does not pay for the page cache alone."""
    buf = bytearray(1 << 20)
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass


def measure_commands(counts: list[int], commands: list[str], runs: int, rules: Path, work: Path, out_dir: Path,
                     before: str | None, nvmas: int = 64) -> list[dict[str, Any]]:
    """Peak RSS (and seconds) of each command on synthetic checkpoints with many entries, this tree and
    `before` interleaved; each run's output is removed after it."""
    rows = []
    for n in counts:
        make = f"from benchmarks.scan_bench import synthetic; synthetic({n}, {str(work)!r}, {nvmas})"
        subprocess.run([PY, "-c", make], check=True, cwd=ROOT)
        images = work / f"entries-{n}"
        settle(images / "pages-1.img")
        row: dict[str, Any] = {"entries": n, "bytes": n * 4096}
        for command in commands:
            out = out_dir / f"{command}-out"
            methods = {command: command_cmd(command, rules, images, out, 0x7F0000000000)}
            if before:
                methods[f"{command}-before"] = command_cmd(command, rules, images, out, 0x7F0000000000, before)
            samples: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
            for _ in range(runs):
                for name, cmd in methods.items():
                    r = run_child(cmd, cwd=cwd_of(name, before), stdout_path=os.devnull)
                    shutil.rmtree(out, ignore_errors=True)
                    if out.exists():
                        out.unlink()
                    if r["code"] not in COMMANDS[command][1]:
                        raise SystemExit(f"{name} failed ({r['code']}): {r['stderr'].decode()[-500:]}")
                    samples[name].append(r)
            for name, rs in samples.items():
                row[name] = {"peak_rss_mib": round(max(r["rss_mib"] for r in rs), 1),
                             "median_s": round(statistics.median(r["seconds"] for r in rs), 3),
                             "cpu_median_s": round(statistics.median(r["cpu_s"] for r in rs), 3)}
        rows.append(row)
        shutil.rmtree(images)
    return rows


def print_commands(rows: list[dict[str, Any]], commands: list[str], before: bool) -> None:
    """One table: a row per checkpoint size, per command its peak RSS (before -> after with --before)."""
    print("| entries | memory | " + " | ".join(f"{c} peak RSS" for c in commands) + " |")
    print("|---:|---:|" + "---:|" * len(commands))
    for r in rows:
        cells = []
        for c in commands:
            now = f"{r[c]['peak_rss_mib']} MiB"
            cells.append(f"{r[f'{c}-before']['peak_rss_mib']} -> {now}" if before else now)
        print(f"| {r['entries']} | {r['bytes'] >> 20} MiB | " + " | ".join(cells) + " |")
    print("CPU seconds, medians: " + "; ".join(
        f"{r['entries']}: " + ", ".join(f"{m} {v['cpu_median_s']}" for m, v in r.items() if isinstance(v, dict))
        for r in rows))


def measure(shape_name: str, runs: int, rules: Path, work: Path, before: str | None = None) -> dict[str, Any]:
    images = generate(SHAPES[shape_name])
    out = work / f"extract-{shape_name}"
    if not out.exists():
        subprocess.run([PY, "-m", "crit_pageread", "extract", str(images), "-o", str(out)], check=True,
                       stdout=subprocess.DEVNULL)
    files = sorted(str(p) for p in out.rglob("*.bin"))
    file_bytes = sum(os.path.getsize(f) for f in files)
    methods = {"scan": scan_cmd(rules, images), "yara-x-files": [*PIN, PY, "-c", YARA_FILES, str(rules), *files]}
    if before:
        methods["scan-before"] = scan_cmd(rules, images, before)
    samples: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    for round_ in range(runs + 1):  # round 0 warms the cache and is not counted
        for name, cmd in methods.items():
            r = run_child(cmd, cwd=cwd_of(name, before))
            if r["code"] not in (0, 1):
                raise SystemExit(f"{name} failed ({r['code']}): {r['stderr'].decode()[-500:]}")
            if round_:
                samples[name].append(r)
    scanned = 0
    last = samples["scan"][-1]
    for line in last["stderr"].decode().splitlines():
        if " MiB in " in line:
            scanned = int(float(line.split(" processes, ")[1].split(" MiB")[0]) * (1 << 20))

    def phase(name: str, r: dict[str, Any]) -> float:
        if name.startswith("scan"):
            line = next(x for x in r["stderr"].decode().splitlines() if " MiB in " in x)
            found = re.search(r", ([0-9.]+) s, ", line)
            assert found, line
            return float(found.group(1))
        return float(r["stdout"].split()[2])
    matches_scan = len(last["stdout"].splitlines())
    result: dict[str, Any] = {"shape": shape_name, "checkpoint": str(images), "runs": runs,
                              "scanned_bytes": scanned, "file_bytes": file_bytes, "files": len(files),
                              "scan_matches": matches_scan,
                              "files_matches": int(samples["yara-x-files"][-1]["stdout"].split()[1])}
    for name, rs in samples.items():
        secs = statistics.median(r["seconds"] for r in rs)
        size = scanned if name.startswith("scan") else file_bytes
        phase_s = statistics.median(phase(name, r) for r in rs)
        result[name] = {"median_s": round(secs, 3), "min_s": round(min(r["seconds"] for r in rs), 3),
                        "cpu_median_s": round(statistics.median(r["cpu_s"] for r in rs), 3),
                        "mib_per_s": round(size / secs / (1 << 20), 1), "phase_median_s": round(phase_s, 3),
                        "phase_mib_per_s": round(size / phase_s / (1 << 20), 1),
                        "peak_rss_mib": round(max(r["rss_mib"] for r in rs), 1)}
    result["ratio"] = round(result["scan"]["mib_per_s"] / result["yara-x-files"]["mib_per_s"], 3)
    result["phase_ratio"] = round(result["scan"]["phase_mib_per_s"] / result["yara-x-files"]["phase_mib_per_s"], 3)
    result["phase_time_ratio"] = round(result["yara-x-files"]["phase_median_s"] / result["scan"]["phase_median_s"], 3)
    if before:
        result["before_ratio"] = round(result["scan-before"]["mib_per_s"] / result["yara-x-files"]["mib_per_s"], 3)
        result["before_phase_ratio"] = round(
            result["scan-before"]["phase_mib_per_s"] / result["yara-x-files"]["phase_mib_per_s"], 3)
        result["before_phase_time_ratio"] = round(
            result["yara-x-files"]["phase_median_s"] / result["scan-before"]["phase_median_s"], 3)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="plain,big,frag")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--rules", default=str(ROOT / "examples" / "rules.yar"))
    parser.add_argument("--before", metavar="TREE", help="also scan with the crit-pageread checkout TREE")
    parser.add_argument("--entries", metavar="N,...", help="peak RSS on synthetic checkpoints of N entries instead")
    parser.add_argument("--commands", metavar="CMD,...",
                        help=f"with --entries: peak RSS of these commands ({','.join(COMMANDS)}) instead of scan's")
    parser.add_argument("--vmas", type=int, default=64, metavar="N",
                        help="with --commands: the synthetic process's entries over N VMAs (default 64)")
    parser.add_argument("--out", metavar="DIR", help="with --commands: where the commands write (default: temporary)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    before = str(Path(args.before).resolve()) if args.before else None
    with tempfile.TemporaryDirectory(prefix="scan-bench-") as tmp:
        if args.entries and args.commands:
            commands = args.commands.split(",")
            unknown = set(commands) - set(COMMANDS)
            if unknown:
                parser.error(f"--commands: unknown {', '.join(sorted(unknown))}")
            out_dir = Path(args.out) if args.out else Path(tmp)
            out_dir.mkdir(parents=True, exist_ok=True)
            rows = measure_commands([int(x) for x in args.entries.split(",")], commands, args.runs, Path(args.rules),
                                    Path(tmp), out_dir, before, args.vmas)
            if args.json:
                print(json.dumps(rows, indent=2))
            else:
                print_commands(rows, commands, before is not None)
            return
        if args.entries:
            rows = measure_entries([int(x) for x in args.entries.split(",")], args.runs, Path(args.rules), Path(tmp),
                                   before)
            if args.json:
                print(json.dumps(rows, indent=2))
                return
            extra = " before: peak RSS | s (CPU s) |" if before else ""
            print("| entries | memory | scan peak RSS | s (CPU s) |" + extra)
            print("|---:|---:|---:|---:|" + ("---:|---:|" if before else ""))
            for r in rows:
                line = (f"| {r['entries']} | {r['bytes'] >> 20} MiB | {r['scan']['peak_rss_mib']} MiB | "
                        f"{r['scan']['median_s']} ({r['scan']['cpu_median_s']}) |")
                if before:
                    b = r["scan-before"]
                    line += f" {b['peak_rss_mib']} MiB | {b['median_s']} ({b['cpu_median_s']}) |"
                print(line)
            return
        results = [measure(s, args.runs, Path(args.rules), Path(tmp), before) for s in args.shapes.split(",")]
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print("| shape | memory | end to end: scan / yara-x on files MiB/s | ratio | scan phase: scan / yara-x MiB/s "
          "| ratio | time ratio | peak RSS scan / yara-x |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        s, y = r["scan"], r["yara-x-files"]
        print(f"| {r['shape']} | {r['scanned_bytes'] >> 20} MiB | {s['mib_per_s']} / {y['mib_per_s']} | "
              f"{r['ratio']}x | {s['phase_mib_per_s']} / {y['phase_mib_per_s']} | {r['phase_ratio']}x | "
              f"{r['phase_time_ratio']}x | {s['peak_rss_mib']} / {y['peak_rss_mib']} MiB |")
        if before:
            b = r["scan-before"]
            print(f"| {r['shape']} before | | {b['mib_per_s']} / {y['mib_per_s']} | {r['before_ratio']}x | "
                  f"{b['phase_mib_per_s']} / {y['phase_mib_per_s']} | {r['before_phase_ratio']}x | "
                  f"{r['before_phase_time_ratio']}x | {b['peak_rss_mib']} MiB |")
    print("CPU seconds, medians: " + "; ".join(
        f"{r['shape']} " + ", ".join(f"{m} {r[m]['cpu_median_s']}" for m in ("scan", "scan-before", "yara-x-files")
                                     if m in r) for r in results))


if __name__ == "__main__":
    main()
