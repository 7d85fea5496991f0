"""Container checkpoints as users have them: Podman's layout, every compression, read in place, nothing left behind.

The checkpoint is our own real CRIU dump, laid out as `podman container
checkpoint --export` does (checkpoint/, config.dump, spec.dump, a large
rootfs-diff.tar), then archived with GNU tar and each compressor. Oracles:
the unpacked directory (same bytes, same output except names), the victim's
own secret and command line, and the kernel's tmpfs limits for temp space.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cli_driver import run_jobs
from criu_harness import Victim, build_victim, dump, start_victim

from crit_pageread import ImageError, open_images
from crit_pageread.archive import TEMP_PREFIX

KINDS = {"tar": None, "gz": ["gzip", "-1"], "xz": ["xz", "-0", "-T2"], "bz2": ["bzip2", "-1"],
         "zst": ["zstd", "-1", "-q"]}
ROOTFS_MIB = 32
CONFIG = {"id": "4f1c0de5" * 8, "name": "h8-victim", "rootfsImageName": "docker.io/library/debian:bookworm",
          "rootfsImageID": "ab" * 32, "runtime": "runc", "createdTime": "2026-12-01T21:00:00.123456789Z"}


@dataclass
class Container:
    victim: Victim
    exe: Path
    dir: Path  # the unpacked Podman layout
    archives: dict[str, Path]

    @property
    def images(self) -> Path:
        return self.dir / "checkpoint"

    def images_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.images.iterdir())  # the CRIU images (dump.log is moved out)


def _archive(src: Path, out: Path, kind: str, members: list[str]) -> Path:
    tar = subprocess.run(["tar", "-C", str(src), "-cf", "-", *members], stdout=subprocess.PIPE, check=True).stdout
    if KINDS[kind] is not None:
        tar = subprocess.run(KINDS[kind], input=tar, stdout=subprocess.PIPE, check=True).stdout
    out.write_bytes(tar)
    return out


@pytest.fixture(scope="module")
def ctr(criu_ok: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Container]:
    work = tmp_path_factory.mktemp("container")
    exe = build_victim(work)
    victim = start_victim(exe, work / "run", "--seed", "31", "--tree", "1", "--mib", "8")
    layout = work / "ctr"
    try:
        dump(victim, layout / "checkpoint")
    finally:
        victim.kill()
    (layout / "checkpoint" / "dump.log").rename(layout / "dump.log")
    (layout / "config.dump").write_text(json.dumps(CONFIG))
    spec = {"ociVersion": "1.0.2", "process": {"args": [str(exe), str(work / "run" / "victim.json")]},
            "annotations": {"io.container.manager": "libpod"}}
    (layout / "spec.dump").write_text(json.dumps(spec))
    rootfs = work / "rootfs"
    (rootfs / "var" / "lib").mkdir(parents=True)
    blob = hashlib.sha256(b"rootfs").digest() * (1 << 15)  # 1 MiB
    with open(rootfs / "var" / "lib" / "data.bin", "wb") as f:
        for i in range(ROOTFS_MIB):
            f.write(bytes([i]) + blob[1:])
    subprocess.run(["tar", "-C", str(rootfs), "-cf", str(layout / "rootfs-diff.tar"), "."], check=True)
    members = ["config.dump", "spec.dump", "checkpoint", "rootfs-diff.tar", "dump.log"]
    archives = {k: _archive(layout, work / f"ckpt.tar{'' if k == 'tar' else '.' + k}", k, members) for k in KINDS}
    yield Container(victim, exe, layout, archives)


def _names(out: bytes, archive: Path, directory: Path) -> bytes:
    """Archive names turned into the directory's: `ARCHIVE: checkpoint/x.img` -> `DIR/checkpoint/x.img`."""
    return out.replace(f"{archive}: ".encode(), f"{directory}/".encode()).replace(
        str(archive).encode(), str(directory).encode())


