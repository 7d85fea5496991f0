"""crit's own commands (`decode`, `encode`, `info`, `x`, `show`), delegated to the distribution's crit.

The output is crit's, byte for byte, for the same arguments. Additions:
`decode --pages` embeds each pagemap entry's bytes, `x DIR pages` and
`x DIR mems --pages` count each VMA's pages (present, in parent, lazy, not
dumped), and `x` accepts checkpoint archives. pycriu 4.1.1 shows `nr_pages`
0 for a pagemap written by CRIU >= 4.2 (the count moved to a new field);
with it, `decode`/`show` of such a pagemap show the true count instead. With
pycriu >= 4.2 the output is crit's unchanged.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import importlib
import io
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

from ..criu_env import import_system_package
from ..errors import ConfigError, CritPageReadError, ImageError
from ..hookspecs import hookimpl
from ..imagefile import IMG_COMMON, IMG_SERVICE, MAGIC, check_magic, decode_varint_fields, iter_entries, open_regular
from ..images import CheckpointImages, container_layout, open_images
from ..output import atomic_path
from ..pagemap import PE_LAZY, PE_PARENT, PE_PRESENT
from ..strategy import Target
from .common import config_from_args

_PAGEMAP_NAME = ("pagemap-", ".img")


def crit_main() -> ModuleType:
    """crit's `__main__` module (its decode/encode/info/explore functions)."""
    import_system_package("pycriu")
    import_system_package("crit")
    return importlib.import_module("crit.__main__")


@hookimpl
def crit_pageread_add_commands(subparsers: Any) -> None:
    d = subparsers.add_parser("decode", help="convert criu image from binary type to json (crit decode)")
    d.add_argument("--pretty", action="store_true",
                   help="Multiline with indents and some numerical fields in field-specific format")
    d.add_argument("-i", "--in", help="criu image in binary format to be decoded (stdin by default)")
    d.add_argument("-o", "--out", help="where to put criu image in json format (stdout by default)")
    d.add_argument("--pages", action="store_true",
                   help="pagemap images: embed each entry's bytes, read from the pagemap's directory")
    d.add_argument("--pages-format", choices=("hex", "base64"), default="hex", help="encoding of --pages (hex)")
    d.add_argument("--strategy", help="page-read strategy for --pages")
    d.add_argument("--config", help="TOML config file")
    d.set_defaults(func=run_decode, nopl=False)

    e = subparsers.add_parser("encode", help="convert criu image from json type to binary (crit encode)")
    e.add_argument("-i", "--in", help="criu image in json format to be encoded (stdin by default)")
    e.add_argument("-o", "--out", help="where to put criu image in binary format (stdout by default)")
    e.set_defaults(func=run_encode)

    i = subparsers.add_parser("info", help="show info about image (crit info)")
    i.add_argument("in")
    i.set_defaults(func=run_info)

    x = subparsers.add_parser("x", help="explore image dir (crit x), plus `pages`")
    x.add_argument("dir", help="image directory or checkpoint archive")
    x.add_argument("what", choices=["ps", "fds", "mems", "rss", "pages"])
    x.add_argument("--pages", action="store_true", help="mems: add each VMA's page counts")
    x.add_argument("--config", help="TOML config file")
    x.add_argument("--json", action="store_true", help="one JSON object per process (NDJSON)")
    x.set_defaults(func=run_explore, strategy=None)

    s = subparsers.add_parser("show", help="convert criu image from binary to human-readable json (crit show)")
    s.add_argument("in")
    s.add_argument("--nopl", help="do not show entry payload (if exists)", action="store_true")
    s.set_defaults(func=run_decode, pretty=True, out=None, pages=False, pages_format="hex")


# --- helpers -------------------------------------------------------------------------------


