"""The plugin manager: default plugins, entry-point plugins, tracing, strategies by name.

Built-in features register exactly like third-party plugins: the library's
strategies (`DEFAULT_PLUGINS`) with the manager, the commands
(`cli.main.COMMAND_PLUGINS`) only when the command line runs. Third-party
plugins load from the entry-point group `crit_pageread`;
`CRIT_PAGEREAD_LOAD_PLUGINS=a,b` restricts which load (empty: none);
`CRIT_PAGEREAD_TRACE_HOOKS=1` prints every hook call and result to stderr.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import pluggy

from . import hookspecs
from .config import Config
from .errors import ConfigError
from .strategy import Strategy, StrategyInfo

#: Plugins of the library: they load with `open_images()` (strategies; no command-line code).
DEFAULT_PLUGINS = (
    "crit_pageread.strategies.pread",
    "crit_pageread.strategies.preadv",
    "crit_pageread.strategies.mmap",
    "crit_pageread.strategies.remote",
)
ENTRY_POINT_GROUP = "crit_pageread"

_pm: pluggy.PluginManager | None = None
_strategies: dict[str, StrategyInfo] | None = None
_configured: Config | None = None


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, built on first use."""
    global _pm
    if _pm is None:
        pm = pluggy.PluginManager("crit_pageread")
        pm.add_hookspecs(hookspecs)
        register_modules(pm, DEFAULT_PLUGINS)
        _load_entry_points(pm)
        if os.environ.get("CRIT_PAGEREAD_TRACE_HOOKS"):
            _trace(pm)
        _pm = pm
    return _pm


def register_modules(pm: pluggy.PluginManager, names: Sequence[str]) -> None:
    """Import and register each module of `names` not registered yet (the CLI adds its commands so)."""
    for name in names:
        if pm.get_plugin(name) is None:
            pm.register(importlib.import_module(name), name=name)


def _load_entry_points(pm: pluggy.PluginManager) -> None:
    allowed = os.environ.get("CRIT_PAGEREAD_LOAD_PLUGINS")
    names = None if allowed is None else {n.strip() for n in allowed.split(",") if n.strip()}
    for name, value in entry_points(ENTRY_POINT_GROUP):
        if names is not None and name not in names:
            continue
        if pm.get_plugin(name) is not None:
            continue
        try:
            plugin = _load_object(value)
        except Exception as exc:
            raise ConfigError(f"plugin {name} ({value}): cannot load: {type(exc).__name__}: {exc}") from None
        pm.register(plugin, name=name)


def entry_points(group: str) -> list[tuple[str, str]]:
    """(name, "module:attr") of every installed distribution's entry points in `group`.

    Reads `*.dist-info/entry_points.txt` (and `*.egg-info`) on sys.path, first distribution
    of a name wins, as importlib.metadata does, without its import cost (email, zipfile...).
    """
    found: list[tuple[str, str]] = []
    seen: set[str] = set()
    for base in sys.path:
        try:
            listing = sorted(os.listdir(base or "."))
        except OSError:
            continue
        for entry in listing:
            if not entry.endswith((".dist-info", ".egg-info")):
                continue
            dist = entry.rsplit(".", 1)[0].split("-")[0].lower().replace("_", "-")
            if dist in seen:
                continue
            seen.add(dist)
            try:
                with open(os.path.join(base or ".", entry, "entry_points.txt"), encoding="utf-8") as f:
                    text = f.read()
            except OSError:
                continue
            found.extend(_section(text, group))
    return found


def _section(text: str, group: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    current = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1].strip()
        elif current == group and "=" in line:
            name, _, value = line.partition("=")
            out.append((name.strip(), value.split("[", 1)[0].strip()))
    return out


def _load_object(value: str) -> Any:
    module_name, _, attrs = value.partition(":")
    obj: Any = importlib.import_module(module_name.strip())
    for attr in filter(None, attrs.strip().split(".")):
        obj = getattr(obj, attr)
    return obj


