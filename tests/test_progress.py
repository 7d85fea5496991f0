"""Progress bars on a terminal: drawn on stderr, erased before every line of output and when done.

The commands run on a pseudo-terminal (stdout and stderr both on it, as in a shell); what they wrote
is replayed through a minimal terminal (carriage return, erase to end of line, newline), and the
screen must hold the output lines and nothing of the bar.
"""

from __future__ import annotations

import errno
import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest

from crit_pageread.testing import ImageBuilder, VmaSpec

NEEDLE = b"CRIT-PAGEREAD-NEEDLE"
PAGE = 4096


def screen(raw: bytes) -> list[str]:
    """The lines a terminal shows after `raw` (\\r, \\n, ESC [ K; other bytes are printed)."""
    lines: list[list[str]] = [[]]
    col = 0
    text = raw.decode("utf-8", "replace")
    i = 0
    while i < len(text):
        ch = text[i]
        if text.startswith("\x1b[K", i):
            del lines[-1][col:]
            i += 3
            continue
        if ch == "\r":
            col = 0
        elif ch == "\n":
            lines.append([])
            col = 0
        else:
            line = lines[-1]
            if col < len(line):
                line[col] = ch
            else:
                line.extend(" " * (col - len(line)))
                line.append(ch)
            col += 1
        i += 1
    return ["".join(line) for line in lines if line]


def on_a_pty(*args: str, cwd: Path) -> tuple[int, bytes]:
    """Run `crit-pageread ARGS` with stdout and stderr on one pseudo-terminal; (exit status, what it wrote)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "crit_pageread", *args], stdin=subprocess.DEVNULL, stdout=slave,
                            stderr=slave, cwd=cwd, close_fds=True)
    os.close(slave)
    out = bytearray()
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError as exc:  # EIO: the other side is closed
            if exc.errno != errno.EIO:
                raise
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    return proc.wait(30), bytes(out)


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """A synthetic process with 4 VMAs of 6 MiB (apart, so each is its own run: the bar is drawn after the
    first one's matches, before the next one's), with the needle at every MiB boundary inside, across pages."""
    size = 6 << 20
    data = bytearray(size)
    for off in range(1 << 20, size, 1 << 20):
        data[off - 7 : off - 7 + len(NEEDLE)] = NEEDLE
    builder = ImageBuilder(tmp_path / "img")
    starts = [0x7F0000000000 + i * (size + PAGE) for i in range(4)]
    builder.process(10, vmas=[VmaSpec(s, s + size) for s in starts])
    return builder.pagemap(10, [(s, bytes(data)) for s in starts]).write()


@pytest.mark.parametrize("engine", ["python", "auto"])
def test_grep_bar_is_erased_before_each_match_line_and_at_the_end(images: Path, tmp_path: Path, engine: str) -> None:
    code, raw = on_a_pty("grep", str(images), NEEDLE.decode(), "--engine", engine, cwd=tmp_path)
    lines = screen(raw)
    assert code == 0, lines
    assert b"grep [" in raw  # the bar was drawn
    assert len(lines) == 4 * 5 and all(line.startswith("10:0x7f") and line.endswith(NEEDLE.decode())
                                       for line in lines), lines


def test_extract_bar_leaves_only_the_summary(images: Path, tmp_path: Path) -> None:
    code, raw = on_a_pty("extract", str(images), "-o", str(tmp_path / "out"), cwd=tmp_path)
    lines = screen(raw)
    assert code == 0, lines
    assert b"extract [" in raw
    assert len(lines) == 1 and lines[0].startswith(f"{tmp_path / 'out'}: 4 files"), lines


def test_an_error_after_the_bar_starts_on_a_clean_line(images: Path, tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    code, raw = on_a_pty("extract", str(images), "-o", str(tmp_path / "out"), cwd=tmp_path)
    assert code != 0 and screen(raw) == [f"crit-pageread: {tmp_path / 'out'}: output already exists"]
