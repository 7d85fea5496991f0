"""Real CRIU against `crit-pageread serve` and `push`.

- `criu lazy-pages` + `criu restore --lazy-pages` restore a program from `serve`; the program
  checks its own memory pattern (SIGUSR1 writes OK/BAD).
- `criu page-server` receives `push`, and `criu restore` of what it wrote has the memory the
  program had (read from /proc/PID/mem before the dump).
- `serve` of a lazy dump fetches its lazy pages from CRIU's own page server (a chain of servers).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Criu
from criu_harness import (
    become_subreaper,
    dump,
    free_port,
    read_mem,
    restore_stopped,
    run_criu,
    start_lazy_dump,
    start_victim,
    wait_listening,
)
from pageserver_helpers import CLI, REPO, Pki, make_pki, serve
from restore_support import wait_check

from crit_pageread import open_images
from crit_pageread.config import load_config
from crit_pageread.criu_env import criu_binary
from crit_pageread.pagemap import PE_LAZY


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes a test starts; killed if it leaves them running."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_criu_lazy_restore_from_serve_gives_back_the_program_memory(
    criu: Criu, victim_exe: Path, tmp_path: Path, pipe_max_size: None, pki: Pki, procs: list, tls: bool
) -> None:
    victim = start_victim(victim_exe, tmp_path / "v", "--mib", "4", "--vmas", "4", pid_ns=True)
    images = dump(victim, tmp_path / "img")
    with open_images(images) as ims:
        lazy_pages = sum(e.nr_pages for e in ims.pagemap(1).entries if e.flags & PE_LAZY)
    work = tmp_path / "work"
    work.mkdir()
    with serve(images, "--once", *(pki.ours_server() if tls else [])) as (server, port):
        lazy = subprocess.Popen(
            [criu_binary(), "lazy-pages", "--page-server", "--address", "127.0.0.1", "--port", str(port),
             "-D", str(images), "-W", str(work), "-o", "lazy.log", "-v4", *(pki.criu_client() if tls else [])],
        )
        procs.append(lazy)
        deadline = time.monotonic() + 20
        while not (work / "lazy-pages.socket").exists():
            assert lazy.poll() is None and time.monotonic() < deadline, (work / "lazy.log").read_text()[-2000:]
            time.sleep(0.01)
        become_subreaper()
        run_criu(["restore", "--lazy-pages", "-D", str(images), "-W", str(work), "-o", "restore.log", "-v4",
                  "--restore-detached", "--pidfile", str(work / "restored.pid")], log=work / "restore.log")
        restored = int((work / "restored.pid").read_text())
        try:
            check = Path(f"{victim.info_path}.check")
            check.unlink(missing_ok=True)
            # Post-copy: every page the check touches is fetched through lazy-pages from serve first.
            assert wait_check(restored, check) == "OK"
            assert lazy.wait(30) == 0, (work / "lazy.log").read_text()[-2000:]
        finally:
            os.kill(restored, signal.SIGKILL)
            os.waitpid(restored, 0)
        assert server.wait(10) == 0
        _, err = server.communicate()
    assert f"{lazy_pages} pages" in err and "closed by client (CLOSE)" in err, err


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_criu_page_server_receives_push_and_restore_works(
    criu: Criu, victim_exe: Path, tmp_path: Path, pki: Pki, procs: list, tls: bool
) -> None:
    victim = start_victim(victim_exe, tmp_path / "v", "--mib", "4", "--vmas", "4")
    pid = victim.pid
    regions = [(r.start, read_mem(pid, r.start, r.len)) for r in victim.regions]
    images = dump(victim, tmp_path / "img")
    received = tmp_path / "received"
    received.mkdir()
    port = free_port()
    page_server = subprocess.Popen(
        [criu_binary(), "page-server", "-D", str(received), "-o", "ps.log", "-v4", "--address", "127.0.0.1",
         "--port", str(port), *(pki.criu_server() if tls else [])],
    )
    procs.append(page_server)
    wait_listening(port, page_server)
    tls_args = [] if not tls else ["--tls-cacert", str(pki.ca), "--tls-cert", str(pki.client_cert),
                                   "--tls-key", str(pki.client_key)]
    pushed = subprocess.run([*CLI, "push", str(images), "--port", str(port), *tls_args], capture_output=True,
                            text=True, cwd=REPO, timeout=60)
    assert pushed.returncode == 0, pushed.stderr
    assert page_server.wait(30) == 0, (received / "ps.log").read_text()[-2000:]
    assert (received / f"pagemap-{pid}.img").exists()
    # The page server wrote pagemaps and pages; the rest of the dump is copied as `criu dump --page-server` users do.
    for image in images.glob("*.img"):
        if not image.name.startswith(("pagemap-", "pages-")):
            shutil.copy(image, received / image.name)
    with restore_stopped(received) as restored:
        for start, data in regions:
            assert restored.read(pid, start, len(data)) == data, f"region at {start:#x}"


def test_serve_chains_lazy_pages_from_criu_dump(
    criu: Criu, victim_exe: Path, tmp_path: Path, pipe_max_size: None, procs: list
) -> None:
    victim = start_victim(victim_exe, tmp_path / "v", "--mib", "2", "--vmas", "2")
    pid = victim.pid
    regions = [(r.start, read_mem(pid, r.start, r.len)) for r in victim.regions if r.name.startswith("bulk")]
    images = tmp_path / "img"
    lazy_dump, criu_port = start_lazy_dump(pid, images)
    procs.append(lazy_dump)
    cfg = tmp_path / "serve.toml"
    cfg.write_text(f"[remote]\nport = {criu_port}\ntimeout = 20\n")
    with serve(images, "--strategy", "remote", "--config", str(cfg), "--once") as (server, port):
        config = load_config(overrides={"remote": {"port": port, "timeout": 20, "local": "none"}}, env={})
        with open_images(images, config) as ims, ims.reader(pid, "remote") as reader:
            for start, data in regions:
                assert reader.read(start, len(data)) == data, f"region at {start:#x}"
        assert server.wait(20) == 0
    assert lazy_dump.wait(30) == 0
    victim.reap()
