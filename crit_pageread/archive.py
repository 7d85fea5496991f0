"""Checkpoint archives: `.tar` read in place; `.tar.gz/.xz/.bz2/.zst` image members unpacked.

Podman and Kubernetes write checkpoints as tar archives with the CRIU images
under `checkpoint/` beside `config.dump`, `spec.dump` and `rootfs-diff.tar`;
a plain `tar` of an image directory has them at the top or in one directory.

An uncompressed `.tar` is indexed from its headers once and each image is a
byte range of the archive (`Member`): nothing is copied and no temporary space
is used. A compressed archive is decompressed once, with large reads; only its
CRIU images (`*.img`) are written, each to a flat name in a private 0700
temporary directory, and the small container files (`*.dump`, ...) are kept in
memory; `rootfs-diff.tar` and every other member are skipped. Every name shown
for a member is `ARCHIVE: MEMBER`, never the temporary directory.

Nothing is ever created from a member name, so hostile names cannot write
anything anywhere; absolute names, `..`, links out of the archive, devices,
FIFOs, GNU sparse images, depth, name length, member count and unpacked size
are refused with one-line errors (`[archive]` config table: `max_depth`,
`max_name`, `max_members`, `max_unpacked`). Temporary directories are named
`crit-pageread-archive-PID-START-*`, removed on close, on SIGTERM and SIGHUP,
when an unclosed owner is collected and at exit; a later run removes those
whose owner process is gone (SIGKILL).
"""

from __future__ import annotations

import contextlib
import errno
import os
import posixpath
import re
import shutil
import signal
import stat
import tempfile
import threading
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from .errors import ConfigError, ImageError

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
BLOCK = 512
#: Read size of compressed streams (tarfile's own stream reads 10 KiB at a time).
STREAM_CHUNK = 4 << 20
WRITE_CHUNK = 1 << 20
NAME_MAX = 255
TEMP_PREFIX = "crit-pageread-archive-"
#: Member files of a container checkpoint kept in memory (small JSON and text files at the top).
CONTAINER_FILES = ("config.dump", "spec.dump", "network.status", "deleted.files", "checkpointed.pods",
                   "pod.options", "pod.dump", "stats-dump", "dump.log")
CONTAINER_FILE_MAX = 16 << 20
_PAX_MAX = 1 << 20
_TEMP_RESERVE = 1 << 20
#: Files of an image directory that are not `*.img` but are CRIU's (unpacked with the images).
CRIU_FILES = ("parent", "stats-dump", "stats-restore", "irmap-cache")


@dataclass(frozen=True)
class ArchiveLimits:
    """Bounds on what an archive may hold; defaults fit any real checkpoint."""

    max_depth: int = 64
    max_name: int = 4096
    max_members: int = 1_000_000
    max_unpacked: int = 1 << 40

    @classmethod
    def from_table(cls, table: dict[str, Any]) -> ArchiveLimits:
        """Limits from the `[archive]` config table; a bad key or value is a ConfigError."""
        known = ("max_depth", "max_name", "max_members", "max_unpacked")
        unknown = set(table) - set(known)
        if unknown:
            raise ConfigError(f"[archive]: unknown key {sorted(unknown)[0]!r} (known: {', '.join(known)})")
        for key, value in table.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"[archive]: key {key!r} must be a positive integer, not {value!r}")
        return cls(**table)


# --- names and members ------------------------------------------------------------------------


def short_name(name: str, limit: int = 160) -> str:
    """A member name fit for a one-line message (long ones elided in the middle)."""
    name = name.encode("unicode_escape").decode("ascii") if not name.isprintable() else name
    if len(name) <= limit:
        return name
    return f"{name[: limit // 2]}...{name[-limit // 2 + 3 :]} ({len(name)} characters)"


class Member(os.PathLike[str]):
    """An image inside an archive: a byte range of a file (the archive itself, or an unpacked copy).

    `str()` (and `os.fspath()`, so that every message shows it) is the name
    users know, `ARCHIVE: MEMBER`: opening it as a path fails, never reads the
    wrong bytes. `source` is the file holding the bytes at `offset`, `size`
    bytes long; `read_bounded` reads them.
    """

    __slots__ = ("archive", "member", "offset", "present", "size", "source")

    def __init__(self, archive: Path, member: str, source: str, offset: int, size: int,
                 present: list[tuple[int, int]] | None = None) -> None:
        self.archive = archive
        self.member = member
        self.source = source
        self.offset = offset
        self.size = size
        #: For a pages file unpacked sparse (`PagesWanted`): the byte ranges of it that were written; None: all.
        self.present = present

    @property
    def name(self) -> str:
        """The member's base name (`pagemap-1.img`)."""
        return posixpath.basename(self.member)

    def __str__(self) -> str:
        return f"{self.archive}: {short_name(self.member)}"

    def __fspath__(self) -> str:
        return str(self)

    def __repr__(self) -> str:
        return f"Member({str(self)!r})"

    def read_bounded(self, max_size: int) -> bytes:
        """The member's bytes (an ImageError past `max_size` or if the archive is short)."""
        if self.size > max_size:
            raise ImageError(self, f"image is {self.size} bytes, more than {max_size} allowed")
        fd = os.open(self.source, os.O_RDONLY | os.O_CLOEXEC)
        try:
            data = os.pread(fd, self.size, self.offset)
        finally:
            os.close(fd)
        if len(data) != self.size:
            raise ImageError(self, f"truncated archive: {len(data)} of {self.size} bytes")
        return data

    def copy_to(self, dest: str | os.PathLike[str]) -> None:
        """Copy the member's bytes to a new file `dest` (kernel copy)."""
        src = os.open(self.source, os.O_RDONLY | os.O_CLOEXEC)
        try:
            out = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
            try:
                pos, left = self.offset, self.size
                while left:
                    n = os.copy_file_range(src, out, left, pos)
                    if n <= 0:
                        raise ImageError(self, "truncated archive")
                    pos += n
                    left -= n
            finally:
                os.close(out)
        finally:
            os.close(src)


