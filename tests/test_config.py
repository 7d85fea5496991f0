"""Configuration: precedence of the sources, validation naming the key, unknown strategies."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from corpus import Corpus

from crit_pageread import ConfigError, open_images
from crit_pageread.config import Config, host_page_size, load_config
from crit_pageread.plugins import configure, make_strategy
from crit_pageread.testing import ImageBuilder, VmaSpec


@pytest.fixture
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A clean working directory and user config dir; no CRIT_PAGEREAD_* variables."""
    for key in list(os.environ):
        if key.startswith("CRIT_PAGEREAD_"):
            monkeypatch.delenv(key)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    return tmp_path


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_defaults(isolated: Path) -> None:
    config = load_config(env={})
    assert (config.strategy, config.auto_dedup, config.zero_fill) == ("preadv", False, False)
    assert config.page_size == host_page_size() == os.sysconf("SC_PAGE_SIZE")
    assert config.sources == []


def test_precedence_of_every_source(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """kwargs > env > --config / CRIT_PAGEREAD_CONFIG > ./crit-pageread.toml > user config dir."""
    user = write(isolated / "xdg" / "crit-pageread" / "config.toml",
                 'strategy = "pread"\nzero_fill = true\n[preadv]\niov_max = 1\nmax_queue = 11\n')
    config = load_config(env={})
    assert (config.strategy, config.zero_fill) == ("pread", True)
    assert config.table("preadv") == {"iov_max": 1, "max_queue": 11}
    assert config.sources == [str(user)]

    write(Path("crit-pageread.toml"), 'strategy = "mmap"\n[preadv]\niov_max = 2\n')
    config = load_config(env={})
    assert config.strategy == "mmap" and config.zero_fill is True
    assert config.table("preadv") == {"iov_max": 2, "max_queue": 11}  # tables merge key by key

    named = write(isolated / "named.toml", 'strategy = "preadv"\nauto_dedup = true\n[preadv]\niov_max = 3\n')
    for config in (load_config(named, env={}), load_config(env={"CRIT_PAGEREAD_CONFIG": str(named)})):
        assert (config.strategy, config.auto_dedup, config.table("preadv")["iov_max"]) == ("preadv", True, 3)
        assert config.sources[-1] == str(named)

    # --config wins over CRIT_PAGEREAD_CONFIG (only one named file is read).
    other = write(isolated / "other.toml", 'strategy = "pread"\n')
    assert load_config(named, env={"CRIT_PAGEREAD_CONFIG": str(other)}).strategy == "preadv"

    env = {"CRIT_PAGEREAD_CONFIG": str(named), "CRIT_PAGEREAD_STRATEGY": "mmap", "CRIT_PAGEREAD_ZERO_FILL": "0",
           "CRIT_PAGEREAD_PREADV__IOV_MAX": "4"}
    config = load_config(env=env)
    assert (config.strategy, config.zero_fill, config.table("preadv")["iov_max"]) == ("mmap", False, 4)
    assert config.sources[-1] == "environment"

    config = load_config(overrides={"strategy": "pread", "zero_fill": True, "preadv": {"iov_max": 5}, "criu": None},
                         env=env)
    assert (config.strategy, config.zero_fill) == ("pread", True)
    assert config.table("preadv") == {"iov_max": 5, "max_queue": 11}
    assert config.sources[-1] == "arguments"

    # The process environment is the default source of env vars.
    monkeypatch.setenv("CRIT_PAGEREAD_AUTO_DEDUP", "yes")
    assert load_config().auto_dedup is True


def test_replace_applies_and_validates(isolated: Path) -> None:
    config = Config().replace(strategy="mmap", preadv={"iov_max": 8})
    assert config.strategy == "mmap" and config.table("preadv") == {"iov_max": 8}
    with pytest.raises(ConfigError, match="'page_size'"):
        Config().replace(page_size=3)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("strategy = 3\n", "'strategy'"),
        ("page_size = 1000\n", "'page_size'"),
        ("page_size = 6000\n", "'page_size'"),
        ('page_size = "4096"\n', "'page_size'"),
        ("page_size = true\n", "'page_size'"),
        ('zero_fill = "maybe"\n', "'zero_fill'"),
        ("auto_dedup = 1\n", "'auto_dedup'"),
        ("colour = 1\n", "'colour'"),
    ],
)
def test_bad_file_values_name_the_key_and_file(isolated: Path, text: str, key: str) -> None:
    path = write(isolated / "bad.toml", text)
    with pytest.raises(ConfigError) as err:
        load_config(path, env={})
    assert key in str(err.value) and str(path) in str(err.value)
    assert "\n" not in str(err.value)


def test_bad_env_value_names_the_key(isolated: Path) -> None:
    with pytest.raises(ConfigError, match="environment: key 'page_size'"):
        load_config(env={"CRIT_PAGEREAD_PAGE_SIZE": "abc"})
    with pytest.raises(ConfigError, match="'zero_fill'"):
        load_config(env={"CRIT_PAGEREAD_ZERO_FILL": "perhaps"})


