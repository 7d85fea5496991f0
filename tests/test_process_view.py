"""The process view on synthetic images (no CRIU): a pid's reader sees private pages, shared mappings
through their segments, a private memfd mapping's own copy first, and zombies as processes without memory."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from native_support import use_helper

from crit_pageread import LazyPageError, NotDumpedError, open_images
from crit_pageread.images import (
    VMA_ANON_SHARED,
    VMA_AREA_MEMFD,
    VMA_AREA_REGULAR,
    VMA_AREA_SYSVIPC,
    VMA_FILE_PRIVATE,
)
from crit_pageread.memory import Readers, area_page_counts
from crit_pageread.testing import LAZY, ImageBuilder, MockStrategy, VmaSpec

PAGE = 4096
PRIV, ANON_SH, MEMFD, SYSV = 0x10000, 0x20000, 0x30000, 0x40000


def pages(*chars: str) -> bytes:
    return b"".join(c.encode() * PAGE for c in chars)


@pytest.fixture
def d(tmp_path: Path) -> Path:
    """pid 10: private anon (a hole in the middle), anonymous shared (segment 5 from offset 1 page),
    a MAP_PRIVATE memfd (file 7 -> segment 9) with one copy-on-write page of its own, SysV segment 6
    (its last page not dumped), a lazy private page; pid 11: a zombie."""
    b = ImageBuilder(tmp_path / "d")
    b.process(10, vmas=[
        VmaSpec(PRIV, PRIV + 3 * PAGE),
        VmaSpec(ANON_SH, ANON_SH + 3 * PAGE, VMA_AREA_REGULAR | VMA_ANON_SHARED, shmid=5, pgoff=PAGE, flags=0x21),
        VmaSpec(MEMFD, MEMFD + 4 * PAGE, VMA_AREA_REGULAR | VMA_AREA_MEMFD | VMA_FILE_PRIVATE, shmid=7, flags=0x02),
        VmaSpec(SYSV, SYSV + 2 * PAGE, VMA_AREA_REGULAR | VMA_AREA_SYSVIPC, shmid=6, flags=0x01),
        VmaSpec(0x50000, 0x51000),
    ])
    b.process(11, 10, zombie=True)
    b.pagemap(10, [(PRIV, pages("a")), (PRIV + 2 * PAGE, pages("c")), (MEMFD + PAGE, pages("P")),
                   (0x50000, 1, LAZY)])
    b.shmem_pagemap(5, [(0, pages("x", "y", "z", "w"))])
    b.shmem_pagemap(9, [(0, pages("S", "S", "S", "S"))])
    b.shmem_pagemap(6, [(0, pages("V"))])
    b.memfd(7, "victim-private-memfd", 9)
    return b.write()


def test_shared_mappings_read_from_their_segment_at_the_vma_offset(d: Path) -> None:
    with open_images(d) as images, images.reader(10) as r:
        assert r.read(ANON_SH, 3 * PAGE) == pages("y", "z", "w")  # pgoff one page into segment 5
        assert r.read(SYSV, PAGE) == pages("V")
        assert r.read(ANON_SH + PAGE - 2, 4) == b"yyzz"  # across pages of the segment


def test_private_memfd_mapping_reads_the_process_copy_first(d: Path) -> None:
    with open_images(d) as images, images.reader(10) as r:
        assert r.read(MEMFD, 4 * PAGE) == pages("S", "P", "S", "S")
        kinds = [(s.vaddr, s.length, s.kind, s.pages.path.name if s.pages else None)
                 for s in r.segments(MEMFD, 4 * PAGE)]
        names = {n for *_, n in kinds}
        assert [k[:3] for k in kinds] == [(MEMFD, PAGE, "present"), (MEMFD + PAGE, PAGE, "present"),
                                         (MEMFD + 2 * PAGE, 2 * PAGE, "present")]
        assert len(names) == 2  # the pid's pages file for its copy, the segment's for the rest


def test_zero_fill_zeroes_only_what_was_not_dumped(d: Path) -> None:
    with open_images(d) as images, images.reader(10, zero_fill=True) as r:
        assert r.read(SYSV, 2 * PAGE) == pages("V") + bytes(PAGE)
        assert r.read(PRIV, 3 * PAGE) == pages("a") + bytes(PAGE) + pages("c")
        assert r.read(ANON_SH, PAGE) == pages("y")
    with open_images(d) as images, images.reader(10) as r, pytest.raises(NotDumpedError) as err:
        r.read(SYSV, 2 * PAGE)
    assert "pagemap-shmem-6.img (segment offset 0x1000, mapped by pid 10)" in str(err.value)
    assert f"not dumped at {SYSV + PAGE:#x}-{SYSV + 2 * PAGE:#x}" in str(err.value)


def test_one_batch_across_private_and_shared_pages_errors_before_io(d: Path) -> None:
    mock = MockStrategy()
    with open_images(d) as images, images.reader(10, mock) as r:
        a, b, c = bytearray(PAGE), bytearray(2 * PAGE), bytearray(PAGE)
        r.readv([(PRIV, a), (MEMFD + PAGE // 2, b), (ANON_SH, c)])
        assert bytes(a) == pages("a") and bytes(c) == pages("y")
        assert bytes(b) == b"S" * (PAGE // 2) + pages("P") + b"S" * (PAGE // 2)
        assert {x.how for x in mock.log} == {"read_many"}
        assert {x.target for x in mock.log} == {"pid 10", "shmem 9", "shmem 5"}
        mock.log.clear()
        with pytest.raises(NotDumpedError):  # the last range is not dumped: nothing is read
            r.readv([(ANON_SH, c), (SYSV + PAGE, bytearray(PAGE))])
        assert mock.log == []
        buf = bytearray(3 * PAGE)
        r.readinto(MEMFD, buf, defer=True)
        assert mock.pending > 0 and bytes(buf) == bytes(3 * PAGE)
        r.sync()
        assert bytes(buf) == pages("S", "P", "S")


def test_lazy_private_pages_need_a_strategy_that_serves_them(d: Path) -> None:
    with open_images(d) as images:
        with images.reader(10) as r, pytest.raises(LazyPageError):
            r.read(0x50000, 8)
        with images.reader(10, MockStrategy({0x50000: b"L" * PAGE})) as r:
            assert r.read(0x50000, 8) == b"L" * 8


def test_page_counts_count_shared_pages_in_their_segment(d: Path) -> None:
    with open_images(d) as images, Readers(images, None) as readers:
        by_start = {v.start: area_page_counts(readers.area(10, v)) for v in images.vmas(10)}
        assert by_start[ANON_SH]["present"] == 3
        assert by_start[MEMFD]["present"] == 4
        assert by_start[SYSV] == {"present": 1, "parent": 0, "lazy": 0, "not_dumped": 1}
        assert by_start[PRIV] == {"present": 2, "parent": 0, "lazy": 0, "not_dumped": 1}
        assert readers.area(10, images.vmas(10)[2]).shmid == 9


def test_zombie_is_a_process_without_memory(d: Path) -> None:
    with open_images(d) as images:
        assert images.pids == [10, 11] and images.is_zombie(11) and not images.is_zombie(10)
        assert images.vmas(11) == []
        with images.reader(11) as r:
            assert [s.kind for s in r.segments(0x1000, PAGE)] == ["hole"]
            with pytest.raises(NotDumpedError, match="zombie"):
                r.read(0x1000, 1)
            buf = bytearray(b"zz")
            r.readinto(0x1000, buf, holes="zero")
            assert buf == b"\0\0"


def test_copy_to_a_file_goes_through_the_process_view(d: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    fd = os.open(out, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        with open_images(d) as images, images.reader(10) as r:
            n = r.write_to(fd, [(MEMFD, 4 * PAGE, 0), (ANON_SH, PAGE, 4 * PAGE)])
        assert n == 5 * PAGE
    finally:
        os.close(fd)
    assert out.read_bytes() == pages("S", "P", "S", "S", "y")


def test_send_view_and_write_segments_see_the_shared_mappings(d: Path, tmp_path: Path) -> None:
    import socket

    want = pages("S", "P", "S", "S")
    with open_images(d) as images, images.reader(10) as r:
        a, b = socket.socketpair()
        with a, b:
            assert r.send(a.fileno(), MEMFD, 4 * PAGE) == 4 * PAGE
            got = b""
            while len(got) < 4 * PAGE:
                got += b.recv(1 << 20)
        assert got == want
        with r.view(ANON_SH, 2 * PAGE) as v:  # one contiguous range of segment 5's pages file
            assert bytes(v.data[v.start : v.start + 2 * PAGE]) == pages("y", "z")
        with r.view(MEMFD, 4 * PAGE) as v:  # three pieces in two files: copied
            assert bytes(v.data[v.start : v.start + 4 * PAGE]) == want
        out = tmp_path / "segs"
        fd = os.open(out, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            segs = list(r.segments(MEMFD, 4 * PAGE))
            r.write_segments(fd, [(s, s.vaddr - MEMFD) for s in segs])
        finally:
            os.close(fd)
        assert out.read_bytes() == want


def test_remote_without_a_local_strategy_reads_shared_mappings_from_the_images(d: Path) -> None:
    from crit_pageread.pageserver.client import ServerAddress
    from crit_pageread.strategies.remote import RemoteStrategy

    remote = RemoteStrategy(ServerAddress("127.0.0.1", 1), local=None)  # no server: nothing may be fetched
    try:
        with open_images(d) as images, images.reader(10, remote) as r:
            assert r.read(ANON_SH, 3 * PAGE) == pages("y", "z", "w")
            assert r.read(SYSV, PAGE) == pages("V")
        assert remote.gets == 0
    finally:
        remote.close()


def _segment_runs(r, start: int, end: int, lazy_ok: bool) -> list[tuple[int, int]]:  # type: ignore[no-untyped-def]
    """Maximal readable ranges of [start, end) from segments() (the per-piece view)."""
    runs: list[tuple[int, int]] = []
    for s in r.segments(start, end - start):
        if s.kind == "present" or (s.kind == "lazy" and lazy_ok):
            if runs and runs[-1][1] == s.vaddr:
                runs[-1] = (runs[-1][0], s.end)
            else:
                runs.append((s.vaddr, s.end))
    return runs


def _segment_bytes(r: Any, a: int, b: int, lazy_ok: bool) -> tuple[int, int]:
    """(readable, lazy left out) bytes of [a, b) by walking segments(), as grep's total once did."""
    readable = lazy = 0
    for s in r.segments(a, b - a):
        if s.kind == "present" or (s.kind == "lazy" and lazy_ok):
            readable += s.length
        elif s.kind == "lazy":
            lazy += s.length
    return readable, lazy


