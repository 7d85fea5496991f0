"""`read DIR --pid P ADDR [LEN]`: raw memory to stdout (or a file), or as `hexdump -C` would show it."""

from __future__ import annotations

import sys

from .. import TYPE_CHECKING
from ..errors import ConfigError, LazyPageError, NotDumpedError
from ..hookspecs import hookimpl
from ..memory import parse_addr
from .common import add_common_options, atomic_file, open_from_args, print_json, selected_pids

if TYPE_CHECKING:  # argparse and typing are not imported at start-up
    import argparse
    from collections.abc import Iterator
    from typing import IO, Any

CHUNK = 8 << 20
ADDRESS_LIMIT = 1 << 64


@hookimpl
def crit_pageread_add_commands(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "read",
        help="read memory of a pid at an address",
        description="Print LEN bytes (default: one page) of a pid's memory at ADDR (hex), raw or as a hexdump.",
    )
    p.add_argument("dir", help="image directory or checkpoint archive")
    p.add_argument("addr", help="virtual address (hex, 0x optional)")
    p.add_argument("length", nargs="?", help="bytes to read (decimal, or hex with 0x; default one page)")
    p.add_argument("--hexdump", "-x", action="store_true", help="hexdump -C style output")
    p.add_argument("-v", "--no-squeeze", action="store_true", help="with --hexdump: show repeated rows too")
    p.add_argument("--zero-fill", action="store_true", help="read pages that were not dumped as zeros")
    p.add_argument("-o", "--output", help="write to this file (atomically) instead of stdout")
    add_common_options(p, one_pid=True)
    p.set_defaults(func=run)


def _length(text: str | None, default: int) -> int:
    if text is None:
        return default
    try:
        value = int(text, 0)
    except ValueError:
        raise ConfigError(f"LEN {text!r}: not a number") from None
    if value < 0:
        raise ConfigError(f"LEN {text!r}: negative")
    return value


def hexdump_lines(chunks: Iterator[bytes], start: int, squeeze: bool = True) -> Iterator[str]:
    """`hexdump -C` rows for bytes at address `start`; identical consecutive rows fold into `*`."""
    addr = start
    prev: bytes | None = None
    starred = False
    pending = b""
    width = 8
    for chunk in chunks:
        data = pending + chunk
        full = len(data) - len(data) % 16
        for i in range(0, full, 16):
            row = data[i : i + 16]
            if squeeze and row == prev:
                if not starred:
                    yield "*"
                    starred = True
            else:
                yield _row(addr, row, width)
                starred = False
                prev = row
            addr += 16
        pending = data[full:]
    if pending:
        yield _row(addr, pending, width)
        addr += len(pending)
    yield f"{addr:0{width}x}"


def _row(addr: int, row: bytes, width: int) -> str:
    hexes = [f"{b:02x}" for b in row] + ["  "] * (16 - len(row))
    left = " ".join(hexes[:8])
    right = " ".join(hexes[8:])
    text = "".join(chr(b) if 0x20 <= b < 0x7F else "." for b in row)
    return f"{addr:0{width}x}  {left}  {right}  |{text}|"


def run(args: argparse.Namespace) -> int:
    try:
        vaddr = parse_addr(args.addr)
    except ValueError:
        raise ConfigError(f"ADDR {args.addr!r}: not a hex address") from None
    with open_from_args(args) as images:
        pids = selected_pids(images, args)
        if len(pids) != 1:
            raise ConfigError(f"read: give one --pid (pids: {images.pids})")
        pid = pids[0]
        length = _length(args.length, images.page_size)
        top = max((v.end for v in images.vmas(pid)), default=0)
        if vaddr >= top or vaddr + length > ADDRESS_LIMIT:
            if images.is_zombie(pid):
                raise ConfigError(f"--pid {pid}: a zombie, it has no memory (no mm-{pid}.img)")
            raise ConfigError(f"ADDR {vaddr:#x}: out of range (the address space of pid {pid} ends at {top:#x})")
        with images.reader(pid, args.strategy, zero_fill=args.zero_fill) as reader:
            # Check the whole range before writing anything: no partial output on a bad range.
            for seg in reader.segments(vaddr, length):
                if seg.kind == "hole" and not args.zero_fill:
                    raise NotDumpedError(reader.source, seg.vaddr, seg.end)
                if seg.kind == "lazy" and not reader.strategy.serves_lazy:
                    raise LazyPageError(reader.source, seg.vaddr, seg.end)

            def chunks() -> Iterator[bytes]:
                buf = bytearray(min(CHUNK, max(length, 1)))
                view = memoryview(buf)
                done = 0
                while done < length:
                    n = min(len(buf), length - done)
                    reader.readinto(vaddr + done, view[:n])
                    yield bytes(view[:n])
                    done += n

            doc = {"checkpoint": args.dir, "pid": pid, "vaddr": vaddr, "length": length}
            if args.json and not args.output:
                data = b"".join(chunks())
                print_json({**doc, "hex": data.hex()})
                return 0
            if args.output:
                with atomic_file(args.output, "wb") as f:
                    _write(f, chunks(), vaddr, args)
                if args.json:
                    print_json({**doc, "output": args.output})
            else:
                _write(sys.stdout.buffer if not args.hexdump else sys.stdout, chunks(), vaddr, args)
    return 0


def _write(f: IO[Any], chunks: Iterator[bytes], vaddr: int, args: argparse.Namespace) -> None:
    if args.hexdump:
        for line in hexdump_lines(chunks, vaddr, squeeze=not args.no_squeeze):
            f.write((line + "\n").encode() if "b" in getattr(f, "mode", "") else line + "\n")
    else:
        for chunk in chunks:
            f.write(chunk)
        f.flush()
