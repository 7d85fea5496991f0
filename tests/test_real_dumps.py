"""Every page of every strategy against real CRIU: dump, `criu restore --leave-stopped`, /proc/PID/mem.

The single, tree, threads, shared-memory and lazy checkpoints are the corpus's
(tests/corpus.py, made once per CRIU version and cached): their oracle is its
truth, the memory of the restored (stopped) tasks at every address the pagemap
lists (addresses from pycriu's decoding, shared memory placed through pycriu's
view of the VMAs), one sha256 per page, recorded before any reader of ours
touched the images. The chains are built here from the corpus's tree by
rewriting, and restored by CRIU here: that memory is their oracle.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from chains import build_chain
from conftest import Criu
from corpus import Corpus, read_truth
from criu_harness import Region, pycriu_load, restore_stopped

from crit_pageread import (
    PE_LAZY,
    PE_PARENT,
    PE_PRESENT,
    ChainError,
    LazyPageError,
    NotDumpedError,
    Target,
    open_images,
)
from crit_pageread.demo import expected_region
from crit_pageread.pagemap import encode_pagemap

STRATEGIES = ("pread", "preadv", "mmap")
MODES = ("read", "defer")
PAGE = 4096
VMA_ANON_SHARED = 1 << 8
VMA_AREA_SYSVIPC = 1 << 10
VMA_AREA_MEMFD = 1 << 14

#: Target -> {page vaddr (an offset for a shared segment): sha256 of the restored page}.
Oracle = dict[Target, dict[int, str]]


@dataclass
class Recorded:
    """What the victim said about itself when it ran (the corpus keeps its info JSON)."""

    info: dict[str, Any]

    @property
    def pid(self) -> int:
        return int(self.info["pid"])

    @property
    def regions(self) -> list[Region]:
        return [Region(**r) for r in self.info["regions"]]

    @property
    def all_pids(self) -> list[int]:
        return [self.pid, *self.info.get("children", [])]


@dataclass
class Case:
    """A real checkpoint and the restored memory at every address its pagemaps list."""

    images: Path
    victim: Recorded
    oracle: Oracle = field(default_factory=dict)


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def hashed(runs: dict[Target, list[tuple[int, bytes]]]) -> Oracle:
    """Runs of restored bytes as the corpus keeps its truth: one digest per page."""
    return {t: {v + off: digest(data[off : off + PAGE]) for v, data in rs for off in range(0, len(data), PAGE)}
            for t, rs in runs.items()}


def runs_of(pages: dict[int, str]) -> list[tuple[int, list[str]]]:
    """Consecutive pages as (first vaddr, their digests), in address order."""
    out: list[tuple[int, list[str]]] = []
    for vaddr in sorted(pages):
        if out and out[-1][0] + len(out[-1][1]) * PAGE == vaddr:
            out[-1][1].append(pages[vaddr])
        else:
            out.append((vaddr, [pages[vaddr]]))
    return out


def corpus_case(corpus: Corpus, name: str) -> Case:
    """A corpus case (read-only: copy it before changing it), its truth as the oracle."""
    truth = corpus.root / "truth" / name
    oracle: Oracle = {}
    for f in sorted(truth.glob("*.sha256")):
        kind, _, ident = f.stem.partition("-")
        oracle[Target("pid" if kind == "pid" else "shmem", int(ident))] = read_truth(f)
    return Case(corpus.case(name), Recorded(corpus.victim(name)), oracle)


# --- oracle: pycriu + criu restore + /proc/PID/mem ------------------------------------------------


def _load(path: Path) -> list[dict[str, Any]]:
    return pycriu_load(path)


def pagemap_runs(path: Path) -> list[tuple[int, int, int]]:
    """(vaddr, nr_pages, flags) of every entry, as pycriu decodes it (4.1 layout only)."""
    return [(e["vaddr"], e["nr_pages"], e.get("flags", PE_PRESENT)) for e in _load(path)[1:]]


def shmem_placements(images: Path) -> dict[int, list[tuple[int, int, int, int]]]:
    """shmem id -> [(pid, vma start, vma end, pgoff)] of the VMAs that map it, from pycriu."""
    inode_shmid: dict[int, int] = {}
    if (images / "memfd.img").exists():
        inode_shmid = {m["inode_id"]: m["shmid"] for m in _load(images / "memfd.img")}
    file_shmid = {
        f["id"]: inode_shmid[f["memfd"]["inode_id"]] for f in _load(images / "files.img") if f.get("type") == "MEMFD"
    }
    out: dict[int, list[tuple[int, int, int, int]]] = {}
    for pid in [p["pid"] for p in _load(images / "pstree.img")]:
        for vma in _load(images / f"mm-{pid}.img")[0]["vmas"]:
            status = vma["status"]
            if status & VMA_AREA_MEMFD:
                shmid = file_shmid[vma["shmid"]]
            elif status & (VMA_AREA_SYSVIPC | VMA_ANON_SHARED):
                shmid = vma["shmid"]
            else:
                continue
            out.setdefault(shmid, []).append((pid, vma["start"], vma["end"], vma["pgoff"]))
    return out


def snapshot(restore_dir: Path, layout_dir: Path) -> Oracle:
    """Restore `restore_dir` stopped; read every data-bearing page `layout_dir`'s pagemaps list."""
    oracle: dict[Target, list[tuple[int, bytes]]] = {}
    placements = shmem_placements(layout_dir)
    with restore_stopped(restore_dir) as restored:
        for name in sorted(os.listdir(layout_dir)):
            if name.startswith("pagemap-shmem-"):
                shmid = int(name[len("pagemap-shmem-") : -4])
                runs = []
                for off, nr, flags in pagemap_runs(layout_dir / name):
                    if not flags & (PE_PRESENT | PE_PARENT):
                        continue
                    pages = []
                    for page in range(off, off + nr * PAGE, PAGE):
                        pid, start, _, pgoff = next(
                            p for p in placements[shmid] if p[3] <= page < p[3] + p[2] - p[1]
                        )
                        pages.append(restored.read(pid, start + page - pgoff, PAGE))
                    runs.append((off, b"".join(pages)))
                oracle[Target("shmem", shmid)] = runs
            elif name.startswith("pagemap-"):
                pid = int(name[len("pagemap-") : -4])
                oracle[Target("pid", pid)] = [
                    (vaddr, restored.read(pid, vaddr, nr * PAGE))
                    for vaddr, nr, flags in pagemap_runs(layout_dir / name)
                    if flags & (PE_PRESENT | PE_PARENT)
                ]
    return hashed(oracle)


