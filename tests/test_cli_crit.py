"""crit's commands through crit-pageread give the real crit program's output, byte for byte.

The oracle is each CRIU version's own crit (`python -m crit`, only that version's pycriu and crit on
PYTHONPATH), run on the corpus that version's CRIU dumped for this suite (tests/corpus.py).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from cli_driver import crit_oracle_path, run_jobs
from conftest import Criu
from corpus import Corpus

from crit_pageread.pagemap import encode_pagemap, load_pagemap

CASES = ["a_single", "b_tree", "d_shm", "e2_chain2/d2", "e2_chain2/d1", "f_lazy"]


@pytest.fixture(scope="module")
def oracle(criu: Criu, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The crit (and pycriu) of the CRIU version under test; ours runs with that version's pycriu too."""
    return crit_oracle_path(str(tmp_path_factory.mktemp("crit-oracle")), criu.binary)


def _jobs_for(directory: Path, out_dir: Path) -> list[dict]:
    jobs: list[dict] = [{"argv": ["x", str(directory), what]} for what in ("ps", "fds", "mems", "rss")]
    for img in sorted(directory.iterdir()):
        if not img.is_file():
            continue
        jobs.append({"argv": ["decode", "-i", str(img)]})
        jobs.append({"argv": ["show", str(img)]})  # = decode --pretty
        jobs.append({"argv": ["info", str(img)]})
        if img.name.startswith(("pagemap", "pstree", "core", "pages")):
            jobs.append({"argv": ["decode"], "stdin": str(img)})
            jobs.append({"argv": ["show", "--nopl", str(img)]})
    return jobs


def _compare(jobs: list[dict], oracle: str) -> None:
    ours = run_jobs("crit_pageread", jobs)
    theirs = run_jobs("crit", jobs, oracle)
    checked = 0
    for job, a, b in zip(jobs, ours, theirs, strict=True):
        if b["rc"] == 0:
            assert a["rc"] == 0, (job, a["err"])
            assert a["out"] == b["out"], f"output differs from crit for {job}"
            checked += 1
        else:
            # crit failed (e.g. decode of a raw pages file): we fail too, with one line, no traceback.
            assert a["rc"] != 0, job
            assert a["out"] == b["out"], job
            assert "Traceback" not in a["err"], (job, a["err"])
    assert checked > len(jobs) // 3  # a parent level (d1) has pagemaps only: its `x` fails in both


@pytest.mark.parametrize("case", CASES)
def test_crit_commands_byte_identical_on_fixtures(corpus: Corpus, oracle: str, tmp_path: Path,
                                                  case: str) -> None:
    _compare(_jobs_for(corpus.root / "cases" / case, tmp_path), oracle)


def test_decode_to_file_and_encode_round_trip_match_crit(corpus: Corpus, oracle: str, tmp_path: Path) -> None:
    case = corpus.root / "cases" / "b_tree"
    p0, p1, p2 = corpus.pids("b_tree")
    names = ["pstree.img", f"mm-{p0}.img", f"pagemap-{p1}.img", f"core-{p2}.img", "files.img"]
    jobs = []
    for who in ("ours", "crit"):
        for name in names:
            js = tmp_path / f"{who}-{name}.json"
            jobs.append({"argv": ["decode", "-i", str(case / name), "-o", str(js)], "who": who})
    ours = run_jobs("crit_pageread", [j for j in jobs if j["who"] == "ours"])
    theirs = run_jobs("crit", [j for j in jobs if j["who"] == "crit"], oracle)
    assert all(r["rc"] == 0 for r in ours + theirs)
    for name in names:
        assert (tmp_path / f"ours-{name}.json").read_bytes() == (tmp_path / f"crit-{name}.json").read_bytes()
    enc = []
    for who in ("ours", "crit"):
        for name in names:
            enc.append({"argv": ["encode", "-i", str(tmp_path / f"crit-{name}.json"),
                                 "-o", str(tmp_path / f"{who}-{name}.bin")]})
    assert all(r["rc"] == 0 for r in run_jobs("crit_pageread", enc[: len(names)]))
    assert all(r["rc"] == 0 for r in run_jobs("crit", enc[len(names) :], oracle))
    for name in names:
        ours_bin = (tmp_path / f"ours-{name}.bin").read_bytes()
        assert ours_bin == (tmp_path / f"crit-{name}.bin").read_bytes()
        assert ours_bin == (case / name).read_bytes()  # and both give the original image back
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary names left behind


