"""`remote`: pages from a page server (CRIU's, or `crit-pageread serve`) with pipelined GETs.

Lazy ranges (`ReadRequest.pages is None`) are queued and fetched at `sync()`
(or at once by `read`) with at most `max_in_flight` GETs outstanding, each
reply received straight into the caller's buffer. Ranges present in the local
images go to the `local` strategy (default `preadv`); with `local = "none"`
every range of process memory is fetched from the server (shared memory, which
CRIU keeps in the images and no page server serves, is read from its pages file). After a failure every destination of
the failed batch is zeroed: no caller buffer keeps half a reply.

Config `[remote]`: address, port, protocol ("4.1"|"4.2"; default: the
layout of the configured criu's version), tls, tls_cacert,
tls_cert, tls_key, tls_no_cn_verify, connect_timeout, timeout, max_in_flight,
local.
"""

from __future__ import annotations

from .. import TYPE_CHECKING
from ..config import Config, env_text
from ..errors import ConfigError, RemoteError
from ..hookspecs import hookimpl
from ..strategy import CopyRequest, ReadRequest, Strategy, StrategyInfo, read_fully

if TYPE_CHECKING:  # the client (ssl, sockets) is imported when a remote strategy is made, not at start-up
    from typing import Any

    from ..pageserver.client import Connection, ServerAddress
    from ..plugins import StrategyContext
    from ..strategy import Sink

KEYS = (
    "address", "port", "protocol", "tls", "tls_cacert", "tls_cert", "tls_key", "tls_no_cn_verify",
    "connect_timeout", "timeout", "max_in_flight", "local",
)
DEFAULTS: dict[str, Any] = {
    "address": "127.0.0.1", "tls": False, "tls_no_cn_verify": False,
    "connect_timeout": 5.0, "timeout": 30.0, "max_in_flight": 16, "local": "preadv",
}
#: Remote requests queued before `submit` syncs by itself.
MAX_QUEUE = 65536


class RemoteStrategy(Strategy):
    """Fetches lazy (or, with no local strategy, all) ranges from a page server."""

    name = "remote"
    serves_lazy = True

    def __init__(self, server: ServerAddress, local: Strategy | None = None, max_in_flight: int = 16) -> None:
        self.server = server
        self.local = local
        self.max_in_flight = max_in_flight
        self._queue: list[ReadRequest] = []
        self._conn: Connection | None = None
        #: GET requests sent and bytes received so far (for benchmarks and tests).
        self.gets = 0
        self.bytes = 0

    @property
    def pending(self) -> int:
        return len(self._queue) + (self.local.pending if self.local is not None else 0)

    def _check(self, request: ReadRequest) -> None:
        if request.target.kind != "pid":
            raise RemoteError(
                f"{self.server.peer}: page servers serve process memory only, not {request.target}"
            )

    def _shared_local(self, request: ReadRequest) -> bool:
        """Shared memory is never on a page server (CRIU dumps it into the images): with no local
        strategy, read it from its pages file here. True if done."""
        if request.pages is None or request.target.kind != "shmem":
            return False
        read_fully(request.pages.fd, request.dest, request.offset, request.pages.location)
        return True

    def read(self, request: ReadRequest) -> None:
        if request.pages is not None and self.local is not None:
            self.local.read(request)
            return
        if self._shared_local(request):
            return
        self._check(request)
        self.sync()
        self._fetch([request])

    def submit(self, request: ReadRequest) -> None:
        if request.pages is not None and self.local is not None:
            self.local.submit(request)
            return
        if self._shared_local(request):
            return
        self._check(request)
        if len(request.dest):
            self._queue.append(request)
        if len(self._queue) >= MAX_QUEUE:
            self.sync()

    def sync(self) -> None:
        if self.local is not None:
            self.local.sync()
        queue, self._queue = self._queue, []
        if queue:
            self._fetch(queue)

    def _fetch(self, requests: list[ReadRequest]) -> None:
        """GET every request's pages; unaligned edges go through a one-page bounce buffer."""
        from ..pageserver.client import PAGE_SIZE as ps
        mask = ps - 1
        items: list[tuple[int, int, memoryview]] = []
        bounces: list[tuple[memoryview, bytearray, int]] = []
        for req in requests:
            pid = req.target.id
            dest = req.dest
            start = req.vaddr
            end = start + len(dest)
            pos = start
            if pos & mask:  # head: part of one page
                bounce = bytearray(ps)
                page = pos & ~mask
                n = min(end, page + ps) - pos
                items.append((pid, page, memoryview(bounce)))
                bounces.append((dest[: n], bounce, pos - page))
                pos += n
            body_end = end & ~mask
            if body_end > pos:
                items.append((pid, pos, dest[pos - start : body_end - start]))
                pos = body_end
            if pos < end:  # tail: the start of one page
                bounce = bytearray(ps)
                items.append((pid, pos, memoryview(bounce)))
                bounces.append((dest[pos - start :], bounce, 0))
        try:
            conn = self._connection()
            from ..pageserver.protocol import CRIU_MAX_REPLY_PAGES

            self.gets += conn.get_into(items, max_in_flight=self.max_in_flight, max_pages=CRIU_MAX_REPLY_PAGES)
        except BaseException:
            self._conn = None
            for req in requests:
                _zero(req.dest)
            raise
        for view, bounce, offset in bounces:
            view[:] = bounce[offset : offset + len(view)]
        self.bytes += sum(len(req.dest) for req in requests)

    def _connection(self) -> Connection:
        conn = self._conn
        if conn is None or conn._sock is None:
            from ..pageserver.client import Connection

            conn = self._conn = Connection(self.server)
        return conn

    def write_to(self, requests: list[CopyRequest], fd: int, fill: int = 0) -> None:
        """Present ranges through the local strategy's `write_to` (kernel copies), the rest fetched."""
        if self.local is None:
            super().write_to(requests, fd)
            return
        local = [r for r in requests if r.pages is not None]
        if local:
            # Zeros it may write in gaps are overwritten by the lazy pages fetched after.
            self.local.write_to(local, fd, fill)
        if len(local) < len(requests):
            super().write_to([r for r in requests if r.pages is None], fd)

    def send(self, requests: list[CopyRequest], out: Sink) -> None:
        """Runs of present ranges through the local strategy's `send`, lazy ones fetched, in order."""
        if self.local is None:
            super().send(requests, out)
            return
        i = 0
        while i < len(requests):
            j = i
            lazy = requests[i].pages is None
            while j < len(requests) and (requests[j].pages is None) == lazy:
                j += 1
            if lazy:
                super().send(requests[i:j], out)
            else:
                self.local.send(requests[i:j], out)
            i = j

    def close(self) -> None:
        self._queue = []
        if self.local is not None:
            self.local.close()
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


