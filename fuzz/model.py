"""An independent statement of CRIU's page rules: which pages exist and where their bytes are.

Written from CRIU's own sources (criu/pagemap.c `init_compat_pagemap_entry`,
`read_pagemap_page`, `seek_pagemap`; images/pagemap.proto), with its own
decoder: nothing here imports crit_pageread's reader, pagemap or image code, so
a mistake there is not repeated here.

- An image is `u32 magic(s)`, then `u32 size` + payload entries; the first
  pagemap entry is `pagemap_head { pages_id = 1 }`, each next one a
  `pagemap_entry { vaddr = 1; compat_nr_pages = 2 (uint32); in_parent = 3;
  flags = 4 (uint32); nr_pages = 5 (uint64) }`.
- nr_pages = field 5 if present, else field 2. flags = field 4 if present;
  else PE_PARENT if in_parent, else PE_PRESENT.
- An entry's pages have data in pages-<pages_id>.img iff PE_PRESENT; the
  offset is the sum of the sizes of the earlier PE_PRESENT entries. PE_PARENT
  (without PE_PRESENT) pages are the same addresses of the `parent` directory's
  pagemap, recursively. PE_LAZY alone: no data in the images.

What CRIU writes (and so what a consistent checkpoint is): flags only
PE_PARENT 1 | PE_LAZY 2 | PE_PRESENT 4, not 0, never present and parent at once; uint32 fields that fit 32
bits; nr_pages > 0; page-aligned vaddr; entries sorted and not overlapping,
below 2^57; a pages file exactly as long as its present entries; a parent
chain (no cycle, < 64 levels) that holds every PE_PARENT page. Anything else is
`Inconsistent`: a reader must refuse it, never return bytes for it.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

PAGE = 4096
PE_PARENT, PE_LAZY, PE_PRESENT = 1, 2, 4
KNOWN = PE_PARENT | PE_LAZY | PE_PRESENT
LIMIT = 1 << 57
MAX_DEPTH = 64
MAGIC_COMMON = 0x54564319
MAGIC_PAGEMAP = 0x56084025


class Inconsistent(Exception):
    """The checkpoint is not one CRIU writes: no read of it has defined bytes."""


@dataclass(frozen=True)
class Page:
    """Where one page's bytes are: `kind` "data" (with `data`), "lazy" or "hole"."""

    kind: str
    data: bytes = b""


def _u32(data: bytes, pos: int) -> int:
    return int.from_bytes(data[pos : pos + 4], "little")


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    out = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise Inconsistent("bad varint")
        b = buf[pos]
        pos += 1
        out |= (b & 0x7F) << shift
        if b < 0x80:
            return out, pos
        shift += 7


def _fields(payload: bytes) -> dict[int, int]:
    """Varint fields of a message (others skipped); the last value of a field wins, as in protobuf."""
    out: dict[int, int] = {}
    pos = 0
    while pos < len(payload):
        key, pos = _varint(payload, pos)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise Inconsistent("field 0")
        if wire == 0:
            out[number], pos = _varint(payload, pos)
        elif wire == 2:
            n, pos = _varint(payload, pos)
            pos += n
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        else:
            raise Inconsistent(f"wire type {wire}")
        if pos > len(payload):
            raise Inconsistent("field past the entry")
    return out


