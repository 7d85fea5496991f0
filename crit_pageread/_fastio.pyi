"""Type stub of the compiled helper (crit_pageread/_fastio.c); see crit_pageread/native.py."""

from typing import Any

from _typeshed import ReadableBuffer, WriteableBuffer

VERSION: int
PIECE_BYTES: int
RECORD_BYTES: int

def plan(
    starts: list[int], sizes: list[int], kinds: list[int], files: list[Any], offsets: list[int],
    vaddr: int, end: int, holes: int, /,
) -> tuple[int, int, int, bytes, bytes, list[Any]]: ...
def pack(
    starts: list[int], sizes: list[int], kinds: list[int], files: list[Any], offsets: list[int],
    rstarts: list[int], rends: list[int], first: int, dest: WriteableBuffer, gap: int, /,
) -> tuple[int, int, int, int, int, bytes, bytes, list[Any]]: ...
def parse_pagemap(
    data: ReadableBuffer, pos: int, offset: int, page_size: int, limit: int, prev_end: int, layout: str, count: int, /,
) -> tuple[bytes, bytes, bytes, bytes, str, int, int, int] | None: ...
def resolve(
    vaddrs: list[int], sizes: list[int], flags: list[int], offsets: list[int], pages: Any, depth: int,
    parent: tuple[list[Any], ...], out: tuple[list[Any], ...], /,
) -> list[tuple[int, int, int, int]]: ...
def queue_plan(records: bytearray, fds: ReadableBuffer, pieces: ReadableBuffer, dest: WriteableBuffer, /) -> int: ...
def queue_scatter(
    records: bytearray, fd: int, offset: int, dest: WriteableBuffer, dest_offsets: list[int] | None,
    lengths: list[int] | None, /,
) -> int: ...
def preadv_queue(
    records: bytearray, iov_max: int, max_gap: int, scratch: WriteableBuffer | None, trace: list[int] | None = None,
    limit: int = 0, /,
) -> tuple[int, int, int, int, int, int]: ...
def pread_plan(
    fds: ReadableBuffer, pieces: ReadableBuffer, dest: WriteableBuffer, iov_max: int, /,
) -> tuple[int, int, int, int, int]: ...
def copy_plan(
    windows: list[tuple[int, int, Any]], bounds: ReadableBuffer, pieces: ReadableBuffer, dest: WriteableBuffer,
    index: int, skip: int, /,
) -> tuple[int, int, int]: ...
