"""Configuration: TOML files, environment and keyword arguments, merged and validated.

Sources, highest first: keyword arguments / CLI flags; environment
(`CRIT_PAGEREAD_STRATEGY`, `..._PAGE_SIZE`, `..._AUTO_DEDUP`, `..._ZERO_FILL`,
`..._CRIU`, and `CRIT_PAGEREAD_<TABLE>__<KEY>` for a table key); the TOML file
named by `--config` or `CRIT_PAGEREAD_CONFIG`; `./crit-pageread.toml`; the
user's `$XDG_CONFIG_HOME/crit-pageread/config.toml`.

Top-level keys are `strategy`, `page_size`, `auto_dedup`, `zero_fill` and
`criu`; every table (`[preadv]`, `[remote]`, ...) belongs to the plugin of
that name, which validates it.
"""

from __future__ import annotations

import errno
import os
import stat

from . import TYPE_CHECKING, _paths
from .errors import ConfigError

if TYPE_CHECKING:  # typing, dataclasses and pathlib are not imported at start-up
    from collections.abc import Mapping
    from pathlib import Path
    from typing import Any

ENV_PREFIX = "CRIT_PAGEREAD_"
TOP_LEVEL: dict[str, type] = {
    "strategy": str,
    "page_size": int,
    "auto_dedup": bool,
    "zero_fill": bool,
    "criu": str,
}


def host_page_size() -> int:
    return os.sysconf("SC_PAGE_SIZE")


class Config:
    """The merged configuration. `table(name)` gives a plugin its section. Compared and shown by its fields."""

    _FIELDS = ("strategy", "page_size", "auto_dedup", "zero_fill", "criu", "tables", "sources")
    strategy: str
    page_size: int
    auto_dedup: bool
    zero_fill: bool
    criu: str | None
    tables: dict[str, dict[str, Any]]
    #: Where the values came from, lowest precedence first (files and "env"/"arguments").
    sources: list[str]

    def __init__(self, strategy: str = "preadv", page_size: int | None = None, auto_dedup: bool = False,
                 zero_fill: bool = False, criu: str | None = None, tables: dict[str, dict[str, Any]] | None = None,
                 sources: list[str] | None = None) -> None:
        self.strategy = strategy
        self.page_size = host_page_size() if page_size is None else page_size
        self.auto_dedup = auto_dedup
        self.zero_fill = zero_fill
        self.criu = criu
        self.tables = {} if tables is None else tables
        self.sources = [] if sources is None else sources

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not Config:
            return NotImplemented
        return all(getattr(self, name) == getattr(other, name) for name in self._FIELDS)

    def __repr__(self) -> str:
        return f"Config({', '.join(f'{name}={getattr(self, name)!r}' for name in self._FIELDS)})"

    def table(self, name: str) -> dict[str, Any]:
        """The `[name]` table (empty if absent)."""
        return dict(self.tables.get(name, {}))

    def replace(self, **overrides: Any) -> Config:
        """A copy with keyword overrides applied and validated (tables merge key by key)."""
        data = self.as_dict()
        _merge(data, _validated(overrides, "arguments"))
        return _from_dict(data, [*self.sources, "arguments"])

    def as_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {k: getattr(self, k) for k in TOP_LEVEL if getattr(self, k) is not None}
        for name, table in self.tables.items():
            data[name] = dict(table)
        return data


def user_config_path() -> Path:
    return _paths.as_path(_user_config_file())


def _user_config_file() -> str:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return _paths.join(_paths.text(base), "crit-pageread/config.toml")


def _is_file(file: str | os.PathLike[str], required: bool) -> bool:
    """Whether to read `file`. A default location that cannot be looked at (EACCES on a parent, as with a
    HOME kept but unreadable under `sudo -u`) counts as absent; a file named with --config must be there."""
    try:
        if stat.S_ISREG(os.stat(file).st_mode):
            return True
        problem = "not a regular file"
    except OSError as exc:
        problem = "config file not found" if exc.errno == errno.ENOENT else f"cannot read: {exc.strerror}"
    if required:
        raise ConfigError(f"{file}: {problem}")
    return False


