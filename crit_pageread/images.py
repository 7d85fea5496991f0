"""An image directory: pids, VMAs, pagemaps, pages files and the parent chain.

Everything sits under our own bounded framing (`imagefile.py`). What the
page-reading path needs (pstree, VMAs, files and memfd names) is decoded
without protobuf, so commands start fast; `mm()` and `core()` return pycriu's
protobuf messages for the rest; pagemaps are parsed by `pagemap.py`.
"""

from __future__ import annotations

import os
import stat
from functools import cached_property

from . import TYPE_CHECKING, _paths
from ._record import Record
from .config import Config, load_config
from .errors import ChainError, ImageError
from .imagefile import load_messages, load_raw_messages, open_regular
from .pagemap import Pagemap, load_pagemap
from .strategy import PagesFile, Strategy, Target

if TYPE_CHECKING:  # typing, dataclasses and pathlib are not imported at start-up
    from pathlib import Path
    from typing import Any

    from .archive import ArchiveIndex, Member, PagesWanted
    from .memory import ProcessReader
    from .reader import PageReader

VMA_AREA_REGULAR = 1 << 0
VMA_AREA_STACK = 1 << 1
VMA_AREA_VSYSCALL = 1 << 2
VMA_AREA_VDSO = 1 << 3
VMA_AREA_HEAP = 1 << 5
VMA_FILE_PRIVATE = 1 << 6
VMA_FILE_SHARED = 1 << 7
VMA_ANON_SHARED = 1 << 8
VMA_ANON_PRIVATE = 1 << 9
VMA_AREA_SYSVIPC = 1 << 10
VMA_AREA_SOCKET = 1 << 11
VMA_AREA_VVAR = 1 << 12
VMA_AREA_AIORING = 1 << 13
VMA_AREA_MEMFD = 1 << 14

PROT_READ, PROT_WRITE, PROT_EXEC = 1, 2, 4
#: pid_t is a signed 32-bit int: no pid, pgid, sid or thread id reaches this.
PID_LIMIT = 1 << 31
#: core_entry.tc.task_state of a zombie (CRIU's TASK_DEAD).
TASK_DEAD = 2
MAP_SHARED = 1


class Process(Record):
    """A task of the pstree: its pid, parent, group, session and threads (immutable)."""

    __slots__ = _fields = ("pid", "ppid", "pgid", "sid", "threads")
    pid: int
    ppid: int
    pgid: int
    sid: int
    threads: tuple[int, ...]

    def __init__(self, pid: int, ppid: int, pgid: int, sid: int, threads: tuple[int, ...]) -> None:
        self._set(pid, ppid, pgid, sid, threads)


class Vma(Record):
    """A mapping from mm-<pid>.img, with CRIU's status bits and a printable name (immutable)."""

    __slots__ = _fields = ("start", "end", "pgoff", "shmid", "prot", "flags", "status", "name")
    start: int
    end: int
    pgoff: int
    shmid: int
    prot: int
    flags: int
    status: int
    name: str

    def __init__(self, start: int, end: int, pgoff: int, shmid: int, prot: int, flags: int, status: int,
                 name: str) -> None:
        self._set(start, end, pgoff, shmid, prot, flags, status, name)

    @property
    def size(self) -> int:
        return self.end - self.start

    @property
    def perms(self) -> str:
        """`rw-p` style permissions, as /proc/PID/maps shows them."""
        return (
            ("r" if self.prot & PROT_READ else "-")
            + ("w" if self.prot & PROT_WRITE else "-")
            + ("x" if self.prot & PROT_EXEC else "-")
            + ("s" if self.flags & MAP_SHARED else "p")
        )

    @property
    def kind(self) -> str:
        s = self.status
        for bit, name in (
            (VMA_AREA_VSYSCALL, "vsyscall"), (VMA_AREA_VDSO, "vdso"), (VMA_AREA_VVAR, "vvar"),
            (VMA_AREA_SYSVIPC, "sysv-shm"), (VMA_AREA_MEMFD, "memfd"), (VMA_ANON_SHARED, "anon-shared"),
            (VMA_FILE_SHARED, "file-shared"), (VMA_FILE_PRIVATE, "file-private"),
            (VMA_AREA_HEAP, "heap"), (VMA_AREA_STACK, "stack"), (VMA_AREA_SOCKET, "socket"),
            (VMA_AREA_AIORING, "aio"), (VMA_ANON_PRIVATE, "anon"),
        ):
            if s & bit:
                return name
        return "other"


