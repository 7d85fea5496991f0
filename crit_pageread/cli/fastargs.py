"""Plain command lines parsed without importing argparse (start-up: argparse with gettext, locale and shutil).

The command plugins add their commands to a `Recorder` standing in for argparse's sub-parser action. A
command line that argparse would parse without a message is parsed from what they recorded; for anything
else (`-h`, a mistake, an abbreviated or `--opt=value` option, `--`, a value starting with `-`, positionals
split by options, an argparse feature the recorder does not take) `parse` returns None and argparse parses
the command line, so help, error messages and exit codes are argparse's own.
"""

from __future__ import annotations

from .. import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from typing import Any

#: add_parser() keywords that change nothing but help output.
_PARSER_KWARGS = frozenset(("help", "description", "epilog", "usage", "formatter_class"))
#: add_argument() keywords taken (the rest make the command's lines go to argparse).
_ARG_KWARGS = frozenset(("help", "metavar", "action", "type", "nargs", "default", "dest", "choices", "required"))


class Unsupported(Exception):
    """A command uses an argparse feature this parser does not reproduce."""


class Namespace:
    """argparse.Namespace's behaviour: attributes, equality, `in`, repr."""

    def __init__(self, **kwargs: Any) -> None:
        self.__dict__.update(kwargs)

    def __eq__(self, other: object) -> bool:
        return vars(self) == vars(other) if hasattr(other, "__dict__") else NotImplemented

    def __contains__(self, key: str) -> bool:
        return key in self.__dict__

    def __repr__(self) -> str:
        shown = [f"{k}={v!r}" for k, v in self.__dict__.items() if k.isidentifier()]
        others = {k: v for k, v in self.__dict__.items() if not k.isidentifier()}
        return "Namespace(" + ", ".join(shown + ([f"**{others!r}"] if others else [])) + ")"


class _Arg:
    """One add_argument() call: an option (`names` start with `-`) or a positional."""

    def __init__(self, names: tuple[str, ...], kwargs: dict[str, Any]) -> None:
        if (set(kwargs) - _ARG_KWARGS or not names or any(not isinstance(n, str) or not n for n in names)
                or not isinstance(kwargs.get("metavar", ""), str)):
            raise Unsupported(names)
        self.names = names
        self.optional = names[0].startswith("-")
        self.action = kwargs.get("action") or "store"
        self.nargs = kwargs.get("nargs")
        self.type: Callable[[str], Any] | None = kwargs.get("type")
        self.choices = kwargs.get("choices")
        self.required = bool(kwargs.get("required", False))
        if self.optional:
            if any(not n.startswith("-") or n in ("-h", "--help") for n in names) or self.nargs is not None:
                raise Unsupported(names)
            longs = [n for n in names if len(n) > 1 and n[1] == "-"]
            dest = kwargs.get("dest")
            self.dest = (longs or names)[0].lstrip("-").replace("-", "_") if dest is None else dest
        else:
            if len(names) != 1 or "dest" in kwargs or "required" in kwargs or self.nargs not in (None, "?", "+") or (
                    self.nargs in ("?", "+") and self.choices is not None):
                raise Unsupported(names)
            self.dest = names[0]
        if self.action not in ("store", "store_true", "append") or (self.type is not None and not callable(self.type)):
            raise Unsupported(names)
        if self.action == "store_true" and ("type" in kwargs or self.choices is not None):
            raise Unsupported(names)
        if self.action == "append" and kwargs.get("default") not in (None, []):
            raise Unsupported(names)  # argparse appends to a copy of the default: only [] is reproduced
        self.default = kwargs.get("default", False if self.action == "store_true" else None)
        if not isinstance(self.dest, str) or not self.dest:
            raise Unsupported(names)

    def value(self, text: str) -> Any:
        """`text` converted and checked as argparse does; Unsupported where argparse would say something."""
        try:
            value = self.type(text) if self.type is not None else text
        except Exception:
            raise Unsupported(self.names) from None
        if self.choices is not None and value not in self.choices:
            raise Unsupported(self.names)
        return value

    def absent(self) -> Any:
        """The value when the command line does not give one (a string default goes through `type`)."""
        return self.value(self.default) if isinstance(self.default, str) and self.type is not None else self.default


