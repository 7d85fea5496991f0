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
from collections.abc import Iterator, Mapping

from . import TYPE_CHECKING, hookspecs
from .errors import ConfigError

if TYPE_CHECKING:  # pluggy (with inspect and typing) is imported only when the manager is (see `manager`)
    from collections.abc import Callable, Sequence
    from types import ModuleType
    from typing import Any

    import pluggy

    from .config import Config
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
_light: _Builtins | None = None
_strategies: dict[str, StrategyInfo] | None = None
_configured: Config | None = None


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide pluggy plugin manager, built on first use (with every plugin `manager()` had)."""
    global _pm, _light
    if _pm is None:
        pm = _new_manager()
        pm.add_hookspecs(hookspecs)
        register_modules(pm, DEFAULT_PLUGINS)
        _load_entry_points(pm)
        if _light is not None:  # the plugins registered before pluggy was needed, in the same order
            light, _light = _light, None
            for name, module in light.plugins.items():
                if pm.get_plugin(name) is None:
                    pm.register(module, name=name)
            for kwargs in light.history:
                pm.hook.crit_pageread_configure.call_historic(kwargs=kwargs)
        if os.environ.get("CRIT_PAGEREAD_TRACE_HOOKS"):
            _trace(pm)
        _pm = pm
    return _pm


def manager() -> Any:
    """The plugin manager the library calls hooks through: pluggy's (`get_plugin_manager()`), or, while the
    only plugins are the built-in modules of plain hook functions (no entry-point plugin, no tracing, nothing
    registered with pluggy's manager), `_Builtins`, which calls them as pluggy would without importing pluggy
    (start-up: pluggy imports inspect and typing). Both have `register`, `get_plugin`, `list_name_plugin` and
    `hook.NAME(**kwargs)` / `hook.NAME.get_hookimpls()`."""
    global _light
    if _pm is not None:
        return _pm
    if _light is None:
        if os.environ.get("CRIT_PAGEREAD_TRACE_HOOKS") or _entry_point_plugins():
            return get_plugin_manager()
        _light = _Builtins()
        for name in DEFAULT_PLUGINS:
            manager().register(importlib.import_module(name), name=name)
    return _pm if _pm is not None else _light


def builtins_only() -> bool:
    """Whether `manager()` is the built-in plugins' light manager (no pluggy: no entry-point plugin, no
    tracing, nothing registered that needs pluggy)."""
    return _pm is None and _light is not None


def _new_manager() -> pluggy.PluginManager:
    import pluggy

    class PluginManager(pluggy.PluginManager):
        """pluggy's, reading `crit_pageread.hookimpl`/`hookspec` marks (`hookspecs.Marker`) with pluggy's markers."""

        def parse_hookimpl_opts(self, plugin: Any, name: str) -> Any:
            _apply_mark(plugin, name, hookspecs.hookimpl.attr, pluggy.HookimplMarker(self.project_name))
            return super().parse_hookimpl_opts(plugin, name)

        def parse_hookspec_opts(self, module_or_class: Any, name: str) -> Any:
            _apply_mark(module_or_class, name, hookspecs.hookspec.attr, pluggy.HookspecMarker(self.project_name))
            return super().parse_hookspec_opts(module_or_class, name)

    return PluginManager(hookspecs.PROJECT)


def _apply_mark(obj: Any, name: str, attr: str, marker: Any) -> None:
    """Mark `obj.name` with pluggy's `marker` and the options our marker kept on it, once."""
    import inspect

    try:
        value = object.__getattribute__(obj, "__dict__").get(name)
    except AttributeError:
        value = None
    if value is None:
        value = inspect.getattr_static(obj, name, None)
    for holder in (value, getattr(value, "__func__", None)):
        options = getattr(holder, attr, None) if holder is not None else None
        if isinstance(options, dict):
            if getattr(holder, marker.project_name + "_" + attr.rsplit("_", 1)[1], None) is None:
                marker(**options)(holder)
            return


class _Hook:
    """One hook of `_Builtins`: pluggy's call (the plugin registered last first; each implementation given the
    arguments it names; results that are not None, in call order) and `get_hookimpls` (registration order)."""

    def __init__(self, owner: _Builtins, name: str) -> None:
        self.owner = owner
        self.name = name

    def get_hookimpls(self) -> list[_Impl]:
        return [impl for impl in self.owner.impls if impl.hook == self.name]

    def __call__(self, **kwargs: Any) -> list[Any]:
        return self.call(self.get_hookimpls(), kwargs)

    @staticmethod
    def call(impls: list[_Impl], kwargs: dict[str, Any]) -> list[Any]:
        results = []
        for impl in reversed(impls):
            result = impl.function(**{arg: kwargs[arg] for arg in impl.argnames})
            if result is not None:
                results.append(result)
        return results

    def call_historic(self, kwargs: dict[str, Any]) -> None:
        self.owner.history.append(dict(kwargs))
        self(**kwargs)


