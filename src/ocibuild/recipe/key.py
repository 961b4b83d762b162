"""A layer's cache key: the one canonical key document, hashed.

What enters a layer's cache key (:func:`cache_key`), and nothing else:

- ``format``: :data:`KEY_FORMAT`, bumped whenever the bytes ocibuild writes for the same inputs change;
- ``kind`` and the normalised recipe: every schema key of the kind with defaults filled in, except
  ``description``, ``needs`` (needs enter through their keys) and a run layer's ``caches`` (directories kept
  between builds outside the layer, as BuildKit leaves ``RUN --mount=type=cache`` out of its cache key: what
  apt keeps there changes how fast the layer builds, not what it holds);
- ``epoch``: ``[image] source_date_epoch``, the clamp for every mtime in the layer;
- ``inputs``: ``{"name", "digest"}`` for every input, where name is a project-relative path or a URL and digest
  the sha256 of its content (a copy tree's digest covers each entry's relative path, type, executable bit,
  symlink target and content — never mtime, owner, umask or the absolute path); moving inputs (an ``image``
  ref, a ``bootstrap`` suite's InRelease) enter as the digest recorded in ``ocibuild.lock``;
- ``needs``: the keys of the direct needs, in order (which cover their own needs in turn);
- ``platform``: os, architecture and variant, for the kinds whose bytes depend on it (:data:`PLATFORM_KINDS`:
  ``bootstrap`` installs the architecture's packages, ``run`` executes its binaries, ``image`` takes the
  platform's manifest); ``copy`` and ``archive`` bytes do not depend on it, so their keys leave it out and one
  entry serves every platform.

The compression is not part of the key: a layer's identity is its diff_id. Which inputs a layer has, and their
digests, the planner finds (it reads the files and the lock); this module only assembles and hashes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..oci import Digest, Platform, canonical_json
from .project import LayerRecipe

# 2: bootstrap layers carry Acquire::Retries "5" in apt.conf.d/99mmdebstrap; 3: the platform enters the keys of
# PLATFORM_KINDS, and bootstrap builds the recipe's architecture (it built the host's)
KEY_FORMAT = 3
PLATFORM_KINDS = frozenset({"bootstrap", "run", "image"})


@dataclass(frozen=True)
class Input:
    """A resolved input of a layer: a project-relative path or a URL, and the digest of its content."""

    name: str
    digest: Digest

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "digest": str(self.digest)}


def cache_key(layer: LayerRecipe, epoch: int, inputs: Sequence[Input], need_keys: Sequence[Digest],
              platform: Platform) -> Digest:
    """The input-addressed key of ``layer`` (see the module docstring for exactly what enters it)."""
    return key_of(key_document(layer, epoch, inputs, need_keys, platform))


def key_of(document: Mapping[str, Any]) -> Digest:
    """The key a key document makes: the sha256 of its canonical JSON."""
    return Digest.of(canonical_json(document))


def key_document(layer: LayerRecipe, epoch: int, inputs: Sequence[Input], need_keys: Sequence[Digest],
                 platform: Platform) -> dict[str, Any]:
    """The canonical key document of ``layer``, which :func:`cache_key` hashes (recorded in its cache entry, so
    `ocibuild explain` can say what changed)."""
    document: dict[str, Any] = {
        "format": KEY_FORMAT,
        "kind": layer.kind,
        "recipe": _recipe(layer),
        "epoch": epoch,
        "inputs": [i.to_dict() for i in inputs],
        "needs": [str(k) for k in need_keys],
    }
    if layer.kind in PLATFORM_KINDS:
        document["platform"] = {"os": platform.os, "architecture": platform.architecture, "variant": platform.variant}
    return document


def _recipe(layer: LayerRecipe) -> dict[str, Any]:
    """The normalised recipe as it enters the cache key (InputRefs as plain dicts, without their unset fields)."""
    out: dict[str, Any] = {}
    for key, value in layer.options.items():
        if key == "caches":
            continue
        if key == "inputs":
            value = [{k: v for k, v in vars(i).items() if v is not None} for i in value]
        out[key] = value
    return out
