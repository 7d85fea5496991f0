"""The windowed index (a pagemap of more than WINDOWED_ABOVE entries held in windows decoded on demand, the
reader's map built per address window) reads, finds and refuses exactly what the whole index does.

Synthetic images (ImageBuilder): small windows (WINDOWED_ABOVE, WINDOW_ENTRIES, CHUNK_ENTRIES patched) so
that a few hundred entries cross dozens of windows; every answer compared with the same images opened with
the index whole.
"""

from __future__ import annotations

import random
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from crit_pageread import memory, native, open_images, pagemap, reader
from crit_pageread.errors import CritPageReadError
from crit_pageread.imagefile import frame
from crit_pageread.pagemap import PE_LAZY, PE_PARENT
from crit_pageread.testing import ImageBuilder, VmaSpec, _message

PS = 4096
BASE = 0x7F0000000000
PAGES = 1200  # the VMA's size in pages


def _data(rng: random.Random, pages: int) -> bytes:
    return rng.randbytes(pages * PS)


def _level(rng: random.Random, kinds: str) -> list[Any]:
    """Runs over the VMA: single pages and longer runs, holes between some, each of a kind drawn from
    `kinds` (p present, a in parent, l lazy)."""
    runs: list[Any] = []
    page = rng.randrange(3)
    while page < PAGES - 8:
        n = rng.choice((1, 1, 1, 2, 3, 7))
        kind = rng.choice(kinds)
        vaddr = BASE + page * PS
        if kind == "p":
            runs.append((vaddr, _data(rng, n)))
        elif kind == "a":
            runs.append((vaddr, n, PE_PARENT))
        else:
            runs.append((vaddr, n, PE_LAZY))
        page += n + rng.choice((0, 0, 1, 2))
    return runs


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """grandparent <- parent <- child, all of one process; the child's in-parent runs land on the
    parent's holes too (broken reads)."""
    rng = random.Random(14)
    root = tmp_path_factory.mktemp("windowed")
    vma = [VmaSpec(BASE, BASE + PAGES * PS)]
    ImageBuilder(root / "0").process(1, vmas=vma).pagemap(1, _level(rng, "p")).write()
    ImageBuilder(root / "1").process(1, vmas=vma).pagemap(1, _level(rng, "pa")).parent("../0").write()
    ImageBuilder(root / "2").process(1, vmas=vma).pagemap(1, _level(rng, "paal")).parent("../1").write()
    return root / "2"


def _small_windows(monkeypatch: pytest.MonkeyPatch, entries: int = 5) -> None:
    monkeypatch.setattr(pagemap, "WINDOWED_ABOVE", 16)
    monkeypatch.setattr(pagemap, "WINDOW_ENTRIES", entries)
    monkeypatch.setattr(pagemap, "CHUNK_ENTRIES", 3)
    monkeypatch.setattr(pagemap, "WINDOW_CACHE", 2)
    monkeypatch.setattr(reader, "MAP_WINDOWS", 2)


def _outcome(op: Any) -> Any:
    try:
        return op()
    except CritPageReadError as exc:
        return f"{type(exc).__name__}: {exc}"