@contextlib.contextmanager
def _atomic_out(opts: dict[str, Any]) -> Iterator[None]:
    """Let crit write `-o OUT` to a temporary name beside it, renamed on success (the core's
    atomic output: a device, FIFO or symlink is written through instead)."""
    out = opts.get("out")
    if not out:
        yield
        return
    with atomic_path(out) as target:
        opts["out"] = str(target)
        try:
            yield
        finally:
            opts["out"] = out


@contextlib.contextmanager
def _crit_errors(what: str, path: Any) -> Iterator[None]:
    """crit raises bare exceptions on bad input; make them one-line errors."""
    try:
        yield
    except (CritPageReadError, OSError, SystemExit, KeyboardInterrupt):
        raise
    except Exception as exc:
        raise ImageError(path or "<stdin>", f"crit {what}: {type(exc).__name__}: {exc}") from None


def _opts(args: argparse.Namespace) -> dict[str, Any]:
    return dict(vars(args))


def _regular(path: str | None) -> None:
    """crit opens its inputs itself: a FIFO would block it forever, a device feed it without end.
    Refuse anything but a regular file first, in one line (opened O_NONBLOCK: never waits)."""
    if path:
        os.close(open_regular(path))


def _regular_images(directory: str) -> None:
    """Every `*.img` of a directory crit will read is a regular file (see `_regular`)."""
    with contextlib.suppress(OSError):
        for name in sorted(os.listdir(directory)):
            if name.endswith(".img"):
                _regular(os.path.join(directory, name))


def _is_pagemap(head: bytes) -> bool:
    if len(head) < 8:
        return False
    first, second = int.from_bytes(head[:4], sys.byteorder), int.from_bytes(head[4:8], sys.byteorder)
    return first in (IMG_COMMON, IMG_SERVICE) and second == MAGIC["PAGEMAP"]


# --- decode / show -------------------------------------------------------------------------


def check_known_magic(path: str, head: bytes) -> None:
    """An image crit cannot decode (a pages file, raw data) is one line naming it, as our errors are
    (crit prints two lines without the file's name)."""
    pycriu = import_system_package("pycriu")
    magic = int.from_bytes(head[:4], "little") if len(head) >= 4 else None
    if magic in (IMG_COMMON, IMG_SERVICE) and len(head) >= 8:
        magic = int.from_bytes(head[4:8], "little")
    if magic is not None and magic in pycriu.images.magic.by_val:
        return
    what = f"unknown magic {magic:#x}" if magic is not None else f"{len(head)} bytes, no magic"
    hint = ("a pages file holds raw memory: read it with `crit-pageread read`, `extract`, or "
            "`decode -i pagemap-ID.img --pages`") if Path(path).name.startswith("pages-") else "not a CRIU image"
    raise ImageError(path, f"{what}: {hint}")


def run_decode(args: argparse.Namespace) -> int:
    opts = _opts(args)
    crit = crit_main()
    src = opts.get("in")
    _regular(src)
    if src:
        with open(src, "rb") as f:
            head = f.read(8)
        check_known_magic(src, head)
        if not _is_pagemap(head) and not opts.get("pages"):
            with _crit_errors("decode", src), _atomic_out(opts):
                crit.decode(opts)
            return 0
        data = Path(src).read_bytes()
    else:
        data = sys.stdin.buffer.read()
    if opts.get("pages") and not _is_pagemap(data[:8]):
        raise ConfigError(f"--pages: {src or '<stdin>'} is not a pagemap image")
    if opts.get("pages") and not src:
        raise ConfigError("--pages needs -i pagemap-N.img (its pages are read from the same directory)")
    pycriu = import_system_package("pycriu")
    with _crit_errors("decode", src):
        try:
            img = pycriu.images.load(io.BytesIO(data), opts["pretty"], opts["nopl"])
        except pycriu.images.MagicException:
            check_known_magic(src or "<stdin>", data[:8])
            raise
    if img.get("magic") == "PAGEMAP":
        _fix_nr_pages(src or "<stdin>", data, img)
        if opts.get("pages"):
            assert src is not None
            _embed_pages(args, Path(src), img, opts["pages_format"])
    indent = 4 if opts["pretty"] else None
    with _atomic_out(opts):
        if opts.get("out"):
            with open(opts["out"], "w") as f:
                json.dump(img, f, indent=indent)
        else:
            json.dump(img, sys.stdout, indent=indent)
            sys.stdout.write("\n")
    return 0


