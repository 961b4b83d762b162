"""The files of the layout: oci-layout, index.json and its tags, where blobs live, and the two locks.

Opening checks the layout (and creates it, or completes what ocibuild needs, when asked to); index.json is changed
only by a read-modify-write under the exclusive :meth:`Locks.lock`, written with ``files.atomic_write``. A lease
(:meth:`Locks.lease`) is the shared side of a second flock that gc takes exclusively. See the package docstring.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import stat
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path

from ..errors import BlobNotFound, FormatError, StoreError
from ..files import atomic_write, read_bounded
from ..oci import OCI_LAYOUT_VERSION, Descriptor, Digest, Index, canonical_json, parse_json

log = logging.getLogger(__name__)

PRIVATE = "ocibuild"  # <root>/ocibuild/: ours alone; other OCI tools ignore it
_RESERVED = frozenset({"lock", "lease"})
STORE_HINT = "use another store with --store or OCIBUILD_STORE"
_REF_COMPONENT = r"[A-Za-z0-9]+(?:(?:[-._:@+]|--)[A-Za-z0-9]+)*"
_REF_NAME = re.compile(rf"{_REF_COMPONENT}(?:/{_REF_COMPONENT})*")  # the OCI image layout's ref.name grammar
# files.atomic_write's temporary files beside the target: .<name>.<pid>.<random>.tmp
LAYOUT_LEFTOVERS = ".oci-layout.*.tmp"  # of an interrupted creation (written without the lock)
INDEX_LEFTOVERS = ".index.json.*.tmp"  # of an interrupted index.json update (written under the lock)
FILE_MODE = 0o666  # as open(2) creates files: the umask decides
INDEX_LIMIT = 256 << 20  # index.json: a million tags, and not more than a process should parse


def reason(err: OSError) -> str:
    return err.strerror or str(err)


def hint_for(err: OSError, root: Path) -> str:
    """What to do about an OSError met in the store at ``root``."""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"free disk space (`ocibuild gc` removes unused blobs), or {STORE_HINT}"
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"check the permissions of {root}, or {STORE_HINT}"
    return f"check {root}, or {STORE_HINT}"


def check_ref_name(ref_name: str) -> None:
    """FormatError unless ``ref_name`` is a valid tag name of an OCI image layout."""
    if not _REF_NAME.fullmatch(ref_name):
        raise FormatError(
            f"'{ref_name}' is not a valid tag name",
            hint="use letters, digits and . _ - : @ + separators, optionally in /-separated components",
        )


class Layout:
    """The OCI image layout at ``root``: its files, its tags and its locks."""

    root: Path
    locks: Locks

    def __init__(self, root: Path) -> None:
        """Use :meth:`open`, which checks and creates the layout."""
        self.root = root
        self.locks = Locks(root)

    # ----------------------------------------------------------------------------------------------- opening

    @classmethod
    def open(cls, root: Path, *, create: bool) -> Layout:
        """Open the layout at ``root``, with ``create`` creating it (and parents) when missing or an empty
        directory, and adding what ocibuild needs to an existing one.

        Processes creating one store at once meet under a flock of the directory (:meth:`_creation`): the first
        creates it, the others then find a layout, never a half-made one they would take for a foreign directory.
        """
        root = Path(os.path.abspath(root))
        layout = cls(root)
        if layout._is_layout():
            layout._check(prepare=create)
            return layout
        if not create:
            layout._refuse_foreign()
            raise StoreError(
                f"no store at {root}",
                hint=f"build or import an image first, or point to an existing store: {STORE_HINT}",
            )
        with layout._creation():
            if not layout._is_layout():
                layout._refuse_foreign()
                layout._create()
        layout._check(prepare=True)
        return layout

    def _is_layout(self) -> bool:
        """Whether ``root`` holds an oci-layout file (False when it is missing or a directory without one)."""
        try:
            if not stat.S_ISDIR(os.stat(self.root).st_mode):
                raise StoreError(f"store {self.root} is not a directory", hint=f"remove it, or {STORE_HINT}")
            return os.path.lexists(self.root / "oci-layout")
        except FileNotFoundError:
            return False
        except OSError as err:
            raise StoreError(f"open store: {self.root}: {reason(err)}", hint_for(err, self.root)) from err

    def _refuse_foreign(self) -> None:
        """StoreError when ``root`` holds entries that are not ours (it is not a new or empty directory)."""
        try:
            entries = sorted(name for name in os.listdir(self.root) if not _ours(name))
        except FileNotFoundError:
            return
        except OSError as err:
            raise StoreError(f"open store: {self.root}: {reason(err)}", hint_for(err, self.root)) from err
        if entries and not self._is_layout():  # one made meanwhile by a process that did not take our flock
            raise StoreError(
                f"{self.root} is neither an empty directory nor an OCI image layout (no oci-layout file)",
                hint=f"choose a new or empty directory: {STORE_HINT}",
            )

    @contextmanager
    def _creation(self) -> Iterator[None]:
        """``root`` made (with its parents) and held under an exclusive flock of the directory itself, so that of
        processes creating the store at once one creates it and the others open it. A file system without flock
        on directories creates without it (as before: a rare race there)."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as err:
            raise StoreError(f"create store: {self.root}: {reason(err)}", hint_for(err, self.root)) from err
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError as err:
                log.debug("creating %s without a lock: %s", self.root, reason(err))
            yield
        finally:
            os.close(fd)

    def _create(self) -> None:
        log.info("creating store %s", self.root)
        try:
            self.tmp_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise StoreError(f"create store: {self.root}: {reason(err)}", hint_for(err, self.root)) from err
        try:
            atomic_write(self.root / "oci-layout", canonical_json({"imageLayoutVersion": OCI_LAYOUT_VERSION}),
                         mode=FILE_MODE)
        except OSError as err:
            raise StoreError(f"write oci-layout: {self.root}: {reason(err)}", hint_for(err, self.root)) from err

    def _check(self, *, prepare: bool) -> None:
        """Check the layout; with ``prepare``, also add what ocibuild needs and check that it is writable.

        Without it nothing is written, so a read-only layout (an import source) can be read.
        """
        layout = self.root / "oci-layout"
        try:
            value = parse_json(read_bounded(layout, 4096), "it", limit=4096)
        except OSError as err:
            raise StoreError(f"{layout} is not a valid oci-layout file: {reason(err)}", hint=STORE_HINT) from err
        except FormatError as err:
            raise StoreError(f"{layout} is not a valid oci-layout file: {err}", hint=STORE_HINT) from err
        if not isinstance(value, dict) or value.get("imageLayoutVersion") != OCI_LAYOUT_VERSION:
            raise StoreError(
                f"{layout}: unsupported imageLayoutVersion (expected {OCI_LAYOUT_VERSION})", hint=STORE_HINT
            )
        if not prepare:
            if not (self.root / "index.json").is_file():
                raise StoreError(f"{self.root / 'index.json'} is missing", hint="is this a complete OCI image layout?")
            return
        try:
            for directory in (self.root / "blobs" / "sha256", self.tmp_dir):
                directory.mkdir(parents=True, exist_ok=True)
            writable = os.access(self.root, os.W_OK) and os.access(self.tmp_dir, os.W_OK)
        except OSError as err:
            raise StoreError(f"prepare store: {self.root}: {reason(err)}", hint_for(err, self.root)) from err
        if not writable:
            raise StoreError(f"store {self.root} is not writable", hint=f"check its permissions, or {STORE_HINT}")
        if not (self.root / "index.json").exists():
            with self.locks.lock():
                if not (self.root / "index.json").exists():
                    if any(self.blob_files()):
                        raise StoreError(
                            f"{self.root / 'index.json'} is missing but the store holds blobs",
                            hint="restore index.json from a backup, or start a new store with --store",
                        )
                    self.write_index(Index(()))

    # ------------------------------------------------------------------------------------------------ paths

    @property
    def tmp_dir(self) -> Path:
        """``<root>/ocibuild/tmp``: blobs being written, other modules' temporary files (gc removes leftovers)."""
        return self.root / PRIVATE / "tmp"

    def blob_path(self, digest: Digest) -> Path:
        return self.root / "blobs" / digest.algorithm / digest.hex

    def has(self, digest: Digest) -> bool:
        return os.path.exists(self.blob_path(digest))

    def blob_files(self) -> Iterator[tuple[Path, Digest | None]]:
        """Every file under blobs/ with its digest (None when its name is not one)."""
        for directory in self._algorithm_dirs():
            try:
                names = sorted(os.listdir(directory))
            except OSError as err:
                raise StoreError(f"list blobs: {directory}: {reason(err)}", hint_for(err, self.root)) from err
            for name in names:
                try:
                    digest: Digest | None = Digest.parse(f"{directory.name}:{name}")
                except FormatError:
                    digest = None
                yield directory / name, digest

    def _algorithm_dirs(self) -> list[Path]:
        blobs = self.root / "blobs"
        try:
            return sorted(entry for entry in blobs.iterdir() if entry.is_dir())
        except FileNotFoundError:
            return []
        except OSError as err:
            raise StoreError(f"list blobs: {blobs}: {reason(err)}", hint_for(err, self.root)) from err

    def private_dir(self, name: str) -> Path:
        """``<root>/ocibuild/<name>``, created: a place for caches other modules keep. gc and verify ignore it."""
        if not name or name in (".", "..") or "/" in name or "\0" in name or name in _RESERVED:
            raise ValueError(f"'{name}' is not a usable private directory name")
        path = self.root / PRIVATE / name
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise StoreError(f"create directory: {path}: {reason(err)}", hint_for(err, self.root)) from err
        return path

    # ------------------------------------------------------------------------------------- index.json, tags

    def index(self) -> Index:
        path = self.root / "index.json"
        try:
            data = read_bounded(path, INDEX_LIMIT)
        except OSError as err:
            raise StoreError(f"read index.json: {path}: {reason(err)}", hint_for(err, self.root)) from err
        try:
            return Index.parse(data, str(path))
        except FormatError as err:
            raise StoreError(
                str(err), hint="restore index.json from a backup, or start a new store with --store"
            ) from err

    def update_index(self, change: Callable[[Index], Index]) -> Index:
        """Read index.json, apply ``change``, write the result atomically; all under :meth:`Locks.lock`."""
        with self.locks.lock():
            current = self.index()
            updated = change(current)
            if updated != current:
                self.write_index(updated)
            return updated

    def write_index(self, index: Index) -> None:
        """Replace index.json (atomically); callers hold :meth:`Locks.lock`."""
        path = self.root / "index.json"
        try:
            atomic_write(path, index.to_json(), mode=FILE_MODE)
        except OSError as err:
            raise StoreError(f"write index.json: {path}: {reason(err)}", hint_for(err, self.root)) from err

    def resolve(self, ref_name: str) -> Descriptor | None:
        return self.index().find(ref_name)

    def tag(self, ref_name: str, descriptor: Descriptor) -> None:
        """Point ``ref_name`` at ``descriptor`` (a manifest or index already in the store)."""
        self._check_taggable(ref_name, descriptor)
        self.update_index(lambda index: index.with_tag(ref_name, descriptor))
        log.debug("tagged %s -> %s", ref_name, descriptor.digest)

    def tag_all(self, tags: Mapping[str, Descriptor]) -> None:
        """Point every name of ``tags`` at its descriptor (each already in the store), in one index.json update."""
        for ref_name, descriptor in tags.items():
            self._check_taggable(ref_name, descriptor)

        if tags:
            self.update_index(lambda index: index.with_tags(tags))

    def _check_taggable(self, ref_name: str, descriptor: Descriptor) -> None:
        check_ref_name(ref_name)
        if not self.has(descriptor.digest):
            raise BlobNotFound(
                f"cannot tag '{ref_name}': {descriptor.digest} is not in the store",
                hint="store the manifest before tagging it",
            )

    def untag(self, ref_name: str) -> bool:
        """Remove ``ref_name``; False when there was no such tag."""
        found = False

        def change(index: Index) -> Index:
            nonlocal found
            found = index.find(ref_name) is not None
            return index.without_tag(ref_name)

        self.update_index(change)
        return found


