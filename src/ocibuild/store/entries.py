"""Cache entries: how a built (or pulled, or imported) layer is recorded in the store. The one place an entry enters.

An entry is an OCI image manifest tagged ``<name>-<64 hex of the key>`` (:func:`cache_tag`) in the store's
index.json, whose layers are the layer blobs and whose config (an image other tools can build on: platform,
``created`` and one history entry per layer) carries ``rootfs.diff_ids`` and the labels
``dev.ocibuild.layer.{name,kind,key,inputs,document,needs}``: ``document`` is the canonical key document (its
sha256 is the key), ``needs`` the names of the needs whose keys it lists, in its order; with them `ocibuild
explain` says what changed since an entry was made (entries made before they were recorded lack both, and
stay valid). A layer is cached exactly when its entry's tag is present. The registry cache holds the same
entries under the same tags, so this format is a contract with other ocibuild installations (and with peers
such as oras, which read them).

Every entry enters through :func:`add_cache_entries` (a build through :func:`put_cache_entry`; pull-cache and
import directly), which makes every check `ocibuild verify` makes of it (:func:`check_entering`: its graph, media
types and sizes, its key label and key document against the key its tag names, one diff_id per layer), and
never re-points a tag: an entry with the same diff_ids (the same layer, perhaps otherwise compressed)
leaves the first in place; one with other diff_ids is an :class:`~ocibuild.errors.EntryConflict` naming both.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import EntryConflict, OcibuildError, StoreError
from ..oci import (OCI_CONFIG, Descriptor, Digest, History, ImageConfig, LayerBlob, Manifest, Platform, canonical_json,
                   oci_layer, timestamp)

if TYPE_CHECKING:  # annotations only: a Protocol class costs start-up time, and a cached build imports this module
    from . import Store

    class _Input(Protocol):
        def to_dict(self) -> Mapping[str, str]: ...

    class _Recipe(Protocol):
        @property
        def kind(self) -> str: ...

        @property
        def needs(self) -> Sequence[str]: ...

    class EntryLayer(Protocol):
        """What an entry records of a planned layer (``planner.LayerPlan`` is one): name, kind, key, inputs, the
        key document, and the needs' names (of its recipe)."""

        @property
        def name(self) -> str: ...

        @property
        def key(self) -> Digest: ...

        @property
        def recipe(self) -> _Recipe: ...

        @property
        def inputs(self) -> Sequence[_Input]: ...

        @property
        def document(self) -> Mapping[str, Any]: ...


LABEL_PREFIX = "dev.ocibuild.layer."  # the entry's config labels: <prefix>{name,kind,key,inputs,document,needs}


def cache_tag(name: str, key: Digest) -> str:
    """The ref name of a layer's cache entry: ``<name>-<64 hex>``, name lowered to [a-z0-9._-], at most 63."""
    lowered = re.sub(r"[^a-z0-9._-]", "-", name.lower())[:63]
    return f"{lowered}-{key.hex}"


_CACHE_TAG = re.compile(r"[a-z0-9._-]{0,63}-([0-9a-f]{64})")


def is_cache_tag(ref_name: str) -> bool:
    """Whether ``ref_name`` has the shape of a cache entry's tag, ``<name>-<64 hex of the key>``."""
    return _CACHE_TAG.fullmatch(ref_name) is not None


def tag_key(ref_name: str) -> Digest | None:
    """The key a cache entry's tag names (``<name>-<64 hex>`` → ``sha256:<hex>``), None for another tag."""
    match = _CACHE_TAG.fullmatch(ref_name)
    return None if match is None else Digest("sha256", match.group(1))


def entry_problems(tag: str, manifest: Manifest, config: ImageConfig) -> list[str]:
    """What is wrong with the entry ``tag`` names (its manifest and config), one line each: its key label is not
    the key of its tag, its key document (when it has one) does not hash to that key, or it has not one diff_id
    per layer. Layer sizes are checked by verify's walk."""
    problems: list[str] = []
    label = config.labels.get(LABEL_PREFIX + "key")
    if label != str(tag_key(tag)):
        problems.append(f"cache entry '{tag}': its key label is {label!r}, its tag names the key {tag_key(tag)}")
    document = _document_key(config)
    if document is not None and document != tag_key(tag):
        problems.append(f"cache entry '{tag}': its key document hashes to {document}, its tag names {tag_key(tag)}")
    if len(config.diff_ids) != len(manifest.layers):
        problems.append(f"cache entry '{tag}': {len(manifest.layers)} layers but {len(config.diff_ids)} diff_ids")
    return problems


