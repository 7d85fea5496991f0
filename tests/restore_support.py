"""Helpers shared by the restore-flow tests (squash, coredump, pipeline, hooks).

Oracles here are CRIU's (`criu restore` puts the images back into real
tasks; /proc/PID/mem is read) and the victim's own check of its memory
pattern (SIGUSR1 -> OK/BAD), never a reader of ours.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from criu_harness import Victim, pagemap_pages, read_mem, restore_stopped, run_criu

PAGE = 4096
SYS_TGKILL = 234  # x86_64
REPO = Path(__file__).resolve().parent.parent


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`crit-pageread ARGS` in a fresh interpreter (as a user runs it)."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "crit_pageread", *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=REPO)


def runs(pages: list[int]) -> list[tuple[int, int]]:
    """Contiguous (start, length) runs of sorted page addresses."""
    out: list[list[int]] = []
    for p in sorted(pages):
        if out and out[-1][0] + out[-1][1] == p:
            out[-1][1] += PAGE
        else:
            out.append([p, PAGE])
    return [(a, n) for a, n in out]


def restored_memory(images: Path, pid: int, pages: list[int]) -> dict[int, bytes]:
    """CRIU restores `images` (stopped); the bytes of every page in `pages`, by address."""
    out = {}
    with restore_stopped(images) as r:
        for start, length in runs(pages):
            data = r.read(pid, start, length)
            for off in range(0, length, PAGE):
                out[start + off] = data[off : off + PAGE]
    return out


def dumped_pages(images: Path, pid: int) -> list[int]:
    return pagemap_pages(images, pid)


def self_check(images: Path, victim: Victim, timeout: float = 120) -> str:
    """Restore `images` running, ask the victim to check its own memory (SIGUSR1), return OK/BAD..."""
    check = Path(f"{victim.info_path}.check")
    check.unlink(missing_ok=True)
    pidfile = images / "selfcheck.pid"
    pidfile.unlink(missing_ok=True)
    run_criu(["restore", "-D", str(images), "-o", "selfcheck.log", "-v4", "--restore-detached",
              "--pidfile", str(pidfile)], log=images / "selfcheck.log")
    pid = int(pidfile.read_text())
    try:
        return wait_check(pid, check, timeout)
    finally:
        kill_tree(pid)


def wait_check(pid: int, check: Path, timeout: float = 120) -> str:
    """SIGUSR1 to the victim's main thread (tgkill: its pause() is what wakes), wait for OK/BAD.

    The signal is sent again every half second until the answer is there: one that lands
    before the restored task is back in pause() only sets the flag pause() then sleeps on."""
    libc = ctypes.CDLL(None, use_errno=True)
    deadline = time.monotonic() + timeout
    next_signal = 0.0
    while time.monotonic() < deadline:
        if check.exists() and check.read_text().strip():
            return check.read_text().strip()
        if time.monotonic() >= next_signal:
            if libc.syscall(SYS_TGKILL, pid, pid, signal.SIGUSR1) != 0:
                return f"no answer: the victim is gone ({os.strerror(ctypes.get_errno())})"
            next_signal = time.monotonic() + 0.5
        time.sleep(0.02)
    return "no answer"


def kill_tree(pid: int) -> None:
    """SIGKILL a restored root and its children, and reap them."""
    pids = [pid]
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            pids += [int(c) for c in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
    except OSError:
        pass
    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for p in pids:
        try:
            os.waitpid(p, 0)
        except ChildProcessError:
            pass


def interrupted_run(argv: list[str], after_calls: int = 1) -> subprocess.CompletedProcess[str]:
    """Run `crit-pageread ARGV` in a child whose `PageReader.write_segments` and `write_to` (every copy of
    pages into an output goes through one of them) send it a real SIGINT once `after_calls` copies were
    made (so the interrupt lands in the middle of writing output)."""
    code = textwrap.dedent(f"""
        import os, signal, sys, time
        # A shell that starts a job in the background (CI runners may) leaves SIGINT ignored, and
        # Python then keeps it ignored: restore the handler that raises KeyboardInterrupt.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        from crit_pageread.reader import PageReader as m
        calls = [0]
        def counted(real):
            def write(*a, **k):
                got = real(*a, **k)
                calls[0] += 1
                if calls[0] == {after_calls}:
                    os.kill(os.getpid(), signal.SIGINT)
                    time.sleep(5)
                return got
            return write
        m.write_segments = counted(m.write_segments)
        m.write_to = counted(m.write_to)
        from crit_pageread.cli.main import main
        sys.exit(main({argv!r}))
    """)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)


def leftovers(directory: Path) -> list[str]:
    """Temporary names our atomic writers use, left in `directory`."""
    return sorted(n for n in os.listdir(directory) if n.endswith(".tmp"))


def read_process(host_pid: int, start: int, length: int) -> bytes:
    return read_mem(host_pid, start, length)
