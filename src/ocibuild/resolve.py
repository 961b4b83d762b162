"""Moving inputs resolved into ``ocibuild.lock``: an ``image`` layer's ref (a registry tag, an OCI layout
directory's or an oci-archive's tag) to the digest of its manifest for the image's platform (through an index, when
the ref names one), a ``bootstrap`` suite to the digest of its InRelease.

Cache keys are made from the lock (see :mod:`ocibuild.planner`); ``ocibuild build`` and ``ocibuild lock`` resolve
and write it, ``ocibuild plan`` only reads it. Resolving may reach the network.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from . import oci, registry
from .errors import DigestMismatch, FormatError, LockError, RecipeError, StoreError
from .files import atomic_write, open_regular
from .net.download import fetch_bytes
from .oci import Digest, Platform, Reference
from .recipe.lock import LOCK_FILE, Lock, LockEntry
from .recipe.project import LayerRecipe, Project
from .store import Store


def lock_source(layer: LayerRecipe) -> str | None:
    """What a layer's moving input is resolved from, or None when the layer has no moving input."""
    if layer.kind == "bootstrap":
        return f"{layer.str_('mirror').rstrip('/')}/dists/{layer.str_('suite')}/InRelease"
    if layer.kind == "image":
        return layer.str_("ref")
    return None


def lock_platform(project: Project, layer: LayerRecipe) -> Platform | None:
    """The platform a layer's moving input is resolved for: the image's for an ``image`` ref (it may name an index,
    whose manifest differs per platform), None for a ``bootstrap`` suite (its InRelease covers every architecture).
    A lock entry made for another platform does not hold, as one made for another source does not."""
    return project.image.platform if layer.kind == "image" else None


def resolve_lock(project: Project, lock: Lock, *, refresh: Sequence[str] = (), offline: bool = False,
                 registries: registry.Registries | None = None) -> Lock:
    """``lock`` with an entry for every layer with a moving input; entries are kept unless missing, made for
    another source (the recipe changed) or another platform (``[image] architecture`` changed), or named in
    ``refresh``."""
    resolved = lock.only(project.layer_names)
    for layer in project.layers:
        source = lock_source(layer)
        if source is None:
            continue
        platform = lock_platform(project, layer)
        if resolved.get(layer.name, source, platform) is not None and layer.name not in refresh:
            continue
        if offline and (layer.kind == "bootstrap" or is_registry_ref(source)):
            raise LockError(f"ocibuild.lock has no entry for layer '{layer.name}' "
                            f"({describe_source(source, platform)}) and --offline forbids resolving it",
                            "run `ocibuild lock` on a connected machine and commit ocibuild.lock")
        digest = _resolve(project, layer, source, platform, registries)
        resolved = resolved.with_entry(LockEntry(layer.name, source, digest, platform))
    return resolved


def describe_source(source: str, platform: Platform | None) -> str:
    """A moving input as messages name it: its source, and the platform it is resolved for if any."""
    return source if platform is None else f"{source} for {platform}"


def is_registry_ref(source: str) -> bool:
    return not source.startswith(("oci-archive:", "oci:", "/", "http://", "https://", "file:"))


def _resolve(project: Project, layer: LayerRecipe, source: str, platform: Platform | None,
             registries: registry.Registries | None) -> Digest:
    if layer.kind == "bootstrap":
        return Digest.of(fetch_bytes(source, what=f"layer '{layer.name}'"))
    assert platform is not None  # an image layer's (see lock_platform)
    what = f"layer '{layer.name}': {source}"
    if source.startswith("oci-archive:"):
        path, tag = split_oci_ref(source)
        archive = layer.dir / path
        index = oci.Index.parse(read_oci_archive_file(archive, "index.json", what), f"{what}: index.json")
        return _pick(index, tag, platform, lambda digest: _archive_blob(archive, digest, what), layer, source)
    if source.startswith("oci:"):
        store, tag = open_oci_dir(project.root, layer, source)
        return _pick(store.index(), tag, platform, store.read_blob, layer, source)
    ref = Reference.parse(source)
    client = (registries or registry.Registries()).client(ref.registry)
    return registry.resolve_image(client, ref.repository, str(ref.digest or ref.tag), platform).digest


