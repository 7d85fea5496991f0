"""Every shared fixture (real CRIU 4.1.1 checkpoints) reads byte-identical to its truth.

The truth (`truth/<case>/pid-<pid>.sha256`, `shmem-<id>.sha256`) was taken from
`/proc/PID/mem` of the restored, stopped tasks: one `addr sha256` line per page
and a `TOTAL sha256 npages` line. The fixtures are read only, never written.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from conftest import corpus_case
from corpus import Corpus

from crit_pageread import LazyPageError, Target, open_images

STRATEGIES = ("pread", "preadv", "mmap")
MODES = ("read", "defer", "readv", "span-skip", "span-zero")
MARK = 0xA5  # what "skip" must leave in place
TRUTH_CASES = {"a_single": "a_single", "b_tree": "b_tree", "c_threads": "c_threads", "d_shm": "d_shm",
               "e2_chain2": "e2_chain2/d2"}


def load_truth(path: Path) -> tuple[dict[int, str], str, int]:
    """Per-page hashes by address, the TOTAL hash and its page count."""
    pages: dict[int, str] = {}
    total, count = "", -1
    for line in path.read_text().splitlines():
        key, digest, *rest = line.split()
        if key == "TOTAL":
            total, count = digest, int(rest[0])
        else:
            pages[int(key, 16)] = digest
    assert count == len(pages), f"{path}: TOTAL counts {count} pages, lines {len(pages)}"
    return pages, total, count


def truth_files(fixtures: Path, case: str) -> list[tuple[Target, Path]]:
    out = []
    for path in sorted((fixtures / "truth" / case).iterdir()):
        kind, _, number = path.stem.partition("-")
        out.append((Target("pid" if kind == "pid" else "shmem", int(number)), path))
    return out


def runs_of(addresses: list[int], page: int) -> list[tuple[int, int]]:
    """Contiguous (start, npages) runs of sorted page addresses."""
    runs: list[list[int]] = []
    for a in addresses:
        if runs and runs[-1][0] + runs[-1][1] * page == a:
            runs[-1][1] += 1
        else:
            runs.append([a, 1])
    return [(a, n) for a, n in runs]


def spans_of(runs: list[tuple[int, int]], page: int, gap: int = 1 << 20) -> list[tuple[int, int]]:
    """(start, end) of groups of runs less than `gap` apart."""
    spans: list[list[int]] = []
    for a, n in runs:
        if spans and a - spans[-1][1] <= gap:
            spans[-1][1] = a + n * page
        else:
            spans.append([a, a + n * page])
    return [(a, b) for a, b in spans]


def read_spans(reader: Any, runs: list[tuple[int, int]], page: int, holes: str) -> bytes:
    """Each span of runs read by one deferred readinto (holes skipped or zeroed); the listed pages
    are cut out, and the holes are checked to hold what `holes` says."""
    listed = {a + i * page for a, n in runs for i in range(n)}
    out = []
    for start, end in spans_of(runs, page):
        buf = bytearray([MARK]) * (end - start)
        reader.readinto(start, buf, defer=True, holes=holes)
        reader.sync()
        fill = bytes([MARK if holes == "skip" else 0]) * page
        for a in range(start, end, page):
            chunk = bytes(buf[a - start : a - start + page])
            if a in listed:
                out.append(chunk)
            else:
                assert chunk == fill, f"hole page {a:#x} not {'left as is' if holes == 'skip' else 'zeroed'}"
    return b"".join(out)


def read_pages(images_dir: Path, target: Target, addresses: list[int], strategy: str, mode: str) -> bytes:
    """The bytes of every listed page, in address order: read() per run, deferred + one sync, one
    readv of all runs, or one readinto per span of runs with the holes between them skipped or zeroed."""
    with open_images(images_dir) as images:
        page = images.page_size
        runs = runs_of(addresses, page)
        # The truth is per pagemap: a pid's own pages (images.reader(pid) also sees its shared mappings)
        with images.reader_for(target, strategy) as reader:
            if mode == "read":
                return b"".join(reader.read(a, n * page) for a, n in runs)
            if mode.startswith("span-"):
                return read_spans(reader, runs, page, mode.removeprefix("span-"))
            if mode == "readv":
                bufs = [bytearray(n * page) for _, n in runs]
                reader.readv([(a, b) for (a, _), b in zip(runs, bufs, strict=True)])
                return b"".join(bufs)
            buf = bytearray(len(addresses) * page)
            view = memoryview(buf)
            pos = 0
            for a, n in runs:
                reader.readinto(a, view[pos : pos + n * page], defer=True)
                pos += n * page
            reader.sync()
            view.release()
            return bytes(buf)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("case", sorted(TRUTH_CASES))
def test_case_matches_truth(corpus: Corpus, case: str, strategy: str, mode: str) -> None:
    images_dir = corpus_case(corpus, TRUTH_CASES[case])
    checked = 0
    for target, truth_path in truth_files(corpus.root, case):
        pages, total, count = load_truth(truth_path)
        addresses = sorted(pages)
        with open_images(images_dir) as images:
            page = images.page_size
            # The truth lists exactly the pages the pagemap lists.
            listed = [e.vaddr + i * page for e in images.pagemap_for(target).entries for i in range(e.nr_pages)]
            assert listed == addresses, f"{truth_path.name}: pagemap and truth list different pages"
        data = read_pages(images_dir, target, addresses, strategy, mode)
        wrong = [
            f"{a:#x}" for i, a in enumerate(addresses)
            if hashlib.sha256(data[i * page : (i + 1) * page]).hexdigest() != pages[a]
        ]
        assert not wrong, f"{case} {target} {strategy}/{mode}: {len(wrong)} pages differ, first {wrong[:3]}"
        assert hashlib.sha256(data).hexdigest() == total and len(data) == count * page
        checked += count
    assert checked > 0


@pytest.mark.parametrize("form", ["symlink", "file"])
def test_chain_resolves_through_parent_link(corpus41: Corpus, tmp_path: Path, form: str) -> None:
    """d2/parent as CRIU writes it (a symlink to ../d1, criu/image.c), or a regular file holding
    "../d1" (an older form we keep following): the parent's pages are read through it."""
    d2 = tmp_path / "e2" / "d2"
    shutil.copytree(corpus41.case("e2_chain2"), tmp_path / "e2", symlinks=True)
    (d2 / "parent").unlink()
    if form == "symlink":
        os.symlink("../d1", d2 / "parent")
    else:
        (d2 / "parent").write_text("../d1\n")
    assert (d2 / "parent").is_symlink() == (form == "symlink")
    with open_images(d2) as images:
        parent = images.parent
        assert parent is not None and os.path.samefile(parent.path, d2.parent / "d1")
        pid = images.pids[0]
        with images.reader(pid) as reader:
            depths = {seg.depth for e in reader.pagemap.entries for seg in reader.segments(e.vaddr, e.size)}
        assert depths == {0, 1}


