"""The wire format, byte for byte as the issue lists CRIU's `page_server_iov`, and `[remote]` validation."""

from __future__ import annotations

import sys

import pytest
from conftest import Criu

from crit_pageread.config import load_config
from crit_pageread.errors import ConfigError
from crit_pageread.pageserver.protocol import (
    GET_REPLY_CMD,
    PS_IOV_ADD_F,
    PS_IOV_CLOSE,
    PS_IOV_GET,
    Wire,
    check_reply,
    decode_dst_id,
    encode_cmd,
    encode_dst_id,
)
from crit_pageread.plugins import make_strategy


def le(value: int, size: int) -> bytes:
    return value.to_bytes(size, sys.byteorder)


def test_get_header_is_24_bytes_in_41_and_32_bytes_in_42_in_host_order() -> None:
    vaddr, pid = 0x7F0011223000, 4242
    assert Wire("4.1").pack_get(pid, vaddr, 1024) == le(7, 4) + le(1024, 4) + le(vaddr, 8) + le(pid, 8)
    assert Wire("4.2").pack_get(pid, vaddr, 1024) == le(7, 4) + bytes(4) + le(1024, 8) + le(vaddr, 8) + le(pid, 8)


def test_cmd_carries_flags_above_bit_16_and_close_carries_none() -> None:
    assert GET_REPLY_CMD == encode_cmd(PS_IOV_ADD_F, 4) == 0x40006
    assert PS_IOV_CLOSE == 0x1023 and PS_IOV_GET == 7
    header = Wire("4.2").unpack(Wire("4.2").pack(encode_cmd(PS_IOV_ADD_F, 6), 3, 0x1000, encode_dst_id("shmem", 9)))
    assert (header.op, header.flags, header.nr_pages) == (PS_IOV_ADD_F, 6, 3)
    assert header.dst_id == 9 << 8 | 2 and decode_dst_id(header.dst_id) == ("shmem", 9)
    assert encode_dst_id("pid", 77) == 77 << 8 | 1


def test_reply_that_does_not_answer_the_request_names_the_protocol() -> None:
    wire = Wire("4.1")
    good = wire.unpack(wire.pack(GET_REPLY_CMD, 2, 0x1000, 5))
    check_reply(good, 5, 0x1000, 4, "4.1", "srv")  # a short reply is legal
    # A 4.2 server's reply read as 4.1: the pad lands in nr_pages.
    misread = wire.unpack(Wire("4.2").pack(GET_REPLY_CMD, 2, 0x1000, 5)[:24])
    with pytest.raises(Exception, match=r"we speak the CRIU 4\.1 page-server protocol"):
        check_reply(misread, 5, 0x1000, 4, "4.1", "srv")
    with pytest.raises(Exception, match="asked for pid 5 at 0x2000"):
        check_reply(good, 5, 0x2000, 4, "4.1", "srv")


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ({}, "port"),
        ({"port": 0}, "port"),
        ({"port": "80"}, "port"),
        ({"port": 1, "protocol": "4.3"}, "protocol"),
        ({"port": 1, "timeout": -1}, "timeout"),
        ({"port": 1, "connect_timeout": True}, "connect_timeout"),
        ({"port": 1, "max_in_flight": 0}, "max_in_flight"),
        ({"port": 1, "local": "nosuch"}, "local"),
        ({"port": 1, "local": "remote"}, "local"),
        ({"port": 1, "tls_no_cn_verify": "yes"}, "tls_no_cn_verify"),
        ({"port": 1, "tls_cert": "/nonexistent/cert.pem"}, "tls_cert"),
        ({"port": 1, "adress": "x"}, "adress"),
    ],
)
def test_bad_remote_config_is_an_error_naming_the_key(table: dict[str, object], key: str) -> None:
    config = load_config(overrides={"remote": table}, env={})
    with pytest.raises(ConfigError, match=rf"\[remote\].*'?{key}'?"):
        make_strategy("remote", config)


def test_remote_strategy_with_local_none_has_no_local_strategy() -> None:
    config = load_config(overrides={"remote": {"port": 9, "local": "none", "protocol": "4.2"}}, env={})
    strategy = make_strategy("remote", config)
    assert strategy.serves_lazy and strategy.local is None  # type: ignore[attr-defined]
    assert strategy.server.protocol == "4.2"  # type: ignore[attr-defined]
    default = make_strategy("remote", load_config(overrides={"remote": {"port": 9}}, env={}))
    assert default.local is not None and default.local.name == "preadv"  # type: ignore[attr-defined]


@pytest.mark.parametrize("protocol", ["4.1", "4.2"])
def test_first_request_tells_the_header_layout(protocol: str) -> None:
    """serve's detection: a GET (or CLOSE) of either layout, read from its first 24 bytes."""
    from crit_pageread.pageserver.protocol import PS_IOV_CLOSE, detect_layout

    wire = Wire(protocol)
    for vaddr, nr in [(0x7F0000000000, 1), (0x1000, 1), (0x55D0_0000_0000, 1024), (0x400000, 3)]:
        assert detect_layout(wire.pack_get(4242, vaddr, nr)[:24], 4096, 1 << 18) == protocol
    assert detect_layout(wire.pack(PS_IOV_CLOSE)[:24], 4096, 1 << 18) == "4.1"  # the same bytes in both
    assert detect_layout(b"\xde\xad\xbe\xef" * 6, 4096, 1 << 18) is None


def test_environment_values_for_string_keys_are_strings() -> None:
    """CRIT_PAGEREAD_REMOTE__PROTOCOL=4.2 is the string "4.2" (not the number 4.2); numbers stay numbers."""
    from crit_pageread.config import load_config
    from crit_pageread.pageserver.protocol import configured_protocol
    from crit_pageread.strategies.remote import parse_options

    env = {"CRIT_PAGEREAD_REMOTE__PROTOCOL": "4.2", "CRIT_PAGEREAD_REMOTE__PORT": "7000",
           "CRIT_PAGEREAD_REMOTE__TIMEOUT": "1.5"}
    config = load_config(env=env)
    assert configured_protocol(config) == "4.2"
    server, _, _ = parse_options(config.table("remote"))
    assert (server.protocol, server.port, server.timeout) == ("4.2", 7000, 1.5)


def test_protocol_defaults_to_the_configured_criu(criu: Criu) -> None:
    """No [remote] protocol: the layout of the configured criu's version (as CRIU's own client does)."""
    from crit_pageread.config import load_config
    from crit_pageread.pageserver.protocol import configured_protocol

    assert configured_protocol(load_config(overrides={"criu": criu.binary}, env={})) == criu.line
    assert configured_protocol(load_config(overrides={"criu": criu.binary},
                                           env={"CRIT_PAGEREAD_REMOTE__PROTOCOL": "4.1"})) == "4.1"