def load_config(
    path: str | os.PathLike[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
) -> Config:
    """Merge every source (see the module docstring) into a validated Config."""
    env = os.environ if env is None else env
    data: dict[str, Any] = {}
    sources: list[str] = []
    files = [(_user_config_file(), False), ("crit-pageread.toml", False)]
    named = path if path is not None else env.get(ENV_PREFIX + "CONFIG")
    if named:
        files.append((_paths.text(named), True))
    for file, required in files:
        if not _is_file(file, required):
            continue
        try:
            with open(file, "rb") as f:
                import tomllib  # only when there is a file: start-up stays light

                parsed = tomllib.load(f)
        except ValueError as exc:  # tomllib.TOMLDecodeError
            raise ConfigError(f"{file}: invalid TOML: {exc}") from None
        except OSError as exc:
            raise ConfigError(f"{file}: cannot read: {exc.strerror}") from None
        _merge(data, _validated(parsed, str(file)))
        sources.append(str(file))
    from_env = _from_env(env)
    if from_env:
        _merge(data, _validated(from_env, "environment"))
        sources.append("environment")
    if overrides:
        _merge(data, _validated({k: v for k, v in overrides.items() if v is not None}, "arguments"))
        sources.append("arguments")
    config = _from_dict(data, sources)
    return config


def _from_env(env: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, raw in env.items():
        if not key.startswith(ENV_PREFIX) or key == ENV_PREFIX + "CONFIG":
            continue
        name = key[len(ENV_PREFIX):].lower()
        if "__" in name:
            table, _, sub = name.partition("__")
            out.setdefault(table, {})[sub] = _parse_scalar(raw)
        elif name in TOP_LEVEL:
            # str and bool keep the raw text: bools accept 1/0/yes/no/true/false as text.
            out[name] = _parse_scalar(raw) if TOP_LEVEL[name] not in (str, bool) else raw
    return out


class EnvFloat(float):
    """A number parsed from an environment value, which keeps its text (`4.2` may be a version)."""

    text: str


def env_text(value: Any) -> Any:
    """The text of a number that came from the environment, for a key that takes a string; else `value`.

    Environment values are text: `CRIT_PAGEREAD_REMOTE__PROTOCOL=4.2` is the string "4.2" to a key
    that takes strings, and the number 4.2 to one that takes numbers. (An integer stays an int.)"""
    if isinstance(value, EnvFloat):
        return value.text
    return value


def _parse_scalar(raw: str) -> Any:
    try:
        import tomllib

        value = tomllib.loads(f"v = {raw}")["v"]
    except ValueError:  # tomllib.TOMLDecodeError
        return raw
    if isinstance(value, float):  # ints stay plain ints (sockets and C calls want exact ints)
        number = EnvFloat(value)
        number.text = raw
        return number
    return value


def _validated(data: Mapping[str, Any], source: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out[key] = dict(value)
            continue
        expected = TOP_LEVEL.get(key)
        if expected is None:
            raise ConfigError(
                f"{source}: unknown key {key!r} (top-level keys: {', '.join(TOP_LEVEL)}; tables are per plugin)"
            )
        if expected is bool and isinstance(value, str) and value.lower() in ("1", "0", "true", "false", "yes", "no"):
            value = value.lower() in ("1", "true", "yes")
        if (expected is int and isinstance(value, bool)) or not isinstance(value, expected):
            raise ConfigError(
                f"{source}: key {key!r} must be {expected.__name__}, not {type(value).__name__} {value!r}"
            )
        if key == "page_size" and isinstance(value, int) and (value < 4096 or value & (value - 1)):
            raise ConfigError(f"{source}: key 'page_size' must be a power of two >= 4096, not {value}")
        out[key] = value
    return out


def _merge(into: dict[str, Any], new: dict[str, Any]) -> None:
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            into[key].update(value)
        else:
            into[key] = value


def _from_dict(data: dict[str, Any], sources: list[str]) -> Config:
    top = {k: v for k, v in data.items() if k in TOP_LEVEL}
    tables = {k: v for k, v in data.items() if isinstance(v, dict)}
    return Config(**top, tables=tables, sources=list(sources))
