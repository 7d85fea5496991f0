"""The native helper (crit_pageread/_fastio.c) and the pure-Python code give the same bytes and errors.

Synthetic images (crit_pageread.testing), no CRIU: every read of chains (with pages a parent lacks and
lazy pages), fragmented maps, holes in each mode, readv, deferred reads, auto-dedup and shared
memory through a process reader, by each local strategy with the helper and with `native.fastio`
set to None, compared with each other and with the bytes the images say a page has.
"""

from __future__ import annotations

import os
import random
import shutil
import struct
from array import array
from pathlib import Path
from typing import Any

import pytest
from native_support import need_native

from crit_pageread import ChainError, ImageError, LazyPageError, NotDumpedError, native, open_images
from crit_pageread.images import VMA_ANON_SHARED, VMA_AREA_REGULAR
from crit_pageread.reader import BROKEN as BROKEN_KIND
from crit_pageread.reader import LAZY as LAZY_KIND
from crit_pageread.strategy import PlannedRead
from crit_pageread.testing import LAZY, PARENT, ImageBuilder, MockStrategy, VmaSpec

PAGE = 4096
BASE = 0x10000
PAGES = 160
STRATEGIES = ("preadv", "pread", "mmap")
FAST = native.fastio


@pytest.fixture(params=["native", "python"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each test once with the native helper, once without it."""
    if request.param == "native":
        need_native()
    else:
        monkeypatch.setattr(native, "fastio", None)
    return str(request.param)


def _page(level: int, n: int) -> bytes:
    return bytes([level * 16 + n % 16 + 1]) * 8 + n.to_bytes(4, "little") * ((PAGE - 8) // 4)


def _chain(root: Path, levels: int, seed: int, lacking: bool = False, lazy: bool = False, layout: str = "4.1"
           ) -> tuple[Path, dict[int, bytes], set[int]]:
    """A chain whose pages have homes in runs of 1-4 pages (reads hop between the levels' files), holes
    everywhere in some pages; with `lazy`, lazy pages in the newest level; with `lacking`, the oldest level lacks some
    pages a newer one has in parent. Returns the newest directory, the truth (vaddr -> bytes) and the
    pages reading must fail on (lazy or lacking)."""
    rng = random.Random(seed)
    home: dict[int, int] = {}
    n = 0
    while n < PAGES:
        run = rng.randint(1, 4)
        what = rng.random()
        for k in range(n, min(n + run, PAGES)):
            if what < 0.15:
                continue  # a hole
            home[k] = -1 if lazy and what < 0.2 else rng.randrange(levels)  # -1: lazy in the newest level
        n += run
    lacks = {k for k, h in home.items() if lacking and levels > 1 and h == levels - 1 and rng.random() < 0.2}
    truth = {BASE + k * PAGE: _page(h, k) for k, h in home.items() if h >= 0 and k not in lacks}
    bad = {BASE + k * PAGE for k, h in home.items() if h < 0 or k in lacks}
    for d in range(levels - 1, -1, -1):  # oldest first
        runs: list[Any] = []
        for k in range(PAGES):
            h = home.get(k)
            if h is None:
                continue
            vaddr = BASE + k * PAGE
            if h < 0:
                if d == 0:
                    runs.append((vaddr, 1, LAZY))
            elif h == d:
                if k not in lacks:  # the oldest level lacks it: the newer ones have it in parent
                    runs.append((vaddr, _page(d, k)))
            elif h > d:
                runs.append((vaddr, 1, PARENT))
            elif rng.random() < 0.7:  # an older level's stale copy of a page a newer level holds
                runs.append((vaddr, bytes([0xEE]) * PAGE))
        b = ImageBuilder(root / f"d{levels - d}", layout=layout)
        if d == 0:
            b.process(10, vmas=[VmaSpec(BASE, BASE + PAGES * PAGE)])
        b.pagemap(10, runs)
        if d < levels - 1:
            b.parent(f"../d{levels - d - 1}")
        b.write()
    return root / f"d{levels}", truth, bad


def _ranges(rng: random.Random, count: int) -> list[tuple[int, int]]:
    out = [(BASE, PAGES * PAGE), (BASE - PAGE, 3 * PAGE), (BASE + PAGES * PAGE - 100, 300)]
    for _ in range(count):
        vaddr = BASE + rng.randrange(PAGES * PAGE - 1)
        out.append((vaddr, rng.randrange(1, min(BASE + PAGES * PAGE - vaddr, 40 * PAGE) + 1)))
    return out


def _outcome(reader: Any, vaddr: int, length: int, holes: str, defer: bool) -> Any:
    """What a read gives: the buffer (0x5A where skipped), or the error's type and message."""
    buf = bytearray(b"\x5a" * length)
    try:
        reader.readinto(vaddr, buf, holes=holes, defer=defer)
        if defer:
            reader.sync()
    except (NotDumpedError, LazyPageError, ChainError) as exc:
        return type(exc).__name__, str(exc)
    return bytes(buf)


def _expected(truth: dict[int, bytes], bad: set[int], vaddr: int, length: int, holes: str) -> Any:
    out = bytearray(b"\x5a" * length)
    for a in range(vaddr - vaddr % PAGE, vaddr + length, PAGE):
        lo, hi = max(a, vaddr), min(a + PAGE, vaddr + length)
        if a in bad:
            return "error"
        if a in truth:
            out[lo - vaddr : hi - vaddr] = truth[a][lo - a : hi - a]
        elif holes == "error":
            return "error"
        elif holes == "zero":
            out[lo - vaddr : hi - vaddr] = bytes(hi - lo)
    return bytes(out)


def _all_outcomes(newest: Path, ranges: list[tuple[int, int]]) -> dict[tuple[Any, ...], Any]:
    got: dict[tuple[Any, ...], Any] = {}
    with open_images(newest) as images:
        for strategy in STRATEGIES:
            with images.reader(10, strategy) as reader:
                for vaddr, length in ranges:
                    for holes in ("error", "zero", "skip"):
                        for defer in (False, True):
                            got[strategy, vaddr, length, holes, defer] = _outcome(reader, vaddr, length, holes, defer)
    return got


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_chains_read_the_same_with_and_without_the_helper(tmp_path: Path, seed: int, monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    need_native()
    newest, truth, bad = _chain(tmp_path, levels=1 + seed % 4, seed=seed, lacking=seed % 2 == 0, lazy=True)
    ranges = _ranges(random.Random(seed), 40)
    with_helper = _all_outcomes(newest, ranges)
    monkeypatch.setattr(native, "fastio", None)
    without = _all_outcomes(newest, ranges)
    assert with_helper == without
    for (_strategy, vaddr, length, holes, _defer), got in with_helper.items():
        want = _expected(truth, bad, vaddr, length, holes)
        if want == "error":
            assert isinstance(got, tuple), (vaddr, length, holes)
        else:
            assert got == want, (vaddr, length, holes)


@pytest.mark.parametrize("layout", ["4.1", "4.2"])
def test_the_memory_map_of_a_chain_is_the_same_with_and_without_the_helper(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, layout: str
) -> None:
    """PE_PARENT, PE_LAZY and pages the oldest level lacks, in both layouts: the same typed columns."""
    need_native()
    newest, _truth, _bad = _chain(tmp_path, levels=4, seed=6, lacking=True, lazy=True, layout=layout)

    def columns() -> tuple[Any, ...]:
        with open_images(newest) as images, images.reader(10, "pread") as reader:
            m = reader.memory_map()
            files = [None if f is None else str(f.path) for f in map(m.pages, range(len(m)))]
            broken = {k: (type(e).__name__, str(e)) for k, e in m.broken.items()}
            return m.starts, m.sizes, m.kinds, m.flags, files, m.offsets, m.depths, broken, m.images

    native_map = columns()
    assert [c.typecode for c in native_map[:4]] + [c.typecode for c in native_map[5:7]] == ["q", "q", "B", "B",
                                                                                          "q", "H"]
    monkeypatch.setattr(native, "fastio", None)
    assert columns() == native_map
    assert native_map[7]  # some runs are broken: the oldest level lacks pages
    assert {LAZY_KIND, BROKEN_KIND} <= set(native_map[2])


def test_a_fragmented_read_is_one_plan_and_reads_every_piece(tmp_path: Path, path: str) -> None:
    """Single pages with holes between them: one PlannedRead with the helper, one ScatterRequest without."""
    b = ImageBuilder(tmp_path / "d")
    b.process(10, vmas=[VmaSpec(BASE, BASE + 2 * PAGES * PAGE)])
    b.pagemap(10, [(BASE + 2 * k * PAGE, _page(0, k)) for k in range(PAGES)])
    b.write()
    seen: list[Any] = []
    with open_images(tmp_path / "d") as images:
        for strategy in STRATEGIES:
            with images.reader(10, strategy) as reader:
                real = reader.strategy.read_many

                def spy(requests: list[Any], real: Any = real) -> None:
                    seen.append([type(r).__name__ for r in requests])
                    real(requests)

                reader.strategy.read_many = spy  # type: ignore[method-assign]
                buf = bytearray(2 * PAGES * PAGE)
                reader.readinto(BASE, buf, holes="skip")
                for k in range(PAGES):
                    assert buf[2 * k * PAGE : (2 * k + 1) * PAGE] == _page(0, k)
                    assert buf[(2 * k + 1) * PAGE : (2 * k + 2) * PAGE] == bytes(PAGE)
    want = "PlannedRead" if path == "native" else "ScatterRequest"
    assert seen == [[want]] * len(STRATEGIES)


def test_readv_and_deferred_reads_into_one_buffer_match(tmp_path: Path, path: str) -> None:
    newest, truth, _bad = _chain(tmp_path, levels=3, seed=8)
    rng = random.Random(8)
    with open_images(newest) as images:
        for strategy in STRATEGIES:
            with images.reader(10, strategy) as reader:
                ranges = [(BASE + rng.randrange(PAGES) * PAGE, rng.randrange(1, 9) * PAGE) for _ in range(30)]
                ranges = [(v, min(n, BASE + PAGES * PAGE - v)) for v, n in ranges]
                buf = bytearray(sum(n for _, n in ranges))
                view = memoryview(buf)
                iov, at = [], 0
                for v, n in ranges:
                    iov.append((v, view[at : at + n]))
                    at += n
                reader.readv(iov, holes="zero", defer=True)
                reader.sync()
                at = 0
                for v, n in ranges:
                    assert bytes(buf[at : at + n]) == _expected(truth, set(), v, n, "zero")
                    at += n
                view.release()


def test_auto_dedup_punches_the_same_parent_pages(tmp_path: Path, path: str) -> None:
    """Auto-dedup plans in Python either way; its reads and punches are the same with the helper."""
    src, truth, _bad = _chain(tmp_path / "src", levels=3, seed=9)
    for strategy in STRATEGIES:
        root = tmp_path / strategy
        shutil.copytree(tmp_path / "src", root, symlinks=True)
        with open_images(root / "d3") as images, images.reader(10, strategy, auto_dedup=True, zero_fill=True) as r:
            assert r.read(BASE, PAGES * PAGE) == _expected(truth, set(), BASE, PAGES * PAGE, "zero")
        for level in ("d1", "d2"):
            pages = next((root / level).glob("pages-*.img"))
            assert pages.stat().st_blocks * 512 < pages.stat().st_size  # punched
    assert src.exists()


def test_shared_memory_reads_through_the_segment(tmp_path: Path, path: str) -> None:
    b = ImageBuilder(tmp_path / "d")
    shared = VmaSpec(BASE + 8 * PAGE, BASE + 16 * PAGE, status=VMA_AREA_REGULAR | VMA_ANON_SHARED, shmid=5,
                     flags=0x21)
    b.process(10, vmas=[VmaSpec(BASE, BASE + 8 * PAGE), shared])
    b.pagemap(10, [(BASE + 2 * k * PAGE, _page(0, k)) for k in range(4)])
    b.shmem_pagemap(5, [(2 * k * PAGE, _page(1, k)) for k in range(4)])
    b.write()
    with open_images(tmp_path / "d") as images:
        for strategy in STRATEGIES:
            with images.reader(10, strategy) as reader:
                with pytest.raises(NotDumpedError):
                    reader.read(BASE, 16 * PAGE)
                buf = bytearray(16 * PAGE)
                reader.readinto(BASE, buf, holes="skip")
                for k in range(4):
                    assert buf[2 * k * PAGE : (2 * k + 1) * PAGE] == _page(0, k)
                    assert buf[(8 + 2 * k) * PAGE : (9 + 2 * k) * PAGE] == _page(1, k)


def _packed(reader: Any, starts: list[int], ends: list[int], size: int, gap: int, defer: bool) -> Any:
    """Every pack `read_packed` makes of the ranges, buffers of `size` (0x5A where nothing is written):
    (next, used, bytes), or the error's type and message."""
    out: list[Any] = []
    i = 0
    try:
        while i < len(starts):
            buf = bytearray(b"\x5a" * size)
            nxt, used = reader.read_packed(starts, ends, i, buf, gap=gap, defer=defer)
            if defer:
                reader.sync()
            out.append((nxt, used, bytes(buf)))
            i = nxt
    except (NotDumpedError, LazyPageError, ChainError) as exc:
        return type(exc).__name__, str(exc)
    return out


def test_read_packed_lays_ranges_one_after_another_with_zero_gaps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                                   ) -> None:
    """A scan's packs: the readable runs of a chain and of a process with a shared mapping, read into
    buffers one after another with zeroed gaps, are the same with the helper (one PlannedRead per pack,
    each piece at its own address) and without it, and hold each run's bytes; a range over a hole or
    lazy pages is the same error."""
    need_native()
    newest, truth, bad = _chain(tmp_path / "chain", levels=3, seed=13, lacking=False, lazy=True)
    b = ImageBuilder(tmp_path / "shm")
    shared = VmaSpec(BASE + 8 * PAGE, BASE + 16 * PAGE, status=VMA_AREA_REGULAR | VMA_ANON_SHARED, shmid=5,
                     flags=0x21)
    b.process(10, vmas=[VmaSpec(BASE, BASE + 8 * PAGE), shared, VmaSpec(BASE + 16 * PAGE, BASE + 24 * PAGE)])
    b.pagemap(10, [(BASE + 2 * k * PAGE, _page(0, k)) for k in range(4)]
              + [(BASE + (16 + 2 * k) * PAGE, _page(0, 16 + k)) for k in range(4)])
    b.shmem_pagemap(5, [(2 * k * PAGE, _page(1, k)) for k in range(4)])
    b.write()
    shm_truth = {BASE + 2 * k * PAGE: _page(0, k) for k in range(4)}
    shm_truth.update({BASE + (8 + 2 * k) * PAGE: _page(1, k) for k in range(4)})
    shm_truth.update({BASE + (16 + 2 * k) * PAGE: _page(0, 16 + k) for k in range(4)})

    def outcomes() -> dict[tuple[Any, ...], Any]:
        got: dict[tuple[Any, ...], Any] = {}
        for name, root, end in (("chain", newest, BASE + PAGES * PAGE), ("shm", tmp_path / "shm", BASE + 24 * PAGE)):
            with open_images(root) as images:
                for strategy in STRATEGIES:
                    with images.reader(10, strategy) as reader:
                        starts, ends, _lazy = reader.readable_runs(BASE, end)
                        runs = [(s, e) for s, e in zip(starts, ends, strict=True)
                                if not any(s <= a < e for a in bad)]
                        starts, ends = [s for s, _ in runs], [e for _, e in runs]
                        longest = max(e - s for s, e in runs)
                        for size, gap in ((longest + 16, 16), (longest + 3 * PAGE, 0), (longest + 40 * PAGE, 7)):
                            for defer in (False, True):
                                got[name, strategy, size, gap, defer] = _packed(reader, starts, ends, size, gap, defer)
                        # a range over a hole, and one over lazy pages
                        for s, e in ((BASE, end), *((a, a + PAGE) for a in sorted(bad)[:1])):
                            got[name, strategy, "bad", s] = _packed(reader, [s], [e], e - s + 16, 16, False)
                        got[name, strategy, "runs"] = (starts, ends)
        return got

    seen: list[Any] = []
    real = PlannedRead.requests
    monkeypatch.setattr(PlannedRead, "requests", lambda self: seen.append(self) or real(self))
    with_helper = outcomes()
    monkeypatch.setattr(native, "fastio", None)
    assert outcomes() == with_helper
    for (name, _strategy, *rest), packs in with_helper.items():
        if rest[0] in ("runs", "bad"):
            if rest[0] == "bad":
                assert isinstance(packs, tuple), (name, rest)
            continue
        size, gap, _defer = rest
        starts, ends = with_helper[name, _strategy, "runs"]
        want = truth if name == "chain" else shm_truth
        i = 0
        for nxt, used, data in packs:
            at = 0
            for k in range(i, nxt):
                n = ends[k] - starts[k]
                for a in range(starts[k], ends[k], PAGE):
                    assert data[at + a - starts[k] : at + a - starts[k] + PAGE] == want[a]
                assert data[at + n : at + n + gap] == bytes(gap)
                at += n + gap
            assert at == used <= size and data[used:] == b"\x5a" * (size - used)
            # as many as fit: the next range and its gap would not
            assert nxt == len(starts) or used + ends[nxt] - starts[nxt] + gap > size
            i = nxt
        assert i == len(starts)
    # a plan's pieces expand to plain requests at their own addresses (as a strategy without the helper reads them)
    assert not seen
    with open_images(newest) as images, images.reader(10, "pread") as reader:
        starts, ends, _ = reader.readable_runs(BASE, BASE + PAGES * PAGE)
        keep = [k for k in range(len(starts)) if not any(starts[k] <= a < ends[k] for a in bad)]
        starts, ends = [starts[k] for k in keep], [ends[k] for k in keep]
        monkeypatch.setattr(native, "fastio", FAST)
        fast = native.fastio
        flat = reader.memory_map()
        buf = bytearray(PAGES * PAGE * 2)
        status, _, _, nxt, used, pieces, addresses, files = fast.pack(
            flat.starts, flat.sizes, flat.kinds, flat.depths, flat.offsets, flat.table, starts, ends, 0, buf, 16)
        assert status == 0 and nxt == len(starts)
        plan = PlannedRead(files, pieces, memoryview(buf), starts[0], reader.target, addresses)
        for piece in plan.requests():
            reader.strategy.read(piece)
            assert bytes(piece.dest) == reader.read(piece.vaddr, len(piece.dest))


def test_a_short_pages_file_is_a_one_line_error_naming_it(tmp_path: Path, path: str) -> None:
    b = ImageBuilder(tmp_path / "d")
    b.process(10, vmas=[VmaSpec(BASE, BASE + 8 * PAGE)])
    b.pagemap(10, [(BASE + 2 * k * PAGE, _page(0, k)) for k in range(4)])
    b.write()
    with open_images(tmp_path / "d") as images:
        pages = next((tmp_path / "d").glob("pages-*.img"))
        for strategy in STRATEGIES:
            with images.reader(10, strategy) as reader:
                reader.memory_map()
                with open(pages, "r+b") as f:  # shrunk after the pagemap was checked
                    f.truncate(2 * PAGE)
                with pytest.raises(ImageError, match=r"pages-1\.img: (short pages file|cannot map)"):
                    reader.readinto(BASE, bytearray(8 * PAGE), holes="skip")
                with open(pages, "r+b") as f:
                    f.truncate(4 * PAGE)


def test_addresses_past_int64_are_holes_as_without_the_helper(tmp_path: Path, path: str) -> None:
    newest, _truth, _bad = _chain(tmp_path, levels=2, seed=12)
    with open_images(newest) as images:
        for strategy in STRATEGIES:
            with images.reader(10, strategy) as reader:
                for vaddr in (1 << 62, (1 << 64) - PAGE, 1 << 70):
                    with pytest.raises(NotDumpedError):
                        reader.read(vaddr, 2 * PAGE)
                    buf = bytearray(b"x" * 16)
                    reader.readinto(vaddr, buf, holes="zero")
                    assert buf == bytes(16)


def test_a_strategy_with_only_read_gets_plain_requests(tmp_path: Path, path: str) -> None:
    newest, truth, _bad = _chain(tmp_path, levels=3, seed=10)
    mock = MockStrategy()
    with open_images(newest) as images, images.reader(10, mock, zero_fill=True) as reader:
        assert reader.read(BASE, PAGES * PAGE) == _expected(truth, set(), BASE, PAGES * PAGE, "zero")
    assert mock.log and {r.how for r in mock.log} == {"read_many"}


def test_a_plan_expands_into_the_same_reads(tmp_path: Path) -> None:
    need_native()
    newest, truth, _bad = _chain(tmp_path, levels=3, seed=11)
    with open_images(newest) as images, images.reader(10, "pread") as reader:
        buf = bytearray(PAGES * PAGE)
        requests, _zeros = reader._requests(BASE, memoryview(buf), "skip")
        (plan,) = requests
        assert isinstance(plan, PlannedRead) and len(plan) > 1
        for piece in plan.requests():
            reader.strategy.read(piece)
        assert plan.length == sum(len(t) for t in truth.values())
        for vaddr, data in truth.items():
            assert buf[vaddr - BASE : vaddr - BASE + PAGE] == data


def test_the_helper_refuses_bad_arguments_without_crashing() -> None:
    need_native()
    assert FAST.VERSION == native.VERSION
    dest = bytearray(100)
    fds = struct.pack("q", 0)
    with pytest.raises(ValueError, match="outside"):
        FAST.pread_plan(fds, struct.pack("4q", 0, 0, 90, 20), dest, 1024)
    with pytest.raises(ValueError, match="names no file"):
        FAST.pread_plan(fds, struct.pack("4q", 1, 0, 0, 20), dest, 1024)
    with pytest.raises(ValueError, match="whole pieces"):
        FAST.pread_plan(fds, bytes(31), dest, 1024)
    q, b, h = array("q", [0]), array("B", [0]), array("H", [0])
    with pytest.raises(ValueError, match="differ in length"):
        FAST.plan(q, array("q", [1]), array("B"), h, q, [None], 0, 1, 0)
    with pytest.raises(TypeError, match="bytes-like"):
        FAST.plan([0], [1], [0], [0], [0], [None], 0, 1, 0)  # lists are not columns
    with pytest.raises(TypeError, match="typed column"):
        FAST.plan(q, q, b, b, q, [None], 0, 1, 0)  # depths are uint16
    with pytest.raises(ValueError, match="no pages file"):
        FAST.plan(q, array("q", [4096]), b, h, q, [None], 0, 1, 0)  # a present run whose depth has no file
    with pytest.raises(TypeError, match="six columns"):
        FAST.resolve_count(q, q, b, q, 0, (q, q))
    assert FAST.resolve_count(q, array("q", [4096]), array("B", [4]), q, 0, None) == 1
    into = (array("q", [7]), array("q", [7]), array("B", [7]), array("B", [7]), array("q", [7]), array("H", [7]))
    assert FAST.resolve(q, array("q", [4096]), array("B", [4]), q, 0, None, into) == []
    assert [c[0] for c in into] == [0, 4096, 0, 4, 0, 0]
    with pytest.raises(ValueError, match="shorter"):  # columns too short for the runs: nothing past them written
        FAST.resolve(array("q", [0, 4096]), array("q", [4096, 4096]), array("B", [4, 4]), array("q", [0, 4096]),
                     0, None, into)
    with pytest.raises(ValueError, match="longer"):
        FAST.resolve(q, array("q", [4096]), array("B", [4]), q, 0, None, tuple(c * 2 for c in into))
    with pytest.raises(TypeError, match="formats"):
        FAST.resolve(q, array("q", [4096]), array("B", [4]), q, 0, None, (q, q, q, b, q, h))
    with pytest.raises(TypeError, match="bytearray of records or"):
        FAST.preadv_queue([b""], 1024, 0, None)
    with pytest.raises(TypeError):  # a plan's destination must be writable
        FAST.preadv_queue([(fds, struct.pack("4q", 0, 0, 0, 10), b"read-only")], 1024, 0, None)
    with pytest.raises(ValueError, match="outside"):
        FAST.preadv_queue([(fds, struct.pack("4q", 0, 0, 95, 10), dest)], 1024, 0, None)
    with pytest.raises(ValueError, match="whole records"):
        FAST.preadv_queue([bytearray(31)], 1024, 0, None)
    assert FAST.preadv_queue([], 1024, 0, None) == (0, 0, 0, -1, 0, 0)
    assert FAST.preadv_queue([bytearray()], 1024, 0, None) == (0, 0, 0, -1, 0, 0)


def _write_cases(root: Path) -> list[tuple[Path, dict[int, bytes]]]:
    """A chain (reads hop between three pages files) and a flat image of single pages between holes, a long
    run (one kernel copy, split at an output boundary) and runs around kernel.SMALL_RUN."""
    chain, truth, _bad = _chain(root / "chain", levels=3, seed=21)
    b = ImageBuilder(root / "flat")
    b.process(10, vmas=[VmaSpec(BASE, BASE + 4 * PAGES * PAGE)])
    runs: list[Any] = [(BASE + 2 * k * PAGE, _page(0, k)) for k in range(40)]
    flat_truth = {v: d for v, d in runs}
    at = BASE + 100 * PAGE
    for n in (64, 7, 8, 9, 1, 30):  # pages: a long run, runs just under and over 32 KiB
        data = b"".join(_page(1, at // PAGE + k) for k in range(n))
        runs.append((at, data))
        flat_truth.update({at + k * PAGE: data[k * PAGE : (k + 1) * PAGE] for k in range(n)})
        at += (n + 1) * PAGE
    b.pagemap(10, runs)
    b.write()
    return [(chain, truth), (root / "flat", flat_truth)]


def _data_runs(truth: dict[int, bytes]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for v in sorted(truth):
        if out and out[-1][0] + out[-1][1] == v:
            out[-1] = (out[-1][0], out[-1][1] + PAGE)
        else:
            out.append((v, PAGE))
    return out


@pytest.mark.parametrize("fill", [0, 2 * PAGE, 1 << 20])
def test_write_to_writes_the_same_files_with_and_without_the_helper(tmp_path: Path, path: str, fill: int) -> None:
    """write_to (extract's copies) of every data run of a chain and of a fragmented image, at output offsets with
    gaps and off the 16-page boundary: the file holds each range's bytes at its offset and nothing else. With
    the helper the reader plans them in one call and the strategy gets one `write_plan`; without it, CopyRequests."""
    plans: list[int] = []
    for case, (newest, truth) in enumerate(_write_cases(tmp_path)):
        ranges = _data_runs(truth)
        iov, out = [], 9 * PAGE + 100
        for k, (v, n) in enumerate(ranges):
            iov.append((v, n, out))
            out += n + (k % 3) * PAGE  # back to back, one-page and two-page gaps in the output
        with open_images(newest) as images:
            for strategy in STRATEGIES:
                with images.reader(10, strategy) as reader:
                    real = reader.strategy.write_plan  # type: ignore[attr-defined]

                    def spy(files: Any, pieces: bytes, fd: int, fill: int = 0, real: Any = real) -> None:
                        plans.append(len(pieces))
                        real(files, pieces, fd, fill)

                    reader.strategy.write_plan = spy  # type: ignore[attr-defined]
                    target = tmp_path / f"out-{case}-{strategy}"
                    fd = os.open(target, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
                    try:
                        got = reader.write_to(fd, iov, holes="skip", fill=fill)
                    finally:
                        os.close(fd)
                    assert got == sum(n for _, n, _ in iov)
                    data = target.read_bytes()
                    want = bytearray(iov[-1][2] + iov[-1][1])
                    for v, n, o in iov:
                        want[o : o + n] = b"".join(truth[v + k * PAGE] for k in range(n // PAGE))
                    assert data == want, (case, strategy)
    if path == "native":
        assert len(plans) == 2 * len(STRATEGIES) and min(plans) > 0
    else:
        assert plans == []


def test_write_plan_without_copy_file_range_and_on_a_short_pages_file(tmp_path: Path) -> None:
    """Where copy_file_range is refused the helper copies through a buffer (the same bytes); a pages file cut
    short after planning is a one-line error naming it."""
    need_native()
    (_chain_dir, _), (flat, truth) = _write_cases(tmp_path)
    ranges = _data_runs(truth)
    iov = [(v, n, v - BASE) for v, n in ranges]
    with open_images(flat) as images, images.reader(10, "preadv") as reader:
        reader.strategy._no_copy_file_range = True  # type: ignore[attr-defined]
        fd = os.open(tmp_path / "out", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            reader.write_to(fd, iov, holes="skip")
        finally:
            os.close(fd)
        data = (tmp_path / "out").read_bytes()
        for v, n in ranges:
            assert data[v - BASE : v - BASE + n] == b"".join(truth[v + k * PAGE] for k in range(n // PAGE))
        pages = next(flat.glob("pages-*.img"))
        with open(pages, "r+b") as f:
            f.truncate(50 * PAGE)
        fd = os.open(tmp_path / "out2", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with pytest.raises(ImageError, match=r"pages-1\.img: short pages file: no data at offset"):
                reader.write_to(fd, iov, holes="skip")
        finally:
            os.close(fd)


def test_a_strategy_that_changes_write_to_gets_copy_requests(tmp_path: Path) -> None:
    """A subclass of a local strategy that overrides write_to (and not write_plan) is not handed plans."""
    from crit_pageread.strategies.preadv import PreadvStrategy

    seen: list[int] = []

    class Counting(PreadvStrategy):
        def write_to(self, requests: list[Any], fd: int, fill: int = 0) -> None:
            seen.append(len(requests))
            super().write_to(requests, fd, fill)

    assert PreadvStrategy.writes_plans and not Counting.writes_plans
    (_chain_dir, _), (flat, truth) = _write_cases(tmp_path)
    with open_images(flat) as images, images.reader(10, Counting()) as reader:
        fd = os.open(tmp_path / "out", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            reader.write_to(fd, [(v, n, v - BASE) for v, n in _data_runs(truth)], holes="skip")
        finally:
            os.close(fd)
    assert seen and sum(seen) > 1


def test_write_pieces_refuses_bad_arguments_without_crashing() -> None:
    need_native()
    piece = struct.pack("4q", 1, 0, 0, 4096)
    with pytest.raises(ValueError, match="out of range"):
        FAST.write_pieces([0], piece, 1, 0, 32768, 262144, 65536, 1 << 30, False)
    with pytest.raises(ValueError, match="whole pieces"):
        FAST.write_pieces([0], bytes(31), 1, 0, 32768, 262144, 65536, 1 << 30, False)
    with pytest.raises(ValueError, match="bad sizes"):
        FAST.write_pieces([0], b"", 1, 0, 0, 262144, 65536, 1 << 30, False)
    q, b, h = array("q", [0]), array("B", [0]), array("H", [0])
    with pytest.raises(ValueError, match="differ in length"):
        FAST.plan_copies(q, q, b, h, q, [None], [1], [1, 2], [0])


@pytest.mark.parametrize("layout", ["4.1", "4.2"])
def test_encode_entries_writes_the_bytes_of_the_python_encoder(layout: str) -> None:
    """Pagemap entries encoded from columns in C are byte for byte those of `encode_pagemap_parts`, varints of
    every width (addresses up to 2**63 - 1, counts past 2**32, every flags byte) included."""
    need_native()
    from crit_pageread.pagemap import encode_pagemap_parts

    rng = random.Random(5)
    vaddrs = array("q", [0, 1, 127, 128, 2**63 - 1, *(rng.randrange(2**rng.randrange(1, 63)) for _ in range(500))])
    counts = array("q", [rng.randrange(2**rng.randrange(1, 40)) for _ in vaddrs])
    flags = array("B", [k % 256 for k in range(len(vaddrs))])
    parts = encode_pagemap_parts(7, zip(vaddrs, counts, flags, strict=True), layout)
    next(parts)  # the head
    assert FAST.encode_entries(vaddrs, counts, flags, layout == "4.2") == b"".join(parts)
    assert FAST.encode_entries(array("q"), array("q"), array("B"), False) == b""
    with pytest.raises(ValueError, match="negative"):
        FAST.encode_entries(array("q", [-1]), array("q", [1]), array("B", [4]), False)
    with pytest.raises(ValueError, match="differ in length"):
        FAST.encode_entries(array("q", [1]), array("q"), array("B", [4]), False)
