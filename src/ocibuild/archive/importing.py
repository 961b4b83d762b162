"""Archives of the store for other tools and air-gapped machines: OCI image layouts in a tar file.

An *archive* is an ``oci-archive``: a plain (uncompressed) tar holding ``oci-layout``, ``index.json`` and
``blobs/<algorithm>/<hex>`` — what ``skopeo copy … oci-archive:`` writes and ``podman load`` reads.

- :func:`write_oci_archive` writes one tagged image (what ``podman load`` of podman 4.3 accepts: one manifest).
- :func:`export_archive` writes any set of tags — cache entries, the image — plus downloaded inputs as OCI
  artifacts (``artifactType`` :data:`INPUT_ARTIFACT`, tagged ``ocibuild-input-<sha256 hex>``). Given another
  store's :class:`Inventory` it leaves out the blobs that store holds (a *delta*; its index still lists every
  manifest, so it imports only into a store holding the rest).
- :func:`import_archive` brings an archive into the store. Nothing is written before the whole archive has been
  scanned: every tar header is read by :mod:`ocibuild.tar.read` with its :data:`~ocibuild.tar.read.LAYOUT`
  policy (no links, devices, absolute or ``..`` paths, oversized extended headers; compressed archives are
  refused before) and checked against the layout (only the three kinds of files above, and their directories),
  and every manifest, index and config reachable from ``index.json`` is read, digest-checked and parsed, media
  types checked against what refers to them. Then the blobs the store lacks are copied, each hashed as it is
  written and committed only whole (:meth:`Store.writer`, its writeback started at once on a spare thread),
  one :meth:`Store.sync` makes them all durable, and one index.json update adds the tags. A failure before
  that update leaves only complete, verified blobs that no tag reaches (gc removes them); the tags are untouched.

Both directions stream in constant memory: blobs are copied in 1 MiB chunks by a few threads, each blob hashed
once by the thread copying it (hashing runs outside the GIL, so blobs are hashed on several cores at once).
The archive's layout is known before the first byte is written — every header and blob has a fixed offset — so
the threads write their blobs in place with ``pwrite``. The archive is written to a temporary file and renamed;
``write_oci_archive`` and ``export_archive(sync=True)`` also fsync it and its directory. Without ``sync`` an
export is not fsynced, for speed (gigabytes to removable media): an importer verifies every byte and refuses a cut
archive, and unmounting the disk flushes it.

At ~770 lines this module is over the ~500 a room should have: selection and inventories, writing and the checked
import are the two directions of one format; they could become ``archive/`` (export, import) if either grows.

Errors: :class:`UnsafeArchive` for a tar that is hostile, truncated or not a layout; :class:`FormatError` for
malformed OCI documents or mixed-up media types; :class:`DigestMismatch` for content that does not hash to its
name; :class:`StoreError` for what cannot be read or written.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import stat
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import oci
from ..errors import DigestMismatch, FormatError, StoreError, UnsafeArchive
from ..files import fsync_dir
from ..oci import Descriptor, Digest, Index, Manifest
from ..store import Store, check_ref_name
from ..tar import codecs, read, write
from ..threads import parallel_map

log = logging.getLogger(__name__)

INPUT_ARTIFACT = "application/vnd.ocibuild.input.v1"
INPUT_TAG_PREFIX = "ocibuild-input-"
INVENTORY_TYPE = "application/vnd.ocibuild.inventory.v1+json"
ANNOTATION_TITLE = "org.opencontainers.image.title"
ANNOTATION_INPUT_URL = "dev.ocibuild.input.url"
EMPTY_JSON = b"{}"

_CHUNK = 1 << 20
_BLOCK = 512
_MAX_DOCUMENT = 16 << 20  # index.json, a manifest, an index or a config
_MAX_DEPTH = 8  # of nested indexes
_HINT_HOSTILE = read.LAYOUT.hint_unsafe
_HINT_EXPORT = read.LAYOUT.hint_corrupt
_BLOB_NAME = re.compile(r"blobs/([a-z0-9]+)/([0-9a-f]+)")
_IGNORED = frozenset({"manifest.json", "repositories"})  # docker-archive compatibility files some tools add


def _reason(err: OSError) -> str:
    return err.strerror or str(err)


# ---------------------------------------------------------------------------------------------------- selection


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
    """Where :func:`ocibuild.inputs.fetch` keeps downloads, named by their sha256 hex."""
    return store.private_dir("downloads")


def downloaded_inputs(store: Store, digests: Iterable[Digest] | None = None) -> list[InputFile]:
    """The downloads of the store (only ``digests``, when given, those that are present), sorted."""
    directory = downloads_dir(store)
    if digests is None:
        try:
            names = sorted(os.listdir(directory))
        except OSError as err:
            raise StoreError(f"list downloads: {directory}: {_reason(err)}") from err
        digests = [Digest("sha256", name) for name in names if re.fullmatch(r"[0-9a-f]{64}", name)]
    out = []
    for digest in sorted(set(digests)):
        path = directory / digest.hex
        if digest.algorithm == "sha256" and path.is_file():
            out.append(InputFile(digest, path))
    return out


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
        try:
            value = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise FormatError(f"{what} is not valid JSON: {err}", "make it with `ocibuild inventory > FILE`") from None
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


# ------------------------------------------------------------------------------------------------- tar writing


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


def _sync_dir(directory: Path, what: str) -> None:
    """Make the renames into ``directory`` durable (:func:`ocibuild.files.fsync_dir`)."""
    try:
        fsync_dir(directory)
    except OSError as err:
        raise StoreError(f"{what}: fsync {directory}: {_reason(err)}") from err


def _jobs() -> int:
    """Threads copying blobs: a few, as disks and page-cache copies gain little beyond."""
    return min(4, max(2, os.cpu_count() or 2))


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
        raise StoreError(f"{what}: read blob {item.digest}: {item.path}: {_reason(err)}") from err
    hasher = hashlib.new(item.digest.algorithm)
    count = 0
    buffer = bytearray(_CHUNK)
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
        raise StoreError(f"write {path}: {_reason(err)}", "check free space and permissions") from err


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
        raise StoreError(f"{path}: cannot write: {_reason(err)}", "choose a writable path") from None
    tmp = Path(tmp_name)
    try:
        try:
            os.ftruncate(fd, total)  # not posix_fallocate: glibc emulates it by writing (exFAT sticks)
            os.fchmod(fd, 0o644)  # mkstemp made it private; an archive is meant to be carried elsewhere
            _pwrite_all(fd, small, 0)
            _pwrite_all(fd, bytes(2 * _BLOCK), total - 2 * _BLOCK)
        except OSError as err:
            raise StoreError(f"write {path}: {_reason(err)}", "check free space and permissions") from err
        parallel_map(lambda entry: _write_placed(fd, entry, path, what), placed, jobs=_jobs(), name="ocibuild-archive")
        if sync:
            try:
                os.fsync(fd)
            except OSError as err:
                raise StoreError(f"fsync {path}: {_reason(err)}") from err
        os.close(fd)
        fd = -1
        try:
            os.replace(tmp, path)
        except OSError as err:
            raise StoreError(f"write {path}: {_reason(err)}", "check free space and permissions") from err
    except BaseException:
        if fd >= 0:
            os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    if sync:
        _sync_dir(directory, f"write {path}")
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

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "tags": list(self.tags), "blobs": self.blobs, "skipped": self.skipped,
                "bytes": self.bytes}


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
    artifacts) as one oci-archive at ``path``. With ``since``, blobs that inventory lists are left out.

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
        index = index.with_tag(item.tag, descriptor)
    size = _write_tar(_layout_items(store, index, blobs), path, sync=sync, what=f"export {path}")
    names = tuple(d.ref_name or "" for d in index.manifests)
    log.info("exported %d tags, %d blobs (%d left out) to %s", len(names), len(blobs), len(skipped), path)
    return ExportResult(path, names, len(blobs), len(skipped), size)


# ------------------------------------------------------------------------------------------------- tar reading


@dataclass(frozen=True)
class _Entry:
    name: str  # normalised: no leading './', directories end without '/'
    offset: int  # of the content
    size: int


def _unsafe(what: str, problem: str) -> UnsafeArchive:
    return UnsafeArchive(f"{what}: {problem}", _HINT_HOSTILE)


def _in_layout(member: read.Member) -> bool:
    """Whether ``member`` is one of the files or directories of an OCI image layout (or a docker-archive file)."""
    path = member.path
    if member.type == "dir":
        parts = path.split("/")
        return path == "blobs" or (len(parts) == 2 and parts[0] == "blobs" and re.fullmatch(r"[a-z0-9]+", parts[1])
                                   is not None)  # fmt: skip
    return path in ("oci-layout", "index.json") or path in _IGNORED or _BLOB_NAME.fullmatch(path) is not None


def scan_archive(fd: int, what: str) -> dict[str, _Entry]:
    """Every file of the layout archive open at ``fd``, by path, read from headers only.

    The tar is read by :mod:`ocibuild.tar.read` with the :data:`~ocibuild.tar.read.LAYOUT` policy (only regular
    files and directories, no absolute or '..' paths, small extended headers, two zero blocks at the end, within
    the file); here each entry must belong to the layout, and a file may appear only once."""
    entries: dict[str, _Entry] = {}
    with open(fd, "rb", buffering=0, closefd=False) as f:
        for member, offset in read.iter_file_members(f, what=what, policy=read.LAYOUT):
            if not _in_layout(member):
                raise _unsafe(what, f"entry {read.quoted(member.path)} is not part of an OCI image layout")
            if member.type == "file":
                if member.path in entries:
                    raise _unsafe(what, f"entry {read.quoted(member.path)} appears twice")
                entries[member.path] = _Entry(member.path, offset, member.size)
    return entries


# ---------------------------------------------------------------------------------------------------- import


@dataclass(frozen=True)
class ImportResult:
    tags: tuple[str, ...]
    blobs: int  # written into the store
    present: int  # already in the store
    bytes: int  # written
    inputs: int  # restored into the download cache
    untagged: int  # manifests of index.json without a ref name (imported, but gc may remove them)

    def to_dict(self) -> dict[str, Any]:
        return {"tags": list(self.tags), "blobs": self.blobs, "present": self.present, "bytes": self.bytes,
                "inputs": self.inputs, "untagged": self.untagged}


class _Archive:
    """An opened archive: its scanned entries and reads of its small documents."""

    def __init__(self, fd: int, entries: Mapping[str, _Entry], store: Store, what: str) -> None:
        self.fd = fd
        self.entries = entries
        self.store = store
        self.what = what

    def entry(self, digest: Digest) -> _Entry | None:
        return self.entries.get(f"blobs/{digest.algorithm}/{digest.hex}")

    def read_file(self, name: str, limit: int) -> bytes:
        entry = self.entries.get(name)
        if entry is None:
            raise UnsafeArchive(f"{self.what} has no {name}; is it an oci-archive?",
                                "make one with `ocibuild export` or `skopeo copy … oci-archive:PATH`")
        if entry.size > limit:
            raise _unsafe(self.what, f"{name} is {entry.size} bytes (the limit is {limit})")
        return os.pread(self.fd, entry.size, entry.offset)

    def document(self, descriptor: Descriptor, where: str) -> bytes:
        """A manifest, index or config, from the archive or (a delta) the store, its digest and size checked."""
        digest = descriptor.digest
        if descriptor.size > _MAX_DOCUMENT:
            raise FormatError(f"{self.what}: {where}: {digest} claims {descriptor.size} bytes, more than a "
                              f"manifest or config may have ({_MAX_DOCUMENT})")
        entry = self.entry(digest)
        if entry is None:
            if not self.store.has(digest):
                raise _missing(self.what, where, digest)
            data = self.store.read_blob(digest)
        else:
            if entry.size != descriptor.size:
                raise DigestMismatch(f"{self.what}: {where}: blob {digest} has {entry.size} bytes, its descriptor "
                                     f"says {descriptor.size}", _HINT_EXPORT)
            data = os.pread(self.fd, entry.size, entry.offset)
            actual = Digest(digest.algorithm, hashlib.new(digest.algorithm, data).hexdigest())
            if actual != digest:
                raise DigestMismatch(f"{self.what}: {where}: blob {digest} is corrupt (content hashes to {actual})",
                                     _HINT_EXPORT)
        if len(data) != descriptor.size:
            raise DigestMismatch(f"{self.what}: {where}: blob {digest} has {len(data)} bytes, its descriptor says "
                                 f"{descriptor.size}", _HINT_EXPORT)
        return data


def _missing(what: str, where: str, digest: Digest) -> FormatError:
    return FormatError(f"{what}: {where}: blob {digest} is in neither the archive nor the store",
                       "a delta archive (--since) imports only into the store whose inventory it was made for; "
                       "export a full archive, or a delta against this store's `ocibuild inventory`")


def _declared_type(data: bytes) -> str | None:
    try:
        value = json.loads(data)
    except ValueError:
        return None
    media_type = value.get("mediaType") if isinstance(value, dict) else None
    return media_type if isinstance(media_type, str) else None


class _IndexGraphChecker:
    """Walks the graph of index.json: every reachable manifest, index and config read, verified and parsed, media
    types checked against what refers to them; every blob located in the archive or the store."""

    def __init__(self, archive: _Archive) -> None:
        self.archive = archive
        self.what = archive.what
        self.copy: dict[Digest, _Entry] = {}  # blobs to copy from the archive into the store
        self.seen: set[tuple[Digest, str]] = set()  # documents already checked (a DAG is walked once per node)
        self.sizes: dict[Digest, int] = {}
        self.present = 0
        self.inputs: list[Descriptor] = []  # layers of input artifacts

    def blob(self, descriptor: Descriptor, where: str) -> None:
        digest = descriptor.digest
        known = self.sizes.get(digest)
        if known is not None and known != descriptor.size:
            raise FormatError(f"{self.what}: {where}: {digest} is described with {descriptor.size} and {known} bytes")
        if known is not None:
            return  # located already
        self.sizes[digest] = descriptor.size
        entry = self.archive.entry(digest)
        if entry is not None:
            if entry.size != descriptor.size:
                raise DigestMismatch(f"{self.what}: {where}: blob {digest} has {entry.size} bytes, its descriptor "
                                     f"says {descriptor.size}", _HINT_EXPORT)
            if not self.archive.store.has(digest):
                self.copy[digest] = entry
                return
        elif not self.archive.store.has(digest):
            raise _missing(self.what, where, digest)
        self.present += 1

    def node(self, descriptor: Descriptor, where: str, depth: int = 0) -> None:
        """A manifest or index of index.json (or of an index), and everything below it."""
        media_type = descriptor.media_type
        if media_type not in oci.MANIFEST_TYPES and media_type not in oci.INDEX_TYPES:
            raise FormatError(f"{self.what}: {where} has media type '{media_type}': index.json and indexes may "
                              "only list manifests and indexes")
        if depth > _MAX_DEPTH:
            raise FormatError(f"{self.what}: {where}: indexes nested more than {_MAX_DEPTH} deep")
        if (descriptor.digest, media_type) in self.seen:
            self.blob(descriptor, where)  # the size must agree
            return
        self.seen.add((descriptor.digest, media_type))
        data = self.archive.document(descriptor, where)
        self.blob(descriptor, where)
        declared = _declared_type(data)
        if declared is not None and declared != media_type:
            raise FormatError(f"{self.what}: {where}: descriptor says '{media_type}' but {descriptor.digest.short} "
                              f"is a '{declared}'")
        if media_type in oci.INDEX_TYPES:
            nested = Index.parse(data, f"{self.what}: {where}")
            for i, child in enumerate(nested.manifests):
                self.node(child, f"{where} > manifest {i}", depth + 1)
        else:
            self._manifest(Manifest.parse(data, f"{self.what}: {where}"), where)

    def _manifest(self, manifest: Manifest, where: str) -> None:
        self._config(manifest, where)
        self.blob(manifest.config, f"{where} > config")
        for i, layer in enumerate(manifest.layers):
            if layer.media_type in oci.MANIFEST_TYPES | oci.INDEX_TYPES | oci.CONFIG_TYPES:
                raise FormatError(f"{self.what}: {where} > layer {i} has media type '{layer.media_type}', not a layer")
            self.blob(layer, f"{where} > layer {i}")
        if manifest.artifact_type == INPUT_ARTIFACT:
            if len(manifest.layers) != 1 or manifest.layers[0].digest.algorithm != "sha256":
                raise FormatError(f"{self.what}: {where}: an input artifact holds exactly one sha256 blob")
            self.inputs.append(manifest.layers[0])

    def _config(self, manifest: Manifest, where: str) -> None:
        """An image's config read and matched with its layers; an artifact's config only checked by media type."""
        config = manifest.config
        if config.media_type in oci.CONFIG_TYPES:
            config_data = self.archive.document(config, f"{where} > config")
            image_config = oci.ImageConfig.parse(config_data, f"{self.what}: {where} > config")
            if len(image_config.diff_ids) != len(manifest.layers):
                raise FormatError(f"{self.what}: {where}: the config lists {len(image_config.diff_ids)} diff_ids "
                                  f"for {len(manifest.layers)} layers")
            for i, layer in enumerate(manifest.layers):
                if layer.media_type not in oci.LAYER_TYPES:
                    raise FormatError(f"{self.what}: {where} > layer {i} has media type '{layer.media_type}', "
                                      "not a layer")
        elif config.media_type in oci.MANIFEST_TYPES | oci.INDEX_TYPES or config.media_type in oci.LAYER_TYPES:
            raise FormatError(f"{self.what}: {where} > config has media type '{config.media_type}', not a config")
        elif manifest.artifact_type is None and config.media_type == oci.OCI_EMPTY:
            raise FormatError(f"{self.what}: {where}: an empty config without artifactType")


def _start_writeback(path: Path) -> None:
    """fsync a committed blob now, on a spare thread, so the disk writes while later blobs are copied; the one
    :meth:`Store.sync` before the tags are added then finds little left to write. A failure here is only lost
    time: that sync reports it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as err:
        log.debug("early writeback of %s: %s", path, err)


