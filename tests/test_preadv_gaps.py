"""preadv's `max_gap`: small gaps in a pages file are read into scratch memory instead of costing a call."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from corpus import Corpus

from crit_pageread import ConfigError, load_config, open_images
from crit_pageread.plugins import make_strategy
from crit_pageread.strategies.preadv import PreadvStrategy


def _truth(corpus: Corpus) -> dict[int, str]:
    return corpus.truth("a_single")


def _read_every_other_entry(images_dir: Path, strategy: PreadvStrategy) -> dict[int, bytes]:
    with open_images(images_dir) as images:
        pid = images.pids[0]
        entries = [e for e in images.pagemap(pid) if e.present][::2]  # gaps in the pages file between them
        reader = images.reader(pid, strategy)
        bufs = {e.vaddr: bytearray(e.size) for e in entries}
        for e in entries:
            reader.readinto(e.vaddr, bufs[e.vaddr], defer=True)
        reader.sync()
        reader.close()
    return {v: bytes(b) for v, b in bufs.items()}


def test_bridging_gaps_reads_the_same_bytes_with_fewer_calls(corpus: Corpus) -> None:
    images_dir = corpus.root / "cases" / "a_single"
    truth = _truth(corpus)
    exact, bridged = PreadvStrategy(max_gap=0), PreadvStrategy(max_gap=1 << 20)
    plain = _read_every_other_entry(images_dir, exact)
    merged = _read_every_other_entry(images_dir, bridged)
    assert plain == merged
    for vaddr, data in merged.items():
        for i in range(0, len(data), 4096):
            assert hashlib.sha256(data[i : i + 4096]).hexdigest() == truth[vaddr + i]
    assert exact.gap_bytes == 0 and bridged.gap_bytes > 0
    assert bridged.calls == 1 < exact.calls


def test_max_gap_is_validated_and_off_by_default() -> None:
    config = load_config(env={})
    strategy = make_strategy("preadv", config)
    assert isinstance(strategy, PreadvStrategy) and strategy.max_gap == 0
    with pytest.raises(ConfigError, match="max_gap"):
        make_strategy("preadv", load_config(env={}, overrides={"preadv": {"max_gap": -1}}))
