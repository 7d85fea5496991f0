"""`crit-pageread coredump`: ELF cores gdb reads like the restored program.

Oracles: gdb (reading our core) against /proc/PID/mem of the dump restored by
CRIU; readelf for the notes; pycriu's decoding of core-*.img and mm-*.img;
the shared fixtures' truth hashes for a chain (e2_chain2) and memfd/SysV/anon
shared memory (d_shm).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pytest
from chains import make_chain
from conftest import Criu
from corpus import Corpus
from criu_harness import (
    Region,
    Victim,
    build_victim,
    dump,
    pycriu_load,
    read_mem,
    restore_stopped,
    start_lazy_dump,
    start_victim,
)
from native_support import use_helper
from restore_support import interrupted_run, leftovers, run_cli

from crit_pageread.criu_env import pycriu

PAGE = 4096
SKIP_KINDS = {"vvar", "vsyscall", "vdso"}
HAS_GDB = shutil.which("gdb") is not None


@dataclass
class CoreCase:
    victim: Victim
    exe: Path
    images: Path
    chain_top: Path
    cores: Path


def _load(path: Path) -> list[dict]:
    return pycriu_load(path)


def _vmas(images: Path, pid: int) -> list[dict]:
    return _load(images / f"mm-{pid}.img")[0]["vmas"]


def _gdb(exe: Path | None, core: Path, commands: list[str]) -> str:
    assert HAS_GDB, "gdb is needed (apt-get install gdb)"
    cmd = ["gdb", "-batch", "-nx", "-ex", "set pagination off", "-ex", "set width 0"]
    for c in commands:
        cmd += ["-ex", c]
    cmd += [str(exe)] if exe is not None else []
    cmd += ["-c", str(core)] if exe is None else [str(core)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    return proc.stdout


def _gdb_bytes(output: str) -> dict[int, bytes]:
    """Bytes by address from `x/Nxb` output lines (`0xADDR <sym>:\t0x00\t...`)."""
    got: dict[int, bytes] = {}
    for line in output.splitlines():
        m = re.match(r"^(0x[0-9a-f]+)(?: <[^>]*>)?:\s+(.*)$", line)
        if m:
            got[int(m.group(1), 16)] = bytes(int(t, 16) for t in m.group(2).split())
    return got


@pytest.fixture(scope="module")
def case(criu: Criu, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CoreCase]:
    """A victim with 3 threads and shared memory; dumped, turned into a 2-level chain, cored from the chain."""
    work = tmp_path_factory.mktemp("coredump")
    exe = build_victim(work)
    victim = start_victim(exe, work / "run", "--threads", "3", "--shm", "--seed", "21", ipc_ns=True)
    try:
        dump(victim, work / "dump")
        top = make_chain(work / "dump", work / "chain", 2, seed=4)
        proc = run_cli("coredump", str(top), "-o", str(work / "cores"), "--json")
        assert proc.returncode == 0, proc.stderr
        yield CoreCase(victim, exe, work / "dump", top, work / "cores")
    finally:
        victim.kill()


def _sample(case: CoreCase, n: int = 100) -> list[int]:
    """n addresses, 16 bytes each inside a readable VMA: every victim region and the secret first."""
    rng = random.Random(7)
    vmas = [v for v in _vmas(case.images, case.victim.pid) if v["prot"] & 1]
    from crit_pageread.images import VMA_AREA_VDSO, VMA_AREA_VSYSCALL, VMA_AREA_VVAR

    vmas = [v for v in vmas if not v["status"] & (VMA_AREA_VDSO | VMA_AREA_VVAR | VMA_AREA_VSYSCALL)]
    addrs = [case.victim.info["secret"]["addr"]]
    addrs += [r.start + rng.randrange(r.len // 16) * 16 for r in case.victim.regions]
    while len(addrs) < n:
        v = rng.choice(vmas)
        addrs.append(v["start"] + rng.randrange((v["end"] - v["start"]) // 16) * 16)
    return addrs


def test_gdb_reads_the_same_bytes_from_our_core_as_from_the_restored_program(case: CoreCase):
    pid = case.victim.pid
    addrs = _sample(case)
    with restore_stopped(case.images) as r:
        truth = {a: r.read(pid, a, 16) for a in addrs}
    out = _gdb(case.exe, case.cores / f"core.{pid}", [f"x/16xb {a:#x}" for a in addrs])
    rows = _gdb_bytes(out)
    got = {a: rows.get(a, b"") + rows.get(a + 8, b"") for a in addrs}
    assert len(addrs) == 100
    assert got == truth


@pytest.mark.parametrize("helper", ["native", "python"])
def test_cores_from_the_map_columns_are_the_cores_of_the_segment_walk(
    case: CoreCase, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, helper: str,
) -> None:
    """Each VMA written from its readable runs (no object per run; shared mappings through their segment, the
    holes of file mappings filled from the file) in batches as small as two runs gives the cores of the walk
    over its segments, byte for byte, and the same reports."""
    use_helper(helper, monkeypatch)
    from crit_pageread import open_images
    from crit_pageread.restore import coredump as core_mod

    used: list[bool] = []
    real = core_mod._write_vma_runs

    def spy(*args: Any) -> bool:
        used.append(real(*args))
        return used[-1]

    outs = {}
    for how in ("walk", "columns"):
        if how == "walk":
            monkeypatch.setattr(core_mod, "_write_vma_runs", lambda *args: False)
        else:
            monkeypatch.setattr(core_mod, "_write_vma_runs", spy)
            monkeypatch.setattr(core_mod, "WRITE_PIECES", 2)
        with open_images(case.chain_top) as images:
            reports = core_mod.coredump(images, tmp_path / how)
        outs[how] = ({p.name: p.read_bytes() for p in sorted((tmp_path / how).iterdir())},
                     [{**asdict(r), "path": Path(r.path).name} for r in reports])
    assert outs["columns"] == outs["walk"]
    assert used and all(used)


def test_gdb_shows_every_thread_of_the_dump_with_its_registers(case: CoreCase):
    pid = case.victim.pid
    tids = sorted(case.victim.info["threads"])
    assert len(tids) == 4
    out = _gdb(case.exe, case.cores / f"core.{pid}", ["info threads", "thread apply all info registers rip rsp"])
    listed = re.findall(r"^\*?\s+\d+\s+Thread 0x[0-9a-f]+ \(LWP (\d+)\)", out, re.M)
    assert sorted(int(t) for t in listed) == tids, out
    for tid in tids:
        regs = _load(case.chain_top / f"core-{tid}.img")[0]["thread_info"]["gpregs"]
        block = out.split(f"(LWP {tid})):")[1].split("\nThread ")[0]
        assert re.search(rf"rip\s+{regs['ip']:#x}\b", block), block
        assert re.search(rf"rsp\s+{regs['sp']:#x}\b", block), block
    assert "pause" in out or "__libc_pause" in _gdb(case.exe, case.cores / f"core.{pid}", ["bt"])


def test_core_notes_hold_prstatus_per_thread_prpsinfo_auxv_and_mapped_files(case: CoreCase):
    pid = case.victim.pid
    core = case.cores / f"core.{pid}"
    notes = subprocess.run(["readelf", "-n", "-W", str(core)], capture_output=True, text=True, check=True).stdout
    assert notes.count("NT_PRSTATUS") == 4
    assert notes.count("NT_FPREGSET") == 4
    assert "NT_PRPSINFO" in notes and "NT_AUXV" in notes and "NT_FILE" in notes
    header = subprocess.run(["readelf", "-h", "-l", "-W", str(core)], capture_output=True, text=True).stdout
    assert "CORE (Core file)" in header and "X86-64" in header
    assert header.count("LOAD") == len(_vmas(case.images, pid))
    mappings = _gdb(case.exe, core, ["info proc mappings"])  # gdb reads NT_FILE for these
    assert str(case.exe) in mappings and "/memfd:victim-memfd (deleted)" in mappings
    assert "/usr/lib/x86_64-linux-gnu/libc.so.6" in mappings
    auxv = _gdb(case.exe, core, ["info auxv"])
    saved = _load(case.images / f"mm-{pid}.img")[0]["mm_saved_auxv"]
    at = dict(zip(saved[::2], saved[1::2], strict=False))
    assert re.search(rf"AT_ENTRY\s.*{at[9]:#x}", auxv), auxv
    assert re.search(rf"AT_PHDR\s.*{at[3]:#x}", auxv), auxv


def test_cores_of_the_fixture_chain_and_shared_memory_hold_the_truth_pages(corpus: Corpus, tmp_path: Path):
    """e2_chain2 (pages in a parent) and d_shm (memfd, anon shared, SysV): gdb's view of our core vs the truth."""
    for name in ("e2_chain2", "d_shm"):
        src = corpus.root / "cases" / name
        images = tmp_path / name
        shutil.copytree(src, images, symlinks=True)
        images = images / "d2" if name == "e2_chain2" else images
        out = tmp_path / f"cores-{name}"
        proc = run_cli("coredump", str(images), "-o", str(out), "--json")
        assert proc.returncode == 0, proc.stderr
        truth_dir = corpus.root / "truth" / name
        for report in map(json.loads, proc.stdout.splitlines()):
            pid = report["pid"]
            want = _truth(truth_dir / f"pid-{pid}.sha256")
            vmas = _vmas(images, pid)
            for shm in sorted(truth_dir.glob("shmem-*.sha256")):
                want.update(_shared_truth(images, vmas, int(shm.stem.split("-")[1]), _truth(shm)))
            got = _gdb_pages(out / f"core.{pid}", sorted(want), tmp_path / "mem.bin")
            assert {a: hashlib.sha256(d).hexdigest() for a, d in got.items()} == want, f"{name} pid {pid}"