def _regular_bytes(path: Path) -> bytes:
    try:
        st = os.stat(path)
    except OSError as exc:
        raise Inconsistent(f"{path.name}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise Inconsistent(f"{path.name}: not a regular file")
    if st.st_size > 512 << 20:
        raise Inconsistent(f"{path.name}: too large")
    return path.read_bytes()


def pagemap_entries(path: Path) -> tuple[int, list[tuple[int, int, int]]]:
    """(pages_id, [(vaddr, nr_pages, flags)]) of a pagemap image, or Inconsistent."""
    data = _regular_bytes(path)
    if len(data) < 8 or _u32(data, 0) != MAGIC_COMMON or _u32(data, 4) != MAGIC_PAGEMAP:
        raise Inconsistent("pagemap magic")
    pos = 8
    payloads = []
    while pos < len(data):
        if pos + 4 > len(data):
            raise Inconsistent("stray bytes")
        size = _u32(data, pos)
        pos += 4
        if pos + size > len(data):
            raise Inconsistent("entry past the end")
        payloads.append(data[pos : pos + size])
        pos += size
    if not payloads:
        raise Inconsistent("no pagemap_head")
    head = _fields(payloads[0])
    if 1 not in head:
        raise Inconsistent("no pages_id")
    entries = []
    prev_end = 0
    for payload in payloads[1:]:
        f = _fields(payload)
        if 1 not in f:
            raise Inconsistent("no vaddr")
        vaddr = f[1]
        for uint32 in (2, 4):
            if f.get(uint32, 0) > 0xFFFFFFFF:
                raise Inconsistent("uint32 field wider than 32 bits")
        nr = f[5] if 5 in f else f.get(2, 0)
        # init_compat_pagemap_entry: in_parent ORs PE_PARENT in; no flags field means PE_PRESENT.
        flags = (f[4] | (PE_PARENT if f.get(3) else 0)) if 4 in f else (PE_PARENT if f.get(3) else PE_PRESENT)
        if not flags or flags & ~KNOWN or flags & (PE_PRESENT | PE_PARENT) == PE_PRESENT | PE_PARENT:
            raise Inconsistent(f"flags {flags:#x}")
        if nr <= 0 or vaddr % PAGE or vaddr < prev_end or vaddr + nr * PAGE > LIMIT:
            raise Inconsistent("entry range")
        entries.append((vaddr, nr, flags))
        prev_end = vaddr + nr * PAGE
    return head[1], entries


class Memory:
    """One target's pages through the chain: `page(vaddr)` says where a page's bytes are."""

    def __init__(self, directory: Path, name: str, depth: int = 0, seen: tuple[str, ...] = ()) -> None:
        real = os.path.realpath(directory)
        if real in seen or depth >= MAX_DEPTH:
            raise Inconsistent("parent chain cycle or too deep")
        self.directory = directory
        self.pages_id, self.entries = pagemap_entries(directory / name)
        present = sum(nr * PAGE for _, nr, fl in self.entries if fl & PE_PRESENT)
        pages = directory / f"pages-{self.pages_id}.img"
        if present or os.path.lexists(pages):
            self.pages_data = _regular_bytes(pages)
            if len(self.pages_data) != present:
                raise Inconsistent(f"pages file {len(self.pages_data)} bytes, pagemap accounts for {present}")
        else:
            self.pages_data = b""
        self.offsets = []
        off = 0
        for _, nr, fl in self.entries:
            self.offsets.append(off if fl & PE_PRESENT else -1)
            if fl & PE_PRESENT:
                off += nr * PAGE
        self.parent: Memory | None = None
        if any(fl & PE_PARENT and not fl & PE_PRESENT for _, _, fl in self.entries):
            link = directory / "parent"
            if not os.path.lexists(link):
                raise Inconsistent("PE_PARENT without a parent")
            if os.path.islink(link):
                target = directory / os.readlink(link)
            else:  # crit-pageread's documented extension: a small regular file holding the link's target
                raw = _regular_bytes(link)[:4096].decode(errors="surrogateescape").strip()
                if not raw:
                    raise Inconsistent("empty parent file")
                target = directory / raw
            if not target.is_dir():
                raise Inconsistent("dangling parent")
            self.parent = Memory(target, name, depth + 1, (*seen, real))

    def page(self, vaddr: int) -> Page:
        lo, hi = 0, len(self.entries)
        while lo < hi:
            mid = (lo + hi) // 2
            if self.entries[mid][0] <= vaddr:
                lo = mid + 1
            else:
                hi = mid
        i = lo - 1
        if i < 0:
            return Page("hole")
        start, nr, flags = self.entries[i]
        if vaddr >= start + nr * PAGE:
            return Page("hole")
        if flags & PE_PRESENT:
            off = self.offsets[i] + (vaddr - start)
            return Page("data", self.pages_data[off : off + PAGE])
        if flags & PE_PARENT:
            assert self.parent is not None
            got = self.parent.page(vaddr)
            if got.kind == "hole":
                raise Inconsistent(f"parent lacks page {vaddr:#x}")
            return got
        return Page("lazy")

    def all_pages(self) -> dict[int, Page]:
        """Every page any entry of this level names, resolved (raises Inconsistent on a broken chain)."""
        out = {}
        for vaddr, nr, _ in self.entries:
            for k in range(nr):
                out[vaddr + k * PAGE] = self.page(vaddr + k * PAGE)
        return out
