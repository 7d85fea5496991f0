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
    p.add_argument("--json", action="store_true", help="one JSON object per problem per line (NDJSON)")
    p.add_argument("--no-notes", action="store_true", help="leave out notes (lazy pages, stale temporary files)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    report = check_checkpoint(args.dir, notes=not args.no_notes)
    for problem in report.problems:
        if args.json:
            sys.stdout.write(json.dumps(problem.as_dict()) + "\n")
        else:
            sys.stdout.write(problem.line() + "\n")
    if not args.json:
        errors = sum(p.severity == "error" for p in report.problems)
        warnings = sum(p.severity == "warning" for p in report.problems)
        verdict = "OK" if report.ok else "FAILED"
        print(f"{verdict}: {args.dir}: {report.pids} processes, {report.pagemaps} pagemaps, {report.pages} pages; "
              f"{errors} errors, {warnings} warnings", file=sys.stderr)
    return 0 if report.ok else 1