#: A `parent` regular file holds a path: longer than PATH_MAX is not one.
PARENT_FILE_MAX = 4096
#: Characters of a file's content shown in a message.
SHOWN_MAX = 120


def shown(value: str | bytes, limit: int = SHOWN_MAX) -> str:
    """`value` safe to print in a one-line message: non-printable characters escaped, at most `limit` shown."""
    raw = value.encode(errors="surrogateescape") if isinstance(value, str) else value
    text = "".join(chr(b) if 0x20 <= b < 0x7F and b != 0x5C else f"\\x{b:02x}" for b in raw[:limit])
    return text + (f"... ({len(raw)} bytes)" if len(raw) > limit else "")


#: Levels of a chain of incremental dumps, newest included, that a checkpoint may have.
MAX_CHAIN_DEPTH = 256



def _shmem_id(name: str) -> int | None:
    """The id of `pagemap-shmem-<id>.img` (re's `^pagemap-shmem-(\\d+)\\.img$`: a newline may end it), else None."""
    stem = name[:-1] if name.endswith("\n") else name
    digits = stem[len("pagemap-shmem-"):-len(".img")]
    if stem.startswith("pagemap-shmem-") and stem.endswith(".img") and digits.isdecimal():
        return int(digits)
    return None


class CheckpointImages:
    """A CRIU image directory, or the images of a checkpoint archive.

    Use `open_images()` as a context manager (or call `close()`): an archive's
    unpacked copy is removed then (and, at the latest, when the object is
    collected). `image(name)` locates one image: a Path in a directory, an
    `archive.Member` (a byte range, shown as `ARCHIVE: MEMBER`) in an archive.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        config: Config | None = None,
        *,
        _chain: tuple[str, ...] = (),
        _index: ArchiveIndex | None = None,
        _member_dir: str = "",
    ) -> None:
        #: The directory (or archive) as text, as str(Path) shows it; `path` is its Path, made on first use.
        self._path: str = _paths.text(path)
        self._path_obj: Path | None = None
        #: The archive's index and the member directory of the images (None, "" for a directory).
        self._index = _index
        self.member_dir = _member_dir
        if _index is None:
            if not _paths.exists(self._path):
                raise ImageError(self._path, "no such image directory")
            if not _paths.is_dir(self._path):
                raise ImageError(self._path, "not a directory of CRIU images")
        self.config = config if config is not None else load_config()
        self.page_size = self.config.page_size
        here = os.path.realpath(self._path) if _index is None else f"{self._path}\0{_member_dir}"
        self._chain = (*_chain, here)
        self._pagemaps: dict[Target, Pagemap] = {}
        self._zombies: dict[int, bool] = {}
        self._vmas: dict[int, list[Vma]] = {}
        self._pages: dict[tuple[int, bool], PagesFile] = {}
        self._parent: CheckpointImages | None = None
        self._parent_checked = False
        self._cleanup: list[Any] = []
        #: The archive the images are read from (by `open_images`), else None.
        self.archive: Path | None = _index.path if _index is not None else None
        #: The directory of the container files (config.dump, spec.dump) of a Podman/CRI-O layout, if any.
        self.container_dir: str | None = None
        # Like CRIU, open every level of the chain now: a missing, dangling or cyclic `parent` link is
        # an error at open, even in a level no page needs.
        if len(self._chain) > MAX_CHAIN_DEPTH:
            where = _paths.join(self._path, "parent") if _index is None else f"{self._path}: " + self._member("parent")
            raise ChainError(where, f"parent chain deeper than {MAX_CHAIN_DEPTH}")
        self.parent  # noqa: B018

    @property
    def path(self) -> Path:
        """The image directory, or the archive."""
        if self._path_obj is None:
            self._path_obj = _paths.as_path(self._path)
        return self._path_obj

    @path.setter
    def path(self, value: str | os.PathLike[str]) -> None:
        self._path, self._path_obj = _paths.text(value), None

    @property
    def path_text(self) -> str:
        """`str(path)`, without making the Path (no pathlib)."""
        return self._path

    # --- where images are --------------------------------------------------------------------

    def image(self, name: str) -> Path | Member:
        """Where image `name` is: a Path, or an archive Member (an ImageError if it is not there)."""
        if self._index is None:
            return self.path / name
        return self._index.member(self._member(name))

    def _image(self, name: str) -> str | Member:
        """`image(name)` with a directory's path as text (no pathlib)."""
        if self._index is None:
            return _paths.join(self._path, name)
        return self._index.member(self._member(name))

    def has_image(self, name: str) -> bool:
        """True if image `name` exists (a regular file)."""
        if self._index is None:
            return _paths.is_file(_paths.join(self._path, name))
        return self._index.is_file(self._member(name))

    def image_names(self) -> list[str]:
        """The names of the images (every file of the directory), sorted."""
        if self._index is None:
            return sorted(os.listdir(self._path))
        return [n for n in self._index.listdir(self.member_dir) if self._index.available(self._member(n))]

    def container_file(self, name: str, limit: int = 16 << 20) -> bytes | None:
        """A container file of a Podman/CRI-O layout (`config.dump`, `spec.dump`...), or None."""
        if self.container_dir is None:
            return None
        if self._index is not None:
            return self._index.read_small(f"{self.container_dir}/{name}" if self.container_dir else name, limit)
        path = _paths.join(self.container_dir, name)
        if not _paths.is_file(path):
            return None
        with open(path, "rb") as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise ImageError(path, f"more than {limit} bytes")
        return data

    def image_size(self, name: str) -> int | None:
        """Size in bytes of image `name`, or None if absent or not a regular file (the `parent` link)."""
        if self._index is None:
            try:
                st = os.lstat(_paths.join(self._path, name))
            except OSError:
                return None
            return st.st_size if stat.S_ISREG(st.st_mode) else None
        return self._index.size_of(self._member(name))

    def container_file_size(self, name: str) -> int | None:
        """Size of a container file (`rootfs-diff.tar`...) beside the images, or None."""
        if self.container_dir is None:
            return None
        if self._index is not None:
            return self._index.size_of(f"{self.container_dir}/{name}" if self.container_dir else name)
        try:
            return os.stat(_paths.join(self.container_dir, name)).st_size
        except OSError:
            return None

    @property
    def location(self) -> str:
        """The images' place as users know it: the directory, or `ARCHIVE: MEMBER_DIR`."""
        if self._index is None:
            return self._path
        return f"{self._path}: {self.member_dir or '.'}"

    def _member(self, name: str) -> str:
        return f"{self.member_dir}/{name}" if self.member_dir else name

    # --- processes -------------------------------------------------------------------------

    @cached_property
    def processes(self) -> dict[int, Process]:
        """Every task of pstree.img by pid, in image order."""
        path = self._image("pstree.img")
        out: dict[int, Process] = {}
        # pstree_entry: pid 1, ppid 2, pgid 3, sid 4, threads 5 (decoded without protobuf: fast start-up)
        for msg in load_raw_messages(path, "PSTREE"):
            pid = msg.req(1, "pid")
            if pid <= 0 or pid >= PID_LIMIT or pid in out:
                raise ImageError(path, f"garbage pstree: bad or repeated pid {pid}")
            threads = tuple(msg.ints(5)) or (pid,)
            ids = {"ppid": msg.req(2, "ppid"), "pgid": msg.req(3, "pgid"), "sid": msg.req(4, "sid")}
            for name, value in ids.items():
                if value >= PID_LIMIT:  # pid_t is a signed 32-bit int
                    raise ImageError(path, f"garbage pstree: {name} {value} of pid {pid} is not a pid (>= 2^31)")
            bad = next((t for t in threads if t <= 0 or t >= PID_LIMIT), None)
            if bad is not None and self.is_zombie(pid):
                threads = (pid,)  # CRIU leaves a zombie's thread list unset (any value): it has no threads
            elif bad is not None:
                raise ImageError(path, f"garbage pstree: thread id {bad} of pid {pid} is not a pid")
            out[pid] = Process(pid, ids["ppid"], ids["pgid"], ids["sid"], threads)
        if not out:
            raise ImageError(path, "empty pstree: no processes")
        return out

    @property
    def pids(self) -> list[int]:
        """The pids of the pstree, root first."""
        return list(self.processes)

    @cached_property
    def shmem_ids(self) -> list[int]:
        """Ids of the shared-memory segments that have a pagemap (pagemap-shmem-<id>.img)."""
        return sorted(i for i in map(_shmem_id, self.image_names()) if i is not None)

    def mm(self, pid: int) -> Any:
        """The mm_entry message of mm-<pid>.img (pycriu protobuf)."""
        self._check_pid(pid)
        path = self._image(f"mm-{pid}.img")
        msgs = load_messages(path, "MM", _pycriu().images.pb.mm_entry)
        if len(msgs) != 1:
            raise ImageError(path, f"expected one mm entry, found {len(msgs)}")
        return msgs[0]

    def core(self, tid: int) -> Any:
        """The core_entry message of core-<tid>.img (registers, thread info)."""
        path = self._image(f"core-{tid}.img")
        msgs = load_messages(path, "CORE", _pycriu().images.pb.core_entry)
        if len(msgs) != 1:
            raise ImageError(path, f"expected one core entry, found {len(msgs)}")
        return msgs[0]

    def vmas(self, pid: int) -> list[Vma]:
        """The VMAs of `pid` in address order, each with a mapping name (none for a zombie); parsed once."""
        got = self._vmas.get(pid)
        if got is None:
            got = self._vmas[pid] = self._load_vmas(pid)
        return list(got)

    def _load_vmas(self, pid: int) -> list[Vma]:
        self._check_pid(pid)
        if self.is_zombie(pid):
            return []
        path = self._image(f"mm-{pid}.img")
        msgs = load_raw_messages(path, "MM")
        if len(msgs) != 1:
            raise ImageError(path, f"expected one mm entry, found {len(msgs)}")
        names = self._file_names
        out = []
        # CRIU does not flag the main stack; mm_start_stack (field 5) lies in it.
        stack = msgs[0].opt(5)
        # mm_entry.vmas is field 14; vma_entry: start 1, end 2, pgoff 3, shmid 4, prot 5, flags 6, status 7
        for v in msgs[0].messages(14):
            start, end = v.req(1, "vma start"), v.req(2, "vma end")
            shmid, status = v.req(4, "vma shmid"), v.req(7, "vma status")
            if end <= start:
                raise ImageError(path, f"corrupt vma {start:#x}-{end:#x}")
            if start <= stack < end and status & VMA_ANON_PRIVATE:
                status |= VMA_AREA_STACK
            if status & (VMA_AREA_MEMFD | VMA_FILE_PRIVATE | VMA_FILE_SHARED):
                name = names.get(shmid, f"file#{shmid}")
            elif status & VMA_AREA_SYSVIPC:
                name = f"[sysv-shm {shmid}]"
            elif status & VMA_ANON_SHARED:
                name = f"[anon-shared {shmid}]"
            elif status & VMA_AREA_HEAP:
                name = "[heap]"
            elif status & VMA_AREA_STACK:
                name = "[stack]"
            elif status & VMA_AREA_VDSO:
                name = "[vdso]"
            elif status & VMA_AREA_VVAR:
                name = "[vvar]"
            elif status & VMA_AREA_VSYSCALL:
                name = "[vsyscall]"
            else:
                name = ""
            out.append(Vma(start, end, v.req(3, "vma pgoff"), shmid, v.req(5, "vma prot"), v.req(6, "vma flags"),
                           status, name))
        return out

    @cached_property
    def _memfd_inodes(self) -> dict[int, tuple[str, int]]:
        """memfd inode id -> (name, shmid), from memfd.img (name 1, shmid 5, inode_id 7)."""
        if not self.has_image("memfd.img"):
            return {}
        path = self._image("memfd.img")
        return {
            (m.opt(7) or i): ((m.blob(1) or b"").decode(errors="replace"), m.req(5, "shmid"))
            for i, m in enumerate(load_raw_messages(path, "MEMFD_INODE"), 1)
        }

    @cached_property
    def _files(self) -> list[tuple[int, str | None, int | None]]:
        """files.img as (id, regular file name, memfd inode id); file_entry: id 2, reg 3 (name 6),
        memfd 20 (inode_id 5)."""
        if not self.has_image("files.img"):
            return []
        path = self._image("files.img")
        out: list[tuple[int, str | None, int | None]] = []
        for f in load_raw_messages(path, "FILES"):
            reg, memfd = f.message(3), f.message(20)
            name = (reg.blob(6) or b"").decode(errors="replace") if reg is not None else None
            out.append((f.req(2, "id"), name, memfd.req(5, "inode_id") if memfd is not None else None))
        return out

    @cached_property
    def _file_names(self) -> dict[int, str]:
        """File id -> path (regular files) or `memfd:NAME` from files.img and memfd.img."""
        inodes = self._memfd_inodes
        names: dict[int, str] = {}
        for fid, name, inode in self._files:
            if name is not None:
                names[fid] = name
            elif inode is not None:
                names[fid] = "memfd:" + inodes.get(inode, ("?", 0))[0]
        return names

    @cached_property
    def memfd_shmids(self) -> dict[int, int]:
        """memfd file id (a VMA's shmid) -> the shmem id of its pagemap."""
        inodes = self._memfd_inodes
        return {fid: inodes[inode][1] for fid, _, inode in self._files if inode is not None and inode in inodes}

    def is_zombie(self, pid: int) -> bool:
        """True for a pstree task CRIU dumped without memory: a zombie (core-<pid>.img says the task is
        dead; there is no mm-<pid>.img and no pagemap-<pid>.img)."""
        z = self._zombies.get(pid)
        if z is None:
            z = False
            if not self.has_image(f"mm-{pid}.img") and not self.has_image(f"pagemap-{pid}.img"):
                if self.has_image(f"core-{pid}.img"):
                    core = self._image(f"core-{pid}.img")
                    # core_entry.tc (3) . task_state (1), decoded without protobuf
                    msgs = load_raw_messages(core, "CORE")
                    tc = msgs[0].message(3) if len(msgs) == 1 else None
                    z = tc is not None and tc.opt(1) == TASK_DEAD
            self._zombies[pid] = z
        return z

    def _check_pid(self, pid: int) -> None:
        if self.has_image("pstree.img") and pid not in self.processes:
            raise ImageError(self._image("pstree.img"), f"no pid {pid} in the checkpoint (pids: {self.pids})")

    # --- pagemaps, pages files, parents -----------------------------------------------------

    def pagemap_for(self, target: Target) -> Pagemap:
        """The parsed pagemap of a pid or shmem segment (cached)."""
        pm = self._pagemaps.get(target)
        if pm is None:
            name = f"pagemap-{target.id}.img" if target.kind == "pid" else f"pagemap-shmem-{target.id}.img"
            if target.kind == "pid" and self.is_zombie(target.id):
                where = _paths.join(self._path, name) if self._index is None else \
                    _paths.text(f"{self._path}: {self._member(name)}")
                pm = Pagemap(where, 0, [], "4.1", self.page_size)  # a zombie: no memory
            elif self._index is None:
                pm = load_pagemap(_paths.join(self._path, name), self.page_size)
            else:
                pm = load_pagemap(self._image(name), self.page_size, self._pages_extent)
            self._pagemaps[target] = pm
        return pm

    def pagemap(self, pid: int) -> Pagemap:
        return self.pagemap_for(Target("pid", pid))

    def shmem_pagemap(self, shmid: int) -> Pagemap:
        return self.pagemap_for(Target("shmem", shmid))

    def _pages_extent(self, pages_id: int) -> tuple[int, int, str] | None:
        """(base, size, name) of pages-<id>.img's bytes in its file, None if missing (archives)."""
        name = f"pages-{pages_id}.img"
        if not self.has_image(name):
            return None
        member = self._image(name)
        return member.offset, member.size, str(member)  # type: ignore[union-attr]

    def pages_file(self, pages_id: int, writable: bool = False) -> PagesFile:
        """The open pages-<id>.img, shared by every reader of this directory."""
        key = (pages_id, writable)
        pf = self._pages.get(key)
        if pf is None:
            pf = PagesFile(self._image(f"pages-{pages_id}.img"), writable=writable)  # type: ignore[arg-type]
            self._pages[key] = pf
        return pf

    @property
    def parent(self) -> CheckpointImages | None:
        """The parent images of an incremental dump, or None if there is no `parent` link."""
        if self._parent_checked:
            return self._parent
        if self._index is not None:
            return self._archive_parent(self._index)
        link = _paths.join(self._path, "parent")
        target: str | None = None
        try:
            if _paths.is_symlink(link):
                target = os.readlink(link)
            elif _paths.is_file(link):
                # Some copies keep the link as a small file holding its target.
                fd = open_regular(link, "parent link")
                try:
                    raw = os.read(fd, PARENT_FILE_MAX + 1)
                finally:
                    os.close(fd)
                if len(raw) > PARENT_FILE_MAX:
                    raise ChainError(link, f"parent link file is longer than {PARENT_FILE_MAX} bytes: {shown(raw)}")
                target = raw.decode(errors="surrogateescape").strip() or None
                if target is None:
                    raise ChainError(link, "parent link is empty")
            elif os.path.lexists(link):
                target = link
        except OSError as exc:
            raise ChainError(link, f"cannot read parent link: {exc.strerror}") from None
        self._parent_checked = True
        if target is None:
            return None
        full = _paths.join(self._path, target)
        try:
            is_dir = _paths.is_dir(full)
        except OSError as exc:  # ENAMETOOLONG, EACCES, ...
            raise ChainError(link, f"parent link to {shown(target)}: {exc.strerror}") from None
        if not is_dir:
            raise ChainError(link, f"dangling parent link to {shown(target)}{_podman_hint(target)}")
        real = os.path.realpath(full)
        if real in self._chain:
            raise ChainError(link, f"parent chain has a cycle through {shown(target)}")
        # The resolved path (as the kernel resolves `parent/..`), so messages name d1/parent, not d3/../d2/../d1.
        self._parent = CheckpointImages(real, self.config, _chain=self._chain)
        return self._parent

    def _archive_parent(self, index: ArchiveIndex) -> CheckpointImages | None:
        """The parent images inside the same archive (a `parent` symlink member)."""
        self._parent_checked = True
        name = self._member("parent")
        entry = index.entries.get(name)
        label = f"{self._path}: {name}"
        if entry is None:
            if index.is_file(name):
                raise ChainError(label, "parent link is a regular file; archives keep it as a symlink")
            return None
        if entry.kind != "symlink":
            raise ChainError(label, "parent link is not a symlink")
        target = index.resolve(name)
        if target.startswith("..") or (target and not index.is_dir(target)):
            raise ChainError(label, f"dangling parent link to {shown(entry.link)}{_podman_hint(entry.link)}")
        here = f"{self._path}\0{target}"
        if here in self._chain:
            raise ChainError(label, f"parent chain has a cycle through {shown(entry.link)}")
        self._parent = CheckpointImages(
            self._path, self.config, _chain=self._chain, _index=index, _member_dir=target
        )
        return self._parent

    # --- readers ---------------------------------------------------------------------------

    def reader(self, pid: int, strategy: str | Strategy | None = None, **options: Any) -> ProcessReader:
        """The reader of `pid`'s whole dumped address space, like /proc/PID/mem of the restored task:
        private pages, shared mappings from their segments (`memory.ProcessReader`, a PageReader).

        `strategy` is a name (a new strategy is made from the config, and
        closed with the reader) or a Strategy instance (shared: its maker
        closes it). `options`: zero_fill, auto_dedup.
        """
        self._check_pid(pid)
        reader = self._reader(Target("pid", pid), strategy, options, process=True)
        return reader  # type: ignore[return-value]  # a ProcessReader when `process`

    def shmem_reader(self, shmid: int, strategy: str | Strategy | None = None, **options: Any) -> PageReader:
        """A PageReader of a shared-memory segment (addresses are offsets in it)."""
        return self._reader(Target("shmem", shmid), strategy, options)

    def reader_for(self, target: Target, strategy: str | Strategy | None = None, **options: Any) -> PageReader:
        """A PageReader of one pagemap: a pid's own (`Target("pid", pid)`: no shared mappings, as a page
        server serves it) or a segment's."""
        if target.kind == "pid":
            self._check_pid(target.id)
        return self._reader(target, strategy, options)

    def _reader(
        self, target: Target, strategy: str | Strategy | None, options: dict[str, Any], process: bool = False
    ) -> PageReader:
        from .memory import ProcessReader
        from .plugins import make_strategy, observer
        from .reader import PageReader

        unknown = set(options) - {"zero_fill", "auto_dedup"}
        if unknown:
            raise TypeError(f"unknown reader options: {', '.join(sorted(unknown))}")
        pagemap = self.pagemap_for(target)
        owns = not isinstance(strategy, Strategy)
        if not isinstance(strategy, Strategy):
            strategy = make_strategy(strategy or self.config.strategy, self.config)
        if process:
            try:
                return ProcessReader(
                    self, target.id, pagemap, strategy,
                    zero_fill=options.get("zero_fill", self.config.zero_fill),
                    auto_dedup=options.get("auto_dedup", self.config.auto_dedup),
                    observe=observer(), owns_strategy=owns, zombie=self.is_zombie(target.id),
                )
            except BaseException:
                if owns:
                    strategy.close()
                raise
        return PageReader(
            self,
            target,
            pagemap,
            strategy,
            zero_fill=options.get("zero_fill", self.config.zero_fill),
            auto_dedup=options.get("auto_dedup", self.config.auto_dedup),
            observe=observer(),
            owns_strategy=owns,
        )

    # --- lifetime --------------------------------------------------------------------------

    def close(self) -> None:
        """Close the pages files (and the parent's); remove a temporary extraction."""
        for pf in self._pages.values():
            pf.close()
        self._pages.clear()
        if self._parent is not None:
            self._parent.close()
        for fn in self._cleanup:
            fn()
        self._cleanup.clear()
        if self._index is not None and len(self._chain) == 1:  # the opener owns the archive's index
            self._index.close()

    def __enter__(self) -> CheckpointImages:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<CheckpointImages {self._path}>"


