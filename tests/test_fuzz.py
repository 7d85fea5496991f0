"""The short seeded run of the reliability campaign (`make fuzz` is the long one): real checkpoints made here with
CRIU, mutated, read through every strategy and one command each, and hostile page-server requests; every outcome
is an exact read or a clean error against the independent page model (fuzz/model.py), never anything else."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fuzz import campaign, corpus, model

MUTANTS = 50
REQUESTS = 30
SEED = 7


@pytest.fixture(scope="module")
def checkpoints(criu_ok: None, tmp_path_factory: pytest.TempPathFactory) -> list[tuple[Path, str]]:
    return corpus.build(tmp_path_factory.mktemp("fuzz-corpus"))


def test_the_page_model_agrees_with_the_real_checkpoints(checkpoints: list[tuple[Path, str]]):
    """Unmutated, every real checkpoint is consistent for the model, and the reader reads exactly its pages."""
    from crit_pageread import open_images

    for root, top in checkpoints:
        with open_images(root / top) as images:
            for pid in images.pids:
                if not (root / top / f"pagemap-{pid}.img").exists():
                    continue
                pages = model.Memory(root / top, f"pagemap-{pid}.img").all_pages()
                runs = campaign._runs(pages)
                assert runs, (root, pid)
                with images.reader(pid) as reader:
                    for vaddr, data in runs:
                        assert reader.read(vaddr, len(data)) == data


def test_short_seeded_campaign_has_no_non_clean_outcome(checkpoints: list[tuple[Path, str]], tmp_path: Path):
    results = campaign.run(checkpoints, MUTANTS, SEED, tmp_path)
    campaign.fuzz_server(*checkpoints[0], REQUESTS, SEED, results)
    summary = results.as_dict()
    print(f"fuzz (seed {SEED}): {summary}")
    assert results.non_clean() == 0, results.failures[:5]
    assert results.library["exact"] and results.library["clean-error"]
    assert results.commands["exact"] and results.commands["clean-error"]
    assert results.server["exact"] and results.server["clean-error"]
