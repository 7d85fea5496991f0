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
from .client import COPY_CHUNK
from .protocol import (
    GET_REPLY_CMD,
    OP_NAMES,
    PS_IOV_CLOSE,
    PS_IOV_FORCE_CLOSE,
    PS_IOV_GET,
    Header,
    Wire,
    check_request,
    pack_status,
)
from .tls import TlsOptions, wrap_server

#: GETs asking for more pages than this are absurd (1 GiB of 4 KiB pages).
MAX_REQUEST_PAGES = 1 << 18
#: Pages in one reply at most (CRIU's own limit); lazy replies are also bounded by COPY_CHUNK.
MAX_REPLY_PAGES = 1024


@dataclass
class ServeOptions:
    """How `PageServer` listens and what it tolerates."""

    address: str = "127.0.0.1"
    port: int = 0
    protocol: str = "4.1"
    tls: TlsOptions | None = None
    idle_timeout: float = 60.0
    max_clients: int = 64
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

    def line(self) -> str:
        seconds = time.monotonic() - self.started
        return (
            f"serve: {self.peer}: {self.pages} pages, {self.bytes} bytes, {seconds:.3f} s, "
            f"{self.requests} requests, {self.end}"
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
        self.wire = Wire(options.protocol)
        self.images = open_images(images_dir, config)
        self.page_size = self.images.page_size
        self.log = log or (lambda line: None)
        self._lock = threading.Lock()
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
                self._sessions = {t for t in self._sessions if t.is_alive()}
                if len(self._sessions) >= self.options.max_clients:
                    self.log(f"serve: {peer}: refused: {self.options.max_clients} clients already")
                    sock.close()
                    continue
                thread = threading.Thread(target=self._session, args=(sock, peer), daemon=True, name=f"serve {peer}")
                self._sessions.add(thread)
                thread.start()
                if self.options.once:
                    thread.join()
                    break
        finally:
            self.close()

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

    def _session(self, sock: socket.socket, peer: str) -> None:
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
            _Session(self, sock, peer, stats, readers).run()
        except _Drop as exc:
            stats.end = f"dropped: {exc}"
        except RemoteError as exc:
            stats.end = f"dropped: {exc}".replace(f"{peer}: ", "")
        except TimeoutError:
            stats.end = f"dropped: silent for {self.options.idle_timeout:g} s"
        except (OSError, ValueError) as exc:
            stats.end = f"dropped: {getattr(exc, 'strerror', None) or exc}"
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
                reader = self.images.reader(pid, self.options.strategy)
                readers[pid] = reader
            try:
                segments = list(reader.segments(vaddr, nr_pages * self.page_size))
            except CritPageReadError as exc:
                raise _Drop(str(exc)) from None
        return reader, segments

    def served(self, pid: int, vaddr: int, nr_pages: int, peer: str) -> None:
        if self._served_hook is not None:
            self._served_hook(images=self.images, pid=pid, vaddr=vaddr, nr_pages=nr_pages, peer=peer)


class _Session:
    """The request loop of one connection."""

    def __init__(
        self, server: PageServer, sock: socket.socket, peer: str, stats: SessionStats, readers: dict[int, PageReader]
    ) -> None:
        self.server = server
        self.sock = sock
        self.peer = peer
        self.stats = stats
        self.readers = readers
        self.wire = server.wire
        self.tls = isinstance(sock, ssl.SSLSocket)
        self._buf: bytearray | None = None
        self.header = bytearray(self.wire.size)

    def buffer(self) -> memoryview:
        if self._buf is None:
            self._buf = bytearray(COPY_CHUNK)
        return memoryview(self._buf)

    def recv_header(self) -> Header | None:
        view = memoryview(self.header)
        done = 0
        while done < len(view):
            n = self.sock.recv_into(view[done:])
            if n == 0:
                if done == 0:
                    return None
                raise _Drop(f"connection closed in the middle of a header ({done} of {len(view)} bytes)")
            done += n
        return self.wire.unpack(self.header)

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
        data = self.wire.pack(GET_REPLY_CMD, nr_pages, vaddr, pid)
        if self.tls:
            self.sock.sendall(data)  # one TLS record: CRIU reads the header on its own
        else:
            self.sock.sendall(data, socket.MSG_MORE)

    def close_session(self) -> None:
        """CLOSE: answer 0, end TLS, wait for the client to close (as CRIU does)."""
        self.sock.sendall(pack_status(0))
        sock: Any = self.sock
        if isinstance(sock, ssl.SSLSocket):
            with contextlib.suppress(ssl.SSLError, OSError, ValueError):
                sock = sock.unwrap()
        with contextlib.suppress(OSError):
            sock.recv(1)
        self.stats.end = "closed by client (CLOSE)"


def default_log(line: str) -> None:
    import sys

    print(f"crit-pageread {line}", file=sys.stderr, flush=True)


def serve(images_dir: str | Path, config: Config, options: ServeOptions) -> PageServer:
    """A listening PageServer (call `serve_forever()`)."""
    return PageServer(images_dir, config, options, default_log)