def _pagemap_counts(path: str, data: bytes) -> list[int]:
    """The page count of each entry, from field 2 (CRIU <= 4.1) or field 5 (CRIU >= 4.2)."""
    counts = []
    payloads = iter_entries(path, data, check_magic(path, data, "PAGEMAP"))
    next(payloads, None)
    for payload in payloads:
        f = decode_varint_fields(path, payload)
        counts.append(f[5] if 5 in f else f.get(2, 0))
    return counts


def _fix_nr_pages(path: str, data: bytes, img: dict[str, Any]) -> None:
    """With a pycriu older than 4.2 (no field 5), show a 4.2-layout entry's true count as `nr_pages`.
    pycriu >= 4.2 decodes both layouts itself (`compat_nr_pages`, `nr_pages`): nothing to change."""
    fields = import_system_package("pycriu").images.pb.pagemap_entry.DESCRIPTOR.fields_by_name
    if "compat_nr_pages" in fields:
        return
    entries = img["entries"][1:]
    for entry, nr in zip(entries, _pagemap_counts(path, data), strict=False):
        if entry.get("nr_pages", 0) != nr:
            entry["nr_pages"] = nr


def _target(path: Path) -> Target:
    name = path.name
    if name.startswith("pagemap-shmem-") and name.endswith(".img"):
        return Target("shmem", int(name[len("pagemap-shmem-") : -4]))
    if name.startswith(_PAGEMAP_NAME[0]) and name.endswith(_PAGEMAP_NAME[1]):
        try:
            return Target("pid", int(name[len("pagemap-") : -4]))
        except ValueError:
            pass
    raise ConfigError(f"--pages: {path} is not named pagemap-PID.img or pagemap-shmem-ID.img")


def _embed_pages(args: argparse.Namespace, path: Path, img: dict[str, Any], fmt: str) -> None:
    target = _target(path)
    encode = (lambda b: b.hex()) if fmt == "hex" else (lambda b: base64.b64encode(b).decode("ascii"))
    with CheckpointImages(path.parent, config_from_args(args)) as images:
        pagemap = images.pagemap_for(target)
        with images.reader_for(target, args.strategy) as reader:  # this pagemap's own pages
            for entry, pe in zip(img["entries"][1:], pagemap.entries, strict=True):
                if pe.flags & PE_PRESENT:
                    entry["pages_source"] = "present"
                elif pe.flags & PE_PARENT:
                    entry["pages_source"] = "parent"
                elif pe.flags & PE_LAZY:
                    entry["pages_source"] = "lazy"
                else:
                    entry["pages_source"] = "none"
                if pe.flags & (PE_PRESENT | PE_PARENT):
                    entry["pages"] = encode(reader.read(pe.vaddr, pe.size))
                else:
                    entry["pages"] = None


# --- encode / info -------------------------------------------------------------------------


def run_encode(args: argparse.Namespace) -> int:
    opts = _opts(args)
    _regular(opts.get("in"))
    with _crit_errors("encode", opts.get("in")), _atomic_out(opts):
        crit_main().encode(opts)
    return 0


def run_info(args: argparse.Namespace) -> int:
    opts = _opts(args)
    _regular(opts["in"])
    with open(opts["in"], "rb") as f:
        check_known_magic(opts["in"], f.read(8))
    with _crit_errors("info", opts.get("in")):
        crit_main().info(opts)
    return 0


# --- x (explore) ---------------------------------------------------------------------------