@dataclass
class _Entry:
    name: str
    kind: str  # "file", "dir", "symlink", "hardlink", "special"
    size: int = 0
    offset: int = 0
    link: str = ""
    sparse: bool = False
    #: For a compressed archive: the unpacked file (images) or the bytes (container files).
    source: str | None = None
    data: bytes | None = None
    #: For a pages file unpacked sparse: the byte ranges written (the rest reads as an error, never as zeros).
    present: list[tuple[int, int]] | None = None


@dataclass
class ArchiveIndex:
    """The members of an archive, by normalized name, and where their bytes are."""

    path: Path
    compressed: bool
    entries: dict[str, _Entry] = field(default_factory=dict)
    dirs: set[str] = field(default_factory=set)
    tempdir: Path | None = None
    #: With `images_only`: the member where reading stopped (the rest of the archive was not read), else None.
    stopped_at: str | None = None
    _finalizer: Any = None

    # lookup -----------------------------------------------------------------------------

    def resolve(self, name: str) -> str:
        """`name` with every symlink in it followed inside the archive (lexically)."""
        parts = [p for p in name.split("/") if p not in ("", ".")]
        for _ in range(40):
            for i in range(1, len(parts) + 1):
                prefix = "/".join(parts[:i])
                entry = self.entries.get(prefix)
                if entry is not None and entry.kind == "symlink":
                    target = posixpath.normpath(posixpath.join(posixpath.dirname(prefix), entry.link))
                    target = "" if target == "." else target
                    parts = [p for p in target.split("/") if p] + parts[i:]
                    break
            else:
                return "/".join(parts)
        raise ImageError(self.path, f"{short_name(name)}: too many levels of symbolic links")

    def entry(self, name: str) -> _Entry | None:
        entry = self.entries.get(self.resolve(name))
        while entry is not None and entry.kind == "hardlink":
            entry = self.entries.get(entry.link)
        return entry

    def is_file(self, name: str) -> bool:
        entry = self.entry(name)
        return entry is not None and entry.kind == "file"

    def is_dir(self, name: str) -> bool:
        return self.resolve(name) in self.dirs

    def member(self, name: str) -> Member:
        """The Member for a regular file (resolved); an ImageError if absent or unreadable."""
        real = self.resolve(name)
        entry = self.entry(name)
        if entry is None or entry.kind != "file":
            raise ImageError(f"{self.path}: {short_name(name)}", "missing")
        if entry.sparse:
            raise ImageError(f"{self.path}: {short_name(real)}", "is a GNU sparse member; repack without --sparse")
        if self.compressed:
            if entry.source is None:
                raise ImageError(f"{self.path}: {short_name(real)}", "not unpacked (not a CRIU image)")
            return Member(self.path, real, entry.source, 0, entry.size, entry.present)
        return Member(self.path, real, str(self.path), entry.offset, entry.size)

    def listdir(self, directory: str) -> list[str]:
        """Names directly inside `directory` (resolved)."""
        base = self.resolve(directory)
        prefix = base + "/" if base else ""
        out = set()
        for name in self.entries:
            if name.startswith(prefix):
                rest = name[len(prefix) :]
                if rest and "/" not in rest:
                    out.add(rest)
        for d in self.dirs:
            if d.startswith(prefix) and d != base:
                rest = d[len(prefix) :]
                if rest and "/" not in rest:
                    out.add(rest)
        return sorted(out)

    def available(self, name: str) -> bool:
        """True if `name` is a regular file whose bytes can be read (unpacked, for a compressed archive)."""
        entry = self.entry(name)
        if entry is None or entry.kind != "file":
            return False
        return not self.compressed or entry.source is not None or entry.data is not None

    def read_small(self, name: str, limit: int = CONTAINER_FILE_MAX) -> bytes | None:
        """A small member's bytes (container metadata), or None if absent."""
        entry = self.entry(name)
        if entry is None or entry.kind != "file":
            return None
        label = f"{self.path}: {short_name(name)}"
        if entry.size > limit:
            raise ImageError(label, f"{entry.size} bytes, more than {limit} allowed")
        if entry.data is not None:
            return entry.data
        if entry.source is not None:
            with open(entry.source, "rb") as f:
                return f.read(limit + 1)[:limit]
        if self.compressed:
            return None
        return self.member(name).read_bounded(limit)

    def size_of(self, name: str) -> int | None:
        entry = self.entry(name)
        return entry.size if entry is not None and entry.kind == "file" else None

    def images_dir(self) -> str:
        """The member directory holding the CRIU images (`checkpoint`, the top, or the one directory)."""
        def has_images(d: str) -> bool:
            prefix = f"{d}/" if d else ""
            return self.is_file(prefix + "pstree.img") or self.is_file(prefix + "inventory.img")

        for candidate in ("checkpoint", ""):
            if has_images(candidate):
                return candidate
        tops = {n.split("/", 1)[0] for n in (*self.entries, *self.dirs) if n}
        top_dirs = [t for t in tops if t in self.dirs]
        if len(top_dirs) == 1:
            for candidate in (f"{top_dirs[0]}/checkpoint", top_dirs[0]):
                if has_images(candidate):
                    return candidate
        raise ImageError(self.path, "archive holds no CRIU images (no pstree.img at the top or under checkpoint/)")

    def container_root(self, images_dir: str) -> str:
        """The member directory of the container files (`config.dump`...): above `checkpoint/`."""
        parent = posixpath.dirname(images_dir) if posixpath.basename(images_dir) == "checkpoint" else images_dir
        return parent

    # lifetime ---------------------------------------------------------------------------

    def close(self) -> None:
        """Remove the unpacked copy, if any (idempotent)."""
        if self._finalizer is not None:
            self._finalizer()


