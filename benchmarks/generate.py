"""Make large real CRIU checkpoints for the benchmarks, cached outside the clone.

Each shape is a real `criu dump` of tests/victim.c with bulk memory, kept in
`~/.cache/crit-pageread/bench/<shape>-<parameters>/images` (or under
`$CRIT_PAGEREAD_BENCH_CACHE`) and reused while its parameters are unchanged:

- `big`: 1 GiB over hundreds of VMAs, one untouched page in every 48, so the
  pagemap has thousands of entries (runs of 47 pages);
- `frag`: every other page untouched: tens of thousands of single-page entries
  with holes between them;
- `chain`: a 3-level incremental chain made from real dumps of one victim: the
  oldest image is a plain dump, the two newer ones are later dumps of the same
  victim whose pagemaps are rewritten so that most entries are `PE_PARENT`
  (their pages dropped from the pages file) and the rest stay present.

usage: python -m benchmarks.generate [--shape big|frag|chain|all] [--force]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from criu_harness import dump, start_victim  # noqa: E402

from crit_pageread.pagemap import PE_PARENT, PE_PRESENT, encode_pagemap, load_pagemap  # noqa: E402

FORMAT = 1  # bump to regenerate every cached checkpoint


@dataclass(frozen=True)
class Shape:
    """A checkpoint shape: victim arguments and how many chain levels to build."""

    name: str
    mib: int
    vmas: int
    holes: int
    levels: int = 1

    @property
    def key(self) -> str:
        return f"{self.name}-m{self.mib}-v{self.vmas}-h{self.holes}-l{self.levels}-f{FORMAT}"

    def victim_args(self) -> list[str]:
        return ["--seed", "7", "--mib", str(self.mib), "--vmas", str(self.vmas), "--holes", str(self.holes)]


SHAPES = {
    "big": Shape("big", 1048, 400, 48),
    "frag": Shape("frag", 256, 128, 2),
    "chain": Shape("chain", 256, 64, 16, levels=3),
}


def cache_root() -> Path:
    env = os.environ.get("CRIT_PAGEREAD_BENCH_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "crit-pageread" / "bench"


def victim_exe() -> Path:
    """tests/victim.c compiled into the cache, keyed by its source."""
    src = ROOT / "tests" / "victim.c"
    digest = hashlib.sha256(src.read_bytes()).hexdigest()[:12]
    exe = cache_root() / f"victim-{digest}"
    if not exe.exists():
        exe.parent.mkdir(parents=True, exist_ok=True)
        tmp = exe.with_suffix(".tmp")
        subprocess.run(["gcc", "-O2", "-o", str(tmp), str(src), "-lpthread"], check=True)
        os.replace(tmp, exe)
    return exe


def images_dir(shape: Shape) -> Path:
    """The newest image directory of a shape (the chain's top level)."""
    base = cache_root() / shape.key
    return base / (f"level{shape.levels}" if shape.levels > 1 else "images")


def generate(shape: Shape, force: bool = False) -> Path:
    """Dump the shape's victim with real CRIU unless it is cached; return the image directory."""
    base = cache_root() / shape.key
    done = base / "done.json"
    if done.exists() and not force:
        return images_dir(shape)
    if base.exists():
        shutil.rmtree(base)
    work = base.with_name(base.name + ".tmp")
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    started = time.monotonic()
    victim = start_victim(victim_exe(), work / "victim", *shape.victim_args(), timeout=300)
    try:
        if shape.levels == 1:
            dump(victim, work / "images", timeout=600)
        else:
            for level in range(1, shape.levels + 1):
                extra = ["--leave-running"] if level < shape.levels else []
                dump(victim, work / f"level{level}", *extra, timeout=600)
            _make_chain(work, shape.levels)
    finally:
        victim.kill()
    info = {"shape": shape.__dict__, "seconds": round(time.monotonic() - started, 1), "victim": victim.info["pid"]}
    (work / "done.json").write_text(json.dumps(info, indent=2) + "\n")
    os.rename(work, base)
    return images_dir(shape)


def _make_chain(work: Path, levels: int) -> None:
    """Rewrite dumps level2.. into incremental images whose parent is the level below.

    In level L (L >= 2) an entry stays present when its index is a multiple of
    L + 1, otherwise it becomes `PE_PARENT` and its pages leave the pages file.
    Every dump is of the same unchanged victim, so the parent holds equal bytes.
    """
    for level in range(2, levels + 1):
        top = work / f"level{level}"
        (top / "parent").symlink_to(f"../level{level - 1}")
        for pagemap_path in sorted(top.glob("pagemap-*.img")):
            if pagemap_path.name.startswith("pagemap-shmem"):
                continue
            pagemap = load_pagemap(pagemap_path, os.sysconf("SC_PAGE_SIZE"))
            pages_path = pagemap.pages_path
            runs: list[tuple[int, int, int]] = []
            tmp = pages_path.with_suffix(".tmp")
            with open(pages_path, "rb") as src, open(tmp, "wb") as out:
                for index, entry in enumerate(pagemap.entries):
                    if not entry.present:
                        runs.append((entry.vaddr, entry.nr_pages, entry.flags))
                    elif index % (level + 1) == 0:
                        src.seek(entry.offset)
                        out.write(src.read(entry.size))
                        runs.append((entry.vaddr, entry.nr_pages, PE_PRESENT))
                    else:
                        runs.append((entry.vaddr, entry.nr_pages, PE_PARENT))
            os.replace(tmp, pages_path)
            data = encode_pagemap(pagemap.pages_id, runs, pagemap.layout)
            pagemap_path.write_bytes(data)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=[*SHAPES, "all"], default="all")
    parser.add_argument("--force", action="store_true", help="dump again even if cached")
    args = parser.parse_args(argv)
    names = list(SHAPES) if args.shape == "all" else [args.shape]
    for name in names:
        path = generate(SHAPES[name], force=args.force)
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
