"""The local store: an OCI image layout on disk.

::

    <root>/oci-layout                {"imageLayoutVersion":"1.0.0"}
    <root>/index.json                the tags: descriptors annotated with org.opencontainers.image.ref.name
    <root>/blobs/sha256/<hex>        content-addressed blobs (manifests, configs, layers)
    <root>/ocibuild/                 ours alone; other OCI tools ignore it
        tmp/                         blobs being written, scratch directories (:meth:`Store.temp_dir`), partial
                                     downloads; what a killed process left is removed by the next open
        lock                         flock: index.json read-modify-write, gc
        lease                        flock: shared by writers and lease holders, exclusive for gc
        <name>/                      caches other modules keep (:meth:`Store.private_dir`)

Users hold one :class:`Store`; it hands each call to one of three parts:

- :mod:`.layout`: opening (and creating) the layout, index.json and tags, the lock and the lease;
- :mod:`.content`: blobs written to a temporary file, hashed, fsynced, checked, renamed into place and the
  directory fsynced (as umoci and containerd do), partial downloads resumed, blobs read verified;
- :mod:`.scratch`: temporary files held under a flock while in use, and the sweep of those a killed process left;
- :mod:`.maintenance`: the reachability walk from index.json, verify and gc;
- :mod:`.repair`: removing what verify rejects (`ocibuild verify --repair`).

:mod:`.entries` is the cache-entry format: the one place a built layer is recorded in the store.

A blob in ``blobs/`` is complete: its presence is trusted (:meth:`Store.has`) and its content verified as it is
read (:meth:`Store.open_blob`). index.json and oci-layout are replaced whole with ``files.atomic_write``.

Concurrency: index.json changes are serialised by an exclusive flock (:meth:`Store.lock`), so concurrent tagging
never loses a tag. :meth:`Store.gc` deletes blobs no tag reaches, which would race with a build that has written
blobs but not tagged them yet; a build therefore holds :meth:`Store.lease` (a shared flock) from its first blob to
its tag, and gc waits until no lease is held. Every :meth:`Store.writer` holds a lease while it writes.

Errors: :class:`StoreError` names the path and the step that failed; :class:`BlobNotFound` for a blob that must
exist; :class:`DigestMismatch` for content that does not hash to its name (or size).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from ..errors import FormatError
from ..oci import CONFIG_TYPES, MANIFEST_TYPES, Descriptor, Digest, ImageConfig, Index, Manifest
from .content import BlobWriter, Content
from .layout import Layout, check_ref_name

if TYPE_CHECKING:  # .repair is imported where it is used, as .maintenance is
    from .repair import Removal

__all__ = ["BlobWriter", "Store", "check_ref_name"]


class Store:
    """An OCI image layout at ``root`` with ocibuild's private directory; see the module docstring."""

    root: Path

    def __init__(self, layout: Layout) -> None:
        """Use :meth:`open`, which checks and creates the layout."""
        self.root = layout.root
        self._layout = layout
        self._content = Content(layout)

    def __repr__(self) -> str:
        return f"Store({str(self.root)!r})"

    @classmethod
    def open(cls, root: Path, *, create: bool = True) -> Store:
        """Open the layout at ``root``, creating it (and parents) when missing or an empty directory.

        Without ``create`` nothing is written, so a read-only layout (an import source) can be read. With it, the
        temporary files of processes that ended without removing them (killed) are removed (:meth:`Content.sweep`).
        """
        store = cls(Layout.open(root, create=create))
        if create:
            store._content.sweep()
        return store

    # ---------------------------------------------------------------------------------------------- blobs

    def blob_path(self, digest: Digest) -> Path:
        return self._layout.blob_path(digest)

    def has(self, digest: Digest) -> bool:
        return self._layout.has(digest)

    def blobs(self) -> Iterator[Digest]:
        """The digest of every blob file present (presence trusted, as :meth:`has` does; nothing is hashed)."""
        for _, digest in self._layout.blob_files():
            if digest is not None:
                yield digest

    def writer(
        self, *, expected: Digest | None = None, size: int | None = None, sync: bool = True,
        resumable: bool = False,
    ) -> AbstractContextManager[BlobWriter]:
        """Stream a blob in; it is committed when the with-block ends normally, discarded when it raises.

        ``expected`` and ``size``, when given, are checked before the blob is committed (DigestMismatch, nothing
        committed). ``sync=False`` skips the fsyncs; the caller then calls :meth:`sync` once after a batch.
        ``resumable`` (with ``expected``): a download, whose partial file survives a failure for the next run;
        see :meth:`.content.Content.writer`.
        """
        return self._content.writer(expected=expected, size=size, sync=sync, resumable=resumable)

    def sync(self) -> None:
        """Make durable every blob this Store committed with ``sync=False``: fsync each, then their directories."""
        self._content.sync()

    def put(self, data: bytes, media_type: str, *, annotations: Mapping[str, str] | None = None) -> Descriptor:
        """Store a small blob held in memory (a manifest, a config)."""
        digest = Digest.of(data)
        if not self.has(digest):
            with self.writer(expected=digest, size=len(data)) as blob:
                blob.write(data)
        return Descriptor(media_type, digest, len(data), dict(annotations or {}))

    def put_file(self, path: Path, media_type: str, *, expected: Digest | None = None) -> Descriptor:
        """Copy a file into the store, streamed and hashed; with ``expected`` already present, nothing is read."""
        digest, size = self._content.put_file(path, expected=expected)
        return Descriptor(media_type, digest, size)

    def open_blob(self, digest: Digest, *, size: int | None = None) -> BinaryIO:
        """A reader of the blob that raises DigestMismatch at EOF unless the content hashes to ``digest``.

        Only a reader that reaches EOF verifies. With ``size``, a blob of another size fails at once.
        """
        return self._content.open_blob(digest, size=size)

    def read_blob(self, digest: Digest, *, max_size: int = 16 << 20) -> bytes:
        """The whole content of a small blob, verified."""
        return self._content.read_blob(digest, max_size=max_size)

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
        return self._layout.index()

    def resolve(self, ref_name: str) -> Descriptor | None:
        return self._layout.resolve(ref_name)

    def tag(self, ref_name: str, descriptor: Descriptor) -> None:
        """Point ``ref_name`` at ``descriptor`` (a manifest or index already in the store); an image manifest is
        listed with its platform (see :meth:`with_platform`)."""
        self._layout.tag(ref_name, self.with_platform(descriptor))

    def tag_all(self, tags: Mapping[str, Descriptor]) -> None:
        """Point every name of ``tags`` at its descriptor (each already in the store), in one index.json update."""
        self._layout.tag_all({name: self.with_platform(d) for name, d in tags.items()})

    def with_platform(self, descriptor: Descriptor) -> Descriptor:
        """``descriptor`` with the platform (os, architecture, variant) of its image config when it names an image
        manifest and carries none: index.json lists it so, as image-layout.md asks and as skopeo and containerd
        write theirs. Artifacts (no image config) and indexes stay as they are."""
        if descriptor.platform is not None or descriptor.media_type not in MANIFEST_TYPES or \
                not self.has(descriptor.digest):
            return descriptor
        try:
            config = self.get_manifest(descriptor.digest).config
            platform = self.get_config(config.digest).platform if config.media_type in CONFIG_TYPES else None
        except FormatError:  # not what the descriptor says it is: tagged as given, and `verify` reports it
            return descriptor
        return descriptor if platform is None else replace(descriptor, platform=platform)

    def untag(self, ref_name: str) -> bool:
        """Remove ``ref_name``; False when there was no such tag."""
        return self._layout.untag(ref_name)

    def update_index(self, change: Callable[[Index], Index]) -> Index:
        """Read index.json, apply ``change``, write the result atomically; all under :meth:`lock`."""
        return self._layout.update_index(change)

    # ------------------------------------------------------------------------------------------- locking

    def lock(self) -> AbstractContextManager[None]:
        """Exclusive store lock (flock on ``ocibuild/lock``) for index.json changes and gc; re-entrant per Store."""
        return self._layout.locks.lock()

    def lease(self) -> AbstractContextManager[None]:
        """Keep gc away while held (a shared flock on ``ocibuild/lease``); re-entrant, shared by threads.

        Hold it from the first blob a build writes until the build's manifest is tagged: blobs nothing tags yet
        are otherwise fair game for a concurrent :meth:`gc`.
        """
        return self._layout.locks.lease()

    # ------------------------------------------------------------------------------ reachability, verify, gc
    # .maintenance is imported where it is used: a build that finds every layer cached never needs it.

    def reachable(self) -> set[Digest]:
        """Every digest index.json reaches (manifests, nested indexes, configs, layers), present or not.

        Raises StoreError when index.json, or a manifest or index it reaches, cannot be read.
        """
        from . import maintenance

        return maintenance.reachable(self._layout, self._content)

    def verify(self, *, unreachable: bool = False) -> list[str]:
        """Problems found, one line each (empty when the store is sound); see :func:`.maintenance.verify`.

        With ``unreachable``, blobs no tag reaches count as problems too.
        """
        from . import maintenance

        return maintenance.verify(self._layout, self._content, unreachable=unreachable)

    def tag_problems(self, tags: Mapping[str, Descriptor]) -> list[str]:
        """What :meth:`verify` would report about ``tags`` (name → descriptor in the store) were they tagged: the
        check of what comes from outside before it is tagged; see :func:`.maintenance.tag_problems`."""
        from . import maintenance

        return maintenance.tag_problems(self._layout, self._content, tags)

    def repair(self) -> list[Removal]:
        """Remove what :meth:`verify` rejects (damaged blobs, then the tags that reach a problem), until it finds the
        store sound: what was removed; see :func:`.repair.repair`."""
        from . import repair

        return repair.repair(self._layout, self._content)

    def gc(self, *, wait: bool = True) -> tuple[int, int]:
        """Delete blobs index.json does not reach and leftover temporary files; (blobs removed, bytes freed).

        Waits for every lease (running builds, writers) to end, or with ``wait=False`` raises StoreError when
        one is held. Refuses (StoreError) when a tagged manifest or index cannot be read.
        """
        from . import maintenance

        return maintenance.gc(self._layout, self._content, wait=wait)

    def temp_dir(self) -> AbstractContextManager[Path]:
        """A private scratch directory in ``ocibuild/tmp/`` for the with-block, removed at its end; if the process
        is killed meanwhile, the next ocibuild that opens the store removes it."""
        return self._content.temp_dir()

    def private_dir(self, name: str) -> Path:
        """``<root>/ocibuild/<name>``, created: a place for caches other modules keep. gc and verify ignore it."""
        return self._layout.private_dir(name)