def test_decode_of_criu_42_pagemap_shows_true_page_counts(corpus: Corpus, oracle: str, tmp_path: Path) -> None:
    """pycriu 4.1.1 shows nr_pages 0 for a 4.2-layout pagemap; we show the count crit shows for the 4.1 one.
    With pycriu 4.2.1 both layouts decode as crit 4.2.1 decodes them."""
    original = corpus.root / "cases" / "a_single" / f"pagemap-{corpus.pid('a_single')}.img"
    pm = load_pagemap(original, 4096)
    runs = [(e.vaddr, e.nr_pages, e.flags) for e in pm.entries]
    (tmp_path / "41").mkdir()
    (tmp_path / "42").mkdir()
    old, new = tmp_path / "41" / original.name, tmp_path / "42" / original.name
    old.write_bytes(encode_pagemap(pm.pages_id, runs, layout="4.1"))
    new.write_bytes(encode_pagemap(pm.pages_id, runs, layout="4.2"))
    jobs = [{"argv": ["decode", "-i", str(new)]}, {"argv": ["show", str(new)]},
            {"argv": ["decode", "-i", str(old)]}, {"argv": ["show", str(old)]}]
    ours = run_jobs("crit_pageread", jobs)
    theirs = run_jobs("crit", jobs, oracle)
    if corpus.version.startswith("4.1"):
        assert ours[0]["out"] == theirs[2]["out"]
        assert ours[1]["out"] == theirs[3]["out"]
        assert b'"nr_pages": 0' in theirs[0]["out"]  # what plain crit 4.1 shows for it
    else:
        assert [r["out"] for r in ours] == [r["out"] for r in theirs]
        assert b'"compat_nr_pages": 0' in theirs[0]["out"]
    assert all(r["rc"] == 0 for r in ours + theirs)


def _truth(shared: Path, case: str, name: str) -> dict[int, str]:
    lines = (shared / "truth" / case / name).read_text().split("\n")
    return {int(a, 16): h for a, h in (ln.split() for ln in lines if ln and not ln.startswith("TOTAL"))}


@pytest.mark.parametrize("fmt", ["hex", "base64"])
def test_decode_pages_embeds_each_entrys_true_bytes(corpus: Corpus, tmp_path: Path, fmt: str) -> None:
    import base64

    a, e2 = corpus.pid("a_single"), corpus.pid("e2_chain2")
    shm = next(p.name for p in (corpus.root / "truth" / "d_shm").glob("shmem-*.sha256") if p.name != "shmem-0.sha256")
    checks = [("a_single", f"pagemap-{a}.img", f"pid-{a}.sha256"),
              ("e2_chain2/d2", f"pagemap-{e2}.img", f"pid-{e2}.sha256"),
              ("d_shm", f"pagemap-{shm.replace('.sha256', '.img')}", shm)]
    jobs = [{"argv": ["decode", "--pages", "--pages-format", fmt, "-i",
                      str(corpus.root / "cases" / case / pm)]} for case, pm, _ in checks]
    results = run_jobs("crit_pageread", jobs)
    for (case, _, truth_name), res in zip(checks, results, strict=True):
        assert res["rc"] == 0, res["err"]
        truth = _truth(corpus.root, case.split("/")[0], truth_name)
        seen = 0
        for entry in json.loads(res["out"])["entries"][1:]:
            assert entry["pages"] is not None
            data = bytes.fromhex(entry["pages"]) if fmt == "hex" else base64.b64decode(entry["pages"])
            assert len(data) == entry["nr_pages"] * 4096
            for i in range(entry["nr_pages"]):
                addr = entry["vaddr"] + i * 4096
                if addr in truth:
                    assert hashlib.sha256(data[i * 4096 : (i + 1) * 4096]).hexdigest() == truth[addr], hex(addr)
                    seen += 1
        assert seen == len(truth)


def test_decode_pages_marks_lazy_entries_without_bytes(corpus: Corpus) -> None:
    pagemap = corpus.case("f_lazy") / f"pagemap-{corpus.pid('f_lazy')}.img"
    res = run_jobs("crit_pageread", [{"argv": ["decode", "--pages", "-i", str(pagemap)]}])[0]
    assert res["rc"] == 0, res["err"]
    entries = json.loads(res["out"])["entries"][1:]
    lazy = [e for e in entries if e["flags"] == 2]
    assert lazy and all(e["pages"] is None and e["pages_source"] == "lazy" for e in lazy)
    assert all(e["pages"] for e in entries if e["flags"] & 4)


