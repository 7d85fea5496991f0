"""The one planner: a chain resolved once into a map of runs, reads and segments() planned from it.

Synthetic images (crit_pageread.testing), no CRIU: every read through a chain is checked against the
bytes the newest level says a page has (its own, or its parent's, to any depth).
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from crit_pageread import ChainError, NotDumpedError, open_images
from crit_pageread.reader import PRESENT
from crit_pageread.testing import LAZY, PARENT, ImageBuilder, MockStrategy, VmaSpec

PAGE = 4096
BASE = 0x10000
PAGES = 96


def _page(level: int, n: int) -> bytes:
    return bytes([level * 16 + n % 16]) * 16 + n.to_bytes(4, "little") * ((PAGE - 16) // 4)


def _chain(tmp_path: Path, levels: int = 3, seed: int = 1, holes: bool = True) -> tuple[Path, dict[int, bytes]]:
    """`levels` directories; each page's true bytes live in one level, newer levels mark it PE_PARENT.
    Returns the newest directory and the truth (vaddr -> bytes); some pages are holes everywhere."""
    rng = random.Random(seed)
    home = {}
    for n in range(PAGES):
        if holes and rng.random() < 0.15:
            continue
        home[n] = rng.randrange(levels)  # 0 = newest
    truth = {BASE + n * PAGE: _page(d, n) for n, d in home.items()}
    for d in range(levels - 1, -1, -1):  # oldest first
        runs: list = []
        for n in range(PAGES):
            if n not in home or home[n] < d:
                continue  # a hole, or a page only newer levels hold
            runs.append((BASE + n * PAGE, _page(d, n)) if home[n] == d else (BASE + n * PAGE, 1, PARENT))
        b = ImageBuilder(tmp_path / f"d{levels - d}")
        if d == 0:
            b.process(10, vmas=[VmaSpec(BASE, BASE + PAGES * PAGE)])
        b.pagemap(10, runs)
        if d < levels - 1:
            b.parent(f"../d{levels - d - 1}")
        b.write()
    return tmp_path / f"d{levels}", truth


def _expected(truth: dict[int, bytes], vaddr: int, length: int) -> bytes:
    out = bytearray(length)
    for a in range(vaddr - vaddr % PAGE, vaddr + length, PAGE):
        data = truth.get(a, bytes(PAGE))
        lo, hi = max(a, vaddr), min(a + PAGE, vaddr + length)
        out[lo - vaddr : hi - vaddr] = data[lo - a : hi - a]
    return bytes(out)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_reads_through_a_chain_equal_the_newest_level_s_pages_whatever_the_range(tmp_path: Path, seed: int) -> None:
    newest, truth = _chain(tmp_path, levels=3 + seed % 2, seed=seed)
    rng = random.Random(seed)
    with open_images(newest) as images:
        for strategy in ("preadv", "pread", "mmap"):
            with images.reader(10, strategy, zero_fill=True) as reader:
                for _ in range(60):
                    vaddr = BASE + rng.randrange(PAGES * PAGE - 1)
                    length = rng.randrange(1, min(BASE + PAGES * PAGE - vaddr, 20 * PAGE) + 1)
                    assert reader.read(vaddr, length) == _expected(truth, vaddr, length), (strategy, vaddr, length)
                    buf = bytearray(b"\xee" * length)
                    reader.readinto(vaddr, buf, holes="skip", defer=True)
                    reader.sync()
                    want = _expected(truth, vaddr, length)
                    for a in range(vaddr - vaddr % PAGE, vaddr + length, PAGE):
                        lo, hi = max(a, vaddr) - vaddr, min(a + PAGE, vaddr + length) - vaddr
                        assert buf[lo:hi] == (want[lo:hi] if a in truth else b"\xee" * (hi - lo))


def test_the_chain_is_resolved_once_into_runs_and_segments_are_its_view(tmp_path: Path) -> None:
    newest, truth = _chain(tmp_path, levels=3, seed=4)
    with open_images(newest) as images:
        with images.reader(10, "pread", zero_fill=True) as reader:
            flat = reader.memory_map()
            assert reader.memory_map() is flat  # built once per target
            reader.read(BASE, PAGES * PAGE)
            assert reader.memory_map() is flat
            assert len(flat) <= sum(len(images.pagemap(10)) for _ in range(3))  # runs, never pages
            assert all(k == PRESENT for k in flat.kinds)
            segs = list(reader.segments(BASE, PAGES * PAGE))
            assert sum(s.length for s in segs) == PAGES * PAGE
            for s in segs:
                if s.kind == "present":
                    data = Path(s.pages.path).read_bytes()[s.offset : s.offset + s.length]  # type: ignore[union-attr]
                    assert data == _expected(truth, s.vaddr, s.length)
                    assert Path(s.image).resolve() == (tmp_path / f"d{3 - s.depth}").resolve()
                else:
                    assert s.kind == "hole" and all(a not in truth for a in range(s.vaddr, s.end, PAGE))


def test_a_multi_run_read_is_one_request_per_file_range(tmp_path: Path) -> None:
    """Pages back to back in one pages file with holes between them in memory: one ScatterRequest."""
    b = ImageBuilder(tmp_path / "d")
    b.process(10, vmas=[VmaSpec(BASE, BASE + 64 * PAGE)])
    b.pagemap(10, [(BASE + 2 * n * PAGE, _page(0, n)) for n in range(32)])
    b.write()
    mock = MockStrategy()
    with open_images(tmp_path / "d") as images, images.reader(10, mock) as reader:
        buf = bytearray(64 * PAGE)
        reader.readinto(BASE, buf, holes="skip")
        assert [(r.how, r.length) for r in mock.log] == [("read_many", 32 * PAGE)]
        assert bytes(buf[2 * 5 * PAGE : 2 * 5 * PAGE + PAGE]) == _page(0, 5)


def test_a_broken_link_fails_only_the_reads_that_need_it(tmp_path: Path) -> None:
    """The parent lacks a page the newest level has in parent: reading it is a ChainError naming both
    levels; the rest of the range reads."""
    b = ImageBuilder(tmp_path / "d1")
    b.pagemap(10, [(BASE, _page(1, 0))])
    b.write()
    b = ImageBuilder(tmp_path / "d2")
    b.process(10, vmas=[VmaSpec(BASE, BASE + 4 * PAGE)])
    b.pagemap(10, [(BASE, 1, PARENT), (BASE + PAGE, _page(0, 1)), (BASE + 2 * PAGE, 1, PARENT)])
    b.parent("../d1")
    b.write()
    with open_images(tmp_path / "d2") as images, images.reader(10, "pread") as reader:
        assert reader.read(BASE, 2 * PAGE) == _page(1, 0) + _page(0, 1)
        with pytest.raises(ChainError, match=r"d1/pagemap-10.img: lacks pages at 0x12000-0x13000 that .*d2"):
            reader.read(BASE + 2 * PAGE, 16)
        with pytest.raises(ChainError):
            list(reader.segments(BASE, 4 * PAGE))
        with pytest.raises(NotDumpedError):
            reader.read(BASE + 3 * PAGE, 16)


def test_lazy_pages_of_a_parent_are_lazy_in_the_map(tmp_path: Path) -> None:
    b = ImageBuilder(tmp_path / "d1")
    b.pagemap(10, [(BASE, 1, LAZY), (BASE + PAGE, _page(1, 1))])
    b.write()
    b = ImageBuilder(tmp_path / "d2")
    b.process(10, vmas=[VmaSpec(BASE, BASE + 2 * PAGE)])
    b.pagemap(10, [(BASE, 2, PARENT)])
    b.parent("../d1")
    b.write()
    with open_images(tmp_path / "d2") as images, images.reader(10, "pread") as reader:
        kinds = [(s.kind, s.depth) for s in reader.segments(BASE, 2 * PAGE)]
        assert kinds == [("lazy", 1), ("present", 1)]
        assert reader.read(BASE + PAGE, PAGE) == _page(1, 1)