def open_images(path: str | os.PathLike[str], config: Config | None = None, *,
                pages_wanted: PagesWanted | None = None, images_only: bool = False) -> CheckpointImages:
    """Open a CRIU image directory, a Podman/CRI-O checkpoint (directory or archive) for reading.

    Use it as a context manager::

        with open_images("checkpoint.tar.zst") as images:
            ...

    Every level of a chain of incremental dumps is opened now (a bad `parent`
    link is a ChainError naming it), and the plugins are handed the config
    (`crit_pageread_configure`) before any reader is made. An uncompressed
    `.tar` is read in place; a compressed archive has its
    images (only) unpacked into a private temporary directory, removed when
    the images are closed, on SIGINT/SIGTERM/SIGHUP, or when the object is
    collected unclosed. Limits on archives come from the `[archive]` table.
    `pages_wanted(pid, mm_image)`, for a caller that reads only some ranges of
    each process (`ps`: argv and environment), lets a compressed archive's pages
    be unpacked sparse (`archive.open_archive`); other reads then fail.
    `images_only`: the caller needs no container file (config.dump,
    rootfs-diff.tar...): a compressed export is read up to the end of
    `checkpoint/` and its chain only.
    """
    from .plugins import configure, manager

    # A directory is no archive: archive.py (and tempfile, threading) are not imported for it.
    if not os.path.isdir(path) and _archive().is_archive(path):
        from .archive import ArchiveLimits, open_archive

        config = config if config is not None else load_config()
        index = open_archive(path, ArchiveLimits.from_table(config.table("archive")), pages_wanted=pages_wanted,
                             page_size=config.page_size, images_only=images_only)
        try:
            member_dir = index.images_dir()
            images = CheckpointImages(path, config, _index=index, _member_dir=member_dir)
            if index.is_file(_join(index.container_root(member_dir), "config.dump")) or member_dir.endswith(
                "checkpoint"
            ):
                images.container_dir = index.container_root(member_dir)
        except BaseException:
            index.close()
            raise
        import weakref  # archives only (start-up)

        weakref.finalize(images, index.close)
    else:
        directory = _paths.text(path)
        if container_layout(directory):
            # An unpacked Podman/CRI-O checkpoint: checkpoint/ beside config.dump and spec.dump.
            images = CheckpointImages(_paths.join(directory, "checkpoint"), config)
            images.container_dir = directory
        else:
            images = CheckpointImages(path, config)
            up = _paths.parent(images._path)
            if _paths.name(images._path) == "checkpoint" and _paths.is_file(_paths.join(up, "config.dump")):
                images.container_dir = up  # DIR/checkpoint of a container layout
    try:
        configure(images.config, check_strategy=False)
    except BaseException:
        images.close()
        raise
    manager().hook.crit_pageread_images_opened(images=images)
    return images


