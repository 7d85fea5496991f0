"""scan: YARA rules (yara-x) over real CRIU checkpoints, checked against the restored processes' memory.

The victim (crit_pageread/data/victim.c) holds a secret across a page boundary that is also a
pagemap-entry and VMA boundary, fills shared memory (anonymous shared, memfd, SysV) and bulk memory
with a pattern that depends only on (seed, region, page, word): the rules' hex strings are that
pattern at known addresses, so the expected matches come from the program, not from a reader of ours.
Every reported match is read back from the restored process (`/proc/PID/mem`) and with `read`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cli_driver import run_jobs
from criu_harness import Restored, Victim, dump, free_port, restore_stopped, start_victim
from native_support import use_helper

from crit_pageread.pagemap import load_pagemap

ROOT = Path(__file__).resolve().parent.parent
PAGE = 4096
MASK = (1 << 64) - 1
SEEDS = (31, 32, 33)
CLI = [sys.executable, "-m", "crit_pageread"]


def word(seed: int, rid: int, page: int, w: int) -> int:
    """victim.c's word(): the pattern's 64-bit word w of page `page` of region `rid`."""
    x = ((seed * 0x9E3779B97F4A7C15) & MASK) ^ (rid << 40) ^ (page << 12) ^ w
    x ^= x >> 33
    x = (x * 0xFF51AFD7ED558CCD) & MASK
    x ^= x >> 33
    x = (x * 0xC4CEB9FE1A85EC53) & MASK
    x ^= x >> 33
    return x


def pattern_bytes(seed: int, rid: int, offset: int, length: int) -> bytes:
    """`length` bytes of a region's pattern from byte `offset` (8-aligned) of the region."""
    assert offset % 8 == 0 and length % 8 == 0
    out = b""
    for i in range(offset // 8, (offset + length) // 8):
        out += word(seed, rid, i // (PAGE // 8), i % (PAGE // 8)).to_bytes(8, "little")
    return out


def hexstr(data: bytes) -> str:
    return " ".join(f"{b:02x}" for b in data)


@dataclass
class Dumped:
    seed: int
    victim: Victim
    images: Path

    @property
    def pid(self) -> int:
        return self.victim.pid

    def region(self, name: str) -> dict[str, Any]:
        return next(r for r in self.victim.info["regions"] if r["name"] == name)

    @property
    def secret(self) -> tuple[int, bytes]:
        s = self.victim.info["secret"]
        return int(s["addr"]), s["text"].encode()

    def bulk_offsets(self) -> list[int]:
        """Offsets in bulk0 of the bulk strings: spread so that some fall on window edges and overlaps."""
        size = self.region("bulk0")["len"]
        return [off for off in range(8, size - 32, 40_968) if off % 8 == 0]


def rules_for(d: Dumped) -> str:
    """Rules with text, hex (with wildcards and jumps) and regex strings, and conditions on them."""
    _, text = d.secret
    anon = d.region("anon-shared")
    memfd = d.region("memfd")
    sysv = d.region("sysv-shm")
    cross = pattern_bytes(d.seed, anon["id"], 4 * PAGE - 8, 16)  # across anon-shared's 4th page boundary
    mcross = pattern_bytes(d.seed, memfd["id"], 2 * PAGE - 8, 16)
    scross = pattern_bytes(d.seed, sysv["id"], 3 * PAGE - 8, 16)
    bulk = d.region("bulk0")
    bulk_strings = "\n".join(
        f"    $b{i} = {{ {hexstr(pattern_bytes(d.seed, bulk['id'], off, 16))} }}"
        for i, off in enumerate(d.bulk_offsets())
    )
    return f"""
rule secret_text : credential demo {{
  meta:
    author = "tests"
    severity = 3
  strings:
    $text = "{text.decode()}"
    $re = /SECRET-[0-9]+-spans-two/
    $wild = {{ 43 52 49 54 2D ?? 41 47 45 [1-6] 45 41 44 }}
  condition:
    $text and $re and #wild >= 1
}}

rule secret_with_missing_string {{
  strings:
    $text = "{text.decode()}"
    $nope = "this string is nowhere in memory 0123456789"
  condition:
    $text and $nope
}}

rule shared_memory {{
  strings:
    $anon = {{ {hexstr(cross)} }}
    $memfd = {{ {hexstr(mcross[:7])} ?? {hexstr(mcross[8:])} }}
    $sysv = {{ {hexstr(scross)} }}
  condition:
    any of them
}}

rule bulk_edges {{
  strings:
{bulk_strings}
  condition:
    any of them
}}
"""


@dataclass
class Fleet:
    dumps: list[Dumped]
    rules: Path
    directory: Path
    tar: Path
    tzst: Path
    broken: Path
    restored: Restored


def _tar(src: Path, out: Path, prefix: str) -> None:
    with tarfile.open(out, "w") as tar:
        for p in sorted(src.iterdir()):
            if p.name.endswith(".log") or p.name == "restore.pid":
                continue
            tar.add(p, arcname=f"{prefix}{p.name}")


@pytest.fixture(scope="module")
def fleet(victim_exe: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    work = tmp_path_factory.mktemp("scan")
    dumps = []
    for seed in SEEDS:
        victim = start_victim(victim_exe, work / f"run{seed}", "--shm", "--mib", "2", "--seed", str(seed),
                              ipc_ns=True)
        try:
            dumps.append(Dumped(seed, victim, dump(victim, work / f"images{seed}")))
        finally:
            victim.kill()
    rules = work / "rules.yar"
    rules.write_text("".join(rules_for(d).replace("rule ", f"rule s{d.seed}_") for d in dumps))
    tar = work / "second.tar"
    _tar(dumps[1].images, tar, "")
    plain = work / "third.tar"
    _tar(dumps[2].images, plain, "checkpoint/")  # images under checkpoint/, as Podman and kubelet write them
    tzst = work / "third.tar.zst"
    subprocess.run(["zstd", "-q", "--rm", str(plain), "-o", str(tzst)], check=True)
    broken = work / "broken.tar"
    broken.write_bytes(tar.read_bytes()[: 3 * 512 + 100])
    with restore_stopped(dumps[0].images) as restored:
        yield Fleet(dumps, rules, dumps[0].images, tar, tzst, broken, restored)


def scan(*argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, "scan", *argv], capture_output=True, text=True, timeout=600, cwd=cwd)


def matches(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines()]


def maps_runs(host_pid: int) -> list[tuple[int, int]]:
    """Readable ranges of /proc/PID/maps, adjacent ones joined (the restored process's memory)."""
    runs: list[tuple[int, int]] = []
    for line in Path(f"/proc/{host_pid}/maps").read_text().splitlines():
        rng, perms = line.split()[:2]
        start, end = (int(x, 16) for x in rng.split("-"))
        if "r" not in perms or line.rstrip().endswith(("[vvar]", "[vsyscall]")):
            continue
        if runs and runs[-1][1] == start:
            runs[-1] = (runs[-1][0], end)
        else:
            runs.append((start, end))
    return runs


def restored_finds(restored: Restored, pid: int, regex: bytes) -> set[int]:
    """Addresses where `regex` matches in the restored process's memory (Python's re, not ours)."""
    found: set[int] = set()
    fd = os.open(f"/proc/{restored.host_pid(pid)}/mem", os.O_RDONLY)
    try:
        for start, end in maps_runs(restored.host_pid(pid)):
            try:
                data = os.pread(fd, end - start, start)
            except OSError:
                continue
            found.update(start + m.start() for m in re.finditer(regex, data))
    finally:
        os.close(fd)
    return found


def test_scan_finds_every_string_where_the_program_put_it_and_read_returns_it(fleet: Fleet) -> None:
    d = fleet.dumps[0]
    proc = scan("--rules", str(fleet.rules), str(fleet.directory), "--json", "--jobs", "1")
    assert proc.returncode == 0, proc.stderr
    got = matches(proc.stdout)
    mine = [m for m in got if m["rule"].startswith(f"s{d.seed}_")]
    assert all(m["checkpoint"] == str(fleet.directory) and m["pid"] == d.pid for m in mine)
    by = {(m["rule"], m["identifier"]): sorted(x["vaddr"] for x in mine if (x["rule"], x["identifier"]) ==
                                             (m["rule"], m["identifier"])) for m in mine}
    addr, text = d.secret
    # the secret crosses a page, a pagemap entry and a VMA (file mapping -> anonymous page)
    assert addr // PAGE != (addr + len(text) - 1) // PAGE
    pm = load_pagemap(d.images / f"pagemap-{d.pid}.img", PAGE)
    assert pm.find(addr) != pm.find(addr + len(text) - 1)
    hit = next(m for m in mine if m["identifier"] == "$text" and m["vaddr"] == addr)
    vma = hit["vma"]  # the VMA holding vaddr, as `x DIR mems` lists VMAs (the JSON convention)
    assert hit["mapping"] == vma["mapping"] and vma["mapping"].endswith(".file")
    assert vma["start"] < addr < vma["end"] < addr + len(text) and vma["kind"] == "file-private"
    assert set(vma) == {"start", "end", "perms", "kind", "mapping"} and vma["perms"] == "rw-p"
    mems = json.loads(subprocess.run([*CLI, "x", str(fleet.directory), "mems", "--json"], capture_output=True,
                                     text=True, check=True).stdout.splitlines()[0])
    assert mems["pid"] == d.pid and vma in mems["vmas"]
    for key in ("checkpoint", "pid", "vaddr", "rule", "identifier", "vma", "mapping"):  # what the issue asks
        assert key in hit, key
    assert hit["tags"] == ["credential", "demo"] and hit["meta"] == {"author": "tests", "severity": 3}
    assert hit["hex"] == text.hex() and hit["length"] == len(text)
    # text and regex: exactly where Python finds them in the restored process's memory
    restored = fleet.restored
    assert by[(f"s{d.seed}_secret_text", "$text")] == sorted(restored_finds(restored, d.pid, re.escape(text)))
    assert by[(f"s{d.seed}_secret_text", "$re")] == sorted(
        restored_finds(restored, d.pid, rb"SECRET-[0-9]+-spans-two"))
    assert addr in by[(f"s{d.seed}_secret_text", "$wild")]
    assert not any(m["rule"] == f"s{d.seed}_secret_with_missing_string" for m in got)
    # shared memory: anonymous shared, memfd and SysV, each across a page boundary
    for ident, name, off in (("$anon", "anon-shared", 4), ("$memfd", "memfd", 2), ("$sysv", "sysv-shm", 3)):
        want = d.region(name)["start"] + off * PAGE - 8
        assert by[(f"s{d.seed}_shared_memory", ident)] == [want], ident
        vma = next(m for m in mine if m["identifier"] == ident)["vma"]
        assert vma["start"] <= want < vma["end"] and vma["perms"] == "rw-s", vma
    # bulk strings: each once, at its place
    bulk = d.region("bulk0")
    for i, off in enumerate(d.bulk_offsets()):
        assert by[(f"s{d.seed}_bulk_edges", f"$b{i}")] == [bulk["start"] + off]
    # the rules of the other checkpoints' secrets do not match here
    assert not any(m["rule"].startswith(f"s{fleet.dumps[1].seed}_secret") for m in got)
    # every match: the restored process and `read` hold its bytes at its vaddr
    for m in got:
        assert restored.read(m["pid"], m["vaddr"], m["length"]).hex() == m["hex"], m
    assert any(m["vma"]["perms"].endswith("s") for m in got)  # shared memory too: `read` covers the process's view
    reads = run_jobs("crit_pageread", [
        {"argv": ["read", str(fleet.directory), "--pid", str(m["pid"]), hex(m["vaddr"]), str(m["length"])]}
        for m in got
    ])
    for m, r in zip(got, reads, strict=True):
        assert r["rc"] == 0 and r["out"].hex() == m["hex"], (m, r["err"])


def test_scan_windows_find_each_match_once_whatever_the_window(fleet: Fleet, tmp_path: Path) -> None:
    # A condition on several strings is evaluated per scan (README): whether `$text and $re and #wild >= 1`
    # holds in a window depends on where the process's stack put them. With `any of them` every string
    # match stands alone, so the windows must give exactly the matches of one scan per run.
    per_string = tmp_path / "per-string.yar"
    per_string.write_text(re.sub(r"condition:\n(?:    .*\n)+", "condition:\n    any of them\n",
                                 fleet.rules.read_text()))
    base = scan("--rules", str(per_string), str(fleet.directory), "--json", "--jobs", "1")
    assert base.returncode == 0, base.stderr
    assert '"identifier": "$wild"' in base.stdout and '"rule": "s' in base.stdout
    for window, overlap in ((65536, 4096), (65536 + 4096 * 3, 64), (1 << 20, 1000)):
        small = scan("--rules", str(per_string), str(fleet.directory), "--json", "--window", str(window),
                     "--overlap", str(overlap))
        assert small.returncode == 0, small.stderr
        assert small.stdout == base.stdout, (window, overlap)


def test_scan_many_checkpoints_directory_tar_and_zst_with_a_broken_one(fleet: Fleet) -> None:
    args = [str(fleet.directory), str(fleet.tar), str(fleet.broken), str(fleet.tzst)]
    proc = scan("--rules", str(fleet.rules), *args, "--json", "--jobs", "2")
    assert proc.returncode == 2, proc.stderr
    got = matches(proc.stdout)
    names = [m["checkpoint"] for m in got]
    # in the order named, each checkpoint's matches together
    assert sorted(set(names), key=names.index) == [str(fleet.directory), str(fleet.tar), str(fleet.tzst)]
    for name, d in zip((fleet.directory, fleet.tar, fleet.tzst), fleet.dumps, strict=True):
        addr, _ = d.secret
        own = [m for m in got if m["checkpoint"] == str(name)]
        assert {(m["rule"], m["vaddr"]) for m in own if m["identifier"] == "$text"} >= {
            (f"s{d.seed}_secret_text", addr)}
        assert not any(m["rule"].startswith("s") and not m["rule"].startswith(f"s{d.seed}_")
                       and "secret" in m["rule"] for m in own)
    err = [line for line in proc.stderr.splitlines() if str(fleet.broken) in line]
    assert len(err) == 1 and err[0].startswith(f"crit-pageread: scan: {fleet.broken}: "), proc.stderr
    assert "Traceback" not in proc.stderr
    summaries = [line for line in proc.stderr.splitlines() if " matches of " in line]
    assert len(summaries) == 3
    assert proc.stderr.splitlines()[-1] == f"crit-pageread: scan: 4 checkpoints, {len(got)} matches, 1 errors"
    # the same as scanning each alone, in one process
    alone = scan("--rules", str(fleet.rules), str(fleet.tzst), "--json", "--jobs", "1")
    assert alone.returncode == 0, alone.stderr
    assert [m for m in got if m["checkpoint"] == str(fleet.tzst)] == matches(alone.stdout)


def test_scan_a_directory_of_checkpoints_and_a_glob(fleet: Fleet, tmp_path: Path) -> None:
    store = tmp_path / "checkpoints"
    store.mkdir()
    shutil.copy(fleet.tar, store / "a.tar")
    shutil.copy(fleet.tzst, store / "b.tar.zst")
    (store / "notes.txt").write_text("not a checkpoint\n")
    predump = store / "predump"  # a chain's parent: inventory and pages, no pstree: not a checkpoint of its own
    predump.mkdir()
    shutil.copy(fleet.directory / "inventory.img", predump / "inventory.img")
    by_dir = scan("--rules", str(fleet.rules), str(store), "--json")
    by_glob = scan("--rules", str(fleet.rules), str(store / "*.tar*"), "--json")
    assert by_dir.returncode == by_glob.returncode == 0, by_dir.stderr + by_glob.stderr
    assert by_dir.stdout == by_glob.stdout
    names = {m["checkpoint"] for m in matches(by_dir.stdout)}
    assert names == {str(store / "a.tar"), str(store / "b.tar.zst")}
    none = scan("--rules", str(fleet.rules), str(tmp_path / "nothing-*"))
    assert none.returncode == 2 and "no file matches" in none.stderr


def test_scan_filters_text_output_and_exit_codes(fleet: Fleet, tmp_path: Path) -> None:
    d = fleet.dumps[0]
    addr, text = d.secret
    proc = scan("--rules", str(fleet.rules), str(fleet.directory), "--kind", "memfd")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines and all(" memfd" in line or "/memfd:" in line for line in lines), lines
    assert all(line.startswith(f"s{d.seed}_shared_memory ") for line in lines)
    memfd = d.region("memfd")
    want = memfd["start"] + 2 * PAGE - 8
    assert any(f"{fleet.directory}:{d.pid}:{want:#x}:" in line and " $memfd: " in line for line in lines)
    text_line = scan("--rules", str(fleet.rules), str(fleet.directory), "--range",
                     f"{addr - 64:x}-{addr + 64:x}")
    assert text_line.returncode == 0
    first = next(line for line in text_line.stdout.splitlines() if " $text: " in line)
    assert first.startswith(f"s{d.seed}_secret_text [credential,demo] [author=\"tests\",severity=3] "
                            f"{fleet.directory}:{d.pid}:{addr:#x}:")
    assert first.endswith(f"$text: {text[:32].decode()}...")
    nothing = tmp_path / "none.yar"
    nothing.write_text('rule absent { strings: $a = "no such bytes in any checkpoint 9f8e7d" condition: $a }\n')
    proc = scan("--rules", str(nothing), str(fleet.directory))
    assert proc.returncode == 1 and proc.stdout == "" and " 0 matches of 0 rules" in proc.stderr
    bad = tmp_path / "bad.yar"
    bad.write_text("rule broken { condition: $missing }\n")
    proc = scan("--rules", str(bad), str(fleet.directory))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and str(bad) in proc.stderr, proc.stderr
    proc = scan("--rules", str(fleet.rules), str(fleet.directory), "--pid", "999999")
    assert proc.returncode == 1 and " 0 processes" in proc.stderr


def test_scan_without_yara_x_says_how_to_install_it(fleet: Fleet) -> None:
    code = ("import sys; sys.modules['yara_x'] = None\n"
            "from crit_pageread.cli.main import main\n"
            f"sys.exit(main(['scan', '--rules', {str(fleet.rules)!r}, {str(fleet.directory)!r}]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr == ("crit-pageread: scan needs yara-x: pip install 'crit-pageread[scan]' "
                           "(or pip install yara-x)\n")


def test_example_rules_of_the_readme_find_the_demo_secret(fleet: Fleet) -> None:
    d = fleet.dumps[0]
    addr, _ = d.secret
    proc = scan("--rules", str(ROOT / "examples" / "rules.yar"), str(fleet.directory), "--json")
    assert proc.returncode == 0, proc.stderr
    got = matches(proc.stdout)
    assert {"crit_pageread_demo_secret"} == {m["rule"] for m in got}
    assert any(m["vaddr"] == addr and m["identifier"] == "$secret" for m in got)


def test_scan_on_a_dask_cluster_gives_the_local_output(fleet: Fleet) -> None:
    import distributed
    args = ["--rules", str(fleet.rules), str(fleet.directory), str(fleet.tar), str(fleet.broken), str(fleet.tzst),
            "--json"]
    local = scan(*args, "--jobs", "2")
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False, host="127.0.0.1",
                                  dashboard_address=None, protocol="tcp") as cluster:
        remote = scan(*args, "--dask", cluster.scheduler_address)
    assert remote.returncode == local.returncode == 2, remote.stderr
    assert remote.stdout == local.stdout and remote.stdout
    def strip(err: str) -> list[str]:
        return [re.sub(r", [0-9.]+ s, [0-9]+ MiB peak RSS$", "", line) for line in err.splitlines()]
    assert strip(remote.stderr) == strip(local.stderr)


def test_scan_reads_lazy_pages_from_criu_with_the_remote_strategy(
    victim_exe: Path, tmp_path: Path, pipe_max_size: None
) -> None:
    from criu_harness import start_lazy_dump

    victim = start_victim(victim_exe, tmp_path / "v", "--seed", "34")
    addr, text = int(victim.info["secret"]["addr"]), victim.info["secret"]["text"]
    rules = tmp_path / "secret.yar"
    rules.write_text(f'rule secret {{ strings: $s = "{text}" condition: $s }}\n')
    images = tmp_path / "img"
    proc, port = start_lazy_dump(victim, images)
    try:
        # the secret's second page is lazy: on CRIU's page server only
        local = scan("--rules", str(rules), str(images), "--json")
        assert addr not in {m["vaddr"] for m in matches(local.stdout)}, local.stdout
        assert "MiB of lazy pages not scanned (use --strategy remote)" in local.stderr
        config = tmp_path / "remote.toml"
        config.write_text(f"[remote]\nport = {port}\ntimeout = 20\n")
        remote = scan("--rules", str(rules), str(images), "--json", "--strategy", "remote", "--config", str(config))
        assert remote.returncode == 0, remote.stderr
        assert addr in {m["vaddr"] for m in matches(remote.stdout)}
        assert "lazy pages not scanned" not in remote.stderr
        assert proc.wait(30) == 0  # the remote reader's CLOSE ended the lazy dump
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        victim.kill()


def test_scan_progress_bar_on_a_tty_only(fleet: Fleet) -> None:
    import pty

    args = [*CLI, "scan", "--rules", str(fleet.rules), str(fleet.directory), str(fleet.tar), "--jobs", "1"]
    master, slave = pty.openpty()
    try:
        proc = subprocess.run(args, stderr=slave, stdout=subprocess.PIPE, timeout=300)
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
    # drawn after the first checkpoint, erased before the next line; nothing left after the last line
    assert re.search(rb"\rscan \[#+ *\] +50\.0% 1/2 checkpoints\x1b\[K\r\x1b\[Kcrit-pageread: scan: ", tty_err), tty_err
    assert re.search(rb"crit-pageread: scan: 2 checkpoints, [0-9]+ matches, 0 errors\r\n$", tty_err), tty_err
    piped = subprocess.run(args, capture_output=True, timeout=300)
    assert piped.returncode == 0 and b"scan [" not in piped.stderr and b"\x1b" not in piped.stderr


def test_scan_with_no_dask_scheduler_is_one_line(fleet: Fleet) -> None:
    port = free_port()  # nothing listens there
    proc = scan("--rules", str(fleet.rules), str(fleet.directory), "--dask", f"tcp://127.0.0.1:{port}")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and f"--dask tcp://127.0.0.1:{port}: cannot connect" in proc.stderr


def test_scan_of_an_incremental_chain_finds_what_the_dump_holds(fleet: Fleet, tmp_path: Path) -> None:
    from chains import build_chain

    info = build_chain(fleet.directory, tmp_path / "chain", 3, seed=5)
    assert sum(info.parent_pages.values()) and sum(info.stale_pages.values())  # PE_PARENT pages, stale parents
    want = scan("--rules", str(fleet.rules), str(fleet.directory), "--json", "--jobs", "1")
    got = scan("--rules", str(fleet.rules), str(tmp_path / "chain"), "--json")  # d1, d2 are not dumps: d3 only
    assert want.returncode == got.returncode == 0, got.stderr
    assert [{**m, "checkpoint": ""} for m in matches(got.stdout)] == [
        {**m, "checkpoint": ""} for m in matches(want.stdout)]
    assert {m["checkpoint"] for m in matches(got.stdout)} == {str(info.newest)}


# --- fragmented memory: short runs packed into one scan (synthetic images, yara-x as the oracle per run) ----

V1, V2, V3 = 0x100000, 0x100000 + 40 * PAGE, 0x40100000  # V2 right after V1; V3 far away


def _filler(n: int, seed: int) -> bytearray:
    """Bytes 0x80-0xff (no ASCII: nothing in them matches the rules by chance; no '!')."""
    import random

    rnd = random.Random(seed)
    return bytearray(0x80 | b for b in rnd.randbytes(n))


def _put(page: bytearray, at: int, text: bytes) -> bytearray:
    start = at if at >= 0 else len(page) + at
    page[start : start + len(text)] = text
    return page


FRAG_RULES = r"""
rule frag : t { strings:
    $hole = /CROSS-A-HOLE-[^!]{0,40}NOT-FOUND/
    $greedy = /GREEDY-[^!]{0,64}/
    $adj = "ACROSS-TWO-ENTRIES"
    $vmas = "ACROSS-TWO-VMAS"
    $far = "FAR-AWAY-STRING"
    $long = "IN-A-LONG-RUN"
    $start = { 53 54 41 52 54 2D 4F 46 }
    $word = "WORD" fullword
  condition: any of them }
"""


@pytest.fixture(scope="module")
def frag(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[tuple[int, bytes]]]:
    """pid 10: V1 (40 pages) and V2 (8 pages) adjacent, V3 far away. V1 holds single pages with a hole
    after each, two adjacent entries and a last page that V2's first continues; V3 a short run and a long one.
    Returns the images and the readable runs (vaddr, bytes) in address order."""
    from crit_pageread.testing import ImageBuilder, VmaSpec

    entries: list[tuple[int, bytes]] = []
    for k in range(0, 30, 2):  # pages 0, 2, ..., 28 of V1, a hole after each
        entries.append((V1 + k * PAGE, bytes(_filler(PAGE, k))))
    entries[0] = (V1, bytes(_put(bytearray(entries[0][1]), -20, b"CROSS-A-HOLE-")))
    entries[1] = (V1 + 2 * PAGE, bytes(_put(_put(bytearray(entries[1][1]), 0, b"NOT-FOUND...START-OF"), -20,
                                            b"GREEDY-abcdefghijklm")))
    entries[2] = (V1 + 4 * PAGE, bytes(_put(_put(bytearray(entries[2][1]), 0, b"WORD-at-a-run-start"), -1, b"X")))
    entries[3] = (V1 + 6 * PAGE, bytes(_put(bytearray(entries[3][1]), 0, b"WORD")))  # after "X" and a hole
    entries.append((V1 + 32 * PAGE, bytes(_put(_filler(PAGE, 32), -11, b"ACROSS-TWO-"))))  # two adjacent entries
    entries.append((V1 + 33 * PAGE, bytes(_put(_filler(PAGE, 33), 0, b"ENTRIES"))))
    entries.append((V1 + 39 * PAGE, bytes(_put(_filler(PAGE, 39), -11, b"ACROSS-TWO-"))))  # V1's last page
    entries.append((V2, bytes(_put(_filler(PAGE, 40), 0, b"VMAS"))))  # V2's first
    entries.append((V2 + 3 * PAGE, bytes(_filler(PAGE, 43))))
    entries.append((V3, bytes(_put(_filler(PAGE, 50), 100, b"FAR-AWAY-STRING"))))
    entries.append((V3 + 2 * PAGE, bytes(_put(_filler(20 * PAGE, 52), 17 * PAGE - 5, b"IN-A-LONG-RUN"))))
    entries.append((V3 + 24 * PAGE, bytes(_put(_filler(16 * PAGE, 53), -9, b"WORD"))))  # 64 KiB: a window's size
    images = tmp_path_factory.mktemp("frag") / "img"
    b = ImageBuilder(images)
    b.process(10, vmas=[VmaSpec(V1, V1 + 40 * PAGE), VmaSpec(V2, V2 + 8 * PAGE), VmaSpec(V3, V3 + 48 * PAGE)])
    b.pagemap(10, entries)
    b.write()
    runs: list[tuple[int, bytes]] = []
    for vaddr, data in entries:  # entries back to back (also across V1 -> V2) are one run
        if runs and runs[-1][0] + len(runs[-1][1]) == vaddr:
            runs[-1] = (runs[-1][0], runs[-1][1] + data)
        else:
            runs.append((vaddr, data))
    return images, runs


def _scan_lib(images: Path, rules: Path, **kw: Any) -> set[tuple[str, int, int]]:
    from crit_pageread.config import load_config
    from crit_pageread.scan import ScanOptions, Target, compile_rules, scan_checkpoint

    res = scan_checkpoint(Target(str(images), str(images)), compile_rules([str(rules)]),
                          ScanOptions(config=load_config(env={}), **kw))
    assert res.error is None, res.error
    assert all(m.pid == 10 for m in res.matches)
    return {(m.identifier or "", m.vaddr, m.length) for m in res.matches}


@pytest.mark.parametrize("helper", ["native", "python"])
def test_scan_packs_short_runs_and_finds_what_each_run_holds_alone(
    frag: tuple[Path, list[tuple[int, bytes]]], tmp_path: Path, helper: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Short runs are scanned packed; the matches are those of yara-x scanning each run alone: nothing
    across a hole (even where a regex would run on through the separator), a greedy regex cut at its
    run's end, `fullword` after a hole, strings across adjacent entries and adjacent VMAs, far runs and
    a long run, whatever the window (and so the pack) size; packs planned by the native helper or not."""
    import yara_x


    use_helper(helper, monkeypatch)
    images, runs = frag
    rules = tmp_path / "frag.yar"
    rules.write_text(FRAG_RULES)
    scanner = yara_x.Scanner(yara_x.compile(FRAG_RULES))
    want = {(p.identifier, vaddr + m.offset, m.length) for vaddr, data in runs
            for r in scanner.scan(data).matching_rules for p in r.patterns for m in p.matches}
    assert {w[0] for w in want} == {"$greedy", "$adj", "$vmas", "$far", "$long", "$start", "$word"}
    assert ("$greedy", V1 + 3 * PAGE - 20, 20) in want  # cut at its run's end
    assert ("$adj", V1 + 33 * PAGE - 11, 18) in want and ("$vmas", V2 - 11, 15) in want
    assert ("$word", V1 + 6 * PAGE, 4) in want  # after a hole, "X" before it in the process's address order
    assert not any(w[0] == "$hole" for w in want)
    for window in (16 << 20, 1 << 16, (1 << 16) + 3 * PAGE):
        assert _scan_lib(images, rules, window=window, overlap=64) == want, window
    # the text and JSON output of the CLI: the same matches, each in its VMA
    proc = scan("--rules", str(rules), str(images), "--json")
    assert proc.returncode == 0, proc.stderr
    got = matches(proc.stdout)
    assert {(m["identifier"], m["vaddr"], m["length"]) for m in got} == want
    for m in got:
        assert m["vma"]["start"] <= m["vaddr"] < m["vma"]["end"], m
    assert next(m for m in got if m["identifier"] == "$vmas")["vma"]["start"] == V1  # starts in V1


def test_scan_a_match_across_a_hole_is_not_reported_but_across_adjacent_runs_it_is(tmp_path: Path) -> None:
    """A string whose two halves are in pages with a hole between them is not found, whatever the pattern
    (literal, hex, a regex that would cross the separator); the same halves in adjacent entries are."""
    from crit_pageread.testing import ImageBuilder, VmaSpec

    left = _put(_filler(PAGE, 1), -8, b"SPLIT-ST")
    right = _put(_filler(PAGE, 2), 0, b"RING-END")
    rules = tmp_path / "split.yar"
    rules.write_text('rule split { strings: $lit = "SPLIT-STRING-END" $hex = { 53 50 4C 49 54 [0-40] 52 49 4E 47 }'
                     " $re = /SPLIT-ST[^!]{0,40}RING/ condition: any of them }\n")
    for gap, found in ((1, False), (0, True)):
        images = tmp_path / f"gap{gap}" / "img"
        b = ImageBuilder(images)
        b.process(10, vmas=[VmaSpec(V1, V1 + 8 * PAGE)])
        b.pagemap(10, [(V1, bytes(_filler(PAGE, 0))), (V1 + 2 * PAGE, bytes(left)),
                       (V1 + (3 + gap) * PAGE, bytes(right)), (V1 + 6 * PAGE, bytes(_filler(PAGE, 3)))])
        b.write()
        got = _scan_lib(images, rules)
        if found:
            assert got == {("$lit", V1 + 3 * PAGE - 8, 16), ("$hex", V1 + 3 * PAGE - 8, 12),
                           ("$re", V1 + 3 * PAGE - 8, 12)}
        else:
            assert got == set()



RUNS_RULES = r"""
rule per_run { strings: $mark = "RUN-MARK" condition: #mark == 3 and @mark[1] == 0 }
rule sized { strings: $size = "SIZE-MARK" condition: $size and filesize == 20 * 4096 }
rule greedy { strings: $tail = /END-OF-RUN[^!]{0,200}/ $head = /[^!]{0,40}HEAD-OF-RUN/ condition: any of them }
rule no_string { condition: filesize > 65536 }
"""


@pytest.mark.parametrize("helper", ["native", "python"])
def test_scan_runs_read_together_are_each_scanned_alone(tmp_path: Path, helper: str,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs longer than 64 KiB are read several at a time (in one span, across spans, one longer than a batch)
    and each is scanned alone: a condition counts in its run (`#mark == 3`, `@mark[1] == 0`, `filesize`), a
    greedy regex stops at its run's end and starts at its run's start (nothing of the bytes between runs in
    the buffer is seen), the matches are those of yara-x scanning each run alone, and a rule without strings
    is reported at the first run where it holds in address order; read by the native helper's plan or not."""
    import yara_x

    from crit_pageread.testing import ImageBuilder, VmaSpec

    use_helper(helper, monkeypatch)

    def entry(pages: int, seed: int) -> bytes:
        data = _filler(pages * PAGE, seed)
        for at in (0, pages * PAGE // 2, pages * PAGE - 8):
            _put(data, at, b"RUN-MARK")
        _put(data, 10, b"HEAD-OF-RUN")
        if pages > 1:
            _put(data, PAGE + 7, b"SIZE-MARK")
        return bytes(_put(data, pages * PAGE - 30, b"END-OF-RUN"))

    # V1 (100 pages): runs of 17, 20 and 47 pages with a hole after each, a single page, then 11 pages that
    # W (8 pages, right after V1) continues; V3 far away: 20 pages, a hole, 1100 pages (more than a batch)
    w = V1 + 100 * PAGE
    layout = [(V1, 17), (V1 + 18 * PAGE, 20), (V1 + 39 * PAGE, 47), (V1 + 87 * PAGE, 1), (V1 + 89 * PAGE, 11),
              (w, 8), (V3, 20), (V3 + 21 * PAGE, 1100)]
    entries = [(vaddr, entry(pages, k)) for k, (vaddr, pages) in enumerate(layout)]
    images = tmp_path / "img"
    b = ImageBuilder(images)
    b.process(10, vmas=[VmaSpec(V1, w), VmaSpec(w, w + 8 * PAGE), VmaSpec(V3, V3 + 1200 * PAGE)])
    b.pagemap(10, entries)
    b.write()
    runs: list[tuple[int, bytes]] = []
    for vaddr, data in entries:
        if runs and runs[-1][0] + len(runs[-1][1]) == vaddr:
            runs[-1] = (runs[-1][0], runs[-1][1] + data)
        else:
            runs.append((vaddr, data))
    assert [len(d) // PAGE for _, d in runs] == [17, 20, 47, 1, 19, 20, 1100]
    rules = tmp_path / "runs.yar"
    rules.write_text(RUNS_RULES)
    scanner = yara_x.Scanner(yara_x.compile(RUNS_RULES))
    want = {(p.identifier, vaddr + m.offset, m.length) for vaddr, data in runs
            for r in scanner.scan(data).matching_rules for p in r.patterns for m in p.matches}
    want.add(("", V1, 0))  # no_string: once per process, at the first run over 64 KiB
    assert len({x for x in want if x[0] == "$mark"}) == 3 * 6  # every run's but the one of two entries
    assert {x[1] for x in want if x[0] == "$size"} == {V1 + 19 * PAGE + 7, V3 + PAGE + 7}
    assert ("$tail", V1 + 17 * PAGE - 30, 30) in want  # cut at its run's end
    assert ("$head", V1 + 18 * PAGE, 21) in want  # from its run's start
    for window in (16 << 20, 5 << 20):  # every run in one scan; the long one alone in a batch
        assert _scan_lib(images, rules, window=window, overlap=64) == want, window
    # windows shorter than some runs: the per-string rule's matches (a condition holds per window there)
    strings = {x for x in want if x[0] in ("$tail", "$head")}
    for window in (21 * PAGE, 18 * PAGE):
        got = _scan_lib(images, rules, window=window, overlap=PAGE)
        assert {x for x in got if x[0] in ("$tail", "$head")} == strings, window
        assert ("", V1, 0) in got


def test_scan_buffer_a_scanner_that_keeps_its_data_sees_it_unchanged() -> None:
    """The bytes yara-x scans lie in the reused buffer; if a scanner kept them after its scan, they must not
    change under it: the buffer is left as it is and the scans from then on copy."""
    from crit_pageread.scan import FIRST, ScanBuffer

    class Keeper:
        def __init__(self) -> None:
            self.kept: list[bytes] = []

        def scan(self, data: bytes) -> int:
            self.kept.append(data)
            return len(data)

    class Looker:
        @staticmethod
        def scan(data: bytes) -> bytes:
            return bytes(data)

    buf = ScanBuffer.take(FIRST + (1 << 20) + 64)
    try:
        buf.view[FIRST : FIRST + 6] = b"first!"
        buf.view[FIRST + 1000 : FIRST + 1006] = b"second"
        assert buf.scan(Looker, FIRST, 6) == (b"first!", b"first!")
        keeper = Keeper()
        assert buf.scan(keeper, FIRST, 6)[0] == 6
        assert buf.scan(Looker, FIRST + 1000, 6)[0] == b"second"  # a run of the same batch, still there
        buf.view[FIRST : FIRST + 6] = b"later!"
        assert buf.scan(Looker, FIRST, 6)[0] == b"later!"
        assert keeper.kept == [b"first!"] and type(keeper.kept[0]) is bytes
    finally:
        buf.give_back()
