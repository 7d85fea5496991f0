"""hooks/: the CRIU action script that guards dumps with a page-checksum manifest, and the example plugin.

Oracles: CRIU itself (it runs the script at post-dump and pre-restore and
aborts the restore on a non-zero exit); the victim's own memory check; the
shared fixture's truth hashes for what the example plugin's strategy reads.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from chains import make_chain
from conftest import Criu
from corpus import Corpus
from criu_harness import Victim, dump, restore_stopped, start_victim
from restore_support import REPO, kill_tree, run_cli, self_check

from crit_pageread.pagemap import load_pagemap
from crit_pageread.restore.manifest import MANIFEST

SCRIPT = REPO / "hooks" / "criu-action-manifest"
PAGE = 4096


@pytest.fixture(scope="module")
def guarded(criu: Criu, victim_exe: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Victim, Path]]:
    """A dump made with the action script: it has a manifest."""
    work = tmp_path_factory.mktemp("hooks")
    victim = start_victim(victim_exe, work / "run", "--seed", "17", "--mib", "1")
    try:
        dump(victim, work / "dump", "--action-script", str(SCRIPT))
        yield victim, work / "dump"
    finally:
        victim.kill()


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def _restore_with_script(images: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    from crit_pageread.criu_env import criu_binary

    return subprocess.run(
        [criu_binary(), "restore", "-D", str(images), "-o", "restore.log", "-v4", "--restore-detached",
         "--leave-stopped", "--pidfile", str(images / "r.pid"), "--action-script", str(SCRIPT)],
        capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})},
        preexec_fn=lambda: os.sched_setaffinity(0, {0}),
    )


def _refused(images: Path, proc: subprocess.CompletedProcess[str]) -> str:
    """The script's complaint, after checking CRIU aborted because of it and restored nothing."""
    log = (images / "restore.log").read_text()
    assert proc.returncode != 0 and not (images / "r.pid").exists()
    assert "Aborting restore due to pre-restore script" in log
    return next(line for line in log.splitlines() if line.startswith("criu-action-manifest: pre-restore"))


def test_post_dump_writes_a_manifest_and_a_clean_dump_restores_through_the_script(guarded: tuple[Victim, Path]):
    victim, images = guarded
    manifest = json.loads((images / MANIFEST).read_text())
    pm = load_pagemap(images / f"pagemap-{victim.pid}.img", PAGE)
    assert sum(r[1] for r in manifest["pages"][f"pid {victim.pid}"]["runs"]) * PAGE == pm.present_bytes
    assert f"core-{victim.pid}.img" in manifest["files"]
    with restore_stopped(images, "--action-script", str(SCRIPT)) as r:
        assert r.pids[victim.pid]
    assert "1 image directories verified" in (images / "restore.log").read_text()


def test_pre_restore_refuses_a_dump_with_one_flipped_byte_in_a_pages_file(guarded: tuple[Victim, Path], tmp_path: Path):
    victim, good = guarded
    images = _copy(good, tmp_path / "bad")
    pm = load_pagemap(images / f"pagemap-{victim.pid}.img", PAGE)
    entry = max(pm.entries, key=lambda e: e.size)
    _flip(pm.pages_path, entry.offset + 5 * PAGE + 123)
    line = _refused(images, _restore_with_script(images))
    assert pm.pages_path.name in line and f"pid {victim.pid}" in line and "corrupted" in line
    bad_page = entry.vaddr + 5 * PAGE
    assert any(int(a, 16) <= bad_page < int(b, 16) for a, b in
               [part.split("-") for part in line.split() if part.startswith("0x") and "-" in part])
    # without the script CRIU restores the damaged memory, and only the program itself notices
    (images / MANIFEST).unlink()
    assert self_check(images, victim).startswith("BAD")


def test_pre_restore_refuses_a_changed_image_and_a_damaged_parent(guarded: tuple[Victim, Path], tmp_path: Path):
    victim, good = guarded
    images = _copy(good, tmp_path / "core")
    core = images / f"core-{victim.pid}.img"
    _flip(core, core.stat().st_size - 3)
    assert core.name in _refused(images, _restore_with_script(images))
    # a chain: each level has its own manifest; a flipped byte in the parent's pages is caught too
    src = _copy(good, tmp_path / "plain")
    (src / MANIFEST).unlink()
    top = make_chain(src, tmp_path / "chain", 2, seed=2)
    for level in (tmp_path / "chain" / "d1", top):
        subprocess.run([sys.executable, "-m", "crit_pageread.restore.manifest", "write", str(level)], check=True,
                       cwd=REPO, capture_output=True)
    assert _restore_with_script(top).returncode == 0
    kill_tree(int((top / "r.pid").read_text()))
    (top / "r.pid").unlink()
    parent_pages = load_pagemap(tmp_path / "chain" / "d1" / f"pagemap-{victim.pid}.img", PAGE).pages_path
    _flip(parent_pages, 100)
    assert "d1" in _refused(top, _restore_with_script(top))


