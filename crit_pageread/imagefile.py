"""CRIU image file framing: magic words, size-prefixed protobuf entries, bounded.

An image is `[IMG_COMMON|IMG_SERVICE] MAGIC { u32 size, payload }` in host
byte order (inventory has no first magic). This module reads and writes that
framing with every size checked against the file, and decodes the few fields
of pagemap messages itself so that both pagemap layouts (CRIU <= 4.1 and
>= 4.2) read the same whatever pycriu is installed.
"""

from __future__ import annotations

import os
import stat
import struct

from . import TYPE_CHECKING
from .errors import ImageError

if TYPE_CHECKING:
    from collections.abc import Iterator
    from typing import Any

IMG_COMMON = 0x54564319
IMG_SERVICE = 0x55105940
MAGIC = {
    "INVENTORY": 0x58313116,
    "PSTREE": 0x50273030,
    "PAGEMAP": 0x56084025,
    "CORE": 0x55053847,
    "MM": 0x57492820,
    "IDS": 0x54432030,
    "MEMFD_INODE": 0x48453499,
    "IPCNS_SHM": 0x46283044,
    "FILES": 0x56303138,
}
SERVICE_IMAGES = {"STATS", "IRMAP_CACHE"}

# An entry larger than this is not a CRIU entry but a corrupt size prefix.
MAX_ENTRY_SIZE = 64 << 20
_U32 = struct.Struct("=I")

#: The largest image of each kind read whole (bytes); anything larger is refused, not read.
#: Generous for any real process (a pagemap entry is ~10 bytes, a VMA ~60, a file entry ~100).
MAX_IMAGE_SIZE = {
    "PAGEMAP": 512 << 20,
    "MM": 64 << 20,
    "CORE": 16 << 20,
    "PSTREE": 64 << 20,
    "FILES": 256 << 20,
    "MEMFD_INODE": 16 << 20,
    "INVENTORY": 1 << 20,
}
DEFAULT_MAX_IMAGE_SIZE = 64 << 20

_KINDS = {
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
    stat.S_IFDIR: "a directory",
    stat.S_IFLNK: "a symlink",
}


def file_kind(mode: int) -> str:
    """`a FIFO`, `a character device`, ... for a st_mode that is not a regular file."""
    return _KINDS.get(stat.S_IFMT(mode), "not a regular file")


