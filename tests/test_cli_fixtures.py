"""extract, grep and pages on the shared CRIU fixtures, checked against their ground truth."""

from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path
from typing import Any

import pytest
from corpus import Corpus

from crit_pageread import open_images
from crit_pageread.cli.main import main


def _truth(shared: Path, case: str) -> dict[str, dict[int, str]]:
    out = {}
    for f in (shared / "truth" / case).glob("*.sha256"):
        lines = f.read_text().splitlines()
        out[f.stem] = {int(a, 16): h for a, h in (ln.split() for ln in lines if not ln.startswith("TOTAL"))}
    return out


def _extract(src: Path, out: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> dict:
    code = main(["extract", str(src), "-o", str(out), *extra])
    _, err = capsys.readouterr()
    assert code == 0, err
    return json.loads((out / "index.json").read_text())


@pytest.mark.parametrize(("case", "images"), [("a_single", "a_single"), ("b_tree", "b_tree"), ("d_shm", "d_shm"),
                                              ("e2_chain2", "e2_chain2/d2")])
def test_extract_pages_hash_to_the_truth(corpus: Corpus, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                         case: str, images: str) -> None:
    truth = _truth(corpus.root, case)
    index = _extract(corpus.root / "cases" / images, tmp_path / "out", capsys)
    seen: dict[str, set[int]] = {k: set() for k in truth}
    for f in index["files"]:
        data = (tmp_path / "out" / f["file"]).read_bytes()
        for v in f["vmas"]:
            for s, e in v["data"]:
                for a in range(s, e, 4096):
                    page = data[a - v["start"] : a - v["start"] + 4096]
                    digest = hashlib.sha256(page).hexdigest()
                    if "shmem" in v:  # shared memory: the truth is by offset in the segment
                        key, where = f"shmem-{v['shmem']}", a - v["start"] + v["shmem_offset"]
                    else:
                        key, where = f"pid-{f['pid']}", a
                    assert truth[key][where] == digest, (f["file"], hex(a))
                    seen[key].add(where)
    for key, pages in truth.items():
        if key.startswith("pid-"):
            assert seen[key] == set(pages), key
        else:
            assert seen[key] <= set(pages) and seen[key], key  # only the mapped part of a segment


def test_extract_lazy_checkpoint_writes_present_pages_and_lists_lazy_ones(
    corpus: Corpus, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    live = {}
    for ln in (corpus.root / "live" / "f_lazy" / f"pid-{corpus.pid('f_lazy')}.sha256").read_text().splitlines():
        if not ln.startswith("TOTAL"):
            a, h = ln.split()
            live[int(a, 16)] = h
    index = _extract(corpus.root / "cases" / "f_lazy", tmp_path / "out", capsys)
    lazy = [r for f in index["files"] for v in f["vmas"] for r in v.get("lazy_not_written", [])]
    lazy += [[s["start"], s["end"]] for s in index["skipped"] if s["reason"] == "lazy pages only"]
    assert lazy
    written = 0
    for f in index["files"]:
        data = (tmp_path / "out" / f["file"]).read_bytes()
        for v in f["vmas"]:
            for s, e in v["data"]:
                for a in range(s, e, 4096):
                    assert hashlib.sha256(data[a - v["start"] : a - v["start"] + 4096]).hexdigest() == live[a]
                    written += 1
            for s, e in v.get("lazy_not_written", []):
                assert data[s - v["start"] : e - v["start"]] == bytes(e - s)
    assert written


def test_grep_on_lazy_checkpoint_reports_unsearched_pages(corpus: Corpus,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["grep", str(corpus.root / "cases" / "f_lazy"), "no-such-thing-here"])
    out, err = capsys.readouterr()
    assert code == 1 and out == ""
    assert "lazy pages not searched" in err and len(err.splitlines()) == 1


def test_pages_shows_parent_entries_resolved_into_the_parent_image(corpus: Corpus,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    d2 = corpus.root / "cases" / "e2_chain2" / "d2"
    assert main(["pages", str(d2), "--json"]) == 0
    secs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    parent = [e for s in secs for e in s["entries"] if e["flag_names"] == "parent"]
    assert parent
    for e in parent:
        assert sum(s["length"] for s in e["sources"]) == e["end"] - e["start"]
        assert all(s["depth"] == 1 and Path(s["image"]).resolve() == (d2.parent / "d1").resolve() for s in e["sources"])
    assert main(["pages", str(d2)]) == 0
    out = capsys.readouterr().out
    assert "(parent 1)" in out and "total" in out


def _hole_between_runs(images: Any) -> tuple[int, Any, Any]:
    """A pid and two present entries back to back in its pages file with a hole between them in memory."""
    for pid in images.pids:
        entries = [e for e in images.pagemap(pid).entries if e.present]
        for a, b in itertools.pairwise(entries):
            if a.end < b.vaddr and a.offset + a.size == b.offset:
                return pid, a, b
    raise AssertionError("no hole between two present entries")


@pytest.mark.parametrize("strategy", [None, "pread"])
def test_grep_in_place_never_matches_across_a_hole(corpus: Corpus, capsys: pytest.CaptureFixture[str],
                                                   strategy: str | None) -> None:
    """Entries back to back in the pages file but apart in memory: bytes that straddle the file boundary
    are no match (they are not adjacent in memory); the same bytes inside one run are found at their vaddr."""
    case = corpus.root / "cases" / "a_single"
    with open_images(case) as images:
        pid, a, b = _hole_between_runs(images)
        data = (case / f"pages-{images.pagemap(pid).pages_id}.img").read_bytes()
        straddle = data[b.offset - 8 : b.offset + 8]
        inside = data[b.offset : b.offset + 16]
        with images.reader(pid, "pread") as reader:
            memory = b"".join(reader.read(e.vaddr, e.size) for e in images.pagemap(pid).entries if e.present)
    opts = ["--strategy", strategy] if strategy else []
    rc = main(["grep", str(case), "--hex", straddle.hex(), "--json", *opts])
    found = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    # Only genuine occurrences (whole inside memory that is contiguous) may be reported.
    assert all(int(f["vaddr"]) != a.end - 8 for f in found)
    assert (rc == 0) == bool(found) and len(found) <= memory.count(straddle)
    assert main(["grep", str(case), "--hex", inside.hex(), "--json", *opts]) == 0
    found = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert b.vaddr in [int(f["vaddr"]) for f in found]
