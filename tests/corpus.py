"""The test corpus: real CRIU checkpoints with their truth, made by the tests themselves.

For each CRIU version the suite runs (4.1.1 and 4.2.1, see
crit_pageread/provision.py), one directory laid out like ../shared/fixtures:

- `cases/a_single`  one process (private anonymous memory with holes, a private file mapping);
- `cases/b_tree`    a parent and two forked children;
- `cases/c_threads` one process with three threads;
- `cases/d_shm`     two processes in their own IPC namespace sharing anonymous shared memory,
  a memfd and a SysV segment (`pagemap-shmem-*.img`);
- `cases/e2_chain2` a two-level chain `d1`, `d2` (with `d2/parent -> ../d1`, a symlink as CRIU
  writes it), made by rewriting `a_single` (this kernel has no soft-dirty bit: CRIU cannot pre-dump);
- `cases/f_lazy`    a `criu dump --lazy-pages` directory (PE_LAZY entries have no data);
- `truth/<case>/pid-<pid>.sha256`, `shmem-<id>.sha256`: one line per page, `vaddr_hex sha256`, then
  `TOTAL <sha256 of all pages> <npages>`, from `criu restore --leave-stopped` and /proc/PID/mem at
  every address the pagemaps list (addresses decoded by the version's own pycriu);
- `live/f_lazy/pid-<pid>.sha256`: every page of the lazy dump, read from the live program first;
- `victim/<case>.json`: the victim's own description (regions, secret); `corpus.json`: the pids.

Built once per set of inputs (this file, the harness, the chain builder, the victim's source, the
CRIU version, the kernel) under ~/.cache/crit-pageread/corpus/<version>-<hash> (or
$CRIT_PAGEREAD_TEST_CACHE/corpus/...): under a temporary name, renamed into place, under a lock, so
concurrent test runs share one build. The programs ran in `<version>-<hash>.run` beside it, which
stays (CRIU's images name their executable and files: a case can be restored). The build runs in a
child process whose criu and pycriu are the version's own (`python corpus.py CRIU OUT RUN`).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SOURCES = [HERE / "corpus.py", HERE / "criu_harness.py", HERE / "chains.py",
           HERE.parent / "crit_pageread" / "data" / "victim.c"]
PAGE = 4096
CASES = ("a_single", "b_tree", "c_threads", "d_shm", "e2_chain2", "f_lazy")
VMA_ANON_SHARED = 1 << 8
VMA_AREA_SYSVIPC = 1 << 10
VMA_AREA_MEMFD = 1 << 14
PE_PARENT, PE_LAZY, PE_PRESENT = 1, 2, 4
#: Truth case -> image directory under cases/ (a chain is read through its newest level).
TRUTH_DIRS = {"a_single": "a_single", "b_tree": "b_tree", "c_threads": "c_threads", "d_shm": "d_shm",
              "e2_chain2": "e2_chain2/d2"}


@dataclass(frozen=True)
class Corpus:
    """One CRIU version's corpus (read-only: copy a case before changing it)."""

    root: Path
    criu: str  # the criu wrapper that made it
    version: str  # e.g. "4.2.1"

    @property
    def meta(self) -> dict[str, Any]:
        return json.loads((self.root / "corpus.json").read_text())

    def case(self, name: str) -> Path:
        return self.root / "cases" / name

    def pid(self, case: str) -> int:
        """The root process of `case` (as its images name it)."""
        return int(self.meta["pids"][case][0])

    def pids(self, case: str) -> list[int]:
        return [int(p) for p in self.meta["pids"][case]]

    def truth_file(self, case: str, pid: int | None = None) -> Path:
        return self.root / "truth" / case / f"pid-{self.pid(case) if pid is None else pid}.sha256"

    def truth(self, case: str, pid: int | None = None) -> dict[int, str]:
        """vaddr -> sha256 of every page of `pid` (default: the case's root process)."""
        return read_truth(self.truth_file(case, pid))

    def live(self, case: str = "f_lazy") -> dict[int, str]:
        return read_truth(self.root / "live" / case / f"pid-{self.pid(case)}.sha256")

    def victim(self, case: str) -> dict[str, Any]:
        return json.loads((self.root / "victim" / f"{case}.json").read_text())

    @property
    def layout(self) -> str:
        """The pagemap layout this CRIU writes ("4.1" or "4.2")."""
        return "4.2" if tuple(int(x) for x in self.version.split(".")[:2]) >= (4, 2) else "4.1"


def read_truth(path: Path) -> dict[int, str]:
    out = {}
    for line in path.read_text().splitlines():
        key, digest = line.split()[:2]
        if key != "TOTAL":
            out[int(key, 16)] = digest
    return out


def inputs_hash(version: str) -> str:
    h = hashlib.sha256()
    for src in SOURCES:
        h.update(src.name.encode() + b"\0" + src.read_bytes() + b"\0")
    h.update(f"{version}\0{platform.release()}\0{platform.machine()}".encode())
    return h.hexdigest()[:16]


