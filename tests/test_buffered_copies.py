"""write_to of the local strategies: small runs through one buffer, small holes written as zeros when the
caller allows it (extract's --min-hole), large runs as kernel copies; synthetic images (no CRIU).

Oracle: the pages each run was built from, and a sparse file's holes as lseek(SEEK_HOLE) reports them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from crit_pageread import open_images
from crit_pageread.cli.main import main
from crit_pageread.strategies import kernel
from crit_pageread.testing import PARENT, ImageBuilder, VmaSpec

PAGE = 4096
BASE = 0x200000
PAGES = 64  # the VMA's size in pages


def page(i: int, salt: int = 0) -> bytes:
    return bytes([(i * 7 + salt) % 251 + 1]) * PAGE


def layout() -> tuple[list[tuple[int, bytes]], bytes]:
    """Runs of the VMA (first page, data) and its memory (holes as zeros). Small runs: single pages with
    one-page holes (0-18), 2 pages after a 2-page hole (22), one page after a 6-page hole (30); a 24-page
    run (32: a kernel copy); then 4 pages (58, two entries) and one after a one-page hole (63)."""
    runs: list[tuple[int, bytes]] = [(i, page(i)) for i in range(0, 20, 2)]
    runs += [(22, page(22) + page(23)), (30, page(30)), (32, b"".join(page(i) for i in range(32, 56))),
             (58, page(58) + page(59) + page(60)), (61, page(61)), (63, page(63))]
    memory = bytearray(PAGES * PAGE)
    for i, data in runs:
        memory[i * PAGE : i * PAGE + len(data)] = data
    return runs, bytes(memory)


def build(path: Path) -> Path:
    runs, _ = layout()
    b = ImageBuilder(path).process(5, vmas=[VmaSpec(BASE, BASE + PAGES * PAGE)])
    b.pagemap(5, [(BASE + i * PAGE, data) for i, data in runs])
    return b.write()


def holes(path: Path) -> list[tuple[int, int]]:
    """The file's holes as the file system reports them (SEEK_HOLE/SEEK_DATA)."""
    out = []
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        pos = 0
        while pos < size:
            hole = os.lseek(fd, pos, os.SEEK_HOLE)
            if hole >= size:
                break
            try:
                data = os.lseek(fd, hole, os.SEEK_DATA)
            except OSError:
                data = size
            out.append((hole, data))
            pos = data
    finally:
        os.close(fd)
    return out


