"""`ps` on processes that rewrote their title (setproctitle, as nginx and PostgreSQL do), dumped by real CRIU.

Oracle: the kernel's own /proc/PID/cmdline and /proc/PID/maps of the running process, read before the dump.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from criu_harness import dump

HERE = Path(__file__).parent
LONG_TITLE = ("nginx: master process /usr/sbin/nginx -c /var/lib/containers/storage/overlay/"
              "3f0c9d51e8a44b7f9a1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e2f3a/work/r_nginx/nginx.conf")
SHORT_TITLE = "postgres: checkpointer"


def _start(exe: Path, work: Path, title: str, *padding: str) -> tuple[subprocess.Popen[bytes], bytes, str]:
    """Start the program; once it has rewritten its title, (process, /proc/PID/cmdline, its [stack] range)."""
    ready = work / f"ready-{len(list(work.glob('ready-*')))}"
    env = {"TITLE": title, "SPARE_ROOM": "e" * 60, "MORE_ROOM": "f" * 60, "KEPT": "kept-value"}
    proc = subprocess.Popen([str(exe), str(ready), *padding], env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            preexec_fn=lambda: os.sched_setaffinity(0, {0}))
    deadline = time.monotonic() + 20
    while not ready.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the program did not start"
        time.sleep(0.01)
    cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
    stack = next(line.split()[0] for line in Path(f"/proc/{proc.pid}/maps").read_text().splitlines()
                 if line.endswith("[stack]"))
    return proc, cmdline, stack


@pytest.fixture(scope="module")
def retitled(criu_ok: None, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, int, bytes, str]]:
    work = tmp_path_factory.mktemp("retitle")
    exe = work / "retitle"
    subprocess.run(["gcc", "-O1", "-o", str(exe), str(HERE / "retitle.c")], check=True)
    out = {}
    for name, title, padding in (("long", LONG_TITLE, ()), ("short", SHORT_TITLE, ("--padding", "p" * 150))):
        proc, cmdline, stack = _start(exe, work, title, *padding)
        try:
            dump(proc.pid, work / name)
        finally:
            proc.kill()
            proc.wait()
        out[name] = (work / name, proc.pid, cmdline, stack)
    return out


def ps(images: Path, *args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "crit_pageread", "ps", str(images), *args], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc


def test_a_title_that_overflowed_into_the_environment_reads_as_proc_cmdline(retitled: dict) -> None:
    images, pid, cmdline, _ = retitled["long"]
    assert cmdline == LONG_TITLE.encode() + b"\0"  # the kernel follows the title into the environment area
    info = json.loads(ps(images, "--json").stdout)
    assert info["pid"] == pid and info["cmdline"].encode() == cmdline and info["argv"] == [LONG_TITLE]
    assert info["retitled"] is True
    assert not any(LONG_TITLE[-12:] in e for e in info["environ"])  # the title's tail is not environment
    line = ps(images, "--no-env").stdout.splitlines()[1]
    assert line.endswith(f"  {LONG_TITLE}")


def test_a_nul_padded_title_keeps_its_bytes_in_json_and_prints_trimmed(retitled: dict) -> None:
    images, _pid, cmdline, _ = retitled["short"]
    assert cmdline.startswith(SHORT_TITLE.encode() + b"\0\0") and len(cmdline) > len(SHORT_TITLE) + 100
    info = json.loads(ps(images, "--json").stdout)
    assert info["cmdline"].encode() == cmdline and info["argv"] == [SHORT_TITLE] and "retitled" not in info
    line = ps(images, "--no-env").stdout.splitlines()[1]
    assert line.endswith(f"  {SHORT_TITLE}")  # no trailing spaces for the padding


def test_the_main_stack_is_kind_stack_and_kind_stack_matches(retitled: dict) -> None:
    images, _pid, _, stack = retitled["long"]
    rows = json.loads(subprocess.run([sys.executable, "-m", "crit_pageread", "x", str(images), "mems", "--json"],
                                     capture_output=True, text=True, check=True).stdout)
    stacks = [v for v in rows["vmas"] if v["kind"] == "stack"]
    assert [f"{v['start']:x}-{v['end']:x}" for v in stacks] == [stack] and stacks[0]["mapping"] == "[stack]"
    # the title lives in the argv area, on the main stack
    found = subprocess.run([sys.executable, "-m", "crit_pageread", "grep", str(images), "nginx: master",
                            "--kind", "stack", "--json"], capture_output=True, text=True)
    assert found.returncode == 0, found.stderr
    hits = [json.loads(line) for line in found.stdout.splitlines()]
    assert hits and all(h["kind"] == "stack" and h["mapping"] == "[stack]" for h in hits)
