"""`python -m fuzz` (`make fuzz`): build real checkpoints with CRIU, then run the long seeded campaign on them."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from . import campaign, corpus


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fuzz")
    p.add_argument("--mutants", type=int, default=4000)
    p.add_argument("--server", type=int, default=1000, help="hostile page-server requests")
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--archives", type=float, default=0.1, help="share of mutants read as a .tar (default 0.1)")
    p.add_argument("--json", action="store_true", help="the summary as one JSON object")
    args = p.parse_args(argv)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="crit-pageread-fuzz-") as tmp:
        work = Path(tmp)
        checkpoints = corpus.build(work / "corpus")
        (work / "mutants").mkdir()
        def progress(n: int, desc: str, verdicts: object, results: campaign.Results) -> None:
            if (n + 1) % 100 == 0:  # a running tally, so an interrupted long run still has its figures
                print(f"fuzz: {n + 1} mutants, {time.monotonic() - started:.0f} s: library {dict(results.library)}, "
                      f"commands {dict(results.commands)}, non-clean {results.non_clean()}", file=sys.stderr,
                      flush=True)

        results = campaign.run(checkpoints, args.mutants, args.seed, work / "mutants", log=progress,
                               archives=args.archives)
        campaign.fuzz_server(*checkpoints[0], args.server, args.seed, results)
    summary = results.as_dict()
    summary.update(seed=args.seed, seconds=round(time.monotonic() - started, 1),
                   checkpoints=[f"{root.name}/{top}" for root, top in checkpoints])
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"fuzz: seed {args.seed}: {results.mutants} mutants of {len(checkpoints)} real checkpoints "
              f"({', '.join(summary['checkpoints'])}) in {summary['seconds']} s")
        print(f"  library, per strategy and pid: {dict(results.library)}")
        print(f"  commands, one per mutant: {dict(results.commands)}")
        print(f"  page-server requests: {dict(results.server)}")
        print(f"  non-clean: {results.non_clean()}")
        for f in results.failures[:20]:
            print(f"  NON-CLEAN {f}")
    return 0 if results.non_clean() == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
