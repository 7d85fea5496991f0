"""Container archives with a parent chain, and pages served or pushed from archives.

Podman's `container checkpoint --pre-checkpoint --export` archives `pre-checkpoint/`; a later
`--with-previous --export` archives `checkpoint/`, whose `parent` link CRIU made from
`--parent-path ../pre-checkpoint`; `container restore --import-previous` puts both back into one
bundle directory. The archives here hold that bundle: the corpus's real two-level chain (its
newest level as `checkpoint/`, its oldest, a pre-dump's pagemap and pages only, as
`pre-checkpoint/`) beside config.dump, spec.dump and rootfs-diff.tar, the pre-checkpoint after
rootfs-diff.tar. Oracles: the unpacked bundle (same bytes, same output except names), the chain's
truth (`criu restore` and /proc/PID/mem), CRIU's own lazy-pages restore and page server.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cli_driver import run_jobs
from conftest import Criu
from corpus import Corpus
from criu_harness import (
    become_subreaper,
    dump,
    free_port,
    read_mem,
    restore_stopped,
    run_criu,
    start_victim,
    wait_listening,
)
from pageserver_helpers import CLI, REPO, serve
from restore_support import wait_check

from crit_pageread import ChainError, open_images
from crit_pageread.config import load_config
from crit_pageread.criu_env import criu_binary

KINDS = {"tar": None, "zst": ["zstd", "-1", "-q", "-c"], "gz": ["gzip", "-1", "-c"]}
CONFIG = {"id": "c0ffee00" * 8, "name": "chain-victim", "rootfsImageName": "docker.io/library/debian:trixie",
          "runtime": "crun", "createdTime": "2026-12-02T06:00:00Z"}


def _archive(src: Path, out: Path, kind: str, members: list[str]) -> Path:
    tar = subprocess.run(["tar", "-C", str(src), "-cf", "-", *members], stdout=subprocess.PIPE, check=True).stdout
    if KINDS[kind] is not None:
        tar = subprocess.run(KINDS[kind], input=tar, stdout=subprocess.PIPE, check=True).stdout
    out.write_bytes(tar)
    return out


def _podman_files(bundle: Path) -> None:
    (bundle / "config.dump").write_text(json.dumps(CONFIG))
    (bundle / "spec.dump").write_text(json.dumps({"annotations": {"io.container.manager": "libpod"}}))
    rootfs = bundle.parent / f"{bundle.name}-rootfs"
    (rootfs / "etc").mkdir(parents=True)
    (rootfs / "etc" / "motd").write_bytes(os.urandom(1 << 20))
    subprocess.run(["tar", "-C", str(rootfs), "-cf", str(bundle / "rootfs-diff.tar"), "."], check=True)
    shutil.rmtree(rootfs)


def make_bundle(corpus: Corpus, work: Path) -> Path:
    """Podman's bundle after `restore --import-previous`: checkpoint/ (parent -> ../pre-checkpoint), pre-checkpoint/."""
    chain = corpus.case("e2_chain2")
    bundle = work / "bundle"
    bundle.mkdir(parents=True)
    shutil.copytree(chain / "d2", bundle / "checkpoint", symlinks=True)
    shutil.copytree(chain / "d1", bundle / "pre-checkpoint", symlinks=True)
    (bundle / "checkpoint" / "parent").unlink()
    (bundle / "checkpoint" / "parent").symlink_to("../pre-checkpoint")
    _podman_files(bundle)
    return bundle


def _names(out: bytes, archive: Path, directory: Path) -> bytes:
    """`ARCHIVE: checkpoint/x.img` -> `DIR/checkpoint/x.img`, `ARCHIVE` -> `DIR`."""
    return out.replace(f"{archive}: ".encode(), f"{directory}/".encode()).replace(
        str(archive).encode(), str(directory).encode())


def _tree(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict[str, Path]]]:
    """Per corpus root: the bundle directory and its archives (made once per CRIU version)."""
    return {}


