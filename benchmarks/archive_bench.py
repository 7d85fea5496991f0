"""Container checkpoint archives against their unpacked directory: `ps` and `grep`, medians side by side.

A ~200 MiB real CRIU dump (the benchmark victim) is laid out as Podman exports
it (checkpoint/, config.dump, spec.dump, a 64 MiB rootfs-diff.tar; members in
lexical order, as Podman's archiver walks directories), archived as `.tar` and
`.tar.zst`, and each command is run as its own process, interleaved round by
round, warm page cache; wall and CPU seconds (user + system of the children).
Also timed: unpacking the image members (`zstd -d | tar -x checkpoint`, and
`tar -x` of the .tar), which is what a tool that unpacks first pays before it
reads anything. `--before TREE` runs the same commands from another source tree
(an older commit's checkout) interleaved with these.

usage: python -m benchmarks.archive_bench [--runs 5] [--mib 200] [--before TREE] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.generate import Shape, cache_root, generate

PATTERN = "CRIT-PAGEREAD-SECRET"


def layout(images: Path, work: Path) -> tuple[Path, Path, Path]:
    """The Podman layout beside a cached dump, and its .tar and .tar.zst (made once)."""
    ctr = work / "ctr"
    tar, zst = work / "ckpt-sorted.tar", work / "ckpt-sorted.tar.zst"
    if zst.exists() and tar.exists():
        return ctr, tar, zst
    shutil.rmtree(ctr, ignore_errors=True)
    (ctr).mkdir(parents=True)
    shutil.copytree(images, ctr / "checkpoint")
    (ctr / "config.dump").write_text(json.dumps({"id": "0" * 64, "name": "bench", "runtime": "runc",
                                                 "rootfsImageName": "localhost/bench:latest",
                                                 "createdTime": "2026-12-01T00:00:00Z"}))
    (ctr / "spec.dump").write_text(json.dumps({"annotations": {"io.container.manager": "libpod"}}))
    rootfs = work / "rootfs"
    rootfs.mkdir(exist_ok=True)
    with open(rootfs / "blob", "wb") as f:
        for _ in range(64):
            f.write(os.urandom(1 << 20))
    subprocess.run(["tar", "-C", str(rootfs), "-cf", str(ctr / "rootfs-diff.tar"), "."], check=True)
    shutil.rmtree(rootfs)
    members = ["config.dump", "spec.dump", "checkpoint", "rootfs-diff.tar"]
    subprocess.run(["tar", "--sort=name", "-C", str(ctr), "-cf", str(tar), *members], check=True)
    subprocess.run(["zstd", "-q", "-3", "-T2", "-f", str(tar), "-o", str(zst)], check=True)
    return ctr, tar, zst


def timed(cmd: list[str] | str, shell: bool = False, cwd: str | None = None) -> tuple[float, float]:
    """Wall and CPU seconds (user + system of the children) of one run (`cwd`: the tree `python -m` imports)."""
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    res = subprocess.run(cmd, shell=shell, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=cwd)
    took = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if res.returncode not in (0, 1):  # grep's 1 is "no match"
        raise RuntimeError(f"{cmd}: {res.stderr.decode()[-500:]}")
    return took, (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--mib", type=int, default=200)
    parser.add_argument("--before", metavar="TREE", help="also run ps and grep from this source tree, interleaved")
    parser.add_argument("--json", help="write the figures here too")
    args = parser.parse_args(argv)
    shape = Shape("container", args.mib, 32, 0)
    images = generate(shape)
    work = cache_root() / f"archive-{shape.key}"
    work.mkdir(parents=True, exist_ok=True)
    ctr, tar, zst = layout(images, work)
    py = [sys.executable, "-m", "crit_pageread"]
    scratch = Path(tempfile.mkdtemp(prefix="archive-bench-"))
    cases: dict[str, Any] = {
        "ps dir": lambda: timed([*py, "ps", str(ctr)]),
        "ps tar": lambda: timed([*py, "ps", str(tar)]),
        "ps zst": lambda: timed([*py, "ps", str(zst)]),
        "grep dir": lambda: timed([*py, "grep", str(ctr), PATTERN]),
        "grep tar": lambda: timed([*py, "grep", str(tar), PATTERN]),
        "grep zst": lambda: timed([*py, "grep", str(zst), PATTERN]),
        "unpack zst images": lambda: _unpack(f"zstd -dc -q {zst} | tar -x -C {{dest}} checkpoint", scratch),
        "unpack tar": lambda: _unpack(f"tar -xf {tar} -C {{dest}}", scratch),
    }
    if args.before:  # `python -m` imports the package of its working directory first
        before = str(Path(args.before).resolve())
        for name in [k for k in cases if k.startswith(("ps ", "grep "))]:
            cmd, what = name.split()
            src = {"dir": ctr, "tar": tar, "zst": zst}[what]
            extra = [PATTERN] if cmd == "grep" else []
            cases[f"{name} (before)"] = (lambda c=cmd, s=src, x=extra: timed([*py, c, str(s), *x], cwd=before))
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in cases}
    try:
        for fn in cases.values():  # warm-up: page cache, .pyc
            fn()
        for _ in range(args.runs):
            for name, fn in cases.items():
                times[name].append(fn())
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    med = {k: statistics.median(t for t, _ in v) for k, v in times.items()}
    cpu = {k: statistics.median(c for _, c in v) for k, v in times.items()}
    sizes = {"images": sum(p.stat().st_size for p in (ctr / "checkpoint").iterdir()), "tar": tar.stat().st_size,
             "zst": zst.stat().st_size}
    print(f"container: {sizes['images'] >> 20} MiB of images, .tar {sizes['tar'] >> 20} MiB, "
          f".tar.zst {sizes['zst'] >> 20} MiB; medians of {args.runs}: wall s, CPU s [wall of each run]")
    for k, v in med.items():
        print(f"  {k:<22} {v:7.3f} {cpu[k]:7.3f}   [{', '.join(f'{t:.3f}' for t, _ in times[k])}]")
    ratios: dict[str, float] = {}
    for tag in ["", " (before)"] if args.before else [""]:
        m = {k.removesuffix(tag): v for k, v in med.items() if k.endswith(tag) or k.startswith("unpack")}
        ratios.update({
            f"ps tar/dir{tag}": m["ps tar"] / m["ps dir"],
            f"grep tar/dir{tag}": m["grep tar"] / m["grep dir"],
            f"ps zst/(unpack+dir){tag}": m["ps zst"] / (m["unpack zst images"] + m["ps dir"]),
            f"grep zst/(unpack+dir){tag}": m["grep zst"] / (m["unpack zst images"] + m["grep dir"]),
            f"ps tar/unpack tar{tag}": m["ps tar"] / m["unpack tar"],
            f"ps zst/unpack zst images{tag}": m["ps zst"] / m["unpack zst images"],
        })
    for k, v in ratios.items():
        print(f"  {k:<36} {v:5.2f}x")
    print(f"  load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"medians": med, "cpu": cpu, "runs": times, "ratios": ratios,
                                               "sizes": sizes}, indent=2))
    return 0


def _unpack(command: str, scratch: Path) -> tuple[float, float]:
    dest = Path(tempfile.mkdtemp(dir=scratch))
    try:
        return timed(command.format(dest=dest), shell=True)
    finally:
        shutil.rmtree(dest, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
