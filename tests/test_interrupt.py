"""Ctrl-C at a random moment of a real command (start-up included): one line, exit 130, no temporary left."""

from __future__ import annotations

import collections
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hostile_support import PAGE, Dump, make_dump

from crit_pageread.output import parse_temp_name

RUNS = 30
SEED = 11


@pytest.fixture(scope="module")
def small(criu_ok: None, tmp_path_factory: pytest.TempPathFactory) -> Dump:
    return make_dump(tmp_path_factory.mktemp("interrupt"))


def _default_sigint() -> None:
    # A background job inherits SIGINT ignored (CI runners may start us so): give the child the default.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def classify(proc: subprocess.Popen[bytes], err: str) -> str:
    lines = err.splitlines()
    if proc.returncode == 130 and lines == ["crit-pageread: interrupted"]:
        return "interrupted"
    if proc.returncode == 0 and not lines:
        return "finished"  # done before the signal came
    if proc.returncode == -signal.SIGINT and not lines:
        return "killed-before-python"  # the default action, before the interpreter set its handler
    if "Traceback" in err and not any("/crit_pageread/" in line for line in lines):
        # The interpreter's own start-up (site, the console script's `import re`) before the
        # first line of crit_pageread ran: no code of ours can run there.
        return "interpreter-start-up"
    return "NOT CLEAN"


def test_sigint_at_random_moments_is_one_line_and_exit_130(small: Dump, tmp_path: Path):
    exe = Path(sys.executable).parent / "crit-pageread"
    rng = random.Random(SEED)
    outcomes: collections.Counter[str] = collections.Counter()
    bad = []
    out = tmp_path / "out.bin"
    length = 64 * PAGE
    for _ in range(RUNS):
        delay = rng.uniform(0, 0.5)
        proc = subprocess.Popen(
            [str(exe), "read", str(small.images), "--pid", str(small.pid), hex(small.vaddr), str(length), "--zero-fill",
             "-o", str(out)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=_default_sigint,
        )
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        _, raw = proc.communicate(timeout=60)
        kind = classify(proc, raw.decode(errors="replace"))
        outcomes[kind] += 1
        if kind == "NOT CLEAN":
            bad.append((round(delay, 3), proc.returncode, raw.decode(errors="replace")[-1500:]))
        leftover = [n for n in os.listdir(tmp_path) if parse_temp_name(n)]
        assert not leftover, (delay, kind, leftover)
    print(f"SIGINT outcomes over {RUNS} runs: {dict(outcomes)}")
    assert not bad, bad
    assert outcomes["interrupted"] > 0


SET_NAME_INTERRUPT = r"""
import os, signal, sys
sys.argv[0] = "crit-pageread"
from crit_pageread.cli import main as cli_main

class Interrupting:
    def __set_name__(self, owner, name):
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while a class is made (as in an import)

def command(argv, words, debug):
    class Made:
        attribute = Interrupting()
    return 0

cli_main._main = command
sys.exit(cli_main.main([]))
"""


def test_sigint_while_a_class_is_made_is_one_line_and_exit_130():
    # Python 3.11 wraps an exception raised in __set_name__ (functools.cached_property in an import) in a
    # RuntimeError caused by it: that is still Ctrl-C, not a traceback.
    proc = subprocess.run([sys.executable, "-c", SET_NAME_INTERRUPT], capture_output=True, text=True, timeout=60,
                          preexec_fn=_default_sigint)
    assert (proc.returncode, proc.stderr.splitlines()) == (130, ["crit-pageread: interrupted"]), proc.stderr