class _Opaque:
    """What add_argument() returns: using argparse's Action it stands for is Unsupported."""

    def __getattr__(self, name: str) -> Any:
        raise Unsupported(name)

    def __setattr__(self, name: str, value: Any) -> None:
        raise Unsupported(name)


class CommandSpec:
    """One add_parser() call and what was added to it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.args: list[_Arg] = []
        self.defaults: dict[str, Any] = {}
        self.groups: list[list[_Arg]] = []
        #: Optionals and positionals parsed intermixed (`intermix`).
        self.intermixed = False

    def add_argument(self, *names: str, **kwargs: Any) -> _Opaque:
        arg = _Arg(names, kwargs)
        if "default" not in kwargs and arg.dest in self.defaults:  # argparse: set_defaults() before the argument
            if arg.action == "append" and self.defaults[arg.dest] is not None:
                raise Unsupported(names)
            arg.default = self.defaults[arg.dest]
        taken = {n for a in self.args if a.optional for n in a.names}
        if (arg.optional and taken & set(names)) or any(a.dest == arg.dest for a in self.args):
            raise Unsupported(names)  # argparse refuses conflicting options; shared dests are left to it
        if not arg.optional:
            positionals = [a for a in self.args if not a.optional]
            if (positionals or self.intermixed) and "+" in (arg.nargs, *(a.nargs for a in positionals)):
                raise Unsupported(names)  # one or more words: only as the command's one positional
            if positionals and positionals[-1].nargs == "?" and arg.nargs is None:
                raise Unsupported(names)  # a required positional after an optional one: argparse's regex decides
        self.args.append(arg)
        return _Opaque()

    def add_mutually_exclusive_group(self, **kwargs: Any) -> _Group:
        if kwargs.get("required", False) or set(kwargs) - {"required"}:
            raise Unsupported("add_mutually_exclusive_group")
        group = _Group(self)
        self.groups.append(group.args)
        return group

    def set_defaults(self, **kwargs: Any) -> None:
        self.defaults.update(kwargs)
        for arg in self.args:
            if arg.dest in kwargs:
                if arg.action == "append" and kwargs[arg.dest] is not None:
                    raise Unsupported(arg.names)
                arg.default = kwargs[arg.dest]

    def __getattr__(self, name: str) -> Any:
        raise Unsupported(name)

    def parse(self, words: Sequence[str]) -> dict[str, Any]:
        """The sub-namespace of `words` (the words after the command), in argparse's attribute order."""
        options = {n: a for a in self.args if a.optional for n in a.names}
        positionals = [a for a in self.args if not a.optional]
        found: dict[str, Any] = {}
        seen: set[int] = set()
        run: list[str] = []
        runs = 0
        after_positional = False
        i = 0
        while i < len(words):
            word = words[i]
            i += 1
            if not word.startswith("-"):
                runs += not after_positional
                after_positional = True
                run.append(word)
                continue
            after_positional = False
            arg = options.get(word)
            if arg is None:
                raise Unsupported(word)
            seen.add(id(arg))
            if arg.action == "store_true":
                found[arg.dest] = True
                continue
            if i >= len(words) or words[i].startswith("-"):
                raise Unsupported(word)
            value = arg.value(words[i])
            i += 1
            if arg.action == "append":
                found[arg.dest] = [*(found[arg.dest] if arg.dest in found else arg.default or ()), value]
            else:
                found[arg.dest] = value
        if positionals and positionals[0].nargs == "+":  # the one positional: one run of one or more words
            if runs > 1 or self.intermixed or not run:
                raise Unsupported(words)
            found[positionals[0].dest] = [positionals[0].value(word) for word in run]
            run = []
            positionals = []
        required = sum(1 for a in positionals if a.nargs is None)
        if (runs > 1 and not self.intermixed) or not required <= len(run) <= len(positionals):
            raise Unsupported(words)
        for arg, word in zip(positionals, run, strict=False):
            found[arg.dest] = arg.value(word)
        if any(a.required and id(a) not in seen for a in self.args if a.optional):
            raise Unsupported(words)
        if any(sum(id(a) in seen for a in group) > 1 for group in self.groups):
            raise Unsupported(words)  # argparse says "not allowed with"
        # argparse's order: each argument's default, then set_defaults(); intermixed, the positionals last.
        out = {a.dest: a.default for a in self.args if a.optional or not self.intermixed}
        out.update((k, v) for k, v in self.defaults.items() if k not in out)
        if self.intermixed:
            out.update((a.dest, a.default) for a in positionals)
        for arg in self.args:
            if arg.dest not in found and (arg.optional or arg.nargs == "?"):
                found[arg.dest] = arg.absent()
        out.update(found)
        return out