def open_regular(path: str | os.PathLike[str], what: str = "image", *, writable: bool = False) -> int:
    """Open `path` without ever blocking (O_NONBLOCK: a FIFO does not wait for a writer) and
    return its descriptor if it is a regular file; anything else is a one-line ImageError."""
    flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise ImageError(path, f"{what} is missing") from None
    except IsADirectoryError:
        raise ImageError(path, f"is a directory, not {_article(what)}") from None
    except OSError as exc:
        raise ImageError(path, f"cannot open {what}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ImageError(path, f"is {file_kind(st.st_mode)}, not {_article(what)} (a regular file)")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _article(what: str) -> str:
    return ("an " if what[:1] in "aeiou" else "a ") + what


def read_image(path: str | os.PathLike[str], magic: str, max_size: int | None = None) -> bytes:
    """Read a whole (small) image file, bounded by its kind's limit, and check its magic.

    The file must be a regular file (a FIFO or device is refused at once) and is
    read in exactly `st_size` bytes: never more, whatever the file does.
    """
    limit = max_size if max_size is not None else MAX_IMAGE_SIZE.get(magic, DEFAULT_MAX_IMAGE_SIZE)
    bounded = getattr(path, "read_bounded", None)
    if bounded is not None:  # an archive member (`archive.Member`): a byte range of the archive
        data = bounded(limit)
        check_magic(path, data, magic)
        return data
    fd = open_regular(path)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise ImageError(path, f"{magic.lower()} image is {size} bytes, more than the {limit} allowed")
        parts = []
        done = 0
        while done < size:  # one read for a regular file; a loop only if the kernel returns less
            try:
                chunk = os.read(fd, size - done)
            except OSError as exc:
                raise ImageError(path, f"cannot read: {exc.strerror}") from None
            if not chunk:
                raise ImageError(path, f"truncated while reading: {done} of {size} bytes")
            parts.append(chunk)
            done += len(chunk)
    finally:
        os.close(fd)
    data = parts[0] if len(parts) == 1 else b"".join(parts)
    check_magic(path, data, magic)
    return data


def check_magic(path: str | os.PathLike[str], data: bytes, magic: str) -> int:
    """Check the magic words of `data`; return the offset of the first entry."""
    expected = MAGIC[magic]
    if len(data) < 4:
        raise ImageError(path, f"truncated: {len(data)} bytes, no magic")
    (first,) = _U32.unpack_from(data, 0)
    pos = 4
    if first in (IMG_COMMON, IMG_SERVICE) and magic != "INVENTORY":
        if len(data) < 8:
            raise ImageError(path, "truncated: no image magic after the common magic")
        (first,) = _U32.unpack_from(data, 4)
        pos = 8
    if first != expected:
        raise ImageError(path, f"bad magic {first:#010x}, expected {magic} ({expected:#010x})")
    return pos


def iter_entries(path: str | os.PathLike[str], data: bytes, pos: int) -> Iterator[memoryview]:
    """Yield the payload of each size-prefixed entry of `data` from `pos` on."""
    view = memoryview(data)
    end = len(data)
    while pos < end:
        if end - pos < 4:
            raise ImageError(path, f"truncated: {end - pos} stray bytes at offset {pos}")
        (size,) = _U32.unpack_from(data, pos)
        pos += 4
        if size > MAX_ENTRY_SIZE or pos + size > end:
            raise ImageError(
                path, f"truncated or corrupt: entry of {size} bytes at offset {pos - 4}, file has {end} bytes"
            )
        yield view[pos : pos + size]
        pos += size


def load_messages(path: str | os.PathLike[str], magic: str, message_class: Any) -> list[Any]:
    """Parse every entry of an image into `message_class` (a pycriu protobuf class)."""
    data = read_image(path, magic)
    out = []
    for payload in iter_entries(path, data, check_magic(path, data, magic)):
        msg = message_class()
        try:
            msg.ParseFromString(bytes(payload))
        except Exception as exc:
            raise ImageError(path, f"corrupt {magic} entry: {type(exc).__name__}: {exc}") from None
        out.append(msg)
    return out


# --- minimal protobuf: varint fields only (pagemap messages) -----------------------------


def decode_varint_fields(path: str | os.PathLike[str], payload: memoryview) -> dict[int, int]:
    """Decode a protobuf message whose fields we need are varints; skip other wire types."""
    fields: dict[int, int] = {}
    buf = bytes(payload)  # indexing bytes is cheaper than a memoryview; payloads are small
    pos = 0
    end = len(buf)
    while pos < end:
        key = buf[pos]
        pos += 1
        if key & 0x80:
            key, pos = _varint(path, buf, pos - 1)
        number, wire = key >> 3, key & 7
        if wire == 0:
            # Inline varint decode: this loop is the pagemap loader's hot path.
            value = 0
            shift = 0
            while True:
                if pos >= end:
                    raise ImageError(path, "corrupt protobuf: truncated varint")
                byte = buf[pos]
                pos += 1
                value |= (byte & 0x7F) << shift
                if byte < 0x80:
                    break
                shift += 7
                if shift >= 70:
                    raise ImageError(path, "corrupt protobuf: varint longer than 10 bytes")
            fields[number] = value
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            length, pos = _varint(path, buf, pos)
            pos += length
        else:
            raise ImageError(path, f"corrupt protobuf: wire type {wire} of field {number}")
        if pos > end:
            raise ImageError(path, "corrupt protobuf: field runs past its entry")
    return fields


class Message:
    """A decoded protobuf message: field number -> values (ints for varints, bytes otherwise).

    Enough for the few images the page-reading path needs (pstree, mm, files,
    memfd) without importing protobuf; field numbers are CRIU's .proto ones.
    """

    __slots__ = ("fields", "path")

    def __init__(self, path: str | os.PathLike[str], fields: dict[int, list[int | bytes]]) -> None:
        self.path = path
        self.fields = fields

    def req(self, number: int, name: str) -> int:
        """A required varint field; a missing one is a corrupt image."""
        values = self.fields.get(number)
        if not values or not isinstance(values[-1], int):
            raise ImageError(self.path, f"corrupt entry: required field {name} ({number}) missing")
        return values[-1]

    def opt(self, number: int, default: int = 0) -> int:
        values = self.fields.get(number)
        return values[-1] if values and isinstance(values[-1], int) else default

    def ints(self, number: int) -> list[int]:
        """A repeated varint field, packed or not."""
        out: list[int] = []
        for value in self.fields.get(number, []):
            if isinstance(value, int):
                out.append(value)
            else:  # packed
                pos = 0
                while pos < len(value):
                    item, pos = _varint(self.path, value, pos)
                    out.append(item)
        return out

    def blob(self, number: int) -> bytes | None:
        values = self.fields.get(number)
        return values[-1] if values and isinstance(values[-1], bytes) else None

    def messages(self, number: int) -> list[Message]:
        """A repeated (or optional) sub-message field."""
        return [decode_message(self.path, v) for v in self.fields.get(number, []) if isinstance(v, bytes)]

    def message(self, number: int) -> Message | None:
        found = self.messages(number)
        return found[-1] if found else None


def decode_message(path: str | os.PathLike[str], payload: bytes | memoryview) -> Message:
    """Decode any protobuf message into a `Message` (unknown wire types are errors)."""
    buf = bytes(payload)
    fields: dict[int, list[int | bytes]] = {}
    pos = 0
    end = len(buf)
    while pos < end:
        key, pos = _varint(path, buf, pos)
        number, wire = key >> 3, key & 7
        value: int | bytes
        if wire == 0:
            value, pos = _varint(path, buf, pos)
        elif wire == 2:
            length, pos = _varint(path, buf, pos)
            if pos + length > end:
                raise ImageError(path, "corrupt protobuf: field runs past its entry")
            value = buf[pos : pos + length]
            pos += length
        elif wire == 1:
            value = int.from_bytes(buf[pos : pos + 8], "little")
            pos += 8
        elif wire == 5:
            value = int.from_bytes(buf[pos : pos + 4], "little")
            pos += 4
        else:
            raise ImageError(path, f"corrupt protobuf: wire type {wire} of field {number}")
        if pos > end or number == 0:
            raise ImageError(path, "corrupt protobuf: field runs past its entry")
        fields.setdefault(number, []).append(value)
    return Message(path, fields)


def load_raw_messages(path: str | os.PathLike[str], magic: str) -> list[Message]:
    """Every entry of an image as a `Message` (no protobuf import)."""
    data = read_image(path, magic)
    return [decode_message(path, payload) for payload in iter_entries(path, data, check_magic(path, data, magic))]


def _varint(path: str | os.PathLike[str], buf: bytes | memoryview, pos: int) -> tuple[int, int]:
    result = 0
    shift = 0
    end = len(buf)
    while True:
        if pos >= end:
            raise ImageError(path, "corrupt protobuf: truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise ImageError(path, "corrupt protobuf: varint longer than 10 bytes")


def encode_varint(value: int) -> bytes:
    """Protobuf base-128 varint of a non-negative int."""
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def encode_varint_fields(fields: list[tuple[int, int]]) -> bytes:
    """Encode (field number, value) pairs as varint fields, in the given order."""
    return b"".join(encode_varint(number << 3) + encode_varint(value) for number, value in fields)


def frame(magic: str, payloads: list[bytes]) -> bytes:
    """A whole image: the magic words, then each payload with its u32 size."""
    head = b"" if magic == "INVENTORY" else _U32.pack(IMG_SERVICE if magic in SERVICE_IMAGES else IMG_COMMON)
    parts = [head, _U32.pack(MAGIC[magic])]
    for payload in payloads:
        parts.append(_U32.pack(len(payload)))
        parts.append(payload)
    return b"".join(parts)
