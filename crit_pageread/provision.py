"""Provision CRIU and a matching pycriu under the user's cache (`crit-pageread setup-criu`, `make setup`).

Standard library only: `scripts/setup.sh` runs this file with the system's
python3 before any virtual environment exists, and the installed package runs
it as `crit-pageread setup-criu`. For each CRIU line it provides (4.1 from
Debian trixie, 4.2 from Debian sid) it keeps a wrapper in
`~/.cache/crit-pageread/bin/`:

- `criu` (the default, 4.1): the system's criu if it is >= 4 and passes
  `criu check`, else trixie's unpacked with debootstrap under `criu-root`;
- `criu-4.2`: the system's criu if it is 4.2 and passes `criu check`, else
  sid's under `criu-sid-root`.

`criu.json` beside the wrappers records, per line, the wrapper, the CRIU
version it runs and the directory that holds the matching pycriu, which
`crit_pageread.criu_env` prefers. Roots are unpacked under a temporary name
and renamed; one lock file serialises concurrent runs. Rerunning is quick: a
wrapper that still passes `criu check` is kept.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False  # typing.TYPE_CHECKING (mypy treats the name as true), without importing typing
# What only set-up and `criu --version` need is imported where it is used: `crit-pageread --version` reads
# criu.json and a pycriu version file and nothing more (pathlib, argparse, subprocess, tempfile, shutil,
# dataclasses and contextlib cost 30 ms of start-up).
if TYPE_CHECKING:
    import argparse
    from pathlib import Path
    from typing import Any

#: CRIU line -> (Debian suite, root directory name, wrapper name)
LINES: dict[str, tuple[str, str, str]] = {
    "4.1": ("trixie", "criu-root", "criu"),
    "4.2": ("sid", "criu-sid-root", "criu-4.2"),
}
DEFAULT_LINE = "4.1"
MANIFEST = "criu.json"


class ProvisionError(Exception):
    """Provisioning failed; the message is one line."""


def _path(text: str) -> Path:
    from pathlib import Path

    return Path(text)


def cache_base() -> str:
    """`cache_dir()` as a string (no pathlib import)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "crit-pageread")


def cache_dir() -> Path:
    """The per-user cache that holds provisioned CRIU roots and wrappers."""
    return _path(cache_base())


def root_dir(line: str) -> Path:
    """Where the Debian root of `line` is unpacked (CRIT_PAGEREAD_CRIU_ROOT overrides the 4.1 one)."""
    if line == DEFAULT_LINE and os.environ.get("CRIT_PAGEREAD_CRIU_ROOT"):
        return _path(os.environ["CRIT_PAGEREAD_CRIU_ROOT"])
    return cache_dir() / LINES[line][1]


def wrapper_path(line: str) -> Path:
    return cache_dir() / "bin" / LINES[line][2]


def pycriu_version(directory: Path | str) -> str | None:
    """`__version__` of DIRECTORY/pycriu (read, not imported), or None if there is none."""
    text = None
    for name in ("version.py", "__init__.py"):
        try:
            with open(os.path.join(directory, "pycriu", name), errors="replace") as f:
                text = f.read()
        except OSError:
            continue
        for line in text.splitlines():  # __version__ = "4.1.1" (without importing re)
            key, eq, value = line.partition("=")
            value = value.partition("#")[0].strip()
            if eq and key.strip() == "__version__" and len(value) > 2 and value[0] in "'\"" and value[-1] == value[0]:
                return value[1:-1]
    return "unknown" if text is not None else None


