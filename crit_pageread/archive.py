"""Checkpoint archives: `.tar`, `.tar.gz`, `.tar.xz`, `.tar.bz2`, `.tar.zst`, unpacked safely.

Podman and Kubernetes write checkpoints as tar archives with the CRIU images
under `checkpoint/`; a plain `tar` of an image directory has them at the top
or in one directory. Members are extracted one by one (streaming, so a
compressed archive is read once) into a private temporary directory (mode
0700). Absolute names, `..` components, links that point outside the
directory, devices and FIFOs are refused: nothing is ever written outside the
temporary directory. zstd needs the `zstandard` module or a `zstd` program.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from .errors import ImageError

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_COPY_CHUNK = 8 << 20


def is_archive(path: str | os.PathLike[str]) -> bool:
    """True if `path` is a regular file that looks like a (possibly compressed) tar archive."""
    p = Path(path)
    if not p.is_file():
        return False
    try:
        with open(p, "rb") as f:
            head = f.read(512)
    except OSError:
        return False
    if head.startswith((ZSTD_MAGIC, b"\x1f\x8b", b"\xfd7zXZ\x00", b"BZh")):
        return True
    return len(head) >= 262 and head[257:262] == b"ustar"


def unpack_checkpoint(path: str | os.PathLike[str]) -> tuple[Path, Callable[[], None]]:
    """Unpack a checkpoint archive into a private temporary directory.

    Returns the directory that holds the images (`checkpoint/`, the top, or the
    single directory that has `pstree.img`) and a function that removes the
    temporary directory. On any error nothing is left behind.
    """
    path = Path(path)
    tmp = Path(tempfile.mkdtemp(prefix="crit-pageread-archive-"))
    os.chmod(tmp, 0o700)

    def cleanup() -> None:
        shutil.rmtree(tmp, ignore_errors=True)

    try:
        root = tmp / "root"
        root.mkdir(mode=0o700)
        with _open_tar(path) as tar:
            _extract_all(path, tar, root)
        return _images_dir(path, root), cleanup
    except BaseException:
        cleanup()
        raise


@contextlib.contextmanager
def _open_tar(path: Path) -> Iterator[tarfile.TarFile]:
    with open(path, "rb") as f:
        head = f.read(4)
    if head == ZSTD_MAGIC:
        with _zstd_stream(path) as stream, _tar_stream(path, stream) as tar:
            yield tar
        return
    with open(path, "rb") as raw, _tar_stream(path, raw) as tar:
        yield tar


@contextlib.contextmanager
def _tar_stream(path: Path, fileobj: IO[bytes]) -> Iterator[tarfile.TarFile]:
    try:
        tar = tarfile.open(fileobj=fileobj, mode="r|*")
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise ImageError(path, f"not a readable tar archive: {exc}") from None
    try:
        yield tar
    finally:
        tar.close()


@contextlib.contextmanager
def _zstd_stream(path: Path) -> Iterator[IO[bytes]]:
    """A decompressed stream of a .zst file: the zstandard module if installed, else `zstd -dc`."""
    try:
        import zstandard  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        zstandard = None
    if zstandard is not None:
        with open(path, "rb") as raw, zstandard.ZstdDecompressor().stream_reader(raw) as stream:
            yield stream
        return
    import subprocess

    program = shutil.which("zstd")
    if program is None:
        raise ImageError(path, "zstd archive, but neither the zstandard module nor a zstd program is available")
    proc = subprocess.Popen([program, "-dc", "--", str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    try:
        yield proc.stdout
        rest_ok = proc.wait() == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    if not rest_ok:
        err = proc.stderr.read().decode(errors="replace").strip() if proc.stderr else ""
        raise ImageError(path, f"zstd failed: {err.splitlines()[-1] if err else proc.returncode}")


def _safe_name(archive: Path, name: str) -> str:
    """The member's relative path, or an ImageError if it could land outside the directory."""
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise ImageError(archive, f"member {name!r} has an absolute path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ImageError(archive, f"member {name!r} has a '..' component")
    if any("\x00" in p for p in parts):
        raise ImageError(archive, f"member {name!r} has a NUL byte")
    return "/".join(parts)


def _inside(root: Path, target: Path) -> bool:
    real_root = os.path.realpath(root)
    real = os.path.realpath(target)
    return real == real_root or real.startswith(real_root + os.sep)


def _extract_all(archive: Path, tar: tarfile.TarFile, root: Path) -> None:
    for member in tar:
        rel = _safe_name(archive, member.name)
        if not rel:
            continue
        dest = root / rel
        if not _inside(root, dest.parent):
            raise ImageError(archive, f"member {member.name!r} would be written through a link outside the archive")
        if member.isdir():
            dest.mkdir(mode=0o700, parents=True, exist_ok=True)
        elif member.isreg():
            dest.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            _write_member(archive, tar, member, dest)
        elif member.issym():
            link = member.linkname
            if link.startswith("/"):
                raise ImageError(archive, f"symlink {member.name!r} points to the absolute path {link!r}")
            resolved = Path(os.path.normpath(dest.parent / link))
            if not (resolved == root or str(resolved).startswith(str(root) + os.sep)):
                raise ImageError(archive, f"symlink {member.name!r} -> {link!r} points outside the archive")
            dest.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.symlink(link, dest)
            if not _inside(root, dest):
                raise ImageError(archive, f"symlink {member.name!r} -> {link!r} resolves outside the archive")
        elif member.islnk():
            target = root / _safe_name(archive, member.linkname)
            if not _inside(root, target) or not target.is_file():
                raise ImageError(
                    archive, f"hard link {member.name!r} -> {member.linkname!r} has no target in the archive"
                )
            dest.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.link(target, dest, follow_symlinks=False)
        else:
            kind = "device" if (member.ischr() or member.isblk()) else "FIFO" if member.isfifo() else "special file"
            raise ImageError(archive, f"member {member.name!r} is a {kind}; checkpoint archives hold files only")


def _write_member(archive: Path, tar: tarfile.TarFile, member: tarfile.TarInfo, dest: Path) -> None:
    src: Any = tar.extractfile(member)
    if src is None:
        raise ImageError(archive, f"member {member.name!r} has no data")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(dest, flags, 0o600)
    except FileExistsError:
        raise ImageError(archive, f"member {member.name!r} appears twice") from None
    buf = bytearray(min(_COPY_CHUNK, max(member.size, 1)))
    view = memoryview(buf)
    try:
        left = member.size
        while left:
            n = src.readinto(view[: min(left, len(buf))])
            if not n:
                raise ImageError(archive, f"member {member.name!r} is truncated")
            _write_all(fd, view[:n])
            left -= n
    except (tarfile.TarError, EOFError, OSError) as exc:
        if isinstance(exc, OSError) and exc.filename:
            raise
        raise ImageError(archive, f"member {member.name!r}: {exc}") from None
    finally:
        os.close(fd)


def _write_all(fd: int, data: memoryview) -> None:
    while data:
        n = os.write(fd, data)
        data = data[n:]


def _images_dir(archive: Path, root: Path) -> Path:
    for candidate in (root / "checkpoint", root):
        if (candidate / "pstree.img").is_file() or (candidate / "inventory.img").is_file():
            return candidate
    subdirs = [d for d in root.iterdir() if d.is_dir() and not d.is_symlink()]
    if len(subdirs) == 1:
        for candidate in (subdirs[0] / "checkpoint", subdirs[0]):
            if (candidate / "pstree.img").is_file():
                return candidate
    raise ImageError(archive, "archive holds no CRIU images (no pstree.img at the top or under checkpoint/)")
