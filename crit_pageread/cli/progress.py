"""The progress bar of every command: one line on stderr when it is a terminal, never left in the output.

The bar is erased (`\\r` + erase-to-end-of-line) before any line of output is written (`before_output()`,
which the commands call before each line they print), before an error message, and when the work is done;
it is redrawn at most five times a second. Nothing is imported or drawn when stderr is not a terminal.
"""

from __future__ import annotations

import sys
import time

ERASE = "\r\x1b[K"
_shown: Progress | None = None  # the bar now on the screen, if any


def progress_enabled() -> bool:
    """Progress bars only on a TTY (stderr)."""
    return sys.stderr.isatty()


def before_output() -> None:
    """Erase the bar, if one is drawn, so that the next line of output starts on a clean line."""
    global _shown
    if _shown is not None:
        sys.stderr.write(ERASE)
        sys.stderr.flush()
        _shown = None


class Progress:
    """A bar for `total` bytes (`add`), or driven by a library callback `(what, done, total)` (`callback`)."""

    def __init__(self, label: str, total: int = 0, unit: str = "MiB") -> None:
        self.label = label
        self.total = max(total, 1)
        self.unit = unit
        self.done = 0
        self.enabled = progress_enabled()
        self._last = 0.0

    def add(self, n: int) -> None:
        self.done += n  # may come from several writer threads: a lost update only skews the bar
        if self.enabled:
            self._tick()

    def callback(self, what: str, done: int, total: int) -> None:
        """For the library's `progress=` arguments (squash, coredump)."""
        self.label, self.done, self.total = what, done, max(total, 1)
        if self.enabled:
            self._tick()

    def _tick(self) -> None:
        now = time.monotonic()
        if now - self._last >= 0.2:
            self._last = now
            self._draw()

    def _draw(self) -> None:
        global _shown
        frac = min(self.done / self.total, 1.0)
        bar = "#" * int(frac * 30)
        if self.unit == "MiB":
            amount = f"{self.done >> 20}/{self.total >> 20} MiB"
        else:
            amount = f"{self.done}/{self.total} {self.unit}"
        sys.stderr.write(f"\r{self.label} [{bar:<30}] {frac * 100:5.1f}% {amount}\x1b[K")
        sys.stderr.flush()
        _shown = self

    def finish(self) -> None:
        """Done: the bar goes away."""
        before_output()