class _Group:
    """What add_mutually_exclusive_group() returns: its arguments are the command's, one of them at most given."""

    def __init__(self, spec: CommandSpec) -> None:
        self.spec = spec
        self.args: list[_Arg] = []

    def add_argument(self, *names: str, **kwargs: Any) -> _Opaque:
        opaque = self.spec.add_argument(*names, **kwargs)
        arg = self.spec.args[-1]
        if not arg.optional:
            raise Unsupported(names)
        self.args.append(arg)
        return opaque

    def __getattr__(self, name: str) -> Any:
        raise Unsupported(name)


def intermix(parser: Any) -> None:
    """Make `parser` (an argparse sub-parser or a `CommandSpec`) parse optionals and positionals intermixed,
    as argparse's parse_known_intermixed_args does (`grep DIR -E PATTERN`)."""
    if isinstance(parser, CommandSpec):
        parser.intermixed = True
        return
    parser.__class__ = _intermixed(type(parser))


def _intermixed(cls: type) -> type:
    """`cls`, an argparse parser class, parsing optionals and positionals intermixed."""

    class Intermixed(cls):
        _mixing = False

        def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
            if self._mixing:  # parse_known_intermixed_args calls back here
                return super().parse_known_args(args, namespace)
            self._mixing = True
            try:
                return self.parse_known_intermixed_args(args, namespace)
            finally:
                self._mixing = False

    return Intermixed


class Recorder:
    """Stands in for argparse's sub-parser action in `crit_pageread_add_commands(subparsers=...)`."""

    def __init__(self) -> None:
        self.commands: dict[str, CommandSpec] = {}

    def add_parser(self, name: str, **kwargs: Any) -> CommandSpec:
        if set(kwargs) - _PARSER_KWARGS or name in self.commands or not name or name.startswith("-"):
            raise Unsupported(name)
        spec = self.commands[name] = CommandSpec(name)
        return spec

    def __getattr__(self, name: str) -> Any:
        raise Unsupported(name)


def parse(words: Sequence[str], pm: Any) -> Namespace | None:
    """The namespace argparse would make of `words` (the command line after the program name), with the
    commands `pm`'s plugins add; None where argparse would print something (help, an error) or might
    parse differently."""
    i = 0
    while i < len(words) and words[i] == "--debug":
        i += 1
    if i == len(words) or words[i].startswith("-"):
        return None
    recorder = Recorder()
    try:
        pm.hook.crit_pageread_add_commands(subparsers=recorder)
        spec = recorder.commands.get(words[i])
        if spec is None:
            return None
        sub = spec.parse(words[i + 1:])
    except Unsupported:
        return None
    # The top-level parser's defaults first (cli.main.build_parser: --version, --debug, the command).
    top = {"version": None, "debug": i > 0, "command": words[i]}
    top.update(sub)
    return Namespace(**top)
