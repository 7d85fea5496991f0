"""Checkpoint archives work wherever a directory does; hostile archives write nothing outside a private temp dir."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
from cli_driver import run_jobs
from corpus import Corpus

from crit_pageread import ImageError, open_images

CASE = "a_single"


def _truth(corpus: Corpus) -> dict[int, str]:
    return corpus.truth(CASE)


def _paths_to_names(out: bytes) -> bytes:
    out = re.sub(rb'"image": "[^"]*"', b'"image": ""', out)
    return re.sub(rb'"/[^"]*[/ ]([^"/ ]+\.img)"', rb'"\1"', out)  # DIR/NAME or ARCHIVE: [DIR/]NAME


def _make(kind: str, src: Path, dest: Path, prefix: str) -> Path:
    if kind == "zst":
        plain = _make("tar", src, dest.with_suffix(""), prefix)
        subprocess.run(["zstd", "-q", "-f", str(plain), "-o", str(dest)], check=True)
        plain.unlink()
        return dest
    mode = {"tar": "w", "gz": "w:gz", "xz": "w:xz"}[kind]
    with tarfile.open(dest, mode) as tar:
        tar.add(src, arcname=prefix or ".")
    return dest


@pytest.mark.parametrize(
    ("kind", "prefix"), [("gz", "checkpoint"), ("tar", ""), ("xz", "images"), ("zst", "checkpoint")]
)
def test_commands_read_archives_like_the_directory(corpus: Corpus, tmp_path: Path, kind: str,
                                                   prefix: str) -> None:
    if kind == "zst" and not shutil.which("zstd"):
        pytest.fail("zstd program missing on this machine")
    src = corpus.root / "cases" / CASE
    archive = _make(kind, src, tmp_path / f"ckpt.tar.{kind}", prefix)
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    os.environ["TMPDIR"] = str(tmpdir)
    try:
        cmds = [["ps", "{}", "--json"], ["pages", "{}", "--json"], ["grep", "{}", "victim", "-C", "3"],
                ["x", "{}", "pages"], ["read", "{}", hex(min(_truth(corpus))), "64"]]
        ours = run_jobs("crit_pageread", [{"argv": [a.replace("{}", str(archive)) for a in c]} for c in cmds])
        plain = run_jobs("crit_pageread", [{"argv": [a.replace("{}", str(src)) for a in c]} for c in cmds])
        out = tmp_path / "out"
        ext = run_jobs("crit_pageread", [{"argv": ["extract", str(archive), "-o", str(out)]}])[0]
    finally:
        del os.environ["TMPDIR"]
    for a, b in zip(ours, plain, strict=True):
        assert a["rc"] == b["rc"] == 0 and a["err"] == b["err"] == ""
        assert _paths_to_names(a["out"]) == _paths_to_names(b["out"])  # pages --json names image paths
    assert ext["rc"] == 0, ext["err"]
    truth = _truth(corpus)
    index = json.loads((out / "index.json").read_text())
    assert index["checkpoint"] == str(archive)
    seen = 0
    for f in index["files"]:
        data = (out / f["file"]).read_bytes()
        for v in f["vmas"]:
            for s, e in v["data"]:
                for a in range(s, e, 4096):
                    page = data[a - v["start"] : a - v["start"] + 4096]
                    assert hashlib.sha256(page).hexdigest() == truth[a]
                    seen += 1
    assert seen == len(truth)
    assert list(tmpdir.iterdir()) == []  # the unpacked copy is gone


def test_library_open_images_accepts_an_archive_and_cleans_up(corpus: Corpus, tmp_path: Path) -> None:
    archive = _make("gz", corpus.root / "cases" / CASE, tmp_path / "c.tar.gz", "checkpoint")
    with open_images(archive) as images:
        unpacked = images._index.tempdir  # type: ignore[union-attr]
        assert images.archive == archive and images.member_dir == "checkpoint"
        assert oct(unpacked.stat().st_mode & 0o777) == "0o700"
        assert str(images.image("pstree.img")) == f"{archive}: checkpoint/pstree.img"
        assert images.pids == [corpus.pid(CASE)]
        with images.reader(corpus.pid(CASE)) as r:
            assert len(r.read(min(_truth(corpus)), 4096)) == 4096
    assert not unpacked.exists()


def _tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)
    return path


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    return info


HOSTILE = {
    "dotdot": ([(_member("checkpoint/../../evil"), b"x")], "'..' component"),
    "absolute": ([(_member("/EVILDIR/evil"), b"x")], "absolute path"),
    "symlink-out": ([(_member("checkpoint/link", tarfile.SYMTYPE, "../../.."), None)], "outside the archive"),
    "symlink-abs": ([(_member("checkpoint/link", tarfile.SYMTYPE, "/etc"), None)], "absolute path"),
    "write-through-link": ([(_member("a", tarfile.SYMTYPE, "."), None),
                            (_member("a/b", tarfile.SYMTYPE, "../.."), None),
                            (_member("a/b/evil"), b"x")], "outside"),
    "device": ([(_member("checkpoint/dev", tarfile.CHRTYPE), None)], "device"),
    "fifo": ([(_member("checkpoint/fifo", tarfile.FIFOTYPE), None)], "FIFO"),
    "hardlink-out": ([(_member("checkpoint/h", tarfile.LNKTYPE, "/etc/passwd"), None)], "absolute path"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_archive_is_rejected_and_writes_nothing_outside(tmp_path: Path, case: str) -> None:
    members, why = HOSTILE[case]
    work = tmp_path / "a" / "b" / "c"
    work.mkdir(parents=True)
    archive = _tar(work / "evil.tar", members)
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    os.environ["TMPDIR"] = str(tmpdir)
    try:
        res = run_jobs("crit_pageread", [{"argv": ["ps", str(archive)]}, {"argv": ["x", str(archive), "ps"]}])
    finally:
        del os.environ["TMPDIR"]
    for r in res:
        assert r["rc"] not in (0, 99) and r["out"] == b""
        lines = r["err"].strip().splitlines()
        assert len(lines) == 1 and str(archive) in lines[0] and why in lines[0], r["err"]
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert not Path("/EVILDIR").exists()
    with pytest.raises(ImageError):
        open_images(archive)


def test_archive_without_images_is_a_one_line_error(tmp_path: Path) -> None:
    archive = _tar(tmp_path / "empty.tar", [(_member("readme.txt"), b"hello")])
    res = run_jobs("crit_pageread", [{"argv": ["grep", str(archive), "x"]}])[0]
    assert res["rc"] == 1 and "no CRIU images" in res["err"] and len(res["err"].splitlines()) == 1
