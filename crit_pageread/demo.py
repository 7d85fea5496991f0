"""The demo (`python -m crit_pageread.demo`, `make demo`): checkpoint a program, read its memory back.

It compiles a small C program (`data/victim.c`) that fills memory with a
pattern depending only on (seed, region, page, word), starts it, checkpoints
it with real CRIU into a temporary directory, reads every dumped page back
with every strategy, and checks the bytes against the pattern recomputed here
in Python (and the secret string it placed across a page boundary). Exit
status 0 if every strategy read exactly what the program wrote, 1 on a
mismatch, 2 if CRIU, gcc or root is missing.
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from .criu_env import criu_binary
from .errors import CritPageReadError, CriuNotFoundError
from .images import open_images

MASK64 = (1 << 64) - 1
DEFAULT_STRATEGIES = ("pread", "preadv", "mmap")


# --- the victim's pattern (tests/victim.c `word()`), recomputed -----------------------------------


def page_bytes(seed: int, region_id: int, page: int, page_size: int = 4096) -> bytes:
    """The bytes the victim writes to page `page` of region `region_id` (its `word()`)."""
    base = ((seed * 0x9E3779B97F4A7C15) & MASK64) ^ (region_id << 40) ^ (page << 12)
    words = []
    for w in range(page_size // 8):
        x = base ^ w
        x ^= x >> 33
        x = (x * 0xFF51AFD7ED558CCD) & MASK64
        x ^= x >> 33
        x = (x * 0xC4CEB9FE1A85EC53) & MASK64
        x ^= x >> 33
        words.append(x)
    return struct.pack(f"={len(words)}Q", *words)


def region_bytes(seed: int, region_id: int, npages: int, hole_every: int, page_size: int = 4096) -> bytes:
    """A whole region: the pattern, with zero pages where the victim leaves holes."""
    zero = bytes(page_size)
    return b"".join(
        zero if hole_every and p % hole_every == hole_every - 2 else page_bytes(seed, region_id, p, page_size)
        for p in range(npages)
    )


def expected_region(info: dict[str, Any], region: dict[str, Any], page_size: int = 4096) -> bytes:
    """What a region of the victim holds: its pattern, with the secret written over it where they meet."""
    data = bytearray(region_bytes(int(info["seed"]), region["id"], region["len"] // page_size, region["hole_every"],
                                  page_size))
    start, end = region["start"], region["start"] + region["len"]
    secret = info["secret"]["text"].encode()
    s_start = info["secret"]["addr"]
    lo, hi = max(start, s_start), min(end, s_start + len(secret))
    if lo < hi:
        data[lo - start : hi - start] = secret[lo - s_start : hi - s_start]
    return bytes(data)


def victim_source() -> Path:
    """The victim's C source, shipped with the package."""
    return Path(str(resources.files("crit_pageread") / "data" / "victim.c"))


# --- running the victim and CRIU ---------------------------------------------------------------


def _pin() -> None:
    # One CPU for the victim and CRIU: glibc's rseq area (the CPU number) then matches.
    os.sched_setaffinity(0, {0})


class DemoError(CritPageReadError):
    """The demo cannot run here (no root, gcc or CRIU) or the victim failed."""

    exit_code = 2