def _pycriu() -> Any:
    """`criu_env.pycriu()` (criu_env and provision are imported only for the protobuf messages: start-up)."""
    from .criu_env import pycriu

    return pycriu()


def _archive() -> Any:
    from . import archive

    return archive


def container_layout(directory: str | os.PathLike[str]) -> bool:
    """True if `directory` is an unpacked container checkpoint: images under checkpoint/, none at the top."""
    top = _paths.text(directory)
    checkpoint = _paths.join(top, "checkpoint")
    return (
        _paths.is_dir(top)
        and not _paths.exists(_paths.join(top, "pstree.img"))
        and not _paths.exists(_paths.join(top, "inventory.img"))
        and any(_paths.is_file(_paths.join(checkpoint, name)) for name in ("pstree.img", "inventory.img"))
    )


def _podman_hint(link: str) -> str:
    """What a dangling `../pre-checkpoint` link is: Podman's `--with-previous` export alone."""
    if link.rstrip("/").rsplit("/", 1)[-1] != "pre-checkpoint":
        return ""
    return (" (a `podman container checkpoint --with-previous` checkpoint: its pre-checkpoint is a separate"
            " export; put pre-checkpoint/ beside checkpoint/)")


def _join(directory: str, name: str) -> str:
    return f"{directory}/{name}" if directory else name
