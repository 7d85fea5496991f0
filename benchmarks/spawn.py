"""Run a measured command from a small process, so its peak RSS is its own.

Linux keeps a process's peak RSS across exec: `ru_maxrss` of a child forked from a large process (a benchmark
that has held a 500 MiB buffer, or made a checkpoint in-process) is at least the parent's peak at the fork,
even for `cat`. Every measured command is therefore forked by one long-lived spawner (`python -m
benchmarks.spawn`, started on first use; it only forks, execs and reaps, so it stays ~10 MiB), which times it
(fork to wait4, as `subprocess` did) and sends back its exit code and rusage. stdout goes to the file asked
for, or to a temporary file read back; stderr always to a temporary file.

Protocol: one JSON object a line on the spawner's stdin (`cmd`, `cwd`, `stdout`: a path or null), one JSON
object a line back (`seconds`, `code`, `utime`, `stime`, `maxrss_kib`, `minflt`, `majflt`, `stdout`, `stderr`:
the paths of the temporary files, or null).
"""

from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

_spawner: subprocess.Popen[bytes] | None = None


def _serve() -> None:
    """The spawner's loop (`python -m benchmarks.spawn`)."""
    scratch = tempfile.mkdtemp(prefix="crit-pageread-spawn-")
    for n, line in enumerate(sys.stdin.buffer):
        req = json.loads(line)
        out_path = req["stdout"] or os.path.join(scratch, f"{n}.out")
        err_path = os.path.join(scratch, f"{n}.err")
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            start = time.perf_counter()
            proc = subprocess.Popen(req["cmd"], stdin=subprocess.DEVNULL, stdout=out, stderr=err, cwd=req["cwd"])
            _, status, usage = os.wait4(proc.pid, 0)
            seconds = time.perf_counter() - start
        reply = {"seconds": seconds, "code": os.waitstatus_to_exitcode(status), "utime": usage.ru_utime,
                 "stime": usage.ru_stime, "maxrss_kib": usage.ru_maxrss, "minflt": usage.ru_minflt,
                 "majflt": usage.ru_majflt, "stdout": None if req["stdout"] else out_path, "stderr": err_path}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


def _take(path: str | None) -> bytes:
    if path is None:
        return b""
    try:
        with open(path, "rb") as f:
            return f.read()
    finally:
        os.unlink(path)


def _stop() -> None:
    global _spawner
    if _spawner is not None:
        _spawner.stdin.close()  # type: ignore[union-attr]
        _spawner.wait()
        _spawner = None


def spawn(cmd: list[str], stdout_path: str | None = None, cwd: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Run `cmd` from the spawner: wall seconds (fork to reap), exit code, stdout (b"" when it went to
    `stdout_path`), stderr, and its rusage (`rss_mib`, `cpu_s`, `minflt`, `majflt`)."""
    global _spawner
    if _spawner is None or _spawner.poll() is not None:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        _spawner = subprocess.Popen([sys.executable, "-m", "benchmarks.spawn"], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, cwd=root)
        atexit.register(_stop)
    assert _spawner.stdin is not None and _spawner.stdout is not None
    req = {"cmd": [str(c) for c in cmd], "cwd": str(cwd) if cwd is not None else None, "stdout": stdout_path}
    _spawner.stdin.write(json.dumps(req).encode() + b"\n")
    _spawner.stdin.flush()
    line = _spawner.stdout.readline()
    if not line:
        raise RuntimeError(f"benchmarks.spawn: the spawner died running {cmd[0]}")
    r = json.loads(line)
    return {"seconds": r["seconds"], "code": r["code"], "stdout": _take(r["stdout"]), "stderr": _take(r["stderr"]),
            "rss_mib": r["maxrss_kib"] / 1024, "cpu_s": r["utime"] + r["stime"], "minflt": r["minflt"],
            "majflt": r["majflt"]}


if __name__ == "__main__":
    _serve()
