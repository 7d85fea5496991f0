"""Every command's --json follows the README's convention (NDJSON streams, one-line documents, shared keys).

Each command runs as a user runs it (a fresh interpreter) on a real CRIU dump; the restore and push
go through real CRIU. The list of commands comes from the parser: a new command without a case here
fails the coverage test.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from criu_harness import Victim, dump, free_port, start_victim, wait_listening
from restore_support import REPO, kill_tree, run_cli

from crit_pageread.cli.main import build_parser
from crit_pageread.criu_env import criu_binary

#: crit's own commands: their JSON is crit's (decode/show) or they have none (encode/info).
CRIT_JSON = {"decode", "encode", "info", "show"}
#: Keys that used to name the same things as the convention's keys.
RETIRED = {"source", "images_dir", "dir", "target", "path", "nr_pages"}
INT_KEYS = {"pid", "ppid", "pgid", "sid", "shmem", "vaddr", "start", "end", "length", "pages", "bytes"}
STR_KEYS = {"checkpoint", "perms", "kind", "mapping", "output"}
STREAMS = {"grep", "ps", "pages", "coredump", "plugins", "x", "scan", "check", "setup-criu"}


@pytest.fixture(scope="module")
def dumped(victim_exe: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Victim, Path]]:
    work = tmp_path_factory.mktemp("json")
    victim = start_victim(victim_exe, work / "run", "--tree", "1", "--mib", "2", "--vmas", "2", "--shm", ipc_ns=True)
    try:
        dump(victim, work / "images")
        yield victim, work / "images"
    finally:
        victim.kill()


def check_keys(obj: Any, where: str) -> None:
    """The shared keys have their types, recursively; no retired key is left."""
    if isinstance(obj, list):
        for item in obj:
            check_keys(item, where)
    elif isinstance(obj, dict):
        for key, value in obj.items():
            assert key not in RETIRED, f"{where}: retired key {key!r}"
            if key == "vma":  # a VMA as `x DIR mems` lists them (a "start-end" string is retired)
                assert isinstance(value, dict) and {"start", "end", "perms", "kind", "mapping"} <= set(value), \
                    f"{where}: vma={value!r} is not a VMA object"
            if key in INT_KEYS:
                assert isinstance(value, int) and not isinstance(value, bool), f"{where}: {key}={value!r} not an int"
            if key in STR_KEYS:
                assert isinstance(value, str), f"{where}: {key}={value!r} not a string"
            check_keys(value, where)


def parse(command: str, stdout: str) -> list[dict[str, Any]]:
    """Every line is one JSON object; a single result is exactly one line and names the checkpoint."""
    lines = stdout.splitlines()
    assert lines, f"{command}: no output"
    objs = [json.loads(line) for line in lines]
    assert all(isinstance(o, dict) for o in objs), f"{command}: a line is not an object"
    for o in objs:
        check_keys(o, command)
    if command.split()[0] not in STREAMS:
        assert len(objs) == 1, f"{command}: a single result printed {len(objs)} lines"
        assert "checkpoint" in objs[0], f"{command}: no checkpoint key"
    return objs


def run_json(*args: str) -> list[dict[str, Any]]:
    proc = run_cli(*args, "--json")
    assert proc.returncode == 0, f"{args}: {proc.stderr}"
    return parse(" ".join(a for a in args if not a.startswith("/")), proc.stdout)


def test_every_command_json_is_ndjson_or_one_document_with_the_shared_keys(
    dumped: tuple[Victim, Path], tmp_path: Path
) -> None:
    victim, images = dumped
    d = str(images)
    pid = victim.pid
    secret = victim.info["secret"]
    seen: set[str] = set()

    def case(name: str, *args: str) -> list[dict[str, Any]]:
        seen.add(name)
        return run_json(name, *args)

    doc = case("read", d, "--pid", str(pid), hex(secret["addr"]), str(len(secret["text"])))[0]
    assert bytes.fromhex(doc["hex"]).decode() == secret["text"] and doc["pid"] == pid
    out = tmp_path / "secret.bin"
    doc = case("read", d, "--pid", str(pid), hex(secret["addr"]), str(len(secret["text"])), "-o", str(out))[0]
    assert doc["output"] == str(out) and "hex" not in doc and out.read_bytes() == secret["text"].encode()
    checked = case("check", d)
    assert checked[-1]["ok"] is True and checked[-1]["checkpoint"] == d and checked[-1]["errors"] == 0
    hits = case("grep", d, secret["text"])
    assert any(h["vaddr"] == secret["addr"] and h["start"] <= h["vaddr"] < h["end"] for h in hits)
    found = case("scan", "--rules", str(REPO / "examples" / "rules.yar"), d)
    assert any(m["vaddr"] == secret["addr"] and m["checkpoint"] == d and
               m["vma"]["start"] <= m["vaddr"] < m["vma"]["end"] and m["mapping"] == m["vma"]["mapping"]
               for m in found)
    index = case("extract", d, "-o", str(tmp_path / "ex"))[0]
    assert index["output"] == str(tmp_path / "ex") and index["files"]
    procs = case("ps", d)
    assert sorted(p["pid"] for p in procs) == sorted([pid, *victim.info["children"]])
    sections = case("pages", d)
    assert {s["pid"] for s in sections if "pid" in s} == {p["pid"] for p in procs}
    assert any("shmem" in s for s in sections)
    assert any(p["name"] == "crit_pageread.cli.read" for p in case("plugins"))
    assert case("bench", d, "--runs", "1", "--warmup", "0", "--strategy", "pread")[0]["checkpoint"] == d
    squashed = case("squash", d, str(tmp_path / "sq"))[0]
    assert {t["pid"] for t in squashed["targets"] if "pid" in t} == {p["pid"] for p in procs}
    cores = case("coredump", d, "-o", str(tmp_path / "cores"))
    assert {c["output"] for c in cores} == {str(tmp_path / "cores" / f"core.{p['pid']}") for p in procs}
    for what in ("ps", "fds", "mems", "rss", "pages"):
        rows = case("x", d, what)
        assert sorted(r["pid"] for r in rows) == sorted(p["pid"] for p in procs), what
    (line,) = case("setup-criu", "--criu", "4.1")  # provisioned already: only says what it has
    assert line["line"] == "4.1" and line["version"].startswith("4.1.") and line["criu"] and line["pycriu"]
    rows = run_json("x", d, "mems", "--pages")
    assert all("present" in v for r in rows for v in r["vmas"])
    report = case("inspect", d)[0]
    assert report["container"] is None and report["dump_statistics"]
    assert sorted(p["pid"] for p in report["processes"]) == sorted(p["pid"] for p in procs)

    # serve: its listening line is the document
    seen.add("serve")
    serve = subprocess.Popen([*CLI, "serve", d, "--port", "0", "--json"], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert serve.stdout is not None
        line = serve.stdout.readline()
    finally:
        serve.terminate()
        serve.wait(30)
    assert parse("serve", line)[0]["checkpoint"] == d

    # push into a real criu page-server
    seen.add("push")
    port = free_port()
    received = tmp_path / "received"
    received.mkdir()
    server = subprocess.Popen([criu_binary(), "page-server", "-D", str(received), "-o", "ps.log",
                               "--address", "127.0.0.1", "--port", str(port)])
    try:
        wait_listening(port, server)
        pushed = run_json("push", d, "--port", str(port))[0]
        assert server.wait(30) == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    assert pushed["port"] == port and {t["pid"] for t in pushed["targets"] if "pid" in t} == {p["pid"] for p in procs}

    # restore with real CRIU (the dump killed the victim: its pids are free)
    result = case("restore", d, "--leave-stopped", "--cpus", "0")[0]
    kill_tree(result["pid"])
    assert result["pid"] == pid and result["checkpoint"] == d

    commands = set(build_parser()._subparsers._group_actions[0].choices)  # type: ignore[union-attr]
    assert commands - CRIT_JSON - seen == set(), "commands whose --json this test does not check"


CLI = [sys.executable, "-m", "crit_pageread"]
