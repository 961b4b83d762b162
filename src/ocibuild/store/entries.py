"""Cache entries: how a built (or pulled, or imported) layer is recorded in the store. The one place an entry enters.

An entry is an OCI image manifest tagged ``<name>-<64 hex of the key>`` (:func:`cache_tag`) in the store's
index.json, whose layers are the layer blobs and whose config carries ``rootfs.diff_ids`` and the labels
``dev.ocibuild.layer.{name,kind,key,inputs}``. A layer is cached exactly when its entry's tag is present. The
registry cache holds the same entries under the same tags, so this format is a contract with other ocibuild
installations (and with peers such as oras, which read them).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Protocol

from ..errors import OcibuildError
from ..oci import OCI_CONFIG, Descriptor, Digest, ImageConfig, LayerBlob, Manifest

if TYPE_CHECKING:  # annotations only: a Protocol class costs start-up time, and a cached build imports this module
    from . import Store

    class _Input(Protocol):
        def to_dict(self) -> Mapping[str, str]: ...

    class _Recipe(Protocol):
        @property
        def kind(self) -> str: ...

    class EntryLayer(Protocol):
        """What an entry records of a planned layer (``planner.LayerPlan`` is one): name, kind, key and inputs."""

        @property
        def name(self) -> str: ...

        @property
        def key(self) -> Digest: ...

        @property
        def recipe(self) -> _Recipe: ...

        @property
        def inputs(self) -> Sequence[_Input]: ...


LABEL_PREFIX = "dev.ocibuild.layer."  # the entry's config labels: <prefix>{name,kind,key,inputs}


def cache_tag(name: str, key: Digest) -> str:
    """The ref name of a layer's cache entry: ``<name>-<64 hex>``, name lowered to [a-z0-9._-], at most 63."""
    lowered = re.sub(r"[^a-z0-9._-]", "-", name.lower())[:63]
    return f"{lowered}-{key.hex}"


def put_cache_entry(store: Store, layer: EntryLayer, built: Sequence[LayerBlob], *, architecture: str) -> Descriptor:
    """Record built layers as the cache entry of ``layer`` (see the module docstring) and tag it."""
    labels = {
        LABEL_PREFIX + "name": layer.name,
        LABEL_PREFIX + "kind": layer.recipe.kind,
        LABEL_PREFIX + "key": str(layer.key),
        LABEL_PREFIX + "inputs": json.dumps([i.to_dict() for i in layer.inputs], sort_keys=True, separators=(",", ":")),
    }
    config = ImageConfig(diff_ids=tuple(b.diff_id for b in built), architecture=architecture, labels=labels)
    config_descriptor = store.put(config.to_json(), OCI_CONFIG)
    manifest = Manifest(config_descriptor, tuple(b.descriptor for b in built))
    descriptor = store.put_manifest(manifest)
    store.tag(cache_tag(layer.name, layer.key), descriptor)
    return descriptor


def entry_layers(store: Store, layer: EntryLayer) -> list[LayerBlob]:
    """The layers recorded in ``layer``'s cache entry."""
    descriptor = store.resolve(cache_tag(layer.name, layer.key))
    if descriptor is None:
        raise OcibuildError(f"layer '{layer.name}' is not in the store", "run `ocibuild build`")
    manifest = store.get_manifest(descriptor.digest)
    config = store.get_config(manifest.config.digest)
    return [LayerBlob(d, diff) for d, diff in zip(manifest.layers, config.diff_ids)]