# --- checking readers -----------------------------------------------------------------------------


def first_difference(got: bytes, want: bytes, base: int) -> str:
    for i in range(0, max(len(got), len(want)), PAGE):
        if got[i : i + PAGE] != want[i : i + PAGE]:
            return f"page {base + i:#x} differs"
    return "lengths differ"


def bad_page(got: bytes, want: list[str], base: int) -> str | None:
    """The first page of `got` whose digest is not `want`'s, or None if all match."""
    if len(got) != len(want) * PAGE:
        return f"{len(got)} bytes read at {base:#x}, {len(want) * PAGE} wanted"
    for i, d in enumerate(want):
        if digest(got[i * PAGE : (i + 1) * PAGE]) != d:
            return f"page {base + i * PAGE:#x} differs"
    return None


def check_reads(images_dir: Path, oracle: Oracle, strategy: str, mode: str, **options: Any) -> int:
    """Read every oracle range with `strategy`; per entry (`read`) or deferred into one buffer
    with one sync (`defer`). Returns the number of pages checked."""
    checked = 0
    with open_images(images_dir) as images:
        for target, pages in oracle.items():
            runs = runs_of(pages)
            assert runs, f"{target}: nothing to check"
            make = images.reader if target.kind == "pid" else images.shmem_reader
            with make(target.id, strategy, **options) as reader:
                if mode == "read":
                    for vaddr, want in runs:
                        got = reader.read(vaddr, len(want) * PAGE)
                        assert bad_page(got, want, vaddr) is None, f"{target} {strategy}: {bad_page(got, want, vaddr)}"
                else:
                    buf = bytearray(len(pages) * PAGE)
                    view = memoryview(buf)
                    pos = 0
                    for vaddr, want in runs:
                        reader.readinto(vaddr, view[pos : pos + len(want) * PAGE], defer=True)
                        pos += len(want) * PAGE
                    if strategy == "preadv":
                        assert reader.strategy.pending > 0
                    reader.sync()
                    assert reader.strategy.pending == 0
                    pos = 0
                    for vaddr, want in runs:
                        problem = bad_page(bytes(view[pos : pos + len(want) * PAGE]), want, vaddr)
                        assert problem is None, f"{target} {strategy} deferred: {problem}"
                        pos += len(want) * PAGE
                    view.release()
            checked += len(pages)
    return checked


