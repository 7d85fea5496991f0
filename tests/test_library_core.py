"""The library without CRIU, on synthetic images: config reaching strategies, plugin attribution, strategy
ownership, chains opened like CRIU."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from crit_pageread import ChainError, StrategyContext, StrategyInfo, hookimpl, load_config, open_images, plugins
from crit_pageread.cli.main import main
from crit_pageread.testing import PARENT, ImageBuilder, MockStrategy, VmaSpec

PAGE = 4096


@pytest.fixture
def fresh(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    for key in ("CRIT_PAGEREAD_TRACE_HOOKS", "CRIT_PAGEREAD_LOAD_PLUGINS", "CRIT_PAGEREAD_CONFIG"):
        monkeypatch.delenv(key, raising=False)
    plugins.reset()
    yield plugins
    plugins.reset()


def one_process(path: Path, data: bytes = b"A" * PAGE) -> Path:
    b = ImageBuilder(path).process(10, vmas=[VmaSpec(0x10000, 0x10000 + len(data))])
    b.pagemap(10, [(0x10000, data)])
    return b.write()


# --- config reaches plugins without globals ---------------------------------------------------------------


def test_remote_local_strategy_uses_the_config_it_was_made_with_not_the_last_configured(fresh: Any) -> None:
    c1 = load_config(overrides={"remote": {"port": 1}, "preadv": {"max_gap": 111}}, env={})
    c2 = load_config(overrides={"remote": {"port": 2}, "preadv": {"max_gap": 222}}, env={})
    fresh.configure(c1)
    strategy = fresh.make_strategy("remote", c2)
    try:
        assert strategy.server.port == 2  # type: ignore[attr-defined]
        assert strategy.local.max_gap == 222  # type: ignore[attr-defined]
    finally:
        strategy.close()


def test_library_reader_gets_its_strategy_table_without_configure(fresh: Any, tmp_path: Path) -> None:
    d = one_process(tmp_path / "d")
    config = load_config(overrides={"preadv": {"max_gap": 333}}, env={})
    with open_images(d, config) as images, images.reader(10) as reader:
        assert reader.strategy.max_gap == 333  # type: ignore[attr-defined]
        assert reader.read(0x10000, 4) == b"AAAA"


def test_factory_gets_a_context_with_table_config_and_inner_strategies(fresh: Any, tmp_path: Path) -> None:
    seen: list[StrategyContext] = []

    def factory(context: StrategyContext) -> Any:
        seen.append(context)
        assert context.get("label") == "x" and dict(context) == {"label": "x"}  # the table, as a mapping
        return context.make_strategy("pread")

    class Plugin:
        @hookimpl
        def crit_pageread_strategies(self) -> list[StrategyInfo]:
            return [StrategyInfo("ctx", factory)]

    fresh.get_plugin_manager().register(Plugin(), name="ctx-plugin")
    d = one_process(tmp_path / "d")
    config = load_config(overrides={"strategy": "ctx", "ctx": {"label": "x"}}, env={})
    with open_images(d, config) as images, images.reader(10) as reader:
        assert reader.read(0x10000, 2) == b"AA"
        assert reader.strategy.name == "pread"
    assert seen[0].config is config and seen[0].table == {"label": "x"}


def test_configure_reaches_a_plugin_registered_later(fresh: Any, tmp_path: Path) -> None:
    got: list[Any] = []

    class Late:
        @hookimpl
        def crit_pageread_configure(self, config: Any) -> None:
            got.append(config)

    config = load_config(overrides={"zero_fill": True}, env={})
    with open_images(one_process(tmp_path / "d"), config):
        pass
    fresh.get_plugin_manager().register(Late(), name="late")
    assert got and got[-1] is config
    with open_images(tmp_path / "d", config):  # the same config again: not handed twice
        pass
    assert len(got) == 1


def test_strategies_are_attributed_to_the_plugin_that_returned_them(fresh: Any) -> None:
    class Silent:  # implements the hook, contributes nothing
        @hookimpl
        def crit_pageread_strategies(self) -> None:
            return None

    class Giver:
        @hookimpl
        def crit_pageread_strategies(self) -> list[StrategyInfo]:
            return [StrategyInfo("given", lambda ctx: None)]

    pm = fresh.get_plugin_manager()
    pm.register(Giver(), name="giver")
    pm.register(Silent(), name="silent")
    known = fresh.strategies()
    assert known["given"].plugin == "giver"
    assert known["preadv"].plugin == "crit_pageread.strategies.preadv"


# --- ownership --------------------------------------------------------------------------------------------


def test_reader_closes_only_the_strategy_it_made(fresh: Any, tmp_path: Path) -> None:
    d = one_process(tmp_path / "d")
    shared = MockStrategy()
    with open_images(d) as images:
        for _ in range(2):
            with images.reader(10, shared) as reader:
                assert reader.read(0x10000, 1) == b"A"
        assert shared.closed == 0  # its maker closes it
        made = images.reader(10, "pread")
        made.close()
        assert made.strategy.name == "pread" and made._closed


# --- chains opened like CRIU ------------------------------------------------------------------------------


def chain(tmp_path: Path) -> list[Path]:
    """d1 <- d2 <- d3 where d3 holds every page itself: no read needs a parent."""
    dirs = [tmp_path / f"d{i}" for i in (1, 2, 3)]
    for i, d in enumerate(dirs):
        b = ImageBuilder(d).process(10, vmas=[VmaSpec(0x10000, 0x12000)])
        if i == 2:
            b.pagemap(10, [(0x10000, b"N" * PAGE), (0x11000, 1, PARENT)])
        else:
            b.pagemap(10, [(0x10000, b"O" * 2 * PAGE)])
        if i:
            b.parent(f"../d{i}")
        b.write()
    return dirs


@pytest.mark.parametrize("broken", ["cycle", "dangling"])
def test_bad_parent_link_in_a_level_no_page_needs_is_refused_at_open(
    fresh: Any, tmp_path: Path, broken: str, capsys: pytest.CaptureFixture[str]
) -> None:
    d1, _d2, d3 = chain(tmp_path)
    with open_images(d3) as images, images.reader(10) as reader:  # a sound chain opens and reads
        assert reader.read(0x10000, 1) == b"N" and reader.read(0x11000, 1) == b"O"
    # d1 is reached by no page (d2 holds what d3 has in parent), yet its link is checked
    (d1 / "parent").symlink_to("../d3" if broken == "cycle" else "../gone")
    with pytest.raises(ChainError) as err:
        open_images(d3)
    assert str(err.value).startswith(f"{d1 / 'parent'}: ")
    assert ("cycle" if broken == "cycle" else "dangling") in str(err.value)
    code = main(["pages", str(d3)])
    out, errtext = capsys.readouterr()
    assert code == 1 and out == ""
    assert errtext.count("\n") == 1 and f"{d1 / 'parent'}: " in errtext
