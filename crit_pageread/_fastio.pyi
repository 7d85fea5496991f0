"""Type stub of the compiled helper (crit_pageread/_fastio.c); see crit_pageread/native.py."""

from typing import Any

from _typeshed import ReadableBuffer, WriteableBuffer

VERSION: int
PIECE_BYTES: int
RECORD_BYTES: int

def plan(
    starts: ReadableBuffer, sizes: ReadableBuffer, kinds: ReadableBuffer, depths: ReadableBuffer,
    offsets: ReadableBuffer, table: list[Any], vaddr: int, end: int, holes: int, /,
) -> tuple[int, int, int, bytes, bytes, list[Any]]: ...
def pack(
    starts: ReadableBuffer, sizes: ReadableBuffer, kinds: ReadableBuffer, depths: ReadableBuffer,
    offsets: ReadableBuffer, table: list[Any], rstarts: list[int] | ReadableBuffer, rends: list[int] | ReadableBuffer,
    first: int, dest: WriteableBuffer, gap: int, /,
) -> tuple[int, int, int, int, int, bytes, bytes, list[Any]]: ...
def parse_pagemap(
    data: ReadableBuffer, pos: int, offset: int, page_size: int, limit: int, prev_end: int, layout: str, count: int,
    partial: bool = False, /,
) -> tuple[bytes, bytes, bytes, bytes, str, int, int, int] | None: ...
def resolve_count(
    vaddrs: ReadableBuffer, sizes: ReadableBuffer, flags: ReadableBuffer, offsets: ReadableBuffer, depth: int,
    parent: tuple[ReadableBuffer, ...] | None, /,
) -> int: ...
def resolve(
    vaddrs: ReadableBuffer, sizes: ReadableBuffer, flags: ReadableBuffer, offsets: ReadableBuffer, depth: int,
    parent: tuple[ReadableBuffer, ...] | None, into: tuple[WriteableBuffer, ...], /,
) -> list[tuple[int, int, int, int]]: ...
def runs(
    starts: ReadableBuffer, sizes: ReadableBuffer, kinds: ReadableBuffer, i: int, j: int, lo: int, hi: int,
    lazy_ok: bool, /,
) -> tuple[bytes, bytes, int, int]: ...
def queue_scatter(
    records: bytearray, fd: int, offset: int, dest: WriteableBuffer, dest_offsets: list[int] | None,
    lengths: list[int] | None, /,
) -> int: ...
def preadv_queue(
    items: list[bytearray | tuple[ReadableBuffer, ReadableBuffer, WriteableBuffer]], iov_max: int, max_gap: int,
    scratch: WriteableBuffer | None, trace: list[int] | None = None, limit: int = 0, /,
) -> tuple[int, int, int, int, int, int]: ...
def pread_plan(
    fds: ReadableBuffer, pieces: ReadableBuffer, dest: WriteableBuffer, iov_max: int, /,
) -> tuple[int, int, int, int, int]: ...
def copy_plan(
    windows: list[tuple[int, int, Any]], bounds: ReadableBuffer, pieces: ReadableBuffer, dest: WriteableBuffer,
    index: int, skip: int, /,
) -> tuple[int, int, int]: ...
def plan_copies(
    starts: ReadableBuffer, sizes: ReadableBuffer, kinds: ReadableBuffer, depths: ReadableBuffer,
    offsets: ReadableBuffer, table: list[Any], vaddrs: list[int] | ReadableBuffer, lengths: list[int] | ReadableBuffer,
    outs: list[int] | ReadableBuffer, /,
) -> tuple[int, int, int, bytes, list[Any], int]: ...
def write_pieces(
    fds: list[int], pieces: ReadableBuffer, fd: int, fill: int, small_run: int, stage: int, align: int,
    max_copy: int, no_copy_file_range: bool, /,
) -> tuple[int, int, int, int, int, int]: ...
def encode_entries(
    vaddrs: ReadableBuffer, counts: ReadableBuffer, flags: ReadableBuffer, layout42: bool, /,
) -> bytes: ...
