"""Tests that run twice, with the native helper (crit_pageread._fastio) and with the pure-Python path."""

from __future__ import annotations

import os

import pytest

from crit_pageread import native

NOT_BUILT = "the native helper crit_pageread._fastio is not built (pip install -e . builds it with a C compiler)"


def need_native() -> None:
    """Skip a test of the native helper when it is not built; under CI=true (a C compiler is there) fail it."""
    if native.fastio is None:
        if os.environ.get("CI") == "true":
            pytest.fail(NOT_BUILT)
        pytest.skip(NOT_BUILT)


def use_helper(which: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """`"native"`: the native helper must be built (see need_native); any other path (`"python"`, `"libc"`): it
    is off for this test."""
    if which == "native":
        need_native()
    else:
        monkeypatch.setattr(native, "fastio", None)
