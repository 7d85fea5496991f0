"""Find pycriu, crit and the criu binary where distributions and our set-up put them.

pycriu is not on PyPI: it ships with the distribution's CRIU packages, and
`crit-pageread setup-criu` (`make setup`) unpacks Debian's CRIU 4.1 and 4.2
with their pycriu under the user's cache dir. The pycriu used is chosen, in
this order: CRIT_PAGEREAD_PYCRIU_PATH; the one recorded with (or beside) the
criu in use (CRIT_PAGEREAD_CRIU, else the provisioned default wrapper); one
importable from sys.path; the provisioned roots; the system's locations. A
pycriu older than 4 is skipped, and refused in one line when it is all there
is. Only the `pycriu` and `crit` packages are loaded from such a directory,
never the system's protobuf: the virtual environment's protobuf stays in
charge.
"""

from __future__ import annotations

import os
import sys

from . import TYPE_CHECKING, provision
from .errors import CriuNotFoundError

if TYPE_CHECKING:  # pathlib, glob, importlib.util and shutil are imported where used: not for `--version`
    from collections.abc import Iterator
    from pathlib import Path
    from types import ModuleType

SETUP_HINT = "run `crit-pageread setup-criu` (it provisions CRIU and a matching pycriu)"
HOW_TO_GET = (
    f"pycriu not found: {SETUP_HINT}, or install your distribution's pycriu >= 4 "
    "(Fedora: dnf install python3-criu; Debian trixie or newer: apt-get install python3-pycriu), "
    "or set CRIT_PAGEREAD_PYCRIU_PATH to the directory that holds pycriu/"
)
MIN_PYCRIU = 4

#: The directory the loaded pycriu (and crit) came from, once chosen.
_chosen: dict[str, str] = {}


def _path(text: str) -> Path:
    from pathlib import Path

    return Path(text)


def cache_dir() -> Path:
    """The per-user cache that holds provisioned CRIU roots."""
    return provision.cache_dir()


def provisioned_root() -> Path:
    """Where Debian trixie's CRIU (4.1) is unpacked when the system has none."""
    return provision.root_dir(provision.DEFAULT_LINE)


def criu_in_use() -> str | None:
    """The criu binary commands run unless configured otherwise (CRIT_PAGEREAD_CRIU, the wrapper, PATH)."""
    try:
        return criu_binary()
    except CriuNotFoundError:
        return None


def pycriu_dir_of(criu: str) -> Path | None:
    """The pycriu directory recorded with (or lying beside) a criu binary or wrapper."""
    found = _pycriu_dir_of(criu)
    return _path(found) if found is not None else None


def _pycriu_dir_of(criu: str) -> str | None:
    real = os.path.realpath(criu)
    for entry in provision.read_manifest().values():
        if entry.get("pycriu") and os.path.realpath(str(entry.get("criu"))) == real:
            return str(entry["pycriu"])
    bindir, name = os.path.split(real)
    usr, bin_name = os.path.split(bindir)
    if name == "criu" and bin_name in ("sbin", "bin") and os.path.basename(usr) == "usr":
        return os.path.join(usr, "lib", "python3", "dist-packages")
    return None


def _system_dirs() -> list[str]:
    import glob

    dirs: list[str] = []
    patterns = [
        "usr/lib/python3/dist-packages",
        "usr/lib/python3*/site-packages",
        "usr/lib64/python3*/site-packages",
        "usr/local/lib/python3*/dist-packages",
        "usr/local/lib/python3*/site-packages",
    ]
    for pattern in patterns:
        dirs.extend(sorted(glob.glob("/" + pattern)))
    return dirs


def _candidate_dirs() -> Iterator[tuple[str, str]]:
    """(directory, why) in the order of the module docstring; each found only when the ones before fail
    (the usual first, beside the criu in use, costs no import)."""
    env = os.environ.get("CRIT_PAGEREAD_PYCRIU_PATH")
    if env:
        yield from ((p, "CRIT_PAGEREAD_PYCRIU_PATH") for p in env.split(os.pathsep) if p)
    criu = criu_in_use()
    if criu:
        own = _pycriu_dir_of(criu)
        if own is not None:
            yield own, f"beside {criu}"
    import importlib.util

    with_spec = importlib.util.find_spec("pycriu") if "pycriu" not in sys.modules else None
    if with_spec is not None and with_spec.origin:
        yield os.path.dirname(os.path.dirname(with_spec.origin)), "sys.path"
    for line in provision.LINES:
        yield str(provision.root_dir(line) / "usr/lib/python3/dist-packages"), "provisioned"
    yield from ((d, "system") for d in _system_dirs())


