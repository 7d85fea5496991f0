"""`plugins`: the loaded plugins, the hooks each implements and the strategies each contributes."""

from __future__ import annotations

import argparse
from typing import Any

from ..hookspecs import hookimpl
from ..plugins import describe_plugins, strategies
from .common import print_ndjson


@hookimpl
def crit_pageread_add_commands(subparsers: Any) -> None:
    p = subparsers.add_parser("plugins", help="list loaded plugins, their hooks and strategies")
    p.add_argument("--json", action="store_true", help="machine-readable JSON output")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    plugins = describe_plugins()
    if args.json:
        print_ndjson(plugins)
        return 0
    known = strategies()
    for plugin in plugins:
        print(plugin["name"])
        print(f"    hooks: {', '.join(plugin['hooks']) or '-'}")
        for name in plugin["strategies"]:
            desc = known[name].description
            print(f"    strategy {name}" + (f": {desc}" if desc else ""))
    return 0
