"""Broken images: a typed error with a one-line message naming the file; no hang; bounded memory.

Each case copies a shared fixture to a temporary directory and corrupts the
copy (the fixtures are never written). Reading the whole checkpoint must
raise ImageError (ChainError for parent links) within a few seconds, with
Python allocations well below the sizes the corrupt image claims. The command
line (`python -m crit_pageread read ...`) must print one line and exit non-zero.
"""

from __future__ import annotations

import os
import shutil
import signal
import struct
import subprocess
import sys
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from corpus import Corpus

from crit_pageread import ChainError, ImageError, open_images
from crit_pageread.imagefile import IMG_COMMON, MAGIC
from crit_pageread.pagemap import PE_PARENT, PE_PRESENT, encode_pagemap, load_pagemap

PAGE = 4096
TIME_LIMIT = 10  # seconds: far above a correct answer (milliseconds), far below a hang
MEMORY_LIMIT = 64 << 20  # bytes of Python allocations while failing


@contextmanager
def time_limit(seconds: int) -> Iterator[None]:
    def alarm(signum: int, frame: object) -> None:
        raise TimeoutError(f"no answer within {seconds} s")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def read_everything(path: Path, vmas: bool = True) -> None:
    """Open the images and read every page of every pid (what a broken image must stop)."""
    with open_images(path) as images:
        for pid in images.pids:
            if vmas:
                images.vmas(pid)
            with images.reader(pid) as reader:
                for entry in reader.pagemap.entries:
                    reader.read(entry.vaddr, entry.size)


# --- building the broken copies --------------------------------------------------------------------


def copy_case(fixtures: Path, case: str, dest: Path) -> Path:
    shutil.copytree(fixtures / "cases" / case, dest, symlinks=True)
    for root, dirs, files in os.walk(dest):
        for name in dirs + files:
            os.chmod(os.path.join(root, name), 0o755 if name in dirs else 0o644)
    os.chmod(dest, 0o755)
    return dest


def pagemap_of(d: Path) -> Path:
    (path,) = d.glob("pagemap-[0-9]*.img")
    return path


def rewrite(d: Path, change: Callable[[list[tuple[int, int, int]]], list[tuple[int, int, int]]],
            pages_id: int | None = None) -> Path:
    """Re-encode the pagemap with its runs changed (and optionally another pages id)."""
    path = pagemap_of(d)
    pm = load_pagemap(path, PAGE)
    runs = change([(e.vaddr, e.nr_pages, e.flags) for e in pm.entries])
    path.write_bytes(encode_pagemap(pm.pages_id if pages_id is None else pages_id, runs))
    if pages_id is None:
        # Keep the pages file as long as the new runs account for (a longer one is refused by itself).
        pages = d / f"pages-{pm.pages_id}.img"
        needed = sum(n * PAGE for _, n, f in runs if f & PE_PRESENT)
        if needed < os.stat(pages).st_size:
            os.truncate(pages, needed)
    return path


def bad_magic(d: Path) -> Path:
    path = pagemap_of(d)
    data = bytearray(path.read_bytes())
    data[4:8] = struct.pack("=I", MAGIC["CORE"])
    path.write_bytes(bytes(data))
    return path


def truncated_pagemap(d: Path) -> Path:
    path = pagemap_of(d)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 3])
    return path


def empty_pagemap(d: Path) -> Path:
    path = pagemap_of(d)
    path.write_bytes(b"")
    return path


def magic_only_pagemap(d: Path) -> Path:
    path = pagemap_of(d)
    path.write_bytes(struct.pack("=II", IMG_COMMON, MAGIC["PAGEMAP"]))
    return path


def huge_size_prefix(d: Path) -> Path:
    """The first entry claims 4 GiB - 1 bytes."""
    path = pagemap_of(d)
    data = bytearray(path.read_bytes())
    data[8:12] = struct.pack("=I", 0xFFFFFFFF)
    path.write_bytes(bytes(data))
    return path


def size_prefix_past_end(d: Path) -> Path:
    """An entry that claims 60 MiB (allowed size, but far past the end of the file)."""
    path = pagemap_of(d)
    data = bytearray(path.read_bytes())
    data[8:12] = struct.pack("=I", 60 << 20)
    path.write_bytes(bytes(data))
    return path


def missing_pages(d: Path) -> Path:
    path = pagemap_of(d)
    (d / f"pages-{load_pagemap(path, PAGE).pages_id}.img").unlink()
    return path


