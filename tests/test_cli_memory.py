"""read, grep, extract, ps and pages on a real CRIU dump, checked against the restored (stopped) process."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cli_driver import run_jobs
from conftest import Criu
from criu_harness import Restored, Victim, dump, pagemap_pages, restore_stopped, start_victim

from crit_pageread.cli import grep as grep_mod
from crit_pageread.cli.main import main
from crit_pageread.pagemap import load_pagemap

ARGS = ("--tree", "1", "--mib", "3", "--vmas", "3", "--seed", "7")
ENV = {"PATH": "/usr/bin:/bin", "VICTIM": "1", "GREETING": "hello world", "EMPTY": "", "UTF": "grüße"}


class Dumped:
    def __init__(self, victim: Victim, images: Path, restored: Restored, exe: Path) -> None:
        self.victim = victim
        self.images = images
        self.restored = restored
        self.exe = exe
        self.pids = sorted(restored.pids)


@pytest.fixture(scope="module")
def dumped(criu: Criu, victim_exe: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dumped]:
    work = tmp_path_factory.mktemp("cli-mem")
    victim = start_victim(victim_exe, work / "run", *ARGS, env=ENV)
    try:
        images = dump(victim, work / "images")
    finally:
        victim.kill()
    with restore_stopped(images) as restored:
        yield Dumped(victim, images, restored, victim_exe)


def cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def _runs(pages: list[int]) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for a in sorted(pages):
        if runs and runs[-1][1] == a:
            runs[-1] = (runs[-1][0], a + 4096)
        else:
            runs.append((a, a + 4096))
    return runs


def test_grep_finds_the_secret_across_page_and_entry_boundary_and_read_returns_it(
    dumped: Dumped, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = dumped.victim.info["secret"]
    addr, text = secret["addr"], secret["text"].encode()
    pid = dumped.victim.pid
    end = addr + len(text)
    assert addr // 4096 != (end - 1) // 4096
    pm = load_pagemap(dumped.images / f"pagemap-{pid}.img", 4096)
    assert pm.find(addr) != pm.find(end - 1)  # two pagemap entries
    code, out, err = cli(["grep", str(dumped.images), text.decode(), "--json"], capsys)
    assert code == 0, err
    matches = [json.loads(line) for line in out.splitlines()]
    hit = [m for m in matches if m["vaddr"] == addr and m["pid"] == pid]
    assert len(hit) == 1
    assert hit[0]["pid"] == pid and hit[0]["match"] == text.decode() and hit[0]["encoding"] == "text"
    assert hit[0]["mapping"].endswith(".file") and hit[0]["start"] == addr // 4096 * 4096 - 3 * 4096
    code, out, err = cli(["grep", str(dumped.images), text.decode()], capsys)
    assert f"{pid}:{addr:#x}:" in out
    res = run_jobs("crit_pageread", [{"argv": ["read", str(dumped.images), "--pid", str(pid), hex(addr),
                                               str(len(text))]}])[0]
    assert res["rc"] == 0, res["err"]
    assert res["out"] == text == dumped.restored.read(pid, addr, len(text))


@pytest.mark.parametrize(("chunk", "strategy"), [(10_007, []), (1 << 16, []), (12_345, ["--strategy", "preadv"]),
                                                 (1 << 16, ["--strategy", "mmap"])])
@pytest.mark.parametrize("engine", ["hyperscan", "python"])
def test_grep_finds_exactly_what_re_finds_in_restored_memory(
    dumped: Dumped, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, chunk: int,
    strategy: list[str], engine: str, tmp_path: Path,
) -> None:
    """Small chunks force thousands of chunk boundaries; every match is found once (in place or copied),
    by Hyperscan and by the built-in engine alike, for a regex, a literal and many literals (-f)."""
    monkeypatch.setattr(grep_mod, "CHUNK", chunk)
    monkeypatch.setattr(grep_mod, "STRETCH_WINDOW", chunk)  # many window edges in the in-place search too
    patterns = tmp_path / "patterns"
    patterns.write_bytes(b"\xab\xcd\n\xef\x01\x02\n\x10\x20\n")
    for argv, rx in ((["-E", r"\xab[\x00-\x0f]"], re.compile(rb"\xab[\x00-\x0f]")),
                     (["--hex", "abcd"], re.compile(re.escape(b"\xab\xcd"))),
                     (["-f", str(patterns)], re.compile(b"\xef\x01\x02|\xab\xcd|\x10\x20"))):
        want = set()
        for pid in dumped.pids:
            for s, e in _runs(pagemap_pages(dumped.images, pid)):
                data = dumped.restored.read(pid, s, e - s)
                want |= {(pid, s + m.start()) for m in rx.finditer(data)}
        code, out, err = cli(["grep", str(dumped.images), *argv, "--json", "--engine", engine, *strategy], capsys)
        assert code == 0, err
        got = [(m["pid"], m["vaddr"]) for m in map(json.loads, out.splitlines())]
        assert len(got) == len(set(got))
        assert set(got) == want
        assert len(want) > 10


@pytest.mark.parametrize("strategy", [[], ["--strategy", "mmap"], ["--strategy", "pread"]])
def test_grep_search_thread_and_window_edges_change_nothing(
    dumped: Dumped, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, strategy: list[str],
) -> None:
    """The search thread (a window searched while the next is read) and small windows, whose edges cut
    strings and matches, give the output of one search after the other in large windows, line for line; so
    do windows that drop the runs searched before them at once (TRIM_RUNS 1)."""
    cases = (["-E", r"[a-z]{4,12}", "-C", "3"], ["--strings", "", "-n", "12"], ["--hex", "00 00 00 01"],
             ["-i", "secret"], ["--strings", "e", "-n", "6", "--json"])
    want = []
    monkeypatch.setattr(grep_mod, "SEARCH_THREAD", False)
    for argv in cases:
        code, out, err = cli(["grep", str(dumped.images), *argv, *strategy], capsys)
        assert code == 0, err
        assert out.count("\n") > 5
        want.append(out)
    monkeypatch.setattr(grep_mod, "SEARCH_THREAD", True)
    for window, trim in ((4099, 1), (4099, grep_mod.TRIM_RUNS), (1 << 16, 1)):
        monkeypatch.setattr(grep_mod, "STRETCH_WINDOW", window)
        monkeypatch.setattr(grep_mod, "TRIM_RUNS", trim)
        for argv, expected in zip(cases, want, strict=True):
            code, out, err = cli(["grep", str(dumped.images), *argv, *strategy], capsys)
            assert (code, out) == (0, expected), (window, trim, argv, err)


@pytest.mark.parametrize("strategy", [[], ["--strategy", "mmap"], ["--strategy", "pread"]])
def test_grep_packed_short_runs_find_what_each_run_searched_alone_finds(
    dumped: Dumped, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, strategy: list[str],
    tmp_path: Path,
) -> None:
    """Short runs read back to back into one buffer and searched together (`Packer`), in packs of one to a
    few runs flushed every few runs, with and without the search thread, give the output of each run read
    and searched on its own (PACK_RUN 0), line for line: no match crosses from one run into the next, strings
    and context end with their run, matches stay in address order."""
    patterns = tmp_path / "patterns"
    patterns.write_bytes(b"secret\nhello\n\x00\x00\x00\x01\n")
    cases = (["-E", r"[a-z]{4,12}", "-C", "3"], ["--strings", "", "-n", "8"], ["--hex", "00 00 00 01"],
             ["-i", "secret", "--json"], ["-f", str(patterns), "-C", "2"])
    packs = []
    real_emit = grep_mod.Packer._emit

    def counted(self: Any, job: Any, *args: Any) -> Any:
        packs.append(job[4])
        return real_emit(self, job, *args)

    monkeypatch.setattr(grep_mod.Packer, "_emit", counted)
    monkeypatch.setattr(grep_mod, "PACK_RUN", 0)
    want = []
    for argv in cases:
        code, out, err = cli(["grep", str(dumped.images), *argv, *strategy], capsys)
        assert code == 0, err
        assert out.count("\n") > 5
        want.append(out)
    assert packs == []
    for pack_run, chunk, pending, thread in ((64 << 10, 8 << 20, 1 << 16, True), (64 << 10, 8 << 20, 1 << 16, False),
                                             (16 << 10, (16 << 10) + 1, 3, True), (4096, 4096, 1, False)):
        monkeypatch.setattr(grep_mod, "PACK_RUN", pack_run)
        monkeypatch.setattr(grep_mod, "CHUNK", chunk)
        monkeypatch.setattr(grep_mod, "PENDING_RUNS", pending)
        monkeypatch.setattr(grep_mod, "SEARCH_THREAD", thread)
        for argv, expected in zip(cases, want, strict=True):
            packs.clear()
            code, out, err = cli(["grep", str(dumped.images), *argv, *strategy], capsys)
            assert (code, out) == (0, expected), (pack_run, chunk, pending, thread, argv, err)
            assert len(packs) > 3 and max(packs) <= chunk


def test_grep_hex_strings_and_context(dumped: Dumped, capsys: pytest.CaptureFixture[str]) -> None:
    secret = dumped.victim.info["secret"]
    addr, text = secret["addr"], secret["text"].encode()
    pid = dumped.victim.pid
    code, out, _ = cli(["grep", str(dumped.images), "--hex", text.hex(), "--json", "-C", "5", "--pid", str(pid)],
                       capsys)
    hits = [m for m in map(json.loads, out.splitlines()) if m["vaddr"] == addr]
    assert code == 0 and len(hits) == 1
    assert hits[0]["match"] == text.hex() and hits[0]["encoding"] == "hex"
    mem = dumped.restored.read(pid, addr - 5, len(text) + 10)
    assert hits[0]["before"] == mem[:5].hex() and hits[0]["after"] == mem[-5:].hex()
    code, out, _ = cli(["grep", str(dumped.images), "--strings", "-n", "30", "SECRET", "--json"], capsys)
    strings = [m for m in map(json.loads, out.splitlines())]
    assert any(m["vaddr"] <= addr and text.decode() in m["match"] for m in strings)
    assert all(len(m["match"]) >= 30 and "SECRET" in m["match"] for m in strings)
    code, out, _ = cli(["grep", str(dumped.images), "no-such-bytes-anywhere-\x01\x02"], capsys)
    assert code == 1 and out == ""


def test_ps_shows_the_real_argv_and_environment(dumped: Dumped, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = cli(["ps", str(dumped.images), "--json"], capsys)
    assert code == 0, err
    procs = {p["pid"]: p for p in map(json.loads, out.splitlines())}
    root = procs[dumped.victim.pid]
    argv = [str(dumped.exe), str(dumped.victim.info_path), *ARGS]
    assert root["argv"] == argv
    assert root["environ"] == [f"{k}={v}" for k, v in ENV.items()]
    child = [p for p in procs.values() if p["ppid"] == root["pid"]]
    assert len(child) == 1 and child[0]["argv"] == argv
    code, out, err = cli(["ps", str(dumped.images)], capsys)
    line = next(ln for ln in out.splitlines() if ln.split()[0] == str(root["pid"]))
    assert " ".join(argv) + " " + " ".join(f"{k}={v}" for k, v in ENV.items()) in line
    assert "\\_ " + " ".join(argv) in out


def _check_extract(out: Path, dumped: Dumped, layout: str) -> None:
    index = json.loads((out / "index.json").read_text())
    assert index["layout"] == layout
    covered: dict[int, set[int]] = {pid: set() for pid in dumped.pids}
    for f in index["files"]:
        path = out / f["file"]
        assert path.stat().st_size == f["size"]
        with open(path, "rb") as fh:
            for v in f["vmas"]:
                for s, e in v["data"]:
                    fh.seek(s - v["start"] + v["file_offset"])
                    got = fh.read(e - s)
                    want = dumped.restored.read(f["pid"], s, e - s)
                    assert hashlib.sha256(got).digest() == hashlib.sha256(want).digest(), (f["file"], hex(s))
                    if "shmem" not in v:
                        covered[f["pid"]] |= set(range(s, e, 4096))
    for pid in dumped.pids:
        assert covered[pid] == set(pagemap_pages(dumped.images, pid))


def test_extract_per_vma_files_equal_restored_memory(dumped: Dumped, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    code, _stdout, err = cli(["extract", str(dumped.images), "-o", str(out)], capsys)
    assert code == 0, err
    _check_extract(out, dumped, "vma")
    names = [p.name for p in (out / f"pid-{dumped.victim.pid}").iterdir()]
    assert all(re.fullmatch(r"[0-9a-f]+-[0-9a-f]+-[r-][w-][x-][ps]\.bin", n) for n in names)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary directory left beside


def test_extract_sparse_layout_has_data_at_vaddr_offsets(dumped: Dumped, capsys: pytest.CaptureFixture[str]) -> None:
    # ext4 files stop at 16 TiB; user addresses go to 128 TiB: tmpfs holds such sparse files.
    base = Path(tempfile.mkdtemp(dir="/dev/shm"))
    try:
        out = base / "sparse"
        code, _, err = cli(["extract", str(dumped.images), "-o", str(out), "--layout", "sparse"], capsys)
        assert code == 0, err
        _check_extract(out, dumped, "sparse")
        for f in json.loads((out / "index.json").read_text())["files"]:
            st = os.stat(out / f["file"])
            assert st.st_blocks * 512 < st.st_size  # holes stay holes
    finally:
        shutil.rmtree(base)


def test_extract_filters_by_name_perms_and_range(dumped: Dumped, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    pid = dumped.victim.pid
    secret = dumped.victim.info["secret"]["addr"]
    lo, hi = secret - 0x2000, secret + 0x1000
    out = tmp_path / "f"
    code, stdout, err = cli(["extract", str(dumped.images), "-o", str(out), "--pid", str(pid), "--perms", "rw",
                             "--range", f"{lo:x}-{hi:x}", "--json"], capsys)
    assert code == 0, err
    index = json.loads(stdout)
    assert index.pop("output") == str(out) and index == json.loads((out / "index.json").read_text())
    spans = [(v["start"], v["end"]) for f in index["files"] for v in f["vmas"]]
    assert spans and all(lo <= s < e <= hi for s, e in spans)
    assert sum(e - s for s, e in spans) == hi - lo
    _check_extract_partial(out, dumped)
    out2 = tmp_path / "g"
    code, stdout, err = cli(["extract", str(dumped.images), "-o", str(out2), "--vma", "*.file"], capsys)
    files = json.loads((out2 / "index.json").read_text())["files"]
    assert code == 0 and files and all(v["mapping"].endswith(".file") for f in files for v in f["vmas"])


def _check_extract_partial(out: Path, dumped: Dumped) -> None:
    for f in json.loads((out / "index.json").read_text())["files"]:
        data = (out / f["file"]).read_bytes()
        for v in f["vmas"]:
            for s, e in v["data"]:
                assert data[s - v["start"] : e - v["start"]] == dumped.restored.read(f["pid"], s, e - s)


def test_read_hexdump_is_hexdump_C(dumped: Dumped, tmp_path: Path) -> None:
    region = next(r for r in dumped.victim.info["regions"] if r["name"] == "anon")
    start, length = region["start"] + 0x100, 5 * 4096 + 0x40  # over a hole (zero-filled) page
    argv = ["read", str(dumped.images), "--pid", str(dumped.victim.pid), hex(start), str(length), "--zero-fill"]
    raw, dump_ = run_jobs("crit_pageread", [{"argv": argv}, {"argv": [*argv, "--hexdump"]}])
    assert raw["rc"] == 0 and dump_["rc"] == 0, raw["err"] + dump_["err"]
    (tmp_path / "raw").write_bytes(raw["out"])
    want = subprocess.run(["hexdump", "-C", str(tmp_path / "raw")], capture_output=True, text=True, check=True).stdout
    ours = []
    for line in dump_["out"].decode().splitlines():
        if line == "*":
            ours.append(line)
            continue
        addr, _, rest = line.partition(" ")
        ours.append(f"{int(addr, 16) - start:08x}" + (" " + rest if rest else ""))
    assert "\n".join(ours) + "\n" == want
    assert "*" in ours


def test_pages_table_lists_every_entry_with_totals(dumped: Dumped, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = cli(["pages", str(dumped.images), "--json"], capsys)
    assert code == 0, err
    for sec in map(json.loads, out.splitlines()):
        if "pid" not in sec:
            continue
        pages = []
        for e in sec["entries"]:
            pages += range(e["start"], e["end"], 4096)
            assert e["sources"] and all(s["depth"] == 0 and s["pages_file"].endswith(".img") for s in e["sources"])
        assert pages == pagemap_pages(dumped.images, sec["pid"])
        assert sec["totals"]["total"] == len(pages)
        assert sum(v for k, v in sec["totals"].items() if k != "total") == len(pages)


def test_broken_checkpoint_extract_leaves_nothing(dumped: Dumped, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(dumped.images, broken)
    pages = sorted(broken.glob("pages-*.img"), key=lambda p: p.stat().st_size)[-1]
    os.truncate(pages, pages.stat().st_size - 4096)
    out = tmp_path / "out"
    res = run_jobs("crit_pageread", [{"argv": ["extract", str(broken), "-o", str(out)]},
                                     {"argv": ["grep", str(broken), "x"]},
                                     {"argv": ["read", str(tmp_path / "nope"), "0x1000"]},
                                     {"argv": ["ps", str(broken), "--pid", "1"]}])
    for r in res:
        assert r["rc"] not in (0, 99) and r["out"] == b""
        assert len(r["err"].strip().splitlines()) == 1 and "Traceback" not in r["err"], r["err"]
    assert "short pages file" in res[0]["err"] and str(pages) in res[0]["err"]
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["broken"]
    res = run_jobs("crit_pageread", [{"argv": ["--debug", "extract", str(broken), "-o", str(out)]}])
    assert "Traceback" in res[0]["err"] and not out.exists()


def test_plugins_lists_commands_hooks_and_strategies(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = cli(["plugins", "--json"], capsys)
    assert code == 0
    plugins: dict[str, Any] = {p["name"]: p for p in map(json.loads, out.splitlines())}
    for name in ("grep", "extract", "read", "ps", "pages", "crit_compat"):
        assert "crit_pageread_add_commands" in plugins[f"crit_pageread.cli.{name}"]["hooks"]
    assert plugins["crit_pageread.strategies.preadv"]["strategies"] == ["preadv"]
    _code, out, _ = cli(["plugins"], capsys)
    assert "strategy mmap" in out and "crit_pageread.cli.grep" in out


def test_progress_bar_on_a_tty_only(dumped: Dumped, tmp_path: Path) -> None:
    import pty
    import sys

    master, slave = pty.openpty()
    try:
        proc = subprocess.run([sys.executable, "-m", "crit_pageread", "extract", str(dumped.images), "-o",
                               str(tmp_path / "tty")], stderr=slave, stdout=subprocess.PIPE, timeout=120)
        os.close(slave)
        tty_err = b""
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            tty_err += chunk
    finally:
        os.close(master)
    assert proc.returncode == 0
    assert b"extract [" in tty_err and tty_err.endswith(b"\r\x1b[K")  # drawn, then erased
    piped = subprocess.run([sys.executable, "-m", "crit_pageread", "extract", str(dumped.images), "-o",
                            str(tmp_path / "pipe")], capture_output=True, timeout=120)
    assert piped.returncode == 0 and piped.stderr == b""


def test_grep_without_hyperscan_says_so_once_and_finds_the_same(
    dumped: Dumped, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from crit_pageread import search

    secret = dumped.victim.info["secret"]["text"]
    code, fast, _ = cli(["grep", str(dumped.images), secret, "--json"], capsys)
    monkeypatch.setattr(search, "hyperscan_module", lambda: None)
    monkeypatch.setattr(grep_mod, "hyperscan_module", lambda: None)
    code2, slow, err = cli(["grep", str(dumped.images), secret, "--json"], capsys)
    assert code == code2 == 0 and fast == slow
    assert err.count("hyperscan is not installed") == 1 and "crit-pageread[fast]" in err
