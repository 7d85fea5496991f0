"""ELF core files from a checkpoint, one per process, that gdb opens with the program's executable.

Each core has a PT_LOAD per VMA holding the real bytes of every dumped page
(parent pages of a chain, shared memory, memfd and SysV pages through their
shmem pagemaps), file-backed pages that were never dumped read from the
mapped file when it is still there and unchanged (size and GNU build-id as
files.img recorded them), and zeros elsewhere. Pages that should have had
data but had none (a changed or missing file, lazy pages with no page
server) are listed in a `CRIT-PAGEREAD` note and in the report. Notes:
NT_PRSTATUS and NT_FPREGSET per thread (registers from core-<tid>.img),
NT_PRPSINFO, NT_AUXV (mm_saved_auxv) and NT_FILE. x86_64 only.

Streamed: headers and notes first (they are small), then each VMA's bytes
move file-to-file with `copy_file_range`; untouched ranges stay sparse.
"""

from __future__ import annotations

import operator
import os
import struct
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..criu_env import pycriu
from ..errors import ImageError
from ..imagefile import load_messages
from ..images import (
    PROT_EXEC,
    PROT_READ,
    PROT_WRITE,
    VMA_AREA_MEMFD,
    VMA_AREA_VSYSCALL,
    VMA_AREA_VVAR,
    VMA_FILE_PRIVATE,
    VMA_FILE_SHARED,
    CheckpointImages,
    Vma,
)
from ..memory import ProcessReader, shmem_id
from ..output import OutputError
from ..plugins import make_strategy
from ..reader import PageReader, Segment
from ..strategy import Strategy
from .fileio import copy_range

EM_X86_64 = 62
ET_CORE = 4
PT_LOAD, PT_NOTE = 1, 4
PF_X, PF_W, PF_R = 1, 2, 4
NT_PRSTATUS, NT_FPREGSET, NT_PRPSINFO, NT_AUXV = 1, 2, 3, 6
NT_FILE = 0x46494C45
#: Our own note (name "CRIT-PAGEREAD"): text lines "start-end reason" of ranges left as zeros.
NT_CRIT_MISSING = 0x4D495353
#: Our note saying where mapped files were read from (the host, checked; or the container root given).
NT_CRIT_FILES = 0x46494C53

#: A VMA larger than this (128 TiB, a whole 47-bit user address space) is a corrupt mm image.
MAX_VMA_BYTES = 1 << 47
_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_PHDR = struct.Struct("<IIQQQQQQ")
_PRSTATUS = struct.Struct("<iiih2xQQiiii8q27Qi4x")
_PRPSINFO = struct.Struct("<BBbb4xQIIiiii16s80s")
_FPREGS = struct.Struct("<HHHHQQII32I64I96x")
_GPREGS = (
    "r15", "r14", "r13", "r12", "bp", "bx", "r11", "r10", "r9", "r8", "ax", "cx", "dx", "si", "di",
    "orig_ax", "ip", "cs", "flags", "sp", "ss", "fs_base", "gs_base", "ds", "es", "fs", "gs",
)

#: progress(what, done_bytes, total_bytes)
Progress = Callable[[str, int, int], None]


@dataclass
class CoreReport:
    """One core file: where it is, what it holds, and the ranges left as zeros for want of data."""

    pid: int
    path: str
    threads: int
    loads: int
    size: int
    dumped_bytes: int = 0
    file_bytes: int = 0
    missing: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _MappedFile:
    """A regular file that VMAs map, as files.img recorded it, and whether it may be read now."""

    name: str
    size: int
    build_id: bytes | None
    fd: int = -1
    problem: str | None = None
    root: str | None = None


def check_arch(images: CheckpointImages, pid: int) -> Any:
    """The pid's core_entry if it is an x86_64 task; else an ImageError naming core-<pid>.img."""
    core = images.core(pid)
    mtype = type(core).DESCRIPTOR.fields_by_name["mtype"].enum_type.values_by_number.get(core.mtype)
    name = mtype.name if mtype is not None else str(core.mtype)
    path = images.image(f"core-{pid}.img")
    if name != "X86_64":
        raise ImageError(path, f"architecture {name}: coredump supports x86_64 only")
    if core.thread_info.gpregs.mode != 1:  # USER_X86_REGS_MODE_NATIVE
        raise ImageError(path, "32-bit compat task: coredump supports 64-bit x86_64 tasks only")
    return core