# --- opening ------------------------------------------------------------------------------------


def compression(path: str | os.PathLike[str]) -> str | None:
    """"zst", "gz", "xz", "bz2" or "tar" for a (compressed) tar archive; None for anything else."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        head = os.pread(fd, BLOCK, 0)
    finally:
        os.close(fd)
    for magic, kind in ((ZSTD_MAGIC, "zst"), (b"\x1f\x8b", "gz"), (b"\xfd7zXZ\x00", "xz"), (b"BZh", "bz2")):
        if head.startswith(magic):
            return kind
    if len(head) >= 262 and head[257:262] == b"ustar":
        return "tar"
    return None


def is_archive(path: str | os.PathLike[str]) -> bool:
    """True if `path` is a regular file that looks like a (possibly compressed) tar archive."""
    return compression(path) is not None


#: `pages_wanted(pid, mm_image)`: the address ranges [start, end) of a process that a command will read,
#: from its mm image (an `archive.Member`); see `open_archive`.
PagesWanted = Callable[[int, "Member"], list[tuple[int, int]]]
_PAGES_RE = re.compile(r"pages-(\d+)\.img")
_PAGEMAP_RE = re.compile(r"pagemap-(shmem-)?(\d+)\.img")
_MM_RE = re.compile(r"mm-(\d+)\.img")


def open_archive(path: str | os.PathLike[str], limits: ArchiveLimits | None = None, *,
                 pages_wanted: PagesWanted | None = None, page_size: int = 4096,
                 images_only: bool = False) -> ArchiveIndex:
    """Index an archive; a compressed one has its images unpacked (close the index to remove them).

    With `pages_wanted` (for a command that reads a few ranges of each process,
    as `ps` reads argv and the environment), a compressed archive's pages file is
    unpacked sparse: only the pages holding those ranges are written, where the
    process's pagemap and mm images come before its pages file in the archive
    (as in Podman's exports, whose members are in lexical order); any other
    pages file is unpacked whole. A read of a page that was not written is an
    ImageError through the reader (`Member.present`), never zeros.

    With `images_only` (a caller that reads the CRIU images only, not
    config.dump or rootfs-diff.tar), decompressing a container export stops at
    the first member after `checkpoint/` and every level of its `parent` chain
    (`stopped_at`); the rest of the archive is neither read nor checked.
    """
    path = Path(path)
    limits = limits or ArchiveLimits()
    kind = compression(path)
    if kind is None:
        raise ImageError(path, "not a tar archive")
    if kind == "tar":
        index = ArchiveIndex(path, compressed=False)
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            _Indexer(index, limits, _FileSource(path, fd)).run()
        finally:
            os.close(fd)
        return index
    index = ArchiveIndex(path, compressed=True)
    tmp = make_temp_dir()
    index.tempdir = tmp
    index._finalizer = weakref.finalize(index, _remove_temp_dir, str(tmp))
    try:
        with _decompressed(path, kind) as stream:
            source = _StreamSource(path, stream)
            try:
                _Indexer(index, limits, source, unpack_to=tmp, pages_wanted=pages_wanted, page_size=page_size,
                         images_only=images_only).run()
            finally:
                source.close()
    except BaseException:
        index.close()
        raise
    return index


@contextlib.contextmanager
def _decompressed(path: Path, kind: str) -> Iterator[IO[bytes]]:
    """A decompressed stream of the archive, read in large pieces."""
    with open(path, "rb", buffering=0) as raw:
        if kind == "gz":
            import gzip

            with gzip.GzipFile(fileobj=raw, mode="rb") as g:
                yield g  # type: ignore[misc]
        elif kind == "xz":
            import lzma

            with lzma.LZMAFile(raw) as x:
                yield x
        elif kind == "bz2":
            import bz2

            with bz2.BZ2File(raw) as b:
                yield b
        else:
            try:
                import zstandard  # type: ignore[import-not-found,unused-ignore]
            except ImportError:
                zstandard = None  # type: ignore[assignment,unused-ignore]
            if zstandard is not None:
                dctx = zstandard.ZstdDecompressor()
                with dctx.stream_reader(raw, read_size=STREAM_CHUNK, closefd=False) as z:
                    yield z
            else:
                with _zstd_program(path) as z:
                    yield z


@contextlib.contextmanager
def _zstd_program(path: Path) -> Iterator[IO[bytes]]:
    import subprocess

    program = shutil.which("zstd")
    if program is None:
        raise ImageError(path, "zstd archive: install the zstandard module (pip install 'crit-pageread[zstd]')"
                               " or a zstd program")
    proc = subprocess.Popen([program, "-dcq", "--", str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    ok = False
    try:
        yield proc.stdout
        ok = True
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdout.close()
        err = proc.stderr.read().decode(errors="replace").strip() if proc.stderr else ""
        if proc.stderr:
            proc.stderr.close()
    if ok and proc.returncode not in (0, -signal.SIGKILL) and err:
        raise ImageError(path, f"zstd failed: {err.splitlines()[-1]}")


# --- sources: a seekable archive file, or a decompressed stream ---------------------------------


class _FileSource:
    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self.fd = fd
        self.pos = 0
        self.size = os.fstat(fd).st_size

    def read(self, n: int) -> bytes:
        data = os.pread(self.fd, n, self.pos)
        self.pos += len(data)
        return data

    def skip(self, n: int) -> bool:
        """Move past `n` bytes; False if the archive ends before."""
        self.pos += n
        return self.pos <= self.size

    def copy(self, fd: int, n: int) -> bool:  # pragma: no cover - an in-place archive never copies
        raise AssertionError("in-place archives are not copied")


class _StreamSource:
    """A decompressed stream read ahead by a thread (decompression releases the GIL), so that
    decompressing the next piece overlaps writing this one, as `zstd -d | tar -x` overlaps them."""

    DEPTH = 3

    def __init__(self, path: Path, stream: IO[bytes]) -> None:
        import queue

        self.path = path
        self.stream = stream
        self.pos = 0
        self._view = memoryview(b"")
        self._buf: bytearray | None = None
        self._start = 0
        self._end = 0
        self._eof = False
        self._stop = False
        self._free: queue.Queue[bytearray] = queue.Queue()
        self._filled: queue.Queue[tuple[bytearray | None, int, BaseException | None]] = queue.Queue()
        for _ in range(self.DEPTH):
            self._free.put(bytearray(STREAM_CHUNK))
        self._thread = threading.Thread(target=self._pump_stream, name="crit-pageread-decompress", daemon=True)
        self._thread.start()

    def _pump_stream(self) -> None:
        while True:
            buf = self._free.get()
            if self._stop:
                return
            try:
                n = self.stream.readinto(buf)  # type: ignore[attr-defined]
            except BaseException as exc:
                self._filled.put((None, 0, exc))
                return
            self._filled.put((buf, n or 0, None))
            if not n:
                return

    def close(self) -> None:
        """Stop the read-ahead thread (before the stream is closed)."""
        self._stop = True
        self._free.put(bytearray(0))
        self._thread.join()

    def _fill(self) -> bool:
        if self._start < self._end:
            return True
        if self._eof:
            return False
        if self._buf is not None:
            self._view.release()
            self._free.put(self._buf)
            self._buf = None
        buf, n, exc = self._filled.get()
        if exc is not None:
            self._eof = True
            if isinstance(exc, (OSError, EOFError, ValueError)):
                raise ImageError(self.path, f"cannot decompress: {exc}") from None
            if isinstance(exc, Exception):  # zstandard.ZstdError, lzma.LZMAError, ...: corrupt compressed data
                raise ImageError(self.path, f"cannot decompress: {type(exc).__name__}: {exc}") from None
            raise exc
        assert buf is not None
        self._buf = buf
        self._view = memoryview(buf)
        self._start, self._end = 0, n
        if not n:
            self._eof = True
        return bool(n)

    def read(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n and self._fill():
            take = min(n - len(out), self._end - self._start)
            out += self._view[self._start : self._start + take]
            self._start += take
        self.pos += len(out)
        return bytes(out)

    def _pump(self, n: int, fd: int | None) -> bool:
        while n and self._fill():
            take = min(n, self._end - self._start)
            if fd is not None:
                chunk = self._view[self._start : self._start + take]
                while chunk:
                    # Writes of at most 1 MiB: measured here, 4 MiB writes to the page cache ran ~6x slower.
                    w = os.write(fd, chunk[:WRITE_CHUNK])
                    chunk = chunk[w:]
            self._start += take
            self.pos += take
            n -= take
        return n == 0

    def skip(self, n: int) -> bool:
        return self._pump(n, None)

    def copy(self, fd: int, n: int) -> bool:
        return self._pump(n, fd)

    def copy_ranges(self, fd: int, n: int, ranges: list[tuple[int, int]]) -> bool:
        """Move past `n` bytes, writing only `ranges` (sorted, disjoint, relative to here) at their offsets."""
        done = 0
        for a, b in ranges:
            b = min(b, n)
            if a >= b:
                continue
            if not self._pump(a - done, None):
                return False
            done = a
            while done < b and self._fill():
                take = min(b - done, self._end - self._start)
                chunk = self._view[self._start : self._start + take]
                while chunk:
                    w = os.pwrite(fd, chunk[:WRITE_CHUNK], done)
                    chunk = chunk[w:]
                    done += w
                self._start += take
                self.pos += take
            if done < b:
                return False
        return self._pump(n - done, None)


# --- the tar format -----------------------------------------------------------------------------


def _number(field_bytes: bytes) -> int:
    """A numeric header field: octal text, or GNU base-256 when the high bit is set."""
    if field_bytes and field_bytes[0] & 0x80:
        value = int.from_bytes(field_bytes[1:], "big")
        return -value if field_bytes[0] & 0x40 else value
    text = field_bytes.split(b"\0", 1)[0].strip(b" ")
    return int(text, 8) if text else 0


def _text(field_bytes: bytes) -> str:
    return field_bytes.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _pax(data: bytes) -> dict[str, str]:
    out: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0:
            break
        length = int(data[pos:space])
        if length <= 0:
            raise ValueError("bad pax record length")
        record = data[space + 1 : pos + length - 1]
        key, _, value = record.partition(b"=")
        out[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


class _Indexer:
    """Walks the headers of an archive once, checking every bound, recording (or unpacking) members."""

    def __init__(self, index: ArchiveIndex, limits: ArchiveLimits, source: Any, unpack_to: Path | None = None,
                 pages_wanted: PagesWanted | None = None, page_size: int = 4096, images_only: bool = False):
        self.index = index
        self.limits = limits
        self.src = source
        self.unpack_to = unpack_to
        self.unpacked = 0
        self.count = 0
        self.pages_wanted = pages_wanted
        self.page_size = page_size
        #: Unpacked so far, for sparse pages files: directory -> [(pid or None for shmem, pagemap entry)];
        #: pid -> mm entries (the newest level's first: a pre-dump's level has none).
        self._pagemaps: dict[str, list[tuple[int | None, _Entry]]] = {}
        self._mms: dict[int, list[_Entry]] = {}
        self.images_only = images_only

    def fail(self, name: str | None, problem: str) -> ImageError:
        where = f"{self.index.path}: {short_name(name)}" if name else str(self.index.path)
        return ImageError(where, problem)

    def run(self) -> None:
        src = self.src
        long_name: str | None = None
        long_link: str | None = None
        pax: dict[str, str] = {}
        while True:
            at = src.pos
            header = src.read(BLOCK)
            if not header and at == 0:
                raise self.fail(None, "not a readable tar archive: empty")
            if len(header) < BLOCK:
                if not header.strip(b"\0") and at:
                    return  # archives without the end-of-archive blocks (truncated zeros)
                raise self.fail(None, f"truncated archive: header at offset {at} is cut short")
            if not header.strip(b"\0"):
                return
            chk = _number(header[148:156])
            if chk != sum(header[:148]) + 256 + sum(header[156:]):
                raise self.fail(None, f"not a readable tar archive: bad header checksum at offset {at}")
            kind = header[156:157]
            size = _number(header[124:136])
            if size < 0:
                raise self.fail(None, f"negative member size at offset {at}")
            padded = (size + BLOCK - 1) // BLOCK * BLOCK
            if kind in (b"x", b"g", b"L", b"K"):
                if size > _PAX_MAX:
                    raise self.fail(None, f"extended header of {size} bytes at offset {at}, more than {_PAX_MAX}")
                data = src.read(padded)
                if len(data) < padded:
                    raise self.fail(None, f"truncated archive: extended header at offset {at}")
                data = data[:size]
                if kind == b"x":
                    try:
                        pax = _pax(data)
                    except ValueError:
                        raise self.fail(None, f"corrupt pax header at offset {at}") from None
                elif kind == b"L":
                    long_name = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                elif kind == b"K":
                    long_link = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                continue
            name = long_name if long_name is not None else _text(header[0:100])
            if long_name is None and header[257:263] == b"ustar\x0000" and header[345]:
                name = _text(header[345:500]) + "/" + name
            link = long_link if long_link is not None else _text(header[157:257])
            name = pax.get("GNU.sparse.name", pax.get("path", name))
            link = pax.get("linkpath", link)
            sparse = kind == b"S" or any(k.startswith("GNU.sparse.") for k in pax)
            if "size" in pax:
                try:
                    size = int(pax["size"])
                except ValueError:
                    raise self.fail(name, "corrupt pax size") from None
                padded = (size + BLOCK - 1) // BLOCK * BLOCK
            if kind == b"S" and header[482]:
                # Extended sparse headers follow: 512-byte blocks until one says it is the last.
                while True:
                    ext = src.read(BLOCK)
                    if len(ext) < BLOCK:
                        raise self.fail(name, "truncated archive: sparse header cut short")
                    if not ext[504]:
                        break
            long_name = long_link = None
            pax = {}
            if self.images_only and self._past_images(name):
                self.index.stopped_at = name
                return
            self.member(name, kind, size, link, sparse, header)
            if not self._data(name, kind, size, padded, sparse):
                raise self.fail(name, f"truncated archive: member declares {size} bytes, the archive ends before")

    def check_name(self, raw: str) -> str:
        limits = self.limits
        if len(raw.encode("utf-8", "surrogateescape")) > limits.max_name:
            raise self.fail(raw, f"name of {len(raw)} characters, more than {limits.max_name} allowed")
        if raw.startswith("/"):
            raise self.fail(raw, "member has an absolute path")
        if "\x00" in raw:
            raise self.fail(raw, "member has a NUL byte")
        parts = [p for p in raw.split("/") if p not in ("", ".")]
        if ".." in parts:
            raise self.fail(raw, "member has a '..' component")
        if len(parts) > limits.max_depth:
            raise self.fail(raw, f"member is {len(parts)} directories deep, more than {limits.max_depth} allowed")
        for p in parts:
            if len(p.encode("utf-8", "surrogateescape")) > NAME_MAX:
                raise self.fail(raw, f"a name component of {len(p)} characters, more than NAME_MAX ({NAME_MAX})")
        return "/".join(parts)

    def member(self, raw: str, kind: bytes, size: int, link: str, sparse: bool, header: bytes) -> None:
        self.count += 1
        if self.count > self.limits.max_members:
            raise self.fail(raw, f"more than {self.limits.max_members} members")
        name = self.check_name(raw)
        if not name:
            return
        index = self.index
        parts = name.split("/")
        for i in range(1, len(parts)):
            index.dirs.add("/".join(parts[:i]))
        if kind == b"5":
            index.dirs.add(name)
            return
        if kind in (b"3", b"4", b"6"):
            what = "FIFO" if kind == b"6" else "device"
            raise self.fail(raw, f"member is a {what}; checkpoint archives hold files only")
        if kind == b"2":
            if link.startswith("/"):
                raise self.fail(raw, f"symlink points to the absolute path {short_name(link)!r}")
            target = posixpath.normpath(posixpath.join(posixpath.dirname(name), link))
            if target == ".." or target.startswith("../"):
                raise self.fail(raw, f"symlink -> {short_name(link)!r} points outside the archive")
            index.entries[name] = _Entry(name, "symlink", link=link)
            try:
                resolved = index.resolve(name)
            except ImageError:
                raise self.fail(raw, "symlink loop") from None
            if resolved == ".." or resolved.startswith("../"):
                raise self.fail(raw, f"symlink -> {short_name(link)!r} resolves outside the archive")
            return
        if kind == b"1":
            target_name = self.check_name(link)
            linked = index.entry(target_name)
            if linked is None or linked.kind != "file":
                raise self.fail(raw, f"hard link -> {short_name(link)!r} has no target in the archive")
            index.entries[name] = _Entry(name, "hardlink", link=index.resolve(target_name))
            return
        if kind not in (b"0", b"\0", b"7", b"S"):
            raise self.fail(raw, f"member of unknown type {kind!r}; checkpoint archives hold files only")
        if name in index.entries and index.entries[name].kind == "file":
            raise self.fail(raw, "member appears twice")
        real = index.resolve(posixpath.dirname(name))
        full = f"{real}/{posixpath.basename(name)}" if real else posixpath.basename(name)
        if full == ".." or full.startswith("../"):
            raise self.fail(raw, "member would be written through a link outside the archive")
        index.entries[full] = _Entry(full, "file", size=size, offset=self.src.pos, sparse=sparse)

    def _data(self, raw: str, kind: bytes, size: int, padded: int, sparse: bool) -> bool:
        """Move past (or unpack) the member's data."""
        stored = padded
        if self.unpack_to is None or kind not in (b"0", b"\0", b"7", b"S"):
            return self.src.skip(stored)
        name = self.check_name(raw)
        base = posixpath.basename(name)
        entry = self.index.entries.get(self.index.resolve(name))
        if entry is None:
            return self.src.skip(stored)
        if base.endswith(".img") or base in CRIU_FILES:
            if sparse:
                return self.src.skip(stored)  # refused if it is ever read (`member()`)
            ranges = self._sparse_ranges(entry, base) if self.pages_wanted is not None else None
            need = size if ranges is None else sum(b - a for a, b in ranges)
            self.unpacked += need
            if self.unpacked > self.limits.max_unpacked:
                raise self.fail(raw, f"unpacking it would exceed {self.limits.max_unpacked} bytes (max_unpacked)")
            assert self.unpack_to is not None
            free = _free_bytes(self.unpack_to)
            if free is not None and need + _TEMP_RESERVE > free:
                raise self.fail(raw, f"{need} bytes to unpack, {free} free in {tempfile.gettempdir()}"
                                     " (set TMPDIR, or read the uncompressed .tar in place)")
            dest = self.unpack_to / f"{self.count}.img"
            fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                if ranges is None:
                    ok = self.src.copy(fd, size)
                else:  # the pages wanted only, at their offsets; the rest stays a hole, never read
                    os.ftruncate(fd, size)
                    ok = self.src.copy_ranges(fd, size, ranges)
                    entry.present = ranges
            except OSError as exc:
                if exc.errno == errno.ENOSPC:
                    raise self.fail(raw, f"no space left unpacking it in {tempfile.gettempdir()}") from None
                raise
            finally:
                os.close(fd)
            entry.source = str(dest)
            if self.pages_wanted is not None:
                self._note(entry, base)
            return ok and self.src.skip(stored - size)
        if base in CONTAINER_FILES and size <= CONTAINER_FILE_MAX and name.count("/") <= 1:
            data = self.src.read(size)
            entry.data = data
            return len(data) == size and self.src.skip(stored - size)
        return self.src.skip(stored)


    def _past_images(self, raw: str) -> bool:
        """True at the first member after a container export's `checkpoint/` and every level of its chain
        (Podman and CRI-O write each directory's members together): the rest is container files."""
        index = self.index
        if not (index.is_file("checkpoint/pstree.img") and index.is_file("checkpoint/inventory.img")):
            return False
        name = "/".join(p for p in raw.split("/") if p not in ("", "."))
        level, seen = "checkpoint", 0
        while True:
            if name == level or name.startswith(level + "/"):
                return False
            link = index.entries.get(f"{level}/parent")
            if link is None or link.kind != "symlink" or seen > 64:
                return True
            try:
                level = index.resolve(f"{level}/parent")
            except ImageError:
                return False
            if level not in index.dirs or not level:
                return False  # the parent level is still to come (or is the top): read on
            seen += 1

    def _note(self, entry: _Entry, base: str) -> None:
        """Remember an unpacked pagemap or mm image (what a later pages file's wanted ranges come from)."""
        m = _PAGEMAP_RE.fullmatch(base)
        if m is not None:
            pid = None if m.group(1) else int(m.group(2))
            self._pagemaps.setdefault(posixpath.dirname(entry.name), []).append((pid, entry))
            return
        m = _MM_RE.fullmatch(base)
        if m is not None:
            self._mms.setdefault(int(m.group(1)), []).append(entry)

    def _sparse_ranges(self, entry: _Entry, base: str) -> list[tuple[int, int]] | None:
        """The byte ranges of pages file `entry` that hold the wanted pages, or None to unpack it whole.

        Whole unless its one pagemap (a process's, not a shared segment's) and that
        process's mm image were unpacked before it and both parse; anything
        unusual is left for the command to find and report.
        """
        m = _PAGES_RE.fullmatch(base)
        if m is None or entry.sparse:
            return None
        from .errors import CritPageReadError
        from .imagefile import check_magic, decode_varint_fields, iter_entries, read_image
        from .pagemap import PE_PRESENT, load_pagemap

        pages_id = int(m.group(1))
        owners = []
        for pid, pm in self._pagemaps.get(posixpath.dirname(entry.name), []):
            member = Member(self.index.path, pm.name, pm.source or "", 0, pm.size)
            try:
                data = read_image(member, "PAGEMAP")
                head = next(iter_entries(member, data, check_magic(member, data, "PAGEMAP")), None)
                if head is not None and decode_varint_fields(member, head).get(1) == pages_id:
                    owners.append((pid, member))
            except CritPageReadError:
                return None
        if len(owners) != 1 or owners[0][0] is None or not self._mms.get(owners[0][0]):
            return None
        pid, pagemap_member = owners[0]
        assert pid is not None and self.pages_wanted is not None
        here = posixpath.dirname(entry.name)
        mm = next((e for e in self._mms[pid] if posixpath.dirname(e.name) == here), self._mms[pid][0])
        label = f"{self.index.path}: {short_name(entry.name)}"
        try:
            wanted = self.pages_wanted(pid, Member(self.index.path, mm.name, mm.source or "", 0, mm.size))
            pagemap = load_pagemap(pagemap_member, self.page_size, locate=lambda _: (0, entry.size, label))
        except Exception:  # a bad image (or caller): unpack it whole; the command reports it
            return None
        mask = self.page_size - 1
        ranges: list[tuple[int, int]] = []
        for start, end in wanted:
            if end <= start:
                continue
            start, end = start & ~mask, (end + mask) & ~mask
            for e in pagemap.entries_in(start, end):
                if e.flags & PE_PRESENT:
                    a, b = max(start, e.vaddr), min(end, e.end)
                    ranges.append((e.offset + a - e.vaddr, e.offset + b - e.vaddr))
        ranges.sort()
        merged: list[tuple[int, int]] = []
        for a, b in ranges:
            if merged and a <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], b))
            else:
                merged.append((a, b))
        return merged


