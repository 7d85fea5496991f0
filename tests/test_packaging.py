"""The installed package is complete: build the sdist and, from it, the wheel; install into a fresh venv.

Checks what a user of `pip install crit-pageread` gets: both console scripts work (the CRIU action
script among them), the license is declared the SPDX way and shipped, the example plugin installs from
the sdist and loads, and the sdist's own tests collect (the helpers are in it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from crit_pageread.testing import ImageBuilder, VmaSpec

REPO = Path(__file__).resolve().parent.parent
SITE = Path(pytest.__file__).resolve().parent.parent  # the dev venv's site-packages
#: What the fresh venv borrows from the dev venv instead of downloading: the runtime dependencies.
DEPS = ("pluggy", "google")

pytestmark = pytest.mark.slow


def run(*cmd: str | Path, cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    """Run `cmd` (by default from / so that no checkout is on sys.path); its output."""
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=cwd or "/", timeout=300,
                          env={**os.environ, **(env or {})})
    assert proc.returncode == 0, f"{cmd}: {proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """(sdist, wheel built from the sdist, build output) in a temporary directory."""
    out = tmp_path_factory.mktemp("dist")
    log = run(sys.executable, "-m", "build", "--no-isolation", "--outdir", out, REPO)
    (sdist,) = out.glob("crit_pageread-*.tar.gz")
    (wheel,) = out.glob("crit_pageread-*.whl")
    return sdist, wheel, log


@pytest.fixture(scope="module")
def fresh_venv(built: tuple[Path, Path, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new venv with only the wheel installed (its dependencies linked in from the dev venv)."""
    venv = tmp_path_factory.mktemp("venv") / "v"
    run(sys.executable, "-m", "venv", "--without-pip", venv)
    deps = venv.parent / "deps"
    deps.mkdir()
    for name in DEPS:
        (deps / name).symlink_to(SITE / name)
    (site,) = venv.glob("lib/python3*/site-packages")
    (site / "deps.pth").write_text(f"{deps}\n")
    run(sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install", "-q", "--no-deps",
        "--disable-pip-version-check", built[1])
    return venv


def test_build_declares_the_license_the_spdx_way_without_deprecation_warnings(built: tuple[Path, Path, str]) -> None:
    _sdist, wheel, log = built
    assert "license" not in "\n".join(line for line in log.splitlines() if "eprecat" in line).lower(), log
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        entry_points = z.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    assert "License-Expression: MIT" in meta
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert "crit_pageread/data/victim.c" in names and "crit_pageread/py.typed" in names
    # The native helper: built (a C compiler is here), with its type stub.
    assert "crit_pageread/_fastio.pyi" in names and any(n.startswith("crit_pageread/_fastio.") and n.endswith(".so")
                                                         for n in names), names
    assert "crit-pageread = crit_pageread.cli.main:run" in entry_points
    assert "crit-pageread-manifest = crit_pageread.restore.manifest:console" in entry_points


def test_installed_console_scripts_work_in_a_fresh_venv(fresh_venv: Path, tmp_path: Path) -> None:
    bin_ = fresh_venv / "bin"
    assert run(bin_ / "crit-pageread", "--version").startswith("crit-pageread ")
    plugins = [json.loads(line)["name"] for line in run(bin_ / "crit-pageread", "plugins", "--json").splitlines()]
    assert "crit_pageread.strategies.preadv" in plugins
    where = run(bin_ / "python", "-c", "import crit_pageread; print(crit_pageread.__file__)")
    assert where.startswith(str(fresh_venv)), where  # the wheel's copy, not the checkout's
    images = ImageBuilder(tmp_path / "img").process(10, vmas=[VmaSpec(0x10000, 0x12000)]) \
        .pagemap(10, [(0x10000, b"\x5a" * 8192)]).write()
    # As CRIU runs it at post-dump (the action), then by hand (pre-restore also checks the whole checkpoint,
    # which a synthetic directory is not).
    run(bin_ / "crit-pageread-manifest", env={"CRTOOLS_IMAGE_DIR": str(images), "CRTOOLS_SCRIPT_ACTION": "post-dump"})
    assert run(bin_ / "crit-pageread-manifest", "verify", images).strip() == f"{images}: OK"
    with open(next(images.glob("pages-*.img")), "r+b") as f:
        f.write(b"\x00")
    proc = subprocess.run([bin_ / "crit-pageread-manifest", "verify", images], capture_output=True, text=True,
                          cwd="/")
    assert proc.returncode == 1 and "corrupted" in proc.stderr


def test_example_plugin_installs_from_the_sdist_and_loads(built: tuple[Path, Path, str], fresh_venv: Path,
                                                          tmp_path: Path) -> None:
    with tarfile.open(built[0]) as tar:
        tar.extractall(tmp_path, filter="data")
    (root,) = tmp_path.glob("crit_pageread-*")
    plugin_dist = tmp_path / "plugin-dist"
    run(sys.executable, "-m", "build", "--no-isolation", "--wheel", "--outdir", plugin_dist,
        root / "hooks" / "example-plugin")
    (wheel,) = plugin_dist.glob("*.whl")
    run(sys.executable, "-m", "pip", "--python", fresh_venv / "bin" / "python", "install", "-q", "--no-deps",
        "--disable-pip-version-check", wheel)
    plugins = {json.loads(line)["name"]: json.loads(line)
               for line in run(fresh_venv / "bin" / "crit-pageread", "plugins", "--json").splitlines()}
    assert "counting" in plugins["example"]["strategies"]


def test_sdist_tests_collect_with_their_helpers(built: tuple[Path, Path, str], tmp_path: Path) -> None:
    with tarfile.open(built[0]) as tar:
        names = tar.getnames()
        tar.extractall(tmp_path, filter="data")
    (root,) = tmp_path.glob("crit_pageread-*")
    for helper in ("conftest.py", "chains.py", "criu_harness.py", "restore_support.py", "cli_driver.py"):
        assert (root / "tests" / helper).exists(), helper
    assert (root / "LICENSE").exists() and (root / "hooks" / "criu-action-manifest").exists()
    assert not [n for n in names if "__pycache__" in n or n.endswith((".pyc", ".so"))]
    assert (root / "crit_pageread" / "_fastio.c").exists()  # the native helper builds from the sdist
    ours = run(sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", cwd=REPO)
    theirs = run(sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", cwd=root)
    ids = [line for line in theirs.splitlines() if "::" in line]
    # ../shared/fixtures (an extra cross-check) may lie beside the checkout, never beside the sdist.
    assert ids and ids == [line for line in ours.splitlines() if "::" in line and "[shared-fixtures" not in line]
    assert " error" not in theirs.lower()