def _answers(path: Path, seed: int) -> dict[str, Any]:
    """What a reader of `path` says: its segments over the VMA, readable runs and bytes, reads and views of
    random ranges (with each hole mode), packed reads, copies planned."""
    rng = random.Random(seed)
    out: dict[str, Any] = {}
    with open_images(path) as images:
        pm = images.pagemap(1)
        out["windowed"] = pm.windowed
        out["entries"] = list(pm.entries)
        out["len"] = len(pm)
        out["find"] = [pm.find(BASE + p * PS) for p in range(0, PAGES, 7)]
        out["index_at"] = [pm.index_at(BASE + p * PS) for p in range(0, PAGES, 7)]
        out["in"] = [list(pm.entries_in(BASE + a * PS, BASE + (a + 40) * PS)) for a in range(0, PAGES, 97)]
        out["columns"] = [c.tolist() for c in pm.columns()]
        out["present_bytes"] = pm.present_bytes
        with images.reader(1) as r:
            out["segments"] = _outcome(lambda: [(*s[:4], s.offset, s.depth) for s in
                                                r.segments(BASE, PAGES * PS)])
            out["pieces"] = [_outcome(lambda a=a: [(*s[:4], s.offset, s.depth) for s in
                                                   r.segments(BASE + a * PS + 100, 33 * PS)])
                             for a in range(0, PAGES, 41)]
            out["runs"] = _outcome(lambda: [x.tolist() if hasattr(x, "tolist") else x
                                            for x in r.readable_runs(BASE, BASE + PAGES * PS)])
            out["bytes"] = _outcome(lambda: r.readable_bytes(BASE, BASE + PAGES * PS))
            for n in range(60):
                a = BASE + rng.randrange(PAGES * PS - 1)
                length = rng.choice((1, 100, PS, 3 * PS, 40 * PS))
                for holes in ("error", "zero", "skip"):
                    buf = bytearray(b"\xaa" * length)
                    out[f"read-{n}-{holes}"] = (_outcome(lambda a=a, buf=buf, holes=holes: r.readinto(a, buf,
                                                                                                   holes=holes)),
                                                bytes(buf))
            mm = _outcome(lambda: r.memory_map())
            out["map"] = mm if isinstance(mm, str) else [list(c) for c in (mm.starts, mm.sizes, mm.kinds, mm.flags,
                                                                           mm.offsets, mm.depths)]
            for n in range(20):
                a = BASE + rng.randrange(PAGES) * PS
                iov = [(a + k * 3 * PS, PS, k * PS) for k in range(12)]
                out[f"plan-{n}"] = _outcome(lambda iov=iov: [(q.offset, q.length, q.vaddr, q.out_offset)
                                                             for q in r.copy_plan(iov, holes="zero")[0]])
    return out


def _packed(path: Path) -> list[Any]:
    """read_packed over the child's readable runs (the oldest level: all present, no chain)."""
    out = []
    with open_images(path) as images, images.reader(1) as r:
        starts, ends, _ = r.readable_runs(BASE, BASE + PAGES * PS)
        starts, ends = starts.tolist(), ends.tolist()
        buf = bytearray(max(5 * PS, *(e - s + 1 for s, e in zip(starts, ends, strict=True))))
        i = 0
        while i < len(starts):
            j, used = r.read_packed(starts, ends, i, buf, gap=1)
            out.append((i, j, used, bytes(buf[:used])))
            i = j
    return out


@pytest.mark.parametrize("native_helper", [True, False], ids=["native", "python"])
def test_windowed_chain_reads_segments_and_errors_as_the_whole_index(chain: Path, monkeypatch: pytest.MonkeyPatch,
                                                                     native_helper: bool) -> None:
    """A user reading a huge pagemap's chain would get other bytes, segments or error lines if a window
    boundary changed what the reader plans."""
    if not native_helper:  # the planner's and the sweep's Python paths (a windowed index is loaded natively)
        monkeypatch.setattr(reader, "native", SimpleNamespace(fastio=None))
        monkeypatch.setattr(memory, "native", SimpleNamespace(fastio=None))
    whole = _answers(chain, 1)
    _small_windows(monkeypatch)
    windowed = _answers(chain, 1)
    assert not whole.pop("windowed") and windowed.pop("windowed")
    assert whole.keys() == windowed.keys()
    for key in whole:
        assert windowed[key] == whole[key], key
    assert any("ChainError" in str(v) for v in whole.values())  # a broken run was read somewhere


@pytest.mark.parametrize("level", ["0", "1"])
def test_windowed_packed_reads_as_the_whole_index(chain: Path, monkeypatch: pytest.MonkeyPatch, level: str) -> None:
    """scan's packed reads of a huge pagemap would miss or shift bytes at window boundaries."""
    path = chain.parent / level
    whole = _outcome(lambda: _packed(path))
    _small_windows(monkeypatch, 4)
    assert _outcome(lambda: _packed(path)) == whole


