"""Entry point: build the parser from every plugin's commands, run one, turn errors into one line."""

from __future__ import annotations

import gc
import os
import sys

from .. import TYPE_CHECKING, __version__, _interrupt
from ..errors import CritPageReadError
from .progress import before_output

if TYPE_CHECKING:  # argparse, typing and collections are not imported for `--version`
    import argparse
    from collections.abc import Sequence
    from typing import Any

_SIGINT = 2  # signal.SIGINT (the signal module imports enum)

#: The commands, each a plugin registered like a third-party one, only when the command line runs.
COMMAND_PLUGINS = (
    "crit_pageread.cli.crit_compat",
    "crit_pageread.cli.read",
    "crit_pageread.cli.extract",
    "crit_pageread.cli.grep",
    "crit_pageread.cli.scan",
    "crit_pageread.cli.ps",
    "crit_pageread.cli.pages",
    "crit_pageread.cli.plugins_cmd",
    "crit_pageread.cli.serve",
    "crit_pageread.cli.push",
    "crit_pageread.cli.bench",
    "crit_pageread.cli.squash",
    "crit_pageread.cli.coredump",
    "crit_pageread.cli.restore",
    "crit_pageread.cli.check",
    "crit_pageread.cli.setup_criu",
    "crit_pageread.cli.inspect",
)

#: The module of each built-in command: a command line that names one loads only that module (and
#: third-party plugins), so start-up does not import every command; anything else loads them all.
COMMAND_MODULES = {
    **dict.fromkeys(("decode", "encode", "info", "x", "show"), "crit_pageread.cli.crit_compat"),
    "plugins": None,  # lists every plugin: needs them all
    **{name: f"crit_pageread.cli.{name}" for name in (
        "read", "extract", "grep", "ps", "pages", "serve", "push", "bench", "squash", "coredump", "restore",
        "check", "inspect", "scan")},
    "setup-criu": "crit_pageread.cli.setup_criu",
}


def plugin_manager(command: str | None = None) -> Any:
    """The plugin manager with the command plugins registered (only `command`'s if it is built in)."""
    from ..plugins import manager, register_modules

    pm = manager()
    module = COMMAND_MODULES.get(command) if command else None
    register_modules(pm, (module,) if module else COMMAND_PLUGINS)
    return pm


def version_text() -> str:
    """`--version`: ours, and the criu and pycriu in use with their versions and paths (no plugin loads)."""
    from ..criu_env import describe

    d = describe()
    lines = [f"crit-pageread {__version__}", f"criu {d['criu_version'] or '?'} ({d['criu'] or 'not found'})"]
    if d["pycriu"]:
        lines.append(f"pycriu {d['pycriu_version']} ({d['pycriu']})")
    else:
        lines.append(f"pycriu: {d.get('pycriu_error')}")
    return "\n".join(lines)


def _command_of(argv: Sequence[str]) -> str | None:
    """The command named by `argv` (its first word that is not an option), if any."""
    for word in argv:
        if word == "--debug":
            continue
        return None if word.startswith("-") else word
    return None


