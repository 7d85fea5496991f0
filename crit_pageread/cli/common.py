"""What every page-reading command shares: common options, opening images, safe output."""

from __future__ import annotations

import sys

from .. import TYPE_CHECKING
from ..config import load_config
from ..errors import ConfigError
from ..images import open_images
from ..plugins import configure

if TYPE_CHECKING:  # typing, argparse and output.py are not imported at start-up
    import argparse
    import os
    from collections.abc import Iterable
    from contextlib import AbstractContextManager
    from typing import IO, Any

    from ..config import Config
    from ..images import CheckpointImages


def atomic_file(path: str | os.PathLike[str], mode: str = "wb") -> AbstractContextManager[IO[Any]]:
    """`output.atomic_file`: the core's one atomic-output helper, for the commands."""
    from ..output import atomic_file

    return atomic_file(path, mode)


def atomic_dir(path: str | os.PathLike[str]) -> AbstractContextManager[str]:
    """`output.atomic_dir` for the commands, the temporary directory as text (`output.atomic_dir_text`: no
    pathlib)."""
    from ..output import atomic_dir_text

    return atomic_dir_text(path)


def add_common_options(parser: argparse.ArgumentParser, *, pid: bool = True, one_pid: bool = False) -> None:
    """--pid (repeatable, or one with `one_pid`), --strategy, --config, --json for a page-reading command."""
    if one_pid:
        parser.add_argument("--pid", type=int, action="append",
                            help="the process id (one; may be left out for a one-process checkpoint)")
    elif pid:
        parser.add_argument("--pid", type=int, action="append", help="process id (repeatable; default: all)")
    parser.add_argument("--strategy", help="page-read strategy (pread, preadv, mmap, remote, ...)")
    parser.add_argument("--config", help="TOML config file (else $CRIT_PAGEREAD_CONFIG, ./crit-pageread.toml)")
    parser.add_argument("--json", action="store_true", help="machine-readable JSON output")


def config_from_args(args: argparse.Namespace, **extra: Any) -> Config:
    """The merged config with CLI flags on top; plugins get it through crit_pageread_configure."""
    overrides = {"strategy": getattr(args, "strategy", None), **extra}
    config = load_config(getattr(args, "config", None), overrides)
    configure(config)
    return config


def open_from_args(args: argparse.Namespace, path: str | None = None, *, pages_wanted: Any = None,
                   images_only: bool = False, **extra: Any) -> CheckpointImages:
    """Open the image directory (or archive) named by `args.dir` with the CLI's config (`pages_wanted`,
    `images_only`: see `open_images`)."""
    return open_images(path or args.dir, config_from_args(args, **extra), pages_wanted=pages_wanted,
                       images_only=images_only)


def selected_pids(images: CheckpointImages, args: argparse.Namespace) -> list[int]:
    """--pid values (checked against the pstree), or every pid."""
    pids = getattr(args, "pid", None)
    if not pids:
        return images.pids
    for pid in pids:
        if pid not in images.processes:
            raise ConfigError(f"--pid {pid}: no such process in {images.path} (pids: {images.pids})")
    return list(pids)


def print_json(obj: Any) -> None:
    """A single result: one JSON document on one line (the README's --json convention)."""
    sys.stdout.write(json_dumps(obj) + "\n")


def print_ndjson(items: Iterable[Any]) -> None:
    """A stream: one JSON object per line, one per item, written as each comes."""
    write = sys.stdout.write
    for item in items:
        write(json_dumps(item) + "\n")


def json_dumps(obj: Any) -> str:
    """`json.dumps(obj)` by the json package's C encoder (`_json.make_encoder` with json's defaults), without
    importing json and re (start-up); json itself on a Python without `_json`."""
    try:
        import _json
    except ImportError:
        import json

        return json.dumps(obj)
    if isinstance(obj, str):
        return _json.encode_basestring_ascii(obj)
    encode: Any = _json.make_encoder
    chunks = encode({}, _not_serializable, _json.encode_basestring_ascii, None, ": ", ", ", False, False, True)(obj, 0)
    return "".join(chunks if isinstance(chunks, (list, tuple)) else list(chunks))


def _not_serializable(obj: Any) -> Any:
    """json.JSONEncoder.default."""
    raise TypeError(f"Object of type {obj.__class__.__name__} is not JSON serializable")


def target_keys(item: dict[str, Any]) -> dict[str, Any]:
    """`{"target": "pid 12", ...}` as the convention has it: `{"pid": 12, ...}` (or `{"shmem": 3, ...}`)."""
    out = dict(item)
    target = out.pop("target", None)
    if isinstance(target, str) and " " in target:
        kind, _, ident = target.partition(" ")
        return {kind: int(ident), **out}
    return item


def progress_enabled() -> bool:
    """Progress bars only on a TTY (stderr)."""
    from .progress import progress_enabled as enabled

    return enabled()