@pytest.mark.parametrize("strategy", ["pread", "preadv", "mmap"])
@pytest.mark.parametrize("min_hole", [None, "0", "65536"])
def test_extract_writes_the_same_bytes_and_keeps_holes_above_min_hole(
    tmp_path: Path, strategy: str, min_hole: str | None, capsys: pytest.CaptureFixture[str]
) -> None:
    d = build(tmp_path / "d")
    out = tmp_path / "out"
    argv = ["extract", str(d), "-o", str(out), "--strategy", strategy]
    if min_hole is not None:
        argv += ["--min-hole", min_hole]
    assert main(argv) == 0, capsys.readouterr().err
    _, memory = layout()
    (name,) = os.listdir(out / "pid-5")
    file = out / "pid-5" / name
    assert file.read_bytes() == memory
    index = json.loads((out / "index.json").read_text())
    assert index["files"][0]["vmas"][0]["bytes"] == sum(len(d) for _, d in layout()[0])
    found = holes(file)
    if not found and min_hole == "0":
        pytest.skip("this file system does not report holes")
    pages = {(a // PAGE, b // PAGE) for a, b in found}
    # Never filled: holes next to the large run (a kernel copy of its own).
    kept = {(31, 32), (56, 58)}
    if min_hole == "0":  # every hole stays one
        assert pages == {(i, i + 1) for i in range(1, 18, 2)} | {(19, 22), (24, 30), (62, 63)} | kept
    elif min_hole is None:  # default 16 KiB: the 6-page hole stays, the smaller ones are written
        assert pages == {(24, 30)} | kept
    else:  # 64 KiB: the 6-page hole is written too
        assert pages == kept


def test_small_runs_are_one_read_and_one_write_large_ones_a_kernel_copy(tmp_path: Path) -> None:
    d = build(tmp_path / "d")
    _, memory = layout()
    out = tmp_path / "o.bin"
    # Pages 0-30: one preadv (back to back in the pages file), then one pwrite per stretch of output
    # without a hole over `fill` (16 KiB: [0, 24) and [30, 31); 64 KiB: one; 0: one per run, 12); pages
    # 32-55: one kernel copy; 58-63: one preadv, then one pwrite (two without filling the hole at 62).
    for fill, calls in ((16 << 10, 1 + 2 + 1 + 2), (64 << 10, 1 + 1 + 1 + 2), (0, 1 + 12 + 1 + 3)):
        with open_images(d) as images, images.reader(5, "preadv") as r:
            fd = os.open(out, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.ftruncate(fd, PAGES * PAGE)
                before = r.strategy.copies
                r.write_to(fd, [(BASE, PAGES * PAGE, 0)], holes="skip", fill=fill)
                made = r.strategy.copies - before
            finally:
                os.close(fd)
        assert out.read_bytes() == memory
        assert made == calls, (fill, made)


def test_a_chain_squashed_through_the_buffer_reads_each_level(tmp_path: Path) -> None:
    """Runs alternate between the newest image and its parent: packed back to back (squash's output)."""
    parent = ImageBuilder(tmp_path / "p").process(5, vmas=[VmaSpec(BASE, BASE + 32 * PAGE)])
    parent.pagemap(5, [(BASE, b"".join(page(i, 100) for i in range(32)))])
    parent.write()
    child = ImageBuilder(tmp_path / "c").process(5, vmas=[VmaSpec(BASE, BASE + 32 * PAGE)]).parent("../p")
    child_runs = []
    for i in range(0, 32, 4):  # 2 pages here, 2 in the parent
        child_runs += [(BASE + i * PAGE, page(i) + page(i + 1)), (BASE + (i + 2) * PAGE, 2, PARENT)]
    child.pagemap(5, child_runs)
    child.write()
    want = b"".join(page(i) if i % 4 < 2 else page(i, 100) for i in range(32))
    out = tmp_path / "o.bin"
    with open_images(tmp_path / "c") as images, images.reader(5, "pread") as r:
        fd = os.open(out, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            before = r.strategy.copies
            assert r.write_to(fd, [(BASE, 32 * PAGE, 0)]) == 32 * PAGE
            made = r.strategy.copies - before
        finally:
            os.close(fd)
    assert out.read_bytes() == want
    assert made == 16 + 1  # one read per run (8 here, 8 in the parent), one write


def test_a_short_read_is_completed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = build(tmp_path / "d")
    _, memory = layout()
    real = os.preadv
    short = [True]

    def preadv(fd: int, buffers: list[memoryview], offset: int) -> int:
        if short[0] and len(buffers) > 1:
            short[0] = False
            return real(fd, buffers[:1], offset)  # less than asked: the rest must still arrive
        return real(fd, buffers, offset)

    monkeypatch.setattr(kernel.os, "preadv", preadv)
    out = tmp_path / "o.bin"
    with open_images(d) as images, images.reader(5, "pread") as r:
        fd = os.open(out, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, PAGES * PAGE)
            r.write_to(fd, [(BASE, PAGES * PAGE, 0)], holes="skip", fill=PAGE)
        finally:
            os.close(fd)
    assert not short[0] and out.read_bytes() == memory


@pytest.mark.parametrize("strategy", ["pread", "preadv", "mmap"])
def test_a_long_run_off_a_16_page_boundary_is_copied_up_to_it_then_aligned(
    tmp_path: Path, strategy: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kernel copy steps 16 pages at a time: a long run starting off a 16-page boundary of the output is
    split there (every later step aligned); a short one stays one copy. The bytes are the same either way."""
    if kernel.COPY_ALIGN != 16 * PAGE:
        pytest.skip("the expected copies are for 4 KiB pages")
    # Output pages: [1, 41) long and off the boundary (split at 16), [48, 64) aligned (one copy), [67, 80)
    # off the boundary but short (one copy), [81, 120) starts off it and ends at the VMA's end (split at 96).
    spans = [(1, 41), (48, 64), (67, 80), (81, 120)]
    b = ImageBuilder(tmp_path / "d").process(5, vmas=[VmaSpec(BASE, BASE + 120 * PAGE)])
    b.pagemap(5, [(BASE + a * PAGE, b"".join(page(i) for i in range(a, z))) for a, z in spans])
    d = b.write()
    want = bytearray(120 * PAGE)
    for a, z in spans:
        want[a * PAGE : z * PAGE] = b"".join(page(i) for i in range(a, z))
    calls: list[tuple[int, int]] = []
    real = os.copy_file_range

    def copy_file_range(src: int, dst: int, count: int, offset_src: int, offset_dst: int) -> int:
        calls.append((offset_dst // PAGE, count // PAGE))
        return real(src, dst, count, offset_src, offset_dst)

    monkeypatch.setattr(kernel.os, "copy_file_range", copy_file_range)
    out = tmp_path / "o.bin"
    with open_images(d) as images, images.reader(5, strategy) as r:
        fd = os.open(out, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, 120 * PAGE)
            assert r.write_to(fd, [(BASE, 120 * PAGE, 0)], holes="skip") == sum(z - a for a, z in spans) * PAGE
        finally:
            os.close(fd)
    assert out.read_bytes() == want
    if r.strategy._no_copy_file_range:
        pytest.skip("copy_file_range is not supported here")
    assert calls == [(1, 15), (16, 25), (48, 16), (67, 13), (81, 15), (96, 24)]
