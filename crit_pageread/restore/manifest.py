"""A page-checksum manifest of a dump: write it after `criu dump`, verify it before `criu restore`.

`crit-pageread-manifest.json` in the image directory holds the sha256 of
every image file but the pages files, and for each pagemap the sha256 of
its present pages in runs of at most `run_pages` pages (default 16), so a
corrupted page is named by process, address and pages-file offset. Pages of
a parent image are covered by the parent's own manifest, which `verify`
checks too when it is there.

Used by the CRIU action script `hooks/criu-action-manifest`, and as
`python -m crit_pageread.restore.manifest write|verify DIR`.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from ..config import host_page_size, load_config
from ..errors import ImageError
from ..images import CheckpointImages, open_images
from ..strategy import Target
from .squash import memory_targets, pagemap_name

MANIFEST = "crit-pageread-manifest.json"
VERSION = 1
DEFAULT_RUN_PAGES = 16
_BUF = 1 << 20


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_BUF):
            h.update(chunk)
    return h.hexdigest()


def _is_pages(name: str) -> bool:
    return name.startswith("pages-") and name.endswith(".img")


def _image_files(path: Path) -> list[str]:
    return sorted(
        e.name for e in os.scandir(path)
        if e.name.endswith(".img") and not _is_pages(e.name) and e.is_file(follow_symlinks=False)
    )


def _page_runs(images: CheckpointImages, target: Target, run_pages: int) -> dict[str, Any]:
    """[vaddr, nr_pages, pages-file offset, sha256] per run of a pagemap's present pages.

    The pages are read through a reader of this image and the configured strategy (a present
    entry's bytes are at its offset of this image's pages file, whatever the chain holds)."""
    pm = images.pagemap_for(target)
    page_size = pm.page_size
    runs = []
    buf = bytearray(run_pages * page_size)
    reader = (images.reader(target.id, zero_fill=False, auto_dedup=False) if target.kind == "pid"
              else images.shmem_reader(target.id, zero_fill=False, auto_dedup=False))
    with reader:
        for e in pm.entries:
            if not e.present:
                continue
            for first in range(0, e.nr_pages, run_pages):
                nr = min(run_pages, e.nr_pages - first)
                vaddr = e.vaddr + first * page_size
                view = memoryview(buf)[: nr * page_size]
                reader.readinto(vaddr, view)
                runs.append([vaddr, nr, e.offset + first * page_size, hashlib.sha256(view).hexdigest()])
    return {"pagemap": pm.path.name, "pages_file": pm.pages_path.name, "pages_size": os.stat(pm.pages_path).st_size
            if pm.pages_path.exists() else 0, "runs": runs}


def _open(path: Path, page_size: int) -> CheckpointImages:
    """The image directory with the configured strategy, at the manifest's page size."""
    config = load_config()
    return open_images(path, config.replace(page_size=page_size) if config.page_size != page_size else config)


def build_manifest(images_dir: str | os.PathLike[str], run_pages: int = DEFAULT_RUN_PAGES,
                   page_size: int | None = None) -> dict[str, Any]:
    """The manifest of an image directory (not written)."""
    path = Path(images_dir)
    page_size = page_size or host_page_size()
    if not (path / "inventory.img").exists() and not memory_targets(path):
        raise ImageError(path, "not a CRIU image directory (no inventory.img, no pagemaps)")
    files = {name: _sha256_file(path / name) for name in _image_files(path)}
    with _open(path, page_size) as images:
        pages = {str(t): _page_runs(images, t, run_pages) for t in memory_targets(path)}
    return {"version": VERSION, "page_size": page_size, "run_pages": run_pages, "files": files, "pages": pages}


def write_manifest(images_dir: str | os.PathLike[str], run_pages: int = DEFAULT_RUN_PAGES) -> Path:
    """Write `crit-pageread-manifest.json` into the image directory (atomically); return its path."""
    from ..output import atomic_file

    path = Path(images_dir)
    manifest = build_manifest(path, run_pages)
    with atomic_file(path / MANIFEST, "w") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")
    return path / MANIFEST


def verify_manifest(images_dir: str | os.PathLike[str], *, required: bool = True, parents: bool = True) -> list[str]:
    """Check the image directory against its manifest; raise ImageError naming the first damage.

    Returns the directories checked (the parent chain's too, where they have a
    manifest). A missing manifest is an error when `required`, else skipped.
    """
    path = Path(images_dir)
    checked: list[str] = []
    seen: set[str] = set()
    while True:
        real = os.path.realpath(path)
        if real in seen:
            raise ImageError(path, "parent chain has a cycle")
        seen.add(real)
        mpath = path / MANIFEST
        if mpath.exists():
            _verify_one(path, mpath)
            checked.append(str(path))
        elif required and not checked:
            raise ImageError(mpath, "no manifest (the dump was not made with the manifest action script)")
        parent = path / "parent"
        if not parents or not (parent.is_symlink() or parent.exists()):
            return checked
        target = os.readlink(parent) if parent.is_symlink() else parent.read_text().strip()
        path = (path / target) if not os.path.isabs(target) else Path(target)


