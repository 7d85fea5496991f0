"""Start-up: `ps`, `read` and `--version` import only what they need, and the command lines parsed without
argparse (cli/fastargs.py) come out as argparse parses them, with argparse's own help and messages otherwise."""

from __future__ import annotations

import contextlib
import io
import os
import random
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from crit_pageread import plugins
from crit_pageread.cli import fastargs, main
from crit_pageread.testing import ImageBuilder, VmaSpec

REPO = Path(__file__).resolve().parent.parent
#: Standard-library modules the start-up of `ps` and `read` does without (what they cost: README Performance).
NOT_FOR_PS_READ = ("argparse", "gettext", "locale", "shutil", "pluggy", "typing", "inspect", "dataclasses", "ctypes",
                   "json", "pathlib", "re", "enum", "fnmatch", "urllib.parse", "ipaddress", "weakref",
                   "crit_pageread.criu_env", "crit_pageread.provision")
#: `--json` output is written by json's C encoder (cli.common.json_dumps): json is not imported either.
#: grep (its engine, Hyperscan, imports typing and re itself).
NOT_FOR_GREP = ("argparse", "gettext", "locale", "shutil", "pluggy", "json", "pathlib", "dataclasses", "ctypes",
                "crit_pageread.criu_env", "crit_pageread.provision")
NOT_FOR_VERSION = ("argparse", "pluggy", "typing", "inspect", "dataclasses", "pathlib", "subprocess", "shutil",
                   "urllib.parse", "ipaddress", "json", "re", "enum")


