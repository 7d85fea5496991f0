"""`crit-pageread squash DIR OUT`: a self-contained image directory from a chain or a lazy dump."""

from __future__ import annotations

import argparse
from typing import Any

from ..hookspecs import hookimpl
from ..pagemap import LAYOUTS
from .common import add_common_options, config_from_args, print_json, target_keys
from .progress import Progress


@hookimpl
def crit_pageread_add_commands(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "squash",
        help="write a self-contained image directory (parent pages resolved, lazy pages fetched)",
        description="Resolve every PE_PARENT page through the chain and fetch every lazy page through the "
        "strategy (--strategy remote), writing OUT so that `criu restore -D OUT` needs no parent and no page "
        "server. OUT is complete or absent.",
    )
    p.add_argument("dir", help="image directory (the newest of a chain, or a lazy dump) or checkpoint archive")
    p.add_argument("out", help="output directory (must not exist)")
    p.add_argument("--verify", action="store_true", help="re-read OUT and compare every page with the source")
    p.add_argument("--layout", choices=LAYOUTS, help="pagemap layout to write (default: the input's)")
    add_common_options(p, pid=False)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..restore.squash import squash

    config = config_from_args(args)
    bar = Progress("squash")
    report = squash(args.dir, args.out, config=config, strategy=args.strategy, layout=args.layout,
                    verify=args.verify, progress=bar.callback if bar.enabled else None)
    bar.finish()
    if args.json:
        doc = report.as_dict()
        doc["checkpoint"] = doc.pop("source")
        doc["output"] = doc.pop("output", args.out)
        doc["targets"] = [target_keys(t) for t in doc["targets"]]
        print_json({"checkpoint": doc.pop("checkpoint"), "output": doc.pop("output"), **doc})
        return 0
    print(f"{args.out}: {report.pages} pages in {len(report.targets)} pagemaps "
          f"({report.parent_pages} from parents, {report.lazy_pages} lazy fetched), "
          f"{len(report.copied)} other images copied{', verified' if report.verified else ''}")
    return 0
