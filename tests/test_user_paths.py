"""Paths as a user types them: relative to the shell's directory, through real CRIU.

CRIU works from inside the image directory, so a relative pidfile, action script or log would
resolve there; these run `crit-pageread restore` from the directory that holds `images/`, as the
README does. Oracle: CRIU restores the tasks (their state in /proc) and aborts on the script's refusal.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from criu_harness import Victim, run_criu, start_victim
from restore_support import REPO, kill_tree

from crit_pageread.pagemap import load_pagemap
from crit_pageread.restore.manifest import MANIFEST

PAGE = 4096


@pytest.fixture(scope="module")
def work(victim_exe: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Victim, Path]]:
    """A directory with `images/` (dumped with the action script given as a bare name on PATH) and `hooks/`."""
    work = tmp_path_factory.mktemp("paths")
    (work / "hooks").symlink_to(REPO / "hooks")
    victim = start_victim(victim_exe, work / "run", "--seed", "5", "--mib", "2")
    try:
        # CRIU execs a bare name through PATH: the installed console script works from any directory.
        (work / "images").mkdir()
        run_criu(["dump", "-t", str(victim.pid), "-D", "images", "-o", "dump.log", "-v4",
                  "--action-script", "crit-pageread-manifest"], env=_env(), cwd=work, log=work / "images" / "dump.log")
        victim.reap()
        yield victim, work
    finally:
        victim.kill()


def _env() -> dict[str, str]:
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}"}


def cli(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "crit_pageread", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=180, env=_env())


def _stopped(pid: int) -> bool:
    return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0] in ("T", "t")


def test_the_dump_ran_the_console_action_script_from_path(work: tuple[Victim, Path]) -> None:
    victim, d = work
    manifest = json.loads((d / "images" / MANIFEST).read_text())
    assert f"pid {victim.pid}" in manifest["pages"]


@pytest.mark.parametrize("extra", [[], ["--lazy"], ["--action-script", "hooks/criu-action-manifest"],
                                   ["--lazy", "--pages-dir", "images"]])
def test_restore_from_a_relative_images_directory_works(work: tuple[Victim, Path], extra: list[str]) -> None:
    victim, d = work
    proc = cli(d, "restore", "images", "--leave-stopped", "--cpus", "0", "--json", *extra)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    try:
        assert result["pid"] == victim.pid and result["checkpoint"] == "images" and _stopped(result["pid"])
    finally:
        kill_tree(result["pid"])
    assert not list((d / "images").glob(".crit-pageread-restore.*.pid"))


def test_a_relative_log_file_lands_where_the_user_said(work: tuple[Victim, Path]) -> None:
    _victim, d = work
    from crit_pageread.restore.pipeline import restore

    (d / "logs").mkdir(exist_ok=True)
    cwd = os.getcwd()
    os.chdir(d)
    try:
        result = restore("images", leave_stopped=True, cpus={0}, log_file="logs/restore.log")
    finally:
        os.chdir(cwd)
    kill_tree(result.pid)
    assert (d / "logs" / "restore.log").stat().st_size > 0 and result.log == str(d / "logs" / "restore.log")


def test_a_refused_restore_leads_with_the_scripts_complaint(work: tuple[Victim, Path]) -> None:
    victim, d = work
    bad = d / "bad"
    shutil.copytree(d / "images", bad, symlinks=True)
    pm = load_pagemap(bad / f"pagemap-{victim.pid}.img", PAGE)
    entry = max(pm.entries, key=lambda e: e.size)
    with open(pm.pages_path, "r+b") as f:
        f.seek(entry.offset + 2 * PAGE + 7)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x40]))
    proc = cli(d, "restore", "bad", "--leave-stopped", "--cpus", "0", "--action-script", "hooks/criu-action-manifest")
    assert proc.returncode != 0 and proc.stderr.count("\n") == 1, proc.stderr
    cause = proc.stderr.split("criu restore failed", 1)[1].split(": ", 1)[1]
    assert cause.startswith("criu-action-manifest: pre-restore:"), proc.stderr
    assert pm.pages_path.name in cause and "corrupted" in cause and "RLIMIT" not in proc.stderr
    assert not os.path.exists(f"/proc/{victim.pid}") or not _stopped(victim.pid)


def test_a_failed_restore_leads_with_criu_s_first_real_error(work: tuple[Victim, Path]) -> None:
    _victim, d = work
    first = cli(d, "restore", "images", "--leave-stopped", "--cpus", "0", "--json")
    assert first.returncode == 0, first.stderr
    try:
        again = cli(d, "restore", "images", "--leave-stopped", "--cpus", "0")  # its pid is taken now
    finally:
        kill_tree(json.loads(first.stdout)["pid"])
    assert again.returncode != 0 and again.stderr.count("\n") == 1, again.stderr
    cause = again.stderr.split("criu restore failed", 1)[1].split(": ", 1)[1]
    log = (d / "images" / "restore.log").read_text()
    errors = [line.split(") ", 1)[1] for line in log.splitlines() if "Error (" in line and "RLIMIT" not in line]
    assert "RLIMIT" not in again.stderr  # CRIU logs RLIMIT warnings as errors here: never the cause
    assert cause.startswith(errors[0]), (cause, errors[:3])


def test_swrk_refuses_a_log_file_in_another_directory_in_one_line(work: tuple[Victim, Path]) -> None:
    from crit_pageread.errors import ConfigError
    from crit_pageread.restore.pipeline import restore

    _victim, d = work
    with pytest.raises(ConfigError, match="must be a bare name"):
        restore(d / "images", method="swrk", log_file="logs/restore.log")