def test_windows_decoded_without_the_native_helper_are_the_same(chain: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the native helper (after a windowed index was loaded) its windows would decode to other entries."""
    with open_images(chain) as images:
        whole = list(images.pagemap(1).entries)
    _small_windows(monkeypatch)
    with open_images(chain) as images:
        pm = images.pagemap(1)
        assert pm.windowed
        monkeypatch.setattr(native, "fastio", None)
        assert list(pm.entries) == whole
        assert [pm.find(e.vaddr) for e in whole] == whole


def _bad(tmp_path: Path, name: str, entries: list[tuple[int, int, int]], pages: int) -> Path:
    d = ImageBuilder(tmp_path / name).process(1, vmas=[VmaSpec(BASE, BASE + 4 * PAGES * PS)]).write()
    (d / "pagemap-1.img").write_bytes(pagemap.encode_pagemap(1, entries))
    with open(d / "pages-1.img", "wb") as f:
        f.truncate(pages * PS)
    return d


@pytest.mark.parametrize("what", ["overlap", "unsorted", "short", "long", "flags"])
def test_windowed_load_refuses_a_broken_pagemap_with_the_same_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   what: str) -> None:
    """A broken pagemap found while streaming past the windowed threshold must still be one line naming the file,
    the same line as with the index whole."""
    entries = [(BASE + 2 * k * PS, 1, 4) for k in range(200)]
    pages = len(entries)
    if what == "overlap":
        entries[150] = (entries[149][0], 1, 4)
    elif what == "unsorted":
        entries[150], entries[151] = entries[151], entries[150]
    elif what == "short":
        pages -= 1
    elif what == "long":
        pages += 1
    else:
        entries[170] = (entries[170][0], 1, PE_PARENT | 4)
    d = _bad(tmp_path, what, entries, pages)

    def line() -> str:
        with pytest.raises(CritPageReadError) as exc, open_images(d) as images:
            images.pagemap(1)
        return str(exc.value)

    whole = line()
    _small_windows(monkeypatch)
    assert line() == whole
    assert "pagemap-1.img" in whole or "pages-1.img" in whole
    assert "\n" not in whole


def test_windowed_index_changed_underneath_is_a_one_line_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pagemap rewritten while a reader holds its windowed index must not be read as if it were the same."""
    _small_windows(monkeypatch)
    entries = [(BASE + 2 * k * PS, 1, 4) for k in range(200)]
    d = _bad(tmp_path, "changed", entries, len(entries))
    with open_images(d) as images:
        pm = images.pagemap(1)
        assert pm.windowed
        changed = [(v + PS, n, f) for v, n, f in entries]
        (d / "pagemap-1.img").write_bytes(pagemap.encode_pagemap(1, changed))
        with pytest.raises(CritPageReadError, match=r"pagemap-1.img: changed while it was read"):
            list(pm.entries)


def test_commands_on_a_windowed_index_print_what_the_whole_index_does(tmp_path: Path) -> None:
    """grep, scan, extract, squash, coredump and read of a checkpoint past the windowed threshold (set by the
    environment) would find other matches or write other files than with the index whole."""
    rng = random.Random(15)
    runs = []
    page = 0
    while page < PAGES - 8:
        n = rng.choice((1, 1, 2, 5))
        data = bytearray(_data(rng, n))
        if rng.random() < 0.1:  # a needle across the runs' boundaries, some across windows
            data[-3:] = b"NEE"
        if rng.random() < 0.1:
            data[:4] = b"DLE!"
        runs.append((BASE + page * PS, bytes(data)))
        page += n + rng.choice((0, 0, 1))
    d = ImageBuilder(tmp_path / "img").process(1, vmas=[VmaSpec(BASE, BASE + PAGES * PS)]).pagemap(1, runs).write()
    # a thread's core image (x86_64 registers of zeros) for coredump, as benchmarks/scan_bench.py writes it
    regs = [*((n, 0) for n in range(1, 28)), (28, 1)]
    info = [(1, 0), (2, regs), (3, [(n, 0) for n in range(1, 9)])]
    core = [(1, 1), (2, info), (3, [(1, 1), (2, 0), (3, 0), (4, 0), (5, 0), (6, "synthetic")])]
    (d / "core-1.img").write_bytes(frame("CORE", [_message(core)]))
    rules = tmp_path / "r.yar"
    rules.write_text('rule needle { strings: $a = "NEEDLE!" condition: $a }\n')
    results = {}
    for mode, env in (("whole", {}), ("windowed", {"CRIT_PAGEREAD_WINDOWED_ABOVE": "16",
                                                  "CRIT_PAGEREAD_WINDOW_ENTRIES": "6"})):
        out = tmp_path / mode
        out.mkdir()
        got = {}
        for name, args in (
            ("grep", ["grep", str(d), "NEEDLE!"]),
            ("grep-hex", ["grep", "--json", str(d), "--hex", "4c45"]),
            ("extract", ["extract", str(d), "-o", str(out / "x"), "--json"]),
            ("squash", ["squash", str(d), str(out / "sq")]),
            ("read", ["read", str(d), f"{BASE + 7 * PS - 5:x}", "33000", "--zero-fill"]),
            ("scan", ["scan", "--rules", str(rules), str(d), "--jobs", "1", "--json"]),
            ("coredump", ["coredump", str(d), "-o", str(out / "core")]),
        ):
            p = subprocess.run([sys.executable, "-m", "crit_pageread", *args], capture_output=True,
                               env={**_env(), **env}, check=False)
            stdout, stderr = (re.sub(rb"[0-9.]+ s, [0-9.]+ MiB peak RSS", b"", text)  # scan's summary line
                              for text in (p.stdout.replace(str(out).encode(), b"OUT"), p.stderr))
            got[name] = (p.returncode, stdout, stderr)
        got["extract-files"] = sorted((f.name, f.read_bytes()) for f in (out / "x").rglob("*.bin"))
        got["squash-files"] = sorted((f.name, f.read_bytes()) for f in (out / "sq").iterdir() if f.is_file())
        got["core-files"] = sorted((f.name, f.read_bytes()) for f in (out / "core").rglob("*") if f.is_file())
        results[mode] = got
    assert results["windowed"] == results["whole"]
    assert {name: got[0] for name, got in results["whole"].items() if name[-6:] != "-files"} == dict.fromkeys(
        ("grep", "grep-hex", "extract", "squash", "read", "coredump", "scan"), 0), results["whole"]
    assert results["whole"]["grep"][1].count(b"\n") >= 3


def _env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("CRIT_PAGEREAD_WINDOW")}


