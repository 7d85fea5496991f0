"""`crit-pageread serve` against the remote strategy, checked against the fixtures' truth (no reader of ours).

Also: many clients at once, clients that send garbage, say nothing or ask for absurd ranges are
dropped without disturbing the others, one log line per session, the pages-served hook.
"""

from __future__ import annotations

import hashlib
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
from corpus import Corpus
from pageserver_helpers import serve

from crit_pageread import open_images
from crit_pageread.config import load_config
from crit_pageread.errors import RemoteError
from crit_pageread.hookspecs import hookimpl
from crit_pageread.imagefile import read_image
from crit_pageread.pagemap import encode_pagemap, load_pagemap
from crit_pageread.pageserver.protocol import Wire
from crit_pageread.pageserver.server import PageServer, ServeOptions
from crit_pageread.plugins import get_plugin_manager


def truth(fixtures: Path, case: str, pid: int) -> dict[int, str]:
    lines = (fixtures / "truth" / case / f"pid-{pid}.sha256").read_text().splitlines()
    return {int(v, 16): h for v, h in (line.split() for line in lines if not line.startswith("TOTAL"))}


def read_all_remote(images_dir: Path, pid: int, port: int, pages: dict[int, str], **remote: object) -> int:
    """Read every truth page through the remote strategy (deferred, one sync); return pages that match."""
    config = load_config(overrides={"remote": {"port": port, "local": "none", "timeout": 10, **remote}}, env={})
    with open_images(images_dir, config) as images, images.reader(pid, "remote") as reader:
        bufs = {vaddr: bytearray(4096) for vaddr in pages}
        for vaddr, buf in bufs.items():
            reader.readinto(vaddr, buf, defer=True)
        reader.sync()
        return sum(hashlib.sha256(buf).hexdigest() == pages[vaddr] for vaddr, buf in bufs.items())


@pytest.fixture
def chain(corpus41: Corpus, tmp_path: Path) -> Path:
    shutil.copytree(corpus41.root / "cases" / "e2_chain2", tmp_path / "e2", symlinks=True)
    return tmp_path / "e2" / "d2"


@pytest.mark.parametrize("server", ["auto", "fixed"])
@pytest.mark.parametrize("protocol", ["4.1", "4.2"])
def test_remote_reads_every_page_of_a_served_chain_exactly(corpus41: Corpus, chain: Path, protocol: str,
                                                           server: str) -> None:
    """serve reads each client's header layout from its first request (or speaks the one it is told)."""
    pages = truth(corpus41.root, "e2_chain2", corpus41.pid("e2_chain2"))
    with serve(chain, *(["--protocol", protocol] if server == "fixed" else [])) as (proc, port):
        assert read_all_remote(chain, corpus41.pid("e2_chain2"), port, pages, protocol=protocol) == len(pages)
        proc.terminate()
        _, err = proc.communicate(10)
    assert err.count("serve: 127.0.0.1:") == 1 and f"{len(pages)} pages" in err, err
    assert f"protocol {protocol}" in err, err


def test_one_server_answers_criu_41_and_42_clients_at_once(corpus41: Corpus) -> None:
    src = corpus41.case("a_single")
    pid = corpus41.pid("a_single")
    pages = truth(corpus41.root, "a_single", pid)
    with serve(src) as (proc, port):
        got: dict[str, int] = {}
        threads = [threading.Thread(target=lambda p=p: got.__setitem__(p, read_all_remote(src, pid, port, pages,
                                                                                          protocol=p)))
                   for p in ("4.1", "4.2", "4.1", "4.2")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        proc.terminate()
        _, err = proc.communicate(10)
    assert got == {"4.1": len(pages), "4.2": len(pages)}
    assert err.count("protocol 4.1,") == 2 and err.count("protocol 4.2,") == 2, err


def test_serve_answers_from_a_42_layout_dump(corpus41: Corpus, tmp_path: Path) -> None:
    src = corpus41.root / "cases" / "a_single"
    out = tmp_path / "a42"
    shutil.copytree(src, out)
    name = f"pagemap-{corpus41.pid('a_single')}.img"
    pagemap = load_pagemap(src / name, 4096)
    (out / name).write_bytes(
        encode_pagemap(pagemap.pages_id, [(e.vaddr, e.nr_pages, e.flags) for e in pagemap.entries], "4.2")
    )
    assert read_image(out / name, "PAGEMAP") != read_image(src / name, "PAGEMAP")
    pages = truth(corpus41.root, "a_single", corpus41.pid("a_single"))
    with serve(out) as (_, port):
        assert read_all_remote(src, corpus41.pid("a_single"), port, pages) == len(pages)


@pytest.mark.parametrize(("server", "client"), [("4.2", "4.1"), ("4.1", "4.2")])
def test_protocol_mismatch_is_reported_not_misread(corpus41: Corpus, server: str, client: str) -> None:
    src = corpus41.root / "cases" / "a_single"
    pages = truth(corpus41.root, "a_single", corpus41.pid("a_single"))
    with serve(src, "--protocol", server) as (_, port):
        started = time.monotonic()
        with pytest.raises(RemoteError, match="protocol") as err:
            read_all_remote(src, corpus41.pid("a_single"), port, dict(list(pages.items())[:1]), protocol=client,
                            timeout=30)
        assert time.monotonic() - started < 3  # not the 30 s timeout
    assert f"127.0.0.1:{port}" in str(err.value) and f"CRIU {client} page-server protocol" in str(err.value)
    assert "\n" not in str(err.value)


def _dropped_within(port: int, payload: bytes, timeout: float) -> float:
    """Connect, send payload, return seconds until the server closes the connection."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        if payload:
            sock.sendall(payload)
        while True:
            data = sock.recv(65536)
            if not data:
                return time.monotonic() - started


def test_bad_clients_are_dropped_while_good_ones_read_on(corpus41: Corpus) -> None:
    src = corpus41.root / "cases" / "a_single"
    pages = truth(corpus41.root, "a_single", corpus41.pid("a_single"))
    wire = Wire("4.1")
    first = min(pages)
    bad = {
        "garbage": b"\xde\xad\xbe\xef" * 6,
        "silent": b"",
        "huge": wire.pack_get(corpus41.pid("a_single"), first, 1 << 31),
        "unknown pid": wire.pack_get(4242, first, 1),
        "not dumped": wire.pack_get(corpus41.pid("a_single"), 0x1000, 1),
        "unaligned": wire.pack_get(corpus41.pid("a_single"), first + 1, 1),
        "half header": b"\x07\x00\x00",
    }
    with serve(src, "--idle-timeout", "1") as (proc, port):
        results: dict[str, object] = {}

        def good(i: int) -> None:
            results[f"good{i}"] = read_all_remote(src, corpus41.pid("a_single"), port, pages)

        def drop(name: str, payload: bytes) -> None:
            results[name] = _dropped_within(port, payload, 5)

        threads = [threading.Thread(target=good, args=(i,)) for i in range(4)]
        threads += [threading.Thread(target=drop, args=item) for item in bad.items()]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        proc.terminate()
        _, err = proc.communicate(10)
    for i in range(4):
        assert results[f"good{i}"] == len(pages)
    for name in bad:
        assert isinstance(results[name], float) and results[name] < 3, (name, results.get(name))
    lines = [line for line in err.splitlines() if "serve: 127.0.0.1:" in line]
    assert len(lines) == 4 + len(bad), err
    assert sum("dropped" in line for line in lines) == len(bad), err
    assert "silent for 1 s" in err and "garbage header" in err and "not in the images" in err
    assert "absurd request" in err and "pages not dumped" in err


class _Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[int, int, int]] = []

    @hookimpl
    def crit_pageread_pages_served(self, images: object, pid: int, vaddr: int, nr_pages: int, peer: str) -> None:
        self.calls.append((pid, vaddr, nr_pages))


def test_pages_served_hook_sees_every_reply(corpus41: Corpus) -> None:
    src = corpus41.root / "cases" / "a_single"
    pages = truth(corpus41.root, "a_single", corpus41.pid("a_single"))
    recorder = _Recorder()
    pm = get_plugin_manager()
    pm.register(recorder, name="test-recorder")
    lines: list[str] = []
    try:
        server = PageServer(src, load_config(env={}), ServeOptions(once=True), lines.append)
        thread = threading.Thread(target=server.serve_forever)
        thread.start()
        assert read_all_remote(src, corpus41.pid("a_single"), server.port, pages) == len(pages)
        thread.join(10)
    finally:
        pm.unregister(name="test-recorder")
    assert sum(nr for _, _, nr in recorder.calls) == len(pages)
    assert {pid for pid, _, _ in recorder.calls} == {corpus41.pid("a_single")}
    assert len(lines) == 1 and f"{len(pages)} pages, {len(pages) * 4096} bytes" in lines[0]


def test_clients_past_max_clients_are_refused_and_serve_json_says_where_it_listens(corpus41: Corpus) -> None:
    import json
    import subprocess

    from pageserver_helpers import CLI, REPO

    src = corpus41.root / "cases" / "a_single"
    proc = subprocess.Popen([*CLI, "serve", str(src), "--max-clients", "1", "--idle-timeout", "2", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert proc.stdout is not None
        info = json.loads(proc.stdout.readline())
        assert info["address"] == "127.0.0.1" and info["protocol"] == "auto" and info["tls"] is False
        with socket.create_connection(("127.0.0.1", info["port"])):
            time.sleep(0.2)
            assert _dropped_within(info["port"], b"", 5) < 1  # the second client is refused at once
    finally:
        proc.terminate()
        _, err = proc.communicate(10)
    assert "refused: 1 clients already" in err