def _free_bytes(path: Path) -> int | None:
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


# --- temporary directories: private, recognisable, removed on every way out --------------------

_live: set[str] = set()
_live_lock = threading.Lock()
_handlers_installed = False


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat), or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    return data.rsplit(b")", 1)[-1].split()[19].decode()


def make_temp_dir() -> Path:
    """A new 0700 directory named `crit-pageread-archive-PID-START-*`; stale ones are removed first."""
    remove_stale_temp_dirs()
    me = os.getpid()
    tmp = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{me}-{_start_time(me) or 0}-"))
    os.chmod(tmp, 0o700)
    with _live_lock:
        _live.add(str(tmp))
    _install_signal_cleanup()
    return tmp


def _remove_temp_dir(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)
    with _live_lock:
        _live.discard(path)


def remove_stale_temp_dirs(directory: str | None = None) -> list[str]:
    """Remove our temp dirs whose owner process is gone (killed by SIGKILL); return their paths."""
    directory = directory or tempfile.gettempdir()
    removed: list[str] = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    uid = os.getuid()
    for name in names:
        if not name.startswith(TEMP_PREFIX):
            continue
        parts = name[len(TEMP_PREFIX) :].split("-")
        if len(parts) < 3 or not parts[0].isdigit():
            continue
        pid, start = int(parts[0]), parts[1]
        path = os.path.join(directory, name)
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if st.st_uid != uid or not stat.S_ISDIR(st.st_mode):
            continue
        alive = _start_time(pid)
        if alive is not None and (alive == start or start == "0"):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def _cleanup_all() -> None:
    with _live_lock:
        paths = list(_live)
    for path in paths:
        _remove_temp_dir(path)


