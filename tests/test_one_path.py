"""Every command moves the dumped bytes it outputs through the configured strategy (issue "One memory path").

With the example plugin's `counting` strategy chosen by config, extract, squash, coredump, grep, ps,
serve, push and `decode --pages` each carry at least every dumped byte they output through it, its
observer logs those reads and copies, and the outputs are byte-identical to the default strategy's.
Oracles: the pagemaps as pycriu decodes them, CRIU's own page server (push) and the restored task.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from criu_harness import Victim, dump, free_port, pagemap_pages, restore_stopped, start_victim, wait_listening
from restore_support import REPO, run_cli

from crit_pageread.criu_env import criu_binary, pycriu

PAGE = 4096
ARGS = ("--tree", "1", "--mib", "2", "--vmas", "3", "--shm", "--seed", "23")


class Dumped:
    def __init__(self, victim: Victim, images: Path, site: Path) -> None:
        self.victim = victim
        self.images = images
        self.site = site
        self.pids = sorted(int(p.stem.split("-")[1]) for p in images.glob("pagemap-[0-9]*.img"))


@pytest.fixture(scope="module")
def dumped(victim_exe: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dumped]:
    work = tmp_path_factory.mktemp("one-path")
    src = shutil.copytree(REPO / "hooks" / "example-plugin", work / "src")
    site = work / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
         "--target", str(site), str(src)], capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    victim = start_victim(victim_exe, work / "run", *ARGS, ipc_ns=True)
    try:
        images = dump(victim, work / "images")
        yield Dumped(victim, images, site)
    finally:
        victim.kill()


class Counted:
    """A config choosing `counting` (over pread), its report and the example observer's log."""

    def __init__(self, d: Dumped, tmp_path: Path) -> None:
        self.report = tmp_path / "count.jsonl"
        self.log = tmp_path / "reads.log"
        self.config = tmp_path / "c.toml"
        self.config.write_text(
            f'strategy = "counting"\n[counting]\ninner = "pread"\nreport = "{self.report}"\n'
            f'[example]\nlog = "{self.log}"\n'
        )
        self.env = {"PYTHONPATH": str(d.site)}

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        proc = run_cli(*args, "--config", str(self.config), env=self.env)
        assert proc.returncode in (0, 1), proc.stderr
        return proc

    def bytes(self) -> int:
        """Bytes the counting strategies of the command carried (one report line per strategy)."""
        lines = self.report.read_text().splitlines() if self.report.exists() else []
        return sum(json.loads(line)["bytes"] for line in lines)

    def logged(self) -> int:
        """Bytes the example observer logged as read or copied."""
        lines = self.log.read_text().splitlines() if self.log.exists() else []
        return sum(int(f[-1]) for f in (line.split() for line in lines) if f[0] in ("read", "copy"))


def _present_bytes(pagemap: Path) -> int:
    with open(pagemap, "rb") as f:
        entries = pycriu().images.load(f)["entries"][1:]
    def present(flags: object) -> bool:
        return bool(flags & 4) if isinstance(flags, int) else "PRESENT" in str(flags)

    return sum((e.get("nr_pages") or 0) * PAGE for e in entries if present(e.get("flags", 0)))


def _docs(stdout: str) -> list[dict[str, Any]]:
    """The objects of a --json output: one document (an object or a list) or one object a line."""
    try:
        doc = json.loads(stdout)
    except ValueError:
        return [json.loads(line) for line in stdout.splitlines() if line.strip()]
    return doc if isinstance(doc, list) else [doc]


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_extract_copies_every_dumped_byte_through_the_strategy(dumped: Dumped, tmp_path: Path) -> None:
    c = Counted(dumped, tmp_path)
    c.run("extract", str(dumped.images), "-o", str(tmp_path / "counted"))
    plain = run_cli("extract", str(dumped.images), "-o", str(tmp_path / "plain"))
    assert plain.returncode == 0, plain.stderr
    index = json.loads((tmp_path / "counted" / "index.json").read_text())
    written = index["totals"]["bytes"]
    assert written > 2 << 20
    assert c.bytes() >= written and c.logged() >= written
    a, b = _tree(tmp_path / "counted"), _tree(tmp_path / "plain")
    a.pop("index.json"), b.pop("index.json")
    assert a == b


def test_squash_copies_every_dumped_byte_through_the_strategy(dumped: Dumped, tmp_path: Path) -> None:
    c = Counted(dumped, tmp_path)
    c.run("squash", str(dumped.images), str(tmp_path / "counted"))
    plain = run_cli("squash", str(dumped.images), str(tmp_path / "plain"))
    assert plain.returncode == 0, plain.stderr
    written = sum(_present_bytes(p) for p in (tmp_path / "counted").glob("pagemap-*.img"))
    assert written == sum(os.path.getsize(p) for p in (tmp_path / "counted").glob("pages-*.img")) > 2 << 20
    assert c.bytes() >= written and c.logged() >= written
    assert _tree(tmp_path / "counted") == _tree(tmp_path / "plain")


