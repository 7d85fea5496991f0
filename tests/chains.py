"""Build N-level incremental chains by rewriting a real CRIU dump (for tests, benchmarks, squash).

The kernel here has no soft-dirty tracking, so stock CRIU cannot write
incremental dumps. `make_chain` turns one real dump into `levels` image
directories `d1` (oldest) .. `dN` (newest) that CRIU restores to the same
memory: every page of a process pagemap gets a "home" level that holds its
true bytes; newer levels mark it `PE_PARENT`, older levels hold *stale*,
different bytes (or nothing) so a reader that prefers a parent is caught.
Home levels change in runs of a few pages, so entries are split in their
middle. The newest directory keeps every non-memory image; each other
directory holds only its pagemaps, pages files and a copy of inventory.img;
each directory but the oldest has a `parent` symlink `../d<k-1>`.

Shared-memory pagemaps (`pagemap-shmem-*.img`) are copied unchanged into the
newest directory.
"""

from __future__ import annotations

import itertools
import os
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from crit_pageread.imagefile import check_magic, decode_varint_fields, iter_entries, read_image
from crit_pageread.pagemap import PE_PARENT, PE_PRESENT, encode_pagemap

_PAGEMAP = re.compile(r"^pagemap-(\d+)\.img$")
STALE_XOR = 0xA5


@dataclass
class ChainInfo:
    """What `make_chain` built: the directories (oldest first) and per-level page counts."""

    dirs: list[Path]
    #: level index (0 = oldest) -> pages whose true bytes it holds
    true_pages: dict[int, int] = field(default_factory=dict)
    #: level index -> pages it holds with stale bytes
    stale_pages: dict[int, int] = field(default_factory=dict)
    #: level index -> pages it marks PE_PARENT
    parent_pages: dict[int, int] = field(default_factory=dict)
    #: number of source pagemap entries whose pages ended up in more than one level
    split_entries: int = 0

    @property
    def newest(self) -> Path:
        return self.dirs[-1]


def _read_pagemap(path: Path, page_size: int) -> tuple[int, list[tuple[int, int, int, int]]]:
    """(pages_id, [(vaddr, nr_pages, flags, offset or -1)]) of a pagemap, either layout."""
    data = read_image(path, "PAGEMAP")
    payloads = iter_entries(path, data, check_magic(path, data, "PAGEMAP"))
    head = decode_varint_fields(path, next(payloads))
    out = []
    offset = 0
    for payload in payloads:
        f = decode_varint_fields(path, payload)
        nr = f[5] if 5 in f else f.get(2, 0)
        flags = f.get(4, PE_PRESENT)
        if flags & PE_PRESENT:
            out.append((f[1], nr, flags, offset))
            offset += nr * page_size
        else:
            out.append((f[1], nr, flags, -1))
    return head[1], out


def _stale(data: bytes) -> bytes:
    """The same number of bytes, every one different from `data`'s."""
    return bytes(b ^ STALE_XOR for b in data)


def _homes(npages: int, levels: int, rng: random.Random, run_pages: tuple[int, int] = (1, 5),
           weights: tuple[float, ...] | None = None) -> list[int]:
    """A home depth (0 = newest) per page, changing in runs of 1-5 pages."""
    homes: list[int] = []
    while len(homes) < npages:
        run = rng.randint(*run_pages)
        home = rng.choices(range(levels), weights)[0] if weights else rng.randrange(levels)
        homes.extend([home] * run)
    return homes[:npages]


class _Writer:
    """Accumulates one level's pagemap runs and pages-file bytes for one pagemap.

    Runs never join across a source entry boundary (CRIU's entries end at VMA
    boundaries; we keep that).
    """

    def __init__(self) -> None:
        self.runs: list[list[int]] = []  # [vaddr, nr, flags]
        self.data: list[bytes] = []

    def add(self, vaddr: int, flags: int, page_size: int, data: bytes | None, first: bool) -> None:
        last = self.runs[-1] if self.runs else None
        if not first and last is not None and last[2] == flags and last[0] + last[1] * page_size == vaddr:
            last[1] += 1
        else:
            self.runs.append([vaddr, 1, flags])
        if data is not None:
            self.data.append(data)