def _on_signal(signum: int, frame: Any) -> None:
    """Remove every live temp dir, then die of the signal as if no handler were installed."""
    _cleanup_all()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _install_signal_cleanup() -> None:
    """SIGTERM and SIGHUP remove the temp dirs (only where nobody else handles them; main thread only)."""
    global _handlers_installed
    if _handlers_installed or threading.current_thread() is not threading.main_thread():
        return
    _handlers_installed = True
    for sig in (signal.SIGTERM, signal.SIGHUP):
        try:
            if signal.getsignal(sig) == signal.SIG_DFL:
                signal.signal(sig, _on_signal)
        except (ValueError, OSError):
            pass


@contextlib.contextmanager
def unpacked_images(
    path: str | os.PathLike[str], limits: ArchiveLimits | None = None
) -> Iterator[tuple[Path, str]]:
    """The archive's CRIU images as a real directory (for tools that need one, such as crit's `x`).

    Yields the directory and the member directory it stands for (`checkpoint`,
    or "" for images at the top). The image members only, each under its own
    name, at the member directory's own path under a private temporary root
    removed on exit, with every level of the `parent` chain the archive holds
    beside it (`checkpoint/parent -> ../pre-checkpoint`, as Podman lays a
    pre-checkpoint out); an uncompressed archive is copied by the kernel.
    """
    index = open_archive(path, limits)
    tmp = make_temp_dir()
    try:
        images = index.images_dir()
        root = tmp / "root"
        root.mkdir(mode=0o700)
        level: str | None = images
        seen: set[str] = set()
        while level is not None and level not in seen and len(seen) < 64:
            seen.add(level)
            level = _unpack_level(index, level, root)
        yield (root / images if images else root), images
    finally:
        index.close()
        _remove_temp_dir(str(tmp))


