"""Operations on whole images, on any :class:`Distribution` (:class:`.client.Client`, or a fake in tests): push
manifests with their config and layers, find and fetch them into the store, resolve a tag for a platform.
Where ocibuild has seen each blob is remembered in the store (:class:`_Locations`), the sources of mounts.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from ..errors import RegistryError
from ..oci import INDEX_TYPES, MANIFEST_TYPES, Descriptor, Digest, Index, Manifest, Platform
from ..store import Store
from ..threads import parallel_map

log = logging.getLogger(__name__)

DEFAULT_JOBS = 4
_PIECE = 1 << 20  # blobs larger than one piece of a blob stream are reported as they move


class Distribution(Protocol):
    """The distribution API of one registry, as the functions on whole images use it (:class:`.client.Client`, or
    a fake in tests)."""

    @property
    def registry(self) -> str: ...

    def resolve(self, repository: str, reference: str) -> Descriptor | None: ...

    def fetch_manifest(self, repository: str, reference: str) -> tuple[bytes, str, Digest]: ...

    def push_manifest(self, repository: str, reference: str, data: bytes, media_type: str) -> Digest: ...

    def fetch_blob(self, repository: str, descriptor: Descriptor, store: Store) -> str: ...

    def push_blob(self, repository: str, descriptor: Descriptor, store: Store,
                  mount_from: Sequence[str] = ()) -> str: ...


class _Locations:
    """Which repositories of a registry ocibuild has seen each blob in, kept in the store's private area; the
    sources of cross-repository mounts."""

    def __init__(self, store: Store, registry: str) -> None:
        self._dir = store.private_dir("registry") / re.sub(r"[^A-Za-z0-9._-]", "_", registry)

    def get(self, digest: Digest) -> list[str]:
        try:
            return list(dict.fromkeys((self._dir / digest.hex).read_text().split()))
        except OSError:
            return []

    def add(self, digest: Digest, repository: str) -> None:
        if repository in self.get(digest):
            return
        try:
            self._dir.mkdir(parents=True, exist_ok=True)
            with open(self._dir / digest.hex, "a") as file:
                file.write(repository + "\n")
        except OSError as err:
            log.debug("cannot record where blob %s is: %s", digest.short, err.strerror)


def push_manifests(client: Distribution, store: Store, repository: str, tagged: Sequence[tuple[str, Descriptor]], *,
                   jobs: int = DEFAULT_JOBS, output: Callable[[str], None] = lambda line: None,
                   immutable: bool = False) -> dict[str, str]:
    """Push each (tag, manifest in the store) with its config and layers: tag → "present" (the registry already
    has that manifest under that tag: nothing moves) or "pushed".

    ``immutable`` (cache entries): a tag the registry already has is never moved, whatever manifest it names
    (another compression of the same layer, or another runner's entry that won a race): it is "present". The
    registry is asked again just before each manifest goes up, so a runner that lost a race reports "present"
    rather than re-pointing the winner's tag (a registry offers no compare-and-set: two PUTs of one tag in the
    same instant remain the registry's to order)."""
    locations = _Locations(store, client.registry)
    remote = parallel_map(lambda item: client.resolve(repository, item[0]), list(tagged), jobs=jobs,
                          name="ocibuild-transfer")

    def present(descriptor: Descriptor, found: Descriptor | None) -> bool:
        return found is not None and (immutable or found.digest == descriptor.digest)

    todo = [(tag, d) for (tag, d), found in zip(tagged, remote) if not present(d, found)]
    result = {tag: "present" for (tag, d), found in zip(tagged, remote) if present(d, found)}
    blobs: dict[Digest, Descriptor] = {}
    manifests: list[tuple[str, bytes, str]] = []
    for tag, descriptor in todo:
        data = store.read_blob(descriptor.digest)
        manifest = Manifest.parse(data, f"manifest {descriptor.digest}")
        for blob in (manifest.config, *manifest.layers):
            blobs.setdefault(blob.digest, blob)
        manifests.append((tag, data, manifest.media_type))

    def push(blob: Descriptor) -> None:
        how = client.push_blob(repository, blob, store, locations.get(blob.digest))
        locations.add(blob.digest, repository)
        if how != "present" and blob.size > _PIECE:
            output(f"{how} blob {blob.digest.short} ({blob.size / 1e6:.1f} MB)")

    ordered = sorted(blobs.values(), key=lambda b: -b.size)  # big ones first: the pool drains evenly
    parallel_map(push, ordered, jobs=jobs, name="ocibuild-transfer")

    def push_manifest(item: tuple[str, bytes, str]) -> str:
        tag, data, media_type = item
        if immutable and client.resolve(repository, tag) is not None:
            return "present"  # another runner's entry arrived meanwhile: it stays
        client.push_manifest(repository, tag, data, media_type)
        return "pushed"

    outcomes = parallel_map(push_manifest, manifests, jobs=jobs, name="ocibuild-transfer")
    result.update({tag: how for (tag, _, _), how in zip(manifests, outcomes)})
    return result


def select_platform(index: Index, platform: Platform, what: str) -> Descriptor:
    """The manifest of ``index`` for ``platform`` (os/architecture[/variant])."""
    found = index.for_platform(platform)
    if found is None:
        offered = ", ".join(index.platforms()) or "none"
        raise RegistryError(f"{what}: no image for {platform} (the index offers {offered})",
                            "set [image] architecture to one the image offers, or pick another image")
    return found


def resolve_image(client: Distribution, repository: str, reference: str, platform: Platform) -> Descriptor:
    """The digest of the image manifest a tag (or digest) means for ``platform``: an index is resolved."""
    data, media_type, digest = client.fetch_manifest(repository, reference)
    what = f"{client.registry}/{repository}:{reference}"
    if media_type in INDEX_TYPES:
        return select_platform(Index.parse(data, what), platform, what)
    if media_type not in MANIFEST_TYPES:
        raise RegistryError(f"{what}: '{media_type}' is neither an image manifest nor an index")
    return Descriptor(media_type, digest, len(data))


@dataclass(frozen=True)
class FetchedManifest:
    """An image manifest fetched from a registry (not stored yet): its descriptor, exact bytes and parsed form."""

    descriptor: Descriptor
    data: bytes
    manifest: Manifest


def find_manifests(client: Distribution, repository: str, references: Sequence[str], *,
                   jobs: int = DEFAULT_JOBS) -> dict[str, FetchedManifest | None]:
    """Fetch (not store) the manifests of ``references`` that exist; None for those that do not."""

    def one(reference: str) -> FetchedManifest | None:
        if client.resolve(repository, reference) is None:
            return None
        data, media_type, digest = client.fetch_manifest(repository, reference)
        if media_type not in MANIFEST_TYPES:
            raise RegistryError(f"{client.registry}/{repository}:{reference} is not an image manifest "
                                f"({media_type})", code="MANIFEST_INVALID")
        manifest = Manifest.parse(data, f"{client.registry}/{repository}:{reference}")
        return FetchedManifest(Descriptor(media_type, digest, len(data)), data, manifest)

    return dict(zip(references, parallel_map(one, list(references), jobs=jobs, name="ocibuild-transfer")))


def missing_bytes(store: Store, fetched: Iterable[FetchedManifest]) -> int:
    """The bytes of the blobs of these manifests that the store lacks."""
    seen: dict[Digest, int] = {}
    for entry in fetched:
        for blob in (entry.manifest.config, *entry.manifest.layers):
            if not store.has(blob.digest):
                seen[blob.digest] = blob.size
    return sum(seen.values())


def fetch_manifests(client: Distribution, store: Store, repository: str, fetched: Mapping[str, FetchedManifest], *,
                    jobs: int = DEFAULT_JOBS, tag: bool = True,
                    output: Callable[[str], None] = lambda line: None) -> dict[str, Descriptor]:
    """Fetch the blobs of each fetched manifest into the store (verified), store the manifest, and (``tag``) tag it
    under the same name. Holds a store lease, so gc cannot take the blobs before they are tagged."""
    locations = _Locations(store, client.registry)
    blobs: dict[Digest, Descriptor] = {}
    for entry in fetched.values():
        for blob in (entry.manifest.config, *entry.manifest.layers):
            blobs.setdefault(blob.digest, blob)

    def fetch(blob: Descriptor) -> None:
        how = client.fetch_blob(repository, blob, store)
        locations.add(blob.digest, repository)
        if how == "fetched" and blob.size > _PIECE:
            output(f"fetched blob {blob.digest.short} ({blob.size / 1e6:.1f} MB)")

    result = {}
    with store.lease():
        parallel_map(fetch, sorted(blobs.values(), key=lambda b: -b.size), jobs=jobs, name="ocibuild-transfer")
        for name, entry in fetched.items():
            stored = store.put(entry.data, entry.descriptor.media_type)
            if tag:
                store.tag(name, stored)
            result[name] = stored
    return result


def fetch_image(client: Distribution, store: Store, repository: str, digest: Digest, *,
                jobs: int = DEFAULT_JOBS) -> Manifest:
    """An image manifest by digest with its config and layers into the store (not tagged)."""
    data, media_type, actual = client.fetch_manifest(repository, str(digest))
    what = f"{client.registry}/{repository}@{digest}"
    if media_type not in MANIFEST_TYPES:
        raise RegistryError(f"{what} is not an image manifest ({media_type})", code="MANIFEST_INVALID")
    manifest = Manifest.parse(data, what)
    fetched = FetchedManifest(Descriptor(media_type, actual, len(data)), data, manifest)
    fetch_manifests(client, store, repository, {str(digest): fetched}, jobs=jobs, tag=False)
    return manifest