def _truth(path: Path) -> dict[int, str]:
    out = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("TOTAL"):
            a, h = line.split()
            out[int(a, 16)] = h
    return out


def _shared_truth(images: Path, vmas: list[dict], shmid: int, pages: dict[int, str]) -> dict[int, str]:
    """Segment-offset truth mapped to the addresses of every VMA of this process that maps the segment."""
    memfd = {}
    if (images / "memfd.img").exists():
        inodes = {m.get("inode_id", i + 1): m["shmid"] for i, m in enumerate(_load(images / "memfd.img"))}
        memfd = {f["id"]: inodes[f["memfd"]["inode_id"]] for f in _load(images / "files.img") if "memfd" in f}
    out = {}
    for v in vmas:
        sid = memfd.get(v["shmid"]) if v["status"] & (1 << 14) else (v["shmid"] if v["status"] & (1 << 8) else None)
        if sid != shmid:
            continue
        for off, h in pages.items():
            addr = v["start"] + off - v["pgoff"]
            if v["start"] <= addr < v["end"]:
                out[addr] = h
    return out


def _gdb_pages(core: Path, pages: list[int], scratch: Path) -> dict[int, bytes]:
    """Every page at `pages`, as gdb reads it from the core (one `dump binary memory` per contiguous run)."""
    runs: list[list[int]] = []
    for p in pages:
        if runs and runs[-1][1] == p:
            runs[-1][1] += PAGE
        else:
            runs.append([p, p + PAGE])
    cmds = [f"dump binary memory {scratch}.{i} {a:#x} {b:#x}" for i, (a, b) in enumerate(runs)]
    _gdb(None, core, cmds)
    out = {}
    for i, (a, b) in enumerate(runs):
        data = Path(f"{scratch}.{i}").read_bytes()
        assert len(data) == b - a
        for off in range(0, b - a, PAGE):
            out[a + off] = data[off : off + PAGE]
    return out


