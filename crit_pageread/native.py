"""The optional compiled helper `_fastio` (crit_pageread/_fastio.c), or None without it.

`pip install` builds it where a C compiler and Python's headers are (it is an optional extension:
the install goes on without it). It runs the per-piece loops of planning a read over a memory map,
resolving a chain level over its parent, and the preadv/pread/memcpy loops of the local strategies and
their kernel copies into files, the I/O without the GIL. Without it (not built, or CRIT_PAGEREAD_NATIVE=0
in the environment) the pure-Python planner and strategies do the same work with the same results, more
slowly on dumps of many small pieces; also when the built module is of another VERSION than this code's
(a checkout updated without `make setup`). Tests run both by setting `fastio` to None.
"""

from __future__ import annotations

import os

from . import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import Any

#: The helper's interface this code calls (`_fastio.VERSION`).
VERSION = 8

fastio: Any = None
if os.environ.get("CRIT_PAGEREAD_NATIVE", "1") != "0":
    try:
        from . import _fastio as fastio
    except ImportError:
        fastio = None
    if getattr(fastio, "VERSION", None) != VERSION:
        fastio = None
