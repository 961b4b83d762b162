"""Reading an archive into the store: :func:`import_archive`. Nothing is written before the whole archive has been
checked.

1. The scan (:func:`scan_archive`): every tar header is read by :mod:`ocibuild.tar.read` with its
   :data:`~ocibuild.tar.read.LAYOUT` policy (no links, devices, absolute or ``..`` paths, oversized extended
   headers; compressed archives are refused before) and checked against the layout (only ``oci-layout``,
   ``index.json`` and ``blobs/<algorithm>/<hex>``, and their directories).
2. The check of index.json's graph (:class:`_IndexGraphChecker`): every manifest, index and config reachable from
   ``index.json`` is read, digest-checked and parsed, media types checked against what refers to them, every blob
   located in the archive or (a delta) the store.
3. The copy: the blobs the store lacks, each hashed as it is written and committed only whole
   (:meth:`Store.writer`, its writeback started at once on a spare thread); one :meth:`Store.sync` makes them all
   durable, the downloaded inputs the archive carries are restored into the download cache, and one index.json
   update adds the tags.

A failure before that update leaves only complete, verified blobs that no tag reaches (gc removes them); the tags
are untouched.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import oci
from ..errors import DigestMismatch, FormatError, StoreError, UnsafeArchive
from ..files import NotRegularFile, link_or_copy, open_regular
from ..oci import Descriptor, Digest, Index, Manifest
from ..store import Store, check_ref_name
from ..store.entries import add_cache_entries, check_entering, is_cache_tag
from ..store.maintenance import Role, media_type_problem
from ..tar import codecs, read
from ..threads import parallel_map
from .contents import CHUNK, INPUT_ARTIFACT, INPUT_TAG_PREFIX, copy_jobs, downloads_dir, reason, sync_dir

log = logging.getLogger(__name__)

_MAX_DOCUMENT = 16 << 20  # index.json, a manifest, an index or a config
_MAX_DEPTH = 8  # of nested indexes
_HINT_HOSTILE = read.LAYOUT.hint_unsafe
_HINT_EXPORT = read.LAYOUT.hint_corrupt
_BLOB_NAME = re.compile(r"blobs/([a-z0-9]+)/([0-9a-f]+)")
_IGNORED = frozenset({"manifest.json", "repositories"})  # docker-archive compatibility files some tools add


# -------------------------------------------------------------------------------------------------- tar reading


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


# ------------------------------------------------------------------------------------------------------- import


@dataclass(frozen=True)
class ImportResult:
    tags: tuple[str, ...]
    blobs: int  # written into the store
    present: int  # already in the store
    bytes: int  # written
    inputs: int  # restored into the download cache
    untagged: int  # manifests of index.json without a ref name, input artifacts aside (gc may remove them)

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
        value = oci.parse_json(data, "a document")
    except FormatError:
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
        problem = media_type_problem("listed", media_type)
        if problem is not None:
            raise FormatError(f"{self.what}: {where} {problem}")
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
        role: Role = "image layer" if manifest.config.media_type in oci.CONFIG_TYPES else "artifact layer"
        for i, layer in enumerate(manifest.layers):
            problem = media_type_problem(role, layer.media_type)
            if problem is not None:
                raise FormatError(f"{self.what}: {where} > layer {i} {problem}")
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
        elif (problem := media_type_problem("config", config.media_type)) is not None:
            raise FormatError(f"{self.what}: {where} > config {problem}")
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
    buffer = bytearray(min(CHUNK, max(entry.size, 1)))
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
        fd = open_regular(path)
    except NotRegularFile as err:
        raise UnsafeArchive(f"{what} is {reason(err)}", "import an archive file, not a pipe or device") from None
    except OSError as err:
        raise StoreError(f"{what}: cannot open: {reason(err)}", "check the path") from None
    try:
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
    value = oci.parse_json(layout, f"{what}: oci-layout")
    version = value.get("imageLayoutVersion") if isinstance(value, dict) else None
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
        elif descriptor.artifact_type != INPUT_ARTIFACT:  # an input goes to the download cache, not to a tag
            untagged += 1
    return checker, tags, untagged


def _copy_all(archive: _Archive, work: Sequence[tuple[Digest, _Entry]]) -> None:
    """Copy the blobs of ``work`` into the store on a few threads; each committed blob's writeback is started on
    one more thread (a queue of fsyncs beside the copies, not a map: it stays outside parallel_map)."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ocibuild-writeback") as syncer:
        parallel_map(lambda item: _copy_into_store(archive, item[0], item[1],
                                                   lambda p: syncer.submit(_start_writeback, p)),
                     work, jobs=copy_jobs(), name="ocibuild-archive")  # fmt: skip


def import_archive(store: Store, path: Path, *, tag: bool = True) -> ImportResult:
    """Bring the oci-archive at ``path`` into ``store``: see the module docstring for what is checked when.
    ``tag=False``: only its blobs, not its tags and downloaded inputs (an ``image`` layer's base, whose tags mean
    nothing in this store: the layer is pinned by manifest digest)."""
    what = f"archive {path}"
    fd = _open_archive(path, what)
    try:
        archive = _Archive(fd, scan_archive(fd, what), store, what)
        with store.lease():  # gc waits: from the check of which blobs the store has until the tags
            checker, tags, untagged = _check_index(archive)
            work = sorted(checker.copy.items(), key=lambda item: -item[1].size)
            _copy_all(archive, work)
            store.sync()
            restored = _restore_inputs(store, checker.inputs) if tag else 0
            if tag:  # cache entries through the one door (checked, never re-pointed), other tags through its checks
                entries = {n: d for n, d in tags.items() if is_cache_tag(n) and not n.startswith(INPUT_TAG_PREFIX)}
                add_cache_entries(store, entries, what=what)
                others = {n: d for n, d in tags.items() if n not in entries}
                check_entering(store, others, what=what)
                store.tag_all(others)
    finally:
        os.close(fd)
    written = sum(entry.size for _, entry in work)
    log.info("imported %d blobs (%d bytes) from %s; tags: %s", len(work), written, path, ", ".join(tags))
    return ImportResult(tuple(tags), len(work), checker.present, written, restored, untagged)


def _restore_inputs(store: Store, layers: Sequence[Descriptor]) -> int:
    """Put each imported input into the download cache (:func:`ocibuild.files.link_or_copy` of its blob: a hard
    link, else a fsynced copy), the directory fsynced once after them."""
    directory = downloads_dir(store)
    restored = 0
    for layer in layers:
        target = directory / layer.digest.hex
        if target.exists():
            continue
        try:
            link_or_copy(store.blob_path(layer.digest), target, sync_directory=False)
        except OSError as err:
            raise StoreError(f"restore input {layer.digest} into {directory}: {reason(err)}") from err
        restored += 1
    if restored:
        sync_dir(directory, "restore inputs")
    return restored