def _plain_args(words: list[str], command: str | None) -> Any:
    """The parsed command line without argparse (`fastargs`) when only built-in plugins are loaded; None
    when argparse must parse it (help, a mistake, anything `fastargs.parse` does not reproduce)."""
    if command is None:
        return None
    pm = plugin_manager(command)
    from ..plugins import builtins_only

    if not builtins_only():
        return None
    from .fastargs import parse

    return parse(words, pm)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    import argparse

    class _Version(argparse.Action):
        """`--version` anywhere on the command line."""

        def __call__(self, parser: argparse.ArgumentParser, namespace: Any, values: Any, option: Any = None) -> None:
            print(version_text())
            parser.exit()

    parser = argparse.ArgumentParser(
        prog="crit-pageread",
        description="CRIU image tool (crit) with page reading: decode, explore, read, extract, grep, serve.",
    )
    parser.add_argument("--version", action=_Version, nargs=0,
                        help="show the version and which criu and pycriu are used, and exit")
    parser.add_argument("--debug", action="store_true", help="show a traceback on errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    pm = plugin_manager(command)
    pm.hook.crit_pageread_add_commands(subparsers=subparsers)
    _in_registration_order(subparsers, pm)
    return parser


def _in_registration_order(subparsers: Any, pm: Any) -> None:
    """List commands as the plugins were registered (crit's five first), not in pluggy's LIFO call order."""
    order = {name: i for i, name in enumerate(COMMAND_PLUGINS)}
    for name, plugin in pm.list_name_plugin():
        order.setdefault(getattr(plugin, "__name__", name), len(order))

    def rank(action: argparse.Action) -> int:
        func = subparsers.choices[action.dest].get_default("func")
        return order.get(str(getattr(func, "__module__", "")), len(order))

    subparsers._choices_actions.sort(key=rank)


def main(argv: Sequence[str] | None = None) -> int:
    """Run `crit-pageread ARGS`; return the exit code (also the console script's).

    In the command-line process, Ctrl-C at any moment is one line and exit 130:
    inside the command it raises KeyboardInterrupt (so `with` blocks remove
    temporary outputs); before and after it, `_interrupt.exit_now` exits at once.
    There the cyclic garbage collector is off while the plugins and the command's
    modules load, and what they made is frozen before the command runs (see `_main`).
    """
    words = list(argv if argv is not None else sys.argv[1:])
    debug = "--debug" in words
    cli = _interrupt.is_command_line()
    global _collector_paused
    paused = _collector_paused = cli and gc.isenabled()
    if paused:
        gc.disable()
    try:
        if cli:
            _interrupt.raise_keyboard_interrupt()
        try:
            return _main(argv, words, debug)
        finally:
            _collector_paused = False
            if paused:
                gc.enable()
            if cli:
                _interrupt.install_early()
    except (KeyboardInterrupt, RuntimeError) as exc:
        if cli:
            _interrupt.install_early()
        if debug or not _interrupted(exc):
            raise
        print("crit-pageread: interrupted", file=sys.stderr)
        return 128 + _SIGINT


def _interrupted(exc: BaseException) -> bool:
    """Whether `exc` is Ctrl-C: a KeyboardInterrupt, or one that Python wrapped while creating a class
    (3.11 turns an exception in a descriptor's `__set_name__`, e.g. `functools.cached_property` during an
    import, into a RuntimeError caused by it)."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, KeyboardInterrupt):
            return True
        exc = exc.__cause__  # type: ignore[assignment]
        seen += 1
    return False


#: Whether `main()` turned the cyclic garbage collector off for start-up (on the command line).
_collector_paused = False


def _main(argv: Sequence[str] | None, words: list[str], debug: bool) -> int:
    if words == ["--version"]:  # answered before any plugin loads
        print(version_text())
        return 0
    try:
        command = _command_of(words)
        args = _plain_args(words, command)
        if args is None:
            args = build_parser(command).parse_args(argv)
        if _collector_paused:
            # Start-up's objects (modules, classes, functions: tens of thousands) live until exit. Frozen, the
            # collector skips them, during the command and at exit: extract of jvm 195.9 M -> 179.3 M
            # instructions (README Performance). The command's own objects are collected as usual.
            gc.freeze()
            gc.enable()
        code = args.func(args)
        sys.stdout.flush()
        return int(code or 0)
    except CritPageReadError as exc:
        if debug:
            raise
        before_output()
        print(f"crit-pageread: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        if debug:
            raise
        before_output()
        print("crit-pageread: interrupted", file=sys.stderr)
        return 128 + _SIGINT
    except BrokenPipeError:
        # The reader of our output went away (e.g. `| head`): not an error worth a traceback.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    except OSError as exc:
        if debug:
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        before_output()
        print(f"crit-pageread: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
