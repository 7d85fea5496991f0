"""What a new user meets first: help texts, one-line errors that say what is wrong, honest notes and counts.

Synthetic image directories (crit_pageread.testing) where CRIU is not needed; `show` uses the system's crit.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from crit_pageread.cli.main import COMMAND_PLUGINS, build_parser
from crit_pageread.testing import LAZY, ImageBuilder, VmaSpec

PAGE = 4096
BASE = 0x7F0000000000


def cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "crit_pageread", *args], capture_output=True, text=True,
                          timeout=120, env=env, cwd=cwd)


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """One process: 4 present pages, 2 lazy pages, then a VMA with no page dumped; a shmem segment."""
    b = ImageBuilder(tmp_path / "img")
    b.process(10, vmas=[VmaSpec(BASE, BASE + 6 * PAGE), VmaSpec(BASE + 8 * PAGE, BASE + 9 * PAGE)])
    b.pagemap(10, [(BASE, bytes(range(256)) * 64), (BASE + 4 * PAGE, 2, LAZY)])
    b.shmem_pagemap(3, [(0, b"S" * 2 * PAGE)])
    return b.write()


def test_help_lists_crits_five_commands_first_then_ours_in_registration_order() -> None:
    out = cli("--help").stdout
    listed = re.findall(r"(?m)^    (\w[\w-]*)\s", out.split("positional arguments:")[1])
    assert listed[:5] == ["decode", "encode", "info", "x", "show"]
    choices = build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    ranks = [COMMAND_PLUGINS.index(choices[name].get_default("func").__module__) for name in listed]
    assert ranks == sorted(ranks) and set(listed) == set(choices)  # registration order, every command


def test_read_help_says_one_pid_and_more_are_refused(images: Path) -> None:
    help_text = " ".join(cli("read", "--help").stdout.split())
    assert "--pid PID the process id (one;" in help_text and "repeatable" not in help_text
    proc = cli("read", str(images), hex(BASE), "--pid", "10", "--pid", "10")
    assert proc.returncode != 0 and "give one --pid" in proc.stderr


def test_coredump_usage_names_its_output_option() -> None:
    usage = " ".join(cli("coredump", "--help").stdout.split())
    assert "-o OUTPUT" in usage and "OUTDIR" not in usage


def test_an_address_beyond_the_address_space_is_out_of_range_not_undumped(images: Path) -> None:
    beyond = cli("read", str(images), "0xffffffffffff0000")
    assert beyond.returncode != 0 and beyond.stderr.count("\n") == 1
    assert "out of range" in beyond.stderr and f"{BASE + 9 * PAGE:#x}" in beyond.stderr
    hole = cli("read", str(images), hex(BASE + 8 * PAGE))
    assert hole.returncode != 0 and "out of range" not in hole.stderr and "not dumped" in hole.stderr


def test_show_of_a_pages_file_is_one_line_with_our_prefix(images: Path) -> None:
    pages = next(images.glob("pages-*.img"))
    for args in (("show", str(pages)), ("decode", "-i", str(pages)), ("info", str(pages))):
        proc = cli(*args)
        assert proc.returncode == 1 and proc.stdout == "", args
        assert proc.stderr.startswith(f"crit-pageread: {pages}: unknown magic ") and proc.stderr.count("\n") == 1
        assert "raw memory" in proc.stderr


def test_extract_of_a_lazy_dump_says_how_many_lazy_pages_it_left_out(images: Path, tmp_path: Path) -> None:
    proc = cli("extract", str(images), "-o", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    assert "2 lazy pages left out" in proc.stderr
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert [v["lazy_not_written"] for f in index["files"] for v in f["vmas"]] == [[[BASE + 4 * PAGE, BASE + 6 * PAGE]]]


def test_demo_exits_2_when_criu_is_missing(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-m", "crit_pageread.demo"], capture_output=True, text=True, env=env,
                          timeout=60)
    if os.geteuid() != 0:
        assert proc.returncode == 2 and "root" in proc.stderr
    else:
        assert proc.returncode == 2 and "criu not found" in proc.stderr, proc.stderr


def test_bench_with_shared_memory_compares_the_same_bytes(images: Path) -> None:
    proc = cli("bench", str(images), "--runs", "1", "--warmup", "0", "--strategy", "pread", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    counted = {name: m["bytes"] for name, m in report["methods"].items()}
    assert report["materialized_bytes"] == 4 * PAGE == report["pages_file_bytes"]
    assert set(counted.values()) == {4 * PAGE}, counted


def test_an_output_that_cannot_be_created_is_named_not_its_temporary_name(images: Path, tmp_path: Path) -> None:
    out = tmp_path / "no" / "such" / "dir" / "out"
    for args in (("read", str(images), hex(BASE), "-o", str(out)), ("extract", str(images), "-o", str(out)),
                 ("squash", str(images), str(out)), ("decode", "-i", str(images / "pstree.img"), "-o", str(out))):
        proc = cli(*args)
        assert proc.returncode != 0 and proc.stderr.startswith(f"crit-pageread: {out}: "), (args, proc.stderr)
        assert ".tmp" not in proc.stderr and proc.stderr.count("\n") == 1
