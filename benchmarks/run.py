"""Every benchmark of issue 6, side by side on large real CRIU checkpoints: `make bench`.

For each checkpoint shape (benchmarks/generate.py) and cache state (warm;
cold when /proc/sys/vm/drop_caches can be written), interleaved rounds of:

- materializing all pages of all pids into one preallocated buffer with each
  strategy, against the physical limit (`readinto` of the same pages files in
  64 MiB chunks into the same kind of buffer) and `cat FILES > /dev/null`;
- streaming commands: `crit-pageread grep` against `grep -c -a -F` over the
  pages files, `crit-pageread extract` against `cat FILES > file`
  (each only if the command exists);
- the grep suite (warm): a literal present and one absent against
  `grep -c -a -F`, a regex against `grep -c -a -E`, 500 literals with `-f`
  against `grep -c -a -F -f`, `--strings` against `strings -a | grep`;

every measurement in its own process (its peak RSS is `ru_maxrss` from
wait4), a warm-up round first, medians of the timed rounds. Then syscall
counts per strategy under `strace -c -f` against the number of contiguous
file runs, and `benchmarks/remote_bench.py` if present. Writes
results.json, results.md (the tables) and throughput.png to --out.

The warm cache is the one a read of the pages files leaves (`--warm-from read`: each shape's files are
evicted and read once first), not whatever CRIU's writes left (`--warm-from as-is`).

usage: python -m benchmarks.run [--shapes big,frag,chain] [--runs 5] [--warmup 1]
                                [--no-cold] [--no-stream] [--no-strace] [--grep-shapes plain,big]
                                [--warm-from read|as-is] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.commands_bench import set_aside
from benchmarks.generate import SHAPES, cache_root, generate
from benchmarks.spawn import spawn
from crit_pageread.cli.bench import drop_caches

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
CLI = [PY, "-m", "crit_pageread"]
STRATEGIES = ["pread", "preadv", "mmap"]
LIMIT = "readinto-limit"
PATTERN = "CRIT-PAGEREAD-SECRET-7-spans"  # the victim's secret (seed 7): a rare literal
RSS_TARGET_MIB = 128
STREAM_TARGET_MIN_BYTES = 256 << 20


def run_child(cmd: list[str], stdout_path: str | None = None, cwd: Path | None = None) -> dict[str, Any]:
    """Run `cmd` from the small spawner (benchmarks/spawn.py: so its peak RSS is its own, not this process's),
    reaped with wait4: wall seconds, output, exit code, its own peak RSS (MiB), CPU seconds and faults."""
    return spawn(cmd, stdout_path, cwd)


def can_drop_caches() -> str | None:
    """None if the page cache can be dropped (it is, once), else why not."""
    return drop_caches()


def drop() -> None:
    problem = drop_caches()
    if problem:
        raise OSError(problem)


WARM_FROM = {"read": "as one read of the pages files leaves it", "as-is": "as found (not settled)"}


def settle_cache(files: list[str]) -> None:
    """Leave `files` in the page cache as reading them leaves it: each is written back, evicted
    (POSIX_FADV_DONTNEED: no root needed) and read once from start to end, so readahead fills the cache
    (with the kernel's large folios). A file CRIU has just written is cached as its writes left it (pages
    spliced one by one), which costs mmap's faults and small copies several times more; "warm" should not
    depend on which process last wrote a checkpoint."""
    buf = bytearray(1 << 20)
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            while os.readv(fd, [buf]):
                pass
        finally:
            os.close(fd)


def median_of(samples: list[dict[str, Any]], nbytes: int) -> dict[str, Any]:
    secs = [s["seconds"] for s in samples]
    med = statistics.median(secs)
    out = {
        "runs": len(secs),
        "median_s": med,
        "min_s": min(secs),
        "max_s": max(secs),
        "spread": (max(secs) - min(secs)) / med if med else 0.0,
        "bytes": nbytes,
        "gb_per_s": nbytes / med / 1e9 if med else math.inf,
        "peak_rss_mib": max(s["rss_mib"] for s in samples),
    }
    cpu = [s["cpu_s"] for s in samples if "cpu_s" in s]
    if cpu:
        out["median_cpu_s"] = statistics.median(cpu)
    for key in ("calls", "calls_by_pid", "buffer_bytes", "minflt"):
        if key in samples[0]:
            out[key] = samples[0][key]
    if "buffer_bytes" in out:
        out["rss_over_buffer_mib"] = out["peak_rss_mib"] - out["buffer_bytes"] / 2**20
    return out


# --- materialize ---------------------------------------------------------------------------


def materialize_round(directory: Path, files: list[str], method: str) -> dict[str, Any]:
    if method == "cat":
        res = run_child(["cat", *files], stdout_path=os.devnull)
        res["bytes"] = sum(os.path.getsize(f) for f in files)
        return res
    res = run_child([PY, "-m", "benchmarks.worker", "materialize", str(directory), method], cwd=ROOT)
    if res["code"] != 0:
        raise RuntimeError(f"worker {method} on {directory} failed: {res['stderr'].decode()[-2000:]}")
    inner = json.loads(res["stdout"])
    inner["rss_mib"] = res["rss_mib"]
    inner["minflt"] = res["minflt"]
    return inner


def bench_materialize(
    directory: Path, plan: dict[str, Any], modes: list[str], runs: int, warmup: int
) -> dict[str, Any]:
    methods = [LIMIT, "cat", *STRATEGIES]
    out: dict[str, Any] = {}
    for mode in modes:
        samples: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
        for round_ in range(warmup + runs):
            for method in methods:
                if mode == "cold":
                    drop()
                res = materialize_round(directory, plan["pages_files"], method)
                if round_ >= warmup:
                    samples[method].append(res)
        results = {}
        for method, got in samples.items():
            nbytes = got[0]["bytes"]
            results[method] = median_of(got, nbytes)
        limit = results[LIMIT]["gb_per_s"]
        limit_cpu = results[LIMIT].get("median_cpu_s")
        for res in results.values():
            res["vs_limit"] = res["gb_per_s"] / limit
            # The same ratio in CPU seconds of the read phase (steadier than wall time on a loaded machine).
            if limit_cpu and res.get("median_cpu_s"):
                res["cpu_vs_limit"] = (res["bytes"] / res["median_cpu_s"]) / (results[LIMIT]["bytes"] / limit_cpu)
        out[mode] = results
        print(f"  materialize {mode}: " + ", ".join(f"{m} {r['gb_per_s']:.2f} GB/s" for m, r in results.items()),
              flush=True)
    return out


# --- syscalls ------------------------------------------------------------------------------


def parse_strace(text: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 5 or not re.match(r"^[\d.]+$", parts[0]):
            continue
        name = parts[-1]
        if name == "total":
            continue
        try:
            counts[name] = int(parts[3])
        except ValueError:
            continue
    return counts


def bench_syscalls(directory: Path, plan: dict[str, Any]) -> dict[str, Any]:
    if not shutil.which("strace"):
        return {"skipped": "strace not installed"}
    out: dict[str, Any] = {}
    runs_by_pid = plan["file_runs_by_pid"]
    iovecs_by_pid = plan["iovec_runs_by_pid"]
    iov_max = plan["iov_max"]
    base: dict[str, int] = {}
    for method in ["baseline", LIMIT, *STRATEGIES]:
        with tempfile.NamedTemporaryFile(suffix=".strace") as log:
            res = run_child(
                ["strace", "-f", "-c", "-o", log.name, PY, "-m", "benchmarks.worker", "materialize",
                 str(directory), method],
                cwd=ROOT,
            )
            if res["code"] != 0:
                raise RuntimeError(f"strace worker {method} failed: {res['stderr'].decode()[-2000:]}")
            counts = parse_strace(Path(log.name).read_text())
        inner = json.loads(res["stdout"])
        if method == "baseline":
            base = counts
            continue
        # Net of the baseline run (interpreter start-up, imports, opening the images, the buffer).
        net = {k: counts.get(k, 0) - base.get(k, 0) for k in
               ("read", "pread64", "preadv", "preadv2", "readv", "mmap", "munmap", "madvise")}
        data_calls = sum(net[n] for n in ("pread64", "preadv", "preadv2", "readv"))
        entry: dict[str, Any] = {
            "syscalls": {k: v for k, v in net.items() if v},
            "syscalls_raw": {k: counts.get(k, 0) for k in net},
            "positioned_read_calls": data_calls,
        }
        if method == "preadv":
            by_pid = inner["calls_by_pid"]
            # A run here is what one iovec holds: contiguous in a pages file and in memory.
            bound = {pid: math.ceil(iovecs_by_pid[pid] / iov_max) + 1 for pid in by_pid}
            entry["calls_by_pid"] = by_pid
            entry["bound_by_pid"] = bound
            entry["within_bound"] = all(by_pid[p] <= bound[p] for p in by_pid)
        out[method] = entry
    out["file_runs"] = sum(runs_by_pid.values())
    out["file_runs_by_pid"] = runs_by_pid
    out["iovec_runs"] = sum(iovecs_by_pid.values())
    out["entries_read"] = sum(plan["read_entries_by_pid"].values())
    print("  syscalls: " + ", ".join(
        f"{m} {v['positioned_read_calls']}" for m, v in out.items() if isinstance(v, dict) and "syscalls" in v
    ) + f" (file runs {out['file_runs']}, iovec runs {out['iovec_runs']}, entries {out['entries_read']})",
          flush=True)
    return out


# --- streaming -----------------------------------------------------------------------------


def has_command(name: str) -> bool:
    res = subprocess.run([*CLI, name, "--help"], capture_output=True, cwd=ROOT)
    return res.returncode == 0


def bench_stream(directory: Path, plan: dict[str, Any], modes: list[str], runs: int, warmup: int,
                 scratch: Path) -> dict[str, Any]:
    files = plan["pages_files"]
    nbytes = plan["pages_file_bytes"]
    pairs: dict[str, tuple[list[str], str | None]] = {}
    if has_command("grep"):
        pairs["crit-pageread grep"] = ([*CLI, "grep", str(directory), PATTERN], None)
        pairs["grep -c -a -F"] = (["grep", "-c", "-a", "-F", PATTERN, *files], None)
    if has_command("extract"):
        pairs["crit-pageread extract"] = ([*CLI, "extract", str(directory), "-o", str(scratch / "out")], None)
        pairs["cat > file"] = (["cat", *files], str(scratch / "cat.out"))
    if not pairs:
        return {"skipped": "neither crit-pageread grep nor extract exists yet"}
    # The fixed cost in every command's time: interpreter start, imports, plugin loading.
    pairs["crit-pageread --version (startup)"] = ([*CLI, "--version"], None)
    out: dict[str, Any] = {}
    for mode in modes:
        samples: dict[str, list[dict[str, Any]]] = {k: [] for k in pairs}
        for round_ in range(warmup + runs):
            for name, (cmd, stdout_path) in pairs.items():
                # Emptied and kept until the end, not deleted: see commands_bench.set_aside.
                set_aside(scratch / "out", scratch / "trash")
                set_aside(scratch / "cat.out", scratch / "trash")
                # No command pays for writing back an earlier one's output.
                os.sync()
                if mode == "cold":
                    drop()
                res = run_child(cmd, stdout_path=stdout_path, cwd=ROOT)
                if res["code"] not in (0, 1):  # grep: 1 = no match
                    raise RuntimeError(f"{name} failed ({res['code']}): {res['stderr'].decode()[-2000:]}")
                if round_ >= warmup:
                    samples[name].append(res)
        set_aside(scratch / "out", scratch / "trash")
        set_aside(scratch / "cat.out", scratch / "trash")
        results = {name: median_of(got, nbytes) for name, got in samples.items()}
        del results["crit-pageread --version (startup)"]["gb_per_s"]
        if "crit-pageread grep" in results:
            results["crit-pageread grep"]["vs_baseline"] = (
                results["grep -c -a -F"]["median_s"] / results["crit-pageread grep"]["median_s"])
        if "crit-pageread extract" in results:
            results["crit-pageread extract"]["vs_baseline"] = (
                results["cat > file"]["median_s"] / results["crit-pageread extract"]["median_s"])
        out[mode] = results
        print(f"  stream {mode}: " + ", ".join(
            f"{k} {r['median_s']:.3f} s rss {r['peak_rss_mib']:.0f} MiB" for k, r in results.items()), flush=True)
    return out


# --- grep suite ----------------------------------------------------------------------------

ABSENT = "CRIT-PAGEREAD-NOT-THERE-9x7q"
REGEX = "CRIT-[A-Z]+-SECRET-[0-9]+-spans"
MANY = 500


def many_literals(path: Path) -> Path:
    """MANY literals, one a line (grep -f): random tokens that are not in memory, and the secret."""
    import random

    rng = random.Random(7)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    words = {"".join(rng.choice(alphabet) for _ in range(rng.randint(8, 20))) for _ in range(MANY - 1)}
    path.write_text("\n".join([*sorted(words), PATTERN]) + "\n")
    return path


def bench_grep(directory: Path, plan: dict[str, Any], runs: int, warmup: int, scratch: Path) -> dict[str, Any]:
    """`crit-pageread grep` against GNU grep over the pages files (and `strings -a | grep`), warm cache:
    a literal that is there, one that is not, a regex, MANY literals at once."""
    files = plan["pages_files"]
    nbytes = plan["pages_file_bytes"]
    patterns = many_literals(scratch / "patterns.txt")
    quoted = " ".join(f"'{f}'" for f in files)
    suite: dict[str, tuple[list[str], list[str]]] = {
        "literal, present": ([*CLI, "grep", str(directory), PATTERN], ["grep", "-c", "-a", "-F", PATTERN, *files]),
        "literal, absent": ([*CLI, "grep", str(directory), ABSENT], ["grep", "-c", "-a", "-F", ABSENT, *files]),
        "-E": ([*CLI, "grep", str(directory), "-E", REGEX], ["grep", "-c", "-a", "-E", REGEX, *files]),
        f"{MANY} literals, -f": ([*CLI, "grep", str(directory), "-f", str(patterns)],
                                 ["grep", "-c", "-a", "-F", "-f", str(patterns), *files]),
        "--strings": ([*CLI, "grep", str(directory), "--strings", PATTERN],
                      ["sh", "-c", f"strings -a {quoted} | grep -c -F '{PATTERN}'"]),
    }
    for case in list(suite):  # a case the code measured cannot run (an older crit-pageread): left out
        probe = run_child([*CLI, "grep", "--help"], cwd=ROOT)
        if case.endswith("-f") and b"--file" not in probe["stdout"]:
            del suite[case]
    names = [(case, who) for case in suite for who in ("ours", "baseline")]
    samples: dict[tuple[str, str], list[dict[str, Any]]] = {k: [] for k in names}
    for round_ in range(warmup + runs):
        for case, who in names:
            cmd = suite[case][0 if who == "ours" else 1]
            res = run_child(cmd, cwd=ROOT)
            if res["code"] not in (0, 1):
                raise RuntimeError(f"grep suite {case} {who} failed ({res['code']}): {res['stderr'].decode()[-2000:]}")
            if round_ >= warmup:
                samples[(case, who)].append(res)
    out: dict[str, Any] = {}
    for case in suite:
        ours = median_of(samples[(case, "ours")], nbytes)
        base = median_of(samples[(case, "baseline")], nbytes)
        out[case] = {"ours": ours, "baseline": base, "vs_baseline": base["median_s"] / ours["median_s"],
                     "cpu_vs_baseline": base["median_cpu_s"] / ours["median_cpu_s"],
                     "ours_cmd": " ".join(suite[case][0][2:]), "baseline_cmd": " ".join(suite[case][1])}
    print("  grep suite: " + ", ".join(f"{c} {r['vs_baseline']:.2f}x" for c, r in out.items()), flush=True)
    return out


# --- remote --------------------------------------------------------------------------------


def bench_remote(out_dir: Path) -> dict[str, Any]:
    script = ROOT / "benchmarks" / "remote_bench.py"
    if not script.exists():
        return {"skipped": "benchmarks/remote_bench.py is not present"}
    res = run_child([PY, "-m", "benchmarks.remote_bench", "--json"], cwd=ROOT)
    text = res["stdout"].decode(errors="replace")
    try:
        data = json.loads(text)
    except ValueError:
        data = {"output": text[-4000:]}
    return {"code": res["code"], "peak_rss_mib": res["rss_mib"], "result": data,
            "stderr": res["stderr"].decode(errors="replace")[-2000:]}


# --- report --------------------------------------------------------------------------------


def evaluate(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets against the measured medians."""
    targets = []
    shapes = results["shapes"]
    big = shapes.get("big", {}).get("materialize", {}).get("warm")  # absent with --no-materialize
    if big:
        ratio = big["preadv"]["vs_limit"]
        targets.append({"target": "preadv >= 0.9x readinto limit (1 GiB, warm)", "value": round(ratio, 3),
                        "met": ratio >= 0.9})
    big_cold = shapes.get("big", {}).get("materialize", {}).get("cold")
    if big_cold:
        ratio = big_cold["preadv"]["vs_limit"]
        targets.append({"target": "preadv >= 0.9x readinto limit (1 GiB, cold)", "value": round(ratio, 3),
                        "met": ratio >= 0.9})
    for mode in ("warm", "cold"):
        frag = shapes.get("frag", {}).get("materialize", {}).get(mode)
        if frag:
            ratio = frag["preadv"]["gb_per_s"] / frag["pread"]["gb_per_s"]
            targets.append({"target": f"preadv >= 2x pread (fragmented, {mode})", "value": round(ratio, 3),
                            "met": ratio >= 2})
    for name, shape in shapes.items():
        mat = shape.get("materialize", {}).get("warm")
        if mat:
            want = {"plain": 0.95, "big": 0.95, "frag": 0.85, "chain": 0.8, "chain-real": 0.8}.get(name)
            if want:
                ratio = mat["preadv"]["vs_limit"]
                targets.append({"target": f"preadv >= {want}x readinto limit ({name}, warm)",
                                "value": round(ratio, 3), "met": ratio >= want})
            low = min(mat[m]["vs_limit"] for m in ("pread", "mmap"))
            targets.append({"target": f"pread and mmap >= 0.7x readinto limit ({name}, warm)",
                            "value": round(low, 3), "met": low >= 0.7})
            if all("cpu_vs_limit" in mat[m] for m in STRATEGIES):  # the same in CPU seconds (shown beside)
                if want:
                    ratio = mat["preadv"]["cpu_vs_limit"]
                    targets.append({"target": f"preadv >= {want}x readinto limit, CPU seconds ({name}, warm)",
                                    "value": round(ratio, 3), "met": ratio >= want})
                low = min(mat[m]["cpu_vs_limit"] for m in ("pread", "mmap"))
                targets.append({"target": f"pread and mmap >= 0.7x readinto limit, CPU seconds ({name}, warm)",
                                "value": round(low, 3), "met": low >= 0.7})
        for case, res in shape.get("grep", {}).items():
            want = 3.0 if case.endswith("-f") else 1.0
            v = res["vs_baseline"]
            targets.append({"target": f"grep {case} >= {want}x {res['baseline_cmd'].split(' PAGES')[0][:40]} ({name})",
                            "value": round(v, 3), "met": v >= want})
        sc = shape.get("syscalls", {}).get("preadv")
        if sc:
            targets.append({"target": f"preadv calls <= ceil(iovec runs/IOV_MAX)+1 per pagemap ({name})",
                            "value": {"calls": sc["calls_by_pid"], "bound": sc["bound_by_pid"]},
                            "met": sc["within_bound"]})
        # The issue sets the streaming speed targets on checkpoints of >= 256 MiB; smaller ones are shown.
        big_enough = shape.get("plan", {}).get("pages_file_bytes", 0) >= STREAM_TARGET_MIN_BYTES
        for mode, res in shape.get("stream", {}).items():
            if not isinstance(res, dict):
                continue
            for cmd in ("crit-pageread grep", "crit-pageread extract"):
                if cmd in res:
                    rss = res[cmd]["peak_rss_mib"]
                    targets.append({"target": f"{cmd} peak RSS <= {RSS_TARGET_MIB} MiB ({name}, {mode})",
                                    "value": round(rss, 1), "met": rss <= RSS_TARGET_MIB})
            if "crit-pageread grep" in res:
                v = res["crit-pageread grep"]["vs_baseline"]
                targets.append({"target": f"grep >= 0.5x grep -c -a -F ({name}, {mode})", "value": round(v, 3),
                                "met": v >= 0.5 if big_enough else None})
            if "crit-pageread extract" in res:
                v = res["crit-pageread extract"]["vs_baseline"]
                targets.append({"target": f"extract >= 0.9x cat > file ({name}, {mode})", "value": round(v, 3),
                                "met": v >= 0.9 if big_enough else None})
    return targets


def tables(results: dict[str, Any]) -> str:
    lines = [f"Benchmarks ({results['environment']['date']}, {results['environment']['kernel']}, "
             f"{results['environment']['cpus']} CPUs, load {results['environment']['loadavg_before']} -> "
             f"{results['environment']['loadavg_after']}; medians of {results['runs']} runs after "
             f"{results['warmup']} warm-up; warm cache: "
             f"{WARM_FROM[results['environment'].get('warm_from', 'as-is')]})", ""]
    for name, shape in results["shapes"].items():
        plan = shape["plan"]
        entries = sum(plan["entries_by_pid"].values())
        vmas = sum(plan["vmas_by_pid"].values())
        lines.append(f"### {name}: {plan['materialized_bytes'] / 2**20:.0f} MiB materialized, {entries} pagemap "
                     f"entries, {vmas} VMAs, {sum(plan['file_runs_by_pid'].values())} file runs, "
                     f"{plan['levels']} image level(s)")
        lines.append("")
        lines.append("| cache | method | median s | GB/s | vs limit | CPU s | CPU vs limit | spread | peak RSS MiB | "
                     "RSS over buffer MiB |")
        lines.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for mode, res in shape["materialize"].items():
            for method, r in res.items():
                over = f"{r['rss_over_buffer_mib']:.0f}" if "rss_over_buffer_mib" in r else "-"
                cpu = f"{r['median_cpu_s']:.4f}" if "median_cpu_s" in r else "-"
                cpu_ratio = f"{r['cpu_vs_limit']:.2f}x" if "cpu_vs_limit" in r else "-"
                lines.append(f"| {mode} | {method} | {r['median_s']:.4f} | {r['gb_per_s']:.2f} | "
                             f"{r['vs_limit']:.2f}x | {cpu} | {cpu_ratio} | {r['spread']:.0%} | "
                             f"{r['peak_rss_mib']:.0f} | {over} |")
        sc = shape.get("syscalls", {})
        if "preadv" in sc:
            lines.append("")
            lines.append(f"Syscalls (strace -c -f, net of a run that does everything but the reads), "
                         f"{sc['entries_read']} entries read, {sc['file_runs']} file runs, "
                         f"{sc.get('iovec_runs', '?')} iovec runs (contiguous in file and memory):")
            lines.append("")
            lines.append("| method | positioned reads | read | mmap | preadv calls by pid (bound) |")
            lines.append("|---|---:|---:|---:|---|")
            for method in [LIMIT, *STRATEGIES]:
                v = sc[method]
                extra = ""
                if method == "preadv":
                    calls, bound = v["calls_by_pid"], v["bound_by_pid"]
                    extra = ", ".join(f"{p}: {calls[p]} ({bound[p]})" for p in calls)
                lines.append(f"| {method} | {v['positioned_read_calls']} | {v['syscalls'].get('read', 0)} | "
                             f"{v['syscalls'].get('mmap', 0)} | {extra} |")
        stream = shape.get("stream", {})
        if stream and "skipped" not in stream:
            lines.append("")
            lines.append("| cache | command | median s | GB/s of pages files | vs baseline | peak RSS MiB |")
            lines.append("|---|---|---:|---:|---:|---:|")
            for mode, res in stream.items():
                for cmd, r in res.items():
                    vs = f"{r['vs_baseline']:.2f}x" if "vs_baseline" in r else "baseline"
                    rate = f"{r['gb_per_s']:.2f}" if "gb_per_s" in r else "-"
                    if "startup" in cmd:
                        vs = "-"
                    lines.append(f"| {mode} | {cmd} | {r['median_s']:.3f} | {rate} | {vs} | "
                                 f"{r['peak_rss_mib']:.0f} |")
        elif stream:
            lines.append("")
            lines.append(f"Streaming: {stream['skipped']}")
        suite = shape.get("grep", {})
        if suite:
            lines.append("")
            lines.append("grep suite, warm cache (GB/s of pages files; ratio = baseline time / ours):")
            lines.append("")
            lines.append("| case | crit-pageread grep s | GB/s | baseline | baseline s | GB/s | ratio | peak RSS MiB |")
            lines.append("|---|---:|---:|---|---:|---:|---:|---:|")
            for case, r in suite.items():
                o, b = r["ours"], r["baseline"]
                base_cmd = r["baseline_cmd"].split(" /")[0].split(" '/")[0]
                lines.append(f"| {case} | {o['median_s']:.3f} | {o['gb_per_s']:.2f} | `{base_cmd}` | "
                             f"{b['median_s']:.3f} | {b['gb_per_s']:.2f} | {r['vs_baseline']:.2f}x | "
                             f"{o['peak_rss_mib']:.0f} |")
        lines.append("")
    remote = results.get("remote", {})
    res = remote.get("result", {}) if isinstance(remote, dict) else {}
    if isinstance(res, dict) and "plain" in res:
        lines.append("### remote: page-server fetch against a plain socket copy (benchmarks/remote_bench.py)")
        lines.append("")
        lines.append(f"{res.get('images', '')}, median of {res.get('reps', '?')} runs; peak RSS of the whole "
                     f"benchmark process {remote['peak_rss_mib']:.0f} MiB")
        lines.append("")
        lines.append("| method | MiB | median s | MiB/s |")
        lines.append("|---|---:|---:|---:|")
        for name in ("plain", "serve", "criu"):
            if isinstance(res.get(name), dict):
                r = res[name]
                lines.append(f"| {name} | {r['bytes'] / 2**20:.0f} | {r['median_s']:.3f} | {r['MiB_per_s']:.0f} |")
        ratios = ", ".join(f"{k} {v}" for k, v in res.items() if k.endswith(("_vs_plain", "_vs_criu")))
        lines.append("")
        lines.append(f"Ratios: {ratios}")
        lines.append("")
    elif remote:
        lines.append(f"Remote: {remote.get('skipped') or remote.get('stderr', '')[-300:]}")
        lines.append("")
    lines.append("### Targets")
    lines.append("")
    lines.append("| target | measured | met |")
    lines.append("|---|---|---|")
    for t in results["targets"]:
        met = "shown only (target is for >= 256 MiB)" if t["met"] is None else "yes" if t["met"] else "NO"
        lines.append(f"| {t['target']} | {t['value']} | {met} |")
    if results.get("cold_note"):
        lines.append("")
        lines.append(f"Cold cache: {results['cold_note']}")
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install -e '.[bench]'): no plot"
    shapes = list(results["shapes"])
    modes = [m for m in ("warm", "cold") if any(m in s["materialize"] for s in results["shapes"].values())]
    methods = [LIMIT, "cat", *STRATEGIES]
    has_stream = any("warm" in s.get("stream", {}) for s in results["shapes"].values())
    ncols = len(modes) + (1 if has_stream else 0)
    if not ncols:
        return "nothing to plot"
    fig, axes = plt.subplots(1, ncols, figsize=(6 * ncols, 4.5), squeeze=False)
    width = 0.8 / len(methods)
    for col, mode in enumerate(modes):
        ax = axes[0][col]
        for i, method in enumerate(methods):
            got = [results["shapes"][s]["materialize"].get(mode, {}).get(method) for s in shapes]
            vals, err = _rates(got)
            bars = ax.bar([x + i * width for x in range(len(shapes))], vals, width, label=method, yerr=err,
                          error_kw={"elinewidth": 0.6, "capsize": 1.5})
            ax.bar_label(bars, fmt="%.2f", fontsize=6, rotation=90, padding=2)
        ax.set_xticks([x + width * (len(methods) - 1) / 2 for x in range(len(shapes))], shapes)
        ax.set_ylabel("GB/s (median)")
        ax.set_title(f"materialize all pages, {mode} cache (bars: median, whiskers: min-max)", fontsize=9)
        ax.legend(fontsize=7)
    if has_stream:
        ax = axes[0][-1]
        cmds = ["crit-pageread grep", "grep -c -a -F", "crit-pageread extract", "cat > file"]
        sw = 0.8 / len(cmds)
        streamed = [s for s in shapes if "warm" in results["shapes"][s].get("stream", {})]
        for i, cmd in enumerate(cmds):
            got = [results["shapes"][s]["stream"]["warm"].get(cmd) for s in streamed]
            vals, err = _rates(got)
            bars = ax.bar([x + i * sw for x in range(len(streamed))], vals, sw, label=cmd, yerr=err,
                          error_kw={"elinewidth": 0.6, "capsize": 1.5})
            ax.bar_label(bars, fmt="%.2f", fontsize=6, rotation=90, padding=2)
        ax.set_xticks([x + sw * (len(cmds) - 1) / 2 for x in range(len(streamed))], streamed)
        ax.set_ylabel("GB/s of pages files (median)")
        ax.set_title("streaming commands vs coreutils, warm cache")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def _rates(got: list[dict[str, Any] | None]) -> tuple[list[float], list[list[float]]]:
    """Median GB/s per bar and (below, above) whiskers to the slowest and fastest run."""
    vals, low, high = [], [], []
    for r in got:
        if not r or "gb_per_s" not in r:
            vals.append(0.0)
            low.append(0.0)
            high.append(0.0)
            continue
        vals.append(r["gb_per_s"])
        low.append(r["gb_per_s"] - r["bytes"] / r["max_s"] / 1e9)
        high.append(r["bytes"] / r["min_s"] / 1e9 - r["gb_per_s"])
    return vals, [low, high]


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="crit-pageread benchmarks on large real CRIU checkpoints")
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated ({', '.join(SHAPES)})")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--no-cold", action="store_true", help="skip cold-cache rounds")
    parser.add_argument("--no-stream", action="store_true", help="skip grep/extract")
    parser.add_argument("--stream-shapes", default="big,plain,frag,chain-real,jvm",
                        help="shapes the streaming commands run on")
    parser.add_argument("--no-strace", action="store_true")
    parser.add_argument("--grep-shapes", default="plain,big", help="shapes the grep suite runs on (\"\": none)")
    parser.add_argument("--no-materialize", action="store_true", help="skip materializing (and strace)")
    parser.add_argument("--no-remote", action="store_true", help="skip benchmarks/remote_bench.py")
    parser.add_argument("--warm-from", choices=["read", "as-is"], default="read",
                        help="warm cache as one read of the pages files leaves it (default), or as it is "
                             "(e.g. as CRIU's writes left it)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    modes = ["warm"]
    cold_note = None
    if not args.no_cold:
        cold_note = can_drop_caches()
        if cold_note is None:
            modes.append("cold")
        else:
            cold_note = f"not measured: cannot drop caches ({cold_note})"
            print(f"cold cache {cold_note}", file=sys.stderr)
    results: dict[str, Any] = {
        "environment": {
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "kernel": platform.release(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "loadavg_before": loadavg(),
            "warm_from": args.warm_from,
            "note": "shared machine: other processes ran during the measurements; methods are interleaved "
                    "round by round so each comparison sees the same load",
        },
        "runs": args.runs,
        "warmup": args.warmup,
        "modes": modes,
        "cold_note": cold_note,
        "shapes": {},
    }
    scratch = Path(tempfile.mkdtemp(prefix="stream-", dir=cache_root()))
    try:
        for name in [s for s in args.shapes.split(",") if s]:
            directory = generate(SHAPES[name])
            print(f"{name}: {directory}", flush=True)
            res = subprocess.run([PY, "-m", "benchmarks.worker", "plan", str(directory)], capture_output=True,
                                 check=True, cwd=ROOT)
            plan = json.loads(res.stdout)
            shape: dict[str, Any] = {"directory": str(directory), "params": SHAPES[name].__dict__, "plan": plan}
            if args.warm_from == "read":
                settle_cache(plan["pages_files"])
            shape["materialize"] = {} if args.no_materialize else bench_materialize(
                directory, plan, modes, args.runs, args.warmup)
            if not args.no_strace and not args.no_materialize:
                shape["syscalls"] = bench_syscalls(directory, plan)
            if not args.no_stream and name in args.stream_shapes.split(","):
                shape["stream"] = bench_stream(directory, plan, modes, args.runs, args.warmup, scratch)
            if name in args.grep_shapes.split(","):
                shape["grep"] = bench_grep(directory, plan, args.runs, args.warmup, scratch)
            results["shapes"][name] = shape
            # What is measured so far, in case the run is stopped before the end.
            (out_dir / "results.partial.json").write_text(json.dumps(results, indent=2) + "\n")
        results["remote"] = {"skipped": "--no-remote"} if args.no_remote else bench_remote(out_dir)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    results["environment"]["loadavg_after"] = loadavg()
    results["targets"] = evaluate(results)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    text = tables(results)
    (out_dir / "results.md").write_text(text)
    why = plot(results, out_dir / "throughput.png")
    print(text)
    print(why or f"plot: {out_dir / 'throughput.png'}")
    print(f"json: {out_dir / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
