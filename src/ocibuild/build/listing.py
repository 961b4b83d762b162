"""A layer's listing: path → content fingerprint (as :func:`read.list_layer` makes it), cached by diff_id in
the store's private area. Conflict detection and the bookkeeping merge read them; copy layers record theirs when
they are built, from the hashes of the tree walk, so their blobs are never read back."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from .. import oci
from ..tar import read
from ..files import atomic_write
from ..oci import LayerBlob, Digest
from ..store import Store


def listing_path(store: Store, diff_id: Digest) -> Path:
    """Where the listing of the layer with ``diff_id`` is cached."""
    return store.private_dir("listings") / f"{diff_id.hex}.json"


def save_listing(store: Store, diff_id: Digest, listing: Mapping[str, str]) -> None:
    """Record a layer's listing."""
    atomic_write(listing_path(store, diff_id), json.dumps(listing, sort_keys=True).encode())


def layer_listing(store: Store, built: LayerBlob) -> dict[str, str]:
    """The listing of a layer: the recorded one, else read from its blob (and recorded)."""
    try:
        listing: dict[str, str] = json.loads(listing_path(store, built.diff_id).read_bytes())
        return listing
    except (OSError, ValueError):
        pass
    with store.open_blob(built.descriptor.digest, size=built.descriptor.size) as f:
        listing = read.list_layer(f, oci.layer_compression(built.descriptor.media_type),
                                      what=f"layer {built.descriptor.digest.short}")
    save_listing(store, built.diff_id, listing)
    return listing