# --- the checkpoints ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def single(criu: Criu, corpus: Corpus) -> Case:
    """One process (`--seed 7`)."""
    return corpus_case(corpus, "a_single")


@pytest.fixture(scope="module")
def tree(criu: Criu, corpus: Corpus) -> Case:
    """A parent and two forked children (`--seed 8 --tree 2`)."""
    return corpus_case(corpus, "b_tree")


@pytest.fixture(scope="module")
def threads(criu: Criu, corpus: Corpus) -> Case:
    """One process with three threads (`--seed 9 --threads 3`)."""
    return corpus_case(corpus, "c_threads")


@pytest.fixture(scope="module")
def shm(criu: Criu, corpus: Corpus) -> Case:
    """Two processes in their own IPC namespace: anonymous shared memory, a memfd, SysV (`--shm --tree 1`)."""
    return corpus_case(corpus, "d_shm")


@pytest.fixture(scope="module")
def layout42(shm: Case, tmp_path_factory: pytest.TempPathFactory) -> Case:
    """The shm checkpoint with every pagemap (pid and shmem) rewritten in CRIU 4.2's layout."""
    out = tmp_path_factory.mktemp("layout42") / "images"
    shutil.copytree(shm.images, out, symlinks=True)
    for name in os.listdir(out):
        if name.startswith("pagemap-"):
            entries = _load(shm.images / name)
            runs = [(e["vaddr"], e["nr_pages"], e["flags"]) for e in entries[1:]]
            (out / name).write_bytes(encode_pagemap(entries[0]["pages_id"], runs, layout="4.2"))
    return Case(out, shm.victim, shm.oracle)


def _chain_case(tree: Case, tmp_path_factory: pytest.TempPathFactory, levels: int) -> Case:
    info = build_chain(tree.images, tmp_path_factory.mktemp(f"chain{levels}"), levels, seed=levels)
    assert info.split_entries > 0, "no entry was split between levels"
    # The construction is CRIU's to judge: the chain restores to the original dump's memory.
    oracle = snapshot(info.newest, tree.images)
    return Case(info.newest, tree.victim, oracle)


@pytest.fixture(scope="module")
def chain2(tree: Case, tmp_path_factory: pytest.TempPathFactory) -> Case:
    return _chain_case(tree, tmp_path_factory, 2)


@pytest.fixture(scope="module")
def chain3(tree: Case, tmp_path_factory: pytest.TempPathFactory) -> Case:
    return _chain_case(tree, tmp_path_factory, 3)


