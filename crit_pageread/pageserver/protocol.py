"""CRIU's page-server wire format: the `page_server_iov` header, commands and flags.

No handshake and no magic; host byte order. CRIU <= 4.1 sends a 24-byte
header (`u32 cmd, u32 nr_pages, u64 vaddr, u64 dst_id`), CRIU >= 4.2 a
32-byte one (`u32 cmd, 4 bytes pad, u64 nr_pages, u64 vaddr, u64 dst_id`).
No field names the layout. As CRIU does, a client takes it from its CRIU's
version (`protocol_for_criu`) unless configured; our server reads it from each
client's first request (`detect_layout`: only one of the two readings of a
GET is a sane request). A mismatch shows up as an absurd header, silence or a
closed connection, which the client reports naming the protocol.

`cmd = flags << 16 | op`. For OPEN2, PARENT and ADD/ADD_F the dst_id is
`id << 8 | type` (type 1 pid, 2 shmem); for GET it is the plain pid.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from ..config import env_text
from ..errors import ConfigError, RemoteError
from ..pagemap import ADDRESS_LIMIT, PE_LAZY, PE_PARENT, PE_PRESENT

PS_IOV_ADD = 1
PS_IOV_HOLE = 2
PS_IOV_OPEN = 3
PS_IOV_OPEN2 = 4
PS_IOV_PARENT = 5
PS_IOV_ADD_F = 6
PS_IOV_GET = 7
PS_IOV_CLOSE = 0x1023
PS_IOV_FORCE_CLOSE = 0x1024
#: Not CRIU's: `crit-pageread serve` answers a connection it cannot take with this command (then closes).
PS_IOV_BUSY = 0x1B05

OP_NAMES = {
    PS_IOV_ADD: "ADD", PS_IOV_HOLE: "HOLE", PS_IOV_OPEN: "OPEN", PS_IOV_OPEN2: "OPEN2",
    PS_IOV_PARENT: "PARENT", PS_IOV_ADD_F: "ADD_F", PS_IOV_GET: "GET",
    PS_IOV_CLOSE: "CLOSE", PS_IOV_FORCE_CLOSE: "FORCE_CLOSE",
}

PS_CMD_BITS = 16
PS_CMD_MASK = (1 << PS_CMD_BITS) - 1
PS_TYPE_BITS = 8
PS_TYPE_PID = 1
PS_TYPE_SHMEM = 2

#: The reply header of a GET: ADD_F with PE_PRESENT.
GET_REPLY_CMD = PS_IOV_ADD_F | PE_PRESENT << PS_CMD_BITS
#: CRIU never sends more than this many pages in one GET reply.
CRIU_MAX_REPLY_PAGES = 1024
PROTOCOLS = ("4.1", "4.2")
DEFAULT_PROTOCOL = "4.1"
#: `serve`'s default: each client's layout read from its first request.
AUTO = "auto"
HEADER_BYTES = {"4.1": 24, "4.2": 32}

_LAYOUTS = {"4.1": struct.Struct("=IIQQ"), "4.2": struct.Struct("=I4xQQQ")}
_STATUS = struct.Struct("=i")

__all__ = [
    "PE_LAZY", "PE_PARENT", "PE_PRESENT", "Header", "Wire", "decode_dst_id", "encode_dst_id",
]


def encode_cmd(op: int, flags: int = 0) -> int:
    return (flags << PS_CMD_BITS) | op


def encode_dst_id(kind: str, id: int) -> int:
    """dst_id of OPEN2/PARENT/ADD_F: `id << 8 | type` (type 1 pid, 2 shmem)."""
    return (id << PS_TYPE_BITS) | (PS_TYPE_PID if kind == "pid" else PS_TYPE_SHMEM)


def decode_dst_id(dst_id: int) -> tuple[str, int]:
    """(kind, id) of an OPEN2/ADD_F dst_id; a type CRIU never sends is a RemoteError."""
    kind = dst_id & ((1 << PS_TYPE_BITS) - 1)
    if kind == PS_TYPE_PID:
        return "pid", dst_id >> PS_TYPE_BITS
    if kind == PS_TYPE_SHMEM:
        return "shmem", dst_id >> PS_TYPE_BITS
    raise RemoteError(f"page-server: unknown dst_id type {kind} in {dst_id:#x}")


@dataclass(frozen=True, slots=True)
class Header:
    """One `page_server_iov`."""

    cmd: int
    nr_pages: int
    vaddr: int
    dst_id: int

    @property
    def op(self) -> int:
        return self.cmd & PS_CMD_MASK

    @property
    def flags(self) -> int:
        return self.cmd >> PS_CMD_BITS

    def describe(self) -> str:
        name = OP_NAMES.get(self.op, f"op {self.op:#x}")
        return f"{name} flags {self.flags:#x} nr_pages {self.nr_pages} vaddr {self.vaddr:#x} dst_id {self.dst_id:#x}"


class Wire:
    """Packs and unpacks headers in one layout ("4.1": 24 bytes, "4.2": 32 bytes)."""

    def __init__(self, protocol: str = DEFAULT_PROTOCOL) -> None:
        if protocol not in _LAYOUTS:
            raise ValueError(f"unknown page-server protocol {protocol!r} (known: {', '.join(PROTOCOLS)})")
        self.protocol = protocol
        self._struct = _LAYOUTS[protocol]
        self.size = self._struct.size
        self.max_nr_pages = 0xFFFFFFFF if protocol == "4.1" else (1 << 64) - 1

    def pack(self, cmd: int, nr_pages: int = 0, vaddr: int = 0, dst_id: int = 0) -> bytes:
        return self._struct.pack(cmd, nr_pages, vaddr, dst_id)

    def pack_get(self, pid: int, vaddr: int, nr_pages: int) -> bytes:
        return self._struct.pack(PS_IOV_GET, nr_pages, vaddr, pid)

    def unpack(self, data: bytes | bytearray | memoryview) -> Header:
        cmd, nr, vaddr, dst = self._struct.unpack(data)
        return Header(cmd, nr, vaddr, dst)


def pack_busy() -> bytes:
    """The "server busy" answer: a header of either layout (32 bytes, the longer) whose cmd is PS_IOV_BUSY."""
    return struct.pack("=I28x", PS_IOV_BUSY)


def is_busy(data: bytes | bytearray | memoryview) -> bool:
    """Whether the first bytes a client got are the "server busy" answer."""
    return len(data) >= 4 and struct.unpack_from("=I", data)[0] == PS_IOV_BUSY


def pack_status(status: int) -> bytes:
    """The int32 CRIU answers CLOSE (0) and PARENT (has a parent) with."""
    return _STATUS.pack(status)


def unpack_status(data: bytes | bytearray | memoryview) -> int:
    return int(_STATUS.unpack(data)[0])


STATUS_SIZE = _STATUS.size


def protocol_for_criu(criu: str | None = None) -> str:
    """The header layout CRIU `criu` (default: the one in use) speaks: "4.2" from CRIU 4.2 on, else "4.1"."""
    from ..criu_env import criu_line

    try:
        line = criu_line(criu)
    except Exception:  # no criu at all: the older, more common layout
        line = None
    if not line:
        return DEFAULT_PROTOCOL
    major, _, minor = line.partition(".")
    try:
        return "4.2" if (int(major), int(minor or 0)) >= (4, 2) else "4.1"
    except ValueError:
        return DEFAULT_PROTOCOL


def configured_protocol(config: Any) -> str:
    """[remote] protocol if set (validated), else the layout of the configured criu (`config.criu`)."""
    value = env_text(config.table("remote").get("protocol"))
    if value is None:
        return protocol_for_criu(config.criu)
    if value not in PROTOCOLS:
        raise ConfigError(f"[remote]: key 'protocol' must be one of {', '.join(PROTOCOLS)}, not {value!r}")
    return str(value)


def mismatch_hint(protocol: str) -> str:
    """What a reply that makes no sense probably means, in a few words."""
    other = "4.2" if protocol == "4.1" else "4.1"
    return (f" (we speak the CRIU {protocol} page-server protocol, {HEADER_BYTES[protocol]}-byte headers: "
            f"if the server is CRIU {other}, set [remote] protocol = \"{other}\" or --protocol {other})")


def _sane_get(nr_pages: int, vaddr: int, page_size: int, max_pages: int) -> bool:
    return 0 < nr_pages <= max_pages and vaddr % page_size == 0 and vaddr + nr_pages * page_size <= ADDRESS_LIMIT


def detect_layout(first24: bytes | bytearray | memoryview, page_size: int, max_pages: int) -> str | None:
    """The layout of a client's first request from its first 24 bytes, or None if it is no GET/CLOSE.

    A GET read in the 4.1 layout has (u32 nr_pages, u64 vaddr) at offsets 4 and 8; in the 4.2
    layout (u64 nr_pages, u64 vaddr) at 8 and 16, so each reading of the other layout's GET has
    a page count or an address that makes no sense. CLOSE (all zero after cmd) reads the same in
    both: "4.1" (the server then answers, and reads the rest of a 4.2 header as the goodbye).
    """
    cmd, nr41, vaddr41, _ = _LAYOUTS["4.1"].unpack_from(first24)
    if cmd in (PS_IOV_CLOSE, PS_IOV_FORCE_CLOSE):
        return "4.1"
    if cmd != PS_IOV_GET:
        return None
    nr42, vaddr42 = struct.unpack_from("=QQ", first24, 8)
    ok41 = _sane_get(nr41, vaddr41, page_size, max_pages)
    ok42 = _sane_get(nr42, vaddr42, page_size, max_pages)
    if ok42 and not ok41:
        return "4.2"
    if ok41 and not ok42:
        return "4.1"
    # Neither (an absurd request either way: the 4.1 reading names the problem) or both (cannot be
    # told apart: a 4.1 GET whose address is a small multiple of the page size, never seen).
    return "4.1"


def check_reply(header: Header, pid: int, vaddr: int, nr_pages: int, protocol: str, peer: str) -> None:
    """Raise RemoteError unless `header` answers GET(pid, vaddr, nr_pages) as CRIU does."""
    hint = mismatch_hint(protocol)
    if header.cmd != GET_REPLY_CMD:
        raise RemoteError(f"{peer}: bad reply header to GET pid {pid} at {vaddr:#x}: {header.describe()}{hint}")
    if header.vaddr != vaddr or header.dst_id != pid:
        raise RemoteError(
            f"{peer}: reply for pid {header.dst_id} at {header.vaddr:#x}, asked for pid {pid} at {vaddr:#x}{hint}"
        )
    if not 0 < header.nr_pages <= nr_pages:
        raise RemoteError(
            f"{peer}: reply of {header.nr_pages} pages to GET of {nr_pages} pages at {vaddr:#x}{hint}"
        )


def check_request(header: Header, page_size: int, max_pages: int) -> str | None:
    """Why a GET header is absurd (unaligned, empty, too large, past the address space), or None."""
    if header.nr_pages == 0:
        return "GET of 0 pages"
    if header.vaddr % page_size:
        return f"GET at unaligned address {header.vaddr:#x}"
    if header.nr_pages > max_pages:
        return f"GET of {header.nr_pages} pages (at most {max_pages})"
    if header.vaddr + header.nr_pages * page_size > ADDRESS_LIMIT:
        return f"GET past the end of the address space ({header.nr_pages} pages at {header.vaddr:#x})"
    return None
