"""Squash an incremental chain and/or a lazy dump into one self-contained image directory.

Every `PE_PARENT` page is resolved through the chain and every `PE_LAZY`
page without data is fetched through the configured (remote) strategy, so
that `criu restore -D OUT` needs no parent and no page server. Non-memory
images are copied unchanged; each pagemap and its pages file are rewritten
with entries merged where contiguous and `PE_PRESENT` set (the `PE_LAZY`
bit is kept where the source had it, as CRIU 4.1 itself writes
`PE_PRESENT|PE_LAZY` for anonymous pages; a non-lazy restore reads them
like any present page). `parent` is not carried over.

Memory is bounded: present pages move through the reader's `write_to`, so
the strategy carries them (file-to-file in the kernel, `copy_file_range`, for
the local strategies), lazy pages through one 1 MiB buffer. OUT is built
beside its final name and renamed at the end, so it is complete or absent.
"""

from __future__ import annotations

import hashlib
import operator
import os
import re
import shutil
from array import array
from bisect import bisect_left
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from itertools import accumulate, compress
from pathlib import Path
from typing import Any

from ..check import check_checkpoint
from ..config import Config, load_config
from ..errors import ImageError
from ..images import CheckpointImages, open_images
from ..pagemap import LAYOUTS, PE_LAZY, PE_PRESENT, encode_entries, encode_pagemap_parts
from ..plugins import make_strategy
from ..reader import BROKEN, LAZY, PageReader, Segment
from ..strategy import Strategy, Target
from .fileio import atomic_dir, chunks

_PAGEMAP_RE = re.compile(r"^pagemap-(\d+)\.img$")
_SHMEM_RE = re.compile(r"^pagemap-shmem-(\d+)\.img$")
_PAGES_RE = re.compile(r"^pages-(\d+)\.img$")
_LAZY_CHUNK = 1 << 20
#: Bytes of present pages queued before they are handed to the strategy and progress is shown (without a
#: progress callback a target's pages go to the strategy at once: a segment list, not bytes, is queued).
_COPY_BATCH = 64 << 20
#: Segments queued at most before they are handed to the strategy (what is planned at once stays bounded).
_COPY_PIECES = 1 << 14
_VERIFY_CHUNK = 4 << 20

#: progress(what, done_bytes, total_bytes), called after each run is written or verified
Progress = Callable[[str, int, int], None]


@dataclass
class TargetReport:
    """What squash did for one pagemap."""

    target: str
    pagemap: str
    entries_in: int
    entries_out: int
    pages: int
    parent_pages: int
    lazy_pages: int


@dataclass
class SquashReport:
    """The result of `squash()`: per-pagemap counts, files copied, whether OUT was verified."""

    source: str
    output: str
    layout: str
    targets: list[TargetReport] = field(default_factory=list)
    copied: list[str] = field(default_factory=list)
    verified: bool = False

    @property
    def pages(self) -> int:
        return sum(t.pages for t in self.targets)

    @property
    def parent_pages(self) -> int:
        return sum(t.parent_pages for t in self.targets)

    @property
    def lazy_pages(self) -> int:
        return sum(t.lazy_pages for t in self.targets)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(pages=self.pages, parent_pages=self.parent_pages, lazy_pages=self.lazy_pages)
        return out


def memory_targets(path: Path | list[str]) -> list[Target]:
    """The pid and shmem pagemaps of an image directory (or a list of image names), pids first, in id order."""
    pids, shmem = [], []
    for name in os.listdir(path) if isinstance(path, Path) else path:
        if m := _PAGEMAP_RE.match(name):
            pids.append(int(m.group(1)))
        elif m := _SHMEM_RE.match(name):
            shmem.append(int(m.group(1)))
    return [Target("pid", p) for p in sorted(pids)] + [Target("shmem", s) for s in sorted(shmem)]


def pagemap_name(target: Target) -> str:
    return f"pagemap-{target.id}.img" if target.kind == "pid" else f"pagemap-shmem-{target.id}.img"


def _is_memory_image(name: str) -> bool:
    return bool(_PAGEMAP_RE.match(name) or _SHMEM_RE.match(name) or _PAGES_RE.match(name))