@pytest.fixture(scope="module")
def chain3_42(tree: Case, chain3: Case, tmp_path_factory: pytest.TempPathFactory) -> Case:
    """chain3 built again (same seed) with every level's pagemaps in CRIU 4.2's layout."""
    info = build_chain(tree.images, tmp_path_factory.mktemp("chain3-42"), 3, seed=3, layout="4.2")
    for level in info.dirs:
        for name in os.listdir(level):
            if name.startswith("pagemap-"):
                assert (level / name).read_bytes() != (chain3.images.parent / level.name / name).read_bytes()
    return Case(info.newest, tree.victim, chain3.oracle)


CASES = ("single", "tree", "threads", "shm", "layout42", "chain2", "chain3", "chain3_42")


@pytest.mark.criu
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("case_name", CASES)
def test_every_page_matches_restored_memory(
    criu: Criu, case_name: str, strategy: str, mode: str, request: pytest.FixtureRequest
) -> None:
    case: Case = request.getfixturevalue(case_name)
    assert check_reads(case.images, case.oracle, strategy, mode) > 0


# --- what each checkpoint is about ----------------------------------------------------------------


@pytest.mark.criu
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_single_secret_and_pattern(single: Case, strategy: str) -> None:
    """The secret spans a page (and pagemap-entry) boundary; regions hold the victim's pattern."""
    info = single.victim.info
    text = info["secret"]["text"].encode()
    with open_images(single.images) as images, images.reader(single.victim.pid, strategy) as reader:
        entry = reader.pagemap.find(info["secret"]["addr"] + len(text) - 1)
        assert entry is not None and entry.vaddr > info["secret"]["addr"], "secret does not cross an entry"
        assert reader.read(info["secret"]["addr"], len(text)) == text
        for region in single.victim.regions:
            want = expected_region(info, vars(region), PAGE)
            got = bytearray(region.len)
            # Holes of the pattern are untouched pages: CRIU may leave them out (zero_fill reads them).
            with images.reader(single.victim.pid, strategy, zero_fill=True) as zreader:
                zreader.readinto(region.start, got)
            assert bytes(got) == want, f"{region.name}: {first_difference(bytes(got), want, region.start)}"


@pytest.mark.criu
def test_tree_has_every_process(tree: Case) -> None:
    with open_images(tree.images) as images:
        assert images.pids[0] == tree.victim.pid
        assert sorted(images.pids) == sorted(tree.victim.all_pids)
        for pid in images.pids[1:]:
            assert images.processes[pid].ppid == tree.victim.pid
            assert Target("pid", pid) in tree.oracle
            assert images.pagemap(pid).pages_id != images.pagemap(images.pids[0]).pages_id


@pytest.mark.criu
def test_threads_are_listed(threads: Case) -> None:
    with open_images(threads.images) as images:
        (pid,) = images.pids
        tids = images.processes[pid].threads
        assert len(tids) == 4
        assert sorted(tids) == sorted(threads.victim.info["threads"])
        for tid in tids:
            assert images.core(tid).thread_info is not None


@pytest.mark.criu
def test_shm_covers_memfd_sysv_and_anon_shared(shm: Case) -> None:
    with open_images(shm.images) as images:
        shmem_targets = {t.id for t in shm.oracle if t.kind == "shmem"}
        assert set(images.shmem_ids) == shmem_targets
        kinds = {v.kind for pid in images.pids for v in images.vmas(pid)}
        assert {"memfd", "sysv-shm"} <= kinds
        memfd_ids = set(images.memfd_shmids.values())
        assert memfd_ids and memfd_ids <= shmem_targets
        sysv = {v.shmid for pid in images.pids for v in images.vmas(pid) if v.kind == "sysv-shm"}
        assert sysv and sysv <= shmem_targets