def _ours(name: str) -> bool:
    """Whether an entry of the layout's root is ocibuild's own (not content of a foreign directory)."""
    return name == PRIVATE or Path(name).match(LAYOUT_LEFTOVERS)


class Locks:
    """The store's two flocks in ``<root>/ocibuild/``, each re-entrant within one Store.

    ``lock`` is exclusive: index.json read-modify-write, and gc. ``lease`` is shared by blob writers and builds
    (from their first blob until their tag) and taken exclusively by gc, which therefore waits until no blob is
    being written that nothing tags yet.
    """

    def __init__(self, root: Path) -> None:
        self._root = root
        self._lock_mutex = threading.RLock()
        self._lock_depth = 0
        self._lock_fd: int | None = None
        self._lease_mutex = threading.Lock()
        self._lease_count = 0
        self._lease_fd: int | None = None

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive store lock (flock on ``ocibuild/lock``) for index.json changes and gc; re-entrant per Store."""
        with self._lock_mutex:
            if self._lock_depth == 0:
                fd = self._open("lock")
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
        are otherwise fair game for a concurrent gc.
        """
        with self._lease_mutex:
            if self._lease_count == 0:
                fd = self._open("lease")
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
    def exclusive_lease(self, wait: bool) -> Iterator[None]:
        """The lease taken exclusively (for gc): no writer or build holds one meanwhile."""
        with self._lease_mutex:
            if self._lease_count:
                raise StoreError(
                    f"gc of {self._root} cannot run while this process holds a lease or writes a blob",
                    hint="run gc after the build has tagged its image",
                )
            fd = self._open("lease")
            try:
                self._flock(fd, fcntl.LOCK_EX, "lease", wait=wait)
            except BlockingIOError:
                raise StoreError(
                    f"store {self._root} is in use by another ocibuild process (a build, import or fetch)",
                    hint="run gc again when it has finished",
                ) from None
            try:
                yield
            finally:
                os.close(fd)

    @contextmanager
    def lease_if_writable(self) -> Iterator[None]:
        """A lease, unless the store is read-only (an import source): then nothing can gc it meanwhile."""
        with ExitStack() as stack:
            try:
                stack.enter_context(self.lease())
            except StoreError as err:
                cause = err.__cause__
                if not isinstance(cause, OSError) or cause.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
                    raise
                log.debug("reading %s without a lease: %s", self._root, err)
            yield

    def _open(self, name: str) -> int:
        path = self._root / PRIVATE / name
        try:
            return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
        except FileNotFoundError:
            path.parent.mkdir(parents=True, exist_ok=True)
            return self._open(name)
        except OSError as err:
            raise StoreError(f"open lock file: {path}: {reason(err)}", hint_for(err, self._root)) from err

    def _flock(self, fd: int, operation: int, name: str, *, wait: bool = True) -> None:
        """flock ``fd`` (closing it on failure); BlockingIOError when busy and not ``wait``."""
        path = self._root / PRIVATE / name
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
                raise StoreError(f"lock {path}: {reason(err)}", hint_for(err, self._root)) from err
            raise
