"""`export`, `import` and `inventory`: archives that carry a project's layers to air-gapped machines (see
:mod:`ocibuild.archive`)."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import OcibuildError
from ..files import read_bounded
from ..oci import Digest
from ..store import Store
from .build import load_plan
from .common import open_store, print_json, project_of

if TYPE_CHECKING:
    from ..archive import InputFile, Inventory
    from ..planner import Plan

_INVENTORY_LIMIT = 256 << 20  # an inventory is read whole: some millions of digests


def inventory_command(args: argparse.Namespace) -> int:
    from ..archive import inventory

    _, store = open_store(args)
    sys.stdout.buffer.write(inventory(store).to_json() + b"\n")
    return 0


def import_command(args: argparse.Namespace) -> int:
    from ..archive import import_archive

    _, store = open_store(args)
    path = Path(args.path)
    imported = import_archive(store, path)
    summary = (f"imported {imported.blobs} blobs ({imported.bytes / 1e6:.1f} MB; {imported.present} already "
               f"present), {len(imported.tags)} tags, {imported.inputs} inputs into the download cache")
    if imported.untagged:
        summary += f"; {imported.untagged} untagged manifests (gc removes them)"
    if args.json:
        print_json(imported.to_dict())
    else:
        print(summary)
    return 0


def export_command(args: argparse.Namespace) -> int:
    from ..archive import downloaded_inputs, export_archive

    _, store = open_store(args)
    path = Path(args.path)
    since = _since(args.since) if args.since else None
    inputs: list[InputFile] = []
    if args.all:
        if args.image_only:
            raise OcibuildError("--all and --image-only exclude each other", "choose one")
        tags = [d.ref_name for d in store.index().manifests if d.ref_name]
        inputs = downloaded_inputs(store)
    elif args.image_only:
        tags = [project_of(args).image.name]
    else:
        tags, inputs = export_selection(load_plan(args, store, offline=True), store)
    exported = export_archive(store, path, tags, inputs=inputs, since=since, sync=args.sync)
    if args.json:
        print_json(exported.to_dict())
    else:
        print(f"exported {len(exported.tags)} tags, {exported.blobs} blobs ({exported.bytes / 1e6:.1f} MB) "
              f"to {path}" + (f"; {exported.skipped} blobs left out (--since)" if since is not None else ""))
    return 0


def _since(text: str) -> Inventory:
    from ..archive import Inventory

    try:
        return Inventory.parse(read_bounded(text, _INVENTORY_LIMIT), text)
    except OSError as err:
        raise OcibuildError(f"--since {text}: {err.strerror}", "run `ocibuild inventory > FILE` "
                            "on the machine the archive is for") from None


def export_selection(plan: Plan, store: Store) -> tuple[list[str], list[InputFile]]:
    """What another machine needs to build ``plan`` with nothing rebuilt and nothing fetched: the tags of every
    layer's cache entry (and of the merge layer's, when there is one) and of the image, and the downloaded inputs
    (archive tarballs, run layers' url inputs) that a missing key would need."""
    from ..archive import downloaded_inputs
    from ..planner import MERGE_LAYER, merge_key
    from ..store.entries import cache_tag

    index = store.index()
    tags = []
    for layer in plan.layers:
        tag = cache_tag(layer.name, layer.key)
        if index.find(tag) is None:
            raise OcibuildError(f"layer '{layer.name}' (key {layer.key.short}) is not built",
                                "run `ocibuild build` first, then export")
        tags.append(tag)
    key = merge_key(plan, store)
    if key is not None and index.find(cache_tag(MERGE_LAYER, key)) is not None:
        tags.append(cache_tag(MERGE_LAYER, key))
    if index.find(plan.project.image.name) is None:
        raise OcibuildError(f"the image '{plan.project.image.name}' is not in the store {store.root}",
                            "run `ocibuild build` first, then export")
    tags.append(plan.project.image.name)
    urls: dict[Digest, str] = {}
    for layer in plan.layers:
        recipe = layer.recipe
        if recipe.kind == "archive" and "://" in recipe.str_("url") and not recipe.str_("url").startswith("file:"):
            urls[Digest.from_hex(recipe.str_("sha256"))] = recipe.str_("url")
        elif recipe.kind == "run":
            for ref in recipe.inputs:
                if ref.url is not None and ref.sha256 is not None:
                    urls[Digest.from_hex(ref.sha256)] = ref.url
    inputs = [replace(item, url=urls[item.digest]) for item in downloaded_inputs(store, urls)]
    return tags, inputs