@pytest.mark.criu
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_shm_segments_hold_the_pattern(shm: Case, strategy: str) -> None:
    """Each shared region, read through its segment's shmem reader, is what the victim wrote."""
    info = shm.victim.info
    shared = [r for r in shm.victim.regions if r.name in ("anon-shared", "memfd", "sysv-shm")]
    assert len(shared) == 3
    with open_images(shm.images) as images:
        vmas = images.vmas(shm.victim.pid)
        for region in shared:
            vma = next(v for v in vmas if v.start <= region.start < v.end)
            shmid = images.memfd_shmids[vma.shmid] if vma.kind == "memfd" else vma.shmid
            offset = region.start - vma.start + vma.pgoff
            with images.shmem_reader(shmid, strategy, zero_fill=True) as reader:
                assert reader.read(offset, region.len) == expected_region(info, vars(region), PAGE), region.name


@pytest.mark.criu
@pytest.mark.parametrize("case_name", ["layout42", "chain3_42"])
def test_layout42_is_detected(criu: Criu, case_name: str, request: pytest.FixtureRequest) -> None:
    case: Case = request.getfixturevalue(case_name)
    with open_images(case.images) as images:
        while images is not None:
            for target in case.oracle:
                if (images.path / f"pagemap-{target.id}.img").exists() or target.kind == "shmem":
                    assert images.pagemap_for(target).layout == "4.2"
            images = images.parent


# --- chains -----------------------------------------------------------------------------------------


@pytest.mark.criu
@pytest.mark.parametrize("levels", [2, 3])
def test_chain_restores_like_the_original(tree: Case, levels: int, request: pytest.FixtureRequest) -> None:
    """CRIU resolves the chain through `parent` links to the original dump's memory."""
    chain: Case = request.getfixturevalue(f"chain{levels}")
    assert chain.oracle == tree.oracle
    assert os.readlink(chain.images / "parent") == f"../d{levels - 1}"


@pytest.mark.criu
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_chain_parents_hold_stale_bytes(chain3: Case, strategy: str) -> None:
    """A reader that preferred a parent's copy would be caught: the parent's bytes differ."""
    stale = 0
    with open_images(chain3.images) as newest, open_images(chain3.images / "parent") as parent:
        for pid in newest.pids:
            with newest.reader(pid, strategy) as reader, parent.reader(pid, strategy) as preader:
                depths = set()
                for vaddr, want in chain3.oracle[Target("pid", pid)].items():
                    for seg in reader.segments(vaddr, PAGE):
                        depths.add(seg.depth)
                        if seg.depth == 0 and preader.pagemap.find(seg.vaddr) is not None:
                            entry = preader.pagemap.find(seg.vaddr)
                            if entry is not None and entry.present and entry.end >= seg.end:
                                assert digest(preader.read(seg.vaddr, seg.length)) != want
                                stale += 1
                assert depths == {0, 1, 2}
    assert stale > 0


@pytest.mark.criu
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_auto_dedup_punches_parents_only(chain3: Case, strategy: str, tmp_path: Path) -> None:
    root = tmp_path / "copy"
    shutil.copytree(chain3.images.parent, root, symlinks=True)
    newest = root / chain3.images.name
    parents = [root / "d1", root / "d2"]

    def digest(d: Path) -> dict[str, str]:
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in d.iterdir() if p.is_file()}

    before_newest = digest(newest)
    before = {p: (os.stat(p).st_size, os.stat(p).st_blocks) for d in parents for p in d.glob("pages-*.img")}
    assert check_reads(newest, chain3.oracle, strategy, "read", auto_dedup=True) > 0
    assert digest(newest) == before_newest, "the newest image was modified"
    punched = 0
    for path, (size, blocks) in before.items():
        st = os.stat(path)
        assert st.st_size == size, f"{path}: size changed"
        fd = os.open(path, os.O_RDONLY)
        try:
            first_hole = os.lseek(fd, 0, os.SEEK_HOLE)
        finally:
            os.close(fd)
        if st.st_blocks < blocks:
            assert first_hole < size, f"{path}: fewer blocks but no hole"
            punched += 1
    assert punched == len(before), "every parent pages file should have holes"