def _bundle(corpus: Corpus, bundles: dict[str, tuple[Path, dict[str, Path]]],
            factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    key = str(corpus.root)
    if key not in bundles:
        work = factory.mktemp("chain-bundle")
        bundle = make_bundle(corpus, work)
        members = ["config.dump", "spec.dump", "checkpoint", "rootfs-diff.tar", "pre-checkpoint"]
        archives = {k: _archive(bundle, work / f"ckpt.tar{'' if k == 'tar' else '.' + k}", k, members)
                    for k in KINDS}
        bundles[key] = (bundle, archives)
    return bundles[key]


@pytest.mark.parametrize("kind", ["tar", "zst", "gz"])
def test_every_command_reads_a_chain_archive_like_its_bundle(
    corpus: Corpus, bundles: dict, tmp_path_factory: pytest.TempPathFactory, tmp_path: Path, kind: str
) -> None:
    bundle, archives = _bundle(corpus, bundles, tmp_path_factory)
    archive = archives[kind]
    pid = corpus.pid("e2_chain2")
    victim = corpus.victim("a_single")
    region = max((r for r in victim["regions"] if not r["hole_every"]), key=lambda r: r["len"])
    cmds = [["ps", "{}"], ["ps", "{}", "--json"], ["pages", "{}"], ["pages", "{}", "--json"],
            ["grep", "{}", "CRIT-PAGEREAD-SECRET", "-C", "8"], ["grep", "{}", "victim", "--json"],
            ["read", "{}", hex(victim["secret"]["addr"]), "64"],
            *(["read", "{}", hex(region["start"]), str(region["len"]), "--strategy", s]
              for s in ("pread", "preadv", "mmap")),
            ["x", "{}", "ps"], ["x", "{}", "pages"], ["x", "{}", "mems", "--pages"],
            ["check", "{}"], ["check", "{}", "--json"], ["inspect", "{}"], ["inspect", "{}", "--json"]]
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env_tmp = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = str(tmp)
    try:
        ours = run_jobs("crit_pageread", [{"argv": [a.replace("{}", str(archive)) for a in c]} for c in cmds])
        outs = run_jobs("crit_pageread", [
            {"argv": ["extract", str(archive), "-o", str(tmp_path / "ext")]},
            {"argv": ["coredump", str(archive), "-o", str(tmp_path / "cores")]},
            {"argv": ["squash", str(archive), str(tmp_path / "sq"), "--verify"]},
        ])
        assert list(tmp.iterdir()) == []  # nothing left behind
    finally:
        if env_tmp is None:
            del os.environ["TMPDIR"]
        else:
            os.environ["TMPDIR"] = env_tmp
    base = run_jobs("crit_pageread", [{"argv": [a.replace("{}", str(bundle)) for a in c]} for c in cmds])
    for cmd, a, b in zip(cmds, ours, base, strict=True):
        assert a["rc"] == b["rc"] == 0, (cmd, a["err"], b["err"])
        assert _names(a["out"], archive, bundle) == b["out"], cmd
        assert a["err"].replace(str(archive), str(bundle)) == b["err"], cmd  # check's summary names the input
    assert all(not r["err"] for c, r in zip(cmds, ours, strict=True) if c[0] != "check")
    assert b"pre-checkpoint" in base[3]["out"]  # pages --json names the level each range comes from
    assert ours[6]["out"].startswith(victim["secret"]["text"].encode())
    for r in outs:
        assert r["rc"] == 0 and r["err"] == "", r["err"]
    base_outs = run_jobs("crit_pageread", [
        {"argv": ["extract", str(bundle), "-o", str(tmp_path / "ext0")]},
        {"argv": ["coredump", str(bundle), "-o", str(tmp_path / "cores0")]},
        {"argv": ["squash", str(bundle), str(tmp_path / "sq0")]},
    ])
    assert all(r["rc"] == 0 for r in base_outs), [r["err"] for r in base_outs]
    ext, ext0 = _tree(tmp_path / "ext"), _tree(tmp_path / "ext0")
    assert ext.pop("index.json") and ext0.pop("index.json") and ext == ext0
    assert _tree(tmp_path / "cores") == _tree(tmp_path / "cores0")
    assert _tree(tmp_path / "sq") == _tree(tmp_path / "sq0")
    assert not (tmp_path / "sq" / "parent").exists()
    # The chain's truth (CRIU's restore of it), page by page, through the library.
    truth = corpus.truth("e2_chain2")
    with open_images(archive) as images:
        assert images.parent is not None and images.parent.member_dir == "pre-checkpoint"
        with images.reader(pid) as reader:
            got = {v: hashlib.sha256(reader.read(v, 4096)).hexdigest() for v in truth}
    assert got == truth


@pytest.mark.parametrize("kind", ["tar", "zst"])
def test_a_with_previous_export_alone_names_its_dangling_parent(corpus41: Corpus, tmp_path: Path, kind: str) -> None:
    """`--with-previous --export` without its pre-checkpoint: a one-line error naming ARCHIVE: checkpoint/parent."""
    bundle = make_bundle(corpus41, tmp_path)
    archive = _archive(bundle, tmp_path / f"alone.tar.{kind}", kind, ["config.dump", "spec.dump", "checkpoint"])
    with pytest.raises(ChainError) as info:
        open_images(archive)
    assert str(info.value).startswith(f"{archive}: checkpoint/parent: dangling parent link to ../pre-checkpoint")
    res = run_jobs("crit_pageread", [{"argv": ["ps", str(archive)]}, {"argv": ["check", str(archive)]}])
    assert res[0]["rc"] != 0 and res[0]["err"].splitlines() == [
        f"crit-pageread: {archive}: checkpoint/parent: dangling parent link to ../pre-checkpoint (a `podman "
        "container checkpoint --with-previous` checkpoint: its pre-checkpoint is a separate export; put "
        "pre-checkpoint/ beside checkpoint/)"]
    assert res[1]["rc"] != 0 and f"error: {archive}: checkpoint/parent: dangling parent link" in res[1]["out"].decode()


# --- serve and push from archives ----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["tar", "zst"])
def test_serve_from_a_chain_archive_gives_every_page_of_the_chain(
    corpus41: Corpus, bundles: dict, tmp_path_factory: pytest.TempPathFactory, kind: str
) -> None:
    """The remote strategy reads every page of the chain from `serve ARCHIVE`; each equals CRIU's restore."""
    bundle, archives = _bundle(corpus41, bundles, tmp_path_factory)
    pid = corpus41.pid("e2_chain2")
    truth = corpus41.truth("e2_chain2")
    with serve(archives[kind]) as (proc, port):
        config = load_config(overrides={"remote": {"port": port, "local": "none", "timeout": 10}}, env={})
        with open_images(bundle, config) as images, images.reader(pid, "remote") as reader:
            bufs = {vaddr: bytearray(4096) for vaddr in truth}
            for vaddr, buf in bufs.items():
                reader.readinto(vaddr, buf, defer=True)
            reader.sync()
        proc.terminate()
        _, err = proc.communicate(10)
    assert {v: hashlib.sha256(b).hexdigest() for v, b in bufs.items()} == truth
    assert f"{len(truth)} pages" in err and "closed by client (CLOSE)" in err, err


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def _container(images: Path, work: Path, kind: str) -> Path:
    """A Podman export of a fresh dump: checkpoint/ beside the container files, archived as `kind`."""
    bundle = work / "ctr"
    bundle.mkdir(parents=True)
    shutil.copytree(images, bundle / "checkpoint")
    _podman_files(bundle)
    return _archive(bundle, work / f"ctr.tar.{kind}", kind, ["config.dump", "spec.dump", "checkpoint",
                                                              "rootfs-diff.tar"])


@pytest.mark.parametrize("kind", ["tar", "zst"])
def test_criu_lazy_restore_from_serve_of_an_archive(
    criu: Criu, victim_exe: Path, tmp_path: Path, pipe_max_size: None, procs: list, kind: str
) -> None:
    """`criu lazy-pages` + `criu restore --lazy-pages` from `serve ARCHIVE`: the program's own check says OK."""
    victim = start_victim(victim_exe, tmp_path / "v", "--mib", "4", "--vmas", "4", pid_ns=True)
    images = dump(victim, tmp_path / "img")
    archive = _container(images, tmp_path / "export", kind)
    work = tmp_path / "work"
    work.mkdir()
    with serve(archive, "--once") as (server, port):
        lazy = subprocess.Popen(
            [criu_binary(), "lazy-pages", "--page-server", "--address", "127.0.0.1", "--port", str(port),
             "-D", str(images), "-W", str(work), "-o", "lazy.log", "-v4"],
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
            assert wait_check(restored, check) == "OK"  # every page it checks came from the archive
            assert lazy.wait(30) == 0, (work / "lazy.log").read_text()[-2000:]
        finally:
            os.kill(restored, signal.SIGKILL)
            os.waitpid(restored, 0)
        assert server.wait(10) == 0
        _, err = server.communicate()
    assert "closed by client (CLOSE)" in err and " pages, " in err, err


@pytest.mark.parametrize("kind", ["tar", "zst"])
def test_push_from_an_archive_to_criu_page_server_restores(
    criu: Criu, victim_exe: Path, tmp_path: Path, procs: list, kind: str
) -> None:
    """`push ARCHIVE` to `criu page-server`; `criu restore` of what it wrote has the program's memory."""
    victim = start_victim(victim_exe, tmp_path / "v", "--mib", "4", "--vmas", "4")
    pid = victim.pid
    regions = [(r.start, read_mem(pid, r.start, r.len)) for r in victim.regions]
    images = dump(victim, tmp_path / "img")
    archive = _container(images, tmp_path / "export", kind)
    received = tmp_path / "received"
    received.mkdir()
    port = free_port()
    page_server = subprocess.Popen(
        [criu_binary(), "page-server", "-D", str(received), "-o", "ps.log", "-v4", "--address", "127.0.0.1",
         "--port", str(port)],
    )
    procs.append(page_server)
    wait_listening(port, page_server)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    pushed = subprocess.run([*CLI, "push", str(archive), "--port", str(port)], capture_output=True, text=True,
                            cwd=REPO, timeout=60, env={**os.environ, "TMPDIR": str(tmp)})
    assert pushed.returncode == 0, pushed.stderr
    assert list(tmp.iterdir()) == []
    assert page_server.wait(30) == 0, (received / "ps.log").read_text()[-2000:]
    for image in images.glob("*.img"):
        if not image.name.startswith(("pagemap-", "pages-")):
            shutil.copy(image, received / image.name)
    with restore_stopped(received) as restored:
        for start, data in regions:
            assert restored.read(pid, start, len(data)) == data, f"region at {start:#x}"