def make_chain(
    src_dir: str | os.PathLike[str],
    out_root: str | os.PathLike[str],
    levels: int = 2,
    *,
    seed: int = 1,
    layout: str = "4.1",
    stale_gap_every: int = 7,
    page_size: int = 4096,
) -> Path:
    """Rewrite the dump in `src_dir` into a chain `out_root/d1 .. d<levels>`; return the newest dir."""
    return build_chain(src_dir, out_root, levels, seed=seed, layout=layout,
                       stale_gap_every=stale_gap_every, page_size=page_size).newest


def build_chain(
    src_dir: str | os.PathLike[str],
    out_root: str | os.PathLike[str],
    levels: int = 2,
    *,
    seed: int = 1,
    layout: str = "4.1",
    stale_gap_every: int = 7,
    page_size: int = 4096,
    run_pages: tuple[int, int] = (1, 5),
    weights: tuple[float, ...] | None = None,
) -> ChainInfo:
    """`make_chain` with the details: directories and per-level page counts.

    A page whose home is at depth h is present (true bytes) in level depth h,
    `PE_PARENT` in the newer levels, and present with stale bytes in the
    older ones, except that every `stale_gap_every`-th such page is left out
    of the older level entirely (a parent need not cover what its child has).
    Homes change every `run_pages` pages (a random count in that range), each
    a depth drawn with `weights` (newest first; uniform by default).
    """
    if levels < 2:
        raise ValueError("a chain has at least 2 levels")
    src = Path(src_dir)
    root = Path(out_root)
    dirs = [root / f"d{i + 1}" for i in range(levels)]  # oldest first
    for d in dirs:
        d.mkdir(parents=True, exist_ok=False)
    info = ChainInfo(dirs, {i: 0 for i in range(levels)}, {i: 0 for i in range(levels)},
                     {i: 0 for i in range(levels)})
    rng = random.Random(seed)
    rewritten: set[str] = set()
    for name in sorted(os.listdir(src)):
        if not _PAGEMAP.match(name):
            continue
        pages_id, entries = _read_pagemap(src / name, page_size)
        pages_name = f"pages-{pages_id}.img"
        rewritten.update({name, pages_name})
        npages = sum(nr for _, nr, flags, _ in entries if flags & PE_PRESENT)
        homes = _homes(npages, levels, rng, run_pages, weights)
        # writers[depth], depth 0 = newest
        writers = [_Writer() for _ in range(levels)]
        index = 0
        with open(src / pages_name, "rb") as pages:
            for vaddr, nr, flags, offset in entries:
                if not flags & PE_PRESENT:
                    raise ValueError(f"{src / name}: entry at {vaddr:#x} has flags {flags}; need a plain dump")
                pages.seek(offset)
                used_depths = set()
                for p in range(nr):
                    data = pages.read(page_size)
                    if len(data) != page_size:
                        raise ValueError(f"{src / pages_name}: short pages file")
                    page_vaddr = vaddr + p * page_size
                    home = homes[index]
                    used_depths.add(home)
                    for depth, writer in enumerate(writers):
                        level = levels - 1 - depth
                        if depth < home:
                            writer.add(page_vaddr, PE_PARENT, page_size, None, p == 0)
                            info.parent_pages[level] += 1
                        elif depth == home:
                            writer.add(page_vaddr, flags, page_size, data, p == 0)
                            info.true_pages[level] += 1
                        elif (index + depth) % stale_gap_every:
                            writer.add(page_vaddr, flags, page_size, _stale(data), p == 0)
                            info.stale_pages[level] += 1
                    index += 1
                if len(used_depths) > 1:
                    info.split_entries += 1
        for depth, writer in enumerate(writers):
            level_dir = dirs[levels - 1 - depth]
            runs = [(v, n, f) for v, n, f in writer.runs]
            (level_dir / name).write_bytes(encode_pagemap(pages_id, runs, layout=layout))
            with open(level_dir / pages_name, "wb") as out:
                for chunk in writer.data:
                    out.write(chunk)
    newest = dirs[-1]
    for name in sorted(os.listdir(src)):
        if name in rewritten or name in ("parent", "restore.pid") or name.endswith(".log"):
            continue
        path = src / name
        if path.is_file():
            shutil.copy2(path, newest / name)
    for d in dirs[:-1]:
        shutil.copy2(src / "inventory.img", d / "inventory.img")
    for older, newer in itertools.pairwise(dirs):
        os.symlink(f"../{older.name}", newer / "parent")
    return info
