"""The Python restore pipeline: real CRIU (binary, swrk, lazy from our page server) with hooks around it.

Oracles: the victim checks its own memory pattern after the restore
(SIGUSR1 -> OK/BAD); /proc/PID/mem of the stopped restored task against a
plain `criu restore --leave-stopped` of the same images.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Criu
from criu_harness import Restored, Victim, dump, start_victim
from restore_support import kill_tree, restored_memory, run_cli, wait_check

from crit_pageread import ConfigError, hookimpl, load_config
from crit_pageread.plugins import get_plugin_manager
from crit_pageread.restore.pipeline import RestoreError, restore


class Recorder:
    """A plugin that records every restore hook call (and can change options)."""

    def __init__(self, change: dict[str, Any] | None = None) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.served = 0
        self.change = change or {}

    @hookimpl
    def crit_pageread_before_restore(self, images_dir: str, options: dict[str, Any]) -> None:
        self.calls.append(("before", dict(options)))
        options.update(self.change)

    @hookimpl
    def crit_pageread_after_restore(self, images_dir: str, pid: int) -> None:
        self.calls.append(("after", pid))

    @hookimpl
    def crit_pageread_restore_failed(self, images_dir: str, error: BaseException) -> None:
        self.calls.append(("failed", error))

    @hookimpl
    def crit_pageread_pages_served(self, images: Any, pid: int, vaddr: int, nr_pages: int, peer: str) -> None:
        self.served += nr_pages


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    rec = Recorder()
    pm = get_plugin_manager()
    pm.register(rec, name="test-recorder")
    try:
        yield rec
    finally:
        pm.unregister(rec)


@pytest.fixture(scope="module")
def dumped(criu: Criu, victim_exe: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Victim, Path]]:
    work = tmp_path_factory.mktemp("pipeline")
    victim = start_victim(victim_exe, work / "run", "--threads", "2", "--mib", "4", "--seed", "13")
    try:
        dump(victim, work / "dump")
        yield victim, work / "dump"
    finally:
        victim.kill()


def _check(victim: Victim, pid: int) -> str:
    check = Path(f"{victim.info_path}.check")
    check.unlink(missing_ok=True)
    try:
        return wait_check(pid, check)
    finally:
        kill_tree(pid)


@pytest.mark.parametrize("method", ["binary", "swrk"])
def test_pipeline_restores_a_program_that_checks_out_and_fires_before_and_after(
    dumped: tuple[Victim, Path], recorder: Recorder, method: str
):
    victim, images = dumped
    result = restore(images, method=method, cpus={0})
    assert result.pid == victim.pid and result.method == method and not result.lazy
    assert [c[0] for c in recorder.calls] == ["before", "after"]
    assert recorder.calls[0][1]["method"] == method and recorder.calls[1][1] == result.pid
    assert _check(victim, result.pid) == "OK"


def test_lazy_pipeline_restores_post_copy_from_our_page_server(dumped: tuple[Victim, Path], recorder: Recorder):
    victim, images = dumped
    pages = [p for r in victim.regions for p in range(r.start, r.start + r.len, 4096)]
    truth = restored_memory(images, victim.pid, pages)
    result = restore(images, lazy=True, leave_stopped=True, cpus={0})
    try:
        assert result.lazy and result.pages_served > 1000  # the 4 MiB of bulk memory came over the socket
        assert recorder.served == result.pages_served
        restored = Restored(result.pid)
        got = {p: restored.read(victim.pid, p, 4096) for p in pages}
    finally:
        kill_tree(result.pid)
    assert got == truth
    assert [c[0] for c in recorder.calls] == ["before", "after"]
    assert not (images / "lazy-pages.socket").exists()


def test_before_restore_hook_can_change_the_options(dumped: tuple[Victim, Path]):
    _victim, images = dumped
    rec = Recorder(change={"leave_stopped": True})
    get_plugin_manager().register(rec, name="test-changer")
    try:
        result = restore(images, cpus={0})
    finally:
        get_plugin_manager().unregister(rec)
    try:
        assert result.leave_stopped
        state = Path(f"/proc/{result.pid}/status").read_text().split("State:")[1].split()[0]
        assert state in ("T", "t")  # stopped, as the hook asked
    finally:
        kill_tree(result.pid)


def test_failed_restore_fires_restore_failed_and_raises_a_one_line_error(
    dumped: tuple[Victim, Path], recorder: Recorder, tmp_path: Path
):
    _victim, images = dumped
    first = restore(images, cpus={0})  # the pid is taken now: a second restore cannot get it
    try:
        with pytest.raises(RestoreError) as info:
            restore(images)
    finally:
        kill_tree(first.pid)
    assert "criu restore failed" in str(info.value) and "\n" not in str(info.value)
    assert [c[0] for c in recorder.calls] == ["before", "after", "before", "failed"]
    assert recorder.calls[-1][1] is info.value


def test_restore_settings_come_from_the_config_and_bad_ones_are_named(
    dumped: tuple[Victim, Path], recorder: Recorder
):
    _victim, images = dumped
    with pytest.raises(ConfigError, match=r"\[restore\]: key 'method'"):
        restore(images, config=load_config(overrides={"restore": {"method": "telepathy"}}))
    with pytest.raises(ConfigError, match=r"\[restore\]: unknown key 'colour'"):
        restore(images, config=load_config(overrides={"restore": {"colour": "blue"}}))
    result = restore(images, config=load_config(overrides={"restore": {"leave_stopped": True, "cpus": [0]}}))
    try:
        assert result.leave_stopped and recorder.calls[0][1]["cpus"] == {0}
    finally:
        kill_tree(result.pid)


def test_restore_command_prints_the_pid_as_json(dumped: tuple[Victim, Path]):
    victim, images = dumped
    proc = run_cli("restore", str(images), "--cpus", "0", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    try:
        assert out["pid"] == victim.pid and out["method"] == "binary"
    finally:
        kill_tree(out["pid"])
    bad = run_cli("restore", str(images / "nope"))
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "no such image directory" in bad.stderr
