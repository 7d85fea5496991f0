"""`crit-pageread coredump DIR -o OUTPUT`: one ELF core per process, for gdb."""

from __future__ import annotations

import argparse
from typing import Any

from ..hookspecs import hookimpl
from .common import add_common_options, open_from_args, print_ndjson, selected_pids
from .progress import Progress


@hookimpl
def crit_pageread_add_commands(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "coredump",
        help="write an ELF core per process (gdb PROGRAM OUTPUT/core.PID)",
        description="Write OUTPUT/core.<pid> for each process: every dumped page (parents, shmem, memfd "
        "included), never-dumped file pages from the mapped file when it is unchanged, registers of every "
        "thread. Ranges left as zeros for want of data are listed. x86_64 only.",
    )
    p.add_argument("dir", help="image directory (or archive)")
    p.add_argument("-o", "--output", required=True, help="output directory (created if missing)")
    p.add_argument("--root", metavar="DIR", help="the container's root filesystem: mapped files are looked up "
                   "there (default: on the host; either way used only when size and build-id match)")
    add_common_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..restore.coredump import coredump

    bar = Progress("coredump")
    with open_from_args(args) as images:
        pids = selected_pids(images, args) if args.pid else None
        reports = coredump(images, args.output, pids, strategy=args.strategy,
                           progress=bar.callback if bar.enabled else None, root=args.root)
    bar.finish()
    if args.json:
        print_ndjson(_core_json(r.as_dict()) for r in reports)
        return 0
    for r in reports:
        print(f"{r.path}: {r.threads} threads, {r.loads} loads, {r.dumped_bytes >> 10} KiB dumped pages, "
              f"{r.file_bytes >> 10} KiB from mapped files")
        for m in r.missing:
            print(f"  zeros {m['start']:#x}-{m['end']:#x}: {m['reason']}")
    return 0


def _core_json(report: dict[str, Any]) -> dict[str, Any]:
    """A core's report with the convention's keys (`output` for the file written)."""
    out = {"pid": report.pop("pid"), "output": report.pop("path")}
    out.update(report)
    return out