def test_pages_of_a_changed_mapped_file_are_zeros_listed_in_a_note(criu: Criu, tmp_path: Path):
    exe = build_victim(tmp_path)
    victim = start_victim(exe, tmp_path / "run", "--seed", "3")
    try:
        dump(victim, tmp_path / "dump")
    finally:
        victim.kill()
    ok = run_cli("coredump", str(tmp_path / "dump"), "-o", str(tmp_path / "good"), "--json")
    assert ok.returncode == 0, ok.stderr
    first = json.loads(ok.stdout.splitlines()[0])
    assert first["missing"] == [] and first["file_bytes"] > 0
    with open(exe, "ab") as f:
        f.write(b"\0" * 100)  # the program changed since the dump: its pages cannot be trusted
    proc = run_cli("coredump", str(tmp_path / "dump"), "-o", str(tmp_path / "cores"), "--json")
    assert proc.returncode == 0, proc.stderr
    missing = json.loads(proc.stdout.splitlines()[0])["missing"]
    assert missing and all(str(exe) in m["reason"] and "changed" in m["reason"] for m in missing)
    core = tmp_path / "cores" / f"core.{victim.pid}"
    notes = subprocess.run(["readelf", "-n", "-W", str(core)], capture_output=True, text=True).stdout
    assert "CRIT-PAGEREAD" in notes
    text = run_cli("coredump", str(tmp_path / "dump"), "-o", str(tmp_path / "again"))
    assert "zeros" in text.stdout and str(exe) in text.stdout
    first = missing[0]["start"]
    rows = _gdb_bytes(_gdb(None, core, [f"x/8xb {first:#x}"]))
    assert rows.get(first) == bytes(8)