def run_explore(args: argparse.Namespace) -> int:
    from ..archive import is_archive, unpack_checkpoint

    directory = args.dir
    cleanup = None
    if args.what != "pages" and is_archive(directory):
        # crit's own explorer needs a directory: the image members only, in a private temp dir.
        unpacked, cleanup = unpack_checkpoint(directory)
        directory = str(unpacked)
    elif container_layout(directory):
        directory = str(Path(directory) / "checkpoint")
    try:
        _regular_images(directory)
        opts = _opts(args)
        opts["dir"] = directory
        if args.pages and args.what not in ("mems", "pages"):
            raise ConfigError("--pages goes with `x DIR mems` (or use `x DIR pages`)")
        if args.json:
            from .common import print_ndjson

            with _crit_errors(f"x {args.what}", directory):
                print_ndjson(_explore_json(args, opts))
        elif args.what == "pages":
            _explore_pages(args, directory)
        elif args.what == "mems" and args.pages:
            _explore_mems_pages(args, opts)
        else:
            if args.pages:
                raise ConfigError("--pages goes with `x DIR mems` (or use `x DIR pages`)")
            with _crit_errors(f"x {args.what}", args.dir):
                if args.what == "mems":
                    sys.stdout.write(_crit_mems_text(opts))
                else:
                    crit_main().explore(opts)
    finally:
        if cleanup is not None:
            cleanup()
    return 0


