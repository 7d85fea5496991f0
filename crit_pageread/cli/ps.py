"""`ps DIR`: the process tree with each command line and environment read from memory, like `ps eww`."""

from __future__ import annotations

from .. import TYPE_CHECKING
from ..errors import CritPageReadError, ImageError, PageError
from ..hookspecs import hookimpl
from ..imagefile import load_raw_messages
from .common import add_common_options, open_from_args, print_ndjson, selected_pids

if TYPE_CHECKING:  # argparse and typing are not imported at start-up
    import argparse
    from typing import Any

    from ..images import CheckpointImages

MAX_AREA = 16 << 20  # argv or environ larger than this is a corrupt mm entry


@hookimpl
def crit_pageread_add_commands(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "ps",
        help="process tree with command lines and environments read from memory",
        description="Show the process tree; each process's argv and environment are read from its "
        "checkpointed memory (mm_arg_start..end, mm_env_start..end), like `ps eww`.",
    )
    p.add_argument("dir", help="image directory or checkpoint archive")
    p.add_argument("--no-env", action="store_true", help="leave the environment out")
    add_common_options(p)
    p.set_defaults(func=run)


def _strings(data: bytes) -> list[str]:
    parts = data.split(b"\0")
    if parts and parts[-1] == b"":
        parts.pop()
    return [p.decode("utf-8", "backslashreplace") for p in parts]


def _read(images: CheckpointImages, pid: int, start: int, end: int, strategy: str | None) -> tuple[bytes, str]:
    """The bytes of [start, end) of pid's memory, and "" or why they could not be read."""
    if end <= start:
        return b"", ""
    if end - start > MAX_AREA:
        return b"", f"range {start:#x}-{end:#x} too large"
    try:
        with images.reader(pid, strategy) as reader:
            return reader.read(start, end - start), ""
    except PageError as exc:
        return b"", str(exc)


def read_area(images: CheckpointImages, pid: int, start: int, end: int, strategy: str | None) -> tuple[list[str], str]:
    """NUL-separated strings in [start, end) of pid's memory, and "" or why they could not be read."""
    data, err = _read(images, pid, start, end, strategy)
    return _strings(data), err


def cmdline(area: bytes, overflow: bytes, page_size: int) -> tuple[bytes, bool]:
    """What the kernel's /proc/PID/cmdline gives (fs/proc/base.c, get_mm_cmdline): the bytes of argv
    [arg_start, arg_end), unless its last byte is not NUL (the process rewrote its title past argv, as
    setproctitle does): then the title from arg_start to its first NUL (included), running on into the environment
    area (`overflow`, when it starts at arg_end), at most one page. Returns (bytes, title rewritten)."""
    if not area or area[-1] == 0:
        return area, False
    title = (area + overflow)[:page_size]
    end = title.find(b"\0")
    return (title if end < 0 else title[: end + 1]), True  # with its NUL, as the kernel gives it


def _mm_areas(images: CheckpointImages, pid: int) -> tuple[int, int, int, int]:
    """mm_arg_start/end and mm_env_start/end (mm_entry fields 8-11), decoded without protobuf (start-up)."""
    return _mm_fields(images._image(f"mm-{pid}.img"))


def pages_wanted(pid: int, mm: Any) -> list[tuple[int, int]]:
    """The address ranges `process_info` reads of `pid` (from its mm image): argv, the environment, and the
    start of the environment area a rewritten title may run into (`open_images(pages_wanted=...)`)."""
    arg_start, arg_end, env_start, env_end = _mm_fields(mm)
    areas = [(start, end) for start, end in ((arg_start, arg_end), (env_start, env_end)) if 0 < end - start <= MAX_AREA]
    if env_end > env_start:  # a title runs on at most one page (64 KiB: the largest page size) past arg_start
        areas.append((env_start, min(env_end, max(env_start, arg_start + (64 << 10)))))
    return areas


def _mm_fields(path: Any) -> tuple[int, int, int, int]:
    msgs = load_raw_messages(path, "MM")
    if len(msgs) != 1:
        raise ImageError(path, f"expected one mm entry, found {len(msgs)}")
    mm = msgs[0]
    return (mm.req(8, "mm_arg_start"), mm.req(9, "mm_arg_end"), mm.req(10, "mm_env_start"),
            mm.req(11, "mm_env_end"))