def criu_version(cmd: list[str] | str) -> str | None:
    """The version `criu --version` prints (e.g. "4.2.1"), or None if it does not run."""
    import re
    import subprocess

    argv = [cmd] if isinstance(cmd, str) else cmd
    try:
        proc = subprocess.run([*argv, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"^Version:\s*(\S+)", proc.stdout, re.M)
    return match.group(1) if match else None


def line_of(version: str) -> str:
    """"4.2" for "4.2.1"."""
    return ".".join(version.split(".")[:2])


def criu_check(cmd: list[str] | str) -> str | None:
    """None if `criu check` passes, else its last line."""
    import subprocess

    argv = [cmd] if isinstance(cmd, str) else cmd
    try:
        proc = subprocess.run([*argv, "check"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        return str(exc)
    if proc.returncode == 0:
        return None
    lines = (proc.stderr or proc.stdout).strip().splitlines()
    return lines[-1] if lines else f"exit status {proc.returncode}"


def root_command(root: Path) -> list[str]:
    """How to run ROOT/usr/sbin/criu through the root's own loader and libraries."""
    libs = f"{root}/usr/lib/x86_64-linux-gnu:{root}/lib/x86_64-linux-gnu"
    return [f"{root}/usr/lib64/ld-linux-x86-64.so.2", "--library-path", libs, f"{root}/usr/sbin/criu"]


def _atomic_write(path: Path, text: str, mode: int = 0o644) -> None:
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def write_wrapper(path: Path, argv: list[str]) -> None:
    import shlex

    _atomic_write(path, "#!/bin/sh\nexec " + " ".join(shlex.quote(a) for a in argv) + ' "$@"\n', 0o755)


class locked:  # a class: contextlib.contextmanager would import contextlib at start-up
    """Hold the cache's lock file (several set-ups may run at once)."""

    def __enter__(self) -> None:
        import fcntl

        cache = cache_dir()
        cache.mkdir(parents=True, exist_ok=True)
        self._lock = open(cache / ".provision.lock", "w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX)
        except BaseException:
            self._lock.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self._lock.close()


def _log(msg: str) -> None:
    print(f"setup-criu: {msg}", file=sys.stderr, flush=True)


def debootstrap(suite: str, root: Path) -> None:
    """Unpack Debian `suite` with criu and python3-pycriu into `root` (temporary name, then rename)."""
    import shutil
    import subprocess

    if os.geteuid() != 0:
        raise ProvisionError("provisioning CRIU needs root (CRIU's dumps and restores need it too): run as root")
    if not shutil.which("debootstrap"):
        if not shutil.which("apt-get"):
            raise ProvisionError("debootstrap is missing and there is no apt-get to install it: install debootstrap")
        _log("installing debootstrap")
        for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "debootstrap"]):
            if subprocess.run(cmd, stdout=subprocess.DEVNULL).returncode != 0:
                raise ProvisionError(f"{' '.join(cmd)} failed: install debootstrap")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.with_name(f"{root.name}.tmp.{os.getpid()}")
    log = cache_dir() / f"debootstrap-{suite}.log"
    _log(f"provisioning CRIU from Debian {suite} into {root} (about a minute, 300 MB)")
    try:
        with open(log, "wb") as out:
            rc = subprocess.run(
                ["debootstrap", "--variant=minbase", "--include=criu,python3-pycriu", suite, str(tmp)],
                stdout=out, stderr=subprocess.STDOUT,
            ).returncode
        if rc != 0:
            raise ProvisionError(f"debootstrap {suite} failed (exit {rc}), see {log}")
        if root.exists():
            shutil.rmtree(root)
        os.rename(tmp, root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _system_criu(line: str | None) -> list[str] | None:
    """The system's criu if it passes `criu check` (and is of `line` if given), else None."""
    import shutil

    found = shutil.which("criu")
    if not found:
        return None
    version = criu_version(found)
    if not version or int(version.split(".")[0]) < 4 or (line and line_of(version) != line):
        return None
    return [found] if criu_check(found) is None else None


def _system_pycriu() -> Path | None:
    for pattern in ("usr/lib/python3/dist-packages", "usr/lib/python3*/site-packages",
                    "usr/local/lib/python3*/dist-packages"):
        for d in sorted(_path("/").glob(pattern)):
            if pycriu_version(d):
                return d
    return None


class Provisioned:
    """One CRIU line ready to use (a plain class: dataclasses costs 12 ms of start-up)."""

    def __init__(self, line: str, criu: str, version: str, pycriu: str | None, pycriu_version: str | None,
                 origin: str) -> None:
        self.line = line
        self.criu = criu  # the wrapper
        self.version = version
        self.pycriu = pycriu  # directory holding the matching pycriu/
        self.pycriu_version = pycriu_version
        self.origin = origin  # "system" or the root directory

    def as_dict(self) -> dict[str, str | None]:
        return dict(self.__dict__)

    def __repr__(self) -> str:
        return f"Provisioned({self.__dict__})"


def provision_line(line: str) -> Provisioned:
    """Make `line`'s wrapper work (keep, system, or unpack a Debian root); say what it runs."""
    wrapper = wrapper_path(line)
    suite = LINES[line][0]
    root = root_dir(line)
    origin: str | None = None
    if wrapper.is_file():
        version = criu_version(str(wrapper))
        if version and (line_of(version) == line or line == DEFAULT_LINE) and criu_check(str(wrapper)) is None:
            text = wrapper.read_text()
            origin = str(root) if str(root) in text else "system"
    if origin is None:
        system = _system_criu(None if line == DEFAULT_LINE else line)
        if system is not None:
            write_wrapper(wrapper, system)
            origin = "system"
        else:
            if not (root / "usr/sbin/criu").exists():
                debootstrap(suite, root)
            write_wrapper(wrapper, root_command(root))
            problem = criu_check(str(wrapper))
            if problem:
                raise ProvisionError(f"the CRIU unpacked in {root} fails 'criu check': {problem}")
            origin = str(root)
    version = criu_version(str(wrapper)) or "unknown"
    pyc: Path | None = root / "usr/lib/python3/dist-packages"
    if origin == "system":
        pyc = _system_pycriu()
        found = pycriu_version(pyc) if pyc else None
        if found is None or found == "unknown" or line_of(found) != line_of(version):
            # The system's criu without a pycriu of its own version: take the one of our root.
            if not (root / "usr/sbin/criu").exists():
                debootstrap(suite, root)
            pyc = root / "usr/lib/python3/dist-packages"
    pyc_version = pycriu_version(pyc) if pyc else None
    return Provisioned(line, str(wrapper), version, str(pyc) if pyc_version else None, pyc_version, origin)


def read_manifest() -> dict[str, dict[str, str | None]]:
    """criu.json: line -> what `provision_line` recorded; {} if there is none."""
    try:
        with open(os.path.join(cache_base(), "bin", MANIFEST)) as f:
            text = f.read()
        data = json_loads(text)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


class _JsonContext:
    """What `_json.make_scanner` reads: json.JSONDecoder's defaults."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = {"-Infinity": float("-inf"), "Infinity": float("inf"), "NaN": float("nan")}.__getitem__


def json_loads(text: str) -> Any:
    """`json.loads(text)`, by the json package's C scanner (`_json`) without importing json and re (`--version`);
    json itself where that scanner is missing or `text` is not one JSON document (its own error then)."""
    try:
        import _json
    except ImportError:
        scanner_of: Any = None
    else:
        scanner_of = _json.make_scanner
    if scanner_of is not None and not text.startswith("\ufeff"):
        start = len(text) - len(text.lstrip(" \t\n\r"))
        try:
            value, end = scanner_of(_JsonContext())(text, start)
        except (StopIteration, ValueError):
            pass
        else:
            if not text[end:].strip(" \t\n\r"):
                return value
    import json

    return json.loads(text)


def setup(lines: list[str]) -> list[Provisioned]:
    """Provision every line in `lines` under the lock; update criu.json."""
    import json

    done = []
    with locked():
        manifest = read_manifest()
        for line in lines:
            got = provision_line(line)
            manifest[line] = got.as_dict()
            done.append(got)
        _atomic_write(cache_dir() / "bin" / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return done


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--criu", choices=[*LINES, "all"], default="all",
                   help="which CRIU line to provision (default: all: 4.1 as the default criu, 4.2 beside it)")
    p.add_argument("--json", action="store_true", help="one JSON line per CRIU line provisioned")


def run(args: argparse.Namespace) -> int:
    lines = list(LINES) if args.criu == "all" else [args.criu]
    try:
        done = setup(lines)
    except ProvisionError as exc:
        print(f"setup-criu: {exc}", file=sys.stderr)
        return 1
    if args.json:  # one document per CRIU line (NDJSON)
        import json

        for p in done:
            print(json.dumps(p.as_dict()))
    else:
        for p in done:
            where = "system" if p.origin == "system" else p.origin
            pyc = f"pycriu {p.pycriu_version} in {p.pycriu}" if p.pycriu else "no pycriu"
            print(f"criu {p.version} ({where}): {p.criu}; {pyc}")
    return 0


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="setup-criu", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
