"""`crit-pageread serve DIR`: a page server that answers CRIU's GET requests from an image directory."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from typing import TYPE_CHECKING, Any

from ..hookspecs import hookimpl
from ..pageserver.protocol import AUTO, PROTOCOLS
from .common import add_common_options, config_from_args

if TYPE_CHECKING:  # imported by run(): building the parser must not pay for ssl and threads
    from ..pageserver.tls import TlsOptions


def add_tls_options(parser: argparse.ArgumentParser) -> None:
    """CRIU's --tls options (same names, same defaults)."""
    parser.add_argument("--tls", action="store_true", help="use TLS (CRIU-compatible: both sides present certificates)")
    parser.add_argument("--tls-cacert", metavar="FILE", help="trust only certificates signed by this CA")
    parser.add_argument("--tls-cert", metavar="FILE", help="our certificate (default /etc/pki/criu/cert.pem)")
    parser.add_argument("--tls-key", metavar="FILE", help="our private key (default /etc/pki/criu/private/key.pem)")
    parser.add_argument(
        "--tls-no-cn-verify", action="store_true", help="do not check the name in the peer's certificate"
    )


def tls_from_args(args: argparse.Namespace) -> TlsOptions | None:
    if not (args.tls or args.tls_cacert or args.tls_cert or args.tls_key):
        return None
    from ..pageserver.tls import TlsOptions

    return TlsOptions(args.tls_cacert, args.tls_cert, args.tls_key, args.tls_no_cn_verify)


def _seconds(text: str) -> float:
    value = float(text)
    if not 0 < value <= 86400:
        raise argparse.ArgumentTypeError(f"must be from 0 to 86400 seconds, not {text}")
    return value


def _count(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 4096:
        raise argparse.ArgumentTypeError(f"must be from 1 to 4096, not {text}")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be from 0 to 65535, not {text}")
    return value


@hookimpl
def crit_pageread_add_commands(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve an image directory's pages to CRIU's lazy-pages and to the remote strategy",
        description="A page server speaking CRIU's protocol (GET/CLOSE): `criu lazy-pages --page-server` can "
        "restore a program from it. Pages go out with sendfile; lazy pages of DIR come through --strategy "
        "(e.g. remote). Listens on loopback unless --address says otherwise; --port 0 picks a free port. "
        "Prints the address it listens on, then one line per session on stderr.",
    )
    p.add_argument("dir", help="image directory (a chain, a 4.2-layout dump, or a lazy dump with --strategy remote)")
    p.add_argument("--address", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=_port, default=0, help="TCP port (default 0: any free port, printed)")
    p.add_argument("--protocol", choices=[AUTO, *PROTOCOLS], default=AUTO,
                   help="header layout: auto (default: each client's, from its first request), 4.1 (CRIU <= 4.1, "
                   "24 bytes) or 4.2 (CRIU >= 4.2, 32 bytes)")
    p.add_argument("--idle-timeout", type=_seconds, default=60.0, help="drop a client silent this long (s)")
    p.add_argument("--request-timeout", type=_seconds, default=30.0,
                   help="a whole request (header and reply) must finish within this (s, default 30)")
    p.add_argument("--max-clients", type=_count, default=64, help="connections served at once (default 64)")
    p.add_argument("--max-per-peer", type=_count, default=16,
                   help="connections from one address at once (default 16)")
    p.add_argument("--once", action="store_true", help="exit after the first session (as CRIU's page server)")
    add_tls_options(p)
    add_common_options(p, pid=False)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..pageserver.server import PageServer, ServeOptions, default_log

    config = config_from_args(args)
    options = ServeOptions(
        address=args.address, port=args.port, protocol=args.protocol, tls=tls_from_args(args),
        idle_timeout=args.idle_timeout, request_timeout=args.request_timeout, max_clients=args.max_clients,
        max_per_peer=args.max_per_peer, once=args.once, strategy=args.strategy,
    )
    server = PageServer(args.dir, config, options, default_log)
    if args.json:
        # One line, so a supervisor can read it before the sessions start.
        print(json.dumps({"address": server.address, "port": server.port, "checkpoint": args.dir,
                          "protocol": args.protocol, "tls": options.tls is not None}))
    else:
        print(f"crit-pageread serve: listening on {server.address}:{server.port} ({args.dir})")
    sys.stdout.flush()

    def stop(signum: int, frame: Any) -> None:
        server.shutdown()

    old = signal.signal(signal.SIGTERM, stop)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        server.shutdown()
        server.close()
    finally:
        signal.signal(signal.SIGTERM, old)
    return 0
