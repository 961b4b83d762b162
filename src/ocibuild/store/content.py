"""Blobs in and out: the streaming writer and its commit, resumable partial downloads, the verifying reader.

A blob is written like umoci and containerd write content: to a temporary file in ``ocibuild/tmp/``, hashed as
written, fsynced, checked against the expected digest and size, renamed into ``blobs/`` and the directory fsynced
(``files.fsync_dir``). A blob in ``blobs/`` is therefore complete; its presence is trusted and its content is
verified as it is read. Blob commits stream, so they do not go through ``files.atomic_write`` (a whole-file write).

A blob being written is a temporary file of :mod:`.scratch` (held under a flock: what a killed writer leaves is
removed by the next open of the store); partial downloads are kept on purpose, for the next run to resume (gc
removes them after an hour).
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from ..errors import BlobNotFound, DigestMismatch, StoreError
from ..files import TooLarge, fsync_dir, open_regular, read_bounded
from ..oci import Digest
from .layout import FILE_MODE, Layout, hint_for, reason
from .scratch import create_held, is_at, remove_tree, sweep

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, WriteableBuffer

log = logging.getLogger(__name__)

BLOB_TMP = "blob-"  # the prefix of Content.writer's temporary files
_PARTIAL = "partial-"  # resumable downloads (Content.writer(resumable=True)): partial-<algorithm>-<hex>
_WRITE_BUFFER = 1 << 20
_READ_BUFFER = 1 << 18
_COPY_CHUNK = 1 << 20
_CHANGED_HINT = "the source changed or was corrupted in transit; fetch or build it again"


def corrupt_hint(path: Path) -> str:
    return (f"run `ocibuild verify --repair`: it removes {path} and every other damaged blob, with the tags that "
            "reach them; then build or fetch again")


def sync_dir(directory: Path, root: Path) -> None:
    """``files.fsync_dir`` for a directory of the store at ``root``, its OSError told as a StoreError."""
    try:
        fsync_dir(directory)
    except OSError as err:
        raise StoreError(f"fsync directory: {directory}: {reason(err)}", hint_for(err, root)) from err


class BlobWriter:
    """A blob being written by :meth:`Content.writer`: ``write`` hashes and buffers; ``digest`` is set on commit.

    File-like enough for tarfile, gzip and zstandard stream writers: ``write``, ``flush`` (a no-op; durability
    is the commit's job), ``tell``, ``writable`` and ``close`` (only forbids further writes; the with-block commits).
    """

    def __init__(
        self, file: BinaryIO, path: Path, algorithm: str, expected_size: int | None, *, partial: bool = False
    ) -> None:
        self._file = file
        self._path = path
        self._partial = partial  # a locked partial download: its path is only renamed or removed while it is ours
        self._root = path.parents[2]  # <root>/ocibuild/tmp/<name>
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
            raise StoreError(f"write temporary blob: {self._path}: {reason(err)}", hint_for(err, self._root)) from err
        self._size += written
        if self._expected_size is not None and self._size > self._expected_size:
            raise DigestMismatch(
                f"blob is larger than expected: {self._size} bytes written, {self._expected_size} expected",
                hint=_CHANGED_HINT,
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
            raise StoreError(f"truncate temporary blob: {self._path}: {reason(err)}",
                             hint_for(err, self._root)) from err
        self._hash = hashlib.new(self._hash.name)
        self._size = 0

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

    # -------------------------------------------------------------------- the writer's side (Content.writer)

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

    def _finish(self, expected: Digest | None, size: int | None, sync: bool) -> Digest:
        """Flush (and fsync) the temporary file and check size and digest: the content's digest. The file stays
        open (a partial download's flock with it) until the commit has renamed it."""
        try:
            self._file.flush()
            if sync:
                os.fsync(self._file.fileno())
        except OSError as err:
            raise StoreError(f"write temporary blob: {self._path}: {reason(err)}", hint_for(err, self._root)) from err
        digest = Digest(self._hash.name, self._hash.hexdigest())
        if size is not None and self._size != size:
            raise DigestMismatch(f"blob {expected or digest}: {self._size} bytes written, {size} expected",
                                 hint=_CHANGED_HINT)
        if expected is not None and digest != expected:
            raise DigestMismatch(f"content written for {expected} hashes to {digest}", hint=_CHANGED_HINT)
        return digest

    def _owns_path(self) -> bool:
        """Whether the temporary file's path still names this writer's file (always, but for a partial download
        whose file an older writer's commit moved away; checked before the path is renamed or removed)."""
        return not self._partial or is_at(self._file.fileno(), self._path)

    def _discard(self, keep: bool) -> None:
        """After a failure: remove the temporary file (unless ``keep``, for a resumed download) and close it."""
        if (not keep or self._size == 0) and self._owns_path():  # removed before the close releases its flock
            try:
                self._path.unlink(missing_ok=True)
            except OSError as err:
                log.warning("could not remove temporary blob %s: %s", self._path, reason(err))
        try:
            self._file.close()
        except OSError:
            pass


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
            raise StoreError(f"read blob {self._digest}: {self._path}: {reason(err)}") from err
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
                hint=corrupt_hint(self._path),
            )
        actual = Digest(self._digest.algorithm, self._hash.hexdigest())
        if actual != self._digest:
            raise DigestMismatch(
                f"blob {self._digest} is corrupt (content hashes to {actual})", hint=corrupt_hint(self._path)
            )
        self._verified = True

    def close(self) -> None:
        if not self.closed:
            self._file.close()
        super().close()


class Content:
    """The blobs of a layout: written through :meth:`writer`, read verified by :meth:`open_blob` and
    :meth:`read_blob`."""

    def __init__(self, layout: Layout) -> None:
        self._layout = layout
        self._root = layout.root
        self._unsynced_mutex = threading.Lock()
        self._unsynced: list[Path] = []

    # ------------------------------------------------------------------------------------------- writing

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
        with self._layout.locks.lease():
            partial = self._open_partial(expected) if resumable and expected is not None else None
            path, fd = partial or create_held(self._layout.tmp_dir, "blob", self._root)
            try:
                file = open(fd, "r+b" if partial else "wb", buffering=_WRITE_BUFFER)
            except BaseException:
                os.close(fd)
                path.unlink(missing_ok=True)
                raise
            blob = BlobWriter(file, path, algorithm, size, partial=partial is not None)
            keep_on_failure = partial is not None
            committed = False
            try:
                if partial:
                    blob._absorb_existing()
                    if blob.size:
                        log.info("resuming blob %s at byte %d (left by an earlier run)", expected, blob.size)
                yield blob
                self._commit(blob, blob._finish(expected, size, sync), sync)
                committed = True
            except DigestMismatch:
                keep_on_failure = False
                raise
            finally:
                if not committed:
                    blob._discard(keep_on_failure)

    def _open_partial(self, expected: Digest) -> tuple[Path, int] | None:
        """The locked partial file of a download of ``expected`` (created if absent); None when another writer
        holds it (this writer then starts afresh in a file of its own).

        The file opened may be committed (renamed into ``blobs/``) or removed by its holder before our flock is
        granted, and the path then names another writer's file or none: after locking, the descriptor must still
        be the file the path names, else it is dropped and the path opened again. While we hold the lock no one
        else renames or removes the path (they too hold its file's lock first), and the commit checks again."""
        directory = self._layout.tmp_dir
        path = directory / f"{_PARTIAL}{expected.algorithm}-{expected.hex}"
        for _attempt in range(3):
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
            except FileNotFoundError:
                directory.mkdir(parents=True, exist_ok=True)
                continue
            except OSError as err:
                raise StoreError(f"create temporary file: {path}: {reason(err)}", hint_for(err, self._root)) from err
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                return None
            if is_at(fd, path):
                return path, fd
            os.close(fd)  # moved or removed while we waited for it: not ours to resume
        return None

    def _commit(self, blob: BlobWriter, digest: Digest, sync: bool) -> None:
        """Rename the finished temporary file of ``blob`` to its place (dropping it when the blob is there)."""
        path = blob._path
        target = self._layout.blob_path(digest)
        if not blob._owns_path():
            raise StoreError(f"rename temporary blob: {path} is no longer the file this download wrote",
                             hint="another process replaced the partial download; run again")
        try:
            if os.path.exists(target):
                path.unlink()
            else:
                if not target.parent.is_dir():
                    target.parent.mkdir(parents=True, exist_ok=True)
                os.rename(path, target)
                if sync:
                    sync_dir(target.parent, self._root)
                else:
                    with self._unsynced_mutex:
                        self._unsynced.append(target)
        except OSError as err:
            raise StoreError(
                f"rename temporary blob: {path} to {target}: {reason(err)}", hint_for(err, self._root)
            ) from err
        try:
            blob._file.close()  # only now: a partial download's flock covered the rename
        except OSError as err:
            raise StoreError(f"close blob: {target}: {reason(err)}", hint_for(err, self._root)) from err
        blob._digest = digest
        log.debug("stored blob %s (%d bytes)", digest, blob.size)

    @contextmanager
    def temp_dir(self) -> Iterator[Path]:
        """A private directory in ``ocibuild/tmp/`` for the context, removed at its end: held (see
        :func:`create_held`), so only a process that ended without removing it leaves it to :func:`sweep`."""
        path, fd = create_held(self._layout.tmp_dir, "dir", self._root)
        try:
            yield path
        finally:
            remove_tree(path)  # before the close releases the flock
            os.close(fd)

    def sweep(self) -> int:
        """:func:`sweep` of this store's ``ocibuild/tmp/``: bytes freed."""
        return sweep(self._layout.tmp_dir)

    def sync(self) -> None:
        """Make durable every blob committed with ``sync=False``: fsync each, then their directories."""
        with self._unsynced_mutex:
            paths, self._unsynced = self._unsynced, []
        for path in paths:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue  # collected meanwhile
            except OSError as err:
                raise StoreError(f"fsync blob: {path}: {reason(err)}", hint_for(err, self._root)) from err
            try:
                os.fsync(fd)
            except OSError as err:
                raise StoreError(f"fsync blob: {path}: {reason(err)}", hint_for(err, self._root)) from err
            finally:
                os.close(fd)
        for directory in sorted({path.parent for path in paths}):
            sync_dir(directory, self._root)

    def put_file(self, path: Path, *, expected: Digest | None = None) -> tuple[Digest, int]:
        """Copy a file in, streamed and hashed: (digest, size); with ``expected`` already present, nothing is read."""
        if expected is not None and self._layout.has(expected):
            try:
                return expected, self._layout.blob_path(expected).stat().st_size
            except FileNotFoundError:
                pass  # removed meanwhile: copy it
            except OSError as err:
                raise StoreError(f"stat blob {expected}: {reason(err)}", hint_for(err, self._root)) from err
        try:
            source = open(open_regular(path), "rb", buffering=0)
        except OSError as err:
            raise StoreError(f"read {path}: {reason(err)}", hint="check that the file exists and is readable") from err
        with source, self.writer(expected=expected) as blob:
            buffer = bytearray(_COPY_CHUNK)
            view = memoryview(buffer)
            while True:
                try:
                    count = source.readinto(buffer)
                except OSError as err:
                    raise StoreError(f"read {path}: {reason(err)}", hint="check the file and its disk") from err
                if not count:
                    break
                blob.write(view[:count])
        return blob.digest, blob.size

    # ------------------------------------------------------------------------------------------- reading

    def open_blob(self, digest: Digest, *, size: int | None = None) -> BinaryIO:
        """A reader of the blob that raises DigestMismatch at EOF unless the content hashes to ``digest``.

        Only a reader that reaches EOF verifies. With ``size``, a blob of another size fails at once.
        """
        path = self._layout.blob_path(digest)
        try:  # (a blob of an oci: layout a user cloned may be a fifo or a symlink to a device: refused)
            file = io.FileIO(open_regular(path), "rb")
        except FileNotFoundError:
            raise self._not_found(digest) from None
        except OSError as err:
            raise StoreError(f"open blob {digest}: {path}: {reason(err)}", hint_for(err, self._root)) from err
        if size is not None:
            actual = os.fstat(file.fileno()).st_size
            if actual != size:
                file.close()
                raise DigestMismatch(
                    f"blob {digest} is corrupt: {actual} bytes, expected {size}", hint=corrupt_hint(path)
                )
        return io.BufferedReader(_VerifyingReader(file, path, digest, size), buffer_size=_READ_BUFFER)

    def read_blob(self, digest: Digest, *, max_size: int = 16 << 20) -> bytes:
        """The whole content of a small blob, verified."""
        path = self._layout.blob_path(digest)
        try:
            data = read_bounded(path, max_size)
        except FileNotFoundError:
            raise self._not_found(digest) from None
        except TooLarge:
            raise StoreError(f"blob {digest} is more than the {max_size} bytes expected of a manifest or config",
                             hint=corrupt_hint(path)) from None
        except OSError as err:
            raise StoreError(f"read blob {digest}: {path}: {reason(err)}", hint_for(err, self._root)) from err
        actual = Digest(digest.algorithm, hashlib.new(digest.algorithm, data).hexdigest())
        if actual != digest:
            raise DigestMismatch(f"blob {digest} is corrupt (content hashes to {actual})", hint=corrupt_hint(path))
        return data

    def _not_found(self, digest: Digest) -> BlobNotFound:
        return BlobNotFound(
            f"blob {digest} is not in the store {self._root}",
            hint="run `ocibuild verify --repair` (it removes what reaches a missing blob), then build or fetch again",
        )
