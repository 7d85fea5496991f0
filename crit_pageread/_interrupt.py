"""Ctrl-C on the command line, from its first instant: one line on stderr, exit 130.

Python turns SIGINT into KeyboardInterrupt, which prints a traceback wherever
it lands: in an import at start-up, in an exception handler, at exit. The
command line installs `exit_now` first thing (at the top of the package, before
any import of ours), lets `main()` run with KeyboardInterrupt (so outputs and
temporary files are cleaned up by their `with` blocks), and puts `exit_now`
back as soon as `main()` is done. Library use is untouched: this only acts
when the process is `crit-pageread` or `python -m crit_pageread`. Uses only
modules loaded before any import (`os`, `sys`, and the built-in `_signal`:
`signal.py` would import `enum` first), and no `from __future__` (a module import too).
"""

import _signal
import os
import sys

from . import _exit_on_interrupt

MESSAGE = b"crit-pageread: interrupted\n"
#: The handler, defined at the very top of the package (`crit_pageread/__init__.py`) so that it is in
#: place before the first module file is imported.
exit_now = _exit_on_interrupt


def is_command_line() -> bool:
    """Whether this process is the `crit-pageread` console script or `python -m crit_pageread`."""
    if os.path.basename(sys.argv[0] if sys.argv else "") == "crit-pageread":
        return True
    argv = getattr(sys, "orig_argv", [])
    return any(a == "-mcrit_pageread" or (a == "-m" and argv[i + 1] == "crit_pageread")
               for i, a in enumerate(argv[:-1]))


def _swap(old: object, new: object) -> None:
    """Replace the SIGINT handler `old` by `new` (never one that someone else set, nor SIG_IGN)."""
    try:
        if _signal.getsignal(_signal.SIGINT) is old:
            _signal.signal(_signal.SIGINT, new)
    except ValueError:  # not the main thread
        pass


def install_early() -> None:
    """SIGINT exits at once with one line (start-up and shut-down of the command line)."""
    _swap(_signal.default_int_handler, exit_now)


def raise_keyboard_interrupt() -> None:
    """SIGINT raises KeyboardInterrupt again (inside `main()`, where `with` blocks clean up)."""
    _swap(exit_now, _signal.default_int_handler)
