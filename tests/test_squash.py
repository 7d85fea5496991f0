"""`crit-pageread squash`: chains and lazy dumps become directories `criu restore` takes on their own.

Oracles: CRIU restores the original dump and the squashed one and /proc/PID/mem
is compared; the victim checks its own memory pattern; the shared fixture's
truth (hashes read from the restored program) is compared with the squashed
pages decoded by pycriu (crit's own decoder, not our reader).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pytest
from chains import build_chain
from conftest import Criu
from corpus import Corpus
from criu_harness import (
    Region,
    Victim,
    dump,
    pycriu_load,
    read_mem,
    restore_stopped,
    start_lazy_dump,
    start_victim,
)
from native_support import use_helper
from restore_support import (
    dumped_pages,
    interrupted_run,
    kill_tree,
    leftovers,
    restored_memory,
    run_cli,
    self_check,
    wait_check,
)

from crit_pageread.pagemap import PE_PARENT, PE_PRESENT, load_pagemap
from crit_pageread.restore import squash as squash_mod
from crit_pageread.restore.pipeline import restore

PAGE = 4096


@dataclass
class Dumped:
    victim: Victim
    images: Path
    work: Path


@pytest.fixture(scope="module")
def shm_dump(criu: Criu, victim_exe: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dumped]:
    """A victim with threads and shared memory (anon shared, memfd, SysV), dumped once."""
    work = tmp_path_factory.mktemp("squash")
    victim = start_victim(victim_exe, work / "run", "--threads", "2", "--shm", "--seed", "5", ipc_ns=True)
    try:
        dump(victim, work / "dump")
        yield Dumped(victim, work / "dump", work)
    finally:
        victim.kill()


def _pycriu_pagemap(path: Path) -> list[dict[str, int]]:
    return pycriu_load(path)


def _pages_by_pycriu(images: Path, name: str) -> dict[int, bytes]:
    """Every page of a pagemap image and its pages file, decoded with pycriu (flags as CRIU reads them)."""
    entries = _pycriu_pagemap(images / name)
    head, body = entries[0], entries[1:]
    out = {}
    with open(images / f"pages-{head['pages_id']}.img", "rb") as f:
        for e in body:
            flags = e.get("flags", PE_PRESENT)
            assert flags & PE_PRESENT and not flags & PE_PARENT, f"{name}: entry {e} is not self-contained"
            for i in range(e["nr_pages"]):
                out[e["vaddr"] + i * PAGE] = f.read(PAGE)
    return out


def test_squashed_three_level_chain_restores_to_the_memory_of_the_original_dump(shm_dump: Dumped, tmp_path: Path):
    info = build_chain(shm_dump.images, tmp_path / "chain", 3, seed=3)
    assert sum(info.parent_pages.values()) and sum(info.stale_pages.values())
    out = tmp_path / "out"
    proc = run_cli("squash", str(info.newest), str(out), "--verify", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["verified"] and report["parent_pages"] > 0
    assert not (out / "parent").exists()
    pid = shm_dump.victim.pid
    for name in sorted(os.listdir(out)):
        if name.startswith("pagemap-"):
            _pages_by_pycriu(out, name)  # every entry present, none in a parent
    # contiguous pages the chain split across levels are merged again
    chain_entries = len(_pycriu_pagemap(info.newest / f"pagemap-{pid}.img"))
    assert len(_pycriu_pagemap(out / f"pagemap-{pid}.img")) < chain_entries
    pages = dumped_pages(shm_dump.images, pid)
    truth = restored_memory(shm_dump.images, pid, pages)
    got = restored_memory(out, pid, pages)
    assert got == truth
    assert self_check(out, shm_dump.victim) == "OK"
    # PE_LAZY is kept where the dump had it, so OUT also restores post-copy from a page server
    result = restore(out, lazy=True, cpus={0})
    try:
        assert result.pages_served > 0
        check = Path(f"{shm_dump.victim.info_path}.check")
        check.unlink(missing_ok=True)
        assert wait_check(result.pid, check) == "OK"
    finally:
        kill_tree(result.pid)


@pytest.mark.parametrize("helper", ["native", "python"])
def test_squash_from_the_map_columns_writes_what_the_segment_walk_writes(
    shm_dump: Dumped, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, helper: str,
) -> None:
    """A chain squashed from its memory maps' columns (no object per run; with the helper one plan and one
    kernel-copy call per batch), in batches as small as a few runs or bytes, with and without progress, writes
    the same files byte for byte as the walk over its segments, PE_LAZY bits and entry counts included."""
    use_helper(helper, monkeypatch)
    top = build_chain(shm_dump.images, tmp_path / "chain", 3, seed=4).newest
    monkeypatch.setattr(squash_mod, "_squash_runs", lambda *args: False)
    want_report = squash_mod.squash(top, tmp_path / "walk")
    want = {p.name: p.read_bytes() for p in sorted((tmp_path / "walk").iterdir()) if p.is_file()}
    monkeypatch.undo()
    use_helper(helper, monkeypatch)
    used: list[int] = []
    real = squash_mod._squash_runs

    def spy(*args: Any) -> bool:
        used.append(real(*args))
        return used[-1]

    monkeypatch.setattr(squash_mod, "_squash_runs", spy)
    for n, (pieces, batch, progress) in enumerate(((1 << 14, 64 << 20, False), (3, 64 << 20, False),
                                                   (1 << 14, 3 * PAGE, True), (2, PAGE, True))):
        monkeypatch.setattr(squash_mod, "_COPY_PIECES", pieces)
        monkeypatch.setattr(squash_mod, "_COPY_BATCH", batch)
        seen: list[int] = []

        def note(what: str, done: int, total: int, seen: list[int] = seen) -> None:
            seen.append(done)

        out = tmp_path / f"cols{n}"
        report = squash_mod.squash(top, out, progress=note if progress else None)
        got = {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}
        assert got.keys() == want.keys() and all(got[k] == want[k] for k in want), n
        assert [asdict(t) for t in report.targets] == [asdict(t) for t in want_report.targets]
        if progress:
            assert seen == sorted(seen) and len(seen) > 3
    assert used and all(used)


def test_squashed_chain_keeps_shared_memory_and_threads(shm_dump: Dumped, tmp_path: Path):
    top = build_chain(shm_dump.images, tmp_path / "chain", 2, seed=8).newest
    out = tmp_path / "out"
    assert run_cli("squash", str(top), str(out)).returncode == 0
    shm = sorted(n for n in os.listdir(shm_dump.images) if n.startswith("pagemap-shmem-"))
    assert shm and shm == sorted(n for n in os.listdir(out) if n.startswith("pagemap-shmem-"))
    for name in shm:
        assert _pages_by_pycriu(out, name) == _pages_by_pycriu(shm_dump.images, name)
    victim = shm_dump.victim
    shared = [r for r in victim.regions if r.name in ("anon-shared", "memfd", "sysv-shm")]
    assert len(shared) == 3
    with restore_stopped(shm_dump.images) as t:
        truth = [t.read(victim.pid, r.start, r.len) for r in shared]
    with restore_stopped(out) as r:
        assert r.threads(victim.pid) == sorted(victim.info["threads"])
        assert [r.read(victim.pid, s.start, s.len) for s in shared] == truth


def test_squash_writes_the_4_2_layout_when_asked_and_the_input_layout_by_default(shm_dump: Dumped, tmp_path: Path):
    top = build_chain(shm_dump.images, tmp_path / "chain", 2, layout="4.2").newest
    pid = shm_dump.victim.pid
    assert run_cli("squash", str(top), str(tmp_path / "same")).returncode == 0
    assert load_pagemap(tmp_path / "same" / f"pagemap-{pid}.img", PAGE).layout == "4.2"
    assert run_cli("squash", str(top), str(tmp_path / "old"), "--layout", "4.1").returncode == 0
    old = load_pagemap(tmp_path / "old" / f"pagemap-{pid}.img", PAGE)
    assert old.layout == "4.1"
    # the 4.1 layout is what CRIU 4.1 restores: pycriu decodes the page counts
    assert sum(e["nr_pages"] for e in _pycriu_pagemap(tmp_path / "old" / f"pagemap-{pid}.img")[1:]) == sum(
        e.nr_pages for e in old.entries
    )
    assert self_check(tmp_path / "old", shm_dump.victim) == "OK"


def test_squashed_e2_chain2_fixture_holds_exactly_the_truth_pages(corpus: Corpus, tmp_path: Path):
    # The truth hashes were read from the restored program when the corpus was made.
    chain = tmp_path / "e2"
    shutil.copytree(corpus.root / "cases" / "e2_chain2", chain, symlinks=True)
    out = tmp_path / "out"
    proc = run_cli("squash", str(chain / "d2"), str(out), "--verify", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["parent_pages"] > 0
    truth_file = corpus.truth_file("e2_chain2")
    lines = truth_file.read_text().split("\n")
    truth = {int(a, 16): h for a, h in (line.split() for line in lines if line and not line.startswith("TOTAL"))}
    pages = _pages_by_pycriu(out, f"pagemap-{corpus.pid('e2_chain2')}.img")
    assert sorted(pages) == sorted(truth)
    assert {a: hashlib.sha256(d).hexdigest() for a, d in pages.items()} == truth
    # every non-memory image is copied unchanged; the parent is gone
    for name in os.listdir(chain / "d2"):
        if name != "parent" and not name.startswith(("pagemap-", "pages-")):
            assert (out / name).read_bytes() == (chain / "d2" / name).read_bytes()
    assert not (out / "parent").exists()


def test_squashed_lazy_dump_of_a_process_tree_restores_programs_whose_memory_checks_out(
    criu: Criu, victim_exe: Path, tmp_path: Path, pipe_max_size: None
):
    victim = start_victim(victim_exe, tmp_path / "run", "--threads", "1", "--tree", "2", "--seed", "9")
    try:
        regions = {victim.pid: victim.regions}
        for i, child in enumerate(victim.info["children"]):
            regions[child] = [Region(**r) for r in victim.child_info(i)["regions"]]
        live = {(pid, r.name): read_mem(pid, r.start, r.len) for pid, rs in regions.items() for r in rs}
        criu, port = start_lazy_dump(victim, tmp_path / "lazy")
        try:
            for pid in regions:
                flags = {e.flags for e in load_pagemap(tmp_path / "lazy" / f"pagemap-{pid}.img", PAGE).entries}
                assert 2 in flags  # PE_LAZY alone: no data in the images, only on CRIU's page server
            out = tmp_path / "out"
            proc = run_cli("squash", str(tmp_path / "lazy"), str(out), "--strategy", "remote", "--verify", "--json",
                           env={"CRIT_PAGEREAD_REMOTE__PORT": str(port)})
            assert proc.returncode == 0, proc.stderr
            report = json.loads(proc.stdout)
            assert all(t["lazy_pages"] > 0 for t in report["targets"]) and len(report["targets"]) == 3
            assert criu.wait(timeout=30) == 0  # CRIU's page server (one client only) saw us close: dump done
        finally:
            if criu.poll() is None:
                criu.kill()
                criu.wait()
        victim.reap()
        with restore_stopped(out) as r:
            got = {(pid, reg.name): r.read(pid, reg.start, reg.len) for pid, rs in regions.items() for reg in rs}
        assert got == live
        assert self_check(out, victim) == "OK"
    finally:
        victim.kill()


def test_squash_of_a_lazy_dump_without_a_page_server_fails_and_writes_nothing(criu: Criu, victim_exe: Path,
                                                                              tmp_path: Path):
    victim = start_victim(victim_exe, tmp_path / "run")
    try:
        criu, _port = start_lazy_dump(victim, tmp_path / "lazy")
        lazy = tmp_path / "copy"
        shutil.copytree(tmp_path / "lazy", lazy)
        criu.kill()
        criu.wait()
    finally:
        victim.kill()
    proc = run_cli("squash", str(lazy), str(tmp_path / "out"))
    assert proc.returncode == 1
    assert "lazy pages" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


@pytest.mark.parametrize("damage", ["no-pstree", "dangling-parent", "short-pages", "exists"])
def test_squash_of_bad_input_is_one_line_error_and_no_output(shm_dump: Dumped, tmp_path: Path, damage: str):
    top = build_chain(shm_dump.images, tmp_path / "chain", 2).newest
    out = tmp_path / "out"
    pid = shm_dump.victim.pid
    if damage == "no-pstree":
        (top / "pstree.img").unlink()
    elif damage == "dangling-parent":
        shutil.rmtree(tmp_path / "chain" / "d1")
    elif damage == "short-pages":
        pm = load_pagemap(top / f"pagemap-{pid}.img", PAGE)
        os.truncate(pm.pages_path, max(0, pm.present_bytes - PAGE))
    else:
        out.mkdir()
    proc = run_cli("squash", str(top), str(out))
    assert proc.returncode != 0
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    if damage == "exists":
        assert "already exists" in proc.stderr and os.listdir(out) == []
    else:
        assert not out.exists()
    assert not leftovers(tmp_path)


def test_sigint_in_the_middle_of_squash_leaves_no_partial_output(shm_dump: Dumped, tmp_path: Path):
    top = build_chain(shm_dump.images, tmp_path / "chain", 3).newest
    out = tmp_path / "out"
    proc = interrupted_run(["squash", str(top), str(out)], after_calls=2)
    assert proc.returncode == 130, proc.stderr
    assert "interrupted" in proc.stderr
    assert not out.exists() and not leftovers(tmp_path)
