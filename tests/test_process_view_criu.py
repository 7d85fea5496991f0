"""The process view against real CRIU: shared anonymous memory, a memfd and a SysV segment shared by two
processes, a MAP_PRIVATE memfd mapping written after mapping, and a zombie child. The oracle is
/proc/PID/mem of the tree restored with `criu restore --leave-stopped`."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from corpus import Corpus
from criu_harness import Victim, dump, restore_stopped, start_victim

from crit_pageread import open_images
from crit_pageread.memory import Readers, shmem_id

pytestmark = pytest.mark.criu
PAGE = 4096
COPY = b"PRIVATE-COPY"


@dataclass
class Dumped:
    images: Path
    victim: Victim
    #: (pid, vma start) -> the VMA's bytes in the restored task, for every shared or memfd VMA
    truth: dict[tuple[int, int], bytes]
    #: the restored root's private memfd mapping, page 1 + 100 holds COPY
    pmemfd: int
    zombie: int


@pytest.fixture(scope="module")
def dumped(victim_exe: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dumped]:
    work = tmp_path_factory.mktemp("pview")
    victim = start_victim(victim_exe, work / "run", "--seed", "21", "--shm", "--tree", "1", "--private-memfd",
                          "--zombie", ipc_ns=True)
    try:
        images = dump(victim, work / "images")
    finally:
        victim.kill()
        reap(victim.info["zombie"])  # ours once its parent died (we are the subreaper): free its pid
    truth: dict[tuple[int, int], bytes] = {}
    with open_images(images) as im, restore_stopped(images) as restored:
        for pid in im.pids:
            for vma in im.vmas(pid):
                if shmem_id(im, vma) is not None:
                    truth[(pid, vma.start)] = restored.read(pid, vma.start, vma.size)
    yield Dumped(images, victim, truth, victim.info["private_memfd"], victim.info["zombie"])


def reap(pid: int) -> None:
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "crit_pageread", *args], capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("strategy", ["pread", "preadv", "mmap"])
def test_every_page_of_every_shared_vma_reads_as_the_restored_task_has_it(dumped: Dumped, strategy: str) -> None:
    kinds = set()
    with open_images(dumped.images) as images:
        for (pid, start), want in dumped.truth.items():
            vma = next(v for v in images.vmas(pid) if v.start == start)
            kinds.add(vma.name if vma.kind == "memfd" else vma.kind)
            with images.reader(pid, strategy) as reader:
                got = reader.read(start, vma.size)
                assert got == want, f"pid {pid} {vma.kind} {start:#x}: bytes differ from /proc/PID/mem"
                pieces = bytearray(vma.size)
                reader.readv([(start + off, memoryview(pieces)[off : off + PAGE]) for off in range(0, vma.size, PAGE)],
                             defer=True)
                reader.sync()
                assert pieces == want
    # anonymous shared memory shows as memfd:/dev/zero (CRIU 4.1 on this kernel) or anon-shared
    assert {"memfd:victim-memfd", "memfd:victim-private-memfd", "sysv-shm"} <= kinds
    assert kinds & {"memfd:/dev/zero", "anon-shared"}
    assert len({pid for pid, _ in dumped.truth}) == 2  # both processes map the segments


def test_grep_total_counted_on_the_maps_is_the_bytes_of_the_segments(dumped: Dumped, corpus41: Corpus) -> None:
    """readable_bytes (grep's total, no segment kept) equals a walk of segments() on every VMA of real dumps:
    shared mappings, a zombie, a chain's parent pages, lazy pages."""
    dirs = [dumped.images, *(corpus41.case(c) for c in ("a_single", "d_shm", "f_lazy")),
            corpus41.case("e2_chain2") / "d2"]
    for path in dirs:
        with open_images(path) as images, Readers(images, "pread") as readers:
            for pid in images.pids:
                for vma in images.vmas(pid):
                    area = readers.area(pid, vma)
                    walked = [0, 0]
                    for seg in area.segments():
                        if seg.kind != "hole":
                            walked[seg.kind == "lazy"] += seg.length
                    assert area.readable_bytes() == tuple(walked), (path, pid, vma)


def test_read_zero_fill_over_a_shared_vma_returns_its_data(dumped: Dumped) -> None:
    for (pid, start), want in dumped.truth.items():
        raw = subprocess.run([sys.executable, "-m", "crit_pageread", "read", str(dumped.images), "--pid", str(pid),
                              "--zero-fill", hex(start), str(len(want))], capture_output=True, timeout=300)
        assert raw.returncode == 0, raw.stderr
        assert raw.stdout == want, f"pid {pid} {start:#x}: read --zero-fill differs from the restored task"


def test_private_memfd_mapping_shows_the_process_copy_in_read_grep_extract_and_coredump(
    dumped: Dumped, tmp_path: Path
) -> None:
    root = dumped.victim.info["pid"]
    addr = dumped.pmemfd + PAGE + 100
    want = dumped.truth[(root, dumped.pmemfd)]
    assert want[PAGE + 100 : PAGE + 100 + len(COPY)] == COPY and want[:4] == b"SSSS"  # the oracle agrees
    raw = subprocess.run([sys.executable, "-m", "crit_pageread", "read", str(dumped.images), "--pid", str(root),
                          hex(dumped.pmemfd), str(4 * PAGE)], capture_output=True, timeout=300)
    assert raw.returncode == 0 and raw.stdout == want
    # grep finds the copy where the process has it, and no segment bytes in its place
    proc = cli("grep", str(dumped.images), "PRIVATE-COPY", "--json")
    assert proc.returncode == 0, proc.stderr
    hits = [json.loads(line) for line in proc.stdout.splitlines()]
    assert {(h["pid"], h["vaddr"]) for h in hits} >= {(root, addr)}
    assert all(h["vaddr"] == addr for h in hits)
    proc = cli("grep", str(dumped.images), "S" * 16, "--pid", str(root), "--json", "--range",
               f"{addr - 8:x}-{addr + 20:x}")
    assert proc.returncode == 1 and proc.stdout == "", proc.stdout
    # extract writes the process's bytes
    out = tmp_path / "x"
    proc = cli("extract", str(dumped.images), "-o", str(out), "--pid", str(root), "--layout", "vma")
    assert proc.returncode == 0, proc.stderr
    name = next(p for p in (out / f"pid-{root}").iterdir() if p.name.startswith(f"{dumped.pmemfd:x}-"))
    assert name.read_bytes() == want
    # coredump: the PT_LOAD of that VMA holds the process's bytes
    proc = cli("coredump", str(dumped.images), "-o", str(tmp_path / "cores"), "--pid", str(root))
    assert proc.returncode == 0, proc.stderr
    assert core_bytes(tmp_path / "cores" / f"core.{root}", dumped.pmemfd, 4 * PAGE) == want
    # every shared VMA in the core too
    for (pid, start), truth in dumped.truth.items():
        if pid == root:
            assert core_bytes(tmp_path / "cores" / f"core.{root}", start, len(truth)) == truth


def core_bytes(core: Path, vaddr: int, length: int) -> bytes:
    """Bytes at `vaddr` in an ELF core's PT_LOAD segments (zeros past a segment's file size)."""
    data = core.read_bytes()
    phoff, = struct.unpack_from("<Q", data, 32)
    phentsize, phnum = struct.unpack_from("<HH", data, 54)
    for i in range(phnum):
        p_type, _fl, off, va, _pa, filesz, memsz, _al = struct.unpack_from("<IIQQQQQQ", data, phoff + i * phentsize)
        if p_type == 1 and va <= vaddr and vaddr + length <= va + memsz:
            chunk = data[off + vaddr - va : off + min(vaddr - va + length, filesz)]
            return chunk + bytes(length - len(chunk))
    raise AssertionError(f"no PT_LOAD covers {vaddr:#x}")


def test_a_zombie_works_in_every_command(dumped: Dumped, tmp_path: Path) -> None:
    d = str(dumped.images)
    z = dumped.zombie
    with open_images(d) as images:
        assert z in images.pids and images.is_zombie(z) and images.vmas(z) == []
    runs = {
        "pages": cli("pages", d),
        "x pages": cli("x", d, "pages"),
        "x mems": cli("x", d, "mems"),
        "x mems --pages": cli("x", d, "mems", "--pages"),
        "ps": cli("ps", d, "--json"),
        "grep": cli("grep", d, "PRIVATE-COPY"),
        "extract": cli("extract", d, "-o", str(tmp_path / "x")),
        "coredump": cli("coredump", d, "-o", str(tmp_path / "cores")),
        "squash": cli("squash", d, str(tmp_path / "sq")),
    }
    for name, proc in runs.items():
        assert proc.returncode == 0, f"{name}: {proc.stderr}"
    ps = {p["pid"]: p for p in map(json.loads, runs["ps"].stdout.splitlines())}
    assert z in ps and ps[z]["argv"] == []
    assert f"pid {z}" in runs["pages"].stdout
    assert str(z) in runs["x pages"].stdout
    for name in ("x mems", "x mems --pages"):  # crit itself fails on a zombie's missing mm image
        lines = runs[name].stdout.splitlines()
        assert lines[lines.index(str(z)) + 1] == "\tzombie: no memory", name
        assert str(dumped.victim.pid) in lines, name
    assert not (tmp_path / "cores" / f"core.{z}").exists()
    assert (tmp_path / "sq" / f"core-{z}.img").exists()
    for zero_fill in ([], ["--zero-fill"]):  # no memory to read: a one-line error
        proc = cli("read", d, "--pid", str(z), "0x1000", "16", *zero_fill)
        assert proc.returncode == 2 and "zombie" in proc.stderr and proc.stderr.count("\n") == 1
    assert os.path.isdir(tmp_path / "x")
