"""`scan --rules RULES CHECKPOINT...`: YARA rules (yara-x) over the memory of many checkpoints.

The scanning is crit_pageread.scan's; this module parses the options, runs the
tasks (in-process, a process pool, or a Dask cluster), and prints each
checkpoint's matches in the order the checkpoints were named, as soon as it and
the ones before it are done, so every way of running prints the same output.
"""

from __future__ import annotations

import os
import sys

from .. import TYPE_CHECKING
from ..errors import ConfigError
from ..hookspecs import hookimpl
from ..scan import (
    MAX_MATCHES,
    OVERLAP,
    WINDOW,
    CheckpointResult,
    Match,
    ScanOptions,
    compile_rules,
    expand_checkpoints,
    run_dask,
    run_local,
)
from .common import config_from_args, json_dumps
from .memscan import add_vma_filters, vma_filter_from_args
from .progress import Progress, before_output

if TYPE_CHECKING:  # argparse, typing and json are not imported at start-up (`--json` by json_dumps)
    import argparse
    from typing import Any

EXCERPT_SHOWN = 32


@hookimpl
def crit_pageread_add_commands(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "scan",
        help="run YARA rules over the memory of many checkpoints (yara-x; here or on a Dask cluster)",
        description="Scan every process's memory in every checkpoint with YARA rules (yara-x). Adjacent VMAs "
        "are scanned as one, so strings across page, pagemap-entry and VMA boundaries match; never across a "
        "hole. Prints a line per match, a summary per checkpoint on stderr. Exit 0 if something matched, "
        "1 if not, 2 on an error (a broken checkpoint is reported and the others are still scanned).",
    )
    p.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT",
                   help="image directory, checkpoint archive, glob, or a directory of those")
    p.add_argument("-r", "--rules", action="append", required=True, metavar="RULES",
                   help="YARA rules file, or a directory of *.yar/*.yara (repeatable)")
    p.add_argument("-j", "--jobs", type=int, default=None, metavar="N",
                   help="checkpoints scanned in parallel worker processes (default: the CPU count)")
    p.add_argument("--dask", metavar="ADDRESS",
                   help="run the tasks on this dask.distributed scheduler (e.g. tcp://host:8786)")
    p.add_argument("--pid", type=int, action="append", help="only these process ids (repeatable)")
    add_vma_filters(p)
    p.add_argument("--window", type=int, default=WINDOW, metavar="BYTES",
                   help=f"bytes scanned at once; longer runs in overlapping windows ({WINDOW >> 20} MiB)")
    p.add_argument("--overlap", type=int, default=OVERLAP, metavar="BYTES",
                   help=f"overlap of windows: the longest match found across a window edge ({OVERLAP})")
    p.add_argument("--max-matches", type=int, default=MAX_MATCHES, metavar="N",
                   help=f"matches recorded per string and scan (a window or a pack; {MAX_MATCHES})")
    p.add_argument("--timeout", type=int, default=0, metavar="SECONDS", help="yara-x timeout per window (none)")
    p.add_argument("--strategy", help="page-read strategy (pread, preadv, mmap, remote, ...)")
    p.add_argument("--config", help="TOML config file (else $CRIT_PAGEREAD_CONFIG, ./crit-pageread.toml)")
    p.add_argument("--json", action="store_true", help="one JSON object per match per line")
    p.set_defaults(func=run)


def _escape(data: bytes) -> str:
    return "".join(chr(b) if 0x20 <= b < 0x7F and b != 0x5C else f"\\x{b:02x}" for b in data)


def match_json(checkpoint: str, m: Match) -> dict[str, Any]:
    """A match as the README's JSON: the VMA holding `vaddr` is `vma`, in the form `x DIR mems` lists VMAs."""
    return {
        "checkpoint": checkpoint, "pid": m.pid, "vaddr": m.vaddr, "length": m.length, "rule": m.rule,
        "namespace": m.namespace, "tags": list(m.tags), "meta": dict(m.metadata), "identifier": m.identifier,
        "vma": {"start": m.start, "end": m.end, "perms": m.perms, "kind": m.kind, "mapping": m.mapping},
        "mapping": m.mapping, "hex": m.data.hex(), "excerpt": _escape(m.data[:EXCERPT_SHOWN]),
    }