def test_windowed_42_layout_and_shared_segment_read_as_the_whole_index(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A huge pagemap in CRIU 4.2's layout (nr_pages in field 5), and a shared segment's huge
    pagemap-shmem image, would read other bytes or runs if their windows were decoded otherwise."""
    from crit_pageread.images import VMA_ANON_SHARED, VMA_AREA_REGULAR

    rng = random.Random(16)
    shared = BASE + 2 * PAGES * PS
    b = ImageBuilder(tmp_path / "d", layout="4.2")
    b.process(1, vmas=[VmaSpec(BASE, BASE + PAGES * PS),
                       VmaSpec(shared, shared + PAGES * PS, VMA_AREA_REGULAR | VMA_ANON_SHARED, shmid=5, flags=0x21)])
    b.pagemap(1, _level(rng, "pppl"))
    b.shmem_pagemap(5, [(p * PS, _data(rng, 1)) for p in range(0, PAGES, 2)])
    d = b.write()

    def answers() -> dict[str, Any]:
        out: dict[str, Any] = {}
        with open_images(d) as images:
            pm, shm = images.pagemap(1), images.shmem_pagemap(5)
            out["windowed"] = (pm.windowed, shm.windowed)
            out["layout"] = (pm.layout, shm.layout)
            out["entries"] = (list(pm.entries), list(shm.entries))
            with images.reader(1) as r:
                out["segments"] = [(*s[:4], s.offset) for s in r.segments(BASE, PAGES * PS)]
                out["runs"] = [x.tolist() if hasattr(x, "tolist") else x
                               for x in r.readable_runs(BASE, shared + PAGES * PS)]
                out["bytes"] = r.readable_bytes(BASE, shared + PAGES * PS)
                buf = bytearray(PAGES * PS)
                r.readinto(shared, buf, holes="zero")
                out["shared"] = bytes(buf)
                out["across"] = []
                for a in range(1, PAGES - 9, 53):
                    buf = bytearray(9 * PS + 14)
                    r.readinto(shared + a * PS - 7, buf, holes="zero")
                    out["across"].append(bytes(buf))
        return out

    whole = answers()
    _small_windows(monkeypatch)
    windowed = answers()
    assert whole.pop("windowed") == (False, False) and windowed.pop("windowed") == (True, True)
    assert whole["layout"] == ("4.2", "4.2")
    for key in whole:
        assert windowed[key] == whole[key], key
