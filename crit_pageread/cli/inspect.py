"""`inspect DIR|ARCHIVE`: what a container checkpoint is, like `checkpointctl inspect` and `memparse`.

The container (name, id, image, runtime, created, engine) from `config.dump`
and `spec.dump` of a Podman, CRI-O or containerd checkpoint; sizes (images,
pages, rootfs-diff.tar); CRIU's dump statistics (`stats-dump`); and the
process tree with each command line read from memory and each process's
memory (its own pages and the shared memory it maps). A plain CRIU image
directory shows the same without the container part.
"""

from __future__ import annotations

import argparse
import io
import json
from typing import Any

from ..errors import ImageError
from ..hookspecs import hookimpl
from ..images import VMA_ANON_SHARED, VMA_AREA_MEMFD, VMA_AREA_SYSVIPC, CheckpointImages
from ..pagemap import PE_PARENT, PE_PRESENT
from .common import add_common_options, open_from_args, print_json, selected_pids
from .ps import pages_wanted, process_info

STATS_KEYS = ("freezing_time", "frozen_time", "memdump_time", "memwrite_time", "pages_scanned",
              "pages_skipped_parent", "pages_written", "pages_lazy")


@hookimpl
def crit_pageread_add_commands(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "inspect",
        help="what a container checkpoint is: container, image, runtime, sizes, processes and their memory",
        description="Show a container checkpoint (Podman/CRI-O/containerd archive or unpacked directory, or "
        "a plain CRIU image directory): the container from config.dump and spec.dump, sizes, CRIU's dump "
        "statistics, and the process tree with command lines read from memory and memory per process.",
    )
    p.add_argument("dir", help="checkpoint archive, unpacked container checkpoint, or image directory")
    p.add_argument("--env", action="store_true", help="also show each process's environment")
    add_common_options(p)
    p.set_defaults(func=run)


