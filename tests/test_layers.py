"""Layers point one way: the library reads memory without loading the command line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from crit_pageread.testing import ImageBuilder, VmaSpec

PROBE = """
import sys
import crit_pageread
from crit_pageread import open_images
with open_images(sys.argv[1]) as images, images.reader(10) as reader:
    assert reader.read(0x10000, 8) == b"ABCDEFGH", "wrong bytes"
cli = sorted(m for m in sys.modules if m.startswith("crit_pageread.cli"))
print(" ".join(cli) or "none")
"""


def test_library_read_loads_no_command_module(tmp_path: Path) -> None:
    d = ImageBuilder(tmp_path / "d").process(10, vmas=[VmaSpec(0x10000, 0x11000)])
    d.pagemap(10, [(0x10000, b"ABCDEFGH" * 512)])
    d.write()
    out = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path / "d")], capture_output=True, text=True,
                         check=True)
    assert out.stdout.split() == ["none"], f"the library imported command modules: {out.stdout}"