def add_cache_entries(store: Store, entries: Mapping[str, Descriptor], *, what: str = "") -> dict[str, Descriptor]:
    """Tag each (cache tag → manifest in the store) after the checks of the module docstring: the descriptor each
    tag names afterwards (the first entry when one was there). All or nothing: a check that fails raises
    StoreError (EntryConflict for a conflict) and tags none of them."""
    where = f"{what}: " if what else ""
    for tag in entries:
        if not is_cache_tag(tag):
            raise StoreError(f"{where}'{tag}' is not the tag of a cache entry (<name>-<64 hex of the key>)")
    check_entering(store, entries, what=what)
    diff_ids = {tag: store.get_config(store.get_manifest(d.digest).config.digest).diff_ids
                for tag, d in entries.items()}
    result: dict[str, Descriptor] = {}
    with store.lock():  # the check and the tagging as one step: of two writers of a key, the first stays
        current = store.index().tags()
        for tag, descriptor in entries.items():
            existing = current.get(tag)
            if existing is None or existing.digest == descriptor.digest:
                continue
            existing_config = store.get_config(store.get_manifest(existing.digest).config.digest)
            if existing_config.diff_ids != diff_ids[tag]:
                raise EntryConflict(
                    f"{where}cache entry {tag}: the store has {existing.digest}, another content for the same key "
                    f"arrived as {descriptor.digest} (kept: {existing.digest})",
                    "two builds of one key made different layers: the layer is not reproducible, or the other "
                    "entry is not genuine; `ocibuild verify` checks the store's",
                )
            result[tag] = existing  # the same layer, otherwise compressed: the first stays
        store.tag_all({tag: d for tag, d in entries.items() if tag not in result})
    return {tag: result.get(tag, descriptor) for tag, descriptor in entries.items()}


def check_entering(store: Store, tags: Mapping[str, Descriptor], *, what: str = "") -> None:
    """StoreError unless each of ``tags`` (name → a manifest or index in the store, from outside: pulled,
    imported) passes every check `ocibuild verify` makes of a tag (:meth:`Store.tag_problems`): nothing enters
    the store that verify would then reject."""
    problems = store.tag_problems(tags)
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise StoreError(f"{what + ': ' if what else ''}{problems[0]}{more}",
                         "nothing was tagged: the source's entry is damaged or not genuine; push it again from a "
                         "store that `ocibuild verify` finds sound, or build the layer here")


def _document_key(config: ImageConfig) -> Digest | None:
    """The key an entry's key document makes (the sha256 of the label's bytes), None when it records none."""
    label = config.labels.get(LABEL_PREFIX + "document")
    return None if label is None else Digest.of(label.encode())


def put_cache_entry(store: Store, layer: EntryLayer, built: Sequence[LayerBlob], *, platform: Platform,
                    epoch: int) -> Descriptor:
    """Record built layers as the cache entry of ``layer`` (see the module docstring) and tag it.

    The entry is an image other tools can build on (``FROM`` it in buildah, run it): its config names
    ``platform``, is created at ``epoch`` and has one history entry per layer (buildah counts them against the
    layers); its layers carry OCI media types (:func:`~ocibuild.oci.oci_layer`). Everything in it comes from the
    key, so one key makes one entry, byte for byte."""
    labels = {
        LABEL_PREFIX + "name": layer.name,
        LABEL_PREFIX + "kind": layer.recipe.kind,
        LABEL_PREFIX + "key": str(layer.key),
        LABEL_PREFIX + "inputs": json.dumps([i.to_dict() for i in layer.inputs], sort_keys=True, separators=(",", ":")),
        LABEL_PREFIX + "document": canonical_json(layer.document).decode(),
        LABEL_PREFIX + "needs": json.dumps(list(layer.recipe.needs), separators=(",", ":")),
    }
    created = timestamp(epoch)
    history = tuple(History(f"ocibuild {layer.recipe.kind} layer '{layer.name}'"
                            + (f" [{i + 1}/{len(built)}]" if len(built) > 1 else ""), created,
                            comment=f"key {layer.key}") for i in range(len(built)))
    config = ImageConfig(diff_ids=tuple(b.diff_id for b in built), architecture=platform.architecture,
                         os=platform.os, variant=platform.variant, labels=labels, history=history, created=created)
    config_descriptor = store.put(config.to_json(), OCI_CONFIG)
    manifest = Manifest(config_descriptor, tuple(oci_layer(b.descriptor) for b in built))
    descriptor = store.put_manifest(manifest)
    tag = cache_tag(layer.name, layer.key)
    return add_cache_entries(store, {tag: descriptor}, what=f"layer '{layer.name}'")[tag]


def entry_tag_pattern(name: str) -> re.Pattern[str]:
    """The tags the cache entries of layer ``name`` can have: ``<name as in cache_tag>-<64 hex>``."""
    return re.compile(re.escape(cache_tag(name, Digest("sha256", "0" * 64))[:-64]) + "[0-9a-f]{64}")


def entries_of(store: Store, name: str) -> list[tuple[str, ImageConfig]]:
    """The cache entries of layer ``name`` in the store (tag, config), in the order they were added: a tag is
    appended to index.json when it arrives (a build, pull-cache or import) and never moved. An entry whose name
    label is another layer's (two names can lower to one tag) is left out."""
    pattern = entry_tag_pattern(name)
    found = []
    for descriptor in store.index().manifests:
        tag = descriptor.ref_name or ""
        if pattern.fullmatch(tag):
            config = store.get_config(store.get_manifest(descriptor.digest).config.digest)
            if config.labels.get(LABEL_PREFIX + "name", name) == name:
                found.append((tag, config))
    return found


def entry_layers(store: Store, layer: EntryLayer) -> list[LayerBlob]:
    """The layers recorded in ``layer``'s cache entry."""
    descriptor = store.resolve(cache_tag(layer.name, layer.key))
    if descriptor is None:
        raise OcibuildError(f"layer '{layer.name}' is not in the store", "run `ocibuild build`")
    manifest = store.get_manifest(descriptor.digest)
    config = store.get_config(manifest.config.digest)
    return [LayerBlob(d, diff) for d, diff in zip(manifest.layers, config.diff_ids)]
