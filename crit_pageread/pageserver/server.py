"""The server end: answer CRIU's GET requests from an image directory.

A thread per connection (at most `max_clients`). A reply covers one run of
the request: pages present in a pages file (of the directory or a parent
image) go out with `os.sendfile` (a bounded buffer under TLS); lazy pages
(whose data is on another page server) are read through the configured
strategy into a bounded buffer first, so a failure never leaves half a reply
on the wire. Like CRIU, a reply may hold fewer pages than asked for, and a
request the server cannot serve closes the connection. A client that sends
garbage, says nothing for `idle_timeout` or asks for absurd ranges is
disconnected; other connections go on. One log line per session.

Connection handling bounds what any client can hold: a whole request (header
and reply, however slowly it drips) must finish within `request_timeout`; one
peer address has at most `max_per_peer` connections; when `max_clients` are
connected, the longest-idle session (waiting for a request for at least
`IDLE_GRACE` s) makes room, and if none is idle the newcomer is told "server
busy" (a `PS_IOV_BUSY` header, which our client reports as such) and closed.
Log lines are written whole, under one lock.
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import Config
from ..errors import CritPageReadError, RemoteError
from ..images import open_images
from ..reader import PageReader, Segment
from ..strategy import Target
from .client import COPY_CHUNK
from .protocol import (
    AUTO,
    GET_REPLY_CMD,
    HEADER_BYTES,
    OP_NAMES,
    PS_IOV_CLOSE,
    PS_IOV_FORCE_CLOSE,
    PS_IOV_GET,
    Header,
    Wire,
    check_request,
    detect_layout,
    pack_busy,
    pack_status,
)
from .tls import TlsOptions, wrap_server

#: GETs asking for more pages than this are absurd (1 GiB of 4 KiB pages).
MAX_REQUEST_PAGES = 1 << 18
#: Pages in one reply at most (CRIU's own limit); lazy replies are also bounded by COPY_CHUNK.
MAX_REPLY_PAGES = 1024
#: A session waiting this long for its next request may be closed to make room for a newcomer.
IDLE_GRACE = 1.0
#: "server busy" refusals being delivered at once at most (each lingers to let the client read it).
MAX_BUSY_REFUSALS = 32


@dataclass
class ServeOptions:
    """How `PageServer` listens and what it tolerates."""

    address: str = "127.0.0.1"
    port: int = 0
    #: "auto" (each client's layout read from its first request, as CRIU 4.1 and 4.2 clients differ), "4.1", "4.2"
    protocol: str = AUTO
    tls: TlsOptions | None = None
    idle_timeout: float = 60.0
    request_timeout: float = 30.0
    max_clients: int = 64
    max_per_peer: int = 16
    once: bool = False
    strategy: str | None = None


@dataclass
class SessionStats:
    """What one connection got: counted for the session's log line."""

    peer: str
    requests: int = 0
    pages: int = 0
    bytes: int = 0
    started: float = field(default_factory=time.monotonic)
    end: str = "closed by client"
    protocol: str | None = None

    def line(self) -> str:
        seconds = time.monotonic() - self.started
        speaks = f", protocol {self.protocol}" if self.protocol else ""
        return (
            f"serve: {self.peer}: {self.pages} pages, {self.bytes} bytes, {seconds:.3f} s, "
            f"{self.requests} requests{speaks}, {self.end}"
        )


class _Drop(Exception):
    """End a session: the client broke the protocol or the server cannot serve it."""


