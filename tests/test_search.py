"""The search engine behind grep: Hyperscan and the built-in fallback find exactly the same matches."""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path
from typing import Any

import pytest

from crit_pageread.cli.main import main
from crit_pageread.memory import ProcessReader
from crit_pageread.search import SearchError, compile_search, hyperscan_module
from crit_pageread.testing import ImageBuilder, VmaSpec

ALPHABET = b"abAB\x00\n\t xy"
REGEXES = [rb"a+b", rb"[ab]{2,3}", rb"x.y", rb"(?:ab|ba)+", rb"\bab", rb"A[^\n]*?b", rb"b\x00?a"]

# The dev extra installs hyperscan: under CI=true its absence fails these tests instead of skipping them.
needs_hyperscan = pytest.mark.skipif(os.environ.get("CI") != "true" and hyperscan_module() is None,
                                     reason="hyperscan is not installed")


def _reference(pats: list[bytes], data: bytes, pos: int, end: int, **kw: object) -> list[tuple[int, int]]:
    """What grep reports, computed the obvious way (no engine of ours)."""
    flags = re.IGNORECASE if kw.get("ignore_case") else 0
    if kw.get("strings"):
        out = []
        for m in re.finditer(rb"[\x20-\x7e\t]{%d,}" % kw["min_len"], data[pos:end]):  # type: ignore[str-format]
            text = m.group()
            if not pats[0] or re.search(re.escape(pats[0]), text, flags):
                out.append((m.start() + pos, m.end() + pos))
        return out
    if kw.get("regex"):
        rx = re.compile(b"|".join(b"(?:" + p + b")" for p in pats), flags)
        return [m.span() for m in rx.finditer(data, pos, end) if m.start() != m.end()]
    # literals: leftmost, then longest, not overlapping
    out = []
    i = pos
    low = data.lower() if flags else data
    lits = [p.lower() if flags else p for p in pats]
    while i < end:
        best = max((len(p) for p in lits if low.startswith(p, i) and i + len(p) <= end), default=0)
        if best:
            out.append((i, i + best))
            i += best
        else:
            i += 1
    return out


def _cases(seed: int, count: int) -> list[tuple[list[bytes], dict[str, object]]]:
    rng = random.Random(seed)
    cases: list[tuple[list[bytes], dict[str, object]]] = []
    for n in range(count):
        kind = n % 4
        ic = bool(n & 4)
        if kind == 0:
            pats = [bytes(rng.choice(b"abAB\x00") for _ in range(rng.randint(1, 3))) for _ in range(rng.randint(1, 6))]
            cases.append((pats, {"ignore_case": ic}))
        elif kind == 1:
            cases.append(([rng.choice(REGEXES) for _ in range(rng.randint(1, 3))], {"regex": True, "ignore_case": ic}))
        elif kind == 2:
            pat = bytes(rng.choice(b"abAB ") for _ in range(rng.randint(1, 2)))
            cases.append(([pat], {"strings": True, "min_len": 3, "ignore_case": ic}))
        else:
            cases.append(([b""], {"strings": True, "min_len": 2}))
    return cases


@pytest.mark.parametrize("engine", [pytest.param("hyperscan", marks=needs_hyperscan), "python"])
def test_every_engine_finds_what_the_obvious_search_finds(engine: str) -> None:
    rng = random.Random(11)
    for pats, kw in _cases(5, 400):
        data = bytes(rng.choice(ALPHABET) for _ in range(rng.randint(0, 300)))
        pos = rng.randint(0, 8)
        end = max(pos, len(data) - rng.randint(0, 8))
        searcher = compile_search(pats, engine=engine, **kw)  # type: ignore[arg-type]
        got = list(searcher.find(bytearray(data), pos, end))
        assert got == _reference(pats, data, pos, end, **kw), (pats, kw, data, pos, end)


@needs_hyperscan
def test_hyperscan_is_used_where_it_can_compile_and_python_is_the_fallback() -> None:
    assert compile_search([b"secret"]).engine == "hyperscan"
    assert compile_search([b"a\x00b", b"cd"], ignore_case=True).engine == "hyperscan"
    assert compile_search([rb"(a)\1"], regex=True).engine == "python"  # backreference: re only
    assert compile_search([rb"(?<=x)y"], regex=True).engine == "python"  # lookbehind: re only
    with pytest.raises(SearchError):
        compile_search([rb"(a)\1"], regex=True, engine="hyperscan")


def test_bad_and_empty_patterns_are_one_line_errors() -> None:
    with pytest.raises(SearchError, match="bad regex"):
        compile_search([b"(unclosed"], regex=True)
    with pytest.raises(SearchError, match="empty pattern"):
        compile_search([b"x", b""])
    with pytest.raises(SearchError, match="unknown search engine"):
        compile_search([b"x"], engine="grep")  # type: ignore[arg-type]


def test_many_literals_take_the_longest_at_each_position() -> None:
    for engine in ("python", "hyperscan") if hyperscan_module() or os.environ.get("CI") == "true" else ("python",):
        s = compile_search([b"ab", b"abcd", b"cde", b"x"], engine=engine)  # type: ignore[arg-type]
        assert list(s.find(b"zabcdex abx", 0, 11)) == [(1, 5), (6, 7), (8, 10), (10, 11)]


