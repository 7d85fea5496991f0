"""PageReader's planning on synthetic images with a recording strategy (no CRIU): holes, readv batches,
scatter requests, deferred reads, chains, lazy pages, auto-dedup and both pagemap layouts."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from crit_pageread import ChainError, LazyPageError, NotDumpedError, open_images
from crit_pageread.testing import LAZY, PARENT, ImageBuilder, MockStrategy, VmaSpec

PAGE = 4096
BASE = 0x100000
MARK = 0xEE


def page(i: int) -> bytes:
    return bytes([0x40 + i]) * PAGE


def build(path: Path, layout: str = "4.1") -> Path:
    """pid 7: pages 0-1 present, 2 a hole, 3 present, 4-5 holes, 6 present (all back to back in the file)."""
    b = ImageBuilder(path, layout=layout).process(7, vmas=[VmaSpec(BASE, BASE + 8 * PAGE)])
    b.pagemap(7, [(BASE, page(0) + page(1)), (BASE + 3 * PAGE, page(3)), (BASE + 6 * PAGE, page(6))])
    return b.write()


@pytest.mark.parametrize("layout", ["4.1", "4.2"])
def test_holes_error_before_io_zero_or_skip(tmp_path: Path, layout: str) -> None:
    d = build(tmp_path / "d", layout)
    mock = MockStrategy()
    with open_images(d) as images, images.reader(7, mock) as r:
        assert images.pagemap(7).layout == layout
        with pytest.raises(NotDumpedError, match=f"{BASE + 2 * PAGE:#x}-{BASE + 3 * PAGE:#x}"):
            r.read(BASE, 4 * PAGE)
        assert mock.log == []  # nothing was read
        buf = bytearray([MARK]) * (7 * PAGE)
        r.readinto(BASE, buf, holes="skip")
        assert buf == page(0) + page(1) + bytes([MARK]) * PAGE + page(3) + bytes([MARK]) * 2 * PAGE + page(6)
        r.readinto(BASE, buf, holes="zero")
        assert buf == page(0) + page(1) + bytes(PAGE) + page(3) + bytes(2 * PAGE) + page(6)


def test_a_stretch_with_holes_is_one_scatter_request(tmp_path: Path) -> None:
    mock = MockStrategy()
    with open_images(build(tmp_path / "d")) as images, images.reader(7, mock) as r:
        r.readinto(BASE, bytearray(7 * PAGE), holes="skip")
        assert mock.calls == [("read_many", 1)]
        (req,) = mock.log
        assert (req.pieces, req.length, req.offset) == (3, 4 * PAGE, 0)  # one file range, three pieces
        mock.log.clear()
        r.readinto(BASE + PAGE, bytearray(PAGE))  # inside one entry: one plain read
        assert mock.calls[-1] == ("read", 1) and mock.log[0].offset == PAGE


def test_readv_is_one_batch_and_defer_completes_at_sync(tmp_path: Path) -> None:
    mock = MockStrategy()
    with open_images(build(tmp_path / "d")) as images, images.reader(7, mock) as r:
        bufs = [bytearray(PAGE) for _ in range(3)]
        r.readv([(BASE + 6 * PAGE, bufs[0]), (BASE, bufs[1]), (BASE + 3 * PAGE, bufs[2])])
        assert mock.calls == [("read_many", 3)] and bufs == [page(6), page(0), page(3)]
        mock.calls.clear()
        later = bytearray(2 * PAGE)
        r.readinto(BASE, later, defer=True)
        assert mock.pending == 1 and later == bytes(2 * PAGE)
        r.sync()
        assert later == page(0) + page(1) and mock.pending == 0


def test_lazy_pages_only_through_a_strategy_that_serves_them(tmp_path: Path) -> None:
    b = ImageBuilder(tmp_path / "d").process(7, vmas=[VmaSpec(BASE, BASE + 2 * PAGE)])
    b.pagemap(7, [(BASE, page(0)), (BASE + PAGE, 1, LAZY)])
    d = b.write()
    with open_images(d) as images:
        with images.reader(7, MockStrategy()) as r, pytest.raises(LazyPageError):
            r.read(BASE, 2 * PAGE)
        served = MockStrategy({BASE + PAGE: b"L" * PAGE})
        with images.reader(7, served) as r:
            assert r.read(BASE, 2 * PAGE) == page(0) + b"L" * PAGE
        assert any(x.pages is None for x in served.log)


def chain(tmp_path: Path) -> Path:
    """d1 holds pages 0-1 (page 1 stale); d2 has page 0 in parent and its own page 1."""
    d1 = ImageBuilder(tmp_path / "d1").process(7, vmas=[VmaSpec(BASE, BASE + 2 * PAGE)])
    d1.pagemap(7, [(BASE, page(0) + page(9))]).write()
    d2 = ImageBuilder(tmp_path / "d2").process(7, vmas=[VmaSpec(BASE, BASE + 2 * PAGE)])
    d2.pagemap(7, [(BASE, 1, PARENT), (BASE + PAGE, page(1))]).parent("../d1")
    return d2.write()


def test_parent_pages_come_from_the_parent_and_a_hole_there_is_a_chain_error(tmp_path: Path) -> None:
    d2 = chain(tmp_path)
    with open_images(d2) as images, images.reader(7, MockStrategy()) as r:
        assert r.read(BASE, 2 * PAGE) == page(0) + page(1)
        assert [s.depth for s in r.segments(BASE, 2 * PAGE)] == [1, 0]
    # the parent loses page 0: d2's PE_PARENT entry now points at nothing
    ImageBuilder(tmp_path / "d1").process(7, vmas=[VmaSpec(BASE, BASE + 2 * PAGE)]).pagemap(
        7, [(BASE + PAGE, page(9))]).write()
    with open_images(d2) as images, images.reader(7, MockStrategy()) as r, pytest.raises(ChainError, match="lacks"):
        r.read(BASE, PAGE)


def test_auto_dedup_punches_only_parent_pages_read(tmp_path: Path) -> None:
    d2 = chain(tmp_path)
    parent_pages = next((tmp_path / "d1").glob("pages-*.img"))
    own_pages = next(d2.glob("pages-*.img"))
    before = own_pages.read_bytes()
    with open_images(d2) as images, images.reader(7, MockStrategy(), auto_dedup=True) as r:
        assert r.read(BASE, 2 * PAGE) == page(0) + page(1)
    data = parent_pages.read_bytes()
    assert data[:PAGE] == bytes(PAGE)  # read from the parent: punched
    assert data[PAGE:] == page(9)  # never read: kept
    assert own_pages.read_bytes() == before  # the newest image never changes
    fd = os.open(parent_pages, os.O_RDONLY)
    try:
        assert os.lseek(fd, 0, os.SEEK_DATA) == PAGE  # a real hole, not written zeros
    finally:
        os.close(fd)
