"""The client end of CRIU's page-server protocol: pipelined GETs, and OPEN2/ADD_F/CLOSE for pushing.

Every socket operation has a timeout; every failure (timeout, closed
connection, a header that does not answer what was asked) is a RemoteError
naming the server, and leaves the connection closed.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import ssl
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, NoReturn

from ..errors import RemoteError
from .protocol import (
    CRIU_MAX_REPLY_PAGES,
    DEFAULT_PROTOCOL,
    PS_IOV_ADD_F,
    PS_IOV_CLOSE,
    PS_IOV_OPEN2,
    PS_IOV_PARENT,
    STATUS_SIZE,
    Wire,
    check_reply,
    encode_cmd,
    encode_dst_id,
    is_busy,
    mismatch_hint,
    unpack_status,
)
from .tls import TlsOptions, wrap_client

if TYPE_CHECKING:
    from ..reader import PageReader

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
NO_REPLY_HINT = (
    " (a page server closes the connection or stays silent when asked for pages it cannot serve,"
    " or when the protocol does not match: check [remote] protocol)"
)
BUSY = "{peer}: server busy (it serves too many clients already); try again later"
#: TLS and fallback copies go through a buffer of at most this size (per connection).
COPY_CHUNK = 1 << 20
#: Seconds to wait for the first answer on a connection before calling it a protocol mismatch: a
#: CRIU >= 4.2 server waits for the 8 bytes a 4.1 header lacks, and a page server answers at once.
FIRST_REPLY_WAIT = 2.0


@dataclass(frozen=True)
class ServerAddress:
    """Where a page server listens and how to talk to it."""

    address: str = "127.0.0.1"
    port: int = 0
    protocol: str = DEFAULT_PROTOCOL
    tls: TlsOptions | None = None
    connect_timeout: float = 5.0
    timeout: float = 30.0

    @property
    def peer(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"page server {host}:{self.port}"


class Connection:
    """One connection to a page server. Use as a context manager or call `close()`."""

    def __init__(self, server: ServerAddress) -> None:
        self.server = server
        self.peer = server.peer
        self.wire = Wire(server.protocol)
        self._sock: socket.socket | None = None
        self._answered = False
        try:
            sock = socket.create_connection((server.address, server.port), timeout=server.connect_timeout)
        except TimeoutError:
            raise RemoteError(f"{self.peer}: cannot connect: no answer within {server.connect_timeout:g} s") from None
        except OSError as exc:
            raise RemoteError(f"{self.peer}: cannot connect: {exc.strerror or exc}") from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if server.tls is not None:
            sock = wrap_client(sock, server.tls.client_context(), server.address, self.peer)
        sock.settimeout(server.timeout)
        self._sock = sock

    @property
    def is_tls(self) -> bool:
        return isinstance(self._sock, ssl.SSLSocket)

    @property
    def sock(self) -> socket.socket:
        if self._sock is None:
            raise RemoteError(f"{self.peer}: connection is closed")
        return self._sock

    # --- raw I/O ------------------------------------------------------------------------

    def send(self, data: bytes | memoryview, what: str) -> None:
        try:
            self.sock.sendall(data)
        except TimeoutError:
            self._fail(f"{what}: server stopped reading for {self.server.timeout:g} s")
        except OSError as exc:
            self._fail(f"{what}: cannot send: {exc.strerror or exc}")

    def recv_into(self, view: memoryview, what: str, hint: str = "") -> None:
        """Fill `view` from the socket, or fail (closed, timed out) with nothing more read."""
        sock = self.sock
        done = 0
        total = len(view)
        try:
            while done < total:
                n = sock.recv_into(view[done:], total - done)
                if n == 0:
                    self._fail(f"{what}: server closed the connection after {done} of {total} bytes{hint}")
                done += n
        except TimeoutError:
            self._fail(f"{what}: no data for {self.server.timeout:g} s ({done} of {total} bytes){hint}")
        except OSError as exc:
            self._fail(f"{what}: {exc.strerror or exc} after {done} of {total} bytes{hint}")

    def recv(self, size: int, what: str) -> bytes:
        buf = bytearray(size)
        self.await_answer(what)
        self.recv_into(memoryview(buf), what, mismatch_hint(self.wire.protocol))
        return bytes(buf)

    def await_answer(self, what: str) -> None:
        """Before the connection's first answer: fail naming the protocol if none comes within
        FIRST_REPLY_WAIT seconds (or the timeout, if shorter), instead of waiting the whole timeout."""
        if self._answered:
            return
        sock = self.sock
        wait = min(FIRST_REPLY_WAIT, self.server.timeout)
        if not (isinstance(sock, ssl.SSLSocket) and sock.pending()):
            poller = select.poll()
            poller.register(sock.fileno(), select.POLLIN | select.POLLERR | select.POLLHUP)
            if not poller.poll(int(wait * 1000)):
                if wait < self.server.timeout:
                    self._fail(f"{what}: no answer within {wait:g} s to the first request"
                               f"{mismatch_hint(self.wire.protocol)}")
                self._fail(f"{what}: no data for {self.server.timeout:g} s (0 bytes){NO_REPLY_HINT}")
        self._answered = True

    def send_pages(self, reader: PageReader, vaddr: int, length: int, what: str) -> None:
        """Send [vaddr, vaddr+length) of `reader`'s memory through its strategy (`PageReader.send`:
        sendfile in the clear for the local strategies, a bounded buffer over TLS)."""
        try:
            reader.send(self.sock, vaddr, length)
        except TimeoutError:
            self._fail(f"{what}: server stopped reading for {self.server.timeout:g} s")
        except OSError as exc:
            self._fail(f"{what}: cannot send: {exc.strerror or exc}")

    def _fail(self, problem: str) -> NoReturn:
        self.abort()
        raise RemoteError(f"{self.peer}: {problem}")

    # --- GET ----------------------------------------------------------------------------

    def get_into(
        self, items: Iterable[tuple[int, int, memoryview]], *, max_in_flight: int = 16,
        max_pages: int = CRIU_MAX_REPLY_PAGES,
    ) -> int:
        """Fetch (pid, page-aligned vaddr, dest of whole pages) items with pipelined GETs.

        At most `max_in_flight` GETs of at most `max_pages` pages are
        outstanding; replies are read in request order straight into `dest`;
        a short reply makes the rest be asked for again. Returns the number of
        GETs sent.
        """
        ps = PAGE_SIZE
        wire = self.wire
        queue: deque[tuple[int, int, int, memoryview]] = deque()
        for pid, vaddr, dest in items:
            nr_total = len(dest) // ps
            pos = 0
            while pos < nr_total:
                nr = min(max_pages, nr_total - pos)
                queue.append((pid, vaddr + pos * ps, nr, dest[pos * ps : (pos + nr) * ps]))
                pos += nr
        inflight: deque[tuple[int, int, int, memoryview]] = deque()
        header = bytearray(wire.size)
        hview = memoryview(header)
        gets = 0
        while queue or inflight:
            if queue and len(inflight) < max_in_flight:
                batch = []
                while queue and len(inflight) < max_in_flight:
                    item = queue.popleft()
                    inflight.append(item)
                    batch.append(wire.pack_get(item[0], item[1], item[2]))
                gets += len(batch)
                self.send(b"".join(batch), f"GET pid {inflight[-1][0]} at {inflight[-1][1]:#x}")
            pid, vaddr, nr, dest = inflight.popleft()
            what = f"GET pid {pid} at {vaddr:#x} ({nr} pages)"
            header[:4] = b"\0\0\0\0"
            self.await_answer(what)
            try:
                self.recv_into(hview, what, NO_REPLY_HINT + mismatch_hint(wire.protocol))
            except RemoteError:
                if is_busy(header):
                    raise RemoteError(BUSY.format(peer=self.peer)) from None
                raise
            if is_busy(header):
                self.abort()
                raise RemoteError(BUSY.format(peer=self.peer))
            reply = wire.unpack(header)
            try:
                check_reply(reply, pid, vaddr, nr, wire.protocol, self.peer)
            except RemoteError:
                self.abort()
                raise
            got = reply.nr_pages
            self.recv_into(dest[: got * ps], what)
            if got < nr:
                # The server cut the run: ask for the rest (after what is already in flight).
                queue.appendleft((pid, vaddr + got * ps, nr - got, dest[got * ps :]))
        return gets

    # --- push (OPEN2 / ADD_F / CLOSE) ----------------------------------------------------

    def open2(self, kind: str, id: int) -> bool:
        """Open a pagemap on the server; True if the server has a parent image for it."""
        self.send(self.wire.pack(PS_IOV_OPEN2, 0, 0, encode_dst_id(kind, id)), f"OPEN2 {kind} {id}")
        return self.recv(1, f"OPEN2 {kind} {id}") != b"\0"

    def parent(self, kind: str, id: int) -> bool:
        """Ask whether the server has a parent image for a pagemap (int32 answer)."""
        self.send(self.wire.pack(PS_IOV_PARENT, 0, 0, encode_dst_id(kind, id)), f"PARENT {kind} {id}")
        return unpack_status(self.recv(STATUS_SIZE, f"PARENT {kind} {id}")) != 0

    def add_f(self, kind: str, id: int, vaddr: int, nr_pages: int, flags: int) -> None:
        """Announce `nr_pages` at `vaddr` with PE_* flags; page data must follow iff PE_PRESENT."""
        self.send(
            self.wire.pack(encode_cmd(PS_IOV_ADD_F, flags), nr_pages, vaddr, encode_dst_id(kind, id)),
            f"ADD_F {kind} {id} at {vaddr:#x}",
        )

    def close_session(self) -> int:
        """Send CLOSE, return the server's int32 status, end TLS and the connection."""
        self.send(self.wire.pack(PS_IOV_CLOSE), "CLOSE")
        status = unpack_status(self.recv(STATUS_SIZE, "CLOSE"))
        self._goodbye()
        return status

    # --- lifetime -----------------------------------------------------------------------

    def _goodbye(self) -> None:
        sock = self._sock
        self._sock = None
        if sock is None:
            return
        try:
            if isinstance(sock, ssl.SSLSocket):
                sock = sock.unwrap()
            sock.shutdown(socket.SHUT_WR)
        except (OSError, ValueError):
            pass
        finally:
            sock.close()

    def close(self) -> None:
        """End politely: CLOSE, wait for the status, close. Errors here are ignored."""
        if self._sock is None:
            return
        with contextlib.suppress(RemoteError):
            self.close_session()
        self.abort()

    def abort(self) -> None:
        """Drop the connection without a goodbye (after an error)."""
        sock = self._sock
        self._sock = None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