def _explore_json(args: argparse.Namespace, opts: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """`x DIR WHAT --json`: one object per process, with the README's keys."""
    from ..memory import Readers, area_page_counts
    from .memscan import mapping_name

    what = args.what
    with CheckpointImages(opts["dir"], config_from_args(args)) as images, Readers(images, args.strategy) as readers:
        crit = crit_main() if what == "fds" else None
        for pid in images.pids:
            proc = images.processes[pid]
            if what == "ps":
                yield {"pid": pid, "ppid": proc.ppid, "pgid": proc.pgid, "sid": proc.sid,
                       "threads": list(proc.threads), "comm": images.core(pid).tc.comm}
            elif what == "fds":
                assert crit is not None
                load = crit.pycriu.images.load
                files_id = load(crit.dinf(opts, f"ids-{pid}.img"))["entries"][0]["files_id"]
                fdinfo = load(crit.dinf(opts, f"fdinfo-{files_id}.img"))["entries"]
                fs = load(crit.dinf(opts, f"fs-{pid}.img"))["entries"][0]
                yield {"pid": pid, "fds": [{"fd": fd["fd"], "type": fd["type"], "file": crit.get_file_str(opts, fd)}
                                           for fd in fdinfo],
                       "cwd": crit.get_file_str(opts, {"type": "REG", "id": fs["cwd_id"]}),
                       "root": crit.get_file_str(opts, {"type": "REG", "id": fs["root_id"]})}
            elif what == "rss":
                pm = images.pagemap(pid)
                vmas = images.vmas(pid)
                entries = []
                for e in pm.entries:
                    covered = [{"start": v.start, "end": v.end, "mapping": v.name or f"[{v.kind}]"}
                               for v in vmas if v.start < e.end and v.end > e.vaddr]
                    entries.append({"start": e.vaddr, "end": e.end, "pages": e.nr_pages, "vmas": covered})
                yield {"pid": pid, "entries": entries}
            else:  # mems, pages
                out = []
                for vma in images.vmas(pid):
                    area = readers.area(pid, vma)
                    item: dict[str, Any] = {"start": vma.start, "end": vma.end, "perms": vma.perms,
                                            "kind": vma.kind, "mapping": mapping_name(area)}
                    if what == "pages" or args.pages:
                        item.update(area_page_counts(area))
                    out.append(item)
                yield {"pid": pid, "vmas": out}


def _counts_text(c: dict[str, int]) -> str:
    return f"present {c['present']}, parent {c['parent']}, lazy {c['lazy']}, not dumped {c['not_dumped']}"


ZOMBIE_LINE = "\tzombie: no memory"


def _crit_mems_text(opts: dict[str, Any]) -> str:
    """crit's `x DIR mems` output. crit fails on a zombie (it has no mm image), so crit is shown a pstree
    without the zombies, and each zombie is listed in pstree order as its pid and `ZOMBIE_LINE`."""
    crit: Any = crit_main()  # its dinf is swapped for the call below
    with CheckpointImages(opts["dir"]) as images:
        order = images.pids
        zombies = {pid for pid in order if images.is_zombie(pid)}
    buf = io.StringIO()
    if not zombies:
        with contextlib.redirect_stdout(buf):
            crit.explore(opts)
        return buf.getvalue()
    with crit.dinf(opts, "pstree.img") as f:
        pstree = crit.pycriu.images.load(f)
    pstree["entries"] = [p for p in pstree["entries"] if crit.get_task_id(p, "pid") not in zombies]
    living = io.BytesIO()
    crit.pycriu.images.dump(pstree, living)
    real_dinf = crit.dinf

    def dinf(o: dict[str, Any], name: str) -> Any:
        return io.BytesIO(living.getvalue()) if name == "pstree.img" else real_dinf(o, name)

    crit.dinf = dinf
    try:
        with contextlib.redirect_stdout(buf):
            crit.explore(opts)
    finally:
        crit.dinf = real_dinf
    blocks: dict[int, list[str]] = {}
    current: list[str] = []
    for line in buf.getvalue().splitlines():
        if not line.startswith("\t"):
            current = blocks.setdefault(int(line), [])
        current.append(line)
    out: list[str] = []
    for pid in order:
        out.extend(blocks.get(pid, [str(pid), ZOMBIE_LINE] if pid in zombies else []))
    return "".join(line + "\n" for line in out)


def _explore_mems_pages(args: argparse.Namespace, opts: dict[str, Any]) -> None:
    """crit's `x mems` output, each VMA line followed by its page counts."""
    from ..memory import Readers, area_page_counts

    with _crit_errors("x mems", args.dir):
        lines = _crit_mems_text(opts).splitlines()
    out = []
    pos = 0
    with open_images(args.dir, config_from_args(args)) as images, Readers(images, args.strategy) as readers:
        for pid in images.pids:
            out.extend(lines[pos : pos + 2])  # "PID", "\texe ..."
            pos += 2
            for vma in images.vmas(pid):
                counts = area_page_counts(readers.area(pid, vma))
                out.append(f"{lines[pos]}  [{_counts_text(counts)}]")
                pos += 1
    out.extend(lines[pos:])
    sys.stdout.write("".join(line + "\n" for line in out))


def _explore_pages(args: argparse.Namespace, directory: str) -> None:
    """Per pid, per VMA: pages present, in the parent image, lazy only, not dumped."""
    from ..memory import PAGE_CLASSES, Readers, area_page_counts
    from .memscan import mapping_name

    with open_images(directory, config_from_args(args)) as images, Readers(images, args.strategy) as readers:
        for pid in images.pids:
            print(f"{pid}")
            print(f"\t{'VMA':<29} {'PERM':<4} {'PRESENT':>8} {'PARENT':>8} {'LAZY':>8} {'NOTDUMP':>8}  MAPPING")
            totals = dict.fromkeys(PAGE_CLASSES, 0)
            for vma in images.vmas(pid):
                area = readers.area(pid, vma)
                c = area_page_counts(area)
                for k in totals:
                    totals[k] += c[k]
                rng = f"{vma.start:08x}-{vma.end:08x}"
                print(f"\t{rng:<29} {vma.perms:<4} {c['present']:>8} {c['parent']:>8} {c['lazy']:>8} "
                      f"{c['not_dumped']:>8}  {mapping_name(area)}")
            print(f"\t{'total':<29} {'':<4} {totals['present']:>8} {totals['parent']:>8} {totals['lazy']:>8} "
                  f"{totals['not_dumped']:>8}")