def _json_file(images: CheckpointImages, name: str) -> dict[str, Any] | None:
    data = images.container_file(name)
    if data is None:
        return None
    try:
        value = json.loads(data)
    except ValueError as exc:
        raise ImageError(_label(images, name), f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ImageError(_label(images, name), "not a JSON object")
    return value


def _label(images: CheckpointImages, name: str) -> str:
    where = images.container_dir or ""
    if images.archive is not None:
        return f"{images.archive}: {where + '/' if where else ''}{name}"
    return f"{where}/{name}"


def container_info(images: CheckpointImages) -> dict[str, Any] | None:
    """The container of a Podman/CRI-O/containerd checkpoint, or None for a plain image directory."""
    config = _json_file(images, "config.dump")
    spec = _json_file(images, "spec.dump")
    if config is None and spec is None:
        return None
    config = config or {}
    spec = spec or {}
    notes = spec.get("annotations") or {}
    manager = notes.get("io.container.manager")
    info: dict[str, Any] = {
        "name": config.get("name"),
        "id": config.get("id"),
        "image": config.get("rootfsImageName") or config.get("rootfsImage"),
        "image_id": config.get("rootfsImageID") or config.get("rootfsImageRef"),
        "runtime": config.get("runtime") or config.get("ociRuntime"),
        "created": config.get("createdTime"),
        "checkpointed": config.get("checkpointedTime"),
        "engine": "Podman" if manager == "libpod" else "CRI-O" if manager == "cri-o" else "containerd",
        "namespace": None,
        "pod": None,
    }
    if manager == "cri-o":
        try:
            meta = json.loads(notes.get("io.kubernetes.cri-o.Metadata") or "{}")
        except ValueError:
            meta = {}
        info["name"] = (meta.get("name") if isinstance(meta, dict) else None) or info["name"]
        info["created"] = notes.get("io.kubernetes.cri-o.Created") or info["created"]
        info["namespace"] = notes.get("io.kubernetes.pod.namespace")
        info["pod"] = notes.get("io.kubernetes.pod.name")
    elif manager != "libpod" and notes:
        info["name"] = notes.get("io.kubernetes.cri.container-name") or info["name"]
        info["namespace"] = notes.get("io.kubernetes.cri.sandbox-namespace")
        info["pod"] = notes.get("io.kubernetes.cri.sandbox-name")
    process = spec.get("process") or {}
    if isinstance(process.get("args"), list):
        info["spec_args"] = [str(a) for a in process["args"]]
    return info


def dump_statistics(images: CheckpointImages) -> dict[str, int] | None:
    """CRIU's dump statistics (`stats-dump` beside or inside the images), or None."""
    data = images.container_file("stats-dump")
    if data is None and images.has_image("stats-dump"):
        img = images.image("stats-dump")
        data = img.read_bounded(1 << 20) if hasattr(img, "read_bounded") else img.read_bytes()[: 1 << 20]
    if data is None:
        return None
    from ..criu_env import pycriu

    try:
        entries = pycriu().images.load(io.BytesIO(data))["entries"]
        dump = entries[0].get("dump") or {}
    except Exception:
        return None
    return {k: int(dump[k]) for k in STATS_KEYS if k in dump}


def memory_of(images: CheckpointImages, pid: int) -> dict[str, int]:
    """A process's memory in the checkpoint: its own dumped pages (chain included) and its shared memory."""
    page_size = images.page_size
    own = sum(e.nr_pages for e in images.pagemap(pid).entries if e.flags & (PE_PRESENT | PE_PARENT)) * page_size
    shmem = set(images.shmem_ids)
    memfd = images.memfd_shmids
    ids = set()
    for v in images.vmas(pid):
        if v.status & VMA_AREA_MEMFD:
            sid = memfd.get(v.shmid)
        elif v.status & (VMA_ANON_SHARED | VMA_AREA_SYSVIPC):
            sid = v.shmid
        else:
            continue
        if sid is not None and sid in shmem:
            ids.add(sid)
    shared = sum(
        sum(e.nr_pages for e in images.shmem_pagemap(i).entries if e.flags & (PE_PRESENT | PE_PARENT)) * page_size
        for i in sorted(ids)
    )
    return {"memory_bytes": own, "shared_bytes": shared}


def sizes(images: CheckpointImages) -> dict[str, int | None]:
    names = images.image_names()
    total = sum(images.image_size(n) or 0 for n in names)
    pages = sum(images.image_size(n) or 0 for n in names if n.startswith("pages-"))
    return {"images_bytes": total, "pages_bytes": pages,
            "rootfs_diff_bytes": images.container_file_size("rootfs-diff.tar")}


def inspect(images: CheckpointImages, pids: list[int], strategy: str | None, env: bool) -> dict[str, Any]:
    """Everything `inspect --json` prints."""
    procs = []
    for pid in pids:
        info = process_info(images, pid, strategy, env)
        if images.has_image(f"mm-{pid}.img"):
            info.update(memory_of(images, pid))
        procs.append(info)
    return {
        "checkpoint": str(images.archive) if images.archive is not None else images.container_dir or images.location,
        "images": images.location,
        "container": container_info(images),
        "sizes": sizes(images),
        "dump_statistics": dump_statistics(images),
        "processes": procs,
    }


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return str(n)


def run(args: argparse.Namespace) -> int:
    with open_from_args(args, pages_wanted=pages_wanted) as images:  # only argv and environment are read
        pids = selected_pids(images, args)
        report = inspect(images, pids, args.strategy, args.env)
    if args.json:
        print_json(report)
        return 0
    print(f"Checkpoint: {report['checkpoint']}")
    ctr = report["container"]
    if ctr is not None:
        for label, key in (("Container", "name"), ("ID", "id"), ("Image", "image"), ("Runtime", "runtime"),
                           ("Created", "created"), ("Checkpointed", "checkpointed"), ("Engine", "engine"),
                           ("Namespace", "namespace"), ("Pod", "pod")):
            if ctr.get(key):
                print(f"{label + ':':<17} {ctr[key]}")
    sz = report["sizes"]
    print(f"{'Images:':<17} {_size(sz['images_bytes'])} (pages {_size(sz['pages_bytes'])})")
    if sz["rootfs_diff_bytes"] is not None:
        print(f"{'Root FS diff:':<17} {_size(sz['rootfs_diff_bytes'])}")
    stats = report["dump_statistics"]
    if stats:
        us = ", ".join(f"{k.removesuffix('_time')} {stats[k] / 1000:.1f} ms" for k in STATS_KEYS[:4] if k in stats)
        pages = ", ".join(f"{k.removeprefix('pages_').replace('_', ' ')} {stats[k]}" for k in STATS_KEYS[4:]
                          if k in stats)
        print(f"{'CRIU dump:':<17} {us}; pages {pages}")
    procs = {p["pid"]: p for p in report["processes"]}
    children: dict[int, list[int]] = {}
    roots = []
    for pid, p in procs.items():
        if p["ppid"] in procs:
            children.setdefault(p["ppid"], []).append(pid)
        else:
            roots.append(pid)
    print()
    print(f"{'PID':>7} {'PPID':>7} {'MEMORY':>10} {'SHARED':>10}  COMMAND")

    def show(pid: int, depth: int) -> None:
        p = procs[pid]
        words = p["argv"] or [f"[{p['comm']}]"]
        if "environ" in p:
            words = words + p["environ"]
        line = " ".join(words)
        if "errors" in p:
            line += f"  (unreadable: {'; '.join(p['errors'])})"
        indent = "  " * depth + ("\\_ " if depth else "")
        print(f"{pid:>7} {p['ppid']:>7} {_size(p.get('memory_bytes')):>10} {_size(p.get('shared_bytes')):>10}  "
              f"{indent}{line}")
        for kid in children.get(pid, []):
            show(kid, depth + 1)

    for root in roots:
        show(root, 0)
    return 0
