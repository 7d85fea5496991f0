"""`crit-pageread push DIR --address A --port P`: send a finished dump's pages into `criu page-server`."""

from __future__ import annotations

import argparse
import time
from typing import Any

from ..hookspecs import hookimpl
from ..pageserver.protocol import PROTOCOLS, configured_protocol
from .common import add_common_options, open_from_args, print_json, selected_pids, target_keys
from .serve import _port, _seconds, add_tls_options, tls_from_args


@hookimpl
def crit_pageread_add_commands(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "push",
        help="send a dump's pages to a running `criu page-server` (OPEN2/ADD_F/CLOSE)",
        description="Moves the pages of DIR into a page server, as `criu dump --page-server` would: one OPEN2 per "
        "pagemap, ADD_F runs with their data, CLOSE. Pages in parent images are sent as data unless the server "
        "has a parent image; lazy pages are fetched through --strategy if it serves them, else sent as lazy. "
        "Copy the other images yourself: the page server writes only pagemaps and pages.",
    )
    p.add_argument("dir", help="image directory")
    p.add_argument("--address", default="127.0.0.1", help="page server address (default 127.0.0.1)")
    p.add_argument("--port", type=_port, required=True, help="page server port")
    p.add_argument("--protocol", choices=PROTOCOLS, default=None,
                   help="header layout: 4.1 (CRIU <= 4.1) or 4.2 (CRIU >= 4.2); default: [remote] protocol, else "
                   "the configured criu's version")
    p.add_argument("--timeout", type=_seconds, default=30.0, help="seconds to wait for the server (default 30)")
    add_tls_options(p)
    add_common_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..pageserver.client import ServerAddress
    from ..pageserver.push import push

    started = time.monotonic()
    with open_from_args(args) as images:
        protocol = args.protocol or configured_protocol(images.config)
        server = ServerAddress(args.address, args.port, protocol, tls_from_args(args), args.timeout, args.timeout)
        report = push(images, server, pids=selected_pids(images, args), shmem=not args.pid, strategy=args.strategy)
    report["seconds"] = round(time.monotonic() - started, 3)
    if args.json:
        server_peer = report.pop("server")
        print_json({"checkpoint": args.dir, "server": server_peer, "address": args.address, "port": args.port,
                    **{k: ([target_keys(t) for t in v] if k == "targets" else v) for k, v in report.items()}})
    else:
        print(f"{args.dir}: pushed {report['pages']} pages ({report['bytes']} bytes) of {len(report['targets'])} "
              f"pagemaps to {server.peer} in {report['seconds']} s")
    return 0