def _pick(index: oci.Index, tag: str | None, platform: Platform, read_blob: Callable[[Digest], bytes],
          layer: LayerRecipe, source: str) -> Digest:
    """The manifest of a local layout's index.json that ``tag`` names (None: its single image), for ``platform``
    when that is an index (a multi-platform image, as `skopeo copy --all` writes one)."""
    if tag is not None:
        found = index.find(tag)
    else:
        images = [d for d in index.manifests if d.media_type in oci.MANIFEST_TYPES] or \
            [d for d in index.manifests if d.media_type in oci.INDEX_TYPES]
        found = images[0] if len(images) == 1 else None
    if found is not None and found.media_type in oci.INDEX_TYPES:
        nested = oci.Index.parse(read_blob(found.digest), f"layer '{layer.name}': {source}: index {found.digest}")
        chosen = nested.for_platform(platform)
        if chosen is None:
            raise RecipeError(f"layer '{layer.name}': {source}: no image for {platform} (the index offers "
                              f"{', '.join(nested.platforms()) or 'none'})",
                              "set [image] architecture to one the image offers, or pick another image")
        return chosen.digest
    if found is None or found.media_type not in oci.MANIFEST_TYPES:
        tags = ", ".join(sorted(d.ref_name for d in index.manifests if d.ref_name)) or "none"
        raise RecipeError(f"layer '{layer.name}': {source}: no image manifest "
                          f"{'tagged ' + repr(tag) if tag else '(several or none, give a tag)'}",
                          f"tags present: {tags}")
    return found.digest


def write_lock(project: Project, lock: Lock) -> None:
    """Write ``lock`` as the project's ocibuild.lock, unless the file already says the same."""
    path = project.root / LOCK_FILE
    text = lock.to_toml()
    try:
        if path.exists() and path.read_text() == text:
            return
        atomic_write(path, text.encode())
    except OSError as err:
        raise LockError(f"{path}: cannot write: {err.strerror}", "check the project directory is writable") from None


# ---- local image sources ----------------------------------------------------------------------------------------


def split_oci_ref(text: str) -> tuple[str, str | None]:
    """``oci:DIR[:TAG]`` / ``oci-archive:PATH[:TAG]`` → (path, tag or None)."""
    body = text.split(":", 1)[1]
    if ":" in body:
        path, tag = body.rsplit(":", 1)
        return path, tag or None
    return body, None


def open_oci_dir(root: Path, layer: LayerRecipe, ref: str) -> tuple[Store, str | None]:
    """The layout of an ``oci:DIR[:TAG]`` ref and its tag (None: the layout's single manifest, as skopeo reads it)."""
    path, tag = split_oci_ref(ref)
    directory = (layer.dir / path) if not os.path.isabs(path) else Path(path)
    try:
        return Store.open(directory, create=False), tag
    except StoreError as err:
        raise RecipeError(f"layer '{layer.name}': {ref}: {err}", "point ref at an OCI image layout directory") from None


def read_oci_archive_file(path: Path, name: str, what: str) -> bytes:
    """A small file of an oci-archive (index.json, or a blob by its path), read without unpacking the archive."""
    from .tar import read  # only when an archive's ref is resolved: a build with a full lock never reads one

    try:
        f = open(open_regular(path), "rb")
    except OSError as err:
        raise RecipeError(f"{what}: cannot open {path}: {err.strerror}",
                          "fix ref in the layer.toml (paths are relative to the layer folder)") from None
    with f:
        for member, reader in read.iter_members(f, "none", what=what):
            if member.path == name and reader is not None:
                return reader.read(16 << 20)
    raise FormatError(f"{what}: no {name} inside; is it a whole oci-archive?",
                      "make one with `skopeo copy … oci-archive:PATH`")


def _archive_blob(path: Path, digest: Digest, what: str) -> bytes:
    data = read_oci_archive_file(path, f"blobs/{digest.algorithm}/{digest.hex}", what)
    actual = Digest(digest.algorithm, hashlib.new(digest.algorithm, data).hexdigest())
    if actual != digest:
        raise DigestMismatch(f"{what}: blob {digest} is corrupt (content hashes to {actual})", "make the archive again")
    return data
