"""Every hook of crit-pageread, documented in one place.

Plugins implement these with `@crit_pageread.hookimpl`. Callers pass keyword
arguments only, so a hook can gain an argument without breaking plugins. The
built-in strategies (`plugins.DEFAULT_PLUGINS`) and commands (`cli.main.COMMAND_PLUGINS`) are
plugins too.
"""

from __future__ import annotations

from . import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, TypeVar

    from .config import Config
    from .images import CheckpointImages
    from .reader import PageReader
    from .strategy import StrategyInfo

    F = TypeVar("F", bound=Callable[..., Any])

PROJECT = "crit_pageread"


class Marker:
    """`@hookimpl`, `@hookimpl(tryfirst=True)` (and `@hookspec`): pluggy's marker without importing pluggy.

    The options are kept on the function (`_crit_pageread_impl` / `_crit_pageread_spec`); the plugin
    manager hands them to pluggy's own `HookimplMarker` / `HookspecMarker` when it registers the plugin,
    so a plugin is what pluggy's marker would make it. Options pluggy does not know are a TypeError now.
    """

    def __init__(self, kind: str, options: tuple[str, ...]) -> None:
        self.kind = kind
        self.attr = f"_{PROJECT}_{kind}"
        self.options = options
        self.project_name = PROJECT

    def __call__(self, function: F | None = None, **options: Any) -> Any:
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            raise TypeError(f"hook{self.kind}() got unexpected keyword arguments: {', '.join(unknown)}")

        def mark(func: F) -> F:
            setattr(func, self.attr, options)
            return func

        return mark(function) if function is not None else mark

    def __repr__(self) -> str:
        return f"<crit_pageread hook{self.kind} marker>"


hookspec = Marker("spec", ("firstresult", "historic", "warn_on_impl", "warn_on_impl_args"))
hookimpl = Marker("impl", ("wrapper", "hookwrapper", "optionalhook", "tryfirst", "trylast", "specname"))


# --- Set-up: what plugins contribute ---------------------------------------------------------


@hookspec
def crit_pageread_strategies() -> list[StrategyInfo]:  # type: ignore[empty-body]
    """Contribute page-read strategies.

    Return a list of `StrategyInfo(name, factory, description)`. `factory` is
    called with a `StrategyContext` each time a strategy of that name is made:
    `context.table` is its config table (`[name]` in the config file; the
    context is also a read-only mapping of it), `context.config` the whole
    `Config`, and `context.make_strategy(other)` makes an inner strategy from
    the same config. It returns a `Strategy`. Names are unique across plugins;
    a clash is a ConfigError naming both plugins.
    """


@hookspec(historic=True)
def crit_pageread_configure(config: Config) -> None:
    """Hand plugins the configuration: by the command line once it is loaded, and by `open_images()`
    with the config it opens images with (an equal config is not handed twice).

    Historic: a plugin registered later is called with every config handed so
    far, at registration. `config.table(name)` is a plugin's own section.
    Raise `ConfigError` naming the key for a bad value. Strategy factories get
    the config through their `StrategyContext`, not through this hook.
    """


@hookspec
def crit_pageread_add_commands(subparsers: Any) -> None:
    """Add command-line subcommands to `crit-pageread`.

    `subparsers` is the argparse sub-parser action; a plugin adds a parser and
    sets `func=callable(args) -> int` as its default.
    """


# --- Images ----------------------------------------------------------------------------------


@hookspec
def crit_pageread_images_opened(images: CheckpointImages) -> None:
    """Called after `open_images()` opened an image directory (nothing is parsed yet)."""


# --- Reads: observers around PageReader's reads and copies ------------------------------


@hookspec
def crit_pageread_before_read(reader: PageReader, vaddr: int, length: int, deferred: bool) -> None:
    """Called before a read of [vaddr, vaddr+length) is planned.

    `deferred` is True for `readinto(..., defer=True)`. Raising aborts the read
    before any I/O. Called only when some plugin implements it, so an empty
    observer list costs nothing on the hot path.
    """


@hookspec
def crit_pageread_after_read(reader: PageReader, vaddr: int, data: memoryview) -> None:
    """Called after a synchronous read filled `data` (the caller's buffer) from `vaddr`.

    Also called for each range of `PageReader.view`/`view_ranges`; then `data` is read-only (it may be
    a map of a pages file: copy what you keep). Deferred reads are reported by `crit_pageread_synced`
    instead, copies to files and sockets by `crit_pageread_after_copy`.
    """


@hookspec
def crit_pageread_after_copy(reader: PageReader, vaddr: int, length: int) -> None:
    """Called after `write_to` or `send` moved [vaddr, vaddr+length) of memory to an output.

    The bytes went from the pages files to the output through the strategy
    (a kernel copy for the local strategies) without a caller's buffer, so
    there is no `data`; the range may include holes (zeroed or skipped as the
    caller asked). `crit_pageread_before_read` was called for it first.
    `view` reports with `crit_pageread_after_read` (its `data` is read-only).
    """


@hookspec
def crit_pageread_synced(reader: PageReader, requests: int) -> None:
    """Called after `sync()` completed `requests` deferred strategy requests."""


# --- Page server -----------------------------------------------------------------------------


@hookspec
def crit_pageread_pages_served(images: CheckpointImages, pid: int, vaddr: int, nr_pages: int, peer: str) -> None:
    """Called by `serve` after pages were sent to a page-server client."""


# --- Restore pipelines -----------------------------------------------------------------------


@hookspec
def crit_pageread_before_restore(images_dir: str, options: dict[str, Any]) -> None:
    """Called before CRIU restores `images_dir`; `options` may be changed in place.

    Keys (see `restore.pipeline.restore`): method ("binary"|"swrk"), leave_stopped, lazy,
    pages_dir, extra_args, action_scripts, cpus, timeout, protocol, criu, log_file.
    """


@hookspec
def crit_pageread_after_restore(images_dir: str, pid: int) -> None:
    """Called after CRIU restored `images_dir`; `pid` is the restored root task."""


@hookspec
def crit_pageread_restore_failed(images_dir: str, error: BaseException) -> None:
    """Called when a restore of `images_dir` failed, before the error propagates."""
