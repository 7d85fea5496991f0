"""`check DIR|ARCHIVE`: validate a checkpoint without restoring it; one line per problem, exit 0/1."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ..check import check_checkpoint
from ..hookspecs import hookimpl


@hookimpl
def crit_pageread_add_commands(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "check",
        help="validate a checkpoint without restoring it (images, chain, sizes, flags, VMAs, shmem, lazy)",
        description="Check that every image parses, the parent chain is complete, every pages file has exactly the "
        "size its pagemap accounts for, flags are CRIU's, pagemap entries lie inside the VMAs of mm and shared-memory "
        "pagemaps inside their mappings; list lazy pages and temporary files of killed runs. One line per problem "
        "(error, warning or note); exit 0 when there is no error or warning, else 1.",
    )
    p.add_argument("dir", help="image directory or checkpoint archive")
    p.add_argument("--json", action="store_true",
                   help="one JSON object per problem per line, then a summary object (NDJSON)")
    p.add_argument("--no-notes", action="store_true", help="leave out notes (lazy pages, stale temporary files)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    report = check_checkpoint(args.dir, notes=not args.no_notes)
    count = {s: sum(p.severity == s for p in report.problems) for s in ("error", "warning", "note")}
    for problem in report.problems:
        if args.json:
            sys.stdout.write(json.dumps({"checkpoint": args.dir, **problem.as_dict()}) + "\n")
        else:
            sys.stdout.write(problem.line() + "\n")
    if args.json:  # NDJSON: one object per problem, then one summary object
        sys.stdout.write(json.dumps({"checkpoint": args.dir, "ok": report.ok, "errors": count["error"],
                                     "warnings": count["warning"], "notes": count["note"], "processes": report.pids,
                                     "pagemaps": report.pagemaps, "pages": report.pages}) + "\n")
    else:
        verdict = "OK" if report.ok else "FAILED"
        print(f"{verdict}: {args.dir}: {report.pids} processes, {report.pagemaps} pagemaps, {report.pages} pages; "
              f"{count['error']} errors, {count['warning']} warnings", file=sys.stderr)
    return 0 if report.ok else 1