@pytest.mark.parametrize("engine", [pytest.param("hyperscan", marks=needs_hyperscan), "python"])
def test_find_many_finds_what_one_find_per_run_finds(engine: str) -> None:
    """Runs back to back in one buffer (a fragmented dump's pages in its pages file): one search over all
    of them reports no match that crosses from one run into the next, and misses none inside a run."""
    rng = random.Random(13)
    regexes = [*REGEXES, rb"ab$", rb"^ab", rb"a\Bb"]
    for n, (pats, kw) in enumerate(_cases(9, 400)):
        if kw.get("regex") and n % 3 == 0:
            pats = [rng.choice(regexes)]
        data = bytearray(rng.choice(ALPHABET) for _ in range(rng.randint(0, 400)))
        cuts = sorted(rng.sample(range(len(data) + 1), min(len(data) + 1, rng.randint(1, 12))))
        starts, ends = cuts[:-1], cuts[1:]
        if rng.random() < 0.3 and starts:  # gaps between runs, and empty runs
            starts = [s + rng.randint(0, 2) if s + 2 < e else s for s, e in zip(starts, ends, strict=True)]
        searcher = compile_search(pats, engine=engine, **kw)  # type: ignore[arg-type]
        want = [m for s, e in zip(starts, ends, strict=True) for m in searcher.find(data, s, e)]
        assert list(searcher.find_many(data, starts, ends)) == want, (pats, kw, bytes(data), starts, ends)


@needs_hyperscan
def test_thread_copies_search_at_once_and_find_the_same() -> None:
    """A Hyperscan searcher's thread copy has its own scratch: searches in two threads at once find what
    one search finds; the built-in engine (it holds the GIL) has none."""
    import threading

    rng = random.Random(5)
    data = bytes(rng.choice(ALPHABET) for _ in range(1 << 18))
    for pats, kw in _cases(17, 24):
        searcher = compile_search(pats, engine="hyperscan", **kw)  # type: ignore[arg-type]
        want = list(searcher.find_many(data, [0, 1000], [900, len(data)]))
        copy = searcher.thread_copy()
        if kw.get("strings") and not pats[0]:
            assert copy is None  # every string: re's work
            continue
        assert copy is not None
        got: list[list[tuple[int, int]]] = []

        def search(c: object = copy, out: list[list[tuple[int, int]]] = got) -> None:
            out.extend(list(c.find_many(data, [0, 1000], [900, len(data)])) for _ in range(20))  # type: ignore[attr-defined]

        t = threading.Thread(target=search)
        t.start()
        mine = [list(searcher.find_many(data, [0, 1000], [900, len(data)])) for _ in range(20)]
        t.join()
        assert got == mine == [want] * 20
    assert compile_search([b"ab"], engine="python").thread_copy() is None


@pytest.mark.parametrize("engine", ["hyperscan", "python"])
@pytest.mark.parametrize("strategy", ["preadv", "pread", "mmap"])
def test_grep_packs_single_pages_between_holes_and_walks_no_run_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, engine: str, strategy: str,
) -> None:
    """A fragmented dump (single pages and pairs between one-page holes, back to back in the pages file): grep
    searches the runs packed, walking no run's segments on its own, and finds exactly the matches inside one
    run: a literal split over two adjacent pages is found, one split over a hole (adjacent in the file) is not."""
    if engine == "hyperscan" and hyperscan_module() is None and os.environ.get("CI") != "true":
        pytest.skip("hyperscan is not installed")
    page, base = 4096, 0x100000
    runs: list[tuple[int, bytes]] = []
    want: list[int] = []
    k = 0
    while len(runs) < 400:
        n = 2 if len(runs) % 5 == 0 else 1
        data = bytearray(b"." * (n * page))
        vaddr = base + k * page
        if len(runs) % 7 == 3:
            data[100:106] = b"SECRET"  # inside one page
            want.append(vaddr + 100)
        if n == 2:
            data[page - 3 : page + 3] = b"SECRET"  # over two adjacent pages
            want.append(vaddr + page - 3)
        if len(runs) % 11 == 4:
            data[-3:] = b"SEC"  # over the hole: the next run starts with "RET"
        if runs and bytes(runs[-1][1][-3:]) == b"SEC":
            data[:3] = b"RET"
        runs.append((vaddr, bytes(data)))
        k += n + 1
    b = ImageBuilder(tmp_path / "d")
    b.process(10, vmas=[VmaSpec(base, base + k * page)])
    b.pagemap(10, runs)
    b.write()
    walked: list[int] = []
    real = ProcessReader.segments

    def counting(self: Any, vaddr: int, length: int) -> Any:
        walked.append(length)
        return real(self, vaddr, length)

    monkeypatch.setattr(ProcessReader, "segments", counting)
    code = main(["grep", str(tmp_path / "d"), "SECRET", "--json", "--engine", engine, "--strategy", strategy])
    out = capsys.readouterr().out
    assert code == 0
    assert sorted(json.loads(line)["vaddr"] for line in out.splitlines()) == sorted(want)
    assert walked == []