def _tree(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


@contextlib.contextmanager
def _tmpdir(path: Path, size: str | None = None) -> Iterator[Path]:
    """TMPDIR for the commands run inside; on a tmpfs of `size` if given (unmounted after)."""
    path.mkdir()
    if size is not None:
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=1777", "tmpfs", str(path)], check=True)
    old = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = str(path)
    tempfile.tempdir = None  # gettempdir() caches its answer
    try:
        yield path
    finally:
        if old is None:
            del os.environ["TMPDIR"]
        else:
            os.environ["TMPDIR"] = old
        tempfile.tempdir = None
        if size is not None:
            subprocess.run(["umount", str(path)], check=True)


@pytest.mark.criu
@pytest.mark.parametrize("kind", [*KINDS, "podman-dir"])
def test_every_command_reads_the_container_archive_like_its_directory(ctr: Container, tmp_path: Path,
                                                                     kind: str) -> None:
    src = ctr.dir if kind == "podman-dir" else ctr.archives[kind]
    plain = ctr.images  # the image directory itself, as CRIU wrote it
    secret = ctr.victim.info["secret"]
    region = max(ctr.victim.regions, key=lambda r: r.len)
    pid = str(ctr.victim.pid)
    cmds = [["ps", "{}"], ["ps", "{}", "--json"], ["pages", "{}", "--json"], ["pages", "{}"],
            ["grep", "{}", "CRIT-PAGEREAD-SECRET", "-C", "8"], ["read", "{}", hex(secret["addr"]), "64", "--pid", pid],
            ["read", "{}", hex(region.start), str(region.len), "--strategy", "mmap", "--pid", pid],
            ["read", "{}", hex(region.start), str(region.len), "--strategy", "pread", "--pid", pid],
            ["x", "{}", "ps"], ["x", "{}", "pages"], ["x", "{}", "mems", "--pages"]]
    with _tmpdir(tmp_path / "tmp") as tmp:
        ours = run_jobs("crit_pageread", [{"argv": [a.replace("{}", str(src)) for a in c]} for c in cmds])
        base = run_jobs("crit_pageread", [{"argv": [a.replace("{}", str(plain)) for a in c]} for c in cmds])
        outs = run_jobs("crit_pageread", [
            {"argv": ["extract", str(src), "-o", str(tmp_path / "ext")]},
            {"argv": ["coredump", str(src), "-o", str(tmp_path / "cores")]},
            {"argv": ["squash", str(src), str(tmp_path / "sq"), "--verify"]},
            {"argv": ["inspect", str(src), "--json"]},
        ])
        assert list(tmp.iterdir()) == []  # nothing left behind
    for cmd, a, b in zip(cmds, ours, base, strict=True):
        assert a["rc"] == b["rc"] == 0 and a["err"] == b["err"] == "", (cmd, a["err"], b["err"])
        directory = ctr.dir if kind == "podman-dir" else plain.parent
        got = _names(a["out"], src, directory) if kind != "podman-dir" else a["out"]
        assert got == b["out"], cmd
    assert ours[5]["out"][:64].startswith(secret["text"].encode())  # the victim's own secret
    for r in outs:
        assert r["rc"] == 0 and r["err"] == "", r["err"]
    base_ext = run_jobs("crit_pageread", [{"argv": ["extract", str(plain), "-o", str(tmp_path / "ext0")]},
                                          {"argv": ["coredump", str(plain), "-o", str(tmp_path / "cores0")]},
                                          {"argv": ["squash", str(plain), str(tmp_path / "sq0")]}])
    assert all(r["rc"] == 0 for r in base_ext)
    ext, ext0 = _tree(tmp_path / "ext"), _tree(tmp_path / "ext0")
    assert ext.pop("index.json") and ext0.pop("index.json") and ext == ext0
    index = json.loads((tmp_path / "ext" / "index.json").read_text())
    assert index["checkpoint"] == str(src if kind != "podman-dir" else ctr.images)
    assert _tree(tmp_path / "cores") == _tree(tmp_path / "cores0")
    assert _tree(tmp_path / "sq") == _tree(tmp_path / "sq0")
    report = json.loads(outs[3]["out"])
    assert len(outs[3]["out"].splitlines()) == 1
    assert report["container"]["name"] == CONFIG["name"] and report["container"]["id"] == CONFIG["id"]
    assert report["container"]["engine"] == "Podman" and report["container"]["runtime"] == "runc"
    assert report["container"]["image"] == CONFIG["rootfsImageName"]
    assert report["sizes"]["rootfs_diff_bytes"] == (ctr.dir / "rootfs-diff.tar").stat().st_size
    root = report["processes"][0]
    assert root["argv"][0] == str(ctr.exe) and root["memory_bytes"] >= 8 << 20
    assert [p["pid"] for p in report["processes"]] == [ctr.victim.pid, *ctr.victim.info["children"]]


@pytest.mark.criu
def test_inspect_shows_the_container_and_its_process_tree(ctr: Container) -> None:
    res = run_jobs("crit_pageread", [{"argv": ["inspect", str(ctr.archives["tar"])]},
                                     {"argv": ["inspect", str(ctr.dir)]}])
    for r in res:
        assert r["rc"] == 0, r["err"]
        text = r["out"].decode()
        for want in (CONFIG["name"], CONFIG["id"], CONFIG["rootfsImageName"], "runc", "Podman",
                     CONFIG["createdTime"], str(ctr.exe), "Root FS diff", "MEMORY"):
            assert want in text, want
        assert re.search(rf"^\s+{ctr.victim.pid}\s+\d+\s+[\d.]+ MiB", text, re.M)
    assert _names(res[0]["out"], ctr.archives["tar"], ctr.dir) == res[1]["out"]


@pytest.mark.criu
def test_grep_on_a_tar_needs_no_temp_space(ctr: Container, tmp_path: Path) -> None:
    """TMPDIR on a 1 MiB tmpfs, the archive is ~50 MiB: read in place, nothing is copied."""
    archive = ctr.archives["tar"]
    assert archive.stat().st_size > 40 << 20
    cmd = ["grep", "{}", "CRIT-PAGEREAD-SECRET"]
    with _tmpdir(tmp_path / "tmp", "1m"):
        got = run_jobs("crit_pageread", [{"argv": [a.replace("{}", str(archive)) for a in cmd]}])[0]
    want = run_jobs("crit_pageread", [{"argv": [a.replace("{}", str(ctr.images)) for a in cmd]}])[0]
    assert got["rc"] == 0, got["err"]
    assert _names(got["out"], archive, ctr.dir) == want["out"]


@pytest.mark.criu
def test_a_zst_read_uses_at_most_its_images_in_temp_space(ctr: Container, tmp_path: Path) -> None:
    """On a tmpfs that holds the images but not rootfs-diff.tar, a .tar.zst is read; usage <= the images."""
    archive = ctr.archives["zst"]
    images = ctr.images_bytes()
    assert (ctr.dir / "rootfs-diff.tar").stat().st_size > images
    size = images + (2 << 20)
    with _tmpdir(tmp_path / "tmp", str(size)) as tmp:
        got = run_jobs("crit_pageread", [{"argv": ["grep", str(archive), "CRIT-PAGEREAD-SECRET"]}])[0]
        assert got["rc"] == 0, got["err"]
        with open_images(archive) as opened:
            unpacked = opened._index.tempdir  # type: ignore[union-attr]
            assert unpacked is not None and unpacked.parent == tmp
            used = sum(p.stat().st_size for p in unpacked.iterdir())
            assert used <= images
            assert opened.pids == [ctr.victim.pid, *ctr.victim.info["children"]]
        assert list(tmp.iterdir()) == []


@pytest.mark.criu
@pytest.mark.parametrize("kind", ["zst", "gz"])
def test_ps_on_a_podman_ordered_archive_unpacks_only_the_pages_it_reads(ctr: Container, tmp_path: Path,
                                                                        kind: str) -> None:
    """Podman's archiver writes members in lexical order (pagemap-*, mm-* before pages-*): ps and inspect
    unpack only the pages holding argv and the environment, sparse; TMPDIR on a 4 MiB tmpfs is enough for
    images of 8+ MiB. Reads of other pages through such an opening are errors naming the member, never zeros."""
    tar = subprocess.run(["tar", "--sort=name", "-C", str(ctr.dir), "-cf", "-", "config.dump", "spec.dump",
                          "checkpoint", "rootfs-diff.tar"], stdout=subprocess.PIPE, check=True).stdout
    archive = tmp_path / f"podman.tar.{kind}"
    archive.write_bytes(subprocess.run(KINDS[kind], input=tar, stdout=subprocess.PIPE, check=True).stdout)
    assert ctr.images_bytes() > 8 << 20
    cmds = [["ps", "{}"], ["ps", "{}", "--json", "--no-env"], ["inspect", "{}", "--json"]]
    with _tmpdir(tmp_path / "tmp", "4m") as tmp:
        got = run_jobs("crit_pageread", [{"argv": [a.replace("{}", str(archive)) for a in c]} for c in cmds])
        assert list(tmp.iterdir()) == []
    want = run_jobs("crit_pageread", [{"argv": [a.replace("{}", str(ctr.dir)) for a in c]} for c in cmds])
    for cmd, a, b in zip(cmds, got, want, strict=True):
        assert a["rc"] == b["rc"] == 0 and a["err"] == b["err"] == "", (cmd, a["err"])
        assert _names(a["out"], archive, ctr.dir) == b["out"], cmd
    from crit_pageread.cli.ps import pages_wanted

    pid = ctr.victim.pid
    region = max(ctr.victim.regions, key=lambda r: r.len)
    with open_images(archive, pages_wanted=pages_wanted) as images:
        pages = images.image(f"pages-{images.pagemap(pid).pages_id}.img")
        assert pages.present and sum(b - a for a, b in pages.present) < 64 << 10  # type: ignore[union-attr]
        with images.reader(pid) as reader, pytest.raises(ImageError) as info:
            reader.read(region.start, region.len)
        assert str(info.value).startswith(f"{archive}: checkpoint/pages-") and "not unpacked" in str(info.value)
    with open_images(archive) as images, images.reader(pid) as reader:  # opened for everything: every page
        with open_images(ctr.images) as plain, plain.reader(pid) as want_reader:
            assert reader.read(region.start, region.len) == want_reader.read(region.start, region.len)


@pytest.mark.criu
@pytest.mark.parametrize("kind", ["zst", "gz"])
def test_ps_stops_decompressing_after_the_images(ctr: Container, tmp_path: Path, kind: str) -> None:
    """ps needs no container file: after checkpoint/ nothing is read. Shown by an export whose tail (inside
    rootfs-diff.tar) is cut off: ps gives the directory's output; grep, which reads on, names the cut."""
    layout = tmp_path / "ctr"
    layout.mkdir()
    for name in ("checkpoint", "config.dump", "spec.dump"):
        (shutil.copytree if name == "checkpoint" else shutil.copy)(ctr.dir / name, layout / name)
    (tmp_path / "blob").write_bytes(os.urandom(16 << 20))  # incompressible: the cut falls inside it
    subprocess.run(["tar", "-C", str(tmp_path), "-cf", str(layout / "rootfs-diff.tar"), "blob"], check=True)
    tar = subprocess.run(["tar", "--sort=name", "-C", str(layout), "-cf", "-", "config.dump", "spec.dump",
                          "checkpoint", "rootfs-diff.tar"], stdout=subprocess.PIPE, check=True).stdout
    packed = subprocess.run(KINDS[kind], input=tar, stdout=subprocess.PIPE, check=True).stdout
    archive = tmp_path / f"cut.tar.{kind}"
    archive.write_bytes(packed[: len(packed) - (2 << 20)])
    with _tmpdir(tmp_path / "tmp") as tmp:
        got = run_jobs("crit_pageread", [{"argv": ["ps", str(archive)]}, {"argv": ["grep", str(archive), "x"]}])
        assert list(tmp.iterdir()) == []
    want = run_jobs("crit_pageread", [{"argv": ["ps", str(layout)]}])[0]
    assert got[0]["rc"] == want["rc"] == 0 and got[0]["err"] == "", got[0]["err"]
    assert _names(got[0]["out"], archive, layout) == want["out"]
    assert got[1]["rc"] != 0 and len(got[1]["err"].splitlines()) == 1
    assert got[1]["err"].startswith(f"crit-pageread: {archive}"), got[1]["err"]


def _default_signals() -> None:
    # A job started in the background (`cmd &`, nohup: CI runners may) inherits SIGINT and SIGHUP ignored, and
    # an ignored signal stays ignored (crit-pageread, like any program, keeps it so): give the child the defaults.
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)


