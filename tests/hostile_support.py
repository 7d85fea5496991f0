"""A small real checkpoint for the hostile-input tests, and helpers to run the command line on it."""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from criu_harness import build_victim, dump, start_victim

from crit_pageread import open_images
from crit_pageread.imagefile import encode_varint_fields, frame
from crit_pageread.pagemap import PE_PRESENT, load_pagemap

PAGE = 4096
REPO = Path(__file__).resolve().parent.parent


@dataclass
class Dump:
    """A real CRIU dump of one small victim, with one present page to read."""

    images: Path
    pid: int
    vaddr: int


def make_dump(work: Path, *args: str) -> Dump:
    """Checkpoint the victim (a few MiB, holes so the pagemap has many entries) with real CRIU."""
    exe = build_victim(work)
    victim = start_victim(exe, work / "run", "--mib", "2", "--holes", "5", *args, ipc_ns="--shm" in args)
    try:
        images = dump(victim, work / "images")
    finally:
        victim.kill()
    with open_images(images) as ck:
        pid = ck.pids[0]
        entry = next(e for e in ck.pagemap(pid).entries if e.flags & PE_PRESENT)
    return Dump(images, pid, entry.vaddr)


def copy_dump(d: Dump, dest: Path) -> Path:
    shutil.copytree(d.images, dest, symlinks=True)
    return dest


def pagemap_path(images: Path, pid: int) -> Path:
    return images / f"pagemap-{pid}.img"


def pages_path(images: Path, pid: int) -> Path:
    return images / f"pages-{load_pagemap(pagemap_path(images, pid), PAGE).pages_id}.img"


def write_pagemap_fields(path: Path, pages_id: int, entries: list[list[tuple[int, int]]]) -> None:
    """A pagemap whose entries are given as raw (field, value) varint lists (any value, any field)."""
    payloads = [encode_varint_fields([(1, pages_id)])] + [encode_varint_fields(e) for e in entries]
    path.write_bytes(frame("PAGEMAP", payloads))


def entry_fields(path: Path) -> tuple[int, list[list[tuple[int, int]]]]:
    """The pages id and each entry as 4.1-layout (field, value) pairs."""
    pm = load_pagemap(path, PAGE)
    return pm.pages_id, [[(1, e.vaddr), (2, e.nr_pages), (4, e.flags)] for e in pm.entries]


def run_cli(*args: str, timeout: float = 60, limit_as: int | None = None, cwd: Path | None = None,
            umask: int | None = None) -> subprocess.CompletedProcess[str]:
    """`python -m crit_pageread ARGS` in a fresh interpreter, optionally under an address-space limit."""

    def pre() -> None:
        if limit_as is not None:
            resource.setrlimit(resource.RLIMIT_AS, (limit_as, limit_as))
        if umask is not None:
            os.umask(umask)

    return subprocess.run([sys.executable, "-m", "crit_pageread", *args], capture_output=True, text=True,
                          errors="replace", timeout=timeout, cwd=cwd or REPO, preexec_fn=pre)


def one_line_error(proc: subprocess.CompletedProcess[str], *needles: str) -> str:
    """Assert a failed command printed exactly one line without a traceback, containing every needle."""
    lines = proc.stderr.splitlines()
    assert proc.returncode not in (0, None), proc
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def dead_pid() -> int:
    """A pid that no process has now (a child that has exited and been reaped)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid
