"""The remote strategy reads lazy pages from real CRIU page servers, byte-identical to the program's memory.

The oracle is /proc/PID/mem of the quiet program read before the dump. CRIU's page server
accepts one connection, so each test reads through one reader, then closes it (CLOSE).
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Criu
from criu_harness import dump, free_port, start_lazy_dump, start_victim, wait_listening
from pageserver_helpers import Pki, make_pki, oracle_bytes, snapshot

from crit_pageread import open_images
from crit_pageread.config import load_config
from crit_pageread.criu_env import criu_binary
from crit_pageread.pagemap import PE_LAZY, PE_PRESENT


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def criu_server() -> Iterator[list[subprocess.Popen[bytes]]]:
    """CRIU processes started by a test; killed if the test leaves them running."""
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def _remote_config(port: int, pki: Pki | None, **extra: object) -> object:
    table: dict[str, object] = {"port": port, "timeout": 20, **extra}
    if pki is not None:
        table.update(pki.remote_table())
    return load_config(overrides={"remote": table}, env={})


def _read_and_compare(images_dir: Path, pid: int, snap: list[tuple[int, bytes]], config: object,
                      want: int, secret: dict[str, object] | None = None) -> int:
    """Read every entry with the flags `want` through one remote reader; return how many matched the oracle."""
    matched = 0
    with open_images(images_dir, config) as images:  # type: ignore[arg-type]
        entries = [e for e in images.pagemap(pid).entries if e.flags == want]
        assert entries
        with images.reader(pid, "remote") as reader:
            bufs = [(e, bytearray(e.size)) for e in entries]
            for entry, buf in bufs:
                reader.readinto(entry.vaddr, buf, defer=True)
            reader.sync()
            for entry, buf in bufs:
                expected = oracle_bytes(snap, entry.vaddr, entry.size)
                assert expected is not None, f"no oracle for {entry.vaddr:#x}"
                assert buf == expected, f"entry {entry.vaddr:#x}"
                matched += 1
            if secret is not None:  # spans a present file page and a lazy anonymous page, unaligned
                text = str(secret["text"]).encode()
                assert reader.read(int(str(secret["addr"])), len(text)) == text
    return matched


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_remote_reads_every_lazy_page_of_criu_dump_lazy_pages(
    criu: Criu, victim_exe: Path, tmp_path: Path, pipe_max_size: None, pki: Pki, criu_server: list, tls: bool
) -> None:
    victim = start_victim(victim_exe, tmp_path / "v", "--mib", "4", "--vmas", "4")
    snap = snapshot(victim.pid)
    images = tmp_path / "img"
    proc, port = start_lazy_dump(victim, images, *(pki.criu_server() if tls else []))
    criu_server.append(proc)
    config = _remote_config(port, pki if tls else None)
    assert _read_and_compare(images, victim.pid, snap, config, PE_LAZY, victim.info["secret"]) > 10
    assert proc.wait(30) == 0  # our CLOSE ended the lazy dump cleanly
    victim.reap()


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_remote_reads_every_lazy_page_of_criu_page_server(
    criu: Criu, victim_exe: Path, tmp_path: Path, pipe_max_size: None, pki: Pki, criu_server: list, tls: bool
) -> None:
    victim = start_victim(victim_exe, tmp_path / "v", "--mib", "4", "--vmas", "4")
    pid = victim.pid
    snap = snapshot(pid)
    images = dump(victim, tmp_path / "img")
    # Our copy has its pages zeroed: every byte we check must come from CRIU's page server.
    ours = tmp_path / "ours"
    shutil.copytree(images, ours)
    for pages in ours.glob("pages-*.img"):
        pages.write_bytes(bytes(pages.stat().st_size))
    port = free_port()
    proc = subprocess.Popen(
        [criu_binary(), "page-server", "--lazy-pages", "-D", str(images), "-o", "ps.log", "-v4",
         "--address", "127.0.0.1", "--port", str(port), *(pki.criu_server() if tls else [])],
    )
    criu_server.append(proc)
    wait_listening(port, proc)
    config = _remote_config(port, pki if tls else None, local="none")
    assert _read_and_compare(ours, pid, snap, config, PE_LAZY | PE_PRESENT) > 10
    assert proc.wait(30) == 0
