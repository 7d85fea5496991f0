"""`serve` under attack on loopback: slow-drip and idle clients cannot lock good ones out; a full server says
"server busy" and our client says so; log lines are whole. Attackers connect from 127.0.0.2, good clients from
127.0.0.1 (both loopback); every loop is bounded in count and time."""

from __future__ import annotations

import re
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from hostile_support import PAGE, REPO, Dump, make_dump
from pageserver_helpers import CLI

from crit_pageread import RemoteError, load_config, open_images
from crit_pageread.pageserver.client import Connection, ServerAddress
from crit_pageread.pageserver.protocol import Wire
from crit_pageread.pageserver.server import PageServer, ServeOptions

ATTACKER = "127.0.0.2"


@pytest.fixture(scope="module")
def small(criu_ok: None, tmp_path_factory: pytest.TempPathFactory) -> Dump:
    return make_dump(tmp_path_factory.mktemp("serve-limits"))


@contextmanager
def running(d: Dump, **options: object) -> Iterator[tuple[PageServer, list[str]]]:
    lines: list[str] = []
    server = PageServer(d.images, load_config(env={}), ServeOptions(**options), lines.append)  # type: ignore[arg-type]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server, lines
    finally:
        server.shutdown()
        thread.join(15)


def good_read(d: Dump, port: int) -> bytes:
    """One GET of one page by our own client, from 127.0.0.1."""
    buf = bytearray(PAGE)
    with Connection(ServerAddress(port=port, timeout=5)) as conn:
        conn.get_into([(d.pid, d.vaddr, memoryview(buf))])
    return bytes(buf)


def expected(d: Dump) -> bytes:
    with open_images(d.images) as images, images.reader(d.pid) as reader:
        return reader.read(d.vaddr, PAGE)


def attacker(port: int) -> socket.socket:
    sock = socket.socket()
    sock.bind((ATTACKER, 0))
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    return sock


def test_slow_drip_clients_are_dropped_at_the_request_deadline_and_good_clients_get_in(small: Dump):
    want = expected(small)
    with running(small, max_clients=8, max_per_peer=16, request_timeout=2.0, idle_timeout=60.0) as (server, lines):
        drippers = [attacker(server.port) for _ in range(8)]
        stop = threading.Event()

        def drip() -> None:  # one byte of a header every 0.3 s: each recv succeeds, the request never ends
            for _ in range(40):
                for s in drippers:
                    try:
                        s.send(b"\x07")
                    except OSError:
                        pass
                if stop.wait(0.3):
                    return

        t = threading.Thread(target=drip, daemon=True)
        t.start()
        time.sleep(0.5)
        started = time.monotonic()
        got = None
        errors = []
        while got is None and time.monotonic() - started < 15:
            try:
                got = good_read(small, server.port)
            except RemoteError as exc:
                errors.append(str(exc))
                time.sleep(0.3)
        stop.set()
        t.join(5)
        for s in drippers:
            s.close()
        waited = time.monotonic() - started
    assert got == want, errors[-3:]
    assert waited < 10, (waited, errors[-3:])  # the deadline (2 s) freed the server, not the idle timeout (60 s)
    assert all("server busy" in e for e in errors), errors[:3]
    assert sum("request not complete within 2 s" in line for line in lines) == 8, lines


def test_idle_clients_of_one_peer_are_bounded_and_idle_ones_make_room(small: Dump):
    want = expected(small)
    with running(small, max_clients=12, max_per_peer=8, idle_timeout=60.0) as (server, lines):
        idle = [attacker(server.port) for _ in range(30)]
        time.sleep(1.5)  # every attacker idle past the grace
        # 8 accepted from 127.0.0.2, the 22 others were told "server busy" and closed.
        refused = 0
        for s in idle:
            s.settimeout(0.2)  # an accepted one stays silent: do not wait for it
            try:
                data = s.recv(64)
            except TimeoutError:
                data = b"?"
            except OSError:
                data = b""
            refused += data[:4] == b"\x05\x1b\x00\x00"
        assert refused == 22, (refused, lines)
        started = time.monotonic()
        for _ in range(10):  # good clients from another address get in at once, each time
            assert good_read(small, server.port) == want
        assert time.monotonic() - started < 10
        # Fill the server with idle clients from many addresses: the longest idle makes room for a newcomer.
        more = []
        for i in range(3, 8):
            for _ in range(2):
                s = socket.socket()
                s.bind((f"127.0.0.{i}", 0))
                s.settimeout(10)
                s.connect(("127.0.0.1", server.port))
                more.append(s)
        time.sleep(1.5)
        assert good_read(small, server.port) == want
        for s in idle + more:
            s.close()
    assert any("idle while the server was full" in line for line in lines), lines


def test_a_full_server_says_server_busy_and_the_client_says_so(small: Dump):
    with running(small, max_clients=1, request_timeout=5.0) as (server, lines):
        busy_one = attacker(server.port)
        busy_one.send(b"\x07\x00")  # half a header: a request in progress, not idle
        time.sleep(0.3)
        with pytest.raises(RemoteError, match="server busy"):
            good_read(small, server.port)
        busy_one.close()
    assert any("refused: 1 clients already, none idle (server busy)" in line for line in lines), lines


def test_log_lines_of_concurrent_sessions_are_never_merged(small: Dump):
    """Many sessions at once through `crit-pageread serve`: every stderr line is one whole session line."""
    proc = subprocess.Popen([*CLI, "serve", str(small.images), "--port", "0", "--json"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert proc.stdout is not None
        import json

        port = json.loads(proc.stdout.readline())["port"]
        wire = Wire("4.1")

        def client(n: int) -> None:
            for _ in range(n):
                with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                    s.sendall(wire.pack_get(small.pid, small.vaddr, 1))
                    left = wire.size + PAGE
                    while left:
                        data = s.recv(left)
                        if not data:
                            break
                        left -= len(data)

        threads = [threading.Thread(target=client, args=(10,)) for _ in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        time.sleep(0.5)
    finally:
        proc.terminate()
        _, err = proc.communicate(15)
    session = re.compile(r"^crit-pageread serve: 127\.0\.0\.1:\d+: \d+ pages, \d+ bytes, [\d.]+ s, \d+ requests, .+$")
    lines = [line for line in err.splitlines() if line]
    assert len(lines) >= 120, err[-2000:]
    bad = [line for line in lines if not session.match(line) or line.count("crit-pageread") != 1]
    assert not bad, bad[:5]


def test_serve_limit_options_reach_the_server(small: Dump, tmp_path: Path):
    proc = subprocess.run([*CLI, "serve", "--help"], capture_output=True, text=True, cwd=REPO)
    assert "--request-timeout" in proc.stdout and "--max-per-peer" in proc.stdout