def match_line(checkpoint: str, m: Match) -> str:
    head = m.rule
    if m.tags:
        head += f" [{','.join(m.tags)}]"
    if m.metadata:
        head += " [" + ",".join(f"{k}={json_dumps(v)}" for k, v in m.metadata) + "]"
    where = f"{checkpoint}:{m.pid}:{m.vaddr:#x}:{m.start:x}-{m.end:x} {m.perms} {m.mapping}"
    if m.identifier is None:
        return f"{head} {where}\n"
    shown = _escape(m.data[:EXCERPT_SHOWN]) + ("..." if m.length > EXCERPT_SHOWN else "")
    return f"{head} {where} {m.identifier}: {shown}\n"


def summary(res: CheckpointResult) -> str:
    if res.error is not None:
        return f"crit-pageread: scan: {res.checkpoint}: {res.error}"
    text = (f"crit-pageread: scan: {res.checkpoint}: {res.pids} processes, {res.bytes / (1 << 20):.1f} MiB in "
            f"{res.spans} spans, {len(res.matches)} matches of {res.rules} rules, {res.seconds:.3f} s, "
            f"{res.peak_rss_mib:.0f} MiB peak RSS")
    if res.lazy_skipped:
        text += f"; {res.lazy_skipped / (1 << 20):.1f} MiB of lazy pages not scanned (use --strategy remote)"
    if res.truncated:
        text += "; some strings matched more than --max-matches times in one scan (not all shown)"
    return text


def default_jobs() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def run(args: argparse.Namespace) -> int:
    jobs = default_jobs() if args.jobs is None else args.jobs
    if jobs < 1:
        raise ConfigError(f"--jobs {jobs}: must be >= 1")
    if args.window < 1 << 16:
        raise ConfigError(f"--window {args.window}: must be at least 65536")
    if not 0 <= args.overlap < args.window:
        raise ConfigError(f"--overlap {args.overlap}: must be 0 .. window-1")
    if args.max_matches < 1:
        raise ConfigError(f"--max-matches {args.max_matches}: must be >= 1")
    options = ScanOptions(
        config=config_from_args(args), pids=tuple(args.pid or ()), vfilter=vma_filter_from_args(args),
        window=args.window, overlap=args.overlap, max_matches=args.max_matches, timeout=args.timeout,
    )
    rules = compile_rules(args.rules)
    targets, bad = expand_checkpoints(args.checkpoints)
    errors = len(bad)
    for name, why in bad:
        print(f"crit-pageread: scan: {name}: {why}", file=sys.stderr)
    if not targets:
        return 2
    if args.dask:
        results = run_dask(targets, rules, options, args.dask)
    else:
        results = run_local(targets, rules, options, jobs)
    out = sys.stdout
    bar = Progress("scan", len(targets), unit="checkpoints")
    done: dict[int, CheckpointResult] = {}
    next_index = 0
    found = 0
    for index, res in results:
        done[index] = res
        while next_index in done:  # print in the order the checkpoints were named
            r = done.pop(next_index)
            next_index += 1
            name = r.checkpoint
            before_output()
            for m in r.matches:
                out.write(json_dumps(match_json(name, m)) + "\n" if args.json else match_line(name, m))
            out.flush()
            found += len(r.matches)
            errors += r.error is not None
            print(summary(r), file=sys.stderr)
        bar.add(1)
    bar.finish()
    if len(targets) > 1:
        print(f"crit-pageread: scan: {len(targets)} checkpoints, {found} matches, {errors} errors", file=sys.stderr)
    if errors:
        return 2
    return 0 if found else 1
