"""`crit-pageread check`: a real CRIU dump passes; each kind of damage is one line of its kind, exit 1."""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path

import pytest
from hostile_support import (
    PAGE,
    Dump,
    copy_dump,
    dead_pid,
    entry_fields,
    make_dump,
    pagemap_path,
    pages_path,
    run_cli,
    write_pagemap_fields,
)

from crit_pageread.check import check_checkpoint
from crit_pageread.pagemap import PE_LAZY, PE_PARENT, PE_PRESENT, load_pagemap


@pytest.fixture(scope="module")
def small(criu_ok: None, tmp_path_factory: pytest.TempPathFactory) -> Dump:
    return make_dump(tmp_path_factory.mktemp("check"), "--shm")


def problems(images: Path) -> list[dict[str, str]]:
    proc = run_cli("check", str(images), "--json")
    found = [json.loads(line) for line in proc.stdout.splitlines()]
    summary = found.pop()
    assert summary["checkpoint"] == str(images) and "severity" not in summary
    bad = [p for p in found if p["severity"] != "note"]
    assert summary["ok"] is (not bad) and summary["errors"] == sum(p["severity"] == "error" for p in found)
    assert proc.returncode == (1 if bad else 0), (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    return found


def kinds(found: list[dict[str, str]]) -> set[str]:
    return {p["kind"] for p in found if p["severity"] != "note"}


def test_a_real_criu_dump_checks_out(small: Dump):
    proc = run_cli("check", str(small.images))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout == ""
    assert proc.stderr.startswith("OK: ") and "0 errors, 0 warnings" in proc.stderr


def test_a_real_dump_as_an_archive_checks_out_and_names_members(small: Dump, tmp_path: Path):
    archive = tmp_path / "ck.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(small.images, arcname="checkpoint")
    assert run_cli("check", str(archive)).returncode == 0
    broken = copy_dump(small, tmp_path / "broken")
    core = broken / f"core-{small.pid}.img"
    core.write_bytes(core.read_bytes()[:30])
    archive2 = tmp_path / "broken.tar"
    with tarfile.open(archive2, "w") as tar:
        tar.add(broken, arcname="checkpoint")
    found = problems(archive2)
    assert any(p["file"] == f"{archive2}: checkpoint/{core.name}" for p in found), found


def _edit(images: Path, pid: int, change) -> None:  # type: ignore[no-untyped-def]
    path = pagemap_path(images, pid)
    pages_id, entries = entry_fields(path)
    write_pagemap_fields(path, pages_id, change(entries))


def _present(entries: list[list[tuple[int, int]]]) -> int:
    return next(i for i, e in enumerate(entries) if dict(e)[4] & PE_PRESENT)


def test_each_kind_of_damage_is_reported_one_line_each(small: Dump, tmp_path: Path):
    # A dropped entry: the pages file is longer than the pagemap accounts for.
    d = copy_dump(small, tmp_path / "dropped")
    _edit(d, small.pid, lambda es: es[: _present(es)] + es[_present(es) + 1 :])
    assert "pagemap" in kinds(problems(d))
    # Unknown flag bits.
    d = copy_dump(small, tmp_path / "flags")

    def flags(es: list[list[tuple[int, int]]]) -> list[list[tuple[int, int]]]:
        e = dict(es[_present(es)])
        es[_present(es)] = [(1, e[1]), (2, e[2]), (4, e[4] | 0x80000000)]
        return es

    _edit(d, small.pid, flags)
    found = problems(d)
    assert any("unknown flag bits" in p["message"] for p in found), found
    # An entry outside every VMA, first in the pagemap (its page put first in the pages file: sizes match).
    d = copy_dump(small, tmp_path / "outside")
    assert load_pagemap(pagemap_path(d, small.pid), PAGE).entries[0].vaddr > 0x11000
    _edit(d, small.pid, lambda es: [[(1, 0x10000), (2, 1), (4, PE_PRESENT)], *es])
    pages = d / pages_path(small.images, small.pid).name
    pages.write_bytes(b"\0" * PAGE + pages.read_bytes())
    found = problems(d)
    assert kinds(found) == {"outside-vma"}, found
    assert "0x10000-0x11000" in next(p["message"] for p in found if p["kind"] == "outside-vma")
    # A parent reference without a parent.
    d = copy_dump(small, tmp_path / "noparent")
    pm = load_pagemap(pagemap_path(d, small.pid), PAGE)
    first = next(e for e in pm.entries if e.flags & PE_PRESENT)

    def to_parent(es: list[list[tuple[int, int]]]) -> list[list[tuple[int, int]]]:
        i = _present(es)
        e = dict(es[i])
        es[i] = [(1, e[1]), (2, e[2]), (4, PE_PARENT)]
        return es

    _edit(d, small.pid, to_parent)
    pages = d / pages_path(small.images, small.pid).name
    data = pages.read_bytes()
    pages.write_bytes(data[: first.offset] + data[first.offset + first.size :])
    found = problems(d)
    assert "chain" in kinds(found), found
    # A FIFO where an image should be, and a truncated core: both reported, no hang.
    d = copy_dump(small, tmp_path / "fifo")
    (d / f"fs-{small.pid}.img").unlink(missing_ok=True)
    os.mkfifo(d / f"fs-{small.pid}.img")
    core = d / f"core-{small.pid}.img"
    core.write_bytes(core.read_bytes()[:30])
    found = problems(d)
    files = {Path(p["file"]).name for p in found}
    assert f"fs-{small.pid}.img" in files and core.name in files, found


def test_lazy_pages_and_stale_temporary_files_are_listed_as_notes(small: Dump, tmp_path: Path):
    d = copy_dump(small, tmp_path / "lazy")
    pm = load_pagemap(pagemap_path(d, small.pid), PAGE)
    last = pm.entries[-1]
    assert last.flags & PE_PRESENT
    _edit(d, small.pid, lambda es: [*es[:-1], [(1, last.vaddr), (2, last.nr_pages), (4, PE_LAZY)]])
    pages = d / pages_path(small.images, small.pid).name
    os.truncate(pages, os.stat(pages).st_size - last.size)
    stale = d / f".crit-pageread-manifest.json.crit-pageread-{dead_pid()}.tmp"
    stale.write_bytes(b"{")
    found = problems(d)
    notes = {p["kind"]: p for p in found if p["severity"] == "note"}
    assert "lazy" in notes and f"{last.nr_pages} lazy pages" in notes["lazy"]["message"]
    assert "stale-temp" in notes and notes["stale-temp"]["file"] == str(stale)
    human = run_cli("check", str(d))
    assert human.returncode == 0 and all(line.startswith("note: ") for line in human.stdout.splitlines())


def test_library_check_never_raises_on_a_missing_directory(tmp_path: Path):
    report = check_checkpoint(tmp_path / "nothing")
    assert not report.ok and len(report.problems) == 1 and "no such image directory" in report.problems[0].message


def test_the_manifest_action_script_refuses_what_check_finds_before_criu_reads_it(small: Dump, tmp_path: Path):
    """pre-restore, no manifest (not required): the dump is still checked, and a dropped entry is refused."""
    import subprocess
    import sys

    from hostile_support import REPO

    def pre_restore(images: Path) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "CRTOOLS_SCRIPT_ACTION": "pre-restore", "CRTOOLS_IMAGE_DIR": str(images)}
        return subprocess.run([sys.executable, "-m", "crit_pageread.restore.manifest", "action"], env=env,
                              capture_output=True, text=True, cwd=REPO, timeout=120)

    good = copy_dump(small, tmp_path / "good")
    proc = pre_restore(good)
    assert proc.returncode == 0 and "checkpoint checked" in proc.stderr, proc.stderr
    bad = copy_dump(small, tmp_path / "bad")
    _edit(bad, small.pid, lambda es: es[: _present(es)] + es[_present(es) + 1 :])
    proc = pre_restore(bad)
    assert proc.returncode == 1 and "accounts for" in proc.stderr and len(proc.stderr.splitlines()) == 1, proc.stderr
