"""`crit-pageread setup-criu`: provision CRIU and a matching pycriu, as `make setup` does for a checkout."""

from __future__ import annotations

import argparse
from typing import Any

from ..hookspecs import hookimpl


@hookimpl
def crit_pageread_add_commands(subparsers: Any) -> None:
    from .. import provision

    p = subparsers.add_parser(
        "setup-criu",
        help="provision CRIU 4.1 and 4.2 with a matching pycriu under ~/.cache/crit-pageread (root)",
        description="Makes a working CRIU and its pycriu available to crit-pageread: the system's criu if it is "
        ">= 4 and passes `criu check`, else Debian trixie's CRIU 4.1 unpacked with debootstrap (installed "
        "with apt-get if missing); CRIU 4.2 from Debian sid beside it. Wrappers go to "
        "~/.cache/crit-pageread/bin (criu, criu-4.2). Quick and idempotent on rerun; safe to run concurrently. "
        "Runs the same code as `make setup` (crit_pageread/provision.py).",
    )
    provision.add_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .. import provision

    return provision.run(args)