class _Impl:
    """A hook function of a built-in plugin module (the attributes of pluggy's HookImpl that we use)."""

    def __init__(self, plugin_name: str, plugin: ModuleType, hook: str, function: Callable[..., Any]) -> None:
        self.plugin_name = plugin_name
        self.plugin = plugin
        self.hook = hook
        self.function = function
        code = function.__code__
        self.argnames = code.co_varnames[: code.co_argcount - len(function.__defaults__ or ())]


class _HookRelay:
    def __init__(self, owner: _Builtins) -> None:
        self._owner = owner

    def __getattr__(self, name: str) -> Any:
        if _pm is not None:  # pluggy took over: this relay is its
            return getattr(_pm.hook, name)
        if not name.startswith(hookspecs.PROJECT + "_"):
            raise AttributeError(name)
        return _Hook(self._owner, name)


class _Builtins:
    """The built-in plugins while pluggy is not needed (see `manager`): modules whose hook functions carry
    no option. Registering anything else moves every plugin to pluggy's manager and registers it there."""

    def __init__(self) -> None:
        self.plugins: dict[str, ModuleType] = {}
        self.impls: list[_Impl] = []
        self.history: list[dict[str, Any]] = []
        self.hook = _HookRelay(self)

    def register(self, plugin: Any, name: str | None = None) -> str | None:
        impls = _plain_impls(plugin, name) if _pm is None and self is _light and name else None
        if impls is None or name is None:
            return get_plugin_manager().register(plugin, name=name)
        self.plugins[name] = plugin
        self.impls.extend(impls)
        return name

    def get_plugin(self, name: str) -> Any:
        return self.plugins.get(name) if _pm is None else _pm.get_plugin(name)

    def list_name_plugin(self) -> list[tuple[str, Any]]:
        return list(self.plugins.items()) if _pm is None else _pm.list_name_plugin()

    def subset_hook_caller(self, name: str, remove_plugins: Sequence[Any]) -> Callable[..., list[Any]]:
        if _pm is not None:
            return _pm.subset_hook_caller(name, remove_plugins)
        hook = _Hook(self, name)
        kept = [impl for impl in hook.get_hookimpls() if impl.plugin not in remove_plugins]
        return lambda **kwargs: hook.call(kept, kwargs)


def _plain_impls(plugin: Any, name: str) -> list[_Impl] | None:
    """The hook functions of a module whose every hook function is marked with no option; else None."""
    import types

    if not isinstance(plugin, types.ModuleType):
        return None
    found = []
    attr = hookspecs.hookimpl.attr
    for key, value in vars(plugin).items():
        options = getattr(value, attr, None) if isinstance(value, types.FunctionType) else None
        if options is None:
            if hasattr(value, hookspecs.PROJECT + "_impl"):  # pluggy's own marker
                return None
            continue
        if options or not key.startswith(hookspecs.PROJECT + "_"):
            return None
        found.append(_Impl(name, plugin, key, value))
    return found


def _entry_point_plugins() -> bool:
    """Whether an installed distribution has a plugin that would load (`CRIT_PAGEREAD_LOAD_PLUGINS` applies)."""
    names = _allowed()
    return any(names is None or name in names for name, _ in entry_points(ENTRY_POINT_GROUP))


def _allowed() -> set[str] | None:
    allowed = os.environ.get("CRIT_PAGEREAD_LOAD_PLUGINS")
    return None if allowed is None else {n.strip() for n in allowed.split(",") if n.strip()}


def register_modules(pm: Any, names: Sequence[str]) -> None:
    """Import and register each module of `names` not registered yet (the CLI adds its commands so);
    `pm` is `manager()` or pluggy's manager."""
    for name in names:
        if pm.get_plugin(name) is None:
            pm.register(importlib.import_module(name), name=name)


def _load_entry_points(pm: pluggy.PluginManager) -> None:
    names = _allowed()
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
    global _pm, _light, _strategies, _configured
    _pm = None
    _light = None
    _strategies = None
    _configured = None


def strategies() -> dict[str, StrategyInfo]:
    """Every strategy contributed by a plugin, by name."""
    global _strategies
    pm = manager()
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


if TYPE_CHECKING:
    _Table = Mapping[str, Any]
else:  # typing's Any is not imported at run time
    _Table = Mapping


class StrategyContext(_Table):
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
    from .strategy import Strategy

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
    manager().hook.crit_pageread_configure.call_historic(kwargs={"config": config})
    _configured = config


_OBSERVER_HOOKS = (
    "crit_pageread_before_read", "crit_pageread_after_read", "crit_pageread_after_copy", "crit_pageread_synced",
)


def observer() -> Any:
    """The hook relay if any plugin observes reads, else None (no cost on the hot path)."""
    hook = manager().hook
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