def _major(version: str | None) -> int:
    try:
        return int((version or "").split(".")[0])
    except ValueError:
        return 0


def choose_pycriu_dir() -> Path:
    """The directory whose pycriu/ is (or will be) loaded; CriuNotFoundError if none fits."""
    return _path(_choose_pycriu_dir())


def _choose_pycriu_dir() -> str:
    if "pycriu" in _chosen:
        return _chosen["pycriu"]
    too_old: list[str] = []
    for directory, why in _candidate_dirs():
        version = provision.pycriu_version(directory)
        if version is None:
            continue
        package = os.path.join(directory, "pycriu")
        if _major(version) < MIN_PYCRIU:
            if why == "CRIT_PAGEREAD_PYCRIU_PATH":
                raise CriuNotFoundError(
                    f"{package}: pycriu {version} is too old (need >= {MIN_PYCRIU}): "
                    f"{SETUP_HINT} and unset CRIT_PAGEREAD_PYCRIU_PATH"
                )
            too_old.append(f"{package} ({version})")
            continue
        _chosen["pycriu"] = directory
        return directory
    if too_old:
        raise CriuNotFoundError(
            f"pycriu too old (need >= {MIN_PYCRIU}): {', '.join(too_old)}: {SETUP_HINT}"
        )
    raise CriuNotFoundError(HOW_TO_GET)


def _load_package(name: str, directory: Path) -> ModuleType:
    import importlib.util

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
    """Import `pycriu` or `crit` from the directory `choose_pycriu_dir` picks."""
    if name in sys.modules:
        return sys.modules[name]
    directory = choose_pycriu_dir()
    if not (directory / name / "__init__.py").is_file():
        raise CriuNotFoundError(f"{name} not found beside {directory / 'pycriu'} (it ships with pycriu): {SETUP_HINT}")
    try:
        return _load_package(name, directory)
    except Exception as exc:  # a broken copy: say which one
        raise CriuNotFoundError(f"cannot import {directory / name}: {type(exc).__name__}: {exc}") from None


def pycriu() -> ModuleType:
    """The pycriu package (images, magic, pb), found as the module docstring says."""
    return import_system_package("pycriu")


def describe() -> dict[str, str | None]:
    """Which criu and pycriu are used, with their versions (for `--version` and `plugins`)."""
    criu = criu_in_use()
    out: dict[str, str | None] = {"criu": criu, "criu_version": None, "pycriu": None, "pycriu_version": None}
    if criu:
        recorded = [e for e in provision.read_manifest().values()
                    if os.path.realpath(str(e.get("criu"))) == os.path.realpath(criu)]
        out["criu_version"] = str(recorded[0]["version"]) if recorded else provision.criu_version(criu)
    try:
        directory = _choose_pycriu_dir()
    except CriuNotFoundError as exc:
        out["pycriu_error"] = str(exc)
    else:
        out["pycriu"] = os.path.join(directory, "pycriu")
        out["pycriu_version"] = provision.pycriu_version(directory)
    return out


def criu_line(criu: str | None = None) -> str | None:
    """"4.1" or "4.2" for a criu binary (the one in use by default), from criu.json or `criu --version`."""
    criu = criu or criu_in_use()
    if not criu:
        return None
    real = os.path.realpath(criu)
    for entry in provision.read_manifest().values():
        if os.path.realpath(str(entry.get("criu"))) == real and entry.get("version"):
            return provision.line_of(str(entry["version"]))
    version = _version_cache.get(real)
    if version is None:
        version = provision.criu_version(criu) or ""
        _version_cache[real] = version
    return provision.line_of(version) if version else None


_version_cache: dict[str, str] = {}


def criu_binary(configured: str | None = None) -> str:
    """Path of a criu executable: config/env, the provisioned wrapper, else PATH."""
    for candidate in (
        configured,
        os.environ.get("CRIT_PAGEREAD_CRIU"),
        os.path.join(provision.cache_base(), "bin", "criu"),
    ):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    import shutil

    found = shutil.which("criu")
    if found:
        return found
    raise CriuNotFoundError(
        f"criu not found: install CRIU >= 4 or {SETUP_HINT} (set CRIT_PAGEREAD_CRIU to a criu binary)"
    )
