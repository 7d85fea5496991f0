"""Push a finished dump's pages into a page server (`criu page-server`), as `criu dump --page-server` does.

Per pagemap: OPEN2 (the server answers whether it has a parent image), then
ADD_F runs in address order, each header in its own write and its data
(iff PE_PRESENT) in the next ones: CRIU reads one TLS record at a time. Pages
that live in parent images go as PE_PARENT when the server has a parent,
else as data. Lazy pages are fetched through a strategy that serves them,
else sent as PE_LAZY. CLOSE ends it; the server's status must be 0.
"""

from __future__ import annotations

from typing import Any

from ..errors import RemoteError
from ..images import CheckpointImages
from ..pagemap import PE_LAZY, PE_PARENT, PE_PRESENT
from ..strategy import Target
from .client import COPY_CHUNK, Connection, ServerAddress


def push(
    images: CheckpointImages, server: ServerAddress, *, pids: list[int] | None = None, shmem: bool = True,
    strategy: str | None = None,
) -> dict[str, Any]:
    """Send the pagemaps of `pids` (default all) and of shmem segments; return what was sent."""
    targets = [Target("pid", pid) for pid in (pids if pids is not None else images.pids)]
    if shmem:
        targets += [Target("shmem", shmid) for shmid in images.shmem_ids]
    report: dict[str, Any] = {"server": server.peer, "targets": [], "pages": 0, "bytes": 0, "status": None}
    with Connection(server) as conn:
        for target in targets:
            sent = _push_target(conn, images, target, strategy)
            report["targets"].append({"target": str(target), **sent})
            report["pages"] += sent["pages"]
            report["bytes"] += sent["bytes"]
        status = conn.close_session()
    report["status"] = status
    if status != 0:
        raise RemoteError(f"{server.peer}: CLOSE answered status {status} (the page server failed)")
    return report


def _push_target(conn: Connection, images: CheckpointImages, target: Target, strategy: str | None) -> dict[str, int]:
    kind, id = target.kind, target.id
    has_parent = conn.open2(kind, id)
    pagemap = images.pagemap_for(target)
    ps = pagemap.page_size
    reader = images._reader(target, strategy, {})
    pages = data = 0
    buf: memoryview | None = None
    try:
        for entry in pagemap.entries:
            if entry.flags & PE_PARENT and has_parent:
                conn.add_f(kind, id, entry.vaddr, entry.nr_pages, entry.flags)
                continue
            if not entry.flags & (PE_PRESENT | PE_PARENT):
                if not (entry.flags & PE_LAZY and reader.strategy.serves_lazy):
                    conn.add_f(kind, id, entry.vaddr, entry.nr_pages, entry.flags)
                    continue
            keep = entry.flags & PE_LAZY
            for seg in reader.segments(entry.vaddr, entry.size):
                if seg.kind == "present":
                    conn.add_f(kind, id, seg.vaddr, seg.length // ps, PE_PRESENT | keep)
                    conn.send_pages(reader, seg.vaddr, seg.length, f"ADD_F {kind} {id} at {seg.vaddr:#x}")
                elif seg.kind == "lazy" and not reader.strategy.serves_lazy:
                    conn.add_f(kind, id, seg.vaddr, seg.length // ps, PE_LAZY)
                    continue
                else:  # lazy pages fetched through the strategy, in bounded pieces
                    if buf is None:
                        buf = memoryview(bytearray(COPY_CHUNK))
                    pos = seg.vaddr
                    while pos < seg.end:
                        n = min(len(buf), seg.end - pos)
                        reader.readinto(pos, buf[:n])
                        conn.add_f(kind, id, pos, n // ps, PE_PRESENT | PE_LAZY)
                        conn.send(buf[:n], f"ADD_F {kind} {id} at {pos:#x}")
                        pos += n
                pages += seg.length // ps
                data += seg.length
    finally:
        reader.close()
    return {"pages": pages, "bytes": data}
