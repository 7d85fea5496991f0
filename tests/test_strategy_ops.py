"""The strategy operations write_to, send and view, for every built-in strategy and one that only reads.

Checked against the dumped task restored with `criu restore --leave-stopped` (/proc/PID/mem).
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from criu_harness import Restored, dump, pagemap_pages, restore_stopped, start_victim

from crit_pageread import ConfigError, NotDumpedError, ReadRequest, Strategy, open_images
from crit_pageread.strategy import read_fully

ARGS = ("--tree", "1", "--mib", "3", "--vmas", "3", "--seed", "11")


class ReadOnly(Strategy):
    """A third-party strategy that implements only `read` (and counts the bytes it read)."""

    name = "read-only"

    def __init__(self) -> None:
        self.bytes = 0

    def read(self, request: ReadRequest) -> None:
        assert request.pages is not None
        read_fully(request.pages.fd, request.dest, request.offset, request.pages.path)
        self.bytes += len(request.dest)


class Dumped:
    def __init__(self, images: Path, restored: Restored) -> None:
        self.images = images
        self.restored = restored


@pytest.fixture(scope="module")
def dumped(victim_exe: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dumped]:
    work = tmp_path_factory.mktemp("strategy-ops")
    victim = start_victim(victim_exe, work / "run", *ARGS)
    try:
        images = dump(victim, work / "images")
    finally:
        victim.kill()
    with restore_stopped(images) as restored:
        yield Dumped(images, restored)


def _runs(pages: list[int]) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for a in sorted(pages):
        if runs and runs[-1][1] == a:
            runs[-1] = (runs[-1][0], a + 4096)
        else:
            runs.append((a, a + 4096))
    return runs


def _close_runs(runs: list[tuple[int, int]]) -> tuple[int, int]:
    """A range of a few MiB at most that starts and ends with data and has holes inside."""
    for i in range(len(runs) - 1):
        j = i + 1
        while j + 1 < len(runs) and runs[j + 1][1] - runs[i][0] <= 4 << 20:
            j += 1
        if runs[j][1] - runs[i][0] <= 4 << 20:
            return runs[i][0], runs[j][1]
    raise AssertionError("no runs with holes between them")


def _strategy(name: str) -> str | Strategy:
    return ReadOnly() if name == "read-only" else name


STRATEGIES = ["pread", "preadv", "mmap", "read-only"]


@pytest.mark.parametrize("name", STRATEGIES)
def test_write_to_puts_every_dumped_run_at_its_offset_of_the_file(dumped: Dumped, tmp_path: Path, name: str) -> None:
    with open_images(dumped.images) as images:
        for pid in images.pids:
            runs = _runs(pagemap_pages(dumped.images, pid))
            # Output offsets packed back to back: pieces contiguous in the pages file join into one copy.
            iov, pos = [], 0
            for s, e in runs:
                iov.append((s, e - s, pos))
                pos += e - s
            out = tmp_path / f"{name}-{pid}.bin"
            fd = os.open(out, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            strategy = _strategy(name)
            try:
                with images.reader(pid, strategy) as reader:
                    assert reader.write_to(fd, iov) == pos
            finally:
                os.close(fd)
            data = out.read_bytes()
            assert len(data) == pos > 0
            for s, n, at in iov:
                assert data[at : at + n] == dumped.restored.read(pid, s, n), f"{name}: pid {pid} at {s:#x}"
            if isinstance(strategy, ReadOnly):
                assert strategy.bytes == pos  # every byte went through its read


@pytest.mark.parametrize("name", STRATEGIES)
@pytest.mark.parametrize("sink", ["socket", "pipe", "socket-object"])
def test_send_streams_a_range_with_its_holes_zeroed(dumped: Dumped, name: str, sink: str) -> None:
    with open_images(dumped.images) as images:
        pid = images.pids[0]
        runs = _runs(pagemap_pages(dumped.images, pid))
        start, end = _close_runs(runs)
        want = bytearray(end - start)
        for s, e in runs:
            if s < end:
                want[s - start : min(e, end) - start] = dumped.restored.read(pid, s, min(e, end) - s)
        if sink == "pipe":
            rfd, wfd = os.pipe()
            out: int | socket.socket = wfd
        else:
            a, b = socket.socketpair()
            rfd, wfd = b.fileno(), a.fileno()
            out = a if sink == "socket-object" else wfd
        got = bytearray()

        def drain() -> None:
            while chunk := os.read(rfd, 1 << 16):
                got.extend(chunk)

        t = threading.Thread(target=drain)
        t.start()
        try:
            with images.reader(pid, _strategy(name)) as reader:
                with pytest.raises(NotDumpedError):
                    reader.send(out, start, end - start)
                assert reader.send(out, start, end - start, holes="zero") == end - start
        finally:
            if sink == "pipe":
                os.close(wfd)
            else:
                a.shutdown(socket.SHUT_WR)
            t.join(30)
            if sink == "pipe":
                os.close(rfd)
            else:
                a.close()
                b.close()
        assert bytes(got) == bytes(want)


@pytest.mark.parametrize("name", STRATEGIES)
def test_view_shows_the_bytes_of_a_run_and_of_a_range_with_holes(dumped: Dumped, name: str) -> None:
    with open_images(dumped.images) as images:
        pid = images.pids[0]
        runs = _runs(pagemap_pages(dumped.images, pid))
        s, e = max(runs, key=lambda r: r[1] - r[0])
        with images.reader(pid, _strategy(name)) as reader:
            with reader.view(s + 4096, e - s - 4096) as view:
                assert view.data[view.start : view.start + view.length] == dumped.restored.read(
                    pid, s + 4096, e - s - 4096)
                assert view.data.find(dumped.restored.read(pid, e - 64, 16), view.start) >= 0
            a, b = _close_runs(runs)
            with pytest.raises(NotDumpedError):
                reader.view(a, b - a)
        with images.reader(pid, _strategy(name), zero_fill=True) as reader, reader.view(a, b - a) as view:
            data = bytes(view.data[view.start : view.start + view.length])
        inside = [(rs, re_) for rs, re_ in runs if a <= rs < b]
        for rs, re_ in inside:
            assert data[rs - a : re_ - a] == dumped.restored.read(pid, rs, re_ - rs)
        assert data[inside[0][1] - a : inside[1][0] - a] == bytes(inside[1][0] - inside[0][1])


@pytest.mark.parametrize("name", STRATEGIES)
def test_view_segments_shows_planned_segments_back_to_back(dumped: Dumped, name: str) -> None:
    """grep's path: the segments of a range with holes, planned once, viewed as the bytes of its runs in
    order (in place when they lie back to back in one pages file); a hole is refused."""
    with open_images(dumped.images) as images:
        pid = images.pids[0]
        a, b = _close_runs(_runs(pagemap_pages(dumped.images, pid)))
        strategy = _strategy(name)
        with images.reader(pid, strategy) as reader:
            segs = [seg for seg in reader.segments(a, b - a) if seg.kind == "present"]
            want = b"".join(dumped.restored.read(pid, seg.vaddr, seg.length) for seg in segs)
            with reader.view_segments(segs) as view:
                assert bytes(view.data[view.start : view.start + view.length]) == want
                in_place = not isinstance(view.data, bytearray)
            assert in_place == (name != "read-only")  # the kernel copies' view maps the pages file
            if isinstance(strategy, ReadOnly):
                assert strategy.bytes == len(want)
            hole = next(seg for seg in reader.segments(a, b - a) if seg.kind == "hole")
            with pytest.raises(NotDumpedError):
                reader.view_segments([segs[0], hole])


def test_local_strategies_refuse_lazy_copies() -> None:
    from crit_pageread.strategies.pread import PreadStrategy
    from crit_pageread.strategy import CopyRequest, Target

    with pytest.raises(ConfigError, match="lazy"):
        PreadStrategy().write_to([CopyRequest(None, -1, 4096, 0x1000, Target("pid", 1))], 1)