def write_core(
    images: CheckpointImages,
    pid: int,
    out: str | os.PathLike[str],
    *,
    strategy: str | Strategy | None = None,
    progress: Progress | None = None,
    root: str | os.PathLike[str] | None = None,
) -> CoreReport:
    """Write the ELF core of `pid` to the open-for-create path `out` (caller makes it atomic).

    Mapped files are looked up under `root` (a container's filesystem) if given,
    else on the host; either way they are used only where size and build-id
    match the dump. A note says which.
    """
    core = check_arch(images, pid)
    proc = images.processes[pid]
    threads = [pid] + [t for t in proc.threads if t != pid]
    cores = [core] + [images.core(t) for t in threads[1:]]
    vmas = images.vmas(pid)
    mm = images.mm(pid)
    page_size = images.page_size
    files = _mapped_files(images, root)
    own = not isinstance(strategy, Strategy)
    shared = strategy if isinstance(strategy, Strategy) else make_strategy(strategy or images.config.strategy,
                                                                          images.config)
    # Not closed when done: closing a reader closes its strategy, which may be shared by every pid.
    reader = images.reader(pid, shared, zero_fill=True, auto_dedup=False)
    try:
        loads = [(v, 0 if _skip_data(v) else v.size) for v in vmas]
        for v, filesz in loads:
            if filesz > MAX_VMA_BYTES:
                raise ImageError(images.path / f"mm-{pid}.img",
                                 f"vma {v.start:#x}-{v.end:#x} is {v.size} bytes, more than any user address space")
        # Plan first (index lookups and file checks only), so the notes can list what stays zero.
        missing: list[dict[str, Any]] = []
        plan = CoreReport(pid, str(out), len(threads), len(loads), 0)
        for v, filesz in loads:
            if filesz:
                _write_vma(images, reader, v, -1, 0, files, plan, missing)
        notes = _notes(images, pid, threads, cores, mm, vmas, files, reader, page_size)
        if missing:
            notes += _note("CRIT-PAGEREAD", NT_CRIT_MISSING, _missing_text(missing))
        if any(v.status & (VMA_FILE_PRIVATE | VMA_FILE_SHARED) for v in vmas):
            where = f"container root {root}" if root is not None else "the host"
            notes += _note("CRIT-PAGEREAD", NT_CRIT_FILES,
                           f"mapped files from {where}, used where size and build-id match\n".encode())
        phnum = 1 + len(loads)
        note_off = _EHDR.size + phnum * _PHDR.size
        data_off = _align(note_off + len(notes), page_size)
        offsets = []
        pos = data_off
        for _v, filesz in loads:
            offsets.append(pos)
            pos += filesz
        total = pos
        report = CoreReport(pid, str(out), len(threads), len(loads), total)
        try:
            fd = os.open(out, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise OutputError(out, f"cannot create: {exc.strerror}") from None
        try:
            head = [_elf_header(phnum), _PHDR.pack(PT_NOTE, 0, note_off, 0, 0, len(notes), 0, 4)]
            for (v, filesz), off in zip(loads, offsets, strict=True):
                head.append(_PHDR.pack(PT_LOAD, _pflags(v), off, v.start, 0, filesz, v.size, page_size))
            _pwrite_all(fd, b"".join(head) + notes, 0)
            done = 0
            data_total = sum(f for _, f in loads)
            for (v, filesz), off in zip(loads, offsets, strict=True):
                if filesz:
                    _write_vma(images, reader, v, fd, off, files, report, [])
                    done += filesz
                    if progress is not None:
                        progress(f"core.{pid}", done, data_total)
            os.ftruncate(fd, total)
        finally:
            os.close(fd)
        report.size = total
        report.missing = missing
        return report
    finally:
        if own:
            shared.close()
        for f in files.values():
            if f.fd >= 0:
                os.close(f.fd)
                f.fd = -1


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


def _skip_data(v: Vma) -> bool:
    """VMAs whose bytes a core does not carry: vvar, vsyscall, PROT_NONE."""
    return bool(v.status & (VMA_AREA_VVAR | VMA_AREA_VSYSCALL)) or not v.prot & (PROT_READ | PROT_WRITE | PROT_EXEC)


def _pflags(v: Vma) -> int:
    return (PF_R if v.prot & PROT_READ else 0) | (PF_W if v.prot & PROT_WRITE else 0) | (
        PF_X if v.prot & PROT_EXEC else 0
    )


def _elf_header(phnum: int) -> bytes:
    ident = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)  # 64-bit, little-endian, version 1, SYSV
    return _EHDR.pack(ident, ET_CORE, EM_X86_64, 1, 0, _EHDR.size, 0, 0, _EHDR.size, _PHDR.size, phnum, 0, 0, 0)


