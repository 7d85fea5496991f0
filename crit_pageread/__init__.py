"""crit-pageread: read the memory in CRIU checkpoints, exactly and fast.

    from crit_pageread import open_images
    with open_images("/path/to/images") as images:
        with images.reader(images.pids[0]) as reader:
            data = reader.read(vaddr, 4096)
"""

from __future__ import annotations

from . import _interrupt

if _interrupt.is_command_line():  # first thing: Ctrl-C during the imports that follow is one line, exit 130
    _interrupt.install_early()

from typing import TYPE_CHECKING

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