def test_coredump_copies_every_dumped_byte_through_the_strategy(dumped: Dumped, tmp_path: Path) -> None:
    c = Counted(dumped, tmp_path)
    proc = c.run("coredump", str(dumped.images), "-o", str(tmp_path / "counted"), "--json")
    plain = run_cli("coredump", str(dumped.images), "-o", str(tmp_path / "plain"))
    assert plain.returncode == 0, plain.stderr
    reports = _docs(proc.stdout)
    dumped_bytes = sum(r["dumped_bytes"] for r in reports)
    assert dumped_bytes > 2 << 20
    assert c.bytes() >= dumped_bytes and c.logged() >= dumped_bytes
    assert _tree(tmp_path / "counted") == _tree(tmp_path / "plain")


def test_grep_reads_every_dumped_byte_through_the_strategy(dumped: Dumped, tmp_path: Path) -> None:
    c = Counted(dumped, tmp_path)
    secret = dumped.victim.info["secret"]["text"]
    proc = c.run("grep", str(dumped.images), secret)
    plain = run_cli("grep", str(dumped.images), secret)
    assert proc.returncode == 0 and proc.stdout == plain.stdout and f":{dumped.victim.info['secret']['addr']:#x}:" \
        in proc.stdout
    private = sum(len(pagemap_pages(dumped.images, pid)) * PAGE for pid in dumped.pids)
    assert c.bytes() >= private and c.logged() >= private


def test_ps_reads_command_lines_through_the_strategy(dumped: Dumped, tmp_path: Path) -> None:
    c = Counted(dumped, tmp_path)
    proc = c.run("ps", str(dumped.images), "--json")
    plain = run_cli("ps", str(dumped.images), "--json")
    assert proc.stdout == plain.stdout
    procs = _docs(proc.stdout)
    shown = sum(len(a.encode()) + 1 for info in procs for a in info["argv"])
    assert len(procs) == len(dumped.pids)
    assert shown > 0 and c.bytes() >= shown and c.logged() >= shown


def test_decode_pages_reads_every_entry_through_the_strategy(dumped: Dumped, tmp_path: Path) -> None:
    c = Counted(dumped, tmp_path)
    pagemap = dumped.images / f"pagemap-{dumped.pids[0]}.img"
    proc = c.run("decode", "-i", str(pagemap), "--pages")
    plain = run_cli("decode", "-i", str(pagemap), "--pages")
    assert proc.stdout == plain.stdout
    present = _present_bytes(pagemap)
    assert present > 0 and c.bytes() >= present and c.logged() >= present


def test_serve_sends_every_page_through_the_strategy(dumped: Dumped, tmp_path: Path) -> None:
    from crit_pageread import open_images
    from crit_pageread.config import load_config

    c = Counted(dumped, tmp_path)
    server = subprocess.Popen(
        [sys.executable, "-m", "crit_pageread", "serve", str(dumped.images), "--once", "--json",
         "--config", str(c.config)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
        env={**os.environ, **c.env},
    )
    try:
        assert server.stdout is not None
        port = _docs(server.stdout.readline())[0]["port"]
        pid = dumped.victim.pid
        config = load_config(env={}, overrides={"remote": {"port": port, "local": "none"}})
        pages = pagemap_pages(dumped.images, pid)
        with open_images(dumped.images, config) as images:
            # made by name: the reader owns the strategy and closes it (the server sees the client go)
            with images.reader(pid, "remote") as remote, images.reader(pid, "pread") as local:
                got = {a: remote.read(a, PAGE) for a in pages}
                assert all(got[a] == local.read(a, PAGE) for a in pages)
        assert server.wait(60) == 0, server.stderr.read() if server.stderr else ""
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    served = len(pages) * PAGE
    assert c.bytes() >= served and c.logged() >= served


def test_push_sends_every_page_through_the_strategy(dumped: Dumped, tmp_path: Path) -> None:
    c = Counted(dumped, tmp_path)
    received = tmp_path / "received"
    received.mkdir()
    port = free_port()
    page_server = subprocess.Popen(
        [criu_binary(), "page-server", "-D", str(received), "-o", "ps.log", "-v4", "--address", "127.0.0.1",
         "--port", str(port)],
    )
    try:
        wait_listening(port, page_server)
        proc = c.run("push", str(dumped.images), "--port", str(port), "--json")
        assert proc.returncode == 0, proc.stderr
        assert page_server.wait(30) == 0, (received / "ps.log").read_text()[-2000:]
    finally:
        if page_server.poll() is None:
            page_server.kill()
            page_server.wait()
    pushed = _docs(proc.stdout)[-1]["bytes"]
    assert pushed > 2 << 20 and c.bytes() >= pushed and c.logged() >= pushed
    # CRIU's page server wrote what it received: restored, the task has the dumped memory.
    for image in dumped.images.glob("*.img"):
        if not image.name.startswith(("pagemap-", "pages-")):
            shutil.copy(image, received / image.name)
    with open_plain(dumped.images) as want, restore_stopped(received) as restored:
        pid = dumped.victim.pid
        for a in pagemap_pages(dumped.images, pid)[:256]:
            assert restored.read(pid, a, PAGE) == want.read(a, PAGE)


class open_plain:
    """A pread reader of the first pid of a directory, as a context manager."""

    def __init__(self, images_dir: Path) -> None:
        from crit_pageread import open_images

        self.images = open_images(images_dir)
        self.reader = self.images.reader(self.images.pids[0], "pread")

    def __enter__(self) -> open_plain:
        return self

    def read(self, vaddr: int, length: int) -> bytes:
        return self.reader.read(vaddr, length)

    def __exit__(self, *exc: object) -> None:
        self.reader.close()
        self.images.close()