def _unpack_level(index: ArchiveIndex, level: str, root: Path) -> str | None:
    """Put one level's images under `root` (at its member path); return its parent level, if the archive has it."""
    here = root / level if level else root
    here.mkdir(mode=0o700, parents=True, exist_ok=True)
    for name in index.listdir(level):
        full = f"{level}/{name}" if level else name
        if name != "parent" and index.is_file(full) and (name.endswith(".img") or name in CRIU_FILES):
            member = index.member(full)
            if index.compressed:  # already unpacked, in the same temporary directory: a link, no copy
                os.link(member.source, here / name)
            else:
                member.copy_to(here / name)
    link = f"{level}/parent" if level else "parent"
    entry = index.entries.get(link)
    if entry is None:
        if index.is_file(link):  # a `parent` file holding the path: as the archive has it
            (here / "parent").write_bytes(index.read_small(link, 4096) or b"")
        return None
    if entry.kind != "symlink":
        return None
    target = index.resolve(link)
    # The link as the archive resolves it (inside the archive: checked when indexed), dangling or not.
    os.symlink(posixpath.relpath(target or ".", level or "."), here / "parent")
    return target if index.is_dir(target) else None


def unpack_checkpoint(path: str | os.PathLike[str]) -> tuple[Path, Callable[[], None]]:
    """The images as a real temporary directory and the function that removes it (see `unpacked_images`)."""
    cm = unpacked_images(path)
    directory, _ = cm.__enter__()

    def cleanup() -> None:
        cm.__exit__(None, None, None)

    return directory, cleanup
