"""What both directions of an archive share: the names of input artifacts, the downloaded inputs they carry, a
store's :class:`Inventory` (what a delta leaves out), the closure of a manifest, and the few helpers of copying.

A downloaded input (an ``archive`` layer's tarball, a run layer's url input) lives in the store's download cache
``downloads/<sha256 hex>`` (:func:`ocibuild.net.download.fetch_file` puts it there); in an archive it travels as an
OCI artifact of type :data:`INPUT_ARTIFACT`, tagged ``ocibuild-input-<sha256 hex>``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .. import oci
from ..errors import FormatError, StoreError
from ..files import fsync_dir
from ..oci import Descriptor, Digest, Index
from ..store import Store

INPUT_ARTIFACT = "application/vnd.ocibuild.input.v1"
INPUT_TAG_PREFIX = "ocibuild-input-"
INVENTORY_TYPE = "application/vnd.ocibuild.inventory.v1+json"

CHUNK = 1 << 20  # blobs are copied in pieces of this size, in both directions


def reason(err: OSError) -> str:
    return err.strerror or str(err)


def sync_dir(directory: Path, what: str) -> None:
    """Make the renames into ``directory`` durable (:func:`ocibuild.files.fsync_dir`)."""
    try:
        fsync_dir(directory)
    except OSError as err:
        raise StoreError(f"{what}: fsync {directory}: {reason(err)}") from err


def copy_jobs() -> int:
    """Threads copying blobs: a few, as disks and page-cache copies gain little beyond."""
    return min(4, max(2, os.cpu_count() or 2))


# -------------------------------------------------------------------------------------------- downloaded inputs


@dataclass(frozen=True)
class InputFile:
    """A downloaded input (an archive layer's tarball, a run layer's url input) to carry as an artifact."""

    digest: Digest  # sha256 of the file: its name in the download cache
    path: Path
    url: str = ""

    @property
    def tag(self) -> str:
        return f"{INPUT_TAG_PREFIX}{self.digest.hex}"


def downloads_dir(store: Store) -> Path:
    """Where :func:`ocibuild.net.download.fetch_file` keeps downloads, named by their sha256 hex."""
    return store.private_dir("downloads")


def downloaded_inputs(store: Store, digests: Iterable[Digest] | None = None) -> list[InputFile]:
    """The downloads of the store (only ``digests``, when given, those that are present), sorted."""
    directory = downloads_dir(store)
    if digests is None:
        try:
            names = sorted(os.listdir(directory))
        except OSError as err:
            raise StoreError(f"list downloads: {directory}: {reason(err)}") from err
        digests = [Digest("sha256", name) for name in names if re.fullmatch(r"[0-9a-f]{64}", name)]
    out = []
    for digest in sorted(set(digests)):
        path = directory / digest.hex
        if digest.algorithm == "sha256" and path.is_file():
            out.append(InputFile(digest, path))
    return out


# ------------------------------------------------------------------------------------------- inventory, closure


@dataclass(frozen=True)
class Inventory:
    """What a store holds: every blob's digest, its tags, and the sha256 of its downloads."""

    blobs: frozenset[Digest]
    tags: Mapping[str, Digest] = field(default_factory=dict)
    inputs: frozenset[Digest] = frozenset()

    def to_json(self) -> bytes:
        return oci.canonical_json({
            "mediaType": INVENTORY_TYPE,
            "blobs": [str(d) for d in sorted(self.blobs)],
            "tags": {name: str(digest) for name, digest in sorted(self.tags.items())},
            "inputs": [str(d) for d in sorted(self.inputs)],
        })

    @classmethod
    def parse(cls, data: bytes, what: str = "inventory") -> Inventory:
        value = oci.parse_json(data, what, hint="make it with `ocibuild inventory > FILE`")
        if not isinstance(value, dict) or value.get("mediaType") != INVENTORY_TYPE:
            raise FormatError(f"{what} is not an ocibuild inventory", "make it with `ocibuild inventory > FILE`")
        blobs, tags, inputs = value.get("blobs"), value.get("tags"), value.get("inputs", [])
        if not isinstance(blobs, list) or not isinstance(tags, dict) or not isinstance(inputs, list):
            raise FormatError(f"{what}: 'blobs', 'tags' and 'inputs' must be lists and an object")
        return cls(
            frozenset(Digest.parse(d) for d in blobs),
            {str(name): Digest.parse(d) for name, d in tags.items()},
            frozenset(Digest.parse(d) for d in inputs),
        )


def inventory(store: Store) -> Inventory:
    """The inventory of ``store`` (blob presence is trusted, as :meth:`Store.has` does; nothing is hashed)."""
    tags = {d.ref_name: d.digest for d in store.index().manifests if d.ref_name}
    inputs = frozenset(item.digest for item in downloaded_inputs(store))
    return Inventory(frozenset(store.blobs()), tags, inputs)


def manifest_closure(store: Store, descriptor: Descriptor) -> list[Descriptor]:
    """``descriptor`` and every blob it reaches (index children, config, layers), parents first."""
    out = [descriptor]
    if descriptor.media_type in oci.INDEX_TYPES:
        for child in Index.parse(store.read_blob(descriptor.digest), f"index {descriptor.digest.short}").manifests:
            out += manifest_closure(store, child)
    elif descriptor.media_type in oci.MANIFEST_TYPES:
        manifest = store.get_manifest(descriptor.digest)
        out += [manifest.config, *manifest.layers]
    return out