def short_pages(d: Path) -> Path:
    pages = d / f"pages-{load_pagemap(pagemap_of(d), PAGE).pages_id}.img"
    os.truncate(pages, os.stat(pages).st_size // 2 + 100)
    return pages


def empty_pages(d: Path) -> Path:
    pages = d / f"pages-{load_pagemap(pagemap_of(d), PAGE).pages_id}.img"
    os.truncate(pages, 0)
    return pages


def wrong_pages_id(d: Path) -> Path:
    return rewrite(d, lambda runs: runs, pages_id=7)


def absurd_nr_pages(d: Path) -> Path:
    return rewrite(d, lambda runs: [(runs[0][0], 1 << 50, runs[0][2]), *runs[1:]])


def zero_nr_pages(d: Path) -> Path:
    return rewrite(d, lambda runs: [(runs[0][0], 0, runs[0][2]), *runs[1:]])


def overlapping(d: Path) -> Path:
    def change(runs: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
        _, n, f = runs[3]
        pv, pn, _ = runs[2]
        return [*runs[:3], (pv + (pn - 1) * PAGE, n, f), *runs[4:]]
    return rewrite(d, change)


def unsorted(d: Path) -> Path:
    return rewrite(d, lambda runs: [runs[1], runs[0], *runs[2:]])


def unaligned(d: Path) -> Path:
    return rewrite(d, lambda runs: [(runs[0][0] + 8, runs[0][1], runs[0][2]), *runs[1:]])


def garbage_pstree(d: Path) -> Path:
    path = d / "pstree.img"
    data = path.read_bytes()
    path.write_bytes(data[:12] + bytes(range(0xF0, 0x100)) * 2)
    return path


def pstree_bad_pid(d: Path) -> Path:
    """A well-formed pstree entry with pid 0."""
    path = d / "pstree.img"
    payload = bytes([0x08, 0x00, 0x10, 0x00, 0x18, 0x00, 0x20, 0x00])
    path.write_bytes(struct.pack("=III", IMG_COMMON, MAGIC["PSTREE"], len(payload)) + payload)
    return path


def pstree_truncated(d: Path) -> Path:
    path = d / "pstree.img"
    path.write_bytes(path.read_bytes()[:-5])
    return path


def missing_pstree(d: Path) -> Path:
    path = d / "pstree.img"
    path.unlink()
    return path


def missing_pagemap(d: Path) -> Path:
    path = pagemap_of(d)
    path.unlink()
    return path


def sparse_huge_pagemap(d: Path) -> Path:
    """A pagemap that claims 2 GiB on disk (a sparse tail): refused by its size, not read."""
    path = pagemap_of(d)
    os.truncate(path, 2 << 30)
    return path


def missing_parent(d: Path) -> Path:
    """The newest image of a chain without its `parent` link."""
    (d / "d2" / "parent").unlink()
    return pagemap_of(d / "d2")


def dangling_parent(d: Path) -> Path:
    link = d / "d2" / "parent"
    link.unlink()
    os.symlink("../nowhere", link)
    return link


def dangling_parent_file(d: Path) -> Path:
    """A `parent` that is a regular file holding a path (an older form we still follow), dangling."""
    link = d / "d2" / "parent"
    link.unlink()
    link.write_text("../nowhere\n")
    return link


def self_parent(d: Path) -> Path:
    link = d / "d2" / "parent"
    link.unlink()
    os.symlink(".", link)
    return link


def cyclic_parent(d: Path) -> Path:
    """d2 -> d1 -> d2, with d1's pages all `PE_PARENT` so the cycle is followed."""
    link = d / "d2" / "parent"
    link.unlink()
    os.symlink("../d1", link)
    rewrite(d / "d1", lambda runs: [(v, n, PE_PARENT) for v, n, _ in runs])
    os.symlink("../d2", d / "d1" / "parent")
    return d / "d1" / "parent"


def parent_lacks_pages(d: Path) -> Path:
    """The parent's pagemap does not cover what the child has in parent."""
    rewrite(d / "d1", lambda runs: runs[: len(runs) // 4])
    return pagemap_of(d / "d1")


CASES: dict[str, tuple[str, Callable[[Path], Path], type[ImageError]]] = {
    "bad-magic": ("a_single", bad_magic, ImageError),
    "truncated-pagemap": ("a_single", truncated_pagemap, ImageError),
    "empty-pagemap": ("a_single", empty_pagemap, ImageError),
    "magic-only-pagemap": ("a_single", magic_only_pagemap, ImageError),
    "huge-size-prefix": ("a_single", huge_size_prefix, ImageError),
    "size-prefix-past-end": ("a_single", size_prefix_past_end, ImageError),
    "missing-pages": ("a_single", missing_pages, ImageError),
    "short-pages": ("a_single", short_pages, ImageError),
    "empty-pages": ("a_single", empty_pages, ImageError),
    "wrong-pages-id": ("a_single", wrong_pages_id, ImageError),
    "absurd-nr-pages": ("a_single", absurd_nr_pages, ImageError),
    "zero-nr-pages": ("a_single", zero_nr_pages, ImageError),
    "overlapping-entries": ("a_single", overlapping, ImageError),
    "unsorted-entries": ("a_single", unsorted, ImageError),
    "unaligned-entry": ("a_single", unaligned, ImageError),
    "garbage-pstree": ("a_single", garbage_pstree, ImageError),
    "pstree-pid-0": ("a_single", pstree_bad_pid, ImageError),
    "truncated-pstree": ("a_single", pstree_truncated, ImageError),
    "missing-pstree": ("a_single", missing_pstree, ImageError),
    "missing-pagemap": ("a_single", missing_pagemap, ImageError),
    "sparse-huge-pagemap": ("a_single", sparse_huge_pagemap, ImageError),
    "missing-parent": ("e2_chain2", missing_parent, ChainError),
    "dangling-parent": ("e2_chain2", dangling_parent, ChainError),
    "dangling-parent-file": ("e2_chain2", dangling_parent_file, ChainError),
    "self-parent": ("e2_chain2", self_parent, ChainError),
    "cyclic-parent": ("e2_chain2", cyclic_parent, ChainError),
    "parent-lacks-pages": ("e2_chain2", parent_lacks_pages, ChainError),
}


def broken(corpus41: Corpus, tmp_path: Path, name: str) -> tuple[Path, Path, type[ImageError]]:
    """(directory to read, the file the message must name, the error class)."""
    case, corrupt, error = CASES[name]
    root = copy_case(corpus41.root, case, tmp_path / case)
    named = corrupt(root)
    return (root / "d2" if case == "e2_chain2" else root), named, error


@pytest.mark.parametrize("name", sorted(CASES))
def test_broken_input_is_a_typed_one_line_error(corpus41: Corpus, tmp_path: Path, name: str) -> None:
    images_dir, named, error = broken(corpus41, tmp_path, name)
    tracemalloc.start()
    try:
        with time_limit(TIME_LIMIT), pytest.raises(error) as info:
            read_everything(images_dir)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    message = str(info.value)
    assert "\n" not in message
    assert info.value.path == str(named) or os.path.samefile(info.value.path, named), message
    assert message.startswith(info.value.path + ": ")
    assert peak < MEMORY_LIMIT, f"{name}: {peak} bytes allocated while failing"


def test_huge_size_prefix_allocates_nothing_big(corpus41: Corpus, tmp_path: Path) -> None:
    """A 4 GiB entry size is refused from the prefix, before any allocation of that size."""
    _, named, _ = broken(corpus41, tmp_path, "huge-size-prefix")
    tracemalloc.start()
    try:
        with pytest.raises(ImageError, match="4294967295 bytes"):
            load_pagemap(named, PAGE)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < os.stat(named).st_size + (1 << 20)


def test_present_pages_in_parent_chain_stop_at_depth(corpus41: Corpus, tmp_path: Path) -> None:
    """A chain far deeper than any real one (every level PE_PARENT) is an error, not a hang."""
    root = copy_case(corpus41.root, "a_single", tmp_path / "base")
    pm = load_pagemap(pagemap_of(root), PAGE)
    runs = [(e.vaddr, e.nr_pages, PE_PARENT) for e in pm.entries]
    prev = root
    for level in range(300):
        d = tmp_path / f"l{level}"
        d.mkdir()
        (d / pagemap_of(root).name).write_bytes(encode_pagemap(pm.pages_id, runs))
        shutil.copy(root / "pstree.img", d / "pstree.img")
        os.symlink(prev, d / "parent")
        prev = d
    with time_limit(TIME_LIMIT), pytest.raises(ChainError, match="deeper than"):
        read_everything(prev, vmas=False)
    # The same chain, 3 levels deep, reads the base's present pages.
    with open_images(tmp_path / "l2") as images, images.reader(images.pids[0]) as reader:
        entry = next(e for e in pm.entries if e.flags & PE_PRESENT)
        assert len(reader.read(entry.vaddr, entry.size)) == entry.size


# --- the command line -----------------------------------------------------------------------------


def _some_page(corpus41: Corpus, case: str) -> tuple[int, int]:
    d = corpus41.root / "cases" / case
    if case == "e2_chain2":
        d = d / "d2"
    with open_images(d) as images:
        pid = images.pids[0]
        return pid, images.pagemap(pid).entries[-1].vaddr


@pytest.mark.parametrize("name", sorted(CASES))
def test_cli_prints_one_line_and_fails(corpus41: Corpus, tmp_path: Path, name: str) -> None:
    pid, addr = _some_page(corpus41, CASES[name][0])
    images_dir, named, _ = broken(corpus41, tmp_path, name)
    if name in ("missing-parent", "parent-lacks-pages", "dangling-parent", "dangling-parent-file",
                "self-parent", "cyclic-parent"):
        # Read a PE_PARENT page, so the chain is followed.
        with open_images(corpus41.root / "cases" / "e2_chain2" / "d2") as images:
            addr = [e.vaddr for e in images.pagemap(pid).entries if e.in_parent][-1]
    proc = subprocess.run(
        [sys.executable, "-m", "crit_pageread", "read", str(images_dir), f"{addr:#x}", "--pid", str(pid)],
        capture_output=True, timeout=60, cwd=tmp_path,
    )
    stderr = proc.stderr.decode(errors="replace")
    assert proc.returncode != 0, f"exit 0, {len(proc.stdout)} bytes of output"
    assert proc.stdout == b""
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    assert named.name in lines[0], lines[0]