def _zero(view: memoryview) -> None:
    view[:] = bytes(len(view))


def _number(table: dict[str, Any], key: str, low: float, high: float, integer: bool) -> Any:
    value = table.get(key, DEFAULTS.get(key))
    ok = not isinstance(value, bool) and isinstance(value, int if integer else (int, float))
    if not ok or not low <= value <= high:  # type: ignore[operator]
        kind = "an integer" if integer else "a number"
        raise ConfigError(f"[remote]: key {key!r} must be {kind} from {low:g} to {high:g}, not {value!r}")
    return value


def _text(table: dict[str, Any], key: str) -> str | None:
    value = env_text(table.get(key, DEFAULTS.get(key)))
    if value is not None and (not isinstance(value, str) or not value):
        raise ConfigError(f"[remote]: key {key!r} must be a non-empty string, not {value!r}")
    return value


def _flag(table: dict[str, Any], key: str) -> bool:
    value = table.get(key, DEFAULTS.get(key))
    if not isinstance(value, bool):
        raise ConfigError(f"[remote]: key {key!r} must be true or false, not {value!r}")
    return value


def parse_options(table: dict[str, Any], criu: str | None = None) -> tuple[ServerAddress, str, int]:
    """Validate a `[remote]` table: (server, local strategy name, max_in_flight); errors name the key.
    Without `protocol`, the layout is that of `criu` (the configured criu; default: the one in use)."""
    from ..pageserver.client import ServerAddress
    from ..pageserver.protocol import PROTOCOLS, protocol_for_criu
    from ..pageserver.tls import TlsOptions

    unknown = set(table) - set(KEYS)
    if unknown:
        raise ConfigError(f"[remote]: unknown key {sorted(unknown)[0]!r} (known: {', '.join(KEYS)})")
    if "port" not in table:
        raise ConfigError("[remote]: key 'port' is required (the page server's TCP port)")
    address = _text(table, "address") or "127.0.0.1"
    port = _number(table, "port", 1, 65535, True)
    protocol = env_text(table.get("protocol"))
    if protocol is None:
        protocol = protocol_for_criu(criu)
    elif protocol not in PROTOCOLS:
        raise ConfigError(f"[remote]: key 'protocol' must be one of {', '.join(PROTOCOLS)}, not {protocol!r}")
    files = {k: _text(table, k) for k in ("tls_cacert", "tls_cert", "tls_key")}
    no_cn = _flag(table, "tls_no_cn_verify")
    tls = None
    if _flag(table, "tls") or any(files.values()):
        tls = TlsOptions(files["tls_cacert"], files["tls_cert"], files["tls_key"], no_cn)
    server = ServerAddress(
        address, port, protocol, tls,
        float(_number(table, "connect_timeout", 0.001, 3600, False)),
        float(_number(table, "timeout", 0.001, 86400, False)),
    )
    local = _text(table, "local") or "preadv"
    if local == "remote":
        raise ConfigError("[remote]: key 'local' cannot be 'remote' (use 'none' to fetch every page remotely)")
    return server, local, _number(table, "max_in_flight", 1, 4096, True)


def _factory(context: StrategyContext) -> Strategy:
    from ..plugins import strategies

    server, local_name, max_in_flight = parse_options(context.table, context.config.criu)
    local: Strategy | None = None
    if local_name != "none":
        if local_name not in strategies():
            raise ConfigError(
                f"[remote]: key 'local' names unknown strategy {local_name!r} (known: {', '.join(strategies())}, none)"
            )
        local = context.make_strategy(local_name)  # built from the same config as this one
    if server.tls is not None:
        server.tls.client_context()  # bad certificate files are a ConfigError now, not at the first read
    return RemoteStrategy(server, local, max_in_flight)


@hookimpl
def crit_pageread_configure(config: Config) -> None:
    table = config.table("remote")
    if table or config.strategy == "remote":
        parse_options(table, config.criu)


@hookimpl
def crit_pageread_strategies() -> list[StrategyInfo]:
    return [StrategyInfo("remote", _factory, "pages from a CRIU page server (lazy pages; pipelined GETs)")]