@pytest.fixture
def light(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A new plugin manager of the built-in plugins only (no pluggy), discarded after."""
    for key in ("CRIT_PAGEREAD_TRACE_HOOKS", "CRIT_PAGEREAD_LOAD_PLUGINS"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("CRIT_PAGEREAD_LOAD_PLUGINS", "")
    plugins.reset()
    yield
    plugins.reset()


@pytest.fixture
def small(tmp_path: Path) -> Path:
    """A one-process checkpoint: pid 10, two pages at 0x10000 (the second one not dumped)."""
    d = ImageBuilder(tmp_path / "d").process(10, vmas=[VmaSpec(0x10000, 0x12000)])
    d.pagemap(10, [(0x10000, bytes(range(256)) * 16)])
    return d.write()


PROBE = "import atexit, sys\natexit.register(lambda: print(' '.join(sys.modules), file=sys.stderr))\n"
ARGPARSE_ONLY = "import crit_pageread.cli.fastargs as f\nf.parse = lambda words, pm: None\n"


def _cli(*args: str, prelude: str = "") -> subprocess.CompletedProcess[str]:
    """`python -m crit_pageread ARGS` from the checkout, after the Python code `prelude`."""
    code = prelude + "import runpy; runpy.run_module('crit_pageread', run_name='__main__', alter_sys=True)\n"
    env = {k: v for k, v in os.environ.items() if k not in ("CRIT_PAGEREAD_TRACE_HOOKS", "CRIT_PAGEREAD_LOAD_PLUGINS")}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=120)


@pytest.mark.parametrize("what", ["ps", "ps --json", "read", "read -x", "read --json", "--version"])
def test_ps_read_and_version_start_without_argparse_pathlib_or_json(what: str, small: Path) -> None:
    words = what.split()
    args = [words[0], str(small), *words[1:]] if words[0] in ("ps", "read") else words
    if words[0] == "read":
        args[2:2] = ["0x10000", "64"]
    proc = _cli(*args, prelude=PROBE)
    assert proc.returncode == 0, proc.stderr
    unwanted = set(NOT_FOR_VERSION if words[0] == "--version" else NOT_FOR_PS_READ)
    loaded = set(proc.stderr.strip().splitlines()[-1].split())
    assert not loaded & unwanted, f"{what} imported {sorted(loaded & unwanted)}"


@pytest.mark.parametrize("what", ["grep DIR ab", "grep DIR -E a.c --json", "grep --pid 10 DIR --hex 0001 -C 2",
                                  "grep DIR --strings ab -n 3 --vma x --vma y"])
def test_grep_starts_without_argparse_or_json(what: str, small: Path) -> None:
    args = [str(small) if w == "DIR" else w for w in what.split()]
    proc = _cli(*args, prelude=PROBE)
    assert proc.returncode in (0, 1), proc.stderr
    loaded = set(proc.stderr.strip().splitlines()[-1].split())
    assert not loaded & set(NOT_FOR_GREP), f"{what} imported {sorted(loaded & set(NOT_FOR_GREP))}"


#: extract (writer threads without concurrent.futures, whose import brings logging; the output's paths as text:
#: no pathlib, re, enum or signal).
NOT_FOR_EXTRACT = ("argparse", "gettext", "locale", "shutil", "pluggy", "json", "typing", "concurrent.futures",
                   "logging", "crit_pageread.search", "crit_pageread.cli.grep", "pathlib", "re", "enum", "signal",
                   "fnmatch", "urllib.parse", "ipaddress")


@pytest.mark.parametrize("what", ["extract DIR -o OUT", "extract DIR -o OUT --layout sparse --json",
                                  "extract --pid 10 DIR -o OUT --min-hole 0"])
def test_extract_of_one_file_starts_without_argparse_json_or_threads(what: str, small: Path, tmp_path: Path) -> None:
    args = [str(small) if w == "DIR" else str(tmp_path / "out") if w == "OUT" else w for w in what.split()]
    proc = _cli(*args, prelude=PROBE)
    assert proc.returncode == 0, proc.stderr
    written = sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*") if p.is_file())
    one = "pid-10.mem" if "sparse" in what else "pid-10/10000-12000-rw-p.bin"
    assert written == ["index.json", one]
    loaded = set(proc.stderr.strip().splitlines()[-1].split())
    assert not loaded & set(NOT_FOR_EXTRACT), f"{what} imported {sorted(loaded & set(NOT_FOR_EXTRACT))}"


#: scan: its own command module only (no crit_compat), parsed without argparse, `--json` by json_dumps.
NOT_FOR_SCAN = ("argparse", "gettext", "locale", "json", "uuid", "crit_pageread.cli.crit_compat",
                "crit_pageread.cli.grep", "crit_pageread.search")


@pytest.mark.parametrize("what", ["scan --rules RULES DIR --jobs 1", "scan DIR -r RULES --json --jobs 1"])
def test_scan_starts_without_argparse_json_or_other_commands(what: str, small: Path, tmp_path: Path) -> None:
    rules = tmp_path / "r.yar"
    rules.write_text('rule sixteen { strings: $a = { 10 11 12 13 } condition: $a }\n')
    args = [str(small) if w == "DIR" else str(rules) if w == "RULES" else w for w in what.split()]
    proc = _cli(*args, prelude=PROBE)
    assert proc.returncode == 0, proc.stderr
    assert "sixteen" in proc.stdout and ("0x10010" in proc.stdout or str(0x10010) in proc.stdout)
    loaded = set(proc.stderr.strip().splitlines()[-1].split())
    assert not loaded & set(NOT_FOR_SCAN), f"{what} imported {sorted(loaded & set(NOT_FOR_SCAN))}"


@pytest.fixture
def two_vmas(tmp_path: Path) -> Path:
    """pid 10 with three VMAs: two with pages (written by writer threads, the larger first), one without."""
    d = ImageBuilder(tmp_path / "two").process(10, vmas=[VmaSpec(0x10000, 0x12000), VmaSpec(0x20000, 0x30000),
                                                         VmaSpec(0x40000, 0x41000)])
    d.pagemap(10, [(0x10000, b"a" * 4096), (0x20000, b"b" * 0x3000), (0x2c000, b"c" * 0x4000)])
    return d.write()


@pytest.mark.parametrize("what", ["extract DIR -o OUT", "extract DIR -o OUT/ --json"])
def test_extract_with_writer_threads_starts_without_concurrent_futures_or_pathlib(what: str, two_vmas: Path,
                                                                                  tmp_path: Path) -> None:
    args = [str(two_vmas) if w == "DIR" else w.replace("OUT", str(tmp_path / "out")) for w in what.split()]
    probe = PROBE + "import threading\nthreading.Thread.start = (lambda s, t=threading.Thread.start: " \
                    "(print('thread', file=sys.stderr), t(s))[1])\n"
    proc = _cli(*args, prelude=probe)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("thread\n") == 2  # two files, two writers
    out = tmp_path / "out"
    assert (out / "pid-10/10000-12000-rw-p.bin").read_bytes() == b"a" * 4096 + bytes(4096)
    big = (out / "pid-10/20000-30000-rw-p.bin").read_bytes()
    assert big == b"b" * 0x3000 + bytes(0x9000) + b"c" * 0x4000
    assert sorted(p.name for p in out.rglob("*")) == ["10000-12000-rw-p.bin", "20000-30000-rw-p.bin",
                                                       "index.json", "pid-10"]
    if "--json" in what:  # the output's name as pathlib shows it (no trailing slash), as before
        assert f'"output": "{out}"' in proc.stdout
    else:
        assert proc.stdout.startswith(f"{out}: 2 files, {0x8000} bytes of memory (index: {out}/index.json)")
    loaded = set(proc.stderr.strip().splitlines()[-1].split())
    assert not loaded & set(NOT_FOR_EXTRACT), f"{what} imported {sorted(loaded & set(NOT_FOR_EXTRACT))}"


GC_PROBE = """import gc, sys
import crit_pageread.cli.ps as ps
_run = ps.run
def run(args):
    print("collector", gc.isenabled(), gc.get_freeze_count() > 1000, file=sys.stderr)
    return _run(args)
ps.run = run
"""


def test_commands_run_with_the_collector_on_and_start_up_s_objects_frozen(small: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(GC_PROBE)  # the probe, in a real `python -m crit_pageread`
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(REPO)])}
    proc = subprocess.run([sys.executable, "-m", "crit_pageread", "ps", str(small)], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "collector True True" in proc.stderr


def _argparse(words: list[str]) -> tuple[Any, str]:
    """(namespace or None when argparse exits, what it printed)."""
    parser = main.build_parser(main._command_of(words))
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            return parser.parse_args(words), out.getvalue()
        except SystemExit:
            return None, out.getvalue()


def _words(rng: random.Random, spec: Any, good: bool) -> list[str]:
    """A command line for `spec`'s command: a plausible one (`good`), or one in argparse's corners."""
    options: list[list[str]] = []
    for action in spec._actions:
        if not action.option_strings or action.dest == "help":
            continue
        name = rng.choice(action.option_strings)
        if action.nargs == 0:
            options.append([name])
            continue
        plausible = [str(c) for c in action.choices][:1] if action.choices else ["5"] if action.type else ["v", "5"]
        values = plausible if good else [*plausible, "abc", "-3", "0x10", "1.5", "x=y", "", "--json"]
        value = rng.choice(values)
        options.append([name, value] if good else rng.choice([[name, value], [f"{name}={value}"], [name]]))
        if not good and len(name) > 3 and name.startswith("--"):
            options.append([name[:-1], value])
    positionals = [a for a in spec._actions if not a.option_strings]
    required = sum(1 for a in positionals if a.nargs in (None, "+"))
    more = 2 if any(a.nargs == "+" for a in positionals) else 0  # one or more words
    count = rng.randint(required, len(positionals) + more) if good else rng.randint(0, len(positionals) + 1 + more)
    pieces = [[rng.choice(["DIR", "0x1000", "12", "", "a b"] if not good else ["DIR", "12"])] for _ in range(count)]
    pieces += rng.sample(options, min(len(options), rng.randint(0, 4)))
    if not good:
        pieces += rng.choice([[], [["-h"]], [["--"]], [["--debug"]], [["--version"]], [["-"]]])
    if good or rng.random() < 0.5:  # the positionals in one run, as they are usually written
        pieces.sort(key=lambda p: p[0].startswith("-"), reverse=rng.random() < 0.5)
    else:
        rng.shuffle(pieces)
    return [word for piece in pieces for word in piece]


def _commands() -> list[str]:
    return sorted(c for c, module in main.COMMAND_MODULES.items() if module)


@pytest.mark.parametrize("command", _commands())
def test_command_lines_without_argparse_parse_as_argparse_parses_them(command: str, light: None) -> None:
    rng = random.Random(command)
    parser = main.build_parser(command)
    sub = parser._subparsers._group_actions[0].choices[command]  # type: ignore[union-attr]
    fast_ones = 0
    for _ in range(400):
        words = [*(["--debug"] if rng.random() < 0.2 else []), command, *_words(rng, sub, rng.random() < 0.5)]
        fast = fastargs.parse(words, main.plugin_manager(command))
        slow, printed = _argparse(words)
        if slow is None:
            assert fast is None, f"{words}: argparse says {printed!r}, fastargs parsed {fast}"
        elif fast is not None:
            fast_ones += 1
            assert list(vars(fast).items()) == list(vars(slow).items()), words
    if command in ("ps", "read", "grep"):
        assert fast_ones > 100, f"only {fast_ones} of 400 command lines parsed without argparse"


@pytest.mark.parametrize("words", [
    ["ps", "D"], ["ps", "D", "--json", "--pid", "3", "--pid", "4"], ["--debug", "ps", "--no-env", "D"],
    ["read", "D", "10000"], ["read", "--pid", "1", "D", "0x10", "0x20", "-x", "-v", "--zero-fill", "-o", "f"],
    ["read", "D", "10", "--strategy", "mmap", "--config", "c.toml", "--json"],
    ["grep", "D", "secret"], ["grep", "D", "-E", "a+b"], ["grep", "-f", "p.txt", "D"],
    ["grep", "D", "-f", "a", "-f", "b"],
    ["grep", "D", "--strings", "", "-n", "8"], ["grep", "--vma", "[heap]", "D", "--kind", "anon", "x", "--json"],
])
def test_the_usual_ps_and_read_lines_parse_without_argparse(words: list[str], light: None) -> None:
    fast = fastargs.parse(words, main.plugin_manager(words[1] if words[0] == "--debug" else words[0]))
    assert fast is not None and fast == _argparse(words)[0]


@pytest.mark.parametrize("args", [
    [], ["ps"], ["ps", "-h"], ["read", "--help"], ["read", "D"], ["ps", "D", "--pid"], ["ps", "D", "--pid", "x"],
    ["ps", "D", "--bogus"], ["ps", "D", "E"], ["read", "D", "1", "--js=1"], ["bogus"], ["--debug"], ["-h"],
    ["ps", "D", "--version"], ["read", "D", "1", "--json", "2"], ["ps", "--pid=1", "NODIR"],
])
def test_help_and_mistakes_are_argparse_s_own(args: list[str], small: Path, light: None) -> None:
    """Output, messages and exit code as argparse gives them (the parse left to it)."""
    args = [str(small) if a == "D" else a for a in args]
    proc = _cli(*args)
    slow, printed = _argparse(args)
    assert slow is None or args[-1] == "NODIR"
    if slow is None:
        assert proc.returncode == (0 if "-h" in args or "--help" in args else 2)
        assert proc.stdout + proc.stderr == printed


@pytest.mark.parametrize("args", [
    ["ps", "D"], ["ps", "D", "--json"], ["ps", "D", "--pid", "11"], ["read", "D", "0x10000", "64"],
    ["read", "D", "10000", "32", "-x"], ["read", "D", "0x11000", "16"], ["read", "D", "0x10000", "16", "--json"],
    ["read", "D", "zz"], ["read", "D", "0x10000", "-x", "--strategy", "nope"], ["ps", "/nonexistent"],
    ["read", "D", "0x10000", "16", "--js"], ["ps", "--pid=10", "D"], ["read", "D", "0x10000", "--pid", "10", "8"],
    ["grep", "D", "0123"], ["grep", "D", "-E", "[0-9]{3}", "--json"], ["grep", "D", "--hex", "0102", "-E", "x"],
    ["grep", "D", "--strings", "", "-n", "3", "-C", "2"], ["grep", "D", "zz"], ["grep", "D", "--vma", "[heap]", "1"],
])
def test_commands_answer_the_same_with_and_without_argparse(args: list[str], small: Path) -> None:
    args = [str(small) if a == "D" else a for a in args]
    fast = _cli(*args)
    forced = _cli(*args, prelude=ARGPARSE_ONLY)
    assert (fast.returncode, fast.stdout, fast.stderr) == (forced.returncode, forced.stdout, forced.stderr)


# --- paths as text (crit_pageread/_paths.py) ------------------------------------------------


def _spellings(rng: random.Random) -> Iterator[str]:
    pieces = ["", ".", "..", "a", "b c", "/", "//", "///", "x.img", "\n", "é"]
    for _ in range(3000):
        yield "".join(rng.choice(pieces) + rng.choice(["", "/", "//", "/./"]) for _ in range(rng.randint(0, 5)))


def test_paths_as_text_are_what_pathlib_shows() -> None:
    from crit_pageread import _paths

    rng = random.Random(14)
    names = list(_spellings(rng))
    for a, b in zip(names, reversed(names), strict=True):
        assert _paths.text(a) == str(Path(a)), a
        assert _paths.join(_paths.text(a), b) == str(Path(a) / b), (a, b)
        assert _paths.name(a) == Path(a).name and _paths.parent(a) == str(Path(a).parent), a
    for bad in (b"/tmp", 3):
        with pytest.raises(TypeError) as theirs:
            Path(bad)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match=re.escape(str(theirs.value))):
            _paths.text(bad)  # type: ignore[arg-type]


def test_paths_tests_are_pathlib_s(tmp_path: Path) -> None:
    from crit_pageread import _paths

    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_text("x")
    (tmp_path / "fifo").touch()
    for name, target in (("to-dir", "dir"), ("to-file", "file"), ("dangling", "nowhere"), ("loop", "loop")):
        (tmp_path / name).symlink_to(target)
    for name in ("dir", "file", "fifo", "to-dir", "to-file", "dangling", "loop", "absent", "file/under", "a\0b",
                 "loop/x", "dir/", "file/"):
        path = Path(str(tmp_path / name) + ("/" if name.endswith("/") else ""))
        p = _paths.text(str(path))
        assert (_paths.exists(p), _paths.is_dir(p), _paths.is_file(p), _paths.is_symlink(p)) == (
            path.exists(), path.is_dir(), path.is_file(), path.is_symlink()), name


@pytest.mark.parametrize("spelling", ["{d}", "{d}/", "{d}//", "{d}/./", "./{rel}", "{rel}/../{rel}"])
def test_images_keep_pathlib_s_paths_and_messages(spelling: str, small: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """The library's paths are still Paths (made when asked for), and messages name the images as before."""
    from crit_pageread import open_images
    from crit_pageread.errors import NotDumpedError

    monkeypatch.chdir(small.parent)
    where = spelling.format(d=small, rel=small.name)
    with open_images(where) as images, images.reader(10) as reader:
        assert images.path == Path(where) and isinstance(images.path, Path)
        assert images.image("pstree.img") == Path(where) / "pstree.img"
        pm = images.pagemap(10)
        assert isinstance(pm.path, Path) and pm.path == Path(where) / "pagemap-10.img"
        assert pm.pages_path == Path(where) / f"pages-{pm.pages_id}.img"
        assert reader.source == str(Path(where) / "pagemap-10.img") and images.location == str(Path(where))
        assert repr(images) == f"<CheckpointImages {Path(where)}>"
        pages = images.pages_file(pm.pages_id)
        assert isinstance(pages.path, Path) and repr(pages) == f"PagesFile({str(Path(where) / pages.path.name)!r})"
        with pytest.raises(NotDumpedError, match=rf"^{re.escape(str(Path(where) / 'pagemap-10.img'))}: "):
            reader.read(0x11000, 16)
    code = main.main(["read", where, "0x11000", "16"])
    assert code == 1 and capsys.readouterr().err == (
        f"crit-pageread: {Path(where) / 'pagemap-10.img'}: pages not dumped at 0x11000-0x11010\n")


def test_shmem_ids_are_found_as_the_regular_expression_found_them() -> None:
    from crit_pageread.images import _shmem_id

    pattern = re.compile(r"^pagemap-shmem-(\d+)\.img$")
    for name in ("pagemap-shmem-1.img", "pagemap-shmem-0012.img", "pagemap-shmem-.img", "pagemap-shmem-1.img\n",
                 "pagemap-shmem-1.img\n\n", "pagemap-shmem-١٢.img", "pagemap-shmem-1a.img", "pagemap-1.img",
                 "xpagemap-shmem-1.img", "pagemap-shmem-1.imgx", "pagemap-shmem--1.img", "pagemap-shmem-².img"):
        m = pattern.match(name)
        assert _shmem_id(name) == (int(m.group(1)) if m else None), name


def test_temporary_names_are_recognised_as_the_regular_expression_recognised_them() -> None:
    """output.parse_temp_name looks for the tag first (a directory of other names is listed without importing re)."""
    from crit_pageread.output import parse_temp_name

    pattern = re.compile(r"^\.(?P<name>.+)\.crit-pageread-(?P<pid>\d+)(?:\.\d+)?\.tmp$")
    for name in (".out.crit-pageread-12.tmp", ".out.crit-pageread-12.3.tmp", ".a.b.crit-pageread-1.crit-pageread-2.tmp",
                 "out.crit-pageread-12.tmp", ".out.crit-pageread-.tmp", ".out.crit-pageread-12.tmp\n",
                 ".\n.crit-pageread-1.tmp", ".out.crit-pageread-١٢.tmp", ".out.crit-pageread-12.tmpx",
                 ".out.crit-pageread12.tmp", "..crit-pageread-1.tmp", "pagemap-1.img", "", ".crit-pageread-1.tmp",
                 ".out.CRIT-PAGEREAD-1.tmp"):
        m = pattern.match(name)
        assert parse_temp_name(name) == ((m.group("name"), int(m.group("pid"))) if m else None), name
    code = ("import sys\nfrom crit_pageread.output import parse_temp_name\n"
            "assert parse_temp_name('pages-1.img') is None and 're' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=120)


def test_the_manifest_is_read_as_json_loads_reads_it() -> None:
    """provision.json_loads (json's C scanner, no json import) gives json.loads's value, or a ValueError."""
    import json

    from crit_pageread.provision import json_loads

    docs = [
        {"4.1": {"criu": "/c/bin/criu", "version": "4.1.1", "pycriu": None, "root": "/c/criu-root"}},
        {"4.2": {"criu": "/x", "n": 12, "f": -1.5e300, "big": 10**40, "ok": True, "no": False, "l": [1, "é\u2028"]}},
        [], "text", 3, None, {"": {"\ud83d": "\x00"}},
    ]
    texts = [json.dumps(d, indent=i) for d in docs for i in (None, 2)]
    texts += ["  {}  \n", "\ufeff{}", "{} x", "{}{}", "", " ", "NaN", "[Infinity, -Infinity]", "{'a': 1}",
              '{"a": 1,}', '"\\ud800"', "01", "1.", '{"a"\n:\t1}', "\u00a0{}", '"tab\there"']
    rng = random.Random(5)
    for text in list(texts[:8]):
        for _ in range(150):
            i = rng.randrange(len(text) + 1)
            texts.append(text[:i] + rng.choice(['"', "}", "]", ",", " ", "x", "0", "\\", ""]) + text[i + 1:])
    for text in texts:
        try:
            want: object = json.loads(text)
        except ValueError as exc:
            with pytest.raises(ValueError, match=re.escape(str(exc))):
                json_loads(text)
            continue
        got = json_loads(text)
        if "nan" in repr(want):  # nan != nan: compare what they show
            assert repr(got) == repr(want), text
        else:
            assert got == want and type(got) is type(want), text


def test_json_output_is_json_dumps_s() -> None:
    """cli.common.json_dumps (json's C encoder, no json import) writes what json.dumps writes, or raises its error."""
    import json

    from crit_pageread.cli.common import json_dumps

    loop: list[object] = []
    loop.append(loop)
    values: list[object] = [
        {"pid": 1, "argv": ["a", "é", "\x00\u2028"], "environ": [], "errors": None, "ok": True, "retitled": False},
        {"checkpoint": "/d", "vaddr": 1 << 64, "hex": "00ff", "f": 1.5, "nan": float("nan"), "inf": float("-inf")},
        "text\n", 3, -0.0, 1e300, None, True, [], {}, (1, 2), {1: "int key", 2.5: "float", None: "n", False: "b"},
        {"nested": [{"a": [[], {}]}]}, "\ud800", loop, {"x": object()}, {(1, 2): "tuple key"}, b"bytes", {1, 2},
    ]
    for value in values:
        try:
            want = json.dumps(value)
        except (TypeError, ValueError) as exc:
            with pytest.raises(type(exc), match=re.escape(str(exc))):
                json_dumps(value)
            continue
        assert json_dumps(value) == want, value


@pytest.mark.parametrize("args", [["ps", "D", "--json"], ["read", "D", "0x10000", "16", "--json"]])
def test_json_output_is_the_same_as_json_packages_own(args: list[str], small: Path) -> None:
    """With `_json` hidden, json_dumps is json.dumps in pure Python: the lines are the same."""
    args = [str(small) if a == "D" else a for a in args]
    ours = _cli(*args)
    pure = _cli(*args, prelude="import sys\nsys.modules['_json'] = None\n")
    assert ours.returncode == pure.returncode == 0 and ours.stdout == pure.stdout and ours.stdout.startswith("{")


def test_recorded_parsers_keep_argparse_s_defaults_and_repr() -> None:
    """set_defaults() before or after the argument, string defaults through `type`, odd dests: as argparse."""
    import argparse

    def build(sub: Any) -> None:
        p = sub.add_parser("cmd")
        p.set_defaults(early=5, func="f")
        p.add_argument("--early", type=int)
        p.add_argument("--typed", type=int, default="7")
        p.add_argument("--flag", action="store_true", default="yes")
        p.add_argument("--odd", dest="odd-dest", default=1)
        p.add_argument("pos", nargs="?", default="3", type=int)
        p.set_defaults(flag="later")

    class Hook:
        def crit_pageread_add_commands(self, subparsers: Any) -> None:
            build(subparsers)

    class PM:
        hook = Hook()

    top = argparse.ArgumentParser(prog="crit-pageread")
    top.add_argument("--version", action="store_const", const=None)
    top.add_argument("--debug", action="store_true")
    build(top.add_subparsers(dest="command"))
    for words in (["cmd"], ["cmd", "--early", "2", "9"], ["--debug", "cmd", "--flag", "--odd", "x"]):
        fast, slow = fastargs.parse(words, PM()), top.parse_args(words)
        assert fast is not None and list(vars(fast).items()) == list(vars(slow).items()), words
        assert repr(fast) == repr(slow), words