def test_bad_keyword_value_names_the_key(isolated: Path) -> None:
    with pytest.raises(ConfigError, match="arguments: key 'strategy'"):
        load_config(overrides={"strategy": 1.5}, env={})


def test_invalid_or_missing_file(isolated: Path) -> None:
    broken = write(isolated / "broken.toml", "strategy = \n")
    with pytest.raises(ConfigError, match="invalid TOML") as err:
        load_config(broken, env={})
    assert str(broken) in str(err.value)
    with pytest.raises(ConfigError, match="config file not found") as err:
        load_config(env={"CRIT_PAGEREAD_CONFIG": str(isolated / "absent.toml")})
    assert "absent.toml" in str(err.value)
    # ./crit-pageread.toml and the user file are optional.
    assert load_config(env={}).strategy == "preadv"


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ({"preadv": {"iov_max": 0}}, "'iov_max'"),
        ({"preadv": {"iov_max": 1 << 20}}, "'iov_max'"),
        ({"preadv": {"max_queue": "many"}}, "'max_queue'"),
        ({"preadv": {"depth": 2}}, "'depth'"),
        ({"mmap": {"advice": "eager"}}, "'advice'"),
        ({"mmap": {"huge": True}}, "'huge'"),
        ({"pread": {"anything": 1}}, "'anything'"),
    ],
)
def test_strategy_tables_are_validated_by_their_plugin(isolated: Path, table: dict[str, dict[str, object]],
                                                       key: str) -> None:
    (name,) = table
    config = load_config(overrides={"strategy": name, **table}, env={})
    with pytest.raises(ConfigError) as err:
        make_strategy(name, config)
    assert key in str(err.value) and f"[{name}]" in str(err.value)


def test_unknown_strategy_lists_the_known_ones(isolated: Path, corpus41: Corpus) -> None:
    config = load_config(overrides={"strategy": "warp"}, env={})
    for call in (lambda: configure(config), lambda: make_strategy("warp", config)):
        with pytest.raises(ConfigError) as err:
            call()
        message = str(err.value)
        assert "'warp'" in message
        for known in ("pread", "preadv", "mmap"):
            assert known in message
    with open_images(corpus41.root / "cases" / "a_single", config) as images:
        with pytest.raises(ConfigError, match=r"known: .*preadv"):
            images.reader(images.pids[0])


def test_config_drives_the_reader(isolated: Path, corpus41: Corpus) -> None:
    write(Path("crit-pageread.toml"), 'strategy = "mmap"\nzero_fill = true\n')
    config = load_config(env={})
    with open_images(corpus41.root / "cases" / "a_single", config) as images:
        assert images.page_size == 4096
        with images.reader(images.pids[0]) as reader:
            assert reader.strategy.name == "mmap" and reader.zero_fill
            # zero_fill from the config: an address below every entry reads as zeros.
            assert reader.read(0, 4096) == bytes(4096)
        with images.reader(images.pids[0], "pread", zero_fill=False) as reader:
            assert reader.strategy.name == "pread" and not reader.zero_fill


def _as_root_without_dac_override(*args: str, home: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    """`crit-pageread ARGS` as root that permissions bind (as any other uid): CAP_DAC_OVERRIDE and
    CAP_DAC_READ_SEARCH dropped from the bounding set by setpriv."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRIT_PAGEREAD_") and k != "XDG_CONFIG_HOME"}
    env["HOME"] = str(home)
    return subprocess.run(["setpriv", "--bounding-set", "-dac_override,-dac_read_search", sys.executable, "-m",
                           "crit_pageread", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=60)


@pytest.mark.skipif(os.environ.get("CI") != "true" and (os.geteuid() != 0 or not shutil.which("setpriv")),
                    reason="needs root and setpriv (under CI=true it runs, and fails without them)")
def test_an_unreadable_home_is_skipped_but_an_unreadable_config_flag_is_an_error(tmp_path: Path) -> None:
    images = ImageBuilder(tmp_path / "img").process(10, vmas=[VmaSpec(0x10000, 0x12000)]) \
        .pagemap(10, [(0x10000, b"\x5a" * 8192)]).write()
    home = tmp_path / "home"
    write(home / ".config" / "crit-pageread" / "config.toml", 'strategy = "pread"\n')
    named = write(tmp_path / "locked" / "c.toml", 'strategy = "pread"\n')
    home.chmod(0)
    named.parent.chmod(0)
    try:
        ok = _as_root_without_dac_override("read", str(images), "0x10000", "4", home=home, cwd=tmp_path)
        bad = _as_root_without_dac_override("read", str(images), "0x10000", "4", "--config", str(named),
                                            home=home, cwd=tmp_path)
    finally:
        home.chmod(0o755)
        named.parent.chmod(0o755)
    assert ok.returncode == 0 and ok.stdout == "ZZZZ", ok.stderr
    assert bad.returncode != 0 and bad.stderr == f"crit-pageread: {named}: cannot read: Permission denied\n"
