"""The search engine behind `grep`: compile patterns once, find their matches in buffers.

`compile_search(...)` returns a `Searcher` whose `find(buf, pos, end)` yields
the `(start, end)` of every match in `buf[pos:end]`, in order and not
overlapping. `buf` is anything with the buffer protocol (a bytearray, a
read-only `mmap` of a pages file): pages are searched in place. The caller
bounds every call by a run of dumped memory, so no match crosses a hole.
`find_many(buf, starts, ends)` is `find` over many such runs of one buffer at
once (a fragmented dump's pages, back to back in its pages file): the same
matches as one `find` per run, found by one scan where the engine can.

Matches are the same with either engine:

- literals (one or many, `-F`/`-f`): at each position the longest literal that
  starts there, leftmost first, not overlapping (GNU `grep -o`'s rule; for one
  literal, `bytes.find` stepping past each match);
- regexes (`-E`, one or many): Python `re` semantics (`finditer` over the
  alternation of the patterns, empty matches skipped);
- `--strings`: maximal runs of printable bytes (`[\\x20-\\x7e\\t]`) of at least
  `min_len` bytes that contain the pattern.

The `hyperscan` engine (Intel Hyperscan through the `hyperscan` package, the
`fast` extra) scans with SIMD at memory speed: literals are reported by it
directly; a regex match is located by it and then taken whole by `re` from a
window just before it (Hyperscan reports where matches end; `re` decides the
exact span), so the semantics stay Python's. The `python` engine (`bytes.find`,
`re`) is the fallback where Hyperscan cannot be imported or cannot compile a
pattern (backreferences, lookbehind).
"""

from __future__ import annotations

import re
from bisect import bisect_right
from collections.abc import Iterator, Sequence
from typing import Any, Literal, Protocol

EngineName = Literal["auto", "hyperscan", "python"]
ENGINES = ("auto", "hyperscan", "python")
#: The bytes `--strings` counts as printable (strings(1)'s set, without newlines).
STRING_CLASS = rb"[\x20-\x7e\t]"
_STRING_BYTES = frozenset(range(0x20, 0x7F)) | {9}
_RUN = re.compile(STRING_CLASS + b"*")
FAST_HINT = "hyperscan is not installed (pip install 'crit-pageread[fast]'): using the slower built-in engine"


class SearchError(ValueError):
    """A pattern that cannot be compiled (bad regex, empty pattern)."""


class Searcher(Protocol):
    """Compiled patterns. `window` is the longest match that `find` needs whole."""

    engine: str
    window: int

    def find(self, buf: Any, pos: int, end: int) -> Iterator[tuple[int, int]]:
        """(start, end) of each match in buf[pos:end], in order, not overlapping."""
        ...

    def find_many(self, buf: Any, starts: Sequence[int], ends: Sequence[int]) -> Iterator[tuple[int, int]]:
        """`find` over each run buf[starts[k]:ends[k]] in turn (runs in order, not overlapping): no match
        crosses from one run into the next."""
        ...

    def thread_copy(self) -> Searcher | None:
        """A searcher for the same patterns that may search in another thread while this one does (its
        own Hyperscan scratch), or None where the engine holds the GIL (no search would overlap)."""
        ...


class _PerRun:
    """`find_many` as one `find` per run (engines that cannot do better)."""

    def find(self, buf: Any, pos: int, end: int) -> Iterator[tuple[int, int]]:
        raise NotImplementedError

    def find_many(self, buf: Any, starts: Sequence[int], ends: Sequence[int]) -> Iterator[tuple[int, int]]:
        find = self.find
        for pos, end in zip(starts, ends, strict=True):
            if pos < end:
                yield from find(buf, pos, end)

    def thread_copy(self) -> Searcher | None:
        return None  # `re` holds the GIL


def _in_one_run(hits: Iterator[tuple[int, int]] | list[tuple[int, int]], starts: Sequence[int],
                ends: Sequence[int]) -> Iterator[tuple[int, int]]:
    """The hits (every occurrence, sorted by start then longest first) that lie inside one run, leftmost
    first and not overlapping: what one search per run reports."""
    last = -1
    k = 0
    for s, e in hits:
        if s < last:
            continue
        k = bisect_right(starts, s, k) - 1
        if k < 0:
            k = 0
            continue
        if e <= ends[k]:
            yield s, e
            last = e


def hyperscan_module() -> Any:
    """The `hyperscan` module, or None where it cannot be imported."""
    try:
        import hyperscan
    except Exception:  # ImportError, or a wheel whose library does not load
        return None
    return hyperscan