@pytest.mark.criu
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
@pytest.mark.parametrize("kind", ["zst", "gz"])
def test_a_signal_during_an_archive_read_leaves_nothing_in_tmpdir(ctr: Container, tmp_path: Path, kind: str,
                                                                  sig: signal.Signals) -> None:
    region = max(ctr.victim.regions, key=lambda r: r.len)
    assert region.len >= 1 << 20
    with _tmpdir(tmp_path / "tmp") as tmp:
        # Nobody reads the pipe: the command blocks writing, its archive open, until the signal comes.
        proc = subprocess.Popen([sys.executable, "-m", "crit_pageread", "read", str(ctr.archives[kind]),
                                 hex(region.start), str(region.len), "--pid", str(ctr.victim.pid)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=_default_signals)
        deadline = time.monotonic() + 60
        while not any(p.name.startswith(TEMP_PREFIX) for p in tmp.iterdir()):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.005)
        unpacked = next(tmp.iterdir())
        while not any(unpacked.glob("*.img")):  # unpacking has begun
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.005)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode in (-sig, 128 + sig), err
        assert list(tmp.iterdir()) == []


@pytest.mark.criu
def test_an_unclosed_open_images_leaves_nothing_after_collection(ctr: Container, tmp_path: Path) -> None:
    with _tmpdir(tmp_path / "tmp") as tmp:
        images = open_images(ctr.archives["zst"])
        assert images.pids
        unpacked = images._index.tempdir  # type: ignore[union-attr]
        assert unpacked is not None and unpacked.exists()
        assert oct(unpacked.stat().st_mode & 0o777) == "0o700"
        del images
        gc.collect()
        assert not unpacked.exists() and list(tmp.iterdir()) == []
        # Nor at exit of a program that never closes it.
        code = f"from crit_pageread import open_images; images = open_images({str(ctr.archives['gz'])!r}); images.pids"
        subprocess.run([sys.executable, "-c", code], check=True)
        assert list(tmp.iterdir()) == []