def _comm(images: CheckpointImages, pid: int) -> str:
    """core_entry.tc.comm (fields 3 and 6) of the main thread, or "" if the image lacks it."""
    try:
        core = load_raw_messages(images._image(f"core-{pid}.img"), "CORE")
        tc = core[0].message(3) if len(core) == 1 else None
        comm = tc.blob(6) if tc is not None else None
    except CritPageReadError:
        return ""
    return comm.decode("utf-8", "replace") if comm is not None else ""


def process_info(images: CheckpointImages, pid: int, strategy: str | None, env: bool) -> dict[str, Any]:
    proc = images.processes[pid]
    images._check_pid(pid)
    comm = _comm(images, pid)
    if images.is_zombie(pid):  # no memory to read argv or environ from
        zinfo: dict[str, Any] = {
            "pid": pid, "ppid": proc.ppid, "pgid": proc.pgid, "sid": proc.sid, "threads": list(proc.threads),
            "comm": comm, "cmdline": "", "argv": [], "zombie": True,
        }
        if env:
            zinfo["environ"] = []
        return zinfo
    arg_start, arg_end, env_start, env_end = _mm_areas(images, pid)
    args, argv_err = _read(images, pid, arg_start, arg_end, strategy)
    # The kernel lets a title run on into the environment only when that area follows argv.
    follows = env_start == arg_end and env_end >= env_start
    overflow = b""
    if args and args[-1] != 0 and follows:
        overflow, _ = _read(images, pid, env_start, min(env_end, arg_start + images.page_size), strategy)
    line, retitled = cmdline(args, overflow, images.page_size)
    info: dict[str, Any] = {
        "pid": pid, "ppid": proc.ppid, "pgid": proc.pgid, "sid": proc.sid, "threads": list(proc.threads),
        "comm": comm, "cmdline": line.decode("utf-8", "backslashreplace"),
        "argv": _strings(line.rstrip(b"\0") + b"\0") if line.rstrip(b"\0") else [],
    }
    if retitled:
        info["retitled"] = True
    errors = [argv_err] if argv_err else []
    if env:
        environ, env_err = _read(images, pid, env_start, env_end, strategy)
        if retitled and follows:  # the part of the environment area the title took is not environment
            environ = environ[max(0, arg_start + len(line) - env_start):]
        info["environ"] = _strings(environ)
        if env_err:
            errors.append(env_err)
    if errors:
        info["errors"] = errors
    return info


def run(args: argparse.Namespace) -> int:
    # A compressed archive's pages are unpacked only where argv and the environment are (never read elsewhere),
    # and decompression stops after the images (ps shows nothing of the container files).
    with open_from_args(args, pages_wanted=pages_wanted, images_only=True) as images:
        pids = selected_pids(images, args)
        infos = {pid: process_info(images, pid, args.strategy, not args.no_env) for pid in pids}
    if args.json:
        print_ndjson(infos[p] for p in pids)
        return 0
    children: dict[int, list[int]] = {}
    roots = []
    for pid in pids:
        ppid = infos[pid]["ppid"]
        if ppid in infos:
            children.setdefault(ppid, []).append(pid)
        else:
            roots.append(pid)
    print(f"{'PID':>7} {'PPID':>7} {'PGID':>7} {'SID':>7}  COMMAND")

    def show(pid: int, depth: int) -> None:
        info = infos[pid]
        # As ps shows it: the kernel's command line, its NUL padding trimmed, NULs as spaces.
        text = info["cmdline"].rstrip("\0").replace("\0", " ")
        words = [text] if text else [f"[{info['comm']}]" + (" <defunct>" if info.get("zombie") else "")]
        if "environ" in info:
            words = words + info["environ"]
        line = " ".join(words)
        if "errors" in info:
            line += f"  (unreadable: {'; '.join(info['errors'])})"
        indent = "  " * depth + ("\\_ " if depth else "")
        print(f"{pid:>7} {info['ppid']:>7} {info['pgid']:>7} {info['sid']:>7}  {indent}{line}")
        for kid in children.get(pid, []):
            show(kid, depth + 1)

    for root in roots:
        show(root, 0)
    return 0