@pytest.mark.criu
def test_auto_dedup_punches_only_what_was_read(chain3: Case, tmp_path: Path) -> None:
    """A read that fails (a range running into pages not dumped) punches nothing, even later."""
    root = tmp_path / "copy"
    shutil.copytree(chain3.images.parent, root, symlinks=True)
    newest = root / chain3.images.name
    parents = sorted(root.glob("d[12]/pages-*.img"))
    before = {p: p.read_bytes() for p in parents}
    with open_images(newest) as images:
        found = False
        for pid in images.pids:
            entries = images.pagemap(pid).entries
            with images.reader(pid, "preadv", auto_dedup=True) as reader:
                for entry, following in itertools.pairwise(entries):
                    if entry.in_parent and following.vaddr > entry.end:
                        with pytest.raises(NotDumpedError):
                            reader.read(entry.vaddr, entry.size + PAGE)
                        found = True
                present = next(e for e in entries if e.present)
                reader.read(present.vaddr, present.size)  # a later successful read punches what it owes
                reader.readinto(present.vaddr, bytearray(present.size), defer=True)
                reader.sync()
        assert found, "no PE_PARENT entry followed by a gap in the chain"
    assert {p: p.read_bytes() for p in parents} == before


@pytest.mark.criu
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_auto_dedup_with_deferred_and_synchronous_reads_mixed(chain3: Case, strategy: str, tmp_path: Path) -> None:
    """A synchronous read flushes the queue (and its punches) first; its own pages are read before
    they are punched."""
    root = tmp_path / "copy"
    shutil.copytree(chain3.images.parent, root, symlinks=True)
    with open_images(root / chain3.images.name) as images:
        for target, pages in chain3.oracle.items():
            with images.reader(target.id, strategy, auto_dedup=True) as reader:
                deferred = []
                for i, (vaddr, want) in enumerate(runs_of(pages)):
                    if i % 2:
                        buf = bytearray(len(want) * PAGE)
                        reader.readinto(vaddr, buf, defer=True)
                        deferred.append((vaddr, buf, want))
                    else:
                        problem = bad_page(reader.read(vaddr, len(want) * PAGE), want, vaddr)
                        assert problem is None, f"{target}: {problem}"
                reader.sync()
                for vaddr, buf, want in deferred:
                    problem = bad_page(bytes(buf), want, vaddr)
                    assert problem is None, f"{target} deferred: {problem}"


@pytest.mark.criu
def test_auto_dedup_is_off_by_default(chain3: Case, tmp_path: Path) -> None:
    root = tmp_path / "copy"
    shutil.copytree(chain3.images.parent, root, symlinks=True)
    before = {p: p.read_bytes() for p in root.glob("d*/pages-*.img")}
    check_reads(root / chain3.images.name, chain3.oracle, "preadv", "defer")
    assert {p: p.read_bytes() for p in before} == before


@pytest.mark.criu
def test_chain_without_parent_link_is_an_error(chain2: Case, tmp_path: Path) -> None:
    copy = tmp_path / "d2"
    shutil.copytree(chain2.images, copy, symlinks=True)
    (copy / "parent").unlink()
    with open_images(copy) as images:
        pid = images.pids[0]
        runs = runs_of(chain2.oracle[Target("pid", pid)])
        with images.reader(pid) as reader, pytest.raises(ChainError, match="no parent link"):
            for vaddr, want in runs:
                reader.read(vaddr, len(want) * PAGE)


# --- lazy dump --------------------------------------------------------------------------------------

@dataclass
class LazyCase:
    images: Path
    live: dict[int, str]  # every readable page of the program just before `criu dump --lazy-pages`
    pid: int


@pytest.fixture(scope="module")
def lazy(criu: Criu, corpus: Corpus) -> LazyCase:
    """The corpus's `criu dump --lazy-pages` (FLUSH_N_CLOSE at once), every page read from the live program first."""
    return LazyCase(corpus.case("f_lazy"), corpus.live("f_lazy"), corpus.pid("f_lazy"))