@pytest.mark.criu
def test_a_later_run_removes_temp_dirs_of_killed_runs(ctr: Container, tmp_path: Path) -> None:
    with _tmpdir(tmp_path / "tmp") as tmp:
        code = (f"import os, signal\nfrom crit_pageread import open_images\n"
                f"images = open_images({str(ctr.archives['zst'])!r})\nos.kill(os.getpid(), signal.SIGKILL)")
        proc = subprocess.Popen([sys.executable, "-c", code])
        assert proc.wait() == -signal.SIGKILL
        left = list(tmp.iterdir())
        assert len(left) == 1 and left[0].name.startswith(f"{TEMP_PREFIX}{proc.pid}-")
        res = run_jobs("crit_pageread", [{"argv": ["ps", str(ctr.archives["gz"])]}])[0]
        assert res["rc"] == 0, res["err"]
        assert list(tmp.iterdir()) == []


@pytest.mark.criu
def test_errors_inside_an_archive_name_archive_and_member(ctr: Container, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(ctr.dir, bad)
    with open(bad / "checkpoint" / "pstree.img", "r+b") as f:
        f.write(b"\xde\xad\xbe\xef\xde\xad\xbe\xef")
    members = ["config.dump", "spec.dump", "checkpoint", "rootfs-diff.tar"]
    archives = [_archive(bad, tmp_path / "bad.tar", "tar", members),
                _archive(bad, tmp_path / "bad.tar.zst", "zst", members)]
    with _tmpdir(tmp_path / "tmp"):
        res = run_jobs("crit_pageread", [{"argv": ["ps", str(a)]} for a in archives])
    for r, a in zip(res, archives, strict=True):
        assert r["rc"] == 1
        assert r["err"].startswith(f"crit-pageread: {a}: checkpoint/pstree.img: bad magic"), r["err"]
        assert "crit-pageread-archive" not in r["err"] and len(r["err"].splitlines()) == 1


# --- hostile archives (issue 11, finding 7): every bound a one-line error naming ARCHIVE: MEMBER ------


def _hostile_tar(path: Path, name: str, data: bytes = b"x") -> Path:
    import io

    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return path


def _one_line_error(res: dict, *wants: str) -> None:
    assert res["rc"] == 1, res
    lines = res["err"].strip().splitlines()
    assert len(lines) == 1 and len(lines[0]) < 600, res["err"][:2000]
    for w in wants:
        assert w in lines[0], lines[0]


def test_a_member_1200_directories_deep_is_a_one_line_error(tmp_path: Path) -> None:
    archive = _hostile_tar(tmp_path / "deep.tar", "d/" * 1200 + "pstree.img")
    res = run_jobs("crit_pageread", [{"argv": ["ps", str(archive)]}])[0]
    _one_line_error(res, str(archive), "1201 directories deep, more than 64")
    with pytest.raises(ImageError, match="directories deep"):
        open_images(archive)


def test_a_name_over_name_max_is_a_one_line_error(tmp_path: Path) -> None:
    archive = _hostile_tar(tmp_path / "long.tar", "checkpoint/" + "n" * 300 + ".img")
    res = run_jobs("crit_pageread", [{"argv": ["ps", str(archive)]}])[0]
    _one_line_error(res, f"{archive}: checkpoint/nnn", "NAME_MAX")


@pytest.mark.parametrize("kind", ["gz", "zst"])
def test_a_compression_bomb_stops_before_filling_tmpdir(tmp_path: Path, kind: str) -> None:
    """256 MiB of zeros as an image member: refused against the tmpfs's free space and against max_unpacked."""
    info = tarfile.TarInfo("checkpoint/pages-1.img")
    info.size = 256 << 20
    archive = tmp_path / f"bomb.tar.{kind}"
    with open(archive, "wb") as out:
        proc = subprocess.Popen([*KINDS[kind], "-c"], stdin=subprocess.PIPE, stdout=out)
        assert proc.stdin is not None
        proc.stdin.write(info.tobuf(format=tarfile.GNU_FORMAT))
        zeros = bytes(1 << 20)
        for _ in range(256):
            proc.stdin.write(zeros)
        proc.stdin.write(bytes(1024))  # end of archive
        proc.stdin.close()
        assert proc.wait() == 0
    assert archive.stat().st_size < 2 << 20
    with _tmpdir(tmp_path / "tmp", "8m") as tmp:
        res = run_jobs("crit_pageread", [{"argv": ["ps", str(archive)]}])[0]
        _one_line_error(res, f"{archive}: checkpoint/pages-1.img", "free")
        assert list(tmp.iterdir()) == []
    with _tmpdir(tmp_path / "tmp2") as tmp:
        os.environ["CRIT_PAGEREAD_ARCHIVE__MAX_UNPACKED"] = str(1 << 20)
        try:
            res = run_jobs("crit_pageread", [{"argv": ["ps", str(archive)]}])[0]
        finally:
            del os.environ["CRIT_PAGEREAD_ARCHIVE__MAX_UNPACKED"]
        _one_line_error(res, f"{archive}: checkpoint/pages-1.img", "max_unpacked")
        assert list(tmp.iterdir()) == []


@pytest.mark.criu
@pytest.mark.parametrize("fmt", ["gnu", "posix"])
def test_a_gnu_sparse_pages_member_declaring_100_gb_is_refused(ctr: Container, tmp_path: Path, fmt: str) -> None:
    work = tmp_path / "sparse"
    shutil.copytree(ctr.images, work / "checkpoint")
    pages = sorted((work / "checkpoint").glob("pages-*.img"))[0]
    pages.unlink()
    with open(pages, "wb") as f:
        f.truncate(100 << 30)
    archive = tmp_path / "sparse.tar"
    subprocess.run(["tar", "-S", f"--format={fmt}", "-C", str(work), "-cf", str(archive), "checkpoint"], check=True)
    assert archive.stat().st_size < 64 << 20
    zst = tmp_path / "sparse.tar.zst"
    subprocess.run(["zstd", "-q", "-1", str(archive), "-o", str(zst)], check=True)
    with _tmpdir(tmp_path / "tmp") as tmp:
        res = run_jobs("crit_pageread", [{"argv": ["grep", str(a), "x"]} for a in (archive, zst)])
        assert list(tmp.iterdir()) == []
    for r, a in zip(res, (archive, zst), strict=True):
        _one_line_error(r, f"{a}: checkpoint/{pages.name}", "GNU sparse")


@pytest.mark.criu
def test_member_count_and_truncation_are_one_line_errors(ctr: Container, tmp_path: Path) -> None:
    os.environ["CRIT_PAGEREAD_ARCHIVE__MAX_MEMBERS"] = "5"
    try:
        res = run_jobs("crit_pageread", [{"argv": ["ps", str(ctr.archives["tar"])]}])[0]
    finally:
        del os.environ["CRIT_PAGEREAD_ARCHIVE__MAX_MEMBERS"]
    _one_line_error(res, str(ctr.archives["tar"]), "more than 5 members")
    cut = tmp_path / "cut.tar"
    data = ctr.archives["tar"].read_bytes()
    cut.write_bytes(data[: len(data) // 3])
    res = run_jobs("crit_pageread", [{"argv": ["ps", str(cut)]}])[0]
    _one_line_error(res, str(cut), "truncated archive")


# --- container files: coredump --root --------------------------------------------------------------


@pytest.mark.criu
def test_coredump_root_finds_mapped_files_in_the_container_filesystem(criu_ok: None, tmp_path: Path) -> None:
    (tmp_path / "build").mkdir()
    exe = build_victim(tmp_path / "build")
    victim = start_victim(exe, tmp_path / "run", "--seed", "5")
    try:
        dump(victim, tmp_path / "dump")
    finally:
        victim.kill()
    with open_images(tmp_path / "dump") as images:
        mapped = sorted({name for _, name, _ in images._files if name and name.startswith("/")})
    root = tmp_path / "rootfs"
    for name in mapped:
        host = Path(name)
        if not host.is_file():
            continue
        inside = root / name.lstrip("/")
        if host == exe:
            # In the container the program's directory is a symlink with an absolute target.
            real = root / "opt" / "real-bin"
            real.mkdir(parents=True, exist_ok=True)
            shutil.copy2(host, real / host.name)
            inside.parent.parent.mkdir(parents=True, exist_ok=True)
            inside.parent.symlink_to("/opt/real-bin")
            continue
        inside.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(host, inside)
    good = run_jobs("crit_pageread", [{"argv": ["coredump", str(tmp_path / "dump"), "-o", str(tmp_path / "c0"),
                                                "--json"]}])[0]
    assert good["rc"] == 0, good["err"]
    with open(exe, "ab") as f:
        f.write(b"\0" * 100)  # the host's program is not the container's any more
    res = run_jobs("crit_pageread", [
        {"argv": ["coredump", str(tmp_path / "dump"), "-o", str(tmp_path / "host"), "--json"]},
        {"argv": ["coredump", str(tmp_path / "dump"), "-o", str(tmp_path / "ctr"), "--json", "--root", str(root)]},
    ])
    host, inside = (json.loads(r["out"].splitlines()[0]) for r in res)
    assert host["missing"] and all("changed" in m["reason"] for m in host["missing"])
    assert inside["missing"] == [] and inside["file_bytes"] == json.loads(good["out"].splitlines()[0])["file_bytes"]
    core = (tmp_path / "ctr" / f"core.{victim.pid}").read_bytes()
    assert b"mapped files from container root " + str(root).encode() in core[:1 << 20]
    assert b"mapped files from the host" in (tmp_path / "host" / f"core.{victim.pid}").read_bytes()[:1 << 20]
