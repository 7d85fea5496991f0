"""The exception hierarchy: one base class, one subclass per kind of trouble.

Library code raises these; only the command line turns them into one stderr
line and an exit code. Every message is one line and names the file or key.
"""

from __future__ import annotations


class CritPageReadError(Exception):
    """Base class of every error crit-pageread raises on purpose."""

    exit_code = 1

    def __str__(self) -> str:
        # One line, always: a message never spans lines.
        return " ".join(super().__str__().split("\n"))


class ImageError(CritPageReadError):
    """An image file is missing, truncated or inconsistent."""

    def __init__(self, path: object, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class ChainError(ImageError):
    """A `parent` link is missing, dangling or cyclic, or the parent lacks pages."""


class PageError(CritPageReadError):
    """A requested address range cannot be read from the images."""

    def __init__(self, source: str, start: int, end: int, problem: str) -> None:
        self.source = source
        self.start = start
        self.end = end
        super().__init__(f"{source}: {problem} at {start:#x}-{end:#x}")


class NotDumpedError(PageError):
    """No pagemap entry covers the range: CRIU did not dump it (use zero_fill)."""

    def __init__(self, source: str, start: int, end: int) -> None:
        super().__init__(source, start, end, "pages not dumped")


class LazyPageError(PageError):
    """The range is `PE_LAZY` without `PE_PRESENT`: its data is on a page server."""

    def __init__(self, source: str, start: int, end: int) -> None:
        super().__init__(
            source, start, end, "lazy pages (no data in the images; use the remote strategy)"
        )


class ConfigError(CritPageReadError):
    """A configuration key has a bad value, or a named plugin/strategy is unknown."""

    exit_code = 2


class RemoteError(CritPageReadError):
    """The page server failed, timed out or broke the protocol."""


class CriuNotFoundError(CritPageReadError):
    """CRIU or pycriu cannot be found on this machine."""


class RestoreError(CritPageReadError):
    """CRIU could not restore the checkpoint; the message ends with the tail of CRIU's log."""

    def __init__(self, images_dir: object, problem: str) -> None:
        self.images_dir = str(images_dir)
        super().__init__(f"{images_dir}: {problem}")
