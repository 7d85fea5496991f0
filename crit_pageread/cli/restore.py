"""`crit-pageread restore DIR`: restore with real CRIU (optionally post-copy from our page server), with hooks."""

from __future__ import annotations

import argparse
from typing import Any

from ..hookspecs import hookimpl
from .common import config_from_args, print_json


@hookimpl
def crit_pageread_add_commands(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "restore",
        help="restore a checkpoint with CRIU (detached), optionally lazily from our own page server",
        description="Run `criu restore` (or `criu swrk` through pycriu) on DIR, detached; with --lazy, start a "
        "page server on the images, `criu lazy-pages` against it and restore post-copy. Plugins see the "
        "restore through the before/after/failed and pages-served hooks. Prints the restored root's pid.",
    )
    p.add_argument("dir", help="image directory")
    p.add_argument("--method", choices=("binary", "swrk"), help="criu binary (default) or criu swrk RPC")
    p.add_argument("--lazy", action="store_true", default=None, help="post-copy restore from our page server")
    p.add_argument("--pages-dir", help="with --lazy: images the page server serves (default: DIR)")
    p.add_argument("--leave-stopped", action="store_true", default=None, help="leave the restored tasks stopped")
    p.add_argument("--action-script", action="append", default=[], help="CRIU action script (repeatable)")
    p.add_argument("--cpus", help="pin CRIU and the restored tasks to these CPUs (e.g. 0 or 0,1)")
    p.add_argument("--timeout", type=float, help="seconds CRIU may take (default 120)")
    p.add_argument("--config", help="TOML config file (else $CRIT_PAGEREAD_CONFIG, ./crit-pageread.toml)")
    p.add_argument("--json", action="store_true", help="machine-readable JSON output")
    p.add_argument("--criu-arg", action="append", default=[], metavar="ARG",
                   help="one more `criu restore` argument, passed as is (repeatable: --criu-arg=--shell-job)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..errors import ConfigError
    from ..restore.pipeline import restore

    config = config_from_args(args)
    cpus = None
    if args.cpus:
        try:
            cpus = {int(c) for c in args.cpus.split(",") if c.strip()}
        except ValueError:
            raise ConfigError(f"--cpus {args.cpus!r}: expected CPU numbers like 0 or 0,1") from None
    result = restore(args.dir, config=config, method=args.method, leave_stopped=args.leave_stopped, lazy=args.lazy,
                     pages_dir=args.pages_dir, extra_args=args.criu_arg, action_scripts=args.action_script, cpus=cpus,
                     timeout=args.timeout)
    if args.json:
        print_json(result.as_dict())
    else:
        served = f", {result.pages_served} pages served lazily" if result.lazy else ""
        print(f"restored {args.dir}: pid {result.pid} ({result.method}{served}, {result.seconds:.2f} s)")
    return 0