def test_coredump_of_another_architecture_is_a_clear_error(corpus41: Corpus, tmp_path: Path):
    images = tmp_path / "a"
    shutil.copytree(corpus41.root / "cases" / "a_single", images)
    core = next(images.glob("core-*.img"))
    with open(core, "rb") as f:
        img = pycriu().images.load(f)
    img["entries"][0]["mtype"] = "AARCH64"
    core.chmod(0o644)
    with open(core, "wb") as f:
        pycriu().images.dump(img, f)
    proc = run_cli("coredump", str(images), "-o", str(tmp_path / "out"))
    assert proc.returncode == 1
    assert proc.stderr.strip().endswith("architecture AARCH64: coredump supports x86_64 only")
    assert len(proc.stderr.strip().splitlines()) == 1 and core.name in proc.stderr
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


def test_coredump_of_bad_input_is_one_line_error_and_no_output(corpus41: Corpus, tmp_path: Path):
    images = tmp_path / "b"
    shutil.copytree(corpus41.root / "cases" / "b_tree", images)
    mm = next(images.glob("mm-*.img"))
    mm.chmod(0o644)
    mm.write_bytes(mm.read_bytes()[:40])
    out = tmp_path / "out"
    out.mkdir()
    proc = run_cli("coredump", str(images), "-o", str(out))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and mm.name in proc.stderr
    assert list(out.iterdir()) == []  # an existing OUTDIR gets no core at all, not some of them


@pytest.mark.parametrize("existing", [False, True])
def test_sigint_in_the_middle_of_coredump_leaves_no_core(corpus41: Corpus, tmp_path: Path, existing: bool):
    out = tmp_path / "out"
    if existing:
        out.mkdir()
    images = corpus41.root / "cases" / "b_tree"
    proc = interrupted_run(["coredump", str(images), "-o", str(out)],
                           after_calls=3)
    assert proc.returncode == 130, proc.stderr
    assert "interrupted" in proc.stderr
    if existing:
        assert list(out.iterdir()) == []
    else:
        assert not out.exists()
    assert not leftovers(tmp_path)


def test_cores_of_a_lazy_dump_get_lazy_pages_from_the_page_server_or_list_them(
    criu: Criu, tmp_path: Path, pipe_max_size: None
):
    exe = build_victim(tmp_path)
    victim = start_victim(exe, tmp_path / "run", "--tree", "1", "--seed", "6")
    try:
        regions = {victim.pid: victim.regions, victim.info["children"][0]: [
            Region(**r) for r in victim.child_info(0)["regions"]]}
        live = {(pid, r.start): read_mem(pid, r.start, r.len) for pid, rs in regions.items() for r in rs}
        criu, port = start_lazy_dump(victim, tmp_path / "lazy")
        try:
            shutil.copytree(tmp_path / "lazy", tmp_path / "copy")
            proc = run_cli("coredump", str(tmp_path / "lazy"), "-o", str(tmp_path / "cores"), "--strategy", "remote",
                           "--json", env={"CRIT_PAGEREAD_REMOTE__PORT": str(port)})
            assert proc.returncode == 0, proc.stderr
            assert criu.wait(timeout=30) == 0  # both cores came through CRIU's one page-server client
        finally:
            if criu.poll() is None:
                criu.kill()
                criu.wait()
    finally:
        victim.kill()
    assert all(r["missing"] == [] for r in map(json.loads, proc.stdout.splitlines()))
    for pid, rs in regions.items():
        got = _gdb_pages(tmp_path / "cores" / f"core.{pid}",
                         [a for r in rs for a in range(r.start, r.start + r.len, PAGE)], tmp_path / "m")
        for r in rs:
            assert b"".join(got[a] for a in range(r.start, r.start + r.len, PAGE)) == live[(pid, r.start)]
    # no page server: the lazy ranges are zeros, and listed
    proc = run_cli("coredump", str(tmp_path / "copy"), "-o", str(tmp_path / "zeros"), "--json")
    assert proc.returncode == 0, proc.stderr
    missing = [m for r in map(json.loads, proc.stdout.splitlines()) for m in r["missing"]]
    assert missing and all("lazy pages" in m["reason"] for m in missing)