def corpus_for(criu: str, version: str, cache: Path) -> Corpus:
    """The corpus of `criu` (version `version`): from the cache, else built now (once, under a lock)."""
    top = cache / "corpus"
    top.mkdir(parents=True, exist_ok=True)
    final = top / f"{version}-{inputs_hash(version)}"
    if not (final / "corpus.json").is_file():
        with open(top / f"{final.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (final / "corpus.json").is_file():
                tmp = Path(tempfile.mkdtemp(dir=top, prefix=f".{final.name}.tmp."))
                # The programs' files (executable, mapped file, log) stay at a fixed path beside the
                # corpus: CRIU's images name them, and a restore of a case needs them.
                run = top / f"{final.name}.run"
                shutil.rmtree(run, ignore_errors=True)
                try:
                    env = dict(os.environ, CRIT_PAGEREAD_CRIU=criu)
                    env.pop("CRIT_PAGEREAD_PYCRIU_PATH", None)
                    proc = subprocess.run([sys.executable, str(HERE / "corpus.py"), criu, str(tmp / "c"), str(run)],
                                          capture_output=True, text=True, env=env, timeout=1200)
                    if proc.returncode != 0:
                        raise RuntimeError(f"building the CRIU {version} corpus failed:\n{proc.stderr[-4000:]}")
                    os.rename(tmp / "c", final)
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
    return Corpus(final, criu, version)


# --- the build (in the child process) -------------------------------------------------------------


def _load(path: Path) -> list[dict[str, Any]]:
    from criu_harness import pycriu_load

    return pycriu_load(path)


def pagemap_runs(path: Path) -> list[tuple[int, int, int]]:
    """(vaddr, nr_pages, flags) of every entry as pycriu decodes it (4.2's nr_pages, else 4.1's)."""
    out = []
    for e in _load(path)[1:]:
        nr = e.get("nr_pages") or e.get("compat_nr_pages", 0)
        out.append((e["vaddr"], nr, e.get("flags", PE_PRESENT)))
    return out


def shmem_placements(images: Path) -> dict[int, list[tuple[int, int, int, int]]]:
    """shmem id -> [(pid, vma start, vma end, pgoff)] of the VMAs that map it, from pycriu."""
    inode_shmid: dict[int, int] = {}
    if (images / "memfd.img").exists():
        inode_shmid = {m["inode_id"]: m["shmid"] for m in _load(images / "memfd.img")}
    file_shmid = {
        f["id"]: inode_shmid[f["memfd"]["inode_id"]] for f in _load(images / "files.img") if f.get("type") == "MEMFD"
    }
    out: dict[int, list[tuple[int, int, int, int]]] = {}
    for pid in [p["pid"] for p in _load(images / "pstree.img")]:
        for vma in _load(images / f"mm-{pid}.img")[0]["vmas"]:
            status = vma["status"]
            if status & VMA_AREA_MEMFD:
                shmid = file_shmid[vma["shmid"]]
            elif status & (VMA_AREA_SYSVIPC | VMA_ANON_SHARED):
                shmid = vma["shmid"]
            else:
                continue
            out.setdefault(shmid, []).append((pid, vma["start"], vma["end"], vma["pgoff"]))
    return out


#: (kind, id) -> [(vaddr or offset, bytes of the run)]
Oracle = dict[tuple[str, int], list[tuple[int, bytes]]]


def snapshot(restore_dir: Path, layout_dir: Path) -> Oracle:
    """Restore `restore_dir` stopped; read every data-bearing page `layout_dir`'s pagemaps list."""
    from criu_harness import restore_stopped

    oracle: Oracle = {}
    placements = shmem_placements(layout_dir)
    with restore_stopped(restore_dir) as restored:
        for name in sorted(os.listdir(layout_dir)):
            if name.startswith("pagemap-shmem-"):
                shmid = int(name[len("pagemap-shmem-") : -4])
                runs = []
                for off, nr, flags in pagemap_runs(layout_dir / name):
                    if not flags & (PE_PRESENT | PE_PARENT):
                        continue
                    pages = []
                    for page in range(off, off + nr * PAGE, PAGE):
                        pid, start, _, pgoff = next(
                            p for p in placements[shmid] if p[3] <= page < p[3] + p[2] - p[1]
                        )
                        pages.append(restored.read(pid, start + page - pgoff, PAGE))
                    runs.append((off, b"".join(pages)))
                oracle[("shmem", shmid)] = runs
            elif name.startswith("pagemap-"):
                pid = int(name[len("pagemap-") : -4])
                oracle[("pid", pid)] = [
                    (vaddr, restored.read(pid, vaddr, nr * PAGE))
                    for vaddr, nr, flags in pagemap_runs(layout_dir / name)
                    if flags & (PE_PRESENT | PE_PARENT)
                ]
    return oracle


def _write_truth(path: Path, pages: list[tuple[int, bytes]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    total = hashlib.sha256()
    lines = []
    for addr, data in sorted(pages):
        total.update(data)
        lines.append(f"{addr:x} {hashlib.sha256(data).hexdigest()}")
    lines.append(f"TOTAL {total.hexdigest()} {len(pages)}")
    path.write_text("\n".join(lines) + "\n")


def _pages_of(runs: list[tuple[int, bytes]]) -> list[tuple[int, bytes]]:
    return [(addr + off, data[off : off + PAGE]) for addr, data in runs for off in range(0, len(data), PAGE)]


def write_oracle(root: Path, case: str, oracle: Oracle) -> None:
    for (kind, ident), runs in oracle.items():
        _write_truth(root / "truth" / case / f"{'pid' if kind == 'pid' else 'shmem'}-{ident}.sha256",
                     _pages_of(runs))


def _tidy(images: Path) -> None:
    """Leave only what CRIU wrote as images (no logs, pidfiles, restore statistics)."""
    for p in images.iterdir():
        if p.name.endswith(".log") or p.name in ("restore.pid", "stats-restore"):
            p.unlink()


def build(criu: str, out: Path, work: Path) -> None:
    """Make every case with `criu` (also CRIT_PAGEREAD_CRIU in this process) into `out`; the programs
    run in `work`, which stays."""
    sys.path.insert(0, str(HERE))
    from chains import build_chain
    from criu_harness import build_victim, dump, start_victim

    from crit_pageread.criu_env import criu_line

    out.mkdir(parents=True)
    work.mkdir(parents=True)
    exe = build_victim(work)
    layout = "4.2" if criu_line(criu) == "4.2" else "4.1"
    pids: dict[str, list[int]] = {}

    def make(case: str, *args: str, ipc_ns: bool = False) -> Path:
        victim = start_victim(exe, work / case, *args, ipc_ns=ipc_ns)
        try:
            (out / "victim").mkdir(exist_ok=True)
            (out / "victim" / f"{case}.json").write_text(json.dumps(victim.info))
            images = dump(victim, out / "cases" / case)
        finally:
            victim.kill()
        pids[case] = [p["pid"] for p in _load(images / "pstree.img")]
        return images

    for case, args, ipc in [("a_single", ("--seed", "7"), False),
                            ("b_tree", ("--seed", "8", "--tree", "2"), False),
                            ("c_threads", ("--seed", "9", "--threads", "3"), False),
                            ("d_shm", ("--seed", "10", "--shm", "--tree", "1"), True)]:
        images = make(case, *args, ipc_ns=ipc)
        write_oracle(out, case, snapshot(images, images))
        _tidy(images)
    # A chain by rewriting a_single; CRIU restores it, and that memory is its truth.
    info = build_chain(out / "cases" / "a_single", work / "chain", 2, seed=2, layout=layout)
    chain = out / "cases" / "e2_chain2"
    shutil.copytree(info.dirs[0].parent, chain, symlinks=True)
    write_oracle(out, "e2_chain2", snapshot(chain / "d2", out / "cases" / "a_single"))
    _tidy(chain / "d2")
    pids["e2_chain2"] = pids["a_single"]
    _lazy(exe, work, out, pids)
    (out / "corpus.json").write_text(json.dumps({"criu": criu, "layout": layout, "pids": pids, "run": str(work)},
                                                indent=1))
    shutil.rmtree(work / "chain")


def _lazy(exe: Path, work: Path, out: Path, pids: dict[str, list[int]]) -> None:
    """`criu dump --lazy-pages`, every page read from the live program before; FLUSH_N_CLOSE at once."""
    import socket
    import struct

    from criu_harness import read_mem, start_lazy_dump, start_victim

    from crit_pageread.criu_env import criu_line

    victim = start_victim(exe, work / "f_lazy", "--seed", "11")
    images = out / "cases" / "f_lazy"
    try:
        (out / "victim" / "f_lazy.json").write_text(json.dumps(victim.info))
        live: dict[int, bytes] = {}
        for line in Path(f"/proc/{victim.pid}/maps").read_text().splitlines():
            span, perms = line.split()[:2]
            if "r" not in perms:
                continue
            start, end = (int(x, 16) for x in span.split("-"))
            try:
                data = read_mem(victim.pid, start, end - start)
            except OSError:
                continue
            live.update((start + off, data[off : off + PAGE]) for off in range(0, len(data), PAGE))
        proc, port = start_lazy_dump(victim, images)
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
                fmt = "=I4xQQQ" if criu_line() == "4.2" else "=IIQQ"  # the dumping CRIU's layout
                sock.sendall(struct.pack(fmt, 0x1024, 0, 0, 0))  # PS_IOV_FLUSH_N_CLOSE
                if sock.recv(4) != b"\0\0\0\0":
                    raise RuntimeError("lazy dump: no answer to FLUSH_N_CLOSE")
            if proc.wait(timeout=60) != 0:
                raise RuntimeError((images / "dump.log").read_text()[-2000:])
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        victim.reap()
    finally:
        victim.kill()
    pid = victim.pid
    pids["f_lazy"] = [pid]
    listed = [(v + i * PAGE, live[v + i * PAGE]) for v, nr, _ in pagemap_runs(images / f"pagemap-{pid}.img")
              for i in range(nr)]
    _write_truth(out / "live" / "f_lazy" / f"pid-{pid}.sha256", listed)
    _tidy(images)


if __name__ == "__main__":
    build(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]))