def test_readable_bytes_are_what_a_walk_of_the_segments_counts(d: Path, tmp_path: Path) -> None:
    """grep's total (readable_bytes, counted on the memory maps) is the bytes the segments hold, shared
    mappings, lazy pages and a chain's parent pages included, for every range boundary."""
    lo, hi = PRIV, 0x51000
    cuts = [PRIV, PRIV + PAGE + 100, ANON_SH, ANON_SH + 2 * PAGE, MEMFD + PAGE, MEMFD + 3 * PAGE + 8, SYSV + 100,
            0x50000]
    for lazy in (None, {0x50000: pages("L")}):
        with open_images(d) as images, images.reader(10, MockStrategy(lazy)) as r:
            for a in [lo, *cuts]:
                for b in [*cuts, hi]:
                    if b > a:
                        assert r.readable_bytes(a, b) == _segment_bytes(r, a, b, lazy is not None), (a, b)
    # a chain: the newest level has pages in parent and lazy ones, runs split across the levels' files
    base = 0x7F0000000000
    old = ImageBuilder(tmp_path / "old", layout="4.2")
    old.pagemap(10, [(base + 2 * k * PAGE, pages(chr(65 + k % 26))) for k in range(40)])
    old.write()
    new = ImageBuilder(tmp_path / "new", layout="4.2").parent("../old")
    new.process(10, vmas=[VmaSpec(base, base + 90 * PAGE)])
    runs: list[Any] = []
    for k in range(40):
        runs.append((base + 2 * k * PAGE, 1) if k % 3 else (base + 2 * k * PAGE, pages("n")))
    runs.append((base + 85 * PAGE, 2, LAZY))
    new.pagemap(10, runs).write()
    with open_images(tmp_path / "new") as images, images.reader(10, "pread") as r:
        for a, b in [(base, base + 90 * PAGE), (base + PAGE // 2, base + 86 * PAGE),
                     (base + 3 * PAGE, base + 4 * PAGE)]:
            assert r.readable_bytes(a, b) == _segment_bytes(r, a, b, False)
        area = Readers(images, "pread").area(10, images.vmas(10)[0])
        assert area.readable_bytes() == _segment_bytes(r, base, base + 90 * PAGE, False) == (40 * PAGE, 2 * PAGE)


@pytest.mark.parametrize("helper", ["native", "python"])
def test_readable_runs_are_the_segments_readable_pieces_joined(d: Path, helper: str,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """readable_runs (int64 arrays from the memory maps: the native helper's runs(), or slices) equals what
    segments() says, shared mappings and lazy pages included, for every range boundary."""
    use_helper(helper, monkeypatch)
    lo, hi = PRIV, 0x51000
    cuts = [PRIV, PRIV + PAGE + 100, ANON_SH, ANON_SH + 2 * PAGE, MEMFD + PAGE, MEMFD + 3 * PAGE + 8, SYSV + 100,
            0x50000]
    for lazy in (None, {0x50000: pages("L")}):
        with open_images(d) as images, images.reader(10, MockStrategy(lazy)) as r:
            for a in [lo, *cuts]:
                for b in [*cuts, hi]:
                    if b <= a:
                        continue
                    starts, ends, skipped = r.readable_runs(a, b)
                    assert starts.typecode == ends.typecode == "q"
                    assert list(zip(starts, ends, strict=True)) == _segment_runs(r, a, b, lazy is not None), (a, b)
                    want_lazy = 0 if lazy else sum(s.length for s in r.segments(a, b - a) if s.kind == "lazy")
                    assert skipped == want_lazy