@pytest.mark.criu
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_lazy_dump(lazy: LazyCase, strategy: str) -> None:
    runs = pagemap_runs(lazy.images / f"pagemap-{lazy.pid}.img")
    lazy_runs = [r for r in runs if r[2] & PE_LAZY and not r[2] & PE_PRESENT]
    present_runs = [r for r in runs if r[2] & PE_PRESENT]
    assert lazy_runs and present_runs
    with open_images(lazy.images) as images:
        for zero_fill in (False, True):
            with images.reader(lazy.pid, strategy, zero_fill=zero_fill) as reader:
                for vaddr, nr, _ in present_runs:
                    want = [lazy.live[vaddr + i * PAGE] for i in range(nr)]
                    assert bad_page(reader.read(vaddr, nr * PAGE), want, vaddr) is None
                for vaddr, nr, _ in lazy_runs:
                    with pytest.raises(LazyPageError) as err:
                        reader.read(vaddr, nr * PAGE)
                    assert (err.value.start, err.value.end) == (vaddr, vaddr + nr * PAGE)
                    assert f"{vaddr:#x}-{vaddr + nr * PAGE:#x}" in str(err.value)
                    assert str(lazy.images / f"pagemap-{lazy.pid}.img") in str(err.value)
                    # Deferred: the error comes before anything is queued.
                    buf = bytearray(nr * PAGE)
                    with pytest.raises(LazyPageError):
                        reader.readinto(vaddr, buf, defer=True)
                    assert reader.strategy.pending == 0
                # A read spanning present then lazy pages names the lazy part only (the secret's pages).
                vaddr, nr = next((v, n) for v, n, _ in lazy_runs
                                 if any(pv + pn * PAGE == v for pv, pn, _ in present_runs))
                with pytest.raises(LazyPageError) as err:
                    reader.read(vaddr - PAGE, (nr + 1) * PAGE)
                assert (err.value.start, err.value.end) == (vaddr, vaddr + nr * PAGE)


@pytest.mark.criu
def test_not_dumped_ranges(single: Case) -> None:
    with open_images(single.images) as images:
        pid = single.victim.pid
        entries = images.pagemap(pid).entries
        gap = next(a.end for a, b in itertools.pairwise(entries) if b.vaddr > a.end)
        with images.reader(pid) as reader:
            with pytest.raises(NotDumpedError) as err:
                reader.read(gap, PAGE)
            assert f"{gap:#x}" in str(err.value)
        with images.reader(pid, zero_fill=True) as reader:
            assert reader.read(gap, PAGE) == bytes(PAGE)


# --- the demo ---------------------------------------------------------------------------------------


@pytest.mark.criu
def test_demo_reads_what_the_program_wrote(criu: Criu, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    from crit_pageread import demo

    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    assert demo.main(["--mib", "2", "--repeat", "1"]) == 0
    out = capsys.readouterr().out
    for name in STRATEGIES:
        assert any(line.startswith(name + " ") and line.endswith("OK") for line in out.splitlines()), out
    assert "CRIT-PAGEREAD-SECRET-42-spans-two-pages" in out
    assert list(tmp_path.iterdir()) == [], "the demo left its temporary directory"


@pytest.mark.criu
def test_demo_fails_on_a_mismatch(criu: Criu, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    """If the bytes read differed from what the program wrote, the demo says so and exits 1."""
    from crit_pageread import demo

    real = demo.page_bytes
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    monkeypatch.setattr(demo, "page_bytes", lambda seed, *a: real(seed + 1, *a))
    assert demo.main(["--mib", "0", "--repeat", "1", "--strategy", "pread"]) == 1
    out = capsys.readouterr().out
    assert "MISMATCH" in out
    assert list(tmp_path.iterdir()) == []
