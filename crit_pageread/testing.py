"""A test double for crit-pageread: synthetic CRIU image directories and a recording strategy.

    from crit_pageread.testing import LAZY, ImageBuilder, MockStrategy, VmaSpec
    b = ImageBuilder(tmp_path / "d")
    b.process(10, vmas=[VmaSpec(0x10000, 0x14000)])
    b.pagemap(10, [(0x10000, b"A" * 4096), (0x12000, 1, LAZY)])  # a present page, a lazy one
    b.write()

`ImageBuilder` writes what the page-reading path reads, in CRIU's formats:
pstree.img, mm-<pid>.img (VMAs), core-<pid>.img (zombies), pagemap-<pid>.img
and pagemap-shmem-<id>.img in either layout (4.1 or 4.2) with their
pages-<n>.img, files.img/memfd.img for memfd mappings, and a `parent` link.
`MockStrategy` is a strategy like an httpx mock transport: it records every
request and fills it from the pages file, or for lazy ranges from a dict.
No CRIU is needed, so planning, holes, readv, scatter, dedup and the process
view get fast tests.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .imagefile import encode_varint, frame
from .images import MAP_SHARED, PROT_READ, PROT_WRITE, VMA_ANON_PRIVATE, VMA_AREA_REGULAR
from .pagemap import PE_LAZY, PE_PARENT, PE_PRESENT, encode_pagemap
from .strategy import AnyRequest, ReadRequest, ScatterRequest, Strategy, read_fully

__all__ = ["LAZY", "PARENT", "ImageBuilder", "MockStrategy", "Recorded", "VmaSpec"]

#: Flags of runs without data, so tests need one import.
PARENT, LAZY = PE_PARENT, PE_LAZY

#: CRIU's task states (core_entry.tc.task_state).
TASK_ALIVE, TASK_DEAD = 1, 2

#: A pagemap run: (vaddr, data) is present data (a multiple of the page size); (vaddr, nr_pages) or
#: (vaddr, nr_pages, flags) is a run without data here (PE_PARENT by default, or PE_LAZY).
Run = tuple[int, bytes] | tuple[int, int] | tuple[int, int, int]


@dataclass
class VmaSpec:
    """A VMA for mm-<pid>.img. Defaults: private anonymous, rw."""

    start: int
    end: int
    status: int = VMA_AREA_REGULAR | VMA_ANON_PRIVATE
    shmid: int = 0
    pgoff: int = 0
    prot: int = PROT_READ | PROT_WRITE
    flags: int = 0x22  # MAP_PRIVATE | MAP_ANONYMOUS

    @property
    def shared(self) -> bool:
        return bool(self.flags & MAP_SHARED)


def _field(number: int, value: int | bytes | str | list[Any]) -> bytes:
    """One protobuf field: an int as a varint, bytes/str as a length-delimited blob, a list as a nested message."""
    if isinstance(value, int):
        return encode_varint(number << 3) + encode_varint(value)
    if isinstance(value, str):
        value = value.encode()
    elif isinstance(value, list):
        value = _message(value)
    return encode_varint(number << 3 | 2) + encode_varint(len(value)) + value


def _message(fields: Sequence[tuple[int, Any]]) -> bytes:
    return b"".join(_field(n, v) for n, v in fields)


def _zigzag(value: int) -> int:
    return (value << 1) ^ (value >> 63) if value < 0 else value << 1


@dataclass
class _Process:
    pid: int
    ppid: int
    threads: tuple[int, ...]
    vmas: list[VmaSpec] | None
    state: int


@dataclass
class ImageBuilder:
    """Builds one image directory; call the methods, then `write()`."""

    path: Path
    page_size: int = 4096
    layout: str = "4.1"
    _procs: list[_Process] = field(default_factory=list)
    _pagemaps: dict[str, list[Run]] = field(default_factory=dict)
    _memfds: list[tuple[int, str, int]] = field(default_factory=list)
    _parent: str | None = None

    def process(self, pid: int, ppid: int = 0, *, vmas: Sequence[VmaSpec] = (), threads: Sequence[int] = (),
                zombie: bool = False) -> ImageBuilder:
        """A pstree task with its VMAs; a zombie has a core image and no memory images."""
        self._procs.append(_Process(pid, ppid, tuple(threads) or (pid,), None if zombie else list(vmas),
                                    TASK_DEAD if zombie else TASK_ALIVE))
        return self

    def pagemap(self, pid: int, runs: Sequence[Run]) -> ImageBuilder:
        """pagemap-<pid>.img (and its pages file) from runs in address order."""
        self._pagemaps[f"pagemap-{pid}.img"] = list(runs)
        return self

    def shmem_pagemap(self, shmid: int, runs: Sequence[Run]) -> ImageBuilder:
        """pagemap-shmem-<shmid>.img: a shared segment's pages at offsets in it."""
        self._pagemaps[f"pagemap-shmem-{shmid}.img"] = list(runs)
        return self

    def memfd(self, file_id: int, name: str, shmid: int) -> ImageBuilder:
        """A memfd (files.img id `file_id`, a VMA's shmid) whose pages are in pagemap-shmem-<shmid>.img."""
        self._memfds.append((file_id, name, shmid))
        return self

    def parent(self, target: str) -> ImageBuilder:
        """A `parent` symlink to `target` (relative to the directory, as CRIU writes it)."""
        self._parent = target
        return self

    def write(self) -> Path:
        """Write every image; returns the directory."""
        ps = self.page_size
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / "inventory.img").write_bytes(frame("INVENTORY", [_message([(1, 2)])]))
        if self._procs:
            tasks = [_message([(1, p.pid), (2, p.ppid), (3, p.pid), (4, p.pid), *((5, t) for t in p.threads)])
                     for p in self._procs]
            (self.path / "pstree.img").write_bytes(frame("PSTREE", tasks))
        for p in self._procs:
            if p.vmas is None:
                tc = [(1, p.state), (2, 0), (3, 0), (4, 0), (5, 0), (6, "zombie")]
                (self.path / f"core-{p.pid}.img").write_bytes(frame("CORE", [_message([(1, 1), (3, tc)])]))
                continue
            vmas = [(14, [(1, v.start), (2, v.end), (3, v.pgoff), (4, v.shmid), (5, v.prot), (6, v.flags),
                          (7, v.status), (8, _zigzag(-1))]) for v in p.vmas]
            mm = [*((n, 0) for n in range(1, 12)), (12, 0), *vmas]
            (self.path / f"mm-{p.pid}.img").write_bytes(frame("MM", [_message(mm)]))
        if self._memfds:
            files = [_message([(1, 0), (2, fid), (20, [(1, fid), (2, 2), (3, 0), (4, 0), (5, fid)])])
                     for fid, _, _ in self._memfds]
            inodes = [_message([(1, name), (2, 0), (3, 0), (4, 0), (5, shmid), (6, 0), (7, fid)])
                      for fid, name, shmid in self._memfds]
            (self.path / "files.img").write_bytes(frame("FILES", files))
            (self.path / "memfd.img").write_bytes(frame("MEMFD_INODE", inodes))
        for pages_id, (name, runs) in enumerate(sorted(self._pagemaps.items()), 1):
            entries: list[tuple[int, int, int]] = []
            with open(self.path / f"pages-{pages_id}.img", "wb") as pages:
                for run in runs:
                    vaddr, what = run[0], run[1]
                    if isinstance(what, bytes):
                        if not what or len(what) % ps:
                            raise ValueError(f"{name}: data at {vaddr:#x} is not whole pages")
                        pages.write(what)
                        entries.append((vaddr, len(what) // ps, PE_PRESENT))
                    else:
                        flags = run[2] if len(run) > 2 else PE_PARENT
                        if flags & PE_PRESENT:
                            raise ValueError(f"{name}: a present run at {vaddr:#x} needs its data")
                        entries.append((vaddr, what, flags))
            (self.path / name).write_bytes(encode_pagemap(pages_id, entries, self.layout))
        if self._parent is not None:
            link = self.path / "parent"
            if link.is_symlink() or link.exists():
                link.unlink()
            os.symlink(self._parent, link)
        return self.path


@dataclass
class Recorded:
    """A request as `MockStrategy` saw it: how it came (read, submit...), for whom, where from."""

    how: str
    target: str
    vaddr: int
    length: int
    pages: str | None
    offset: int
    #: pieces of memory the request fills: 1, or a ScatterRequest's count
    pieces: int = 1


class MockStrategy(Strategy):
    """Records every request; fills present ranges from the pages file and lazy ones from `lazy`.

    `lazy` maps a page-aligned vaddr to the bytes of the pages from there
    (any length); `serves_lazy` is True when it is given. Submitted requests
    are completed at `sync()`, like a queueing strategy.
    """

    name = "mock"

    def __init__(self, lazy: dict[int, bytes] | None = None) -> None:
        self.lazy = dict(lazy or {})
        self.serves_lazy = lazy is not None  # type: ignore[misc]
        self.log: list[Recorded] = []
        #: one (method, number of requests) per call the reader made
        self.calls: list[tuple[str, int]] = []
        self.queue: list[ReadRequest] = []
        self.closed = 0

    def _record(self, how: str, request: AnyRequest) -> None:
        pages = str(request.pages.path) if request.pages is not None else None
        if isinstance(request, ScatterRequest):
            length, pieces = request.length, len(request.lengths)
        else:
            length, pieces = len(request.dest), 1
        self.log.append(Recorded(how, str(request.target), request.vaddr, length, pages, request.offset, pieces))

    def _fill(self, request: ReadRequest) -> None:
        if request.pages is not None:
            read_fully(request.pages.fd, request.dest, request.offset, request.pages.location)
            return
        for base, data in self.lazy.items():
            if base <= request.vaddr and request.vaddr + len(request.dest) <= base + len(data):
                start = request.vaddr - base
                request.dest[:] = data[start : start + len(request.dest)]
                return
        raise AssertionError(f"MockStrategy: no lazy data for {request.vaddr:#x}+{len(request.dest)}")

    def read(self, request: ReadRequest) -> None:
        self.calls.append(("read", 1))
        self._record("read", request)
        self._fill(request)

    def submit(self, request: ReadRequest) -> None:
        self.calls.append(("submit", 1))
        self._record("submit", request)
        self.queue.append(request)

    def read_many(self, requests: list[AnyRequest]) -> None:
        self.calls.append(("read_many", len(requests)))
        for request in requests:
            self._record("read_many", request)
            for piece in request.requests() if isinstance(request, ScatterRequest) else [request]:
                self._fill(piece)

    def submit_many(self, requests: list[AnyRequest]) -> None:
        self.calls.append(("submit_many", len(requests)))
        for request in requests:
            self._record("submit_many", request)
            self.queue.extend(request.requests() if isinstance(request, ScatterRequest) else [request])

    def sync(self) -> None:
        queue, self.queue = self.queue, []
        for request in queue:
            self._fill(request)

    @property
    def pending(self) -> int:
        return len(self.queue)

    def close(self) -> None:
        self.closed += 1
        self.queue = []