def _copy_into_store(archive: _Archive, digest: Digest, entry: _Entry,
                     writeback: Callable[[Path], object] | None = None) -> None:
    store, fd = archive.store, archive.fd
    buffer = bytearray(min(_CHUNK, max(entry.size, 1)))
    view = memoryview(buffer)
    try:
        with store.writer(expected=digest, size=entry.size, sync=False) as blob:
            done = 0
            while done < entry.size:
                n = os.preadv(fd, [view[:min(len(buffer), entry.size - done)]], entry.offset + done)
                if n <= 0:
                    raise UnsafeArchive(f"{archive.what} is truncated (ends inside blob {digest})", _HINT_EXPORT)
                blob.write(view[:n])
                done += n
    except DigestMismatch as err:
        raise DigestMismatch(f"{archive.what}: blob {digest} is corrupt ({err})", _HINT_EXPORT) from None
    if writeback is not None:
        writeback(store.blob_path(digest))


def _open_archive(path: Path, what: str) -> int:
    """An fd of the archive at ``path``: a regular file, not compressed."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as err:
        raise StoreError(f"{what}: cannot open: {_reason(err)}", "check the path") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UnsafeArchive(f"{what} is not a regular file", "import an archive file, not a pipe or device")
        compression = codecs.sniff_compression(os.pread(fd, 8, 0))
        if compression != "none":
            raise UnsafeArchive(f"{what} is {compression}-compressed; only a plain tar (oci-archive) is imported",
                                f"decompress it first, checking the result's size (e.g. `{compression} -d`)")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _check_index(archive: _Archive) -> tuple[_IndexGraphChecker, dict[str, Descriptor], int]:
    """The checked graph of the archive's index.json, its tags, and the number of its untagged manifests."""
    what = archive.what
    layout = archive.read_file("oci-layout", 4096)
    try:
        version = json.loads(layout).get("imageLayoutVersion")
    except (ValueError, AttributeError):
        version = None
    if version != oci.OCI_LAYOUT_VERSION:
        raise FormatError(f"{what}: oci-layout is not imageLayoutVersion {oci.OCI_LAYOUT_VERSION}")
    index = Index.parse(archive.read_file("index.json", _MAX_DOCUMENT), f"{what}: index.json")
    checker = _IndexGraphChecker(archive)
    tags: dict[str, Descriptor] = {}
    untagged = 0
    for i, descriptor in enumerate(index.manifests):
        name = descriptor.ref_name
        checker.node(descriptor, f"tag '{name}'" if name else f"index.json manifest {i}")
        if name:
            check_ref_name(name)
            tags[name] = descriptor
        else:
            untagged += 1
    return checker, tags, untagged


