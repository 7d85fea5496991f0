"""Every example of README.md runs, on checkpoints this test makes with real CRIU, so the README cannot drift.

How the README's blocks are read:
- ```sh: run by bash (`set -e`) in a directory that holds `images/` (a dump of the demo's program, made
  with the `crit-pageread-manifest` action script; `$PID` is its pid, `$ADDR` the address of its secret),
  `chain/d3` (a 3-level incremental chain of it), `lazy-dump/` (a `criu dump --lazy-pages` of the same
  program that CRIU serves; `remote.toml` names its port; made afresh for each block that uses it), and
  `examples/`, `hooks/` (the checkout's). `$PORT` is a free port. Whatever a block restores is killed after it.
- ```python: run by the venv's python in the same directory (`tests/` on sys.path).
- ```console: a transcript: the `$ ` line is run, its output must have the lines shown (numbers, quoted
  strings and absolute paths may differ).
- ```toml: parsed; a config (not a pyproject fragment) is loaded as a config file.
- ``` (no language): a synopsis: each `crit-pageread CMD ...` line names a command, and its options exist.
- A block right after `<!-- not run: REASON -->` is only parsed; that set is listed here and kept tiny.
Indented `$ ` lines are shell examples too; the README has none left (the test says so if one comes back).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from chains import make_chain
from criu_harness import Victim, run_criu, start_lazy_dump, start_victim
from restore_support import REPO, kill_tree

from crit_pageread.config import load_config
from crit_pageread.criu_env import criu_binary

README = REPO / "README.md"
#: How many blocks may be parsed only (each says why in the README): make demo/test, three terminals, Dask.
NOT_RUN_ALLOWED = 3
VICTIM_ARGS = ("--mib", "2", "--vmas", "2", "--seed", "3")


@dataclass
class Block:
    line: int
    lang: str
    text: str
    not_run: str | None

    def __str__(self) -> str:
        return f"README.md:{self.line} ({self.lang or 'synopsis'})"


def readme_blocks(text: str) -> list[Block]:
    blocks: list[Block] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"^```(\w*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        start = i
        j = i + 1
        while j < len(lines) and lines[j].strip() != "```":
            j += 1
        prev = next((lines[k] for k in range(start - 1, -1, -1) if lines[k].strip()), "")
        reason = re.match(r"^<!-- not run: (.+?) -->$", prev.strip())
        body = "\n".join(lines[start + 1 : j])
        blocks.append(Block(start + 1, m.group(1), body, reason.group(1) if reason else None))
        i = j + 1
    return blocks


BLOCKS = readme_blocks(README.read_text())


class Workspace:
    """The directory the examples run in, with its checkpoints and the processes to clean up."""

    def __init__(self, root: Path, exe: Path, victim: Victim) -> None:
        self.root = root
        self.exe = exe
        self.victim = victim
        self.lazy: subprocess.Popen[bytes] | None = None
        self.lazy_victim: Victim | None = None

    def env(self) -> dict[str, str]:
        bindir = Path(sys.executable).parent
        return {
            **os.environ,
            "PATH": f"{bindir}:{Path(criu_binary()).parent}:/usr/sbin:/usr/bin:/sbin:/bin",
            "PID": str(self.victim.pid),
            "ADDR": hex(self.victim.info["secret"]["addr"]),
            "PORT": str(_free_port()),
            "PYTHONPATH": str(REPO / "tests"),
        }

    def fresh_lazy_dump(self) -> None:
        """`lazy-dump/`: a lazy dump that CRIU serves now, and remote.toml with its port."""
        self.stop_lazy()
        for name in ("lazy-dump", "lazy-run"):  # a victim.json left there would be taken for the new one's
            shutil.rmtree(self.root / name, ignore_errors=True)
        self.lazy_victim = start_victim(self.exe, self.root / "lazy-run", *VICTIM_ARGS)
        self.lazy, port = start_lazy_dump(self.lazy_victim, self.root / "lazy-dump")
        (self.root / "remote.toml").write_text(f"[remote]\nport = {port}\n")

    def stop_lazy(self) -> None:
        if self.lazy is not None:
            if self.lazy.poll() is None:
                self.lazy.kill()
            self.lazy.wait()
            self.lazy = None
        if self.lazy_victim is not None:
            self.lazy_victim.kill()
            self.lazy_victim = None

    def clean_up(self) -> None:
        """Kill what a block restored (the dumped program's pid) and reset what blocks write."""
        if os.path.exists(f"/proc/{self.victim.pid}"):
            kill_tree(self.victim.pid)
        for name in ("squashed", "squashed-lazy", "cores", "out", "out.bin", "chains", "work"):
            path = self.root / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def workspace(victim_exe: Path, tmp_path_factory: pytest.TempPathFactory, pipe_max_size: None) -> Iterator[Workspace]:
    root = tmp_path_factory.mktemp("readme")
    for name in ("examples", "hooks"):
        (root / name).symlink_to(REPO / name)
    victim = start_victim(victim_exe, root / "run", *VICTIM_ARGS)
    (root / "images").mkdir()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}"}
    try:
        run_criu(["dump", "-t", str(victim.pid), "-D", "images", "-o", "dump.log", "-v4",
                  "--action-script", "crit-pageread-manifest"], cwd=root, env=env, log=root / "images" / "dump.log")
        victim.reap()
        make_chain(root / "images", root / "chain", levels=3, seed=1)
        ws = Workspace(root, victim_exe, victim)
        yield ws
    finally:
        victim.kill()
        if "ws" in locals():
            ws.stop_lazy()
            ws.clean_up()