def _verify_one(path: Path, mpath: Path) -> None:
    try:
        manifest = json.loads(mpath.read_text())
        version = manifest["version"]
        page_size, run_pages = int(manifest["page_size"]), int(manifest["run_pages"])
        files, pages = dict(manifest["files"]), dict(manifest["pages"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ImageError(mpath, f"unreadable manifest: {exc}") from None
    if version != VERSION:
        raise ImageError(mpath, f"manifest version {version}, expected {VERSION}")
    now_files = _image_files(path)
    for name in sorted(set(now_files) - set(files)):
        raise ImageError(path / name, "image not in the manifest (added after the dump)")
    for name, digest in sorted(files.items()):
        if not (path / name).exists():
            raise ImageError(path / name, "image listed in the manifest is missing")
        if _sha256_file(path / name) != digest:
            raise ImageError(path / name, "checksum differs from the manifest (image changed or corrupted)")
    targets = {str(t): pagemap_name(t) for t in memory_targets(path)}
    if set(targets) != set(pages):
        raise ImageError(path, f"pagemaps differ from the manifest: {sorted(targets)} vs {sorted(pages)}")
    with _open(path, page_size) as images:
        now = {str(t): t for t in memory_targets(path)}
        got_pages = {name: _page_runs(images, now[name], run_pages) for name in sorted(pages)}
    for target, want in sorted(pages.items()):
        got = got_pages[target]
        pages_path = path / want["pages_file"]
        if got["pages_size"] != want["pages_size"]:
            raise ImageError(pages_path, f"size {got['pages_size']}, {want['pages_size']} in the manifest")
        for (vaddr, nr, offset, digest), (_v, _n, _o, now) in zip(want["runs"], got["runs"], strict=True):
            if digest != now:
                raise ImageError(
                    pages_path,
                    f"{target}: pages at {vaddr:#x}-{vaddr + nr * page_size:#x} (offset {offset}) differ from the "
                    "manifest (corrupted)",
                )


def action_main(env: dict[str, str] | None = None) -> int:
    """The CRIU action script: post-dump writes the manifest, pre-restore verifies it (non-zero refuses)."""
    env = dict(os.environ if env is None else env)
    action = env.get("CRTOOLS_SCRIPT_ACTION", "")
    images = os.path.realpath(env["CRTOOLS_IMAGE_DIR"]) if env.get("CRTOOLS_IMAGE_DIR") else ""
    if action not in ("post-dump", "pre-restore"):
        return 0
    if not images:
        print("criu-action-manifest: CRTOOLS_IMAGE_DIR is not set", file=sys.stderr)
        return 2
    run_pages = int(env.get("CRIT_PAGEREAD_MANIFEST_RUN_PAGES", DEFAULT_RUN_PAGES))
    required = env.get("CRIT_PAGEREAD_MANIFEST_REQUIRED", "0").lower() in ("1", "true", "yes")
    try:
        if action == "post-dump":
            out = write_manifest(images, run_pages)
            print(f"criu-action-manifest: wrote {out.name}", file=sys.stderr)
        else:
            checked = verify_manifest(images, required=required)
            what = f"{len(checked)} image directories verified" if checked else "no manifest, not verified"
            # Then its memory as `crit-pageread check` sees it (pagemaps, pages sizes, chain, VMAs, shmem).
            from ..check import check_checkpoint

            errors = check_checkpoint(images, notes=False).memory_errors
            if errors:
                raise ImageError(errors[0].file, f"{errors[0].message} (and {len(errors) - 1} more problems)"
                                 if len(errors) > 1 else errors[0].message)
            print(f"criu-action-manifest: {what}; checkpoint checked", file=sys.stderr)
    except (ImageError, OSError) as exc:
        print(f"criu-action-manifest: {action}: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m crit_pageread.restore.manifest write|verify|action [DIR]`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["action"]:
        return action_main()
    if len(argv) != 2 or argv[0] not in ("write", "verify"):
        print("usage: python -m crit_pageread.restore.manifest write|verify DIR | action", file=sys.stderr)
        return 2
    try:
        if argv[0] == "write":
            print(write_manifest(argv[1]))
        else:
            for d in verify_manifest(argv[1]):
                print(f"{d}: OK")
    except (ImageError, OSError) as exc:
        print(f"crit-pageread manifest: {exc}", file=sys.stderr)
        return 1
    return 0


def console() -> None:
    """The `crit-pageread-manifest` console script: the action script when CRIU runs it (no arguments),
    else `write|verify DIR` by hand."""
    by_criu = not sys.argv[1:] and "CRTOOLS_SCRIPT_ACTION" in os.environ
    sys.exit(action_main() if by_criu else main())


if __name__ == "__main__":
    sys.exit(main())