def _copy_all(archive: _Archive, work: Sequence[tuple[Digest, _Entry]]) -> None:
    """Copy the blobs of ``work`` into the store on a few threads; each committed blob's writeback is started on
    one more thread (a queue of fsyncs beside the copies, not a map: it stays outside parallel_map)."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ocibuild-writeback") as syncer:
        parallel_map(lambda item: _copy_into_store(archive, item[0], item[1],
                                                   lambda p: syncer.submit(_start_writeback, p)),
                     work, jobs=_jobs(), name="ocibuild-archive")  # fmt: skip


def import_archive(store: Store, path: Path, *, tag: bool = True) -> ImportResult:
    """Bring the oci-archive at ``path`` into ``store``: see the module docstring for what is checked when.
    ``tag=False``: only its blobs, not its tags and downloaded inputs (an ``image`` layer's base, whose tags mean
    nothing in this store: the layer is pinned by manifest digest)."""
    what = f"archive {path}"
    fd = _open_archive(path, what)
    try:
        archive = _Archive(fd, scan_archive(fd, what), store, what)
        checker, tags, untagged = _check_index(archive)
        with store.lease():  # gc waits: the blobs are unreachable until tagged
            work = sorted(checker.copy.items(), key=lambda item: -item[1].size)
            _copy_all(archive, work)
            store.sync()
            restored = _restore_inputs(store, checker.inputs) if tag else 0
            if tag:
                store.tag_all(tags)
    finally:
        os.close(fd)
    written = sum(entry.size for _, entry in work)
    log.info("imported %d blobs (%d bytes) from %s; tags: %s", len(work), written, path, ", ".join(tags))
    return ImportResult(tuple(tags), len(work), checker.present, written, restored, untagged)


def _restore_inputs(store: Store, layers: Sequence[Descriptor]) -> int:
    """Put each imported input into the download cache (a hard link to its blob, else a copy), durably: a copy is
    fsynced before its rename, the directory once after them (not :func:`ocibuild.files.atomic_write`: the content
    is a link or a streamed copy, never bytes in memory)."""
    directory = downloads_dir(store)
    restored = 0
    for layer in layers:
        target = directory / layer.digest.hex
        if target.exists():
            continue
        tmp = directory / f".{layer.digest.hex}.import-{os.getpid()}"
        tmp.unlink(missing_ok=True)
        try:
            try:
                os.link(store.blob_path(layer.digest), tmp)
            except OSError as err:
                if err.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                    raise
                with store.open_blob(layer.digest, size=layer.size) as src, open(tmp, "wb") as dst:
                    while chunk := src.read(_CHUNK):
                        dst.write(chunk)
                    dst.flush()
                    os.fsync(dst.fileno())
            os.replace(tmp, target)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            raise StoreError(f"restore input {layer.digest} into {directory}: {_reason(err)}") from err
        restored += 1
    if restored:
        _sync_dir(directory, "restore inputs")
    return restored
