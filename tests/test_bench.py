"""`crit-pageread bench`: what it materializes is the checkpoint's memory, and its report adds up.

Timings are never asserted (benchmarks are scripts); the bytes every strategy
materializes are checked page by page against the shared fixtures' truth
(`/proc/PID/mem` of the restored tasks).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
from corpus import Corpus

from crit_pageread import open_images
from crit_pageread.cli.bench import (
    LIMIT,
    allocate,
    chain_pages_files,
    materialize,
    materialized_bytes,
    memory_layout,
    open_indexed,
    run_counts,
)
from crit_pageread.cli.main import main
from crit_pageread.strategies.preadv import IOV_MAX

CASES = {"b_tree": "b_tree", "e2_chain2": "e2_chain2/d2"}


def truth_pages(corpus: Corpus, case: str, pid: int) -> dict[int, str]:
    """Page hashes by address (`/proc/PID/mem` of the restored task)."""
    lines = (corpus.root / "truth" / case / f"pid-{pid}.sha256").read_text().splitlines()
    return {int(line.split()[0], 16): line.split()[1] for line in lines if not line.startswith("TOTAL")}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("strategy", ["pread", "preadv", "mmap"])
def test_materialize_fills_the_buffer_with_the_true_pages(corpus: Corpus, case: str, strategy: str) -> None:
    """Every true page lands at its place in its span; the holes between entries stay untouched."""
    images, _ = open_indexed(corpus.root / "cases" / CASES[case])
    with images:
        size = materialized_bytes(images)
        layout, span_bytes = memory_layout(images)
        buf = allocate(span_bytes)
        view = memoryview(buf)
        try:
            result = materialize(images, strategy, view, layout)
            assert result["bytes"] == size
            seen = 0
            zero = hashlib.sha256(bytes(4096)).hexdigest()
            for pid, spans in layout.items():
                want = truth_pages(corpus, case, pid)
                for vaddr, off, length, _data in spans:
                    for a in range(vaddr, vaddr + length, 4096):
                        got = hashlib.sha256(view[off + a - vaddr : off + a - vaddr + 4096]).hexdigest()
                        assert got == want.get(a, zero), f"pid {pid} page {a:#x}"
                        seen += a in want
                assert seen and all(any(v <= a < v + n for v, _, n, _ in spans) for a in want)
                seen = 0
        finally:
            view.release()
            buf.close()


@pytest.mark.parametrize("case", sorted(CASES))
def test_bench_json_report_adds_up(corpus: Corpus, case: str, capsys: pytest.CaptureFixture[str]) -> None:
    directory = corpus.root / "cases" / CASES[case]
    assert main(["bench", str(directory), "--json", "--runs", "2", "--warmup", "0"]) == 0
    report = json.loads(capsys.readouterr().out)
    with open_images(directory) as images:
        need = materialized_bytes(images)
        files = chain_pages_files(images)
        runs, iovecs_by_pid = run_counts(images)
    assert set(report["methods"]) >= {LIMIT, "pread", "preadv", "mmap"}
    assert report["materialized_bytes"] == need
    assert report["pages_file_bytes"] == sum(p.stat().st_size for p in files)
    assert report["file_runs"] == sum(runs.values())
    assert report["iovec_runs"] == sum(iovecs_by_pid.values())
    assert report["methods"][LIMIT]["bytes"] == report["pages_file_bytes"]
    for name, res in report["methods"].items():
        assert res["runs"] == 2
        assert res["min_s"] <= res["median_s"] <= res["max_s"]
        if name != LIMIT:
            assert res["bytes"] == need
    assert report["methods"][LIMIT]["vs_limit"] == pytest.approx(1.0)
    # preadv: one call per contiguous file run (none holds more than IOV_MAX iovecs here)
    assert report["methods"]["preadv"]["calls"] == report["file_runs"]
    calls = report["methods"]["preadv"]["calls_by_pid"]
    for pid, n in runs.items():
        assert n >= 1
        assert calls[str(pid)] == n
        iovecs = report["iovec_runs_by_pid"][str(pid)]
        assert iovecs >= n  # a file run holds one or more ranges contiguous in memory too
        if case == "b_tree":  # a plain dump: each pagemap is one run in its pages file
            assert n == 1
            assert calls[str(pid)] <= math.ceil(iovecs / IOV_MAX) + 1


def test_bench_table_and_one_strategy(corpus: Corpus, capsys: pytest.CaptureFixture[str]) -> None:
    directory = corpus.root / "cases" / "a_single"
    assert main(["bench", str(directory), "--strategy", "pread", "--runs", "1", "--warmup", "0"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "materialized" in lines[0] and "warm cache" in lines[0]
    assert [line.split()[0] for line in lines[2:]] == [LIMIT, "pread"]


@pytest.mark.parametrize("argv", [["--runs", "0"], ["--warmup", "-1"]])
def test_bench_bad_options_are_one_line(corpus: Corpus, capsys: pytest.CaptureFixture[str],
                                        argv: list[str]) -> None:
    assert main(["bench", str(corpus.root / "cases" / "a_single"), *argv]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("crit-pageread: ") and "--runs" in err[0]


def test_bench_missing_directory_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", str(tmp_path / "nope")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope" in err[0]


def test_benchmark_children_report_their_own_peak_rss(tmp_path: Path) -> None:
    """Linux keeps a process's peak RSS across exec, so a command forked from a large process reports the
    parent's peak; the benchmarks' spawner forks from a small process instead."""
    from benchmarks.spawn import spawn

    ballast = bytearray(300 << 20)
    ballast[::4096] = b"x" * len(range(0, len(ballast), 4096))  # 300 MiB resident in this process
    out = spawn(["cat", "/proc/self/status"])
    assert out["code"] == 0 and b"VmHWM" in out["stdout"]
    assert out["rss_mib"] < 100, out["rss_mib"]
    target = tmp_path / "out"
    res = spawn(["sh", "-c", "echo hi; echo err >&2; exit 3"], str(target), tmp_path)
    assert (res["code"], res["stdout"], res["stderr"], target.read_bytes()) == (3, b"", b"err\n", b"hi\n")
    del ballast
