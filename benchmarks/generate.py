"""Make large real CRIU checkpoints for the benchmarks, cached outside the clone.

Each shape is a real `criu dump` of the test victim (victim.c) with bulk memory, kept in
`~/.cache/crit-pageread/bench/<shape>-<parameters>/images` (or under
`$CRIT_PAGEREAD_BENCH_CACHE`) and reused while its parameters are unchanged:

- `big`: 1 GiB over hundreds of VMAs, one untouched page in every 48, so the
  pagemap has thousands of entries (runs of 47 pages);
- `plain`: 1 GiB over 256 VMAs with no holes (a typical dump: large entries);
- `frag`: every other page untouched: tens of thousands of single-page entries
  with holes between them;
- `chain`: a 3-level incremental chain made from a real dump by tests/chains.py
  `build_chain` (the kernel has no soft-dirty tracking, so CRIU cannot write
  incremental dumps here): each page's true bytes live in one level, newer
  levels mark it `PE_PARENT`, older ones hold stale bytes; homes change every
  few pages, so entries are short and reads hop between the three pages files
  (an adversarial chain);
- `chain-real`: the same rewriting with the shape of a chain CRIU writes through
  pre-dumps (the issue's 256 MiB, 3 levels, about 5,000 runs): the first
  pre-dump holds every page, the second the ~20% dirtied since, the final dump
  the ~10% dirtied last, in runs of 2-10 pages;
- `jvm`: a JVM-like process (benchmarks/jvm_like.c): an 8 GiB reserved heap of
  which 200 scattered clusters of 350 pages are in use (~70,000 pages in ~200
  entries, 273 MiB).

usage: python -m benchmarks.generate [--shape big|plain|frag|chain|chain-real|jvm|all] [--force] [--verify]
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

from chains import build_chain  # noqa: E402
from criu_harness import dump, start_victim  # noqa: E402

FORMAT = 2  # bump to regenerate every cached checkpoint


@dataclass(frozen=True)
class Shape:
    """A checkpoint shape: victim arguments and how many chain levels to build."""

    name: str
    mib: int
    vmas: int
    holes: int
    levels: int = 1
    #: chain levels: pages per home (min, max) and home weights, newest first (None: tests/chains.py defaults)
    runs: tuple[int, int] | None = None
    weights: tuple[float, ...] | None = None
    #: "victim" (crit_pageread/data/victim.c) or "jvm" (benchmarks/jvm_like.c: --mib is ignored)
    program: str = "victim"

    @property
    def key(self) -> str:
        extra = f"-r{self.runs[0]}_{self.runs[1]}" if self.runs else ""
        extra += "-w" + "_".join(f"{w:g}" for w in self.weights) if self.weights else ""
        extra += f"-{self.program}" if self.program != "victim" else ""
        return f"{self.name}-m{self.mib}-v{self.vmas}-h{self.holes}-l{self.levels}{extra}-f{FORMAT}"

    def victim_args(self) -> list[str]:
        if self.program == "jvm":
            return ["--seed", "7", "--heap-gib", "8", "--clusters", str(self.vmas), "--pages", str(self.holes)]
        return ["--seed", "7", "--mib", str(self.mib), "--vmas", str(self.vmas), "--holes", str(self.holes)]


SHAPES = {
    "big": Shape("big", 1048, 400, 48),
    # a typical dump: no holes, so large entries (the streaming commands against grep and cat)
    "plain": Shape("plain", 1024, 256, 0),
    "frag": Shape("frag", 256, 128, 2),
    "chain": Shape("chain", 256, 64, 16, levels=3),
    # a chain as CRIU writes it through pre-dumps: long runs, most pages in the first pre-dump
    "chain-real": Shape("chain-real", 256, 64, 0, levels=3, runs=(2, 10), weights=(0.1, 0.2, 0.7)),
    # a JVM: an 8 GiB reserved heap, 200 clusters of 350 pages in use (vmas = clusters, holes = pages)
    "jvm": Shape("jvm", 273, 200, 350, program="jvm"),
}


def cache_root() -> Path:
    """The benchmark cache (made if missing: a new machine has none yet)."""
    env = os.environ.get("CRIT_PAGEREAD_BENCH_CACHE")
    root = Path(env) if env else Path.home() / ".cache" / "crit-pageread" / "bench"
    root.mkdir(parents=True, exist_ok=True)
    return root


def victim_exe(program: str = "victim") -> Path:
    """The victim (crit_pageread/data/victim.c, also tests/victim.c) or benchmarks/jvm_like.c compiled into
    the cache, keyed by its source."""
    src = ROOT / "crit_pageread" / "data" / "victim.c"
    if program == "jvm":
        src = ROOT / "benchmarks" / "jvm_like.c"
    elif not src.exists():
        src = ROOT / "tests" / "victim.c"
    digest = hashlib.sha256(src.read_bytes()).hexdigest()[:12]
    exe = cache_root() / f"{program}-{digest}"
    if not exe.exists():
        exe.parent.mkdir(parents=True, exist_ok=True)
        tmp = exe.with_suffix(".tmp")
        subprocess.run(["gcc", "-O2", "-o", str(tmp), str(src), "-lpthread"], check=True)
        os.replace(tmp, exe)
    return exe


def images_dir(shape: Shape) -> Path:
    """The newest image directory of a shape (the chain's top level)."""
    base = cache_root() / shape.key
    return base / "chain" / f"d{shape.levels}" if shape.levels > 1 else base / "images"


def generate(shape: Shape, force: bool = False) -> Path:
    """Dump the shape's victim with real CRIU unless it is cached; return the image directory."""
    base = cache_root() / shape.key
    done = base / "done.json"
    if done.exists() and not force:
        return images_dir(shape)
    if base.exists():
        shutil.rmtree(base)
    base.mkdir(parents=True)
    started = time.monotonic()
    try:
        # Dumped in place (not renamed after), so the images' file paths stay valid for `criu restore`.
        victim = start_victim(victim_exe(shape.program), base / "victim", *shape.victim_args(), timeout=300)
        try:
            if shape.levels == 1:
                dump(victim, base / "images", timeout=600)
            else:
                dump(victim, base / "dump", timeout=600)
                extra: dict = {}
                if shape.runs:
                    # a first pre-dump holds every page: no page left out of an older level
                    extra = {"run_pages": shape.runs, "weights": shape.weights, "stale_gap_every": 1 << 62}
                build_chain(base / "dump", base / "chain", shape.levels, seed=7, **extra)
                shutil.rmtree(base / "dump")
        finally:
            victim.kill()
    except BaseException:
        shutil.rmtree(base, ignore_errors=True)
        raise
    info = {"shape": shape.__dict__, "seconds": round(time.monotonic() - started, 1), "victim": victim.info["pid"]}
    done.write_text(json.dumps(info, indent=2) + "\n")
    return images_dir(shape)


def verify(directory: Path) -> str:
    """`criu restore --leave-stopped` the images; compare every dumped page with what preadv reads."""
    from criu_harness import restore_stopped

    from crit_pageread import open_images
    from crit_pageread.pagemap import PE_PARENT, PE_PRESENT

    pages = 0
    with open_images(directory) as images, restore_stopped(directory) as restored:
        for pid in images.pids:
            with images.reader(pid, "preadv") as reader:
                for entry in images.pagemap(pid).entries:
                    if not entry.flags & (PE_PRESENT | PE_PARENT):
                        continue
                    ours = reader.read(entry.vaddr, entry.size)
                    theirs = restored.read(pid, entry.vaddr, entry.size)
                    if ours != theirs:
                        return f"MISMATCH pid {pid} entry {entry.vaddr:#x}+{entry.nr_pages} pages"
                    pages += entry.nr_pages
    return f"ok: {pages} pages equal /proc/PID/mem of the restored tasks"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=[*SHAPES, "all"], default="all")
    parser.add_argument("--force", action="store_true", help="dump again even if cached")
    parser.add_argument("--verify", action="store_true",
                        help="restore each checkpoint with CRIU and compare every page with our reader")
    args = parser.parse_args(argv)
    names = list(SHAPES) if args.shape == "all" else [args.shape]
    bad = 0
    for name in names:
        path = generate(SHAPES[name], force=args.force)
        print(f"{name}: {path}", flush=True)
        if args.verify:
            result = verify(path)
            bad += result.startswith("MISMATCH")
            print(f"  verify: {result}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