# --- notes ----------------------------------------------------------------------------------


def _note(name: str, ntype: int, desc: bytes) -> bytes:
    raw = name.encode() + b"\0"
    return (
        struct.pack("<III", len(raw), len(desc), ntype)
        + raw + bytes(_align(len(raw), 4) - len(raw))
        + desc + bytes(_align(len(desc), 4) - len(desc))
    )


def _notes(
    images: CheckpointImages, pid: int, threads: list[int], cores: list[Any], mm: Any, vmas: list[Vma],
    files: dict[int, _MappedFile], reader: PageReader, page_size: int,
) -> bytes:
    proc = images.processes[pid]
    parts = []
    for i, (tid, core) in enumerate(zip(threads, cores, strict=True)):
        parts.append(_note("CORE", NT_PRSTATUS, _prstatus(tid, proc.ppid, proc.pgid, proc.sid, core)))
        if i == 0:
            parts.append(_note("CORE", NT_PRPSINFO, _prpsinfo(pid, proc.ppid, proc.pgid, proc.sid, core, mm, reader)))
            parts.append(_note("CORE", NT_AUXV, _auxv(mm)))
            parts.append(_note("CORE", NT_FILE, _nt_file(images, vmas, files, page_size)))
        if core.thread_info.HasField("fpregs"):
            parts.append(_note("CORE", NT_FPREGSET, _fpregs(core.thread_info.fpregs)))
    return b"".join(parts)


def _prstatus(tid: int, ppid: int, pgid: int, sid: int, core: Any) -> bytes:
    regs = core.thread_info.gpregs
    values = [getattr(regs, name) & 0xFFFFFFFFFFFFFFFF for name in _GPREGS]
    blocked = 0
    if core.HasField("thread_core") and core.thread_core.HasField("blk_sigset"):
        blocked = core.thread_core.blk_sigset
    elif core.HasField("tc"):
        blocked = core.tc.blk_sigset
    return _PRSTATUS.pack(0, 0, 0, 0, 0, blocked, tid, ppid, pgid, sid, *([0] * 8), *values, 1)


def _fpregs(fp: Any) -> bytes:
    st = list(fp.st_space)[:32] + [0] * max(0, 32 - len(fp.st_space))
    xmm = list(fp.xmm_space)[:64] + [0] * max(0, 64 - len(fp.xmm_space))
    return _FPREGS.pack(fp.cwd & 0xFFFF, fp.swd & 0xFFFF, fp.twd & 0xFFFF, fp.fop & 0xFFFF, fp.rip, fp.rdp,
                        fp.mxcsr, fp.mxcsr_mask, *st, *xmm)


def _prpsinfo(pid: int, ppid: int, pgid: int, sid: int, core: Any, mm: Any, reader: PageReader) -> bytes:
    comm = core.tc.comm if core.HasField("tc") else ""
    state = core.tc.task_state if core.HasField("tc") else 0
    uid = gid = 0
    if core.HasField("thread_core") and core.thread_core.HasField("creds"):
        uid, gid = core.thread_core.creds.uid, core.thread_core.creds.gid
    args = b""
    length = min(max(mm.mm_arg_end - mm.mm_arg_start, 0), 80)
    if length:
        try:
            args = reader.read(mm.mm_arg_start, length)
        except Exception:
            args = b""
    args = args.rstrip(b"\0").replace(b"\0", b" ")
    sname = {1: b"S", 2: b"Z", 3: b"T"}.get(state, b"R")[0]
    return _PRPSINFO.pack(0, sname, 0, 0, 0, uid, gid, pid, ppid, pgid, sid, comm.encode()[:15], args[:79])


def _auxv(mm: Any) -> bytes:
    values = list(mm.mm_saved_auxv)
    pairs = []
    for i in range(0, len(values) - 1, 2):
        if values[i] == 0:
            break
        pairs.append((values[i], values[i + 1]))
    pairs.append((0, 0))
    return b"".join(struct.pack("<QQ", k & 0xFFFFFFFFFFFFFFFF, v & 0xFFFFFFFFFFFFFFFF) for k, v in pairs)


