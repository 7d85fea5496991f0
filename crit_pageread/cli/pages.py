"""`pages DIR`: each pid's pagemap as a table, with the image of the chain that holds each run."""

from __future__ import annotations

import argparse
from typing import Any

from ..hookspecs import hookimpl
from ..images import CheckpointImages
from ..pagemap import PE_PARENT, PE_PRESENT, flag_names
from ..reader import PageReader
from ..strategy import Target
from .common import add_common_options, open_from_args, print_ndjson, selected_pids


@hookimpl
def crit_pageread_add_commands(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "pages",
        help="pagemaps as tables: ranges, pages, flags, source image",
        description="List each pid's pagemap entries (and the shared-memory pagemaps) with the image "
        "of the parent chain that holds their data, and the number of pages per flag combination.",
    )
    p.add_argument("dir", help="image directory or checkpoint archive")
    p.add_argument("--no-shmem", action="store_true", help="leave out the shared-memory pagemaps")
    add_common_options(p)
    p.set_defaults(func=run)


def _sources(reader: PageReader, vaddr: int, length: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for seg in reader.segments(vaddr, length):
        pages = str(seg.pages.path) if seg.pages is not None else None
        if out and out[-1]["pages_file"] == pages and out[-1]["depth"] == seg.depth and out[-1]["kind"] == seg.kind:
            out[-1]["length"] += seg.length
            continue
        out.append({"kind": seg.kind, "image": seg.image, "depth": seg.depth, "pages_file": pages,
                    "offset": seg.offset - seg.pages.base if seg.pages is not None else seg.offset,
                    "vaddr": seg.vaddr, "length": seg.length})
    return out


def table(reader: PageReader) -> dict[str, Any]:
    """The entries of one pagemap, each with where its data is, and totals per flag combination."""
    entries = []
    totals: dict[str, int] = {}
    for e in reader.pagemap.entries:
        names = flag_names(e.flags)
        totals[names] = totals.get(names, 0) + e.nr_pages
        sources = _sources(reader, e.vaddr, e.size) if e.flags & (PE_PRESENT | PE_PARENT) else []
        entries.append({"start": e.vaddr, "end": e.end, "pages": e.nr_pages, "flags": e.flags,
                        "flag_names": names, "sources": sources})
    totals["total"] = sum(e.nr_pages for e in reader.pagemap.entries)
    return {"pagemap": str(reader.pagemap.path), "layout": reader.pagemap.layout, "entries": entries,
            "totals": totals}


def _source_text(entry: dict[str, Any], images: CheckpointImages) -> str:
    if not entry["sources"]:
        return "page server" if entry["flag_names"] == "lazy" else "-"
    parts = []
    for s in entry["sources"]:
        name = s["pages_file"].rsplit("/", 1)[-1] if s["pages_file"] else "?"
        parts.append(name if s["depth"] == 0 else f"{s['image']}/{name} (parent {s['depth']})")
    return ", ".join(dict.fromkeys(parts))


def run(args: argparse.Namespace) -> int:
    sections: list[dict[str, Any]] = []
    with open_from_args(args) as images:
        for pid in selected_pids(images, args):
            with images.reader_for(Target("pid", pid), args.strategy) as reader:
                sections.append({"pid": pid, **table(reader)})
        if not args.no_shmem and not args.pid:
            for shmid in images.shmem_ids:
                with images.shmem_reader(shmid, args.strategy) as reader:
                    sections.append({"shmem": shmid, **table(reader)})
        if args.json:
            print_ndjson(sections)
            return 0
        for sec in sections:
            title = f"pid {sec['pid']}" if "pid" in sec else f"shmem {sec['shmem']}"
            print(f"{title}: {sec['pagemap']} (layout {sec['layout']})")
            print(f"  {'START':>16} {'END':>16} {'PAGES':>8}  {'FLAGS':<22} SOURCE")
            for e in sec["entries"]:
                print(f"  {e['start']:>16x} {e['end']:>16x} {e['pages']:>8}  {e['flag_names']:<22} "
                      f"{_source_text(e, images)}")
            totals = ", ".join(f"{k} {v}" for k, v in sec["totals"].items() if k != "total")
            print(f"  total {sec['totals']['total']} pages: {totals}")
    return 0