def test_dump_without_manifest_restores_unless_a_manifest_is_required(guarded: tuple[Victim, Path], tmp_path: Path):
    _victim, good = guarded
    images = _copy(good, tmp_path / "none")
    (images / MANIFEST).unlink()
    required = _restore_with_script(images, {"CRIT_PAGEREAD_MANIFEST_REQUIRED": "1"})
    assert "no manifest" in _refused(images, required)
    proc = _restore_with_script(images)
    assert proc.returncode == 0
    kill_tree(int((images / "r.pid").read_text()))


# --- the example plugin ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def example_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """hooks/example-plugin pip-installed (from a copy, so the checkout gets no build/) into its own
    site directory; subprocesses get it on PYTHONPATH, so other tests never load it."""
    work = tmp_path_factory.mktemp("example-plugin")
    src = shutil.copytree(REPO / "hooks" / "example-plugin", work / "src")
    site = work / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
         "--target", str(site), str(src)], capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return site


def _with_plugin(site: Path, **more: str) -> dict[str, str]:
    return {"PYTHONPATH": str(site), **more}


def test_example_plugin_is_loaded_from_its_entry_point(example_site: Path):
    proc = run_cli("plugins", "--json", env=_with_plugin(example_site))
    assert proc.returncode == 0, proc.stderr
    plugins = {p["name"]: p for p in map(json.loads, proc.stdout.splitlines())}
    assert plugins["example"]["strategies"] == ["counting"]
    assert "crit_pageread_pages_served" in plugins["example"]["hooks"]
    assert "example" not in {p["name"] for p in map(json.loads, run_cli("plugins", "--json").stdout.splitlines())}


def test_example_strategy_reads_the_truth_and_its_observer_logs_each_read(
    example_site: Path, corpus41: Corpus, tmp_path: Path
):
    truth_file = next((corpus41.root / "truth" / "a_single").glob("pid-*.sha256"))
    pid = int(truth_file.stem.split("-")[1])
    addr, digest = truth_file.read_text().splitlines()[3].split()
    config = tmp_path / "c.toml"
    report, log = tmp_path / "count.json", tmp_path / "reads.log"
    config.write_text(f'[counting]\ninner = "pread"\nreport = "{report}"\n[example]\nlog = "{log}"\n')
    out = tmp_path / "page.bin"
    proc = run_cli("read", str(corpus41.root / "cases" / "a_single"), addr, str(PAGE), "--pid", str(pid),
                   "--strategy", "counting", "--config", str(config), "-o", str(out), env=_with_plugin(example_site))
    assert proc.returncode == 0, proc.stderr
    assert hashlib.sha256(out.read_bytes()).hexdigest() == digest
    assert [json.loads(line) for line in report.read_text().splitlines()] == [{"requests": 1, "bytes": PAGE}]
    assert log.read_text() == f"read pid {pid} {int(addr, 16):#x} {PAGE}\n"


def test_example_plugin_sees_a_lazy_restore_and_the_pages_served(
    example_site: Path, guarded: tuple[Victim, Path], tmp_path: Path
):
    victim, good = guarded
    images = _copy(good, tmp_path / "lazy")
    log = tmp_path / "events.log"
    proc = run_cli("restore", str(images), "--lazy", "--leave-stopped", "--cpus", "0", "--json",
                   env=_with_plugin(example_site, CRIT_PAGEREAD_EXAMPLE__LOG=str(log)))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    kill_tree(result["pid"])
    lines = log.read_text().splitlines()
    assert lines[0] == f"before-restore {images} lazy=True"
    assert lines[-1] == f"after-restore {images} {result['pid']}"
    served = [line.split() for line in lines if line.startswith("served ")]
    assert served and all(int(s[1]) == victim.pid for s in served)
    assert sum(int(s[3]) for s in served) == result["pages_served"] > 256  # the 1 MiB of bulk memory
