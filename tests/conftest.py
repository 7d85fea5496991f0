"""Shared fixtures: a CRIU gate (fails under CI=true, skips elsewhere), the victim, fixture paths."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

from criu_harness import build_victim  # noqa: E402

SHARED_FIXTURES = HERE.parent.parent / "shared" / "fixtures"


def _criu_problem() -> str | None:
    if os.geteuid() != 0:
        return "CRIU tests need root"
    try:
        from crit_pageread.criu_env import criu_binary, pycriu

        pycriu()
        criu = criu_binary()
    except Exception as exc:
        return str(exc)
    proc = subprocess.run([criu, "check"], capture_output=True, text=True)
    if proc.returncode != 0:
        return f"criu check failed: {proc.stderr.strip()[-300:]}"
    if not shutil.which("gcc"):
        return "gcc is needed to build the victim program"
    return None


@pytest.fixture(scope="session")
def criu_ok() -> None:
    """Gate for tests that need real CRIU: under CI=true a missing CRIU fails them."""
    problem = _criu_problem()
    if problem:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CRIU is required under CI=true: {problem}")
        pytest.skip(f"no usable CRIU: {problem}")


@pytest.fixture(scope="session")
def victim_exe(criu_ok: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_victim(tmp_path_factory.mktemp("victim-bin"))


PIPE_MAX = 4194304


@pytest.fixture(scope="session")
def pipe_max_size() -> Iterator[None]:
    """CRIU's lazy GETs past 64 KiB need fs.pipe-max-size=4194304; the old value is put back after."""
    path = Path("/proc/sys/fs/pipe-max-size")
    old = path.read_text().strip()
    if int(old) < PIPE_MAX:
        path.write_text(str(PIPE_MAX))
    try:
        yield
    finally:
        path.write_text(old)


@pytest.fixture(scope="session")
def shared_fixtures() -> Path:
    """../shared/fixtures beside the checkout (real CRIU 4.1.1 checkpoints with truth)."""
    if not (SHARED_FIXTURES / "cases").is_dir():
        if os.environ.get("CI") == "true":
            pytest.fail(f"shared fixtures missing at {SHARED_FIXTURES}")
        pytest.skip("shared fixtures not found")
    return SHARED_FIXTURES
