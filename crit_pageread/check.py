"""Validate a checkpoint as thoroughly as we can without restoring it: one `Problem` per finding.

What is checked, for the directory and every level of its `parent` chain:
- every image is a regular file of bounded size; every protobuf image parses
  (pycriu), the ones the reader needs with our own bounded framing too;
- pstree, each process's mm and each thread's core;
- each pagemap (process and shmem): its framing, PE_* flags, order, alignment,
  and a pages file of exactly the size its present entries account for; what
  was read as CRIU reads it but no CRIU writes (field 2 vs field 5) is a warning;
- process pagemap entries lie inside a VMA of mm; `PE_PARENT` ranges are held
  by the parent chain (complete, no cycle); shared-memory pagemaps lie inside
  the anonymous shared mappings that use them;
- lazy pages (`PE_LAZY` without `PE_PRESENT`) are listed (a note: their data
  is on a page server);
- temporary names left by a killed crit-pageread run (a note).

Severity: "error" (the checkpoint is broken: a restore or a read would fail or
be wrong), "warning" (read as CRIU reads it, but no CRIU writes it) and "note"
(listed, not a fault). `ok` is true when there is no error and no warning.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .errors import CritPageReadError, ImageError
from .imagefile import DEFAULT_MAX_IMAGE_SIZE, open_regular
from .images import VMA_ANON_SHARED, VMA_AREA_MEMFD, VMA_AREA_SYSVIPC, CheckpointImages, open_images
from .output import stale_temps
from .pagemap import PE_LAZY, PE_PARENT, PE_PRESENT, Pagemap
from .strategy import Target

Severity = Literal["error", "warning", "note"]

#: Images that are not protobuf framing (raw data), never parsed as such.
_RAW_IMAGE = re.compile(r"^pages-\d+\.img$|\.tar(\.gz)?\.img$|-data\.img$")
_PAGEMAP = re.compile(r"^pagemap-(\d+)\.img$")
_SHMEM = re.compile(r"^pagemap-shmem-(\d+)\.img$")
#: Levels of a parent chain checked (as the reader's bound).
MAX_DEPTH = 64
#: The kinds of problem about memory (pagemaps, pages files, the chain, VMAs, shmem): what the manifest action
#: script and `squash --verify` refuse (the other images are CRIU's to judge at restore).
MEMORY_KINDS = frozenset({"pagemap", "chain", "outside-vma", "shmem"})


@dataclass(frozen=True, slots=True)
class Problem:
    """One finding: how bad, what kind, which file, and a one-line message."""

    severity: Severity
    kind: str
    file: str
    message: str

    def line(self) -> str:
        return f"{self.severity}: {self.file}: {self.message}"

    def as_dict(self) -> dict[str, str]:
        return {"severity": self.severity, "kind": self.kind, "file": self.file, "message": self.message}


@dataclass
class CheckReport:
    """What `check_checkpoint` found."""

    path: str
    problems: list[Problem]
    pids: int = 0
    pagemaps: int = 0
    pages: int = 0

    @property
    def ok(self) -> bool:
        return not any(p.severity in ("error", "warning") for p in self.problems)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def memory_errors(self) -> list[Problem]:
        """Errors about memory only (`MEMORY_KINDS`)."""
        return [p for p in self.errors if p.kind in MEMORY_KINDS]


def check_checkpoint(path: str | os.PathLike[str], *, notes: bool = True) -> CheckReport:
    """Check an image directory or a checkpoint archive; never raises for a broken checkpoint.

    An archive's image members (only) are checked as a directory in a private
    temporary directory; every problem names them `ARCHIVE: MEMBER`.
    """
    from .archive import is_archive, unpacked_images

    shown = str(path)
    if is_archive(path):
        try:
            with unpacked_images(path) as (directory, member_dir):
                report = check_checkpoint(directory, notes=notes)
                # The temporary root the member paths are under (every level of a chain is beside the images).
                inner = str(directory)[: -len(member_dir) - 1] if member_dir else str(directory).rstrip("/")
        except CritPageReadError as exc:
            return CheckReport(shown, [_problem_of(exc, shown)])

        def rename(text: str) -> str:
            return text.replace(inner + "/", f"{shown}: ").replace(inner, shown)

        report.path = shown
        report.problems[:] = [Problem(p.severity, p.kind, rename(p.file), rename(p.message)) for p in report.problems]
        return report
    problems: list[Problem] = []
    report = CheckReport(shown, problems)
    try:
        images = open_images(path)
    except CritPageReadError as exc:
        problems.append(_problem_of(exc, shown))
        return report
    try:
        _check_dir(images, report, depth=0, notes=notes)
        if notes:
            for tmp in stale_temps(images.path):
                problems.append(Problem("note", "stale-temp", str(tmp), "temporary file of a killed crit-pageread run"))
    finally:
        images.close()
    return report


def _problem_of(exc: Exception, fallback: str, kind: str = "image") -> Problem:
    if isinstance(exc, ImageError):
        kind = "chain" if type(exc).__name__ == "ChainError" else kind
        return Problem("error", kind, exc.path, exc.problem)
    return Problem("error", kind, fallback, str(exc))


def _check_dir(images: CheckpointImages, report: CheckReport, *, depth: int, notes: bool) -> None:
    problems = report.problems
    top = depth == 0
    try:
        names = sorted(os.listdir(images.path))
    except OSError as exc:
        problems.append(Problem("error", "image", str(images.path), f"cannot list: {exc.strerror}"))
        return
    problems.extend(_check_framing(images.path, names))
    pstree = images.path / "pstree.img"
    pids: list[int] = []
    if top or pstree.exists():
        try:
            pids = images.pids
        except CritPageReadError as exc:
            problems.append(_problem_of(exc, str(pstree)))
    if top:
        report.pids = len(pids)
        for pid in pids:
            _check_process(images, pid, problems)
    targets = [Target("pid", int(m.group(1))) for n in names if (m := _PAGEMAP.match(n))]
    targets += [Target("shmem", int(m.group(1))) for n in names if (m := _SHMEM.match(n))]
    if top:
        for pid in pids:
            if Target("pid", pid) not in targets and (images.path / f"mm-{pid}.img").exists():
                problems.append(Problem("error", "pagemap", str(images.path / f"pagemap-{pid}.img"),
                                        f"missing: pid {pid} has an mm image but no pagemap"))
    for target in targets:
        try:
            pm = images.pagemap_for(target)
        except CritPageReadError as exc:
            problems.append(_problem_of(exc, str(images.path), "pagemap"))
            continue
        report.pagemaps += 1
        if top:
            report.pages += sum(e.nr_pages for e in pm.entries)
        problems.extend(Problem("warning", "pagemap", str(pm.path), a) for a in pm.anomalies)
        if top and notes:
            problems.extend(_lazy_notes(pm))
        if top and target.kind == "pid" and target.id in pids:
            problems.extend(_outside_vmas(images, target.id, pm))
        if any(e.flags & PE_PARENT for e in pm.entries):
            problems.extend(_check_parent_ranges(images, target, pm))
    if top:
        problems.extend(_check_shmem(images, targets))
    try:
        parent = images.parent
    except CritPageReadError as exc:
        problems.append(_problem_of(exc, str(images.path / "parent"), "chain"))
        return
    if parent is not None:
        if depth + 1 >= MAX_DEPTH:
            problems.append(Problem("error", "chain", str(images.path / "parent"),
                                    f"parent chain deeper than {MAX_DEPTH}"))
            return
        _check_dir(parent, report, depth=depth + 1, notes=notes)


def _check_framing(directory: Path, names: list[str]) -> Iterator[Problem]:
    """Every image a regular file (a FIFO never blocks us), every protobuf image parses with pycriu."""
    from .criu_env import pycriu

    loader = None
    for name in names:
        if not name.endswith(".img") or _PAGEMAP.match(name) or _SHMEM.match(name):
            continue
        path = directory / name
        try:
            fd = open_regular(path)
        except ImageError as exc:
            yield _problem_of(exc, str(path))
            continue
        try:
            if _RAW_IMAGE.search(name):
                continue
            size = os.fstat(fd).st_size
            if size > DEFAULT_MAX_IMAGE_SIZE * 4:
                yield Problem("error", "image", str(path), f"image is {size} bytes, more than any CRIU image")
                continue
            data = _read_all(fd, size)
        finally:
            os.close(fd)
        if loader is None:
            loader = pycriu().images
        try:
            loader.load(io.BytesIO(data))
        except Exception as exc:  # pycriu raises bare exceptions on corrupt input
            text = " ".join(f"{type(exc).__name__}: {exc}".split())[:200]
            yield Problem("error", "image", str(path), f"does not parse as a CRIU image ({text})")


def _read_all(fd: int, size: int) -> bytes:
    parts = []
    done = 0
    while done < size:
        chunk = os.read(fd, size - done)
        if not chunk:
            break
        parts.append(chunk)
        done += len(chunk)
    return b"".join(parts)


def _check_process(images: CheckpointImages, pid: int, problems: list[Problem]) -> None:
    proc = images.processes[pid]
    mm = images.path / f"mm-{pid}.img"
    if not os.path.lexists(mm):
        # A zombie or a kernel-thread-like task has no mm: nothing more to read.
        return
    try:
        images.vmas(pid)
        images.mm(pid)
    except CritPageReadError as exc:
        problems.append(_problem_of(exc, str(mm)))
    for tid in proc.threads:
        try:
            images.core(tid)
        except CritPageReadError as exc:
            problems.append(_problem_of(exc, str(images.path / f"core-{tid}.img")))


def _lazy_notes(pm: Pagemap) -> Iterator[Problem]:
    lazy = [e for e in pm.entries if e.flags & PE_LAZY and not e.flags & PE_PRESENT]
    if lazy:
        pages = sum(e.nr_pages for e in lazy)
        first = lazy[0]
        yield Problem("note", "lazy", str(pm.path),
                      f"{pages} lazy pages in {len(lazy)} entries (data on a page server only), "
                      f"first {first.vaddr:#x}-{first.end:#x}")


def _outside_vmas(images: CheckpointImages, pid: int, pm: Pagemap) -> Iterator[Problem]:
    """Process pagemap entries (or parts of them) that no VMA of mm covers."""
    try:
        vmas = images.vmas(pid)
    except CritPageReadError:
        return  # reported with the process
    spans: list[list[int]] = []
    for v in sorted(vmas, key=lambda v: v.start):
        if spans and v.start <= spans[-1][1]:
            spans[-1][1] = max(spans[-1][1], v.end)
        else:
            spans.append([v.start, v.end])
    i = 0
    bad: list[tuple[int, int]] = []
    for e in pm.entries:
        pos, end = e.vaddr, e.end
        while pos < end:
            while i < len(spans) and spans[i][1] <= pos:
                i += 1
            if i == len(spans) or spans[i][0] >= end:
                bad.append((pos, end))
                break
            if spans[i][0] > pos:
                bad.append((pos, spans[i][0]))
            pos = spans[i][1]
    if bad:
        pages = sum(b - a for a, b in bad) // pm.page_size
        a, b = bad[0]
        yield Problem("error", "outside-vma", str(pm.path),
                      f"{pages} pages in {len(bad)} ranges lie outside every VMA of mm-{pid}.img, "
                      f"first {a:#x}-{b:#x}")


def _check_parent_ranges(images: CheckpointImages, target: Target, pm: Pagemap) -> Iterator[Problem]:
    """Every `PE_PARENT` range resolves through the chain to data (or lazy pages)."""
    try:
        reader = images.reader(target.id) if target.kind == "pid" else images.shmem_reader(target.id)
    except CritPageReadError as exc:
        yield _problem_of(exc, str(pm.path), "chain")
        return
    try:
        for e in pm.entries:
            if e.flags & PE_PARENT and not e.flags & PE_PRESENT:
                for _ in reader.segments(e.vaddr, e.size):
                    pass
    except CritPageReadError as exc:
        yield _problem_of(exc, str(pm.path), "chain")
    finally:
        reader.close()


def _check_shmem(images: CheckpointImages, targets: list[Target]) -> Iterator[Problem]:
    """Shared-memory pagemaps against the mappings that use them."""
    extent: dict[int, int] = {}  # shmid -> end of the anonymous shared mappings of it
    used: set[int] = set()
    try:
        memfd = images.memfd_shmids
        memfd_inodes = {shmid for _, shmid in images._memfd_inodes.values()}
    except CritPageReadError as exc:
        yield _problem_of(exc, str(images.path / "memfd.img"))
        memfd, memfd_inodes = {}, set()
    used |= memfd_inodes
    for pid in images.pids:
        if not (images.path / f"mm-{pid}.img").exists():
            continue
        try:
            vmas = images.vmas(pid)
        except CritPageReadError:
            continue
        for v in vmas:
            if v.status & VMA_AREA_MEMFD:
                used.add(memfd.get(v.shmid, v.shmid))
            elif v.status & VMA_AREA_SYSVIPC:
                used.add(v.shmid)
            elif v.status & VMA_ANON_SHARED:
                used.add(v.shmid)
                extent[v.shmid] = max(extent.get(v.shmid, 0), v.pgoff + v.size)
    for target in targets:
        if target.kind != "shmem":
            continue
        try:
            pm = images.pagemap_for(target)
        except CritPageReadError:
            continue  # reported with the pagemap
        if target.id not in used:
            yield Problem("note", "shmem", str(pm.path), f"shmem {target.id} is used by no VMA, memfd or SysV segment")
            continue
        limit = extent.get(target.id)
        if limit is not None and pm.entries and pm.entries[-1].end > limit:
            last = pm.entries[-1]
            yield Problem("error", "shmem", str(pm.path),
                          f"pages up to offset {last.end:#x} but the shared mappings of shmem {target.id} "
                          f"end at offset {limit:#x}")
