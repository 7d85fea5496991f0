"""crit-pageread: read the memory in CRIU checkpoints, exactly and fast.

    from crit_pageread import open_images
    with open_images("/path/to/images") as images:
        with images.reader(images.pids[0]) as reader:
            data = reader.read(vaddr, 4096)
"""

# First thing, before any import of a module file (even `from __future__` is one): on the command line,
# Ctrl-C during the imports that follow is one line and exit 130 (crit_pageread/_interrupt.py explains).
import _signal
import os as _os
import sys as _sys


def _exit_on_interrupt(signum: int, frame: object) -> None:
    try:
        _os.write(2, b"crit-pageread: interrupted\n")
    finally:
        _os._exit(128 + signum)


if _signal.getsignal(_signal.SIGINT) is _signal.default_int_handler and (
    _os.path.basename(_sys.argv[0] if _sys.argv else "") == "crit-pageread"
    or "crit_pageread" in getattr(_sys, "orig_argv", [])[1:3]
):
    _signal.signal(_signal.SIGINT, _exit_on_interrupt)

#: typing.TYPE_CHECKING without importing typing (mypy treats the name as true); the modules on the
#: paths of `--version` and of small commands import it from here.
TYPE_CHECKING = False

if TYPE_CHECKING:  # the names below load on first use: `import crit_pageread` stays cheap
    from .config import Config, load_config
    from .errors import (
        ChainError,
        ConfigError,
        CritPageReadError,
        CriuNotFoundError,
        ImageError,
        LazyPageError,
        NotDumpedError,
        PageError,
        RemoteError,
        RestoreError,
    )
    from .hookspecs import hookimpl
    from .images import CheckpointImages, Process, Vma, open_images
    from .pagemap import PE_LAZY, PE_PARENT, PE_PRESENT, Pagemap, PagemapEntry
    from .plugins import StrategyContext
    from .reader import PageReader, Segment
    from .strategy import (
        AnyRequest,
        CopyRequest,
        PagesFile,
        PlannedRead,
        ReadRequest,
        ScatterRequest,
        Strategy,
        StrategyInfo,
        Target,
        View,
    )

__version__ = "0.1.0"

__all__ = [
    "PE_LAZY",
    "PE_PARENT",
    "PE_PRESENT",
    "AnyRequest",
    "ChainError",
    "CheckpointImages",
    "Config",
    "ConfigError",
    "CopyRequest",
    "CritPageReadError",
    "CriuNotFoundError",
    "ImageError",
    "LazyPageError",
    "NotDumpedError",
    "PageError",
    "PageReader",
    "Pagemap",
    "PagemapEntry",
    "PagesFile",
    "PlannedRead",
    "Process",
    "ReadRequest",
    "RemoteError",
    "RestoreError",
    "ScatterRequest",
    "Segment",
    "Strategy",
    "StrategyContext",
    "StrategyInfo",
    "Target",
    "View",
    "Vma",
    "hookimpl",
    "load_config",
    "open_images",
]

#: Where each public name lives; imported on first access (PEP 562), so a command that needs little
#: (`--version`, `ps`) does not pay for the rest.
_EXPORTS = {
    "AnyRequest": ".strategy",
    "ChainError": ".errors",
    "CheckpointImages": ".images",
    "Config": ".config",
    "ConfigError": ".errors",
    "CopyRequest": ".strategy",
    "CritPageReadError": ".errors",
    "CriuNotFoundError": ".errors",
    "ImageError": ".errors",
    "LazyPageError": ".errors",
    "NotDumpedError": ".errors",
    "PE_LAZY": ".pagemap",
    "PE_PARENT": ".pagemap",
    "PE_PRESENT": ".pagemap",
    "PageError": ".errors",
    "PageReader": ".reader",
    "Pagemap": ".pagemap",
    "PagemapEntry": ".pagemap",
    "PagesFile": ".strategy",
    "PlannedRead": ".strategy",
    "Process": ".images",
    "ReadRequest": ".strategy",
    "RemoteError": ".errors",
    "RestoreError": ".errors",
    "ScatterRequest": ".strategy",
    "Segment": ".reader",
    "Strategy": ".strategy",
    "StrategyContext": ".plugins",
    "StrategyInfo": ".strategy",
    "Target": ".strategy",
    "View": ".strategy",
    "Vma": ".images",
    "hookimpl": ".hookspecs",
    "load_config": ".config",
    "open_images": ".images",
}


def __getattr__(name: str) -> object:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
