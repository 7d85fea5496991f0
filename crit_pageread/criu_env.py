"""Find pycriu, crit and the criu binary where distributions and our set-up put them.

pycriu is not on PyPI: it ships with the distribution's CRIU packages
(`python3-pycriu`). We import it from the interpreter's path if it is there,
else from the usual system locations or a CRIU root provisioned by
`scripts/setup.sh` (Debian trixie, unpacked under the user's cache dir). Only
the `pycriu` and `crit` packages are loaded from such a directory, never the
system's protobuf: the virtual environment's protobuf stays in charge.
"""

from __future__ import annotations

import glob
import importlib
import importlib.util
import os
import shutil
import sys
from pathlib import Path
from types import ModuleType

from .errors import CriuNotFoundError

HOW_TO_GET = (
    "pycriu not found: install your distribution's python3-pycriu (Debian/Ubuntu: "
    "apt-get install python3-pycriu; Fedora: dnf install python3-criu), or run "
    "scripts/setup.sh, or set CRIT_PAGEREAD_PYCRIU_PATH to the directory that holds pycriu/"
)


def cache_dir() -> Path:
    """The per-user cache that holds a provisioned CRIU root."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "crit-pageread"


def provisioned_root() -> Path:
    """Where scripts/setup.sh unpacks Debian trixie's CRIU when the system has none."""
    return Path(os.environ.get("CRIT_PAGEREAD_CRIU_ROOT") or cache_dir() / "criu-root")


def _candidate_dirs() -> list[Path]:
    dirs: list[Path] = []
    env = os.environ.get("CRIT_PAGEREAD_PYCRIU_PATH")
    if env:
        dirs.extend(Path(p) for p in env.split(os.pathsep) if p)
    roots = [Path("/"), provisioned_root()]
    patterns = [
        "usr/lib/python3/dist-packages",
        "usr/lib/python3*/site-packages",
        "usr/lib64/python3*/site-packages",
        "usr/local/lib/python3*/dist-packages",
        "usr/local/lib/python3*/site-packages",
    ]
    for root in roots:
        for pattern in patterns:
            dirs.extend(Path(p) for p in sorted(glob.glob(str(root / pattern))))
    return dirs


def _load_package(name: str, directory: Path) -> ModuleType:
    init = directory / name / "__init__.py"
    spec = importlib.util.spec_from_file_location(
        name, init, submodule_search_locations=[str(directory / name)]
    )
    if spec is None or spec.loader is None:  # pragma: no cover - spec of a real file
        raise ImportError(name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def import_system_package(name: str) -> ModuleType:
    """Import `pycriu` or `crit` from sys.path, else from where distributions install it."""
    if name in sys.modules:
        return sys.modules[name]
    try:
        return importlib.import_module(name)
    except ImportError:
        pass
    errors = []
    for directory in _candidate_dirs():
        if (directory / name / "__init__.py").is_file():
            try:
                return _load_package(name, directory)
            except Exception as exc:  # a broken copy: say which one
                errors.append(f"{directory / name}: {type(exc).__name__}: {exc}")
    if errors:
        raise CriuNotFoundError(f"cannot import {name}: " + "; ".join(errors))
    if name == "pycriu":
        raise CriuNotFoundError(HOW_TO_GET)
    raise CriuNotFoundError(f"{name} not found (it ships with pycriu): " + HOW_TO_GET)


def pycriu() -> ModuleType:
    """The pycriu package (images, magic, pb), found as the module docstring says."""
    return import_system_package("pycriu")


def criu_binary(configured: str | None = None) -> str:
    """Path of a criu executable: config/env, the provisioned wrapper, else PATH."""
    for candidate in (
        configured,
        os.environ.get("CRIT_PAGEREAD_CRIU"),
        str(cache_dir() / "bin" / "criu"),
    ):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which("criu")
    if found:
        return found
    raise CriuNotFoundError(
        "criu not found: install CRIU >= 4 or run scripts/setup.sh (set CRIT_PAGEREAD_CRIU to a criu binary)"
    )