def _run_sh(ws: Workspace, block: Block) -> None:
    if "lazy-dump" in block.text:
        ws.fresh_lazy_dump()
    script = f"set -e\n{block.text}\nwait\n"
    proc = subprocess.run(["bash", "-c", script], cwd=ws.root, env=ws.env(), capture_output=True, text=True,
                          timeout=300, start_new_session=True)
    assert proc.returncode == 0, (
        f"{block}: exit {proc.returncode}\n{block.text}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def _run_python(ws: Workspace, block: Block) -> None:
    proc = subprocess.run([sys.executable, "-c", block.text], cwd=ws.root, env=ws.env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, f"{block}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def _shape(line: str) -> str:
    """A line with its numbers, hex numbers, quoted strings and absolute paths blanked, runs of blanks squeezed."""
    line = re.sub(r"'[^']*'", "'…'", line)
    line = re.sub(r"(?<![\w.])/[^\s()]+", "/…", line)
    line = re.sub(r"0x[0-9a-f]+|\d+(\.\d+)?", "#", line)
    return re.sub(r"\s+", " ", line).strip()


def _run_console(ws: Workspace, block: Block) -> None:
    lines = block.text.splitlines()
    assert lines[0].startswith("$ "), f"{block}: a transcript starts with `$ COMMAND`"
    cmd = lines[0][2:].replace("sudo ", "").replace(".venv/bin/python", sys.executable)
    proc = subprocess.run(["bash", "-c", cmd], cwd=REPO, env=ws.env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{block}: {proc.stderr[-3000:]}"
    assert [_shape(x) for x in proc.stdout.splitlines()] == [_shape(x) for x in lines[1:]], (
        f"{block}: the output has changed:\n{proc.stdout}")


def _check_toml(block: Block, tmp: Path) -> None:
    data = tomllib.loads(block.text)
    if "project" not in data:
        path = tmp / "example.toml"
        path.write_text(block.text)
        load_config(str(path))


def _check_synopsis(block: Block) -> None:
    from crit_pageread.cli.main import build_parser

    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    joined = re.sub(r"\n\s+(?=[\[-])", " ", block.text)  # continuation lines of a synopsis
    for line in joined.splitlines():
        words = line.split()
        if len(words) < 2 or words[0] != "crit-pageread":
            continue
        assert words[1] in commands, f"{block}: no command {words[1]!r}"
        sub = commands[words[1]]
        known = {opt for action in sub._actions for opt in action.option_strings}
        for opt in re.findall(r"(?<![\w-])(--?[a-zA-Z][\w-]*)", line.split("#")[0]):
            assert opt in known, f"{block}: `{words[1]}` has no option {opt}"


def test_readme_has_no_indented_shell_examples() -> None:
    text = README.read_text()
    assert not re.findall(r"(?m)^    \$ .*$", text), "put shell examples in ```sh blocks so that they are run"


def test_only_a_few_readme_examples_are_not_run() -> None:
    not_run = [b for b in BLOCKS if b.not_run]
    assert len(not_run) <= NOT_RUN_ALLOWED, [f"{b}: {b.not_run}" for b in not_run]


@pytest.mark.parametrize("block", BLOCKS, ids=str)
def test_readme_example_runs(block: Block, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    if block.lang == "":
        _check_synopsis(block)
        return
    if block.lang == "json":
        return  # shapes of output, with `...` where a list goes on
    if block.lang == "toml":
        _check_toml(block, tmp_path)
        return
    assert block.lang in ("sh", "python", "console"), f"{block}: unknown block language {block.lang!r}"
    if block.not_run:  # parsed only
        if block.lang == "python":
            compile(block.text, str(block), "exec")
        else:
            subprocess.run(["bash", "-n", "-c", block.text], check=True)
        return
    ws: Workspace = request.getfixturevalue("workspace")
    try:
        {"sh": _run_sh, "python": _run_python, "console": _run_console}[block.lang](ws, block)
    finally:
        ws.stop_lazy()
        ws.clean_up()
