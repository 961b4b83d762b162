"""Writing an archive: :func:`write_oci_archive` (one tagged image, what ``podman load`` of podman 4.3 accepts) and
:func:`export_archive` (any set of tags, downloaded inputs as artifacts, a delta against another store's inventory).

The archive's layout is known before the first byte is written — every header and blob has a fixed offset — so a
few threads copy the blobs in place with ``pwrite``, each blob hashed once by the thread copying it and checked
against its digest. Headers come from :func:`ocibuild.tar.write.header` (owner 0:0, mtime 0). The archive is
written to a temporary file and renamed; ``write_oci_archive`` and ``export_archive(sync=True)`` also fsync it and
its directory. Without ``sync`` an export is not fsynced, for speed (gigabytes to removable media): an importer
verifies every byte and refuses a cut archive, and unmounting the disk flushes it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import oci
from ..errors import DigestMismatch, StoreError
from ..oci import Descriptor, Digest, Index, Manifest
from ..store import Store
from ..tar import write
from ..threads import parallel_map
from .contents import CHUNK, INPUT_ARTIFACT, InputFile, Inventory, copy_jobs, manifest_closure, reason, sync_dir

log = logging.getLogger(__name__)

ANNOTATION_TITLE = "org.opencontainers.image.title"
ANNOTATION_INPUT_URL = "dev.ocibuild.input.url"
EMPTY_JSON = b"{}"

_BLOCK = 512


@dataclass(frozen=True)
class _Item:
    """One file of the archive: a blob (``path`` to copy, or ``data``) or a layout file (``data``)."""

    name: str
    size: int
    data: bytes | None = None
    path: Path | None = None
    digest: Digest | None = None  # checked while copying ``path``


def _header(name: str, size: int) -> bytes:
    """The tar header of a layout file or directory (name ending in '/'): owner 0:0, mtime 0."""
    if name.endswith("/"):
        return write.header(write.Entry(name.rstrip("/"), "dir", 0o755), 0)
    return write.header(write.Entry(name, "file", 0o644, size=size), 0)


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def _copy_blob(item: _Item, fd: int, offset: int, what: str) -> None:
    """Copy ``item.path`` to ``fd`` at ``offset``, hashing as it goes; DigestMismatch unless it matches."""
    assert item.path is not None and item.digest is not None
    try:
        source = open(item.path, "rb", buffering=0)
    except FileNotFoundError:
        raise StoreError(f"{what}: blob {item.digest} is missing from the store",
                         "run `ocibuild verify`, then rebuild or import what it names") from None
    except OSError as err:
        raise StoreError(f"{what}: read blob {item.digest}: {item.path}: {reason(err)}") from err
    hasher = hashlib.new(item.digest.algorithm)
    count = 0
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    with source:
        while True:
            n = source.readinto(buffer)
            if not n:
                break
            if count + n > item.size:
                break
            hasher.update(view[:n])
            _pwrite_all(fd, view[:n], offset + count)
            count += n
    actual = Digest(item.digest.algorithm, hasher.hexdigest())
    if count != item.size or os.stat(item.path).st_size != item.size:
        raise DigestMismatch(f"{what}: blob {item.digest} has {os.stat(item.path).st_size} bytes, "
                             f"its descriptor says {item.size}",
                             "run `ocibuild verify`; delete the damaged blob and rebuild or import it again")
    if actual != item.digest:
        raise DigestMismatch(f"{what}: blob {item.digest} is corrupt (content hashes to {actual})",
                             "run `ocibuild verify`; delete the damaged blob and rebuild or import it again")


def _placed(items: Sequence[_Item]) -> tuple[bytes, list[tuple[_Item, int, bytes]], int]:
    """Where everything goes: the bytes of the layout files, directories and in-memory blobs (written first), each
    blob file with its offset and header, and the size of the archive (two zero blocks end it)."""
    small = bytearray()
    for item in items:
        if item.data is not None:
            small += _header(item.name, item.size) + item.data + bytes(-item.size % _BLOCK)
    offset = len(small)
    placed: list[tuple[_Item, int, bytes]] = []
    for item in items:
        if item.data is None:
            header = _header(item.name, item.size)
            placed.append((item, offset, header))
            offset += len(header) + item.size + (-item.size % _BLOCK)
    return bytes(small), placed, offset + 2 * _BLOCK


def _write_placed(fd: int, entry: tuple[_Item, int, bytes], path: Path, what: str) -> None:
    item, start, header = entry
    try:
        _pwrite_all(fd, header, start)
        _copy_blob(item, fd, start + len(header), what)
        padding = -item.size % _BLOCK
        if padding:
            _pwrite_all(fd, bytes(padding), start + len(header) + item.size)
    except OSError as err:
        raise StoreError(f"write {path}: {reason(err)}", "check free space and permissions") from err


def _write_tar(items: Sequence[_Item], path: Path, *, sync: bool, what: str) -> int:
    """Write ``items`` as a tar at ``path`` (temp file, then rename); returns its size.

    The blobs are copied in place by a few threads (``pwrite`` at offsets known in advance), so this is not
    :func:`ocibuild.files.atomic_write`, which takes the bytes in memory; with ``sync``, it makes the same promise
    (file and directory fsynced)."""
    small, placed, total = _placed(items)
    directory = path.resolve().parent
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    except OSError as err:
        raise StoreError(f"{path}: cannot write: {reason(err)}", "choose a writable path") from None
    tmp = Path(tmp_name)
    try:
        try:
            os.ftruncate(fd, total)  # not posix_fallocate: glibc emulates it by writing (exFAT sticks)
            os.fchmod(fd, 0o644)  # mkstemp made it private; an archive is meant to be carried elsewhere
            _pwrite_all(fd, small, 0)
            _pwrite_all(fd, bytes(2 * _BLOCK), total - 2 * _BLOCK)
        except OSError as err:
            raise StoreError(f"write {path}: {reason(err)}", "check free space and permissions") from err
        parallel_map(lambda entry: _write_placed(fd, entry, path, what), placed, jobs=copy_jobs(),
                     name="ocibuild-archive")
        if sync:
            try:
                os.fsync(fd)
            except OSError as err:
                raise StoreError(f"fsync {path}: {reason(err)}") from err
        os.close(fd)
        fd = -1
        try:
            os.replace(tmp, path)
        except OSError as err:
            raise StoreError(f"write {path}: {reason(err)}", "check free space and permissions") from err
    except BaseException:
        if fd >= 0:
            os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    if sync:
        sync_dir(directory, f"write {path}")
    return total


def _layout_items(store: Store, index: Index, blobs: Mapping[Digest, _Item]) -> list[_Item]:
    index_bytes = index.to_json()
    layout = oci.canonical_json({"imageLayoutVersion": oci.OCI_LAYOUT_VERSION})
    algorithms = sorted({d.algorithm for d in blobs} | {"sha256"})
    out = [_Item("oci-layout", len(layout), layout), _Item("index.json", len(index_bytes), index_bytes),
           _Item("blobs/", 0, b"")]
    out += [_Item(f"blobs/{a}/", 0, b"") for a in algorithms]
    # small blobs (manifests, configs) first: an importer reading the stream in order meets them early
    out += sorted(blobs.values(), key=lambda item: (item.data is None, item.size if item.data is not None else 0))
    return out


def _blob_item(store: Store, descriptor: Descriptor) -> _Item:
    digest = descriptor.digest
    return _Item(f"blobs/{digest.algorithm}/{digest.hex}", descriptor.size, path=store.blob_path(digest), digest=digest)


def write_oci_archive(store: Store, image: Descriptor, name: str, path: Path) -> None:
    """Write the image ``image`` tagged ``name`` as an oci-archive at ``path`` (atomically: temp, then rename)."""
    blobs: dict[Digest, _Item] = {}
    for descriptor in manifest_closure(store, image):
        if not store.has(descriptor.digest):
            raise StoreError(f"image {name}: blob {descriptor.digest} is missing from the store",
                             "run `ocibuild verify`, then rebuild the image")
        blobs.setdefault(descriptor.digest, _blob_item(store, descriptor))
    index = Index(()).with_tag(name, image)
    _write_tar(_layout_items(store, index, blobs), path, sync=True, what=f"image {name}")


@dataclass(frozen=True)
class ExportResult:
    path: Path
    tags: tuple[str, ...]
    blobs: int  # written into the archive
    skipped: int  # left out because the other store holds them (--since)
    bytes: int  # of the archive
    inputs: tuple[Digest, ...] = ()  # downloaded inputs listed (as untagged input artifacts)

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "tags": list(self.tags), "blobs": self.blobs, "skipped": self.skipped,
                "bytes": self.bytes, "inputs": [str(d) for d in self.inputs]}


def input_artifact(item: InputFile) -> tuple[bytes, bytes, Manifest]:
    """(config bytes, manifest bytes, manifest) of the OCI artifact carrying a downloaded input: an empty config
    and one ``application/octet-stream`` layer, the file itself."""
    empty = Descriptor(oci.OCI_EMPTY, Digest.of(EMPTY_JSON), len(EMPTY_JSON))
    size = item.path.stat().st_size
    annotations = {ANNOTATION_TITLE: item.digest.hex}
    if item.url:
        annotations[ANNOTATION_INPUT_URL] = item.url
    layer = Descriptor("application/octet-stream", item.digest, size, annotations)
    manifest = Manifest(empty, (layer,), artifact_type=INPUT_ARTIFACT)
    return EMPTY_JSON, manifest.to_json(), manifest


def export_archive(store: Store, path: Path, tags: Sequence[str], *, inputs: Sequence[InputFile] = (),
                   since: Inventory | None = None, sync: bool = False) -> ExportResult:
    """Write ``tags`` (manifests or indexes of the store, with everything they reach) and ``inputs`` (as input
    artifacts, listed in index.json without a tag) as one oci-archive at ``path``. With ``since``, blobs that
    inventory lists are left out.

    An input artifact has no tag so that image importers leave it alone: `ctr images import` makes an image of
    every tagged manifest and unpacks it, which fails for an artifact ("mismatched image rootfs and manifest
    layers": its config lists no diff_ids); an untagged manifest's blobs it only stores. ``ocibuild import`` finds
    the artifacts by their ``artifactType``.

    The archive is written to a temporary file and renamed; without ``sync`` it is not fsynced (an importer
    verifies every byte and refuses a cut archive; unmounting a removable disk flushes it)."""
    index = Index(())
    blobs: dict[Digest, _Item] = {}
    skipped: set[Digest] = set()
    held = since.blobs | since.inputs if since is not None else frozenset()

    def add(item: _Item) -> None:
        assert item.digest is not None
        if item.digest in held:
            skipped.add(item.digest)
        else:
            blobs.setdefault(item.digest, item)

    for tag in tags:
        descriptor = store.resolve(tag)
        if descriptor is None:
            raise StoreError(f"'{tag}' is not tagged in the store {store.root}", "run `ocibuild build` first")
        for reached in manifest_closure(store, descriptor):
            if not store.has(reached.digest):
                raise StoreError(f"'{tag}': blob {reached.digest} is missing from the store",
                                 "run `ocibuild verify`, then rebuild the layers it names")
            add(_blob_item(store, reached))
        index = index.with_tag(tag, descriptor)
    for item in inputs:
        config, manifest_bytes, manifest = input_artifact(item)
        layer = manifest.layers[0]
        add(_Item(f"blobs/sha256/{layer.digest.hex}", layer.size, path=item.path, digest=layer.digest))
        add(_Item(f"blobs/sha256/{manifest.config.digest.hex}", len(config), data=config,
                  digest=manifest.config.digest))
        manifest_digest = Digest.of(manifest_bytes)
        add(_Item(f"blobs/sha256/{manifest_digest.hex}", len(manifest_bytes), data=manifest_bytes,
                  digest=manifest_digest))
        descriptor = Descriptor(oci.OCI_MANIFEST, manifest_digest, len(manifest_bytes), artifact_type=INPUT_ARTIFACT)
        index = Index(index.manifests + (descriptor,))
    size = _write_tar(_layout_items(store, index, blobs), path, sync=sync, what=f"export {path}")
    names = tuple(d.ref_name for d in index.manifests if d.ref_name)
    log.info("exported %d tags, %d inputs, %d blobs (%d left out) to %s", len(names), len(inputs), len(blobs),
             len(skipped), path)
    return ExportResult(path, names, len(blobs), len(skipped), size, tuple(item.digest for item in inputs))