def compile_search(
    patterns: Sequence[bytes],
    *,
    regex: bool = False,
    ignore_case: bool = False,
    strings: bool = False,
    min_len: int = 4,
    max_match: int = 4096,
    engine: EngineName = "auto",
) -> Searcher:
    """Compile `patterns` (literals, or regexes with `regex`) for `find`.

    With `strings`, the searcher finds printable strings of at least `min_len`
    bytes that contain `patterns[0]` (all of them if there is no pattern or it
    is empty). `max_match` is the longest regex or string match found whole
    across window edges. `engine`: "hyperscan", "python", or "auto" (Hyperscan
    if it can be imported and compiles the patterns).
    """
    if engine not in ENGINES:
        raise SearchError(f"unknown search engine {engine!r} (known: {', '.join(ENGINES)})")
    if strings:
        contains = patterns[0] if patterns else b""
        inner = None
        if contains and all(b in _STRING_BYTES for b in contains):
            inner = compile_search([contains], ignore_case=ignore_case, engine=engine)
        return StringSearcher(contains, ignore_case, min_len, max_match, inner)
    pats = list(patterns)
    if not pats or any(not p for p in pats):
        raise SearchError("empty pattern")
    if engine != "python":
        hs = hyperscan_module()
        if hs is None:
            if engine == "hyperscan":
                raise SearchError("the hyperscan engine was asked for but hyperscan cannot be imported")
        else:
            try:
                if regex:
                    return HyperscanRegex(hs, pats, ignore_case, max_match)
                return HyperscanLiterals(hs, pats, ignore_case)
            except SearchError:
                raise
            except Exception as exc:  # hyperscan.error: a construct it does not support
                if engine == "hyperscan":
                    raise SearchError(f"hyperscan cannot compile the pattern: {exc}") from None
    if regex:
        return PythonRegex(pats, ignore_case, max_match)
    if len(pats) == 1 and not ignore_case:
        return PythonLiteral(pats[0])
    return PythonRegex([re.escape(p) for p in _longest_first(pats)], ignore_case, max(map(len, pats)))


def _longest_first(pats: list[bytes]) -> list[bytes]:
    """Unique literals, longest first: an alternation then takes the longest at each position."""
    return sorted(set(pats), key=lambda p: (-len(p), p))


def _alternation(pats: list[bytes], ignore_case: bool) -> re.Pattern[bytes]:
    flags = re.IGNORECASE if ignore_case else 0
    source = pats[0] if len(pats) == 1 else b"|".join(b"(?:" + p + b")" for p in pats)
    try:
        return re.compile(source, flags)
    except re.error as exc:
        raise SearchError(f"bad regex: {exc}") from None
    except OverflowError as exc:
        raise SearchError(f"regex too large: {exc}") from None


# --- python engine ---------------------------------------------------------------------------


class PythonLiteral:
    """One literal with `bytes.find` (over many runs at once: a hit that crosses a run's end restarts the
    search at the next run)."""

    engine = "python"

    def __init__(self, literal: bytes) -> None:
        self.literal = literal
        self.window = len(literal)

    def find(self, buf: Any, pos: int, end: int) -> Iterator[tuple[int, int]]:
        lit = self.literal
        n = len(lit)
        i = buf.find(lit, pos, end)
        while i >= 0:
            yield i, i + n
            i = buf.find(lit, i + n, end)

    def find_many(self, buf: Any, starts: Sequence[int], ends: Sequence[int]) -> Iterator[tuple[int, int]]:
        if not starts:
            return
        lit = self.literal
        n = len(lit)
        last_run = len(starts) - 1
        stop = ends[-1]
        k = 0
        i = buf.find(lit, starts[0], stop)
        while i >= 0:
            k = bisect_right(starts, i, k) - 1
            if k >= 0 and i + n <= ends[k]:
                yield i, i + n
                i = buf.find(lit, i + n, stop)
                continue
            # Crosses the end of run k (or lies before the first run): every later hit in run k would
            # too, so the next one is searched from the next run's start.
            k = max(k, 0)
            if k >= last_run:
                return
            k += 1
            i = buf.find(lit, starts[k], stop)

    def thread_copy(self) -> Searcher | None:
        return None  # `find` holds the GIL


