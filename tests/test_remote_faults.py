"""A page server that misbehaves: the remote strategy fails within its timeout, clearly, leaving nothing partial.

The misbehaving servers are small real TCP servers (a separate process, so one can be killed
mid-reply); the client under test is the real remote strategy reading a real lazy dump.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from corpus import Corpus
from pageserver_helpers import CLI, REPO

from crit_pageread import open_images
from crit_pageread.config import load_config
from crit_pageread.errors import RemoteError

TIMEOUT = 1.0

FAULT_SERVER = textwrap.dedent(
    """
    import socket, struct, sys, time
    mode = sys.argv[1]
    hdr = struct.Struct("=IIQQ")
    srv = socket.create_server(("127.0.0.1", 0))
    print(srv.getsockname()[1], flush=True)
    conn, _ = srv.accept()
    data = b""
    while len(data) < hdr.size:
        data += conn.recv(hdr.size - len(data))
    cmd, nr, vaddr, pid = hdr.unpack(data)
    if mode == "garbage":
        conn.sendall(bytes(range(24)))
    elif mode in ("short", "killed"):
        conn.sendall(hdr.pack(0x40006, nr, vaddr, pid))
        conn.sendall(b"\\x55" * (nr * 4096 // 2))
        print("sent", flush=True)
    elif mode == "wrong-vaddr":
        conn.sendall(hdr.pack(0x40006, nr, vaddr + 4096, pid) + b"\\x55" * (nr * 4096))
    time.sleep(60)
    """
)


@contextmanager
def fault_server(mode: str) -> Iterator[tuple[subprocess.Popen[str], int]]:
    proc = subprocess.Popen([sys.executable, "-c", FAULT_SERVER, mode], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        yield proc, int(proc.stdout.readline())
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture
def lazy_dump(corpus41: Corpus, tmp_path: Path) -> Path:
    """A copy of the lazy dump; PID, VADDR, PAGES: its first lazy entry (the fault servers speak 4.1)."""
    global PID, VADDR, PAGES
    out = tmp_path / "f_lazy"
    shutil.copytree(corpus41.case("f_lazy"), out)
    PID = corpus41.pid("f_lazy")
    with open_images(out) as images:
        entry = next(e for e in images.pagemap(PID).entries if e.lazy and not e.present and e.nr_pages > 1)
    VADDR, PAGES = entry.vaddr, entry.nr_pages
    return out


PID = VADDR = PAGES = 0  # set by lazy_dump


@pytest.mark.parametrize(
    ("mode", "message"),
    [
        ("garbage", "bad reply header"),
        ("wrong-vaddr", "asked for pid {PID} at {VADDR:#x}"),
        ("short", f"no data for {TIMEOUT:g} s"),
        ("silence", f"no data for {TIMEOUT:g} s"),
        ("killed", "server closed the connection"),
    ],
)
def test_misbehaving_server_fails_the_read_in_time_and_leaves_no_partial_data(
    lazy_dump: Path, mode: str, message: str
) -> None:
    message = message.format(PID=PID, VADDR=VADDR)
    config = load_config(overrides={"remote": {"port": 1, "timeout": TIMEOUT}}, env={})
    with fault_server(mode) as (proc, port):
        config.tables["remote"]["port"] = port
        buf = bytearray(b"\xaa" * PAGES * 4096)
        with open_images(lazy_dump, config) as images, images.reader(PID, "remote") as reader:
            reader.readinto(VADDR, buf, defer=True)
            started = time.monotonic()
            with pytest.raises(RemoteError, match=message) as err:
                if mode == "killed":  # the GET goes out at sync(); the server dies once it sent half a reply
                    _kill_after_sent(proc)
                reader.sync()
            elapsed = time.monotonic() - started
    assert elapsed < TIMEOUT + 1.5, elapsed
    assert f"page server 127.0.0.1:{port}" in str(err.value) and "\n" not in str(err.value)
    assert buf == bytes(len(buf)), "a failed read must not leave part of a reply in the buffer"


def _kill_after_sent(proc: subprocess.Popen[str]) -> None:
    """Kill the server process as soon as it has sent half a reply (from a helper thread)."""
    import threading

    def watch() -> None:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() == "sent":
            proc.send_signal(signal.SIGKILL)

    threading.Thread(target=watch, daemon=True).start()


def test_cli_read_from_a_silent_server_fails_in_one_line_and_writes_no_file(lazy_dump: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.bin"
    with fault_server("silence") as (_, port):
        cfg = tmp_path / "cfg.toml"
        cfg.write_text(f"[remote]\nport = {port}\ntimeout = {TIMEOUT}\n")
        started = time.monotonic()
        proc = subprocess.run(
            [*CLI, "read", str(lazy_dump), "--pid", str(PID), hex(VADDR), str(PAGES * 4096), "-o", str(out),
             "--strategy", "remote", "--config", str(cfg)],
            capture_output=True, text=True, cwd=REPO, timeout=30,
        )
    assert time.monotonic() - started < TIMEOUT + 5
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.count("\n") == 1 and "page server 127.0.0.1" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists() and not list(tmp_path.glob(".out.bin*"))


def test_connection_refused_is_a_remote_error(lazy_dump: Path) -> None:
    from criu_harness import free_port

    config = load_config(overrides={"remote": {"port": free_port(), "connect_timeout": TIMEOUT}}, env={})
    with open_images(lazy_dump, config) as images, images.reader(PID, "remote") as reader:
        with pytest.raises(RemoteError, match="cannot connect"):
            reader.read(VADDR, 4096)
