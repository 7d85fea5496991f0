"""Seeded mutations of a real checkpoint: each returns what it did, in one line, and which files it touched.

A mutant is a copy of the checkpoint whose files are hard links, except the
ones a mutation rewrites (each is replaced by a new file: the original is never
written). Pagemap mutations work on decoded entries (drop, swap, nr, vaddr,
flags with unknown bits, field 2 / field 5, in_parent), the others on bytes
(flip, truncate, extend, a huge size prefix) or on the file itself (a FIFO, a
symlink to /dev/zero or /dev/urandom, a directory, a garbage `parent`).
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

PAGE = 4096
MAGIC_COMMON = 0x54564319
MAGIC_PAGEMAP = 0x56084025


def clone(src: Path, dest: Path) -> None:
    """A copy of the checkpoint tree `src` made of hard links (symlinks kept as symlinks)."""
    shutil.copytree(src, dest, symlinks=True, copy_function=os.link)


def _replace(path: Path, data: bytes) -> None:
    """Write `data` as a new file at `path` (never through a hard link to the original)."""
    if os.path.lexists(path):
        path.unlink()
    path.write_bytes(data)


# --- an own protobuf codec for pagemaps (independent of crit_pageread) --------------------------


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        if value:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _encode(fields: list[tuple[int, int]]) -> bytes:
    return b"".join(_varint(n << 3) + _varint(v) for n, v in fields)


def _decode(payload: bytes) -> list[tuple[int, int]]:
    out = []
    pos = 0
    while pos < len(payload):
        key = val = shift = 0
        while True:
            b = payload[pos]
            pos += 1
            key |= (b & 0x7F) << shift
            shift += 7
            if b < 0x80:
                break
        shift = 0
        while True:
            b = payload[pos]
            pos += 1
            val |= (b & 0x7F) << shift
            shift += 7
            if b < 0x80:
                break
        out.append((key >> 3, val))
    return out


def read_pagemap(path: Path) -> tuple[list[tuple[int, int]], list[list[tuple[int, int]]]]:
    data = path.read_bytes()
    pos = 8
    payloads = []
    while pos < len(data):
        size = int.from_bytes(data[pos : pos + 4], "little")
        payloads.append(data[pos + 4 : pos + 4 + size])
        pos += 4 + size
    return _decode(payloads[0]), [_decode(p) for p in payloads[1:]]


def write_pagemap(path: Path, head: list[tuple[int, int]], entries: list[list[tuple[int, int]]]) -> None:
    out = [MAGIC_COMMON.to_bytes(4, "little"), MAGIC_PAGEMAP.to_bytes(4, "little")]
    for payload in [_encode(head)] + [_encode(e) for e in entries]:
        out.append(len(payload).to_bytes(4, "little"))
        out.append(payload)
    _replace(path, b"".join(out))


def _get(entry: list[tuple[int, int]], number: int, default: int = 0) -> int:
    values = [v for n, v in entry if n == number]
    return values[-1] if values else default


def _set(entry: list[tuple[int, int]], number: int, value: int | None) -> list[tuple[int, int]]:
    kept = [(n, v) for n, v in entry if n != number]
    return kept + ([(number, value)] if value is not None else [])


# --- the mutations --------------------------------------------------------------------------------


def mutate(top: Path, rng: random.Random) -> tuple[str, set[str]]:
    """Apply one random mutation to the checkpoint directory `top`; return (description, kinds touched).

    Kinds: "pagemap", "pages" (what the page model reads), "other" (any other image), "parent".
    """
    pagemaps = sorted(top.glob("pagemap-*.img"))
    op = rng.choices(
        ["pagemap", "pages", "bytes", "file", "parent"], weights=[50, 15, 20, 10, 5])[0]
    if op == "pagemap" and pagemaps:
        return _mutate_pagemap(rng.choice(pagemaps), rng), {"pagemap"}
    if op == "pages":
        pages = sorted(top.glob("pages-*.img"))
        if pages:
            return _mutate_bytes(rng.choice(pages), rng), {"pages"}
    if op == "parent":
        return _mutate_parent(top, rng), {"parent"}
    images = sorted(p for p in top.glob("*.img") if p.is_file() and not p.is_symlink())
    if not images:
        return "no regular image left to mutate", set()
    target = rng.choice(images)
    kind = "pagemap" if target.name.startswith("pagemap-") else "pages" if target.name.startswith("pages-") else "other"
    if op == "file":
        return _mutate_file(target, rng), {kind}
    return _mutate_bytes(target, rng), {kind}


_FLAG_VALUES = [0, 1, 2, 3, 4, 5, 6, 7, 0x8, 0x10, 0x80000000, 0x80000004, 1 << 32, (1 << 47) | 4, (1 << 33) | 2]


def _mutate_pagemap(path: Path, rng: random.Random) -> str:
    if not path.is_file() or path.is_symlink():  # a FIFO or device from an earlier mutation: never read it
        return f"{path.name}: not a regular file, left so"
    try:
        head, entries = read_pagemap(path)
    except (IndexError, OSError):  # not a decodable pagemap any more (an earlier mutation): bytes instead
        return _mutate_bytes(path, rng) if path.is_file() else f"{path.name}: left as it is"
    if not entries:
        return _mutate_bytes(path, rng)
    i = rng.randrange(len(entries))
    e = entries[i]
    what = rng.choice(["drop", "dup", "swap", "nr", "vaddr", "flags", "field5", "field2_5", "in_parent", "noflags",
                       "pages_id", "append", "zero_nr"])
    name = path.name
    if what == "drop":
        del entries[i]
        desc = f"{name}: entry {i + 1} dropped"
    elif what == "dup":
        entries.insert(i, list(e))
        desc = f"{name}: entry {i + 1} duplicated"
    elif what == "swap" and len(entries) > 1:
        j = rng.randrange(len(entries))
        entries[i], entries[j] = entries[j], entries[i]
        desc = f"{name}: entries {i + 1} and {j + 1} swapped"
    elif what == "nr":
        nr = _get(e, 5, _get(e, 2))
        new = max(1, nr + rng.choice([-3, -2, -1, 1, 2, 3, 100, 1 << 20]))
        entries[i] = _set(e, 5 if any(n == 5 for n, _ in e) else 2, new)
        desc = f"{name}: entry {i + 1} nr_pages {nr} -> {new}"
    elif what == "vaddr":
        v = _get(e, 1)
        new = max(0, v + rng.choice([-PAGE, PAGE, 1, -1, 1 << 40, 1 << 56, 1 << 60, -v]))
        entries[i] = _set(e, 1, new)
        desc = f"{name}: entry {i + 1} vaddr {v:#x} -> {new:#x}"
    elif what == "flags":
        new = rng.choice(_FLAG_VALUES)
        entries[i] = _set(e, 4, new)
        desc = f"{name}: entry {i + 1} flags {_get(e, 4, -1):#x} -> {new:#x}"
    elif what == "field5":
        nr = _get(e, 2)
        new = rng.choice([nr, nr + 1, max(1, nr - 1), 1, 0])
        entries[i] = _set(_set(e, 2, 0 if rng.random() < 0.5 else nr), 5, new)
        desc = f"{name}: entry {i + 1} field 5 = {new} (field 2 {_get(entries[i], 2)})"
    elif what == "field2_5":
        entries[i] = _set(_set(e, 2, 10), 5, 1)
        desc = f"{name}: entry {i + 1} field 2 = 10, field 5 = 1"
    elif what == "in_parent":
        entries[i] = _set(e, 3, 1)
        desc = f"{name}: entry {i + 1} in_parent = 1"
    elif what == "noflags":
        entries[i] = _set(e, 4, None)
        desc = f"{name}: entry {i + 1} flags field removed"
    elif what == "pages_id":
        new = rng.choice([0, 7, 1 << 31, _get(head, 1) + 1])
        head = _set(head, 1, new)
        desc = f"{name}: pages_id -> {new}"
    elif what == "append":
        last = entries[-1]
        end = _get(last, 1) + _get(last, 5, _get(last, 2)) * PAGE
        entries.append([(1, end + rng.choice([0, PAGE, 1 << 30])), (2, rng.choice([1, 16])),
                        (4, rng.choice([1, 2, 4, 6]))])
        desc = f"{name}: entry appended at {end:#x}"
    else:
        entries[i] = _set(_set(e, 2, 0), 5, None)
        desc = f"{name}: entry {i + 1} nr_pages 0"
    write_pagemap(path, head, entries)
    return desc


def _mutate_bytes(path: Path, rng: random.Random) -> str:
    if not path.is_file() or path.is_symlink():
        return _mutate_file(path, rng) if os.path.lexists(path) else f"{path.name}: absent, left so"
    data = bytearray(path.read_bytes())
    what = rng.choice(["flip", "flip", "truncate", "extend", "size_prefix", "zero_page"])
    if what == "flip" and data:
        n = rng.randrange(1, 9)
        for _ in range(n):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        desc = f"{path.name}: {n} bits flipped"
    elif what == "truncate" and data:
        cut = rng.randrange(len(data))
        del data[cut:]
        desc = f"{path.name}: truncated to {cut} bytes"
    elif what == "extend":
        extra = rng.choice([1, 4, PAGE, 3 * PAGE])
        data += bytes(rng.randrange(256) for _ in range(min(extra, 64))) + bytes(max(0, extra - 64))
        desc = f"{path.name}: {extra} bytes appended"
    elif what == "size_prefix" and len(data) >= 12 and not path.name.startswith("pages-"):
        data[8:12] = rng.choice([0xFFFFFFFF, 0x7FFFFFFF, len(data)]).to_bytes(4, "little")
        desc = f"{path.name}: first entry's size prefix replaced"
    elif data and len(data) >= PAGE:
        start = rng.randrange(len(data) // PAGE) * PAGE
        data[start : start + PAGE] = bytes(PAGE)
        desc = f"{path.name}: page at offset {start} zeroed"
    else:
        desc = f"{path.name}: emptied"
        data = bytearray()
    _replace(path, bytes(data))
    return desc


def _mutate_file(path: Path, rng: random.Random) -> str:
    what = rng.choice(["fifo", "zero", "urandom", "dir", "missing"])
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()
    if what == "fifo":
        os.mkfifo(path)
    elif what in ("zero", "urandom"):
        os.symlink(f"/dev/{what}", path)
    elif what == "dir":
        path.mkdir()
    return f"{path.name}: replaced by {what}"


def _mutate_parent(top: Path, rng: random.Random) -> str:
    link = top / "parent"
    what = rng.choice(["escapes", "long", "dangling", "self", "fifo", "remove"])
    if os.path.lexists(link):
        if link.is_dir() and not link.is_symlink():
            shutil.rmtree(link)
        else:
            link.unlink()
    if what == "escapes":
        link.write_bytes(b"\x1b]0;pwned\x07\x1b[2J" + bytes(rng.randrange(256) for _ in range(40)))
    elif what == "long":
        link.write_bytes(b"x" * rng.choice([300, 3000, 5000]))
    elif what == "dangling":
        os.symlink("../no-such-level", link)
    elif what == "self":
        os.symlink(".", link)
    elif what == "fifo":
        os.mkfifo(link)
    return f"parent: {what}"
