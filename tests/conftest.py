"""Shared fixtures: a CRIU gate (fails under CI=true, skips elsewhere), the CRIU versions, the victim,
the corpus of real checkpoints (tests/corpus.py) and ../shared/fixtures as an extra cross-check."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

from corpus import Corpus, corpus_for  # noqa: E402
from criu_harness import build_victim  # noqa: E402

from crit_pageread import provision  # noqa: E402

SHARED_FIXTURES = HERE.parent.parent / "shared" / "fixtures"
#: The pids of ../shared/fixtures' cases (they were dumped once, long ago).
SHARED_PIDS = {"a_single": [29993], "b_tree": [30095, 30099, 30100], "d_shm": [30411, 30415],
               "e2_chain2": [30819], "f_lazy": [31278]}


@dataclass(frozen=True)
class Criu:
    """One CRIU version the suite runs: its line ("4.1"), wrapper and full version."""

    line: str
    binary: str
    version: str
    #: the run on ../shared/fixtures (made by CRIU 4.1.1), not on a corpus of our own
    shared: bool = False


def _criu_params() -> list[Any]:
    manifest = provision.read_manifest()
    out = []
    for line in provision.LINES:
        version = str(manifest.get(line, {}).get("version") or line)
        out.append(pytest.param(line, id=f"criu-{version}"))
    return out


CRIU_PARAMS = _criu_params()
#: CRIT_PAGEREAD_CRIU as the suite found it: what tests that ask for no CRIU version get.
DEFAULT_CRIU_ENV = os.environ.get("CRIT_PAGEREAD_CRIU")


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


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Tests that use `criu` run once per CRIU version; test_fixtures' corpus tests also on
    ../shared/fixtures where it exists."""
    if "criu" in metafunc.fixturenames:
        # The shared fixtures are a cross-check of the readers against their recorded truth (test_fixtures).
        shared = "corpus" in metafunc.fixturenames and metafunc.module.__name__ == "test_fixtures"
        params = CORPUS_PARAMS if shared else CRIU_PARAMS
        metafunc.parametrize("criu", params, indirect=True, scope="session")


def _criu_of(item: Any) -> str | None:
    """The wrapper of the CRIU version a test item runs on (None: the default)."""
    callspec = getattr(item, "callspec", None)
    line = callspec.params.get("criu") if callspec is not None else None
    if line in (None, "shared"):
        return None
    entry = provision.read_manifest().get(line) or {}
    return str(entry.get("criu") or "") or None


_managed: list[str | None] = [DEFAULT_CRIU_ENV]


def _select_criu(item: Any) -> None:
    """CRIT_PAGEREAD_CRIU names the test's CRIU version (or what the suite found), so the harness, the
    CLI and pycriu's choice follow it; left alone if a test or fixture set it itself."""
    if os.environ.get("CRIT_PAGEREAD_CRIU") != _managed[0]:
        return
    want = _criu_of(item) or DEFAULT_CRIU_ENV
    if want is None:
        os.environ.pop("CRIT_PAGEREAD_CRIU", None)
    else:
        os.environ["CRIT_PAGEREAD_CRIU"] = want
    _managed[0] = want


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    _managed[0] = os.environ.get("CRIT_PAGEREAD_CRIU")  # between tests: whatever is there is ours to set
    _select_criu(item)


@pytest.hookimpl(hookwrapper=True)
def pytest_fixture_setup(fixturedef: Any, request: pytest.FixtureRequest) -> Iterator[None]:
    """A module or session fixture is made for the test that first needs it: with that test's CRIU."""
    _select_criu(getattr(request, "_pyfuncitem", None))
    yield


@pytest.fixture(scope="session")
def criu(request: pytest.FixtureRequest, criu_ok: None) -> Criu:
    """Each CRIU version in turn (4.1.1, 4.2.1); CRIT_PAGEREAD_CRIU names its criu during the tests (and
    fixtures) that run on it."""
    shared = request.param == "shared"
    line = provision.DEFAULT_LINE if shared else request.param
    entry = provision.read_manifest().get(line)
    if not entry or not entry.get("criu") or not os.access(str(entry["criu"]), os.X_OK):
        msg = f"CRIU {line} is not provisioned: run `make setup` (or `crit-pageread setup-criu`)"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return Criu(line, str(entry["criu"]), str(entry["version"]), shared)


def _corpus_cache() -> Path:
    """Where corpora are cached: CRIT_PAGEREAD_TEST_CACHE (to time a build from nothing), else the user's cache."""
    return Path(os.environ.get("CRIT_PAGEREAD_TEST_CACHE") or provision.cache_dir())


def _shared_corpus() -> Corpus:
    import json
    import tempfile

    meta = Path(tempfile.mkdtemp(prefix="crit-pageread-shared-"))
    for name in ("cases", "truth", "live"):
        (meta / name).symlink_to(SHARED_FIXTURES / name)
    (meta / "corpus.json").write_text(json.dumps({"criu": None, "layout": "4.1", "pids": SHARED_PIDS}))
    return Corpus(meta, "", "4.1.1")


CORPUS_PARAMS = [*CRIU_PARAMS]
if (SHARED_FIXTURES / "cases").is_dir():  # the extra cross-check: collected only where it exists
    CORPUS_PARAMS.append(pytest.param("shared", id="shared-fixtures"))


@pytest.fixture(scope="session")
def corpus(criu: Criu) -> Corpus:
    """The corpus (tests/corpus.py) of each CRIU version, built once and cached; and
    ../shared/fixtures as one more corpus where it exists (never needed)."""
    if criu.shared:
        return _shared_corpus()
    return corpus_for(criu.binary, criu.version, _corpus_cache())


@pytest.fixture(scope="session")
def corpus41(criu_ok: None) -> Corpus:
    """The default CRIU's (4.1) corpus, for tests about something else than the CRIU version."""
    entry = provision.read_manifest().get(provision.DEFAULT_LINE) or {}
    binary = str(entry.get("criu") or provision.wrapper_path(provision.DEFAULT_LINE))
    version = str(entry.get("version") or provision.criu_version(binary))
    return corpus_for(binary, version, _corpus_cache())


def corpus_case(corpus: Corpus, name: str) -> Path:
    """A case of `corpus`, skipped only for ../shared/fixtures, which lacks a few."""
    path = corpus.case(name)
    if not path.exists():
        pytest.skip(f"{corpus.root} has no {name}")
    return path
