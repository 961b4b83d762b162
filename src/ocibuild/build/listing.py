"""A layer's listing (path → content fingerprint, as :func:`read.list_layer` makes it) and its bookkeeping record
(:mod:`ocibuild.bookkeeping`), both kept by diff_id in the store's private area. Conflict detection reads
listings, the bookkeeping merge records. Both are saved when a layer is written (:func:`save_layer_records`, from
what the tar writer saw); a layer ocibuild did not write (pulled, imported, an image's) has its blob read once
for both."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path

from .. import bookkeeping, oci
from ..bookkeeping import Record
from ..errors import FormatError
from ..tar import read
from ..files import atomic_write
from ..oci import LayerBlob, Digest
from ..errors import StoreError
from ..store import Store


LISTING_FORMAT = 2  # in each listing's file name: bump it when a fingerprint changes meaning (2: xattrs)
SPACE_HINT = "free disk space and inodes (`ocibuild gc` removes unused blobs), or check the store's permissions"


def listing_path(store: Store, diff_id: Digest) -> Path:
    """Where the listing of the layer with ``diff_id`` is cached (a listing of another format is not read)."""
    return store.private_dir("listings") / f"{diff_id.hex}.{LISTING_FORMAT}.json"


def save_layer_records(store: Store, diff_id: Digest, listing: Mapping[str, str], kept: Mapping[str, bytes]
                       ) -> Record:
    """Record a layer's listing and its bookkeeping record (``kept``: the content of the stanza files it holds)."""
    try:
        atomic_write(listing_path(store, diff_id), _json_pieces(listing))
        return bookkeeping.save_record(store, diff_id, listing, kept)
    except OSError as err:  # (a full disk, or no inode left: the layer's blob itself may have fitted)
        raise StoreError(f"record the listing of layer {diff_id.short} in {store.root}: {err.strerror or err}",
                         SPACE_HINT) from err


def _json_pieces(listing: Mapping[str, str], batch: int = 10_000) -> Iterator[bytes]:
    """``json.dumps(listing, sort_keys=True)``, byte for byte, in pieces of ``batch`` paths: a listing of a million
    paths is never one string (its text is ~100 MB, and its bytes as many again)."""
    paths = sorted(listing)
    yield b"{"
    for start in range(0, len(paths), batch):
        text = json.dumps({path: listing[path] for path in paths[start:start + batch]})
        yield (", " if start else "").encode() + text[1:-1].encode()
    yield b"}"


def layer_listing(store: Store, built: LayerBlob) -> dict[str, str]:
    """The listing of a layer: the recorded one, else read from its blob (and recorded)."""
    path = listing_path(store, built.diff_id)
    try:
        listing: dict[str, str] = oci.parse_json(path.read_bytes(), str(path))
        return listing
    except (OSError, FormatError):
        pass
    return _read_blob(store, built)[0]


def layer_record(store: Store, built: LayerBlob, *, again: bool = False) -> Record:
    """The bookkeeping record of a layer: the recorded one, else (or ``again``) read from its blob (and recorded)."""
    record = None if again else bookkeeping.load_record(store, built.diff_id)
    return record if record is not None else _read_blob(store, built)[1]


def _read_blob(store: Store, built: LayerBlob) -> tuple[dict[str, str], Record]:
    """Read a layer's blob once for its listing and its bookkeeping record, and record both."""
    with store.open_blob(built.descriptor.digest, size=built.descriptor.size) as f:
        listing, kept = read.scan_layer(f, oci.layer_compression(built.descriptor.media_type),
                                        what=f"layer {built.descriptor.digest.short}", keep=bookkeeping.STANZA_FILES)
    return listing, save_layer_records(store, built.diff_id, listing, kept)