def _oracle_counts(shared: Path, case: str, oracle: str) -> dict[int, list[tuple[int, int, dict[str, int]]]]:
    """Per pid, per VMA page counts computed from crit's own JSON of mm and pagemap images."""
    d = shared / "cases" / case
    pstree = json.loads(run_jobs("crit", [{"argv": ["decode", "-i", str(d / "pstree.img")]}], oracle)[0]["out"])
    pids = [p["pid"] for p in pstree["entries"]]
    jobs = []
    for pid in pids:
        jobs += [{"argv": ["decode", "-i", str(d / f"mm-{pid}.img")]},
                 {"argv": ["decode", "-i", str(d / f"pagemap-{pid}.img")]}]
    res = run_jobs("crit", jobs, oracle)
    out = {}
    for i, pid in enumerate(pids):
        vmas = json.loads(res[2 * i]["out"])["entries"][0]["vmas"]
        pms = json.loads(res[2 * i + 1]["out"])["entries"][1:]
        rows = []
        for v in vmas:
            c = {"present": 0, "parent": 0, "lazy": 0}
            for e in pms:
                for k in range(e["nr_pages"]):
                    a = e["vaddr"] + k * 4096
                    if v["start"] <= a < v["end"]:
                        key = "present" if e["flags"] & 4 else "parent" if e["flags"] & 1 else "lazy"
                        c[key] += 1
            c["not_dumped"] = (v["end"] - v["start"]) // 4096 - sum(c.values())
            rows.append((v["start"], v["end"], c))
        out[pid] = rows
    return out


@pytest.mark.parametrize("case", ["a_single", "e2_chain2/d2", "f_lazy"])
def test_x_pages_and_mems_pages_count_like_the_pagemap(corpus: Corpus, oracle: str, case: str) -> None:
    d = str(corpus.root / "cases" / case)
    expected = _oracle_counts(corpus.root, case, oracle)
    ours = run_jobs("crit_pageread", [{"argv": ["x", d, "pages"]}, {"argv": ["x", d, "mems", "--pages"]}])
    crit_mems = run_jobs("crit", [{"argv": ["x", d, "mems"]}], oracle)[0]["out"].decode().splitlines()
    assert ours[0]["rc"] == 0 and ours[1]["rc"] == 0, ours[0]["err"] + ours[1]["err"]
    rows = [ln.split() for ln in ours[0]["out"].decode().splitlines() if "-" in ln.split()[0] and ln.startswith("\t")]
    want = [(s, e, c) for pid in expected for s, e, c in expected[pid]]
    assert len(rows) == len(want)
    for row, (s, e, c) in zip(rows, want, strict=True):
        assert row[0] == f"{s:08x}-{e:08x}"
        assert [int(x) for x in row[2:6]] == [c["present"], c["parent"], c["lazy"], c["not_dumped"]]
    mems = ours[1]["out"].decode().splitlines()
    assert len(mems) == len(crit_mems)
    counted = [ln for ln in mems if "[present" in ln]
    assert len(counted) == len(want)
    for ours_line, crit_line in zip(mems, crit_mems, strict=True):
        assert ours_line.startswith(crit_line)  # crit's line, then our counts
    for line, (_, _, c) in zip(counted, want, strict=True):
        assert line.endswith(f"[present {c['present']}, parent {c['parent']}, lazy {c['lazy']}, "
                             f"not dumped {c['not_dumped']}]")


def test_x_accepts_a_checkpoint_archive(corpus: Corpus, oracle: str, tmp_path: Path) -> None:
    import tarfile

    src = corpus.root / "cases" / "b_tree"
    archive = tmp_path / "b_tree.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src, arcname="checkpoint")
    ours = run_jobs("crit_pageread", [{"argv": ["x", str(archive), w]} for w in ("ps", "mems")])
    theirs = run_jobs("crit", [{"argv": ["x", str(src), w]} for w in ("ps", "mems")], oracle)
    assert [r["out"] for r in ours] == [r["out"] for r in theirs]
    assert shutil.which("tar")