def _nt_file(images: CheckpointImages, vmas: list[Vma], files: dict[int, _MappedFile], page_size: int) -> bytes:
    rows = []
    names = []
    for v in vmas:
        if not v.status & (VMA_FILE_PRIVATE | VMA_FILE_SHARED | VMA_AREA_MEMFD):
            continue
        if v.status & VMA_AREA_MEMFD:
            name = "/" + v.name + " (deleted)"
        else:
            f = files.get(v.shmid)
            name = f.name if f is not None else v.name
        rows.append(struct.pack("<QQQ", v.start, v.end, v.pgoff // page_size))
        names.append(name.encode() + b"\0")
    return struct.pack("<QQ", len(rows), page_size) + b"".join(rows) + b"".join(names)


def _missing_text(missing: list[dict[str, Any]]) -> bytes:
    return "".join(f"{m['start']:#x}-{m['end']:#x} {m['reason']}\n" for m in missing).encode()


# --- mapped files ---------------------------------------------------------------------------


def _mapped_files(images: CheckpointImages, root: str | os.PathLike[str] | None = None) -> dict[int, _MappedFile]:
    """files.img's regular files by id; opened (and checked) only when a VMA needs one."""
    if not images.has_image("files.img"):
        return {}
    path = images.image("files.img")
    out = {}
    for f in load_messages(path, "FILES", pycriu().images.pb.file_entry):
        if f.HasField("reg"):
            bid = struct.pack(f"<{len(f.reg.build_id)}I", *f.reg.build_id) if len(f.reg.build_id) else None
            out[f.id] = _MappedFile(f.reg.name, f.reg.size if f.reg.HasField("size") else -1, bid,
                                    root=None if root is None else os.fspath(root))
    return out


def _open_checked(f: _MappedFile) -> int:
    """The file's descriptor if it still matches the dump, else -1 with `f.problem` set."""
    if f.fd >= 0 or f.problem is not None:
        return f.fd
    try:
        if f.root is not None:
            from ..rootfs import open_in_root

            fd = open_in_root(f.root, f.name)
        else:
            fd = os.open(f.name, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        f.problem = f"file {f.name}{' in ' + f.root if f.root else ''}: {exc.strerror}"
        return -1
    size = os.fstat(fd).st_size
    if f.size >= 0 and size != f.size:
        f.problem = f"file {f.name} changed: {size} bytes, {f.size} when dumped"
    elif f.build_id is not None:
        now = gnu_build_id(fd)
        if now is None or now[: len(f.build_id)] != f.build_id:
            f.problem = f"file {f.name} changed: build-id differs from the dump's"
    if f.problem is not None:
        os.close(fd)
        return -1
    f.fd = fd
    return fd


def gnu_build_id(fd: int) -> bytes | None:
    """The NT_GNU_BUILD_ID of an ELF file (None if it has none or is not ELF)."""
    head = os.pread(fd, 64, 0)
    if len(head) < 64 or head[:4] != b"\x7fELF" or head[4] != 2 or head[5] != 1:
        return None
    phoff, = struct.unpack_from("<Q", head, 32)
    phentsize, phnum = struct.unpack_from("<HH", head, 54)
    if phnum > 4096 or phentsize < _PHDR.size:
        return None
    table = os.pread(fd, phentsize * phnum, phoff)
    for i in range(phnum):
        if len(table) < (i + 1) * phentsize:
            break
        p_type, _fl, p_off, _va, _pa, p_filesz, _ms, _al = _PHDR.unpack_from(table, i * phentsize)
        if p_type != PT_NOTE or p_filesz > 1 << 20:
            continue
        data = os.pread(fd, p_filesz, p_off)
        pos = 0
        while pos + 12 <= len(data):
            namesz, descsz, ntype = struct.unpack_from("<III", data, pos)
            pos += 12
            name = data[pos : pos + namesz]
            pos += _align(namesz, 4)
            desc = data[pos : pos + descsz]
            pos += _align(descsz, 4)
            if ntype == 3 and name.rstrip(b"\0") == b"GNU":
                return desc
    return None


# --- VMA bytes ------------------------------------------------------------------------------

#: Segments handed to `write_segments` at once (what is planned at once stays bounded: a VMA may have millions).
WRITE_PIECES = 1 << 14


def _write_vma(
    images: CheckpointImages, reader: ProcessReader, v: Vma, fd: int, base: int,
    files: dict[int, _MappedFile], report: CoreReport, missing: list[dict[str, Any]],
) -> None:
    """Stream one VMA's bytes to `fd` at `base`: dumped pages, then shmem, file or zeros for the rest.

    Dumped pages go through the reader's `write_segments` (the strategy moves them: kernel copies for the
    local strategies), WRITE_PIECES segments a call; `fd` -1 is the planning pass, which only collects
    what is missing."""
    if _write_vma_runs(images, reader, v, fd, base, files, report, missing):
        return
    pieces: list[tuple[Segment, int]] = []
    for seg in reader.segments(v.start, v.size):
        if seg.kind == "present" or (seg.kind == "lazy" and reader.strategy.serves_lazy):
            report.dumped_bytes += seg.length
            if fd >= 0:
                pieces.append((seg, base + seg.vaddr - v.start))
                if len(pieces) >= WRITE_PIECES:
                    reader.write_segments(fd, pieces)
                    pieces = []
        elif seg.kind == "lazy":
            _add_missing(missing, seg.vaddr, seg.end, "lazy pages (no page server)")
        else:
            _fill_hole(images, reader, v, seg.vaddr, seg.length, fd, base, files, report, missing)
    if fd >= 0 and pieces:
        reader.write_segments(fd, pieces)


def _write_vma_runs(
    images: CheckpointImages, reader: ProcessReader, v: Vma, fd: int, base: int,
    files: dict[int, _MappedFile], report: CoreReport, missing: list[dict[str, Any]],
) -> bool:
    """`_write_vma` from the memory maps' columns (no object per run): the VMA's readable runs
    (`ProcessReader.readable_runs`, shared mappings through their segment) go to the reader's `write_to`
    WRITE_PIECES at a time (with the native helper one plan and one kernel-copy call each), then each hole
    between them is filled as the walk fills it (none to fill in private anonymous memory). False, with
    nothing done, for a windowed map or lazy pages the strategy cannot serve: the caller walks segments."""
    if reader.windowed:
        return False
    starts, ends, lazy = reader.readable_runs(v.start, v.end)
    if lazy:
        return False
    report.dumped_bytes += sum(ends) - sum(starts)
    if fd >= 0:
        shift = base - v.start
        for k in range(0, len(starts), WRITE_PIECES):
            ss, ee = starts[k : k + WRITE_PIECES], ends[k : k + WRITE_PIECES]
            reader.write_to(fd, zip(ss, map(operator.sub, ee, ss), map(shift.__add__, ss), strict=True), holes="skip")
    if shmem_id(images, v) is None and not v.status & (VMA_FILE_PRIVATE | VMA_FILE_SHARED):
        return True  # private anonymous memory CRIU did not dump was never touched: zeros, left sparse
    pos = v.start
    for start, end in zip(starts, ends, strict=True):
        if start > pos:
            _fill_hole(images, reader, v, pos, start - pos, fd, base, files, report, missing)
        pos = end
    if pos < v.end:
        _fill_hole(images, reader, v, pos, v.end - pos, fd, base, files, report, missing)
    return True


def _fill_hole(
    images: CheckpointImages, reader: PageReader, v: Vma, start: int, length: int, fd: int, base: int,
    files: dict[int, _MappedFile], report: CoreReport, missing: list[dict[str, Any]],
) -> None:
    shmid = shmem_id(images, v)
    if shmid is not None:
        if shmid not in images.shmem_ids:
            _add_missing(missing, start, start + length, f"no pagemap-shmem-{shmid}.img")
            return
        offset = v.pgoff + (start - v.start)
        # The segment's reader shares the pid's strategy (so it is not closed here: that would close it),
        # unless that is a page server's: CRIU never dumps shared memory lazily, its pages are local.
        strategy = reader.strategy if not reader.strategy.serves_lazy else "preadv"
        shm = images.shmem_reader(shmid, strategy, zero_fill=True, auto_dedup=False)
        pieces: list[tuple[Segment, int]] = []
        for seg in shm.segments(offset, length):
            dst = base + (seg.vaddr - v.pgoff)
            if seg.kind == "present" or (seg.kind == "lazy" and shm.strategy.serves_lazy):
                report.dumped_bytes += seg.length
                if fd >= 0:
                    pieces.append((seg, dst))
                    if len(pieces) >= WRITE_PIECES:
                        shm.write_segments(fd, pieces)
                        pieces = []
            elif seg.kind == "lazy":
                vstart = v.start + seg.vaddr - v.pgoff
                _add_missing(missing, vstart, vstart + seg.length, "lazy shmem pages")
        if fd >= 0 and pieces:
            shm.write_segments(fd, pieces)
        if shm.strategy is not reader.strategy:
            shm.close()
        return
    if v.status & (VMA_FILE_PRIVATE | VMA_FILE_SHARED):
        f = files.get(v.shmid)
        if f is None:
            _add_missing(missing, start, start + length, f"file id {v.shmid} not in files.img")
            return
        src = _open_checked(f)
        if src < 0:
            _add_missing(missing, start, start + length, f.problem)
            return
        file_off = v.pgoff + (start - v.start)
        size = os.fstat(src).st_size
        n = max(0, min(length, size - file_off))
        if n:
            _copy(src, file_off, fd, base + start - v.start, n, f.name)
            report.file_bytes += n
        return
    # Private anonymous memory CRIU did not dump was never touched: zeros, left sparse.


def _add_missing(missing: list[dict[str, Any]], start: int, end: int, reason: str | None) -> None:
    """Record [start, end) as zeros for want of data, merged with the previous range when it continues it."""
    if missing and missing[-1]["end"] == start and missing[-1]["reason"] == reason:
        missing[-1]["end"] = end
    else:
        missing.append({"start": start, "end": end, "reason": reason})


def _copy(src: int, src_offset: int, fd: int, dst: int, length: int, path: Path | str) -> None:
    if fd >= 0:  # fd -1: the planning pass, which only collects what is missing
        copy_range(src, src_offset, fd, dst, length, path)


# --- a whole checkpoint ---------------------------------------------------------------------


def coredump(
    images: CheckpointImages,
    outdir: str | os.PathLike[str],
    pids: list[int] | None = None,
    *,
    strategy: str | Strategy | None = None,
    progress: Progress | None = None,
    root: str | os.PathLike[str] | None = None,
) -> list[CoreReport]:
    """Write `core.<pid>` for each pid (default: every process with memory) into `outdir`.

    `root`: the container's filesystem, where mapped files are looked up (see `write_core`).

    All or nothing: the cores are written into a temporary directory (inside
    `outdir` if it exists, else beside it) and renamed into place only when
    every one is complete.
    """
    outdir = Path(outdir)
    if pids is None:
        pids = [p for p in images.pids if images.has_image(f"mm-{p}.img")]
    for pid in pids:
        check_arch(images, pid)
    if outdir.exists() and not outdir.is_dir():
        raise ImageError(outdir, "output exists and is not a directory")
    # One strategy for every pid: a page server (CRIU's lazy dump) may take one client only.
    shared = strategy if isinstance(strategy, Strategy) else make_strategy(strategy or images.config.strategy,
                                                                          images.config)
    try:
        return _write_cores(images, outdir, pids, shared, progress, root)
    except OSError as exc:
        if exc.filename is not None:
            raise
        raise OutputError(outdir, f"cannot write a core: {exc.strerror or exc}") from None
    finally:
        if shared is not strategy:
            shared.close()


def _write_cores(images: CheckpointImages, outdir: Path, pids: list[int], shared: Strategy,
                 progress: Progress | None, root: str | os.PathLike[str] | None = None) -> list[CoreReport]:
    from ..output import atomic_dir, publish, temp_dir_in

    if not outdir.exists():
        with atomic_dir(outdir) as tmp:
            reports = [write_core(images, pid, tmp / f"core.{pid}", strategy=shared, progress=progress, root=root)
                       for pid in pids]
        for r in reports:
            r.path = str(outdir / Path(r.path).name)
        return reports
    with temp_dir_in(outdir, "coredump") as tmp:
        reports = [write_core(images, pid, tmp / f"core.{pid}", strategy=shared, progress=progress, root=root)
                   for pid in pids]
        for r in reports:
            final = outdir / Path(r.path).name
            publish(r.path, final)
            r.path = str(final)
    return reports