def _trace(pm: pluggy.PluginManager) -> None:
    def before(hook_name: str, hook_impls: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
        args = ", ".join(f"{k}={_short(v)}" for k, v in kwargs.items())
        print(f"crit-pageread: hook {hook_name}({args}) -> {len(hook_impls)} impls", file=sys.stderr)

    def after(outcome: Any, hook_name: str, hook_impls: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
        exc = outcome.exception
        result = f"raised {exc!r}" if exc else _short(outcome.get_result())
        print(f"crit-pageread: hook {hook_name} = {result}", file=sys.stderr)

    pm.add_hookcall_monitoring(before, after)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def reset() -> None:
    """Forget the plugin manager (tests; after changing plugin env vars)."""
    global _pm, _strategies, _configured
    _pm = None
    _strategies = None
    _configured = None


def strategies() -> dict[str, StrategyInfo]:
    """Every strategy contributed by a plugin, by name."""
    global _strategies
    pm = get_plugin_manager()
    if _strategies is None:
        found: dict[str, StrategyInfo] = {}
        hook = pm.hook.crit_pageread_strategies
        impls = hook.get_hookimpls()  # registration order
        everyone = [impl.plugin for impl in impls]
        for impl in impls:
            # Each implementation called on its own (through the hook, so CRIT_PAGEREAD_TRACE_HOOKS
            # shows it): what it returns is attributed to its plugin, whatever the others return.
            others = [p for p in everyone if p is not impl.plugin]
            for contributed in pm.subset_hook_caller("crit_pageread_strategies", others)():
                for info in contributed or []:
                    info.plugin = info.plugin or impl.plugin_name
                    if info.name in found:
                        raise ConfigError(
                            f"strategy {info.name!r} is contributed by both {found[info.name].plugin} "
                            f"and {info.plugin}"
                        )
                    found[info.name] = info
        _strategies = dict(sorted(found.items()))
    return _strategies


class StrategyContext(Mapping[str, Any]):
    """What a strategy factory is called with: its own config table, the whole config, and a way to make
    an inner strategy by name from the same config.

    The context is also a read-only mapping of the strategy's table, so a
    factory written for the table alone (`table.get("key")`) works as it is.
    """

    def __init__(self, name: str, config: Config) -> None:
        self.name = name
        self.config = config
        #: The `[name]` table of the config (a copy).
        self.table: dict[str, Any] = config.table(name)

    def make_strategy(self, name: str) -> Strategy:
        """A new strategy `name` built from the same config (for strategies that wrap another)."""
        return make_strategy(name, self.config)

    def __getitem__(self, key: str) -> Any:
        return self.table[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.table)

    def __len__(self) -> int:
        return len(self.table)

    def __repr__(self) -> str:
        return f"<StrategyContext [{self.name}] {self.table!r}>"


def make_strategy(name: str, config: Config) -> Strategy:
    """A new strategy instance by name: its factory is called with a `StrategyContext` of `config`."""
    known = strategies()
    info = known.get(name)
    if info is None:
        raise ConfigError(f"strategy: unknown strategy {name!r} (known: {', '.join(known)})")
    strategy = info.factory(StrategyContext(name, config))
    if not isinstance(strategy, Strategy):
        raise ConfigError(f"strategy {name!r} of plugin {info.plugin}: factory did not return a Strategy")
    return strategy


def configure(config: Config, *, check_strategy: bool = True) -> None:
    """Hand every plugin the configuration (the historic `crit_pageread_configure` hook: a plugin
    registered later is handed it on registration). Configuring again with an equal config does nothing.
    With `check_strategy`, an unknown `strategy` is a ConfigError first (else when a reader is made)."""
    global _configured
    known = strategies()
    if check_strategy and config.strategy not in known:
        raise ConfigError(
            f"strategy: unknown strategy {config.strategy!r} (known: {', '.join(known)})"
        )
    if _configured is not None and _configured == config:
        return
    get_plugin_manager().hook.crit_pageread_configure.call_historic(kwargs={"config": config})
    _configured = config


_OBSERVER_HOOKS = (
    "crit_pageread_before_read", "crit_pageread_after_read", "crit_pageread_after_copy", "crit_pageread_synced",
)


def observer() -> Any:
    """The hook relay if any plugin observes reads, else None (no cost on the hot path)."""
    hook = get_plugin_manager().hook
    for name in _OBSERVER_HOOKS:
        if getattr(hook, name).get_hookimpls():
            return _Observer(hook)
    return None


class _Observer:
    """Calls the observer hooks that have implementations; the others are no-ops."""

    def __init__(self, hook: Any) -> None:
        for name in _OBSERVER_HOOKS:
            caller = getattr(hook, name)
            setattr(self, name, caller if caller.get_hookimpls() else _noop)


def _noop(**kwargs: Any) -> None:
    return None


def describe_plugins() -> list[dict[str, Any]]:
    """The loaded plugins: name, the hooks each implements, the strategies each contributes."""
    pm = get_plugin_manager()
    by_plugin: dict[str, list[str]] = {}
    for info in strategies().values():
        by_plugin.setdefault(info.plugin, []).append(info.name)
    out = []
    for name, plugin in pm.list_name_plugin():
        hooks = sorted(h.name for h in pm.get_hookcallers(plugin) or [])
        out.append({"name": name, "hooks": hooks, "strategies": by_plugin.get(name, [])})
    return out
