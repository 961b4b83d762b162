"""The local store: an OCI image layout on disk.

::

    <root>/oci-layout                {"imageLayoutVersion":"1.0.0"}
    <root>/index.json                the tags: descriptors annotated with org.opencontainers.image.ref.name
    <root>/blobs/sha256/<hex>        content-addressed blobs (manifests, configs, layers)
    <root>/ocibuild/                 ours alone; other OCI tools ignore it
        tmp/                         blobs being written, other modules' temporary files (gc removes leftovers)
        lock                         flock: index.json read-modify-write, gc
        lease                        flock: shared by writers and lease holders, exclusive for gc
        <name>/                      caches other modules keep (:meth:`Store.private_dir`)

Blobs are written like umoci and containerd do: to a temporary file, hashed as written, fsynced, checked against
the expected digest and size, then renamed into place and the directory fsynced. A blob in ``blobs/`` is therefore
complete; its presence is trusted (:meth:`Store.has`) and its content is verified as it is read
(:meth:`Store.open_blob`).

Concurrency: index.json changes are serialised by an exclusive flock (:meth:`Store.lock`), so concurrent tagging
never loses a tag. :meth:`Store.gc` deletes blobs no tag reaches, which would race with a build that has written
blobs but not tagged them yet; a build therefore holds :meth:`Store.lease` (a shared flock) from its first blob to
its tag, and gc waits until no lease is held. Every :meth:`Store.writer` holds a lease while it writes.

Errors: :class:`StoreError` names the path and the step that failed; :class:`BlobNotFound` for a blob that must
exist; :class:`DigestMismatch` for content that does not hash to its name (or size).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import io
import json
import logging
import os
import re
import secrets
import stat
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from ..errors import BlobNotFound, DigestMismatch, FormatError, StoreError
from ..oci import (
    CONFIG_TYPES,
    INDEX_TYPES,
    MANIFEST_TYPES,
    OCI_LAYOUT_VERSION,
    Descriptor,
    Digest,
    ImageConfig,
    Index,
    Manifest,
    canonical_json,
)

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, WriteableBuffer

log = logging.getLogger(__name__)

_PRIVATE = "ocibuild"
_RESERVED = frozenset({"lock", "lease"})
_BLOB_TMP = "blob-"  # the prefix of Store.writer's temporary files
_PARTIAL = "partial-"  # resumable downloads (Store.writer(resumable=True)): partial-<algorithm>-<hex>
_STALE_AFTER = 3600.0  # seconds after which any other temporary file is presumed abandoned
_WRITE_BUFFER = 1 << 20
_READ_BUFFER = 1 << 18
_COPY_CHUNK = 1 << 20
_STORE_HINT = "use another store with --store or OCIBUILD_STORE"
_REF_COMPONENT = r"[A-Za-z0-9]+(?:(?:[-._:@+]|--)[A-Za-z0-9]+)*"
_REF_NAME = re.compile(rf"{_REF_COMPONENT}(?:/{_REF_COMPONENT})*")  # the OCI image layout's ref.name grammar


def _reason(err: OSError) -> str:
    return err.strerror or str(err)


def check_ref_name(ref_name: str) -> None:
    """FormatError unless ``ref_name`` is a valid tag name of an OCI image layout."""
    _check_ref_name(ref_name)


def _check_ref_name(ref_name: str) -> None:
    if not _REF_NAME.fullmatch(ref_name):
        raise FormatError(
            f"'{ref_name}' is not a valid tag name",
            hint="use letters, digits and . _ - : @ + separators, optionally in /-separated components",
        )


class BlobWriter:
    """A blob being written by :meth:`Store.writer`: ``write`` hashes and buffers; ``digest`` is set on commit.

    File-like enough for tarfile, gzip and zstandard stream writers: ``write``, ``flush`` (a no-op; durability
    is the commit's job), ``tell``, ``writable`` and ``close`` (only forbids further writes; the with-block commits).
    """

    def __init__(self, file: BinaryIO, path: Path, algorithm: str, expected_size: int | None) -> None:
        self._file = file
        self._path = path
        self._hash = hashlib.new(algorithm)
        self._expected_size = expected_size
        self._size = 0
        self._digest: Digest | None = None
        self._closed = False

    def write(self, data: ReadableBuffer) -> int:
        if self._closed:
            raise ValueError("write to a closed blob writer")
        self._hash.update(data)
        try:
            written = self._file.write(data)
        except OSError as err:
            raise StoreError(
                f"write temporary blob: {self._path}: {_reason(err)}", _hint_for(err, self._path.parents[2])
            ) from err
        self._size += written
        if self._expected_size is not None and self._size > self._expected_size:
            raise DigestMismatch(
                f"blob is larger than expected: {self._size} bytes written, {self._expected_size} expected",
                hint="the source changed or was corrupted in transit; fetch or build it again",
            )
        return written

    def flush(self) -> None:
        pass

    def restart(self) -> None:
        """Throw away what was written: the blob starts again from its first byte."""
        try:
            self._file.seek(0)
            self._file.truncate()
        except OSError as err:
            raise StoreError(f"truncate temporary blob: {self._path}: {_reason(err)}",
                             _hint_for(err, self._path.parents[2])) from err
        self._hash = hashlib.new(self._hash.name)
        self._size = 0

    def _absorb_existing(self) -> None:
        """Take in the bytes a resumed partial file already holds (hashing them again: hash states cannot be
        saved); a file longer than the blob can be is started afresh."""
        self._file.seek(0)
        buffer = bytearray(_COPY_CHUNK)
        view = memoryview(buffer)
        while n := self._file.readinto(buffer):  # type: ignore[attr-defined]
            self._hash.update(view[:n])
            self._size += n
        if self._expected_size is not None and self._size > self._expected_size:
            self.restart()

    def tell(self) -> int:
        return self._size

    def writable(self) -> bool:
        return True

    def close(self) -> None:
        self._closed = True

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def size(self) -> int:
        """Bytes written so far (the blob's size once committed)."""
        return self._size

    @property
    def digest(self) -> Digest:
        """The committed blob's digest; only valid after the ``with`` block ended normally."""
        if self._digest is None:
            raise RuntimeError("BlobWriter.digest is only known once the with-block has committed the blob")
        return self._digest


class _VerifyingReader(io.RawIOBase):
    """Reads a blob file, hashing as it goes; at EOF raises DigestMismatch unless content and size match."""

    def __init__(self, file: io.FileIO, path: Path, digest: Digest, size: int | None) -> None:
        super().__init__()
        self._file = file
        self._path = path
        self._digest = digest
        self._size = size
        self._hash = hashlib.new(digest.algorithm)
        self._count = 0
        self._verified = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        try:
            count = self._file.readinto(buffer) or 0
        except OSError as err:
            raise StoreError(f"read blob {self._digest}: {self._path}: {_reason(err)}") from err
        if count:
            self._hash.update(memoryview(buffer).cast("B")[:count])
            self._count += count
        elif not self._verified and len(memoryview(buffer)) > 0:
            self._check()
        return count

    def _check(self) -> None:
        if self._size is not None and self._count != self._size:
            raise DigestMismatch(
                f"blob {self._digest} is corrupt: {self._count} bytes, expected {self._size}",
                hint=_corrupt_hint(self._path),
            )
        actual = Digest(self._digest.algorithm, self._hash.hexdigest())
        if actual != self._digest:
            raise DigestMismatch(
                f"blob {self._digest} is corrupt (content hashes to {actual})", hint=_corrupt_hint(self._path)
            )
        self._verified = True

    def close(self) -> None:
        if not self.closed:
            self._file.close()
        super().close()


def _corrupt_hint(path: Path) -> str:
    return f"delete {path} and rebuild or fetch the image again; `ocibuild verify` lists every damaged blob"


def _hint_for(err: OSError, root: Path) -> str:
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"free disk space (`ocibuild gc` removes unused blobs), or {_STORE_HINT}"
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"check the permissions of {root}, or {_STORE_HINT}"
    return f"check {root}, or {_STORE_HINT}"


class Store:
    """An OCI image layout at ``root`` with ocibuild's private directory; see the module docstring."""

    root: Path

    def __init__(self, root: Path) -> None:
        """Use :meth:`open`, which checks and creates the layout."""
        self.root = root
        self._lock_mutex = threading.RLock()
        self._lock_depth = 0
        self._lock_fd: int | None = None
        self._lease_mutex = threading.Lock()
        self._lease_count = 0
        self._lease_fd: int | None = None
        self._unsynced_mutex = threading.Lock()
        self._unsynced: list[Path] = []

    def __repr__(self) -> str:
        return f"Store({str(self.root)!r})"

    # ----------------------------------------------------------------------------------------------- opening

    @classmethod
    def open(cls, root: Path, *, create: bool = True) -> Store:
        """Open the layout at ``root``, creating it (and parents) when missing or an empty directory."""
        root = Path(os.path.abspath(root))
        store = cls(root)
        try:
            is_dir = root.is_dir()
            exists = is_dir or root.exists()
        except OSError as err:
            raise StoreError(f"open store: {root}: {_reason(err)}", _hint_for(err, root)) from err
        if exists and not is_dir:
            raise StoreError(f"store {root} is not a directory", hint=f"remove it, or {_STORE_HINT}")
        if exists and (root / "oci-layout").exists():
            store._open_layout(prepare=create)
            return store
        if exists:
            try:
                entries = sorted(name for name in os.listdir(root) if name != _PRIVATE)
            except OSError as err:
                raise StoreError(f"open store: {root}: {_reason(err)}", _hint_for(err, root)) from err
            if entries:
                raise StoreError(
                    f"{root} is neither an empty directory nor an OCI image layout (no oci-layout file)",
                    hint=f"choose a new or empty directory: {_STORE_HINT}",
                )
        if not create:
            raise StoreError(
                f"no store at {root}",
                hint=f"build or import an image first, or point to an existing store: {_STORE_HINT}",
            )
        store._create_layout()
        return store

    def _create_layout(self) -> None:
        log.info("creating store %s", self.root)
        try:
            (self.root / _PRIVATE / "tmp").mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise StoreError(f"create store: {self.root}: {_reason(err)}", _hint_for(err, self.root)) from err
        layout = canonical_json({"imageLayoutVersion": OCI_LAYOUT_VERSION})
        tmp, fd = self._create_tmp("oci-layout-")
        try:
            try:
                with open(fd, "wb") as file:
                    file.write(layout)
                    file.flush()
                    os.fsync(file.fileno())
                os.rename(tmp, self.root / "oci-layout")
            except OSError as err:
                raise StoreError(f"write oci-layout: {self.root}: {_reason(err)}", _hint_for(err, self.root)) from err
        finally:
            tmp.unlink(missing_ok=True)
        self._open_layout(prepare=True)

    def _open_layout(self, *, prepare: bool) -> None:
        """Check the layout; with ``prepare``, also add what ocibuild needs and check that it is writable.

        Without it nothing is written, so a read-only layout (an import source) can be read.
        """
        layout = self.root / "oci-layout"
        try:
            value = json.loads(layout.read_bytes())
        except (OSError, ValueError) as err:
            raise StoreError(f"{layout} is not a valid oci-layout file: {err}", hint=_STORE_HINT) from err
        if not isinstance(value, dict) or value.get("imageLayoutVersion") != OCI_LAYOUT_VERSION:
            raise StoreError(
                f"{layout}: unsupported imageLayoutVersion (expected {OCI_LAYOUT_VERSION})", hint=_STORE_HINT
            )
        if not prepare:
            if not (self.root / "index.json").is_file():
                raise StoreError(f"{self.root / 'index.json'} is missing", hint="is this a complete OCI image layout?")
            return
        try:
            for directory in (self.root / "blobs" / "sha256", self.root / _PRIVATE / "tmp"):
                directory.mkdir(parents=True, exist_ok=True)
            writable = os.access(self.root, os.W_OK) and os.access(self.root / _PRIVATE / "tmp", os.W_OK)
        except OSError as err:
            raise StoreError(f"prepare store: {self.root}: {_reason(err)}", _hint_for(err, self.root)) from err
        if not writable:
            raise StoreError(f"store {self.root} is not writable", hint=f"check its permissions, or {_STORE_HINT}")
        if not (self.root / "index.json").exists():
            with self.lock():
                if not (self.root / "index.json").exists():
                    if any(self._blob_files()):
                        raise StoreError(
                            f"{self.root / 'index.json'} is missing but the store holds blobs",
                            hint="restore index.json from a backup, or start a new store with --store",
                        )
                    self._write_index(Index(()))

    # ---------------------------------------------------------------------------------------------- blobs

    def blob_path(self, digest: Digest) -> Path:
        return self.root / "blobs" / digest.algorithm / digest.hex

    def has(self, digest: Digest) -> bool:
        return os.path.exists(self.blob_path(digest))

    def blobs(self) -> Iterator[Digest]:
        """The digest of every blob file present (presence trusted, as :meth:`has` does; nothing is hashed)."""
        for _, digest in self._blob_files():
            if digest is not None:
                yield digest

    def _create_tmp(self, prefix: str) -> tuple[Path, int]:
        directory = self.root / _PRIVATE / "tmp"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        for attempt in (1, 2):
            path = directory / f"{prefix}{secrets.token_hex(8)}"
            try:
                return path, os.open(path, flags, 0o666)
            except FileNotFoundError:
                if attempt == 2:
                    raise StoreError(f"create temporary file: {directory} is missing", hint=_STORE_HINT) from None
                directory.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise StoreError(f"create temporary file: {path}: {_reason(err)}", _hint_for(err, self.root)) from err
        raise AssertionError("unreachable")

    @contextmanager
    def writer(
        self, *, expected: Digest | None = None, size: int | None = None, sync: bool = True,
        resumable: bool = False,
    ) -> Iterator[BlobWriter]:
        """Stream a blob in; it is committed when the with-block ends normally, discarded when it raises.

        ``expected`` and ``size``, when given, are checked before the blob is committed (DigestMismatch, nothing
        committed). ``sync=False`` skips the fsyncs; the caller then calls :meth:`sync` once after a batch.
        ``resumable`` (with ``expected``): a download. What an earlier writer of the same blob left when it
        failed is taken up (``size`` tells how much; the caller fetches the rest), and what this one writes is
        kept when it fails other than by DigestMismatch, for the next run. Such partial files sit in ``tmp/``
        under a flock, so two processes never write one; gc removes them after an hour. Nothing in a partial file
        is trusted: the whole blob is verified at commit, as any other.
        """
        algorithm = expected.algorithm if expected is not None else "sha256"
        with self.lease():
            opened = self._open_partial(expected) if resumable and expected is not None else None
            path, fd = opened or self._create_tmp(_BLOB_TMP)
            keep_on_failure = opened is not None
            committed = False
            try:
                file = open(fd, "r+b" if opened else "wb", buffering=_WRITE_BUFFER)
            except BaseException:
                os.close(fd)
                path.unlink(missing_ok=True)
                raise
            blob = BlobWriter(file, path, algorithm, size)
            try:
                if opened:
                    blob._absorb_existing()
                    if blob.size:
                        log.info("resuming blob %s at byte %d (left by an earlier run)", expected, blob.size)
                yield blob
                self._commit(blob, file, path, expected, size, sync)
                committed = True
            except DigestMismatch:
                keep_on_failure = False
                raise
            finally:
                if not committed:
                    if not keep_on_failure or blob.size == 0:  # removed before its flock is released by the close
                        try:
                            path.unlink(missing_ok=True)
                        except OSError as err:
                            log.warning("could not remove temporary blob %s: %s", path, _reason(err))
                    try:
                        file.close()
                    except OSError:
                        pass

    def _open_partial(self, expected: Digest) -> tuple[Path, int] | None:
        """The locked partial file of a download of ``expected`` (created if absent); None when another process
        holds it (this writer then starts afresh in a file of its own)."""
        directory = self.root / _PRIVATE / "tmp"
        path = directory / f"{_PARTIAL}{expected.algorithm}-{expected.hex}"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except FileNotFoundError:
            directory.mkdir(parents=True, exist_ok=True)
            return self._open_partial(expected)
        except OSError as err:
            raise StoreError(f"create temporary file: {path}: {_reason(err)}", _hint_for(err, self.root)) from err
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return None
        return path, fd

    def _commit(
        self,
        blob: BlobWriter,
        file: BinaryIO,
        path: Path,
        expected: Digest | None,
        size: int | None,
        sync: bool,
    ) -> None:
        try:
            file.flush()
            if sync:
                os.fsync(file.fileno())
            file.close()
        except OSError as err:
            raise StoreError(f"write temporary blob: {path}: {_reason(err)}", _hint_for(err, self.root)) from err
        digest = Digest(blob._hash.name, blob._hash.hexdigest())
        if size is not None and blob.size != size:
            raise DigestMismatch(
                f"blob {expected or digest}: {blob.size} bytes written, {size} expected",
                hint="the source changed or was corrupted in transit; fetch or build it again",
            )
        if expected is not None and digest != expected:
            raise DigestMismatch(
                f"content written for {expected} hashes to {digest}",
                hint="the source changed or was corrupted in transit; fetch or build it again",
            )
        target = self.blob_path(digest)
        try:
            if os.path.exists(target):
                path.unlink()
            else:
                if not target.parent.is_dir():
                    target.parent.mkdir(parents=True, exist_ok=True)
                os.rename(path, target)
                if sync:
                    self._fsync_dir(target.parent)
                else:
                    with self._unsynced_mutex:
                        self._unsynced.append(target)
        except OSError as err:
            raise StoreError(
                f"rename temporary blob: {path} to {target}: {_reason(err)}", _hint_for(err, self.root)
            ) from err
        blob._digest = digest
        log.debug("stored blob %s (%d bytes)", digest, blob.size)

    def _fsync_dir(self, directory: Path) -> None:
        try:
            fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as err:
            raise StoreError(f"fsync directory: {directory}: {_reason(err)}", _hint_for(err, self.root)) from err

    def sync(self) -> None:
        """Make durable every blob this Store committed with ``sync=False``: fsync each, then their directories."""
        with self._unsynced_mutex:
            paths, self._unsynced = self._unsynced, []
        for path in paths:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue  # collected meanwhile
            except OSError as err:
                raise StoreError(f"fsync blob: {path}: {_reason(err)}", _hint_for(err, self.root)) from err
            try:
                os.fsync(fd)
            except OSError as err:
                raise StoreError(f"fsync blob: {path}: {_reason(err)}", _hint_for(err, self.root)) from err
            finally:
                os.close(fd)
        for directory in sorted({path.parent for path in paths}):
            self._fsync_dir(directory)

    def put(self, data: bytes, media_type: str, *, annotations: Mapping[str, str] | None = None) -> Descriptor:
        """Store a small blob held in memory (a manifest, a config)."""
        digest = Digest.of(data)
        if not self.has(digest):
            with self.writer(expected=digest, size=len(data)) as blob:
                blob.write(data)
        return Descriptor(media_type, digest, len(data), dict(annotations or {}))

    def put_file(self, path: Path, media_type: str, *, expected: Digest | None = None) -> Descriptor:
        """Copy a file into the store, streamed and hashed; with ``expected`` already present, nothing is read."""
        if expected is not None and self.has(expected):
            try:
                return Descriptor(media_type, expected, self.blob_path(expected).stat().st_size)
            except FileNotFoundError:
                pass  # removed meanwhile: copy it
            except OSError as err:
                raise StoreError(f"stat blob {expected}: {_reason(err)}", _hint_for(err, self.root)) from err
        try:
            source = open(path, "rb", buffering=0)
        except OSError as err:
            raise StoreError(f"read {path}: {_reason(err)}", hint="check that the file exists and is readable") from err
        with source, self.writer(expected=expected) as blob:
            buffer = bytearray(_COPY_CHUNK)
            view = memoryview(buffer)
            while True:
                try:
                    count = source.readinto(buffer)
                except OSError as err:
                    raise StoreError(f"read {path}: {_reason(err)}", hint="check the file and its disk") from err
                if not count:
                    break
                blob.write(view[:count])
        return Descriptor(media_type, blob.digest, blob.size)

    def open_blob(self, digest: Digest, *, size: int | None = None) -> BinaryIO:
        """A reader of the blob that raises DigestMismatch at EOF unless the content hashes to ``digest``.

        Only a reader that reaches EOF verifies. With ``size``, a blob of another size fails at once.
        """
        path = self.blob_path(digest)
        try:
            file = io.FileIO(path, "rb")
        except FileNotFoundError:
            raise BlobNotFound(
                f"blob {digest} is not in the store {self.root}",
                hint="run `ocibuild verify` to check the store, then rebuild or fetch the image again",
            ) from None
        except OSError as err:
            raise StoreError(f"open blob {digest}: {path}: {_reason(err)}", _hint_for(err, self.root)) from err
        if size is not None:
            actual = os.fstat(file.fileno()).st_size
            if actual != size:
                file.close()
                raise DigestMismatch(
                    f"blob {digest} is corrupt: {actual} bytes, expected {size}", hint=_corrupt_hint(path)
                )
        return io.BufferedReader(_VerifyingReader(file, path, digest, size), buffer_size=_READ_BUFFER)

    def read_blob(self, digest: Digest, *, max_size: int = 16 << 20) -> bytes:
        """The whole content of a small blob, verified."""
        path = self.blob_path(digest)
        try:
            with open(path, "rb", buffering=0) as file:
                size = os.fstat(file.fileno()).st_size
                if size > max_size:
                    raise StoreError(
                        f"blob {digest} is {size} bytes, more than the {max_size} expected of a manifest or config",
                        hint=_corrupt_hint(path),
                    )
                data = file.read()
        except FileNotFoundError:
            raise BlobNotFound(
                f"blob {digest} is not in the store {self.root}",
                hint="run `ocibuild verify` to check the store, then rebuild or fetch the image again",
            ) from None
        except OSError as err:
            raise StoreError(f"read blob {digest}: {path}: {_reason(err)}", _hint_for(err, self.root)) from err
        actual = Digest(digest.algorithm, hashlib.new(digest.algorithm, data).hexdigest())
        if actual != digest:
            raise DigestMismatch(f"blob {digest} is corrupt (content hashes to {actual})", hint=_corrupt_hint(path))
        return data

    def get_manifest(self, digest: Digest) -> Manifest:
        return Manifest.parse(self.read_blob(digest), f"manifest {digest}")

    def get_config(self, digest: Digest) -> ImageConfig:
        return ImageConfig.parse(self.read_blob(digest), f"image config {digest}")

    def put_manifest(self, manifest: Manifest) -> Descriptor:
        """Store ``manifest.to_json()`` exactly; the descriptor carries the manifest's artifactType."""
        descriptor = self.put(manifest.to_json(), manifest.media_type)
        if manifest.artifact_type:
            return Descriptor(
                descriptor.media_type, descriptor.digest, descriptor.size, artifact_type=manifest.artifact_type
            )
        return descriptor

    # ------------------------------------------------------------------------------------- tags, index.json

    def index(self) -> Index:
        path = self.root / "index.json"
        try:
            data = path.read_bytes()
        except OSError as err:
            raise StoreError(f"read index.json: {path}: {_reason(err)}", _hint_for(err, self.root)) from err
        try:
            return Index.parse(data, str(path))
        except FormatError as err:
            raise StoreError(
                str(err), hint="restore index.json from a backup, or start a new store with --store"
            ) from err

    def resolve(self, ref_name: str) -> Descriptor | None:
        return self.index().find(ref_name)

    def tag(self, ref_name: str, descriptor: Descriptor) -> None:
        """Point ``ref_name`` at ``descriptor`` (a manifest or index already in the store)."""
        _check_ref_name(ref_name)
        if not self.has(descriptor.digest):
            raise BlobNotFound(
                f"cannot tag '{ref_name}': {descriptor.digest} is not in the store",
                hint="store the manifest before tagging it",
            )
        self.update_index(lambda index: index.with_tag(ref_name, descriptor))
        log.debug("tagged %s -> %s", ref_name, descriptor.digest)

    def tag_all(self, tags: Mapping[str, Descriptor]) -> None:
        """Point every name of ``tags`` at its descriptor (each already in the store), in one index.json update."""
        for ref_name, descriptor in tags.items():
            _check_ref_name(ref_name)
            if not self.has(descriptor.digest):
                raise BlobNotFound(
                    f"cannot tag '{ref_name}': {descriptor.digest} is not in the store",
                    hint="store the manifest before tagging it",
                )

        def change(index: Index) -> Index:
            for ref_name, descriptor in tags.items():
                index = index.with_tag(ref_name, descriptor)
            return index

        if tags:
            self.update_index(change)

    def untag(self, ref_name: str) -> bool:
        """Remove ``ref_name``; False when there was no such tag."""
        found = False

        def change(index: Index) -> Index:
            nonlocal found
            found = index.find(ref_name) is not None
            return index.without_tag(ref_name)

        self.update_index(change)
        return found

    def update_index(self, change: Callable[[Index], Index]) -> Index:
        """Read index.json, apply ``change``, write the result atomically; all under :meth:`lock`."""
        with self.lock():
            current = self.index()
            updated = change(current)
            if updated != current:
                self._write_index(updated)
            return updated

    def _write_index(self, index: Index) -> None:
        path = self.root / "index.json"
        tmp = self.root / "index.json.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
            with open(fd, "wb") as file:
                file.write(index.to_json())
                file.flush()
                os.fsync(file.fileno())
            os.replace(tmp, path)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            raise StoreError(f"write index.json: {tmp}: {_reason(err)}", _hint_for(err, self.root)) from err
        self._fsync_dir(self.root)

    # ------------------------------------------------------------------------------------------- locking

    def _open_lock_file(self, name: str) -> int:
        path = self.root / _PRIVATE / name
        try:
            return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except FileNotFoundError:
            path.parent.mkdir(parents=True, exist_ok=True)
            return self._open_lock_file(name)
        except OSError as err:
            raise StoreError(f"open lock file: {path}: {_reason(err)}", _hint_for(err, self.root)) from err

    def _flock(self, fd: int, operation: int, name: str, *, wait: bool = True) -> None:
        """flock ``fd`` (closing it on failure); BlockingIOError when busy and not ``wait``."""
        path = self.root / _PRIVATE / name
        try:
            try:
                fcntl.flock(fd, operation | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if not wait:
                    raise
            log.info("waiting for another ocibuild process to release %s", path)
            fcntl.flock(fd, operation)
        except BaseException as err:
            os.close(fd)
            if isinstance(err, OSError) and not isinstance(err, BlockingIOError):
                raise StoreError(f"lock {path}: {_reason(err)}", _hint_for(err, self.root)) from err
            raise

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive store lock (flock on ``ocibuild/lock``) for index.json changes and gc; re-entrant per Store."""
        with self._lock_mutex:
            if self._lock_depth == 0:
                fd = self._open_lock_file("lock")
                self._flock(fd, fcntl.LOCK_EX, "lock")
                self._lock_fd = fd
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1
                if self._lock_depth == 0 and self._lock_fd is not None:
                    os.close(self._lock_fd)  # closing releases the flock
                    self._lock_fd = None

    @contextmanager
    def lease(self) -> Iterator[None]:
        """Keep gc away while held (a shared flock on ``ocibuild/lease``); re-entrant, shared by threads.

        Hold it from the first blob a build writes until the build's manifest is tagged: blobs nothing tags yet
        are otherwise fair game for a concurrent :meth:`gc`.
        """
        with self._lease_mutex:
            if self._lease_count == 0:
                fd = self._open_lock_file("lease")
                self._flock(fd, fcntl.LOCK_SH, "lease")
                self._lease_fd = fd
            self._lease_count += 1
        try:
            yield
        finally:
            with self._lease_mutex:
                self._lease_count -= 1
                if self._lease_count == 0 and self._lease_fd is not None:
                    os.close(self._lease_fd)
                    self._lease_fd = None

    @contextmanager
    def _exclusive_lease(self, wait: bool) -> Iterator[None]:
        with self._lease_mutex:
            if self._lease_count:
                raise StoreError(
                    f"gc of {self.root} cannot run while this process holds a lease or writes a blob",
                    hint="run gc after the build has tagged its image",
                )
            fd = self._open_lock_file("lease")
            try:
                self._flock(fd, fcntl.LOCK_EX, "lease", wait=wait)
            except BlockingIOError:
                raise StoreError(
                    f"store {self.root} is in use by another ocibuild process (a build, import or fetch)",
                    hint="run gc again when it has finished",
                ) from None
            try:
                yield
            finally:
                os.close(fd)

    @contextmanager
    def _lease_if_writable(self) -> Iterator[None]:
        """A lease, unless the store is read-only (an import source): then nothing can gc it meanwhile."""
        with ExitStack() as stack:
            try:
                stack.enter_context(self.lease())
            except StoreError as err:
                cause = err.__cause__
                if not isinstance(cause, OSError) or cause.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
                    raise
                log.debug("reading %s without a lease: %s", self.root, err)
            yield

    # ------------------------------------------------------------------------------ reachability, verify, gc

    def _algorithm_dirs(self) -> list[Path]:
        blobs = self.root / "blobs"
        try:
            return sorted(entry for entry in blobs.iterdir() if entry.is_dir())
        except FileNotFoundError:
            return []
        except OSError as err:
            raise StoreError(f"list blobs: {blobs}: {_reason(err)}", _hint_for(err, self.root)) from err

    def _blob_files(self) -> Iterator[tuple[Path, Digest | None]]:
        """Every file under blobs/ with its digest (None when its name is not one)."""
        for directory in self._algorithm_dirs():
            try:
                names = sorted(os.listdir(directory))
            except OSError as err:
                raise StoreError(f"list blobs: {directory}: {_reason(err)}", _hint_for(err, self.root)) from err
            for name in names:
                try:
                    digest: Digest | None = Digest.parse(f"{directory.name}:{name}")
                except FormatError:
                    digest = None
                yield directory / name, digest

    def _walk(self, corrupt: set[Digest]) -> tuple[set[Digest], list[str], list[str]]:
        """Follow index.json: (digests reached, problems, problems that hide reachable blobs from gc)."""
        reached: set[Digest] = set()
        problems: list[str] = []
        blocking: list[str] = []
        try:
            index = self.index()
        except StoreError as err:
            return reached, [str(err)], [str(err)]
        stack: list[tuple[Descriptor, str]] = []
        for position, descriptor in reversed(list(enumerate(index.manifests))):
            name = descriptor.ref_name
            stack.append((descriptor, f"tag '{name}'" if name else f"index.json manifest {position}"))
        checked: set[tuple[Digest, int, str]] = set()
        while stack:
            descriptor, via = stack.pop()
            digest = descriptor.digest
            reached.add(digest)
            is_parent = descriptor.media_type in MANIFEST_TYPES or descriptor.media_type in INDEX_TYPES
            if (digest, descriptor.size, descriptor.media_type) in checked:
                continue
            checked.add((digest, descriptor.size, descriptor.media_type))
            path = self.blob_path(digest)
            try:
                actual = path.stat().st_size
            except FileNotFoundError:
                problems.append(f"{via}: blob {digest} is missing")
                if is_parent:
                    blocking.append(problems[-1])
                continue
            except OSError as err:
                problems.append(f"{via}: blob {digest}: {_reason(err)}")
                blocking.append(problems[-1])
                continue
            if actual != descriptor.size:
                problems.append(f"{via}: blob {digest} has {actual} bytes, the descriptor says {descriptor.size}")
            if not is_parent and descriptor.media_type not in CONFIG_TYPES:
                continue
            kind = "manifest" if descriptor.media_type in MANIFEST_TYPES else "index"
            if descriptor.media_type in CONFIG_TYPES:
                kind = "config"
            try:
                data = self.read_blob(digest)
                if kind == "manifest":
                    manifest = Manifest.parse(data, f"{via}: manifest {digest}")
                    children = [(manifest.config, f"{via} > config")]
                    children += [(layer, f"{via} > layer {i}") for i, layer in enumerate(manifest.layers)]
                    stack.extend(reversed(children))
                elif kind == "index":
                    nested = Index.parse(data, f"{via}: index {digest}")
                    stack.extend(
                        reversed([(child, f"{via} > manifest {i}") for i, child in enumerate(nested.manifests)])
                    )
                else:
                    ImageConfig.parse(data, f"{via}: config {digest}")
            except (StoreError, FormatError) as err:
                if is_parent:
                    blocking.append(f"{via}: {kind} {digest} cannot be read: {err}")
                if digest not in corrupt:  # a corrupt blob is reported once, by the scan
                    problems.append(str(err) if isinstance(err, FormatError) else f"{via}: {err}")
        return reached, problems, blocking

    def reachable(self) -> set[Digest]:
        """Every digest index.json reaches (manifests, nested indexes, configs, layers), present or not.

        Raises StoreError when index.json, or a manifest or index it reaches, cannot be read: what it refers to
        is then unknown.
        """
        reached, _, blocking = self._walk(set())
        if blocking:
            more = f" (and {len(blocking) - 1} more problems)" if len(blocking) > 1 else ""
            raise StoreError(
                f"cannot tell which blobs are in use: {blocking[0]}{more}",
                hint="run `ocibuild verify`; untag, rebuild or fetch again the images it names",
            )
        return reached

    def verify(self, *, unreachable: bool = False) -> list[str]:
        """Problems found, one line each (empty when the store is sound).

        Every blob must hash to its name; every descriptor reachable from index.json must name a present blob of
        its size; manifests, indexes and image configs must parse. With ``unreachable``, blobs no tag reaches
        count as problems too. Temporary files and ocibuild's private directory are not looked at.
        """
        problems: list[str] = []
        corrupt: set[Digest] = set()
        present: set[Digest] = set()
        with self._lease_if_writable():
            layout = self.root / "oci-layout"
            try:
                value = json.loads(layout.read_bytes())
                if not isinstance(value, dict) or value.get("imageLayoutVersion") != OCI_LAYOUT_VERSION:
                    problems.append(f"{layout}: imageLayoutVersion is not {OCI_LAYOUT_VERSION}")
            except (OSError, ValueError) as err:
                problems.append(f"{layout} cannot be read: {err}")
            for path, digest in self._blob_files():
                relative = path.relative_to(self.root)
                if digest is None or not path.is_file():
                    problems.append(f"{relative} is not a blob (unexpected name or type)")
                    continue
                present.add(digest)
                try:
                    with open(path, "rb") as file:
                        actual = Digest(digest.algorithm, hashlib.file_digest(file, digest.algorithm).hexdigest())
                except OSError as err:
                    problems.append(f"blob {digest} cannot be read: {_reason(err)}")
                    corrupt.add(digest)
                    continue
                if actual != digest:
                    problems.append(f"blob {digest} is corrupt (content hashes to {actual})")
                    corrupt.add(digest)
            reached, walk_problems, _ = self._walk(corrupt)
            problems += walk_problems
            if unreachable:
                for digest in sorted(present - reached):
                    problems.append(f"blob {digest} is not reachable from index.json (`ocibuild gc` removes it)")
        return problems

    def gc(self, *, wait: bool = True) -> tuple[int, int]:
        """Delete blobs index.json does not reach and leftover temporary files; (blobs removed, bytes freed).

        Waits for every lease (running builds, writers) to end, or with ``wait=False`` raises StoreError when
        one is held. Refuses (StoreError) when a tagged manifest or index cannot be read.
        """
        removed = freed = 0
        with self._exclusive_lease(wait), self.lock():
            keep = self.reachable()
            touched: set[Path] = set()
            for path, digest in self._blob_files():
                if digest is None or digest in keep:
                    continue
                try:
                    size = path.stat().st_size
                    path.unlink()
                except FileNotFoundError:
                    continue
                except OSError as err:
                    raise StoreError(f"remove blob: {path}: {_reason(err)}", _hint_for(err, self.root)) from err
                removed += 1
                freed += size
                touched.add(path.parent)
                log.debug("removed unreachable blob %s (%d bytes)", digest, size)
            # index.json.tmp is only written under the lock we hold, and blob writers hold a lease, of which none is
            # held now: theirs are leftovers of crashed processes. Other modules' temporary files go after an hour.
            tmp_dir = self.root / _PRIVATE / "tmp"
            leftovers = [self.root / "index.json.tmp"]
            try:
                leftovers += sorted(tmp_dir.iterdir())
            except FileNotFoundError:
                pass
            except OSError as err:
                raise StoreError(f"list temporary files: {tmp_dir}: {_reason(err)}", _hint_for(err, self.root)) from err
            stale_before = time.time() - _STALE_AFTER
            for path in leftovers:
                try:
                    info = path.lstat()
                    if stat.S_ISDIR(info.st_mode):
                        continue  # another module's working directory: its owner removes it
                    if path.parent == tmp_dir and not path.name.startswith(_BLOB_TMP) and info.st_mtime > stale_before:
                        continue
                    path.unlink()
                    size = info.st_size
                except FileNotFoundError:
                    continue
                except OSError as err:
                    log.warning("could not remove temporary file %s: %s", path, _reason(err))
                    continue
                freed += size
                log.debug("removed temporary file %s", path)
            for directory in sorted(touched):
                self._fsync_dir(directory)
        log.info("gc of %s: removed %d blobs, freed %d bytes", self.root, removed, freed)
        return removed, freed

    def private_dir(self, name: str) -> Path:
        """``<root>/ocibuild/<name>``, created: a place for caches other modules keep. gc and verify ignore it."""
        if not name or name in (".", "..") or "/" in name or "\0" in name or name in _RESERVED:
            raise ValueError(f"'{name}' is not a usable private directory name")
        path = self.root / _PRIVATE / name
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise StoreError(f"create directory: {path}: {_reason(err)}", _hint_for(err, self.root)) from err
        return path
