"""Plugins and the preadv strategy: built-ins through hooks, a third-party strategy, observers,
tracing, entry-point restriction; preadv merging, IOV_MAX, short reads, flush and close rules."""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from corpus import Corpus
from native_support import use_helper

from crit_pageread import (
    ConfigError,
    CritPageReadError,
    ReadRequest,
    Strategy,
    StrategyInfo,
    hookimpl,
    load_config,
    native,
    open_images,
    plugins,
)
from crit_pageread.strategies import preadv as preadv_module
from crit_pageread.strategies.pread import PreadStrategy
from crit_pageread.strategies.preadv import IOV_MAX, PreadvStrategy

BUILTINS = {"pread": "crit_pageread.strategies.pread", "preadv": "crit_pageread.strategies.preadv",
            "mmap": "crit_pageread.strategies.mmap"}


@pytest.fixture
def fresh(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A new plugin manager for the test (env vars set by the test apply), discarded after."""
    for key in ("CRIT_PAGEREAD_TRACE_HOOKS", "CRIT_PAGEREAD_LOAD_PLUGINS"):
        monkeypatch.delenv(key, raising=False)
    plugins.reset()
    yield plugins
    plugins.reset()


@pytest.fixture
def a_single(corpus41: Corpus) -> Path:
    return corpus41.root / "cases" / "a_single"


def test_builtin_strategies_register_through_hooks(fresh: Any) -> None:
    pm = fresh.get_plugin_manager()
    known = fresh.strategies()
    for name, module in BUILTINS.items():
        assert pm.get_plugin(module) is not None
        assert known[name].plugin == module
        assert module in [impl.plugin_name for impl in pm.hook.crit_pageread_strategies.get_hookimpls()]
    described = {d["name"]: d for d in fresh.describe_plugins()}
    for name, module in BUILTINS.items():
        assert "crit_pageread_strategies" in described[module]["hooks"]
        assert described[module]["strategies"] == [name]


class CountingStrategy(Strategy):
    """A third-party strategy: pread, counting bytes, scaled by a config key to prove the table."""

    name = "counting"

    def __init__(self, label: str) -> None:
        self.label = label
        self.inner = PreadStrategy()
        self.bytes = 0

    def read(self, request: ReadRequest) -> None:
        self.inner.read(request)
        self.bytes += len(request.dest)


class ThirdParty:
    """A plugin object as a third party would register it."""

    def __init__(self) -> None:
        self.configured: list[dict[str, Any]] = []
        self.events: list[tuple[str, Any]] = []

    @hookimpl
    def crit_pageread_strategies(self) -> list[StrategyInfo]:
        def factory(table: dict[str, Any]) -> Strategy:
            unknown = set(table) - {"label"}
            if unknown:
                raise ConfigError(f"[counting]: unknown key {sorted(unknown)[0]!r}")
            return CountingStrategy(table.get("label", "none"))
        return [StrategyInfo("counting", factory, "pread, counting bytes")]

    @hookimpl
    def crit_pageread_configure(self, config: Any) -> None:
        self.configured.append(config.table("counting"))

    @hookimpl
    def crit_pageread_before_read(self, reader: Any, vaddr: int, length: int, deferred: bool) -> None:
        self.events.append(("before", (vaddr, length, deferred)))

    @hookimpl
    def crit_pageread_after_read(self, reader: Any, vaddr: int, data: memoryview) -> None:
        self.events.append(("after", (vaddr, hashlib.sha256(data).hexdigest())))

    @hookimpl
    def crit_pageread_synced(self, reader: Any, requests: int) -> None:
        self.events.append(("synced", requests))


def test_third_party_strategy_selected_by_config(fresh: Any, a_single: Path) -> None:
    plugin = ThirdParty()
    fresh.get_plugin_manager().register(plugin, name="third-party")
    assert fresh.strategies()["counting"].plugin == "third-party"
    config = load_config(overrides={"strategy": "counting", "counting": {"label": "x"}}, env={})
    fresh.configure(config)
    assert plugin.configured == [{"label": "x"}]
    with open_images(a_single, config) as images:
        pid = images.pids[0]
        entries = images.pagemap(pid).entries
        with images.reader(pid) as reader, images.reader(pid, "preadv") as reference:
            assert isinstance(reader.strategy, CountingStrategy) and reader.strategy.label == "x"
            for e in entries:
                assert reader.read(e.vaddr, e.size) == reference.read(e.vaddr, e.size)
            assert reader.strategy.bytes == sum(e.size for e in entries)
    bad = load_config(overrides={"strategy": "counting", "counting": {"colour": 1}}, env={})
    with pytest.raises(ConfigError, match="'colour'"):
        fresh.make_strategy("counting", bad)


def test_strategy_name_clash_names_both_plugins(fresh: Any) -> None:
    class Clash:
        @hookimpl
        def crit_pageread_strategies(self) -> list[StrategyInfo]:
            return [StrategyInfo("pread", lambda table: PreadStrategy())]

    fresh.get_plugin_manager().register(Clash(), name="clash")
    with pytest.raises(ConfigError, match=r"contributed by both crit_pageread\.strategies\.pread and clash"):
        fresh.strategies()


def test_factory_must_return_a_strategy(fresh: Any) -> None:
    class Broken:
        @hookimpl
        def crit_pageread_strategies(self) -> list[StrategyInfo]:
            return [StrategyInfo("broken", lambda table: object())]

    fresh.get_plugin_manager().register(Broken(), name="broken-plugin")
    with pytest.raises(ConfigError, match="broken-plugin"):
        fresh.make_strategy("broken", load_config(env={}))


def test_observer_hooks_fire(fresh: Any, a_single: Path) -> None:
    plugin = ThirdParty()
    fresh.get_plugin_manager().register(plugin, name="observer")
    with open_images(a_single) as images:
        pid = images.pids[0]
        e1, e2 = images.pagemap(pid).entries[:2]
        with images.reader(pid, "preadv") as reader:
            data = reader.read(e1.vaddr, e1.size)
            buf = bytearray(e2.size)
            reader.readinto(e2.vaddr, buf, defer=True)
            reader.sync()
    assert plugin.events == [
        ("before", (e1.vaddr, e1.size, False)),
        ("after", (e1.vaddr, hashlib.sha256(data).hexdigest())),
        ("before", (e2.vaddr, e2.size, True)),
        ("synced", 1),
    ]


def test_no_observers_no_relay(fresh: Any) -> None:
    assert fresh.observer() is None


def test_trace_hooks_prints(fresh: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                            a_single: Path) -> None:
    monkeypatch.setenv("CRIT_PAGEREAD_TRACE_HOOKS", "1")
    with open_images(a_single) as images, images.reader(images.pids[0]):
        pass
    err = capsys.readouterr().err
    assert "crit-pageread: hook crit_pageread_images_opened(images=<CheckpointImages" in err
    assert "crit-pageread: hook crit_pageread_images_opened = " in err


def _install_entry_point(root: Path, name: str) -> None:
    """A distribution on sys.path with one entry point in group crit_pageread (as pip would leave it)."""
    module = root / f"{name.replace('-', '_')}_plugin.py"
    module.write_text(
        "from crit_pageread import hookimpl, StrategyInfo\n"
        "from crit_pageread.strategies.pread import PreadStrategy\n"
        "@hookimpl\n"
        "def crit_pageread_strategies():\n"
        f"    return [StrategyInfo('{name}', lambda table: PreadStrategy())]\n"
    )
    dist = root / f"{name.replace('-', '_')}-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[crit_pageread]\n{name} = {module.stem}\n")


@pytest.mark.parametrize(
    ("allowed", "loaded"),
    [(None, {"ep-one", "ep-two"}), ("", set()), ("ep-two", {"ep-two"}), ("ep-one, ep-two", {"ep-one", "ep-two"})],
)
def test_entry_points_and_load_plugins_restriction(fresh: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                   allowed: str | None, loaded: set[str]) -> None:
    for name in ("ep-one", "ep-two"):
        _install_entry_point(tmp_path, name)
    monkeypatch.syspath_prepend(str(tmp_path))
    if allowed is not None:
        monkeypatch.setenv("CRIT_PAGEREAD_LOAD_PLUGINS", allowed)
    pm = fresh.get_plugin_manager()
    assert {n for n in ("ep-one", "ep-two") if pm.get_plugin(n) is not None} == loaded
    assert {n for n in ("ep-one", "ep-two") if n in fresh.strategies()} == loaded
    for module in BUILTINS.values():
        assert pm.get_plugin(module) is not None  # built-ins are never restricted
    for name in ("ep_one_plugin", "ep_two_plugin"):
        sys.modules.pop(name, None)


def test_broken_entry_point_is_a_config_error(fresh: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _install_entry_point(tmp_path, "ep-bad")
    (tmp_path / "ep_bad_plugin.py").write_text("raise ImportError('needs a missing library')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match=r"plugin ep-bad .*needs a missing library"):
        fresh.get_plugin_manager()
    sys.modules.pop("ep_bad_plugin", None)


# --- preadv -------------------------------------------------------------------------------------


def _entries(images: Any) -> tuple[int, list[Any]]:
    pid = images.pids[0]
    return pid, [e for e in images.pagemap(pid).entries if e.present]


def _truth(images: Any, pid: int, entries: list[Any]) -> list[bytes]:
    with images.reader(pid, "pread") as reader:
        return [reader.read(e.vaddr, e.size) for e in entries]


@pytest.fixture(params=["native", "libc", "os"])
def preadv_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test with the native helper's preadv loop (when it is built), and without it: libc's preadv
    through ctypes and the os.preadv fallback."""
    use_helper(request.param, monkeypatch)
    if request.param == "os":
        monkeypatch.setattr(preadv_module, "_libc_preadv", None)
    return str(request.param)


class _TracingFastio:
    """The native helper, with every preadv call's iovec count recorded (and each call's size limited)."""

    def __init__(self, real: Any, counts: list[int] | None = None, limit: int = 0) -> None:
        self.real, self.counts, self.limit = real, counts, limit

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def preadv_queue(self, records: bytearray, iov_max: int, max_gap: int, scratch: Any) -> Any:
        return self.real.preadv_queue(records, iov_max, max_gap, scratch, self.counts, self.limit)


@pytest.fixture
def preadv_calls(monkeypatch: pytest.MonkeyPatch, preadv_path: str) -> list[int]:
    """Record the iovec count of every preadv call, libc's (queued runs) and os.preadv (the rest)."""
    counts: list[int] = []
    if preadv_path == "native":
        monkeypatch.setattr(native, "fastio", _TracingFastio(native.fastio, counts))
        return counts
    real_os = os.preadv

    def counting(fd: int, buffers: Any, offset: int, *flags: int) -> int:
        buffers = list(buffers)
        counts.append(len(buffers))
        return real_os(fd, buffers, offset, *flags)

    monkeypatch.setattr(os, "preadv", counting)
    real_libc = preadv_module._preadv_function()
    if real_libc is not None:

        def counting_libc(fd: int, iov: int, count: int, offset: int) -> int:
            counts.append(count)
            return int(real_libc(fd, iov, count, offset))

        monkeypatch.setattr(preadv_module, "_libc_preadv", counting_libc)
    return counts


def test_preadv_merges_contiguous_reads(a_single: Path, preadv_calls: list[int]) -> None:
    with open_images(a_single) as images:
        pid, entries = _entries(images)
        truth = _truth(images, pid, entries)
        # Destinations contiguous too: the whole pagemap is one run with one iovec -> one call.
        with images.reader(pid, "preadv") as reader:
            buf = bytearray(sum(e.size for e in entries))
            view = memoryview(buf)
            pos = 0
            for e in entries:
                reader.readinto(e.vaddr, view[pos : pos + e.size], defer=True)
                pos += e.size
            assert reader.strategy.pending == len(entries)
            preadv_calls.clear()
            reader.sync()
            assert reader.strategy.calls <= math.ceil(len(entries) / IOV_MAX) + 1
            assert preadv_calls == [1]
            assert bytes(buf) == b"".join(truth)
            view.release()
        # Separate buffers: one iovec per request, still one call per IOV_MAX requests.
        with images.reader(pid, "preadv") as reader:
            bufs = [bytearray(e.size) for e in entries]
            for e, b in zip(entries, bufs, strict=True):
                reader.readinto(e.vaddr, b, defer=True)
            preadv_calls.clear()
            reader.sync()
            assert len(preadv_calls) == math.ceil(len(entries) / IOV_MAX)
            assert [bytes(b) for b in bufs] == truth


def test_preadv_respects_iov_max(a_single: Path, preadv_calls: list[int]) -> None:
    config = load_config(overrides={"preadv": {"iov_max": 4}}, env={})
    with open_images(a_single, config) as images:
        pid, entries = _entries(images)
        truth = _truth(images, pid, entries)
        with images.reader(pid, "preadv") as reader:
            assert reader.strategy.iov_max == 4
            bufs = [bytearray(e.size) for e in entries]
            for e, b in zip(entries, bufs, strict=True):
                reader.readinto(e.vaddr, b, defer=True)
            preadv_calls.clear()
            reader.sync()
            assert max(preadv_calls) <= 4
            assert len(preadv_calls) == math.ceil(len(entries) / 4)
            assert [bytes(b) for b in bufs] == truth


def test_preadv_handles_short_reads(a_single: Path, monkeypatch: pytest.MonkeyPatch, preadv_path: str) -> None:
    """The kernel may return fewer bytes than asked (signals, NFS): advance the iovecs, continue."""
    limit = 5000  # not a page multiple: splits an iovec in its middle
    real = os.preadv

    def short(fd: int, buffers: Any, offset: int, *flags: int) -> int:
        out, room = [], limit
        for b in buffers:
            m = memoryview(b).cast("B")
            if room <= 0:
                break
            out.append(m[: min(len(m), room)])
            room -= len(out[-1])
        return real(fd, out, offset, *flags)

    monkeypatch.setattr(os, "preadv", short)
    if preadv_path == "native":
        monkeypatch.setattr(native, "fastio", _TracingFastio(native.fastio, limit=limit))
    real_libc = preadv_module._preadv_function()
    if real_libc is not None:

        def short_libc(fd: int, iov: int, count: int, offset: int) -> int:
            words = (ctypes.c_size_t * (2 * count)).from_address(iov)
            out, room = [], limit
            for k in range(count):
                if room <= 0:
                    break
                n = min(words[2 * k + 1], room)
                out += [words[2 * k], n]
                room -= n
            array = (ctypes.c_size_t * len(out))(*out)
            return int(real_libc(fd, ctypes.addressof(array), len(out) // 2, offset))

        monkeypatch.setattr(preadv_module, "_libc_preadv", short_libc)
    with open_images(a_single) as images:
        pid, entries = _entries(images)
        with images.reader(pid, "pread") as reader:
            truth = [reader.read(e.vaddr, e.size) for e in entries]
        with images.reader(pid, "preadv") as reader:
            bufs = [bytearray(e.size) for e in entries]
            for e, b in zip(entries, bufs, strict=True):
                reader.readinto(e.vaddr, b, defer=True)
            reader.sync()
            total = sum(e.size for e in entries)
            assert reader.strategy.calls >= total // limit
            assert [bytes(b) for b in bufs] == truth


def test_preadv_flushes_before_a_synchronous_read(a_single: Path) -> None:
    with open_images(a_single) as images:
        pid, entries = _entries(images)
        truth = _truth(images, pid, entries[:2])
        with images.reader(pid, "preadv") as reader:
            first = bytearray(entries[0].size)
            reader.readinto(entries[0].vaddr, first, defer=True)
            assert reader.strategy.pending == 1 and first == bytearray(len(first))
            second = reader.read(entries[1].vaddr, entries[1].size)
            assert reader.strategy.pending == 0
            assert bytes(first) == truth[0] and second == truth[1]


def test_close_with_queued_reads_is_an_error(a_single: Path) -> None:
    with open_images(a_single) as images:
        pid, entries = _entries(images)
        reader = images.reader(pid, "preadv")
        reader.readinto(entries[0].vaddr, bytearray(entries[0].size), defer=True)
        with pytest.raises(CritPageReadError, match="not synced"):
            reader.close()
        with pytest.raises(CritPageReadError, match="closed"):
            reader.read(entries[0].vaddr, 10)
        # As a context manager without an error: the same.
        with pytest.raises(CritPageReadError, match="not synced"), images.reader(pid, "preadv") as reader:
            reader.readinto(entries[0].vaddr, bytearray(entries[0].size), defer=True)
        # A synced reader closes quietly.
        with images.reader(pid, "preadv") as reader:
            reader.readinto(entries[0].vaddr, bytearray(entries[0].size), defer=True)
            reader.sync()


def test_preadv_strategy_alone(a_single: Path, tmp_path: Path) -> None:
    """The strategy without a reader: max_queue flushes, a short file is an ImageError."""
    from crit_pageread import ImageError, PagesFile, Target

    pages = tmp_path / "pages-1.img"
    pages.write_bytes(os.urandom(3 * 4096))
    pf = PagesFile(pages)
    try:
        strategy = PreadvStrategy(iov_max=2, max_queue=2)
        a, b = bytearray(4096), bytearray(4096)
        strategy.submit(ReadRequest(pf, 0, memoryview(a), 0, Target("pid", 1)))
        assert strategy.pending == 1
        strategy.submit(ReadRequest(pf, 8192, memoryview(b), 4096, Target("pid", 1)))
        assert strategy.pending == 0  # max_queue reached: flushed
        assert a + b == pages.read_bytes()[:4096] + pages.read_bytes()[8192:]
        c = bytearray(8192)
        strategy.submit(ReadRequest(pf, 8192, memoryview(c), 0, Target("pid", 1)))
        with pytest.raises(ImageError, match="short pages file"):
            strategy.sync()
    finally:
        pf.close()


def test_builtins_without_pluggy_call_hooks_as_pluggy_does(fresh: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """`plugins.manager()` before pluggy is needed: the same plugins, hook functions in pluggy's order, the
    same strategies; `get_plugin_manager()` then takes every plugin over, and the relay follows it."""
    monkeypatch.setenv("CRIT_PAGEREAD_LOAD_PLUGINS", "")  # no entry-point plugin of this environment
    from crit_pageread.cli.main import COMMAND_PLUGINS

    light = fresh.manager()
    assert type(light).__name__ == "_Builtins"
    fresh.register_modules(light, COMMAND_PLUGINS)
    ours = {name: [(i.plugin_name, i.function) for i in getattr(light.hook, name).get_hookimpls()]
            for name in ("crit_pageread_strategies", "crit_pageread_configure", "crit_pageread_add_commands")}
    known = {name: (info.plugin, info.description) for name, info in fresh.strategies().items()}
    listed = [name for name, _ in light.list_name_plugin()]
    fresh.reset()
    pm = fresh.get_plugin_manager()
    fresh.register_modules(pm, COMMAND_PLUGINS)
    for name, impls in ours.items():
        assert impls == [(i.plugin_name, i.function) for i in getattr(pm.hook, name).get_hookimpls()], name
    assert known == {name: (info.plugin, info.description) for name, info in fresh.strategies().items()}
    assert listed == [name for name, _ in pm.list_name_plugin()]

    fresh.reset()
    light = fresh.manager()
    pm = fresh.get_plugin_manager()  # pluggy takes over: the light manager's relay and lookups are pluggy's
    assert fresh.manager() is pm
    assert light.get_plugin("crit_pageread.strategies.pread") is pm.get_plugin("crit_pageread.strategies.pread")
    assert light.hook.crit_pageread_strategies is pm.hook.crit_pageread_strategies


def test_hookimpl_options_reach_pluggy(fresh: Any) -> None:
    """`@hookimpl(tryfirst=True)` (our marker, no pluggy import) is pluggy's tryfirst once registered."""
    calls: list[str] = []

    class Late:
        @hookimpl
        def crit_pageread_images_opened(self, images: Any) -> None:
            calls.append("late")

    class First:
        @hookimpl(tryfirst=True)
        def crit_pageread_images_opened(self, images: Any) -> None:
            calls.append("first")

    with pytest.raises(TypeError):
        hookimpl(no_such_option=True)
    pm = fresh.get_plugin_manager()
    pm.register(First(), name="first")
    pm.register(Late(), name="late")
    pm.hook.crit_pageread_images_opened(images=None)
    assert calls == ["first", "late"]