def build(work: Path) -> Path:
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        raise DemoError("demo: gcc (or cc) is needed to build the victim program")
    exe = work / "victim"
    proc = subprocess.run([gcc, "-O1", "-o", str(exe), str(victim_source()), "-lpthread"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise DemoError(f"demo: compiling {victim_source()} failed: {last}")
    return exe


def start(
    exe: Path, work: Path, args: Sequence[str], timeout: float = 20
) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
    run = work / "run"
    run.mkdir()
    info = run / "victim.json"
    with open(run / "victim.log", "wb") as log:
        proc = subprocess.Popen([str(exe), str(info), *args], stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                start_new_session=True, preexec_fn=_pin, cwd=run,
                                env={"PATH": "/usr/bin:/bin", "VICTIM": "1"})
    deadline = time.monotonic() + timeout
    while not info.exists():
        if proc.poll() is not None:
            raise DemoError(f"demo: the victim exited with {proc.returncode}")
        if time.monotonic() > deadline:
            proc.kill()
            raise DemoError("demo: the victim did not become ready")
        time.sleep(0.01)
    return proc, json.loads(info.read_text())


def checkpoint(pid: int, images: Path) -> float:
    images.mkdir()
    began = time.perf_counter()
    proc = subprocess.run([criu_binary(), "dump", "-t", str(pid), "-D", str(images), "-o", "dump.log"],
                          capture_output=True, text=True, preexec_fn=_pin, timeout=300)
    if proc.returncode != 0:
        log = images / "dump.log"
        tail = log.read_text(errors="replace").strip().splitlines()[-1:] if log.exists() else []
        raise DemoError(f"demo: criu dump failed ({proc.returncode}): {' '.join(tail) or proc.stderr.strip()}")
    return time.perf_counter() - began


# --- reading and checking ------------------------------------------------------------------------


def materialize(images_dir: Path, pid: int, strategy: str) -> tuple[bytearray, list[tuple[int, int, int]], float]:
    """Every present page of `pid` into one buffer (deferred reads, one sync); entries, seconds."""
    with open_images(images_dir) as images, images.reader(pid, strategy) as reader:
        entries = [e for e in reader.pagemap.entries if e.present]
        total = sum(e.size for e in entries)
        buf = bytearray(total)
        view = memoryview(buf)
        began = time.perf_counter()
        pos = 0
        layout = []
        for e in entries:
            reader.readinto(e.vaddr, view[pos : pos + e.size], defer=True)
            layout.append((e.vaddr, e.end, pos))
            pos += e.size
        reader.sync()
        seconds = time.perf_counter() - began
        view.release()
    return buf, layout, seconds


def _slice(buf: bytearray, layout: list[tuple[int, int, int]], vaddr: int, length: int, page_size: int) -> bytes:
    """Bytes at [vaddr, vaddr+length) out of a materialized buffer; pages not dumped are zeros."""
    starts = [s for s, _, _ in layout]
    out = bytearray()
    addr = vaddr
    end = vaddr + length
    while addr < end:
        i = bisect.bisect_right(starts, addr) - 1
        if i >= 0 and layout[i][1] > addr:
            start, stop, pos = layout[i]
            n = min(stop, end) - addr
            out += buf[pos + addr - start : pos + addr - start + n]
        else:
            n = min(page_size - addr % page_size, end - addr)
            out += bytes(n)
        addr += n
    return bytes(out)


@dataclass
class Result:
    """One strategy's run: best time, bytes read, what did not match, the secret as read."""

    strategy: str
    seconds: float
    nbytes: int
    problems: list[str]
    secret: str

    @property
    def ok(self) -> bool:
        return not self.problems


def run_demo(mib: int, seed: int, strategies: Sequence[str], repeat: int, keep: bool) -> int:
    if os.geteuid() != 0:
        raise DemoError("demo: CRIU needs root to checkpoint a process; run it as root (sudo make demo)")
    criu = criu_binary()
    work = Path(tempfile.mkdtemp(prefix="crit-pageread-demo-"))
    proc: subprocess.Popen[bytes] | None = None
    try:
        exe = build(work)
        proc, info = start(exe, work, ["--seed", str(seed), "--mib", str(mib), "--vmas", "4"])
        pid = int(info["pid"])
        page_size = int(info["page_size"])
        images = work / "images"
        dump_seconds = checkpoint(pid, images)
        proc.wait(timeout=30)
        print(f"victim pid {pid} wrote a known pattern to {len(info['regions'])} regions; "
              f"{Path(criu).name} dump took {dump_seconds:.2f} s")

        expected = [(r, expected_region(info, r, page_size)) for r in info["regions"]]
        pattern_pages = sum(r["len"] // page_size for r in info["regions"])
        secret = info["secret"]
        results: list[Result] = []
        reference: bytearray | None = None
        ok_all = True
        for name in strategies:
            best = float("inf")
            for _ in range(repeat):
                buf, layout, seconds = materialize(images, pid, name)
                best = min(best, seconds)
            problems = []
            for region, want in expected:
                got = _slice(buf, layout, region["start"], region["len"], page_size)
                if got != want:
                    bad = next(i for i in range(0, len(want), page_size)
                               if got[i : i + page_size] != want[i : i + page_size])
                    problems.append(f"{region['name']} page {bad // page_size}")
            secret_got = _slice(buf, layout, secret["addr"], len(secret["text"]), page_size)
            if secret_got != secret["text"].encode():
                problems.append("secret")
            if reference is None:
                reference = buf
            elif buf != reference:
                problems.append(f"differs from {strategies[0]}")
            ok_all &= not problems
            results.append(Result(name, best, len(buf), problems, secret_got.decode(errors="replace")))

        total = results[0].nbytes
        print(f"checkpoint: {total // page_size} pages ({total / (1 << 20):.1f} MiB) dumped; "
              f"{pattern_pages} pages recomputed in Python from the victim's formula")
        print(f"secret at {secret['addr']:#x} (spans two pages): {results[0].secret!r}")
        print(f"{'strategy':<10} {'time':>10} {'GB/s':>7}  result")
        for r in results:
            gbps = r.nbytes / r.seconds / 1e9 if r.seconds > 0 else float("inf")
            verdict = "OK" if r.ok else "MISMATCH: " + ", ".join(r.problems)
            print(f"{r.strategy:<10} {r.seconds * 1e3:>8.1f} ms {gbps:>7.2f}  {verdict}")
        if ok_all:
            print("OK: every strategy read back exactly what the program wrote")
            return 0
        print("MISMATCH: some strategy read bytes the program did not write")
        return 1
    finally:
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m crit_pageread.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=32, help="bulk memory the program writes (default 32)")
    parser.add_argument("--seed", type=int, default=42, help="pattern seed (default 42)")
    parser.add_argument("--strategy", action="append", help="strategy to show (repeatable; default: "
                        + ", ".join(DEFAULT_STRATEGIES) + ")")
    parser.add_argument("--repeat", type=int, default=3, help="reads per strategy; the best time is shown")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args(argv)
    if args.mib < 0 or args.repeat < 1:
        parser.error("--mib must be >= 0 and --repeat >= 1")
    try:
        return run_demo(args.mib, args.seed, args.strategy or DEFAULT_STRATEGIES, args.repeat, args.keep)
    except CriuNotFoundError as exc:  # CRIU missing: 2, as root and gcc missing are
        print(f"crit-pageread demo: {exc}", file=sys.stderr)
        return DemoError.exit_code
    except CritPageReadError as exc:
        print(f"crit-pageread demo: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
