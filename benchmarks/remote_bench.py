"""Benchmark: 1 GiB of pages over loopback, `serve` + remote strategy vs a plain socket copy vs CRIU.

Makes (once, cached) a real `criu dump` of the victim with 1 GiB over 256 VMAs, then, in the
same run, after one warm-up each, times the median of N repetitions of:

- plain: a separate process `os.sendfile`s the dump's pages file to a socket; the client
  `recv_into`s one preallocated buffer (the floor: the same bytes, no protocol);
- serve: `crit-pageread serve DIR`; the remote strategy (local = "none") reads every page of
  the dump with deferred reads into the same buffer (pipelined GETs);
- criu: `criu page-server --lazy-pages -D DIR` (started afresh per run: it serves one
  connection) serving the same dump; the remote strategy reads every lazy page.

usage: python benchmarks/remote_bench.py [--reps 5] [--mib 1024] [--vmas 256] [--json]
Needs root and CRIU (sets fs.pipe-max-size=4194304 for CRIU's GETs and puts it back).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from criu_harness import build_victim, dump, start_victim  # noqa: E402

from crit_pageread import open_images  # noqa: E402
from crit_pageread.config import load_config  # noqa: E402
from crit_pageread.criu_env import criu_binary  # noqa: E402
from crit_pageread.pagemap import PE_LAZY  # noqa: E402

CACHE = Path(os.environ.get("CRIT_PAGEREAD_BENCH_CACHE") or Path.home() / ".cache" / "crit-pageread" / "bench")

PLAIN_SENDER = textwrap.dedent(
    """
    import os, socket, sys
    path, port = sys.argv[1], int(sys.argv[2])
    fd = os.open(path, os.O_RDONLY)
    size = os.fstat(fd).st_size
    with socket.create_connection(("127.0.0.1", port)) as s:
        off = 0
        while off < size:
            off += os.sendfile(s.fileno(), fd, off, size - off)
    """
)


def make_dump(mib: int, vmas: int) -> Path:
    """A cached real dump of the victim with `mib` MiB over `vmas` VMAs."""
    base = CACHE / f"remote-m{mib}-v{vmas}"
    images = base / "images"
    if (base / "done").exists():
        return images
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    (base / "bin").mkdir()
    exe = build_victim(base / "bin")
    victim = start_victim(exe, base / "victim", "--seed", "11", "--mib", str(mib), "--vmas", str(vmas))
    dump(victim, images)
    (base / "done").write_text("ok\n")
    return images


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_listening(port: int, proc: subprocess.Popen[bytes]) -> None:
    needle = f"0100007F:{port:04X} 00000000:0000 0A"
    while needle not in Path("/proc/net/tcp").read_text():
        if proc.poll() is not None:
            raise RuntimeError(f"server exited {proc.returncode}")
        time.sleep(0.005)


def plain_copy(pages: Path, buf: memoryview) -> float:
    size = pages.stat().st_size
    with socket.create_server(("127.0.0.1", 0)) as srv:
        port = srv.getsockname()[1]
        sender = subprocess.Popen([sys.executable, "-c", PLAIN_SENDER, str(pages), str(port)])
        conn, _ = srv.accept()
        started = time.perf_counter()
        with conn:
            got = 0
            while got < size:
                n = conn.recv_into(buf[got:size])
                if not n:
                    raise RuntimeError("plain sender stopped early")
                got += n
        elapsed = time.perf_counter() - started
        sender.wait()
    return elapsed


def remote_read(images: Path, pid: int, port: int, buf: memoryview, lazy_only: bool) -> tuple[float, int]:
    config = load_config(overrides={"remote": {"port": port, "local": "none", "timeout": 60}}, env={})
    with open_images(images, config) as ims:
        entries = [e for e in ims.pagemap(pid).entries if not lazy_only or e.flags & PE_LAZY]
        started = time.perf_counter()
        with ims.reader(pid, "remote") as reader:
            pos = 0
            for entry in entries:
                reader.readinto(entry.vaddr, buf[pos : pos + entry.size], defer=True)
                pos += entry.size
            reader.sync()
        return time.perf_counter() - started, pos


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--mib", type=int, default=1024)
    parser.add_argument("--vmas", type=int, default=256)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    images = make_dump(args.mib, args.vmas)
    with open_images(images) as ims:
        pid = ims.pids[0]
        pages_file = ims.pagemap(pid).pages_path
        total = ims.pagemap(pid).present_bytes
    buf = memoryview(bytearray(max(total, pages_file.stat().st_size)))
    results: dict[str, list[float]] = {"plain": [], "serve": [], "criu": []}
    sizes: dict[str, int] = {"plain": pages_file.stat().st_size}

    serve = subprocess.Popen([sys.executable, "-m", "crit_pageread", "serve", str(images), "--port", "0"],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT)
    assert serve.stdout is not None
    serve_port = int(serve.stdout.readline().split("listening on ")[1].split()[0].rsplit(":", 1)[1])

    pipe_max = Path("/proc/sys/fs/pipe-max-size")
    old_pipe_max = pipe_max.read_text().strip()
    pipe_max.write_text("4194304")
    work = Path(tempfile.mkdtemp(prefix="remote-bench-"))
    try:
        for rep in range(args.reps + 1):  # rep 0 is the warm-up
            plain = plain_copy(pages_file, buf)
            served, sizes["serve"] = remote_read(images, pid, serve_port, buf, lazy_only=False)
            port = free_port()
            criu = subprocess.Popen([criu_binary(), "page-server", "--lazy-pages", "-D", str(images),
                                     "-W", str(work), "-o", "ps.log", "--address", "127.0.0.1", "--port", str(port)])
            wait_listening(port, criu)
            by_criu, sizes["criu"] = remote_read(images, pid, port, buf, lazy_only=True)
            criu.wait(60)
            if rep:
                results["plain"].append(plain)
                results["serve"].append(served)
                results["criu"].append(by_criu)
    finally:
        pipe_max.write_text(old_pipe_max)
        serve.terminate()
        serve.wait()
        shutil.rmtree(work, ignore_errors=True)

    report: dict[str, object] = {"images": str(images), "reps": args.reps}
    rates = {}
    for name, times in results.items():
        median = statistics.median(times)
        rates[name] = sizes[name] / median / (1 << 20)
        report[name] = {"bytes": sizes[name], "median_s": round(median, 4), "MiB_per_s": round(rates[name], 1),
                        "runs_s": [round(t, 4) for t in times]}
    report["serve_vs_plain"] = round(rates["serve"] / rates["plain"], 3)
    report["criu_vs_plain"] = round(rates["criu"] / rates["plain"], 3)
    report["serve_vs_criu"] = round(rates["serve"] / rates["criu"], 3)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for name in results:
            r = report[name]
            assert isinstance(r, dict)
            mib = r["bytes"] / (1 << 20)
            print(f"{name:6} {mib:8.1f} MiB  median {r['median_s']:.3f} s  {r['MiB_per_s']:8.1f} MiB/s")
        print(f"serve/plain {report['serve_vs_plain']}  criu/plain {report['criu_vs_plain']}  "
              f"serve/criu {report['serve_vs_criu']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