def squash(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    config: Config | None = None,
    strategy: str | Strategy | None = None,
    layout: str | None = None,
    verify: bool = False,
    progress: Progress | None = None,
) -> SquashReport:
    """Write OUT, a self-contained copy of the image directory SRC (see the module docstring).

    `strategy` serves lazy pages (default: the config's); `layout` is "4.1" or
    "4.2" (default: each pagemap's own); `verify` re-reads OUT and compares
    every page with the source before OUT gets its final name.
    """
    if layout is not None and layout not in LAYOUTS:
        raise ImageError(out, f"unknown pagemap layout {layout!r} (known: {', '.join(LAYOUTS)})")
    config = config if config is not None else load_config()
    src_path = Path(src)
    out_path = Path(out)
    with open_images(src_path, config) as images:
        images.processes  # noqa: B018 - a missing or garbage pstree is an error before OUT exists
        targets = memory_targets(images.image_names())
        if not targets:
            raise ImageError(src_path, "no pagemap-*.img: not a CRIU dump directory")
        total = sum(images.pagemap_for(t).present_bytes + _non_present_bytes(images, t) for t in targets)
        report = SquashReport(str(src_path), str(out_path), layout or "input")
        with atomic_dir(out_path) as tmp:
            report.copied = _copy_other_images(images, tmp)
            done = [0, total]
            lazy_digests: dict[Target, str] = {}
            used_ids: dict[int, Target] = {}
            # One strategy for every pagemap: a page server (CRIU's lazy dump) may take one client only.
            shared = strategy if isinstance(strategy, Strategy) else make_strategy(strategy or config.strategy, config)
            try:
                for target in targets:
                    pm = images.pagemap_for(target)
                    if pm.pages_id in used_ids:
                        raise ImageError(pm.path, f"pages_id {pm.pages_id} is also used by {used_ids[pm.pages_id]}")
                    used_ids[pm.pages_id] = target
                    rep, digest = _squash_target(images, target, tmp, layout, shared, progress, done)
                    report.targets.append(rep)
                    if digest is not None:
                        lazy_digests[target] = digest
            finally:
                if shared is not strategy:
                    shared.close()
            if verify:
                verify_squash(images, tmp, lazy_digests, progress=progress)
                # And the output's memory as `check` sees it: pagemaps, pages sizes, flags, VMAs, shmem.
                found = check_checkpoint(tmp, notes=False).memory_errors
                if found:
                    raise ImageError(found[0].file.replace(str(tmp), str(out_path)), found[0].message)
                report.verified = True
    return report


def _non_present_bytes(images: CheckpointImages, target: Target) -> int:
    return sum(n for _, sizes, flags, _ in images.pagemap_for(target).chunks()
               for n, f in zip(sizes, flags, strict=True) if f and not f & PE_PRESENT)


def _copy_other_images(images: CheckpointImages, dst: Path) -> list[str]:
    """Copy every regular file but pagemaps, pages files and `parent`, unchanged (archive members too)."""
    copied = []
    for name in images.image_names():
        if name == "parent" or _is_memory_image(name):
            continue
        if images.archive is not None:
            images.image(name).copy_to(dst / name)  # type: ignore[union-attr]
        else:
            src = images.path / name
            if src.is_symlink() or not src.is_file():
                continue
            shutil.copyfile(src, dst / name)
        copied.append(name)
    return copied


