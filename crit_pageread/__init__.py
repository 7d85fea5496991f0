"""crit-pageread: read the memory in CRIU checkpoints, exactly and fast.

    from crit_pageread import open_images
    with open_images("/path/to/images") as images:
        with images.reader(images.pids[0]) as reader:
            data = reader.read(vaddr, 4096)
"""

from __future__ import annotations

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
from .reader import PageReader, Segment
from .strategy import CopyRequest, PagesFile, ReadRequest, ScatterRequest, Strategy, StrategyInfo, Target, View

__version__ = "0.1.0"

__all__ = [
    "PE_LAZY",
    "PE_PARENT",
    "PE_PRESENT",
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
    "StrategyInfo",
    "Target",
    "View",
    "Vma",
    "hookimpl",
    "load_config",
    "open_images",
]
