"""Issue 11's findings, each rebuilt here from a real CRIU dump: outputs, images, mmap, coredump, parent.

Every hostile input is made by the test itself in a temporary directory (never the
real /dev/null: a device node, FIFO or symlink of our own).
"""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest
from hostile_support import (
    PAGE,
    Dump,
    copy_dump,
    dead_pid,
    entry_fields,
    make_dump,
    one_line_error,
    pagemap_path,
    pages_path,
    run_cli,
    write_pagemap_fields,
)

from crit_pageread import ChainError, ImageError, open_images
from crit_pageread.output import atomic_file, parse_temp_name, stale_temps
from crit_pageread.pagemap import PE_LAZY, PE_PRESENT, load_pagemap


@pytest.fixture(scope="module")
def small(criu_ok: None, tmp_path_factory: pytest.TempPathFactory) -> Dump:
    return make_dump(tmp_path_factory.mktemp("hostile"))


def read_args(d: Dump, images: Path | None = None, length: int = PAGE) -> list[str]:
    return ["read", str(images or d.images), "--pid", str(d.pid), hex(d.vaddr), str(length)]


def expected_page(d: Dump) -> bytes:
    with open_images(d.images) as images, images.reader(d.pid) as reader:
        return reader.read(d.vaddr, PAGE)


# --- 1. outputs ----------------------------------------------------------------------------------


def _drain_fifo(path: Path, got: list[bytes]) -> threading.Thread:
    def run() -> None:
        with open(path, "rb") as f:
            got.append(f.read())

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


@pytest.mark.parametrize("how", ["raw", "hexdump", "decode"])
def test_output_to_a_device_node_writes_through_it_and_never_replaces_it(small: Dump, tmp_path: Path, how: str):
    """`read -o /dev/null` (and decode -o, --hexdump -o) must not turn a device into a regular file."""
    null = tmp_path / "null"
    os.mknod(null, stat.S_IFCHR | 0o666, os.makedev(1, 3))  # our own /dev/null node
    os.chmod(null, 0o666)
    before = os.lstat(null)
    if how == "decode":
        proc = run_cli("decode", "-i", str(pagemap_path(small.images, small.pid)), "-o", str(null))
    else:
        proc = run_cli(*read_args(small), *(["--hexdump"] if how == "hexdump" else []), "-o", str(null))
    assert proc.returncode == 0, proc.stderr
    after = os.lstat(null)
    assert stat.S_ISCHR(after.st_mode) and after.st_rdev == before.st_rdev and after.st_ino == before.st_ino
    assert stat.S_IMODE(after.st_mode) == 0o666
    assert not [n for n in os.listdir(tmp_path) if parse_temp_name(n)]