class _RunWriter:
    """Appends runs to an output pages file, merging pagemap entries; the bytes move through the reader.

    Present segments queue with their output offsets and go to `reader.write_segments` in batches (the
    strategy joins what is contiguous in a pages file and in the output: one kernel copy per run), of at
    most _COPY_PIECES segments. The merged entries are int64/uint8 columns (17 bytes a run), encoded
    to the output pagemap image (`image`, its head already written) _COPY_PIECES at a time.
    """

    def __init__(self, fd: int, reader: PageReader, batch: int | None = _COPY_BATCH, image: Any = None,
                 pages_id: int = 0, layout: str = "4.1") -> None:
        self.fd = fd
        self.reader = reader
        self.batch = batch  # None: one hand-over per target (the fewest, largest copies)
        self.image = image
        self.pages_id, self.layout = pages_id, layout
        #: Entries encoded to `image` so far.
        self.written = 0
        self.offset = 0
        #: The output's entries: vaddr, nr_pages, flags.
        self.vaddrs = array("q")
        self.counts = array("q")
        self.flags = array("B")
        self._end = -1  # where the last entry ends
        self._pieces: list[tuple[Segment, int]] = []
        self._queued = 0

    def add_run(self, vaddr: int, length: int, flags: int, page_size: int) -> None:
        if self._end == vaddr and self.flags[-1] == flags:
            self.counts[-1] += length // page_size
        else:
            if len(self.vaddrs) > _COPY_PIECES and self.image is not None:
                self.encode()  # the last entry can no longer grow
            self.vaddrs.append(vaddr)
            self.counts.append(length // page_size)
            self.flags.append(flags)
        self._end = vaddr + length

    def encode(self) -> None:
        """Write the entries so far to the output pagemap image (after its head) and drop them."""
        if self.vaddrs:
            self.image.write(encode_entries(self.vaddrs, self.counts, self.flags, self.layout))
            self.written += len(self.vaddrs)
            self.vaddrs, self.counts, self.flags = array("q"), array("q"), array("B")

    def copy(self, seg: Segment) -> None:
        """Queue a planned segment's bytes for the end of the output."""
        self._pieces.append((seg, self.offset + self._queued))
        self._queued += seg.length
        if (self.batch is not None and self._queued >= self.batch) or len(self._pieces) >= _COPY_PIECES:
            self.flush()

    def write(self, data: memoryview) -> None:
        self.flush()
        done = 0
        while done < len(data):
            done += os.pwrite(self.fd, data[done:], self.offset + done)
        self.offset += len(data)

    def flush(self) -> None:
        if self._pieces:
            pieces, self._pieces = self._pieces, []
            self.reader.write_segments(self.fd, pieces)
            self.offset += self._queued
            self._queued = 0


def _squash_target(
    images: CheckpointImages,
    target: Target,
    out_dir: Path,
    layout: str | None,
    strategy: Strategy,
    progress: Progress | None,
    done: list[int],
) -> tuple[TargetReport, str | None]:
    pm = images.pagemap_for(target)
    page_size = pm.page_size
    reader = _reader(images, target, strategy)
    rep = TargetReport(str(target), pm.path.name, len(pm), 0, 0, 0, 0)
    lazy_hash = None
    buf = None
    fd = os.open(out_dir / f"pages-{pm.pages_id}.img", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    image = open(out_dir / pm.path.name, "wb")
    try:
        # The reader is not closed: that would close the strategy, which the caller shares.
        w = _RunWriter(fd, reader, _COPY_BATCH if progress is not None else None, image, pm.pages_id,
                       layout or pm.layout)
        image.write(next(encode_pagemap_parts(pm.pages_id, (), w.layout)))
        if _squash_runs(reader, w, rep, page_size, progress, target, done):
            rep.entries_out = w.written
            return rep, None
        shown = 0
        span = pm.span()
        # One walk over the whole range (holes between entries are skipped): a fragmented dump has tens of
        # thousands of entries, a walk per entry cost more than the copies.
        for seg in reader.segments(span[0], span[1] - span[0]) if span else ():
            if seg.kind == "hole":
                continue
            flags = PE_PRESENT | (seg.flags & PE_LAZY)
            if seg.kind == "present":
                w.copy(seg)
                if seg.depth:
                    rep.parent_pages += seg.length // page_size
            else:  # lazy: fetched through the strategy, in bounded chunks
                if buf is None:
                    buf = bytearray(_LAZY_CHUNK)
                    lazy_hash = hashlib.sha256()
                assert lazy_hash is not None
                for vaddr, length in chunks(seg.vaddr, seg.length, _LAZY_CHUNK):
                    view = memoryview(buf)[:length]
                    reader.readinto(vaddr, view)
                    lazy_hash.update(view)
                    w.write(view)
                rep.lazy_pages += seg.length // page_size
            w.add_run(seg.vaddr, seg.length, flags, page_size)
            rep.pages += seg.length // page_size
            done[0] += seg.length
            if progress is not None and done[0] - shown >= _COPY_BATCH:
                w.flush()
                shown = done[0]
                progress(f"squash {target}", done[0], done[1])
        w.flush()
        if progress is not None:
            progress(f"squash {target}", done[0], done[1])
        w.encode()
    finally:
        os.close(fd)
        image.close()
    rep.entries_out = w.written
    return rep, (lazy_hash.hexdigest() if lazy_hash is not None else None)


def _squash_runs(reader: PageReader, w: _RunWriter, rep: TargetReport, page_size: int, progress: Progress | None,
                 target: Target, done: list[int]) -> bool:
    """Squash a target with no lazy or broken pages from its memory map's columns, no object per run, in
    batches of _COPY_PIECES runs (with progress, of about _COPY_BATCH bytes): the runs back to back with the
    same flags are one entry each, and the pages go to the output with `write_to` (with the native helper
    one plan and one `write_plan` a batch). False (nothing done) for a windowed map or one with lazy or
    broken runs: the caller walks its segments."""
    if reader.windowed:
        return False
    flat = reader.memory_map()
    kinds = flat.kinds
    if not kinds or LAZY in kinds or BROKEN in kinds:
        return False
    starts, sizes = flat.starts, flat.sizes
    count = len(starts)
    flags = flat.flags.tobytes().translate(_OUT_FLAGS)
    rep.pages = sum(sizes) // page_size
    rep.parent_pages = sum(compress(sizes, flat.depths)) // page_size
    at = i = 0
    end = -1  # where the last entry ends
    while i < count:
        j = min(count, i + _COPY_PIECES)
        if progress is not None:  # about _COPY_BATCH bytes a batch, progress after each
            j = i + min(j - i, bisect_left(list(accumulate(sizes[i:j])), _COPY_BATCH) + 1)
        ss, zz, ff = starts[i:j], sizes[i:j], flags[i:j]
        ee = list(map(operator.add, ss, zz))
        # An entry starts where a run does not go on from the one before with the same flags.
        new = [ss[0] != end or ff[0] != (flags[i - 1] if i else -1),
               *map(operator.or_, map(operator.ne, ee[:-1], ss[1:]), map(operator.ne, ff[:-1], ff[1:]))]
        stop = new.index(True) if True in new else len(new)  # the first run that starts an entry
        if stop:  # the runs before it go on from the last entry
            w.counts[-1] += (ee[stop - 1] - ss[0]) // page_size
        if stop < len(new):
            if len(w.vaddrs) > _COPY_PIECES:
                w.encode()  # those entries can no longer grow
            firsts = array("q", compress(ss, new))
            lasts = compress(ee, [*new[1:], True])  # where each entry ends (the first: the one going on)
            if stop:
                next(lasts)
            w.counts.extend(map(page_size.__rfloordiv__, map(operator.sub, lasts, firsts)))
            w.vaddrs.extend(firsts)
            w.flags.extend(compress(ff, new))
        end = ee[-1]
        reader.write_to(w.fd, zip(ss, zz, accumulate(zz[:-1], initial=at), strict=True), holes="skip")
        n = sum(zz)
        at += n
        done[0] += n
        if progress is not None:
            progress(f"squash {target}", done[0], done[1])
        i = j
    w.encode()
    return True


#: A run's PE_* flags to its squashed entry's: present, the lazy bit kept (as `_squash_target`'s walk does).
_OUT_FLAGS = bytes(PE_PRESENT | (b & PE_LAZY) for b in range(256))


def _reader(images: CheckpointImages, target: Target, strategy: str | Strategy | None) -> PageReader:
    return images.reader_for(target, strategy, zero_fill=False, auto_dedup=False)  # one pagemap, rewritten


def verify_squash(
    source: CheckpointImages,
    out_dir: str | os.PathLike[str],
    lazy_digests: dict[Target, str] | None = None,
    *,
    progress: Progress | None = None,
) -> None:
    """Compare every page of `out_dir` with `source`; raise ImageError at the first difference.

    Present and parent pages are re-read from the source chain. Lazy pages
    cannot be fetched twice from a page server, so they are compared with the
    sha256 recorded while squashing (`lazy_digests`, per target).
    """
    out_dir = Path(out_dir)
    config = source.config.replace(strategy="preadv")
    lazy_digests = lazy_digests or {}
    targets = memory_targets(source.image_names())
    out_targets = memory_targets(out_dir)
    if out_targets != targets:
        raise ImageError(out_dir, f"pagemaps differ from the source: {out_targets} vs {targets}")
    a = bytearray(_VERIFY_CHUNK)
    b = bytearray(_VERIFY_CHUNK)
    with open_images(out_dir, config) as out:
        total = sum(out.pagemap_for(t).present_bytes for t in targets)
        done = 0
        for target in targets:
            src_pm = source.pagemap_for(target)
            out_pm = out.pagemap_for(target)
            if any(not e.present for e in out_pm.entries):
                raise ImageError(out_pm.path, "has entries without PE_PRESENT after squash")
            lazy_hash = hashlib.sha256()
            lazy_seen = False
            with _reader(source, target, "preadv") as src_reader, _reader(out, target, "preadv") as out_reader:
                covered = 0
                for entry in src_pm.entries:
                    for seg in src_reader.segments(entry.vaddr, entry.size):
                        if seg.kind == "hole":
                            continue
                        covered += seg.length
                        for vaddr, length in chunks(seg.vaddr, seg.length, _VERIFY_CHUNK):
                            ob = memoryview(b)[:length]
                            out_reader.readinto(vaddr, ob)
                            if seg.kind == "lazy":
                                lazy_hash.update(ob)
                                lazy_seen = True
                                continue
                            sb = memoryview(a)[:length]
                            src_reader.readinto(vaddr, sb)
                            if sb != ob:
                                page = _first_difference(sb, ob, src_pm.page_size)
                                raise ImageError(
                                    out_pm.path, f"{target}: page at {vaddr + page:#x} differs from {src_pm.path}"
                                )
                        done += seg.length
                    if progress is not None:
                        progress(f"verify {target}", done, total)
                if covered != out_pm.present_bytes:
                    raise ImageError(out_pm.path, f"{target}: holds {out_pm.present_bytes} bytes, source {covered}")
            if lazy_seen and lazy_hash.hexdigest() != lazy_digests.get(target):
                raise ImageError(out_pm.path, f"{target}: lazy pages differ from the pages fetched while squashing")


def _first_difference(a: memoryview, b: memoryview, page_size: int) -> int:
    for off in range(0, len(a), page_size):
        if a[off : off + page_size] != b[off : off + page_size]:
            return off
    return 0