class PageServer:
    """Serves the pages of an image directory to page-server clients (CRIU's lazy-pages, `remote`)."""

    def __init__(
        self, images_dir: str | os.PathLike[str], config: Config, options: ServeOptions,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.options = options
        self.config = config
        self.wire = None if options.protocol == AUTO else Wire(options.protocol)
        self.images = open_images(images_dir, config)
        self.page_size = self.images.page_size
        self._log = log or (lambda line: None)
        self._log_lock = threading.Lock()
        self._lock = threading.Lock()
        #: Live sessions: thread -> (peer host, socket, state) for limits and eviction.
        self._live: dict[threading.Thread, _Live] = {}
        self._live_lock = threading.Lock()
        self._busy = threading.BoundedSemaphore(MAX_BUSY_REFUSALS)
        self._stop = threading.Event()
        self._sessions: set[threading.Thread] = set()
        self._sockets: set[socket.socket] = set()
        self._tls_ctx: ssl.SSLContext | None = options.tls.server_context() if options.tls else None
        from ..plugins import get_plugin_manager

        hook = get_plugin_manager().hook.crit_pageread_pages_served
        self._served_hook = hook if hook.get_hookimpls() else None
        self.images.processes  # noqa: B018 - a bad directory fails now, not in the first session
        try:
            self.listener = socket.create_server((options.address, options.port), backlog=64)
        except OSError as exc:
            self.images.close()
            where = f"{options.address}:{options.port}"
            raise RemoteError(f"serve: cannot listen on {where}: {exc.strerror or exc}") from None
        self.listener.settimeout(0.2)
        self.address, self.port = self.listener.getsockname()[:2]

    # --- accept loop ---------------------------------------------------------------------

    def serve_forever(self) -> None:
        """Accept connections until `shutdown()` (or after the first session with `once`)."""
        try:
            while not self._stop.is_set():
                try:
                    sock, addr = self.listener.accept()
                except TimeoutError:
                    continue
                except OSError:
                    if self._stop.is_set():
                        break
                    raise
                peer = f"{addr[0]}:{addr[1]}"
                refusal = self._admit(addr[0])
                if refusal:
                    self.log(f"serve: {peer}: refused: {refusal}")
                    self._refuse(sock)
                    continue
                live = _Live(addr[0], sock)
                thread = threading.Thread(target=self._session, args=(sock, peer, live), daemon=True,
                                          name=f"serve {peer}")
                with self._live_lock:
                    self._live[thread] = live
                self._sessions.add(thread)
                thread.start()
                if self.options.once:
                    thread.join()
                    break
        finally:
            self.close()

    def log(self, line: str) -> None:
        """One log line, never interleaved with another session's."""
        with self._log_lock:
            self._log(line)

    def _admit(self, host: str) -> str | None:
        """None if a connection from `host` may start now, else why not (after making room if it can)."""
        self._sessions = {t for t in self._sessions if t.is_alive()}
        with self._live_lock:
            live = {t: v for t, v in self._live.items() if t.is_alive() and not v.evicted}
            self._live = {t: v for t, v in self._live.items() if t.is_alive()}
            if sum(v.host == host for v in live.values()) >= self.options.max_per_peer:
                return f"{self.options.max_per_peer} connections from {host} already (server busy)"
            if len(live) < self.options.max_clients:
                return None
            now = time.monotonic()
            idle = [v for v in live.values() if v.idle_since is not None and now - v.idle_since >= IDLE_GRACE]
            if not idle:
                return f"{self.options.max_clients} clients already, none idle (server busy)"
            oldest = min(idle, key=lambda v: v.idle_since or now)
            oldest.evict()
        return None

    def _refuse(self, sock: socket.socket) -> None:
        """Tell a refused client "server busy" and close, without blocking the accept loop."""
        if not self._busy.acquire(blocking=False):
            with contextlib.suppress(OSError):
                sock.close()
            return

        def linger() -> None:
            try:
                sock.settimeout(1.0)
                with contextlib.suppress(OSError):
                    sock.sendall(pack_busy())
                    sock.shutdown(socket.SHUT_WR)
                    # Read what the client sent, so that closing does not reset the busy reply away.
                    deadline = time.monotonic() + 1.0
                    while time.monotonic() < deadline and sock.recv(65536):
                        pass
            finally:
                with contextlib.suppress(OSError):
                    sock.close()
                self._busy.release()

        threading.Thread(target=linger, daemon=True, name="serve busy").start()

    def shutdown(self) -> None:
        """Stop accepting; sessions in progress end on their own."""
        self._stop.set()

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self.listener.close()
        for sock in list(self._sockets):  # wake sessions blocked on a silent client
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for thread in list(self._sessions):
            thread.join(timeout=self.options.idle_timeout + 1)
        with self._lock:
            self.images.close()

    # --- one connection ------------------------------------------------------------------

    def _session(self, sock: socket.socket, peer: str, live: _Live | None = None) -> None:
        live = live or _Live(peer, sock)
        stats = SessionStats(peer)
        readers: dict[int, PageReader] = {}
        self._sockets.add(sock)
        raw = sock
        try:
            sock.settimeout(self.options.idle_timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._tls_ctx is not None:
                sock = wrap_server(sock, self._tls_ctx, self.options.address, bool(self.options.tls and
                                   self.options.tls.no_cn_verify), peer)
            live.sock = sock
            _Session(self, sock, peer, stats, readers, live).run()
        except _Drop as exc:
            stats.end = f"dropped: {exc}"
        except RemoteError as exc:
            stats.end = f"dropped: {exc}".replace(f"{peer}: ", "")
        except TimeoutError:
            stats.end = f"dropped: silent for {self.options.idle_timeout:g} s"
        except (OSError, ValueError) as exc:
            stats.end = f"dropped: {getattr(exc, 'strerror', None) or exc}"
            if live.evicted:
                stats.end = "dropped: idle while the server was full"
        except CritPageReadError as exc:
            stats.end = f"dropped: {exc}"
        finally:
            for reader in readers.values():
                with contextlib.suppress(CritPageReadError):
                    reader.close()
            if self._stop.is_set() and "(CLOSE)" not in stats.end:
                stats.end += " (server stopping)"
            # Logged before the socket closes: a client that sees EOF can count on the line being there.
            self.log(stats.line())
            with contextlib.suppress(OSError):
                sock.close()
            self._sockets.discard(raw)

    def plan(
        self, readers: dict[int, PageReader], pid: int, vaddr: int, nr_pages: int
    ) -> tuple[PageReader, list[Segment]]:
        """The reader of `pid` and the segments of [vaddr, +nr_pages): resolved under the lock."""
        with self._lock:
            reader = readers.get(pid)
            if reader is None:
                if pid not in self.images.processes:
                    raise _Drop(f"GET for pid {pid}, which is not in the images (pids: {self.images.pids})")
                # The pid's own pagemap, as CRIU's page server serves it (shared memory is not lazy).
                reader = self.images.reader_for(Target("pid", pid), self.options.strategy)
                readers[pid] = reader
            try:
                segments = list(reader.segments(vaddr, nr_pages * self.page_size))
            except CritPageReadError as exc:
                raise _Drop(str(exc)) from None
        return reader, segments

    def served(self, pid: int, vaddr: int, nr_pages: int, peer: str) -> None:
        if self._served_hook is not None:
            self._served_hook(images=self.images, pid=pid, vaddr=vaddr, nr_pages=nr_pages, peer=peer)


class _Live:
    """What the accept loop knows of a live session: its peer host, socket, and whether it waits idle."""

    __slots__ = ("evicted", "host", "idle_since", "sock")

    def __init__(self, host: str, sock: socket.socket) -> None:
        self.host = host
        self.sock = sock
        self.idle_since: float | None = None
        self.evicted = False

    def evict(self) -> None:
        """Close an idle session to make room (its blocked recv returns at once)."""
        self.evicted = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)


class _Session:
    """The request loop of one connection."""

    def __init__(
        self, server: PageServer, sock: socket.socket, peer: str, stats: SessionStats, readers: dict[int, PageReader],
        live: _Live | None = None,
    ) -> None:
        self.live = live or _Live(peer, sock)
        self.deadline = 0.0
        self.server = server
        self.sock = sock
        self.peer = peer
        self.stats = stats
        self.readers = readers
        self.wire = server.wire  # None: this client's layout is read from its first request
        self.tls = isinstance(sock, ssl.SSLSocket)
        self._buf: bytearray | None = None
        self.header = bytearray(self.wire.size if self.wire else HEADER_BYTES["4.1"])
        if self.wire:
            stats.protocol = self.wire.protocol

    def buffer(self) -> memoryview:
        if self._buf is None:
            self._buf = bytearray(COPY_CHUNK)
        return memoryview(self._buf)

    def remaining(self) -> float:
        """Seconds left of the current request's deadline (a `_Drop` once it has passed)."""
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise _Drop(f"request not complete within {self.server.options.request_timeout:g} s")
        return left

    def recv_header(self) -> Header | None:
        view = memoryview(self.header)
        options = self.server.options
        # Between requests: idle_timeout for the first byte. From then on the whole request, header
        # and reply, must finish by one deadline however slowly the client drips its bytes.
        self.sock.settimeout(options.idle_timeout)
        self.live.idle_since = time.monotonic()
        try:
            n = self.sock.recv_into(view)
        finally:
            self.live.idle_since = None
        if n == 0:
            if self.live.evicted:
                raise _Drop("idle while the server was full")
            return None
        self.deadline = time.monotonic() + options.request_timeout
        self._fill(view, n)
        if self.wire is None:  # the first request: its first 24 bytes tell the layout
            protocol = detect_layout(self.header, self.server.page_size, MAX_REQUEST_PAGES) or "4.1"
            self.wire = Wire(protocol)
            self.stats.protocol = protocol
            if self.wire.size > len(self.header):
                first = self.header
                self.header = bytearray(self.wire.size)
                self.header[: len(first)] = first
                self._fill(memoryview(self.header), len(first))
        return self.wire.unpack(self.header)

    def _fill(self, view: memoryview, done: int) -> int:
        """Read the rest of a header into `view` (`done` bytes are there) by the request's deadline."""
        options = self.server.options
        while done < len(view):
            left = self.remaining()
            self.sock.settimeout(min(left, options.idle_timeout))  # silence is bounded too, as between requests
            try:
                n = self.sock.recv_into(view[done:])
            except TimeoutError:
                if left > options.idle_timeout:
                    raise
                raise _Drop(f"request not complete within {options.request_timeout:g} s "
                            f"({done} of {len(view)} header bytes)") from None
            if n == 0:
                raise _Drop(f"connection closed in the middle of a header ({done} of {len(view)} bytes)")
            done += n
        return done

    def run(self) -> None:
        while True:
            header = self.recv_header()
            if header is None:
                return
            if header.cmd in (PS_IOV_CLOSE, PS_IOV_FORCE_CLOSE):
                self.close_session()
                return
            if header.op != PS_IOV_GET or header.flags:
                name = OP_NAMES.get(header.op)
                if name is None:
                    raise _Drop(f"garbage header ({header.describe()})")
                raise _Drop(f"{name}: this server only answers GET and CLOSE")
            self.stats.requests += 1
            self.get(header)

    def get(self, header: Header) -> None:
        server = self.server
        ps = server.page_size
        problem = check_request(header, ps, MAX_REQUEST_PAGES)
        if problem:
            raise _Drop(f"absurd request: {problem}")
        pid, vaddr = header.dst_id, header.vaddr
        want = min(header.nr_pages, MAX_REPLY_PAGES)
        reader, segments = server.plan(self.readers, pid, vaddr, want)
        first = segments[0]
        if first.kind == "hole":
            raise _Drop(f"GET pid {pid} at {vaddr:#x}: pages not dumped")
        run: list[Segment] = []
        for seg in segments:
            if seg.kind != first.kind:
                break
            run.append(seg)
        length = sum(seg.length for seg in run)
        if first.kind == "lazy":
            length = min(length, COPY_CHUNK)
            data = self.buffer()[:length]
            try:
                reader.readinto(vaddr, data)
            except CritPageReadError as exc:
                raise _Drop(f"GET pid {pid} at {vaddr:#x}: cannot read lazy pages: {exc}") from None
            self.send_header(pid, vaddr, length // ps)
            self.sock.sendall(data)
        else:
            self.send_header(pid, vaddr, length // ps)
            # Through the reader and its strategy: sendfile for the local ones (a TLS socket: a buffer).
            reader.send(self.sock, vaddr, length)
        self.stats.pages += length // ps
        self.stats.bytes += length
        server.served(pid, vaddr, length // ps, self.peer)

    def send_header(self, pid: int, vaddr: int, nr_pages: int) -> None:
        self.sock.settimeout(self.remaining())  # sendall's timeout bounds the whole send (Python >= 3.5)
        assert self.wire is not None
        data = self.wire.pack(GET_REPLY_CMD, nr_pages, vaddr, pid)
        if self.tls:
            self.sock.sendall(data)  # one TLS record: CRIU reads the header on its own
        else:
            self.sock.sendall(data, socket.MSG_MORE)

    def close_session(self) -> None:
        """CLOSE: answer 0, end TLS, wait for the client to close (as CRIU does)."""
        self.deadline = time.monotonic() + self.server.options.request_timeout
        self.sock.settimeout(self.remaining())
        self.sock.sendall(pack_status(0))
        sock: Any = self.sock
        if isinstance(sock, ssl.SSLSocket):
            with contextlib.suppress(ssl.SSLError, OSError, ValueError):
                sock = sock.unwrap()
        with contextlib.suppress(OSError):
            sock.recv(1)
        self.stats.end = "closed by client (CLOSE)"


def default_log(line: str) -> None:
    """A session's line on stderr in one write (the server calls it under its log lock)."""
    import sys

    sys.stderr.write(f"crit-pageread {line}\n")
    sys.stderr.flush()


def serve(images_dir: str | Path, config: Config, options: ServeOptions) -> PageServer:
    """A listening PageServer (call `serve_forever()`)."""
    return PageServer(images_dir, config, options, default_log)