def test_output_to_a_fifo_is_written_through_the_fifo(small: Dump, tmp_path: Path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = _drain_fifo(fifo, got)
    proc = run_cli(*read_args(small), "-o", str(fifo))
    reader.join(30)
    assert proc.returncode == 0, proc.stderr
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert got == [expected_page(small)]


def test_output_to_a_symlink_writes_its_target_and_keeps_the_link(small: Dump, tmp_path: Path):
    target = tmp_path / "real.bin"
    target.write_bytes(b"old")
    os.chmod(target, 0o640)
    link = tmp_path / "link.bin"
    os.symlink("real.bin", link)
    proc = run_cli(*read_args(small), "-o", str(link))
    assert proc.returncode == 0, proc.stderr
    assert os.path.islink(link) and os.readlink(link) == "real.bin"
    assert target.read_bytes() == expected_page(small)
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o640


def test_existing_output_keeps_its_mode_and_a_new_one_gets_the_umask_mode(small: Dump, tmp_path: Path):
    old = tmp_path / "old.bin"
    old.write_bytes(b"x" * 10)
    os.chmod(old, 0o640)
    assert run_cli(*read_args(small), "-o", str(old), umask=0o022).returncode == 0
    assert stat.S_IMODE(os.stat(old).st_mode) == 0o640 and old.read_bytes() == expected_page(small)
    for umask, mode in ((0o022, 0o644), (0o077, 0o600), (0o002, 0o664)):
        new = tmp_path / f"new-{umask:o}.bin"
        assert run_cli(*read_args(small), "-o", str(new), umask=umask).returncode == 0
        assert stat.S_IMODE(os.stat(new).st_mode) == mode, (umask, oct(os.stat(new).st_mode))
        dec = tmp_path / f"dec-{umask:o}.json"
        assert run_cli("decode", "-i", str(pagemap_path(small.images, small.pid)), "-o", str(dec),
                       umask=umask).returncode == 0
        assert stat.S_IMODE(os.stat(dec).st_mode) == mode


def test_output_that_cannot_be_created_is_named_not_its_temporary_name(small: Dump, tmp_path: Path):
    out = tmp_path / "no-such-dir" / "out.bin"
    line = one_line_error(run_cli(*read_args(small), "-o", str(out)), str(out))
    assert TEMP_TAG_IN(line) is False
    # root ignores mode bits: a regular file standing where the directory should be.
    notdir = tmp_path / "file"
    notdir.write_bytes(b"")
    line = one_line_error(run_cli(*read_args(small), "-o", str(notdir / "x.bin")), str(notdir / "x.bin"))
    assert TEMP_TAG_IN(line) is False


def TEMP_TAG_IN(line: str) -> bool:
    return "crit-pageread-" in line and ".tmp" in line


@pytest.mark.parametrize("command", ["read", "extract", "squash", "coredump"])
def test_stale_temporary_names_of_a_killed_run_are_removed_by_the_next_run(small: Dump, tmp_path: Path,
                                                                          command: str):
    """A run killed by SIGKILL leaves `.NAME.crit-pageread-PID.tmp`; the next run on that output removes it."""
    pid = dead_pid()
    name = {"read": "out.bin", "extract": "out", "squash": "sq", "coredump": "cores"}[command]
    stale = tmp_path / f".{name}.crit-pageread-{pid}.tmp"
    if command == "read":
        stale.write_bytes(b"partial")
    else:
        (stale / "pid-1").mkdir(parents=True)
        (stale / "pid-1" / "x.bin").write_bytes(b"partial")
    alive = tmp_path / f".{name}.crit-pageread-1.tmp"  # pid 1 is alive: never touched
    alive.write_bytes(b"someone else's")
    assert stale_temps(tmp_path) == [stale]
    out = tmp_path / name
    args = {"read": [*read_args(small), "-o", str(out)], "extract": ["extract", str(small.images), "-o", str(out)],
            "squash": ["squash", str(small.images), str(out)],
            "coredump": ["coredump", str(small.images), "-o", str(out)]}[command]
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr
    assert not stale.exists() and alive.exists() and out.exists()


def test_library_atomic_file_leaves_nothing_on_error(tmp_path: Path):
    out = tmp_path / "o.bin"
    with pytest.raises(RuntimeError), atomic_file(out) as f:
        f.write(b"half")
        raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


# --- 2. images: FIFOs, devices, bounds, flags, sizes ------------------------------------------------


def _fifo_instead(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


@pytest.mark.parametrize("image", ["pstree", "pagemap", "pages", "mm", "core"])
def test_an_image_that_is_a_fifo_is_refused_at_once(small: Dump, tmp_path: Path, image: str):
    images = copy_dump(small, tmp_path / "ck")
    path = {"pstree": images / "pstree.img", "pagemap": pagemap_path(images, small.pid),
            "pages": pages_path(images, small.pid), "mm": images / f"mm-{small.pid}.img",
            "core": images / f"core-{small.pid}.img"}[image]
    _fifo_instead(path)
    cmd = {"core": ["coredump", str(images), "-o", str(tmp_path / "cores")],
           "mm": ["extract", str(images), "-o", str(tmp_path / "out")]}.get(image, read_args(small, images))
    line = one_line_error(run_cli(*cmd, timeout=30), path.name, "FIFO")
    assert "FIFO" in line


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/urandom"])
@pytest.mark.parametrize("image", ["pstree", "pagemap", "pages"])
def test_an_image_symlinked_to_an_endless_device_is_one_line_in_bounded_memory(small: Dump, tmp_path: Path,
                                                                               device: str, image: str):
    images = copy_dump(small, tmp_path / "ck")
    path = {"pstree": images / "pstree.img", "pagemap": pagemap_path(images, small.pid),
            "pages": pages_path(images, small.pid)}[image]
    path.unlink()
    os.symlink(device, path)
    # 1 GiB of address space: the interpreter and its imports fit, an unbounded read does not.
    one_line_error(run_cli(*read_args(small, images), limit_as=1 << 30, timeout=30), path.name, "device")


def test_library_names_the_fifo_image(small: Dump, tmp_path: Path):
    images = copy_dump(small, tmp_path / "ck")
    _fifo_instead(images / "pstree.img")
    with pytest.raises(ImageError, match=r"pstree\.img: is a FIFO"), open_images(images) as ck:
        ck.pids  # noqa: B018


def test_an_oversized_image_is_refused_without_being_read(small: Dump, tmp_path: Path):
    images = copy_dump(small, tmp_path / "ck")
    pstree = images / "pstree.img"
    with open(pstree, "r+b") as f:
        f.truncate(200 << 20)  # sparse: larger than any pstree, costs no disk
    one_line_error(run_cli(*read_args(small, images), limit_as=1 << 30), "pstree.img", "more than")


def _rewrite(images: Path, pid: int, change) -> Path:  # type: ignore[no-untyped-def]
    path = pagemap_path(images, pid)
    pages_id, entries = entry_fields(path)
    write_pagemap_fields(path, pages_id, change(entries))
    return path


def _first_present(entries: list[list[tuple[int, int]]]) -> int:
    return next(i for i, e in enumerate(entries) if dict(e)[4] & PE_PRESENT)


@pytest.mark.parametrize("bits", [0x80000000, 1 << 47, 0x8, 1 << 33])
def test_unknown_pe_flag_bits_are_refused(small: Dump, tmp_path: Path, bits: int):
    images = copy_dump(small, tmp_path / "ck")

    def change(entries: list[list[tuple[int, int]]]) -> list[list[tuple[int, int]]]:
        i = _first_present(entries)
        e = dict(entries[i])
        entries[i] = [(1, e[1]), (2, e[2]), (4, e[4] | bits)]
        return entries

    path = _rewrite(images, small.pid, change)
    with pytest.raises(ImageError, match="unknown flag bits"):
        load_pagemap(path, PAGE)
    one_line_error(run_cli(*read_args(small, images)), path.name, "unknown flag bits")


def test_a_dropped_entry_is_refused_as_a_pages_file_longer_than_its_pagemap(small: Dump, tmp_path: Path):
    images = copy_dump(small, tmp_path / "ck")

    def change(entries: list[list[tuple[int, int]]]) -> list[list[tuple[int, int]]]:
        del entries[_first_present(entries)]
        return entries

    pages = pages_path(images, small.pid)
    _rewrite(images, small.pid, change)
    one_line_error(run_cli(*read_args(small, images)), pages.name, "accounts for")


def test_present_turned_lazy_is_refused(small: Dump, tmp_path: Path):
    images = copy_dump(small, tmp_path / "ck")

    def change(entries: list[list[tuple[int, int]]]) -> list[list[tuple[int, int]]]:
        i = _first_present(entries)
        e = dict(entries[i])
        entries[i] = [(1, e[1]), (2, e[2]), (4, PE_LAZY)]
        return entries

    _rewrite(images, small.pid, change)
    one_line_error(run_cli(*read_args(small, images)), "accounts for")


def test_field_2_and_field_5_disagreeing_is_read_as_criu_does_and_reported(small: Dump, tmp_path: Path):
    """CRIU takes field 5 (nr_pages) when present; field 2 = 10 with field 5 = 1 on a 10-page entry is caught by
    the pages-file size, and on a 1-page entry is listed as an anomaly."""
    images = copy_dump(small, tmp_path / "ck")
    pages_id, entries = entry_fields(pagemap_path(images, small.pid))
    big = next(i for i, e in enumerate(entries) if dict(e)[4] & PE_PRESENT and dict(e)[2] >= 2)
    e = dict(entries[big])
    entries[big] = [(1, e[1]), (2, 10), (4, e[4]), (5, 1)]
    write_pagemap_fields(pagemap_path(images, small.pid), pages_id, entries)
    one_line_error(run_cli(*read_args(small, images)), "accounts for")
    # The same disagreement where field 5 is the truth: read as CRIU reads it, and reported.
    images2 = copy_dump(small, tmp_path / "ck2")
    pages_id, entries = entry_fields(pagemap_path(images2, small.pid))
    one = next(i for i, e in enumerate(entries) if dict(e)[2] == 1)
    e = dict(entries[one])
    entries[one] = [(1, e[1]), (2, 10), (4, e[4]), (5, 1)]
    write_pagemap_fields(pagemap_path(images2, small.pid), pages_id, entries)
    pm = load_pagemap(pagemap_path(images2, small.pid), PAGE)
    assert pm.entries[one].nr_pages == 1
    assert len(pm.anomalies) == 1 and "field 2" in pm.anomalies[0] and "as CRIU does" in pm.anomalies[0]


# --- 3. mmap maps bounded windows ------------------------------------------------------------------


def test_mmap_reads_a_sparse_pages_file_larger_than_the_address_space(small: Dump, tmp_path: Path):
    """A present entry of 64 GiB (a sparse pages file) read with mmap under a 2 GiB address-space limit."""
    images = copy_dump(small, tmp_path / "ck")
    path = pagemap_path(images, small.pid)
    pages_id, entries = entry_fields(path)
    pm = load_pagemap(path, PAGE)
    pages = pages_path(images, small.pid)
    top = pm.entries[-1].end
    huge = (64 << 30) // PAGE
    entries.append([(1, top + (1 << 30)), (2, huge), (4, PE_PRESENT)])
    write_pagemap_fields(path, pages_id, entries)
    size = os.stat(pages).st_size + huge * PAGE
    with open(pages, "r+b") as f:
        f.truncate(size)
        f.seek(size - PAGE)
        f.write(b"E" * PAGE)
    last = top + (1 << 30) + (huge - 1) * PAGE
    proc = run_cli("read", str(images), "--pid", str(small.pid), hex(last), str(PAGE), "--strategy", "mmap",
                   limit_as=2 << 30)
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("read", str(images), "--pid", str(small.pid), hex(small.vaddr), str(PAGE), "--strategy", "mmap",
                   "--json", limit_as=2 << 30)
    assert proc.returncode == 0, proc.stderr


# --- 4. coredump of absurd ids and addresses -------------------------------------------------------


def _patch_pstree(images: Path, field: int, value: int) -> Path:
    from crit_pageread.imagefile import check_magic, decode_message, encode_varint, iter_entries

    path = images / "pstree.img"
    data = path.read_bytes()
    payloads = []
    for payload in iter_entries(path, data, check_magic(path, data, "PSTREE")):
        msg = decode_message(path, payload)
        out = b""
        for number, values in msg.fields.items():
            for v in values:
                if number == field:
                    v = value
                if isinstance(v, int):
                    out += encode_varint(number << 3) + encode_varint(v)
                else:
                    out += encode_varint(number << 3 | 2) + encode_varint(len(v)) + v
        payloads.append(out)
    from crit_pageread.imagefile import frame

    path.write_bytes(frame("PSTREE", payloads))
    return path


@pytest.mark.parametrize(("field", "name"), [(2, "ppid"), (3, "pgid"), (4, "sid")])
def test_coredump_of_pstree_ids_past_2_31_is_one_line(small: Dump, tmp_path: Path, field: int, name: str):
    images = copy_dump(small, tmp_path / "ck")
    _patch_pstree(images, field, 1 << 31)
    one_line_error(run_cli("coredump", str(images), "-o", str(tmp_path / "cores")), "pstree.img", name)
    assert not (tmp_path / "cores").exists()


def test_coredump_of_a_vma_ending_at_2_57_is_one_line(small: Dump, tmp_path: Path):
    from crit_pageread.criu_env import pycriu

    images = copy_dump(small, tmp_path / "ck")
    mm = images / f"mm-{small.pid}.img"
    with open(mm, "rb") as f:
        img = pycriu().images.load(f)
    vmas = img["entries"][0]["vmas"]
    vmas[-1]["end"] = hex(1 << 57) if isinstance(vmas[-1]["end"], str) else 1 << 57
    with open(mm, "wb") as f:
        pycriu().images.dump(img, f)
    one_line_error(run_cli("coredump", str(images), "-o", str(tmp_path / "cores")), mm.name)


# --- 5. a `parent` file is never echoed raw ---------------------------------------------------------


def _parent_error(images: Path) -> str:
    with pytest.raises(ChainError) as err, open_images(images) as ck:
        ck.parent  # noqa: B018
    line = str(err.value)
    assert "\n" not in line
    return line


def test_a_parent_file_with_terminal_escapes_is_escaped_and_capped(small: Dump, tmp_path: Path):
    images = copy_dump(small, tmp_path / "ck")
    (images / "parent").write_bytes(b"\x1b]0;pwned\x07\x1b[2J" + b"A" * 3000)
    line = _parent_error(images)
    assert "\x1b" not in line and "\x07" not in line and "\\x1b" in line
    assert len(line) < 600
    line = one_line_error(run_cli("check", str(images)), "parent")
    assert "\x1b" not in line and len(line) < 600


def test_a_parent_file_naming_a_too_long_path_is_one_line(small: Dump, tmp_path: Path):
    images = copy_dump(small, tmp_path / "ck")
    (images / "parent").write_bytes(b"x" * 3000)
    line = _parent_error(images)
    assert "File name too long" in line and len(line) < 600


@pytest.mark.parametrize("command", ["show", "info", "decode", "x"])
def test_crit_commands_refuse_a_fifo_image_instead_of_blocking(small: Dump, tmp_path: Path, command: str):
    """crit opens its inputs itself: a FIFO must be refused before it does (it would wait for a writer forever)."""
    images = copy_dump(small, tmp_path / "ck")
    pstree = images / "pstree.img"
    _fifo_instead(pstree)
    args = {"show": ["show", str(pstree)], "info": ["info", str(pstree)], "decode": ["decode", "-i", str(pstree)],
            "x": ["x", str(images), "ps"]}[command]
    one_line_error(run_cli(*args, timeout=30), "pstree.img", "FIFO")


@pytest.mark.parametrize("command", ["extract", "coredump", "squash", "read"])
def test_runs_killed_by_sigkill_leave_temporaries_that_the_next_run_removes(small: Dump, tmp_path: Path,
                                                                              command: str):
    """SIGKILL at random moments of real runs, then one run to the end: no temporary name of ours is left."""
    import random
    import signal
    import subprocess
    import sys
    import time

    from hostile_support import REPO

    out = tmp_path / "out"
    args = {"extract": ["extract", str(small.images), "-o", str(out)],
            "coredump": ["coredump", str(small.images), "-o", str(out)],
            "squash": ["squash", str(small.images), str(out)],
            "read": [*read_args(small, length=256 * PAGE), "--zero-fill", "-o", str(out)]}[command]
    rng = random.Random(5)
    for _ in range(6):
        proc = subprocess.Popen([sys.executable, "-m", "crit_pageread", *args], cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.2, 1.2))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if command != "read" and out.exists():  # it finished first: the next run needs a new name
            import shutil

            shutil.rmtree(out)
    final = run_cli(*args)
    assert final.returncode == 0, final.stderr
    left = [n for n in os.listdir(tmp_path) if parse_temp_name(n)]
    if out.is_dir():
        left += [n for n in os.listdir(out) if parse_temp_name(n)]
    assert left == []
