"""Real checkpoints to mutate, made here with real CRIU: one process, a process tree with shared memory, a
2-level incremental chain (tests/chains.py) and a lazy dump (pages left on CRIU's page server)."""

from __future__ import annotations

import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent / "tests"


def build(work: Path, *, lazy: bool = True) -> list[tuple[Path, str]]:
    """Dump the victim program in a few shapes under `work`; return (root, newest level) pairs."""
    sys.path.insert(0, str(TESTS))
    from chains import make_chain
    from criu_harness import build_victim, dump, start_lazy_dump, start_victim

    (work / "bin").mkdir(parents=True, exist_ok=True)
    exe = build_victim(work / "bin")
    out: list[tuple[Path, str]] = []
    victim = start_victim(exe, work / "run1", "--mib", "2", "--holes", "5", "--seed", "3")
    try:
        dump(victim, work / "single" / "images")
    finally:
        victim.kill()
    out.append((work / "single", "images"))
    victim = start_victim(exe, work / "run2", "--mib", "1", "--tree", "2", "--shm", "--holes", "3", ipc_ns=True)
    try:
        dump(victim, work / "tree" / "images")
    finally:
        victim.kill()
    out.append((work / "tree", "images"))
    top = make_chain(work / "single" / "images", work / "chain", 2, seed=5)
    out.append((work / "chain", Path(top).name))
    if lazy:
        victim = start_victim(exe, work / "run3", "--mib", "1", "--holes", "4")
        criu = None
        try:
            criu, _port = start_lazy_dump(victim, work / "lazy" / "images")
        finally:
            if criu is not None:
                criu.kill()
                criu.wait()
            victim.kill()
        out.append((work / "lazy", "images"))
    return out
