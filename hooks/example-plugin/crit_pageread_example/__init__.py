"""crit-pageread-example: a counting strategy and an observer of reads, restores and served pages.

Loaded by crit-pageread through the `crit_pageread` entry point (pyproject.toml).
Config: `[counting] inner = "preadv", report = "FILE"`; `[example] log = "FILE"`.
"""

from __future__ import annotations

import json
import threading
from typing import Any

from crit_pageread import ConfigError, ReadRequest, Strategy, StrategyContext, StrategyInfo, hookimpl

_log_path: str | None = None
_lock = threading.Lock()


def _log(line: str) -> None:
    if _log_path is None:
        return
    with _lock, open(_log_path, "a") as f:
        f.write(line + "\n")


# --- a strategy ------------------------------------------------------------------------------


class CountingStrategy(Strategy):
    """Reads through another strategy and counts requests and bytes.

    It implements only `read`/`submit` (and passes `sync`/`pending` on): the base class's
    `write_to`, `send` and `view` are built on those, so every command's bytes are counted here.
    """

    name = "counting"

    def __init__(self, inner: Strategy, report: str | None) -> None:
        self.inner = inner
        self.report = report
        self.requests = 0
        self.bytes = 0

    def read(self, request: ReadRequest) -> None:
        self.requests += 1
        self.bytes += len(request.dest)
        self.inner.read(request)

    def submit(self, request: ReadRequest) -> None:
        self.requests += 1
        self.bytes += len(request.dest)
        self.inner.submit(request)

    def sync(self) -> None:
        self.inner.sync()

    @property
    def pending(self) -> int:
        return self.inner.pending

    def close(self) -> None:
        self.inner.close()
        if self.report:  # one line per strategy closed (a command may make one per pid)
            with _lock, open(self.report, "a") as f:
                f.write(json.dumps({"requests": self.requests, "bytes": self.bytes}) + "\n")


def _counting(context: StrategyContext) -> Strategy:
    """The factory: `context.table` is `[counting]`; the inner strategy is made from the same config."""
    table = context.table
    unknown = set(table) - {"inner", "report"}
    if unknown:
        raise ConfigError(f"[counting]: unknown key {sorted(unknown)[0]!r} (known: inner, report)")
    inner = table.get("inner", "preadv")
    if inner == "counting":
        raise ConfigError("[counting]: key 'inner' cannot be 'counting'")
    return CountingStrategy(context.make_strategy(inner), table.get("report"))


@hookimpl
def crit_pageread_strategies() -> list[StrategyInfo]:
    return [StrategyInfo("counting", _counting, "counts requests and bytes read through another strategy")]


# --- observers -------------------------------------------------------------------------------


class _ReadObserver:
    """Registered only when `[example] log` is set: an idle plugin adds nothing to the read path."""

    @hookimpl
    def crit_pageread_after_read(self, reader: Any, vaddr: int, data: memoryview) -> None:
        _log(f"read {reader.target} {vaddr:#x} {len(data)}")

    @hookimpl
    def crit_pageread_after_copy(self, reader: Any, vaddr: int, length: int) -> None:
        _log(f"copy {reader.target} {vaddr:#x} {length}")


@hookimpl
def crit_pageread_configure(config: Any) -> None:
    global _log_path
    from crit_pageread.plugins import get_plugin_manager

    table = config.table("example")
    unknown = set(table) - {"log"}
    if unknown:
        raise ConfigError(f"[example]: unknown key {sorted(unknown)[0]!r} (known: log)")
    _log_path = table.get("log")
    pm = get_plugin_manager()
    if _log_path and pm.get_plugin("example-read-observer") is None:
        pm.register(_ReadObserver(), name="example-read-observer")


@hookimpl
def crit_pageread_before_restore(images_dir: str, options: dict[str, Any]) -> None:
    _log(f"before-restore {images_dir} lazy={options.get('lazy')}")


@hookimpl
def crit_pageread_after_restore(images_dir: str, pid: int) -> None:
    _log(f"after-restore {images_dir} {pid}")


@hookimpl
def crit_pageread_restore_failed(images_dir: str, error: BaseException) -> None:
    _log(f"restore-failed {images_dir} {type(error).__name__}")


@hookimpl
def crit_pageread_pages_served(images: Any, pid: int, vaddr: int, nr_pages: int, peer: str) -> None:
    _log(f"served {pid} {vaddr:#x} {nr_pages} {peer}")