class PythonRegex(_PerRun):
    """Regexes (or escaped literals, longest first) as one `re` alternation."""

    engine = "python"

    def __init__(self, pats: list[bytes], ignore_case: bool, window: int) -> None:
        self.regex = _alternation(pats, ignore_case)
        self.window = window

    def find(self, buf: Any, pos: int, end: int) -> Iterator[tuple[int, int]]:
        for m in self.regex.finditer(buf, pos, end):
            s, e = m.span()
            if s != e:
                yield s, e


# --- hyperscan engine ------------------------------------------------------------------------


def _with_scratch(searcher: Any) -> Any:
    """A copy of a Hyperscan searcher with a scratch of its own (Hyperscan releases the GIL while it
    scans; one scratch serves one scan at a time)."""
    other = object.__new__(type(searcher))
    other.__dict__.update(searcher.__dict__)
    other._scratch = searcher._hs.Scratch(searcher.db)
    return other


class HyperscanLiterals:
    """Literals in one Hyperscan block-mode database; leftmost-longest, not overlapping."""

    engine = "hyperscan"

    def __init__(self, hs: Any, pats: list[bytes], ignore_case: bool) -> None:
        uniq = _longest_first(pats)
        self.lengths = [len(p) for p in uniq]
        self.window = max(self.lengths)
        flags = hs.HS_FLAG_CASELESS if ignore_case else 0
        self.db = db = hs.Database(mode=hs.HS_MODE_BLOCK)
        # As regexes of \xNN escapes: the binding passes literals as C strings, cut at a NUL byte.
        exprs = [b"".join(b"\\x%02x" % c for c in p) for p in uniq]
        db.compile(expressions=exprs, ids=list(range(len(uniq))), elements=len(uniq), flags=[flags] * len(uniq))
        self._single = len(uniq) == 1
        self._hs = hs
        self._scratch: Any = None  # None: the database's own

    def thread_copy(self) -> Searcher | None:
        return _with_scratch(self)

    def _hits(self, buf: Any, pos: int, end: int) -> list[tuple[int, int]]:
        """Every occurrence of every literal in buf[pos:end] (overlapping ones too), by start, longest first."""
        hits: list[tuple[int, int]] = []
        if end - pos < 1:
            return hits
        lengths = self.lengths
        append = hits.append
        view = memoryview(buf)[pos:end]
        try:
            # A literal's occurrence is (end - its length, end): no start-of-match tracking needed.
            self.db.scan(view, match_event_handler=lambda i, _s, e, _f, _c: append((pos + e - lengths[i], pos + e)),
                         scratch=self._scratch)
        finally:
            view.release()
        if len(hits) > 1 and not self._single:
            hits.sort(key=lambda h: (h[0], -h[1]))
        return hits

    def find(self, buf: Any, pos: int, end: int) -> Iterator[tuple[int, int]]:
        last = 0
        for s, e in self._hits(buf, pos, end):
            if s >= last:
                yield s, e
                last = e

    def find_many(self, buf: Any, starts: Sequence[int], ends: Sequence[int]) -> Iterator[tuple[int, int]]:
        # One scan over all the runs; Hyperscan reports every occurrence, so dropping those that cross
        # from one run into the next leaves exactly what one scan per run finds.
        if starts:
            yield from _in_one_run(self._hits(buf, starts[0], ends[-1]), starts, ends)


#: Regex tokens whose truth depends on the bytes around the searched range: a regex with one is searched
#: run by run (`find_many`), never across a run's edge.
_EDGE_TOKENS = (b"^", b"$", b"\\A", b"\\Z", b"\\z", b"\\b", b"\\B")


