"""The pagemap parser gives the same index whichever decoder runs (the one-pass parser of entries as CRIU
writes them, native or in Python, or the general entry-by-entry decoder)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from native_support import use_helper

from crit_pageread import pagemap
from crit_pageread.pagemap import PE_LAZY, PE_PARENT, PE_PRESENT, encode_pagemap, load_pagemap

PAGE = 4096


@pytest.fixture(autouse=True, params=["native", "python"])
def one_pass_parser(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each test with the native helper's one-pass parser (when built) and with the Python one."""
    use_helper(request.param, monkeypatch)
    return str(request.param)


def _runs(count: int, seed: int) -> list[tuple[int, int, int]]:
    rng = random.Random(seed)
    runs = []
    vaddr = 0x7F0000000000
    for _ in range(count):
        vaddr += rng.randrange(0, 64) * PAGE  # holes between entries, some none
        nr = rng.randrange(1, 1 << rng.randrange(1, 20))
        flags = rng.choice([PE_PRESENT, PE_PRESENT | PE_LAZY, PE_LAZY, PE_PARENT])
        runs.append((vaddr, nr, flags))
        vaddr += nr * PAGE
    return runs


@pytest.mark.parametrize("layout", ["4.1", "4.2"])
def test_a_big_pagemap_reads_the_same_with_either_decoder(tmp_path: Path, layout: str,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    runs = _runs(20000, seed=len(layout))
    image = tmp_path / "pagemap-1.img"
    image.write_bytes(encode_pagemap(7, runs, layout))
    present = sum(nr for _, nr, flags in runs if flags & PE_PRESENT) * PAGE
    with open(tmp_path / "pages-7.img", "wb") as f:
        f.truncate(present)
    taken = []
    real = pagemap._parse_canonical
    monkeypatch.setattr(pagemap, "_parse_canonical", lambda *a: taken.append(real(*a)) or taken[-1])
    streamed = pagemap._load_streamed
    monkeypatch.setattr(pagemap, "_load_streamed", lambda *a: taken.append(streamed(*a)) or taken[-1])
    monkeypatch.setattr(pagemap, "STREAM_READ", 4099)  # entries cut at the end of every part read
    fast = load_pagemap(image, PAGE)
    assert taken and taken[0] is not None  # the one-pass parser read it (streamed, with the native helper)
    slow = load_pagemap(image, PAGE, canonical_fast_path=False)
    assert fast.entries == slow.entries
    assert [(e.vaddr, e.nr_pages, e.flags) for e in slow.entries] == runs
    assert fast.layout == slow.layout == layout
    offsets = [e.offset for e in slow.entries if e.present]
    assert offsets[0] == 0 and offsets == sorted(offsets)


def test_the_index_is_columns_and_entries_are_made_from_them_only_when_asked(tmp_path: Path) -> None:
    """A loaded pagemap keeps typed columns (25 bytes an entry), not an object per entry; lookups answer from
    them, and `entries` (a view: each entry made when asked for) holds the same entries."""
    runs = _runs(3000, seed=9)
    image = tmp_path / "pagemap-1.img"
    image.write_bytes(encode_pagemap(7, runs, "4.1"))
    with open(tmp_path / "pages-7.img", "wb") as f:
        f.truncate(sum(nr for _, nr, flags in runs if flags & PE_PRESENT) * PAGE)
    pm = load_pagemap(image, PAGE)
    probes = [v + d for v, nr, _ in runs[::97] for d in (-1, 0, nr * PAGE - 1, nr * PAGE)]
    found = [pm.find(v) for v in probes]
    inside = list(pm.entries_in(runs[100][0] - 1, runs[200][0] + 1))
    assert len(pm) == len(runs)
    assert [(type(c).__name__, c.itemsize) for c in pm.columns()] == [("array", 8), ("array", 8), ("array", 1),
                                                                       ("array", 8)]
    entries = pm.entries
    assert [(e.vaddr, e.nr_pages, e.flags) for e in entries] == runs
    assert len(entries) == len(runs) and entries[-1] == list(entries)[-1] and entries[5:9] == list(entries)[5:9]
    assert entries == list(entries) and entries[0].vaddr == runs[0][0]
    with pytest.raises(IndexError):
        entries[len(runs)]
    assert found == [next((e for e in entries if e.vaddr <= v < e.end), None) for v in probes]
    lo, hi = runs[100][0] - 1, runs[200][0] + 1
    assert inside == [e for e in entries if e.vaddr < hi and e.end > lo] and len(inside) >= 101
    assert pm.present_bytes == sum(e.size for e in entries if e.present)


@pytest.mark.parametrize("layout", ["4.1", "4.2"])
@pytest.mark.parametrize("chunk", [pagemap.CHUNK_ENTRIES, 7])
def test_the_one_pass_parser_gives_the_loops_index_or_its_error_on_every_mutant(
    tmp_path: Path, layout: str, chunk: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """For a flipped, cut or inserted byte, the parser of entries as CRIU writes them (a chunk of entries at
    a time: also 7, so that chunks end everywhere; the image streamed in parts of 37 bytes) gives exactly what
    the entry-by-entry decoder gives: the same index, or the same error."""
    import re

    from crit_pageread.errors import ImageError

    monkeypatch.setattr(pagemap, "_CHUNK", re.compile(rb"(?:" + pagemap._CANONICAL_PATTERN + rb"){1,%d}" % chunk,
                                                      re.DOTALL))
    monkeypatch.setattr(pagemap, "CHUNK_ENTRIES", chunk)
    if chunk == 7:  # the streamed image read 37 bytes at a time: parts end inside entries and the head
        monkeypatch.setattr(pagemap, "STREAM_READ", 37)

    runs = _runs(400, seed=3)
    runs.append((runs[-1][0] + (runs[-1][1] + 1) * PAGE, 1 << 20, PE_PRESENT))  # a 3-byte page count
    good = encode_pagemap(7, runs, layout)
    size = sum(nr for _, nr, flags in runs if flags & PE_PRESENT) * PAGE  # the pages file's (at offset 4096)
    rng = random.Random(11)
    mutants = [good]
    for _ in range(300):
        b = bytearray(good)
        at = rng.randrange(12, len(b))
        kind = rng.randrange(3)
        if kind == 0:
            b[at] ^= 1 << rng.randrange(8)
        elif kind == 1:
            del b[at]
        else:
            b.insert(at, rng.randrange(256))
        mutants.append(bytes(b))
    image = tmp_path / "pagemap-1.img"

    def outcome(data: bytes, fast: bool) -> object:
        image.write_bytes(data)
        try:
            pm = load_pagemap(image, PAGE, locate=lambda _id: (4096, size, "pages-7.img"), canonical_fast_path=fast)
        except ImageError as exc:
            return str(exc)
        return pm.columns(), pm.layout, pm.anomalies

    loaded = 0
    for data in mutants:
        want = outcome(data, False)
        assert outcome(data, True) == want, data.hex()
        loaded += isinstance(want, tuple)
    assert loaded >= 5  # some mutants still load (a changed address, say), most are refused
    from crit_pageread.imagefile import check_magic

    first = check_magic(image, good, "PAGEMAP")  # the good image goes through the fast parser itself
    parsed = pagemap._parse_canonical(good, first + 4 + good[first], 4096, PAGE)
    assert parsed is not None and parsed[4] == layout and parsed[0].tolist() == [v for v, _, _ in runs]