def test_shmem_segments_are_known(corpus: Corpus) -> None:
    with open_images(corpus.root / "cases" / "d_shm") as images:
        truth = {t.id for t, _ in truth_files(corpus.root, "d_shm") if t.kind == "shmem"}
        assert set(images.shmem_ids) == truth
        assert set(images.memfd_shmids.values()) <= truth


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_lazy_fixture(corpus: Corpus, strategy: str) -> None:
    """PE_LAZY-only pages raise the lazy error; present pages match the live program's hashes."""
    images_dir = corpus.root / "cases" / "f_lazy"
    (live_path,) = (corpus.root / "live" / "f_lazy").iterdir()
    live, _, _ = load_truth(live_path)
    lazy_runs = present = 0
    with open_images(images_dir) as images:
        pid = images.pids[0]
        for zero_fill in (False, True):
            with images.reader(pid, strategy, zero_fill=zero_fill) as reader:
                for e in reader.pagemap.entries:
                    if e.present:
                        data = reader.read(e.vaddr, e.size)
                        for i in range(e.nr_pages):
                            addr = e.vaddr + i * e.page_size
                            want = live.get(addr)
                            if want is not None:
                                got = hashlib.sha256(data[i * e.page_size : (i + 1) * e.page_size]).hexdigest()
                                assert got == want, f"{addr:#x} differs from the live program"
                                present += 1
                    else:
                        assert e.lazy
                        with pytest.raises(LazyPageError) as err:
                            reader.read(e.vaddr, e.size)
                        assert (err.value.start, err.value.end) == (e.vaddr, e.end)
                        assert f"{e.vaddr:#x}-{e.end:#x}" in str(err.value) and "pagemap-" in str(err.value)
                        lazy_runs += 1
    assert lazy_runs > 0 and present > 0


def test_fixture_copy_is_not_needed_to_read(corpus: Corpus, tmp_path: Path) -> None:
    """Reading never writes: a copy of a case reads the same and the fixture's files are unchanged."""
    case = corpus.root / "cases" / "a_single"
    before = {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in case.iterdir()}
    copy = tmp_path / "a_single"
    shutil.copytree(case, copy)
    with open_images(case) as a, open_images(copy) as b:
        pid = a.pids[0]
        with a.reader(pid) as ra, b.reader(pid) as rb:
            for e in ra.pagemap.entries:
                assert ra.read(e.vaddr, e.size) == rb.read(e.vaddr, e.size)
    assert {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in case.iterdir()} == before