class HyperscanRegex(_PerRun):
    """Regexes located by Hyperscan (where matches end), taken whole by `re` (Python's semantics)."""

    engine = "hyperscan"

    def __init__(self, hs: Any, pats: list[bytes], ignore_case: bool, max_match: int) -> None:
        self.regex = _alternation(pats, ignore_case)  # also rejects what re cannot compile
        self.window = max_match
        if any(b"\x00" in p for p in pats):
            raise ValueError("a NUL byte in a regex (the binding passes patterns as C strings)")
        flags = hs.HS_FLAG_CASELESS if ignore_case else 0
        self.db = db = hs.Database(mode=hs.HS_MODE_BLOCK)
        db.compile(expressions=pats, ids=list(range(len(pats))), elements=len(pats), flags=[flags] * len(pats))
        self._hs = hs
        self._scratch: Any = None  # None: the database's own
        #: No anchor or word boundary: a match in a run is one in any bytes around it, so many runs can
        #: be scanned at once.
        self._edge_free = not any(tok in p for p in pats for tok in _EDGE_TOKENS)

    def _ends(self, buf: Any, pos: int, end: int) -> list[int]:
        """Where matches end in buf[pos:end] (absolute offsets), sorted."""
        ends: list[int] = []
        if end - pos < 1:
            return ends
        append = ends.append
        view = memoryview(buf)[pos:end]
        try:
            self.db.scan(view, match_event_handler=lambda _i, _s, e, _f, _c: append(pos + e), scratch=self._scratch)
        finally:
            view.release()
        ends.sort()
        return ends

    def find(self, buf: Any, pos: int, end: int) -> Iterator[tuple[int, int]]:
        return self._verify(buf, self._ends(buf, pos, end), pos, end)

    def thread_copy(self) -> Searcher | None:
        return _with_scratch(self)

    def find_many(self, buf: Any, starts: Sequence[int], ends: Sequence[int]) -> Iterator[tuple[int, int]]:
        if not self._edge_free or len(starts) < 2:
            yield from _PerRun.find_many(self, buf, starts, ends)
            return
        # One scan for the match ends of every run; each run's ends are then verified in that run.
        hits = self._ends(buf, starts[0], ends[-1])
        n = len(hits)
        h = 0
        k = 0
        while h < n:
            e = hits[h]
            k = bisect_right(starts, e - 1, k) - 1  # the run holding the match's last byte
            if k < 0:
                k = 0
                h += 1
                continue
            run_end = ends[k]
            g = h
            while g < n and hits[g] <= run_end:
                g += 1
            if g > h:
                yield from self._verify(buf, hits[h:g], starts[k], run_end)
                h = g
            else:
                h += 1  # in a gap between runs

    def _verify(self, buf: Any, ends: list[int], pos: int, end: int) -> Iterator[tuple[int, int]]:
        """The matches `re` finds in buf[pos:end], located from the match ends Hyperscan reported there."""
        if not ends:
            return
        search = self.regex.search
        window = self.window
        cur = pos  # re's finditer position: the next match starts at or after it
        for e in ends:
            if e <= cur:
                continue
            # Every match of at most `window` bytes that starts at or after `cur` ends at or after `e`
            # (Hyperscan reports every end), so it starts at or after e - window: re from there finds
            # the match finditer would find next.
            start = max(cur, e - window)
            bound = min(end, e + window)
            m = search(buf, start, bound)
            if m is not None and m.end() == bound and bound < end:
                m = search(buf, start, end)  # `$` or a greedy tail may need the bytes past the bound
            while m is not None and m.start() == m.end():
                m = search(buf, m.start() + 1, bound) if m.start() + 1 <= bound else None
            if m is None or m.start() >= e:
                continue
            yield m.start(), m.end()
            cur = m.end()


# --- printable strings -----------------------------------------------------------------------


class StringSearcher(_PerRun):
    """Printable strings of at least `min_len` bytes that contain a literal (every string if none)."""

    def __init__(self, contains: bytes, ignore_case: bool, min_len: int, max_match: int,
                 inner: Searcher | None) -> None:
        self.contains = contains
        self.min_len = min_len
        self.window = max_match
        self.inner = inner
        self.engine = inner.engine if inner is not None else "python"
        self._strings = re.compile(STRING_CLASS + b"{%d,}" % min_len)
        # A pattern with bytes no string can hold matches nothing.
        self._never = bool(contains) and inner is None

    def thread_copy(self) -> Searcher | None:
        # Hyperscan finds the pattern; widening its few hits to strings is cheap. Every string (no
        # pattern) is `re`'s work, which holds the GIL.
        inner = self.inner.thread_copy() if self.inner is not None else None
        if inner is None:
            return None
        other = object.__new__(StringSearcher)
        other.__dict__.update(self.__dict__)
        other.inner = inner
        return other

    def find(self, buf: Any, pos: int, end: int) -> Iterator[tuple[int, int]]:
        if self._never:
            return
        if self.inner is None:
            for m in self._strings.finditer(buf, pos, end):
                yield m.span()
            return
        # Find the pattern (fast), then widen each hit to the printable run around it.
        done = pos
        for s, e in self.inner.find(buf, pos, end):
            if s < done:
                continue
            left = s
            while left > pos:
                lo = max(pos, left - 4096)
                back = _RUN.match(bytes(buf[lo:left])[::-1])
                n = back.end() if back else 0
                whole = n == left - lo
                left -= n
                if not whole:
                    break
            tail = _RUN.match(buf, e, end)
            right = tail.end() if tail else e
            if right - left >= self.min_len:
                yield left, right
            done = right
