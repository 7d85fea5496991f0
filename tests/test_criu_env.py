"""Which criu and pycriu are used: chosen by the criu in use, old ones refused, provisioning idempotent.

The criu binaries are the real provisioned ones (tests/conftest.py's `criu`, CRIU 4.1.1 and 4.2.1);
each check runs in a fresh process, since pycriu is chosen once per process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import Criu
from pageserver_helpers import REPO

from crit_pageread import provision

CLI = [sys.executable, "-m", "crit_pageread"]


def _env(**more: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("CRIT_PAGEREAD_PYCRIU_PATH", "PYTHONPATH")}
    env.update(more)
    return env


def test_version_names_the_criu_in_use_and_its_own_pycriu(criu: Criu) -> None:
    proc = subprocess.run([*CLI, "--version"], capture_output=True, text=True, cwd=REPO,
                          env=_env(CRIT_PAGEREAD_CRIU=criu.binary), timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[1] == f"criu {criu.version} ({criu.binary})"
    assert lines[2].startswith(f"pycriu {criu.version} (") and lines[2].endswith("/pycriu)")
    # The pycriu named is the one loaded to decode images.
    code = "from crit_pageread.criu_env import pycriu; pycriu(); import pycriu.version as v; print(v.__version__)"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                            env=_env(CRIT_PAGEREAD_CRIU=criu.binary), timeout=60)
    assert loaded.stdout.strip() == criu.version, loaded.stderr


def test_pycriu_older_than_4_is_refused_in_one_line_naming_it_and_the_fix(criu: Criu, tmp_path: Path) -> None:
    """A pycriu 3.x (bookworm ships 3.17 inside its criu package) named explicitly is refused, not used."""
    old = tmp_path / "dist-packages" / "pycriu"
    old.mkdir(parents=True)
    (old / "__init__.py").write_text("from . import images\n")
    (old / "version.py").write_text("__version__ = '3.17'\n")
    proc = subprocess.run([*CLI, "decode"], capture_output=True, text=True, cwd=REPO, timeout=60,
                          stdin=subprocess.DEVNULL,
                          env=_env(CRIT_PAGEREAD_PYCRIU_PATH=str(old.parent), CRIT_PAGEREAD_CRIU=criu.binary))
    assert proc.returncode != 0
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert str(old) in proc.stderr and "3.17" in proc.stderr and "crit-pageread setup-criu" in proc.stderr


def test_setup_criu_is_quick_and_idempotent_on_rerun(criu: Criu) -> None:
    """`crit-pageread setup-criu` (the code `make setup` runs) keeps working wrappers and says what it has."""
    root = provision.root_dir(criu.line)
    before = root.stat().st_mtime_ns if root.exists() else None
    proc = subprocess.run([*CLI, "setup-criu", "--criu", criu.line, "--json"], capture_output=True, text=True,
                          cwd=REPO, env=_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr
    (got,) = [json.loads(line) for line in proc.stdout.splitlines()]
    assert got["criu"] == criu.binary and got["version"] == criu.version
    assert got["pycriu_version"] == criu.version and Path(got["pycriu"], "pycriu").is_dir()
    assert provision.read_manifest()[criu.line]["criu"] == criu.binary
    assert (root.stat().st_mtime_ns if root.exists() else None) == before  # nothing was unpacked again
