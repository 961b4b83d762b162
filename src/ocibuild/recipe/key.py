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
  symlink target, content, hard links and file capability — never mtime, owner, umask, inode numbers or the
  absolute path); moving inputs (an ``image``
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
# PLATFORM_KINDS, and bootstrap builds the recipe's architecture (it built the host's); 4: run layers keep the
# xattrs the script made (capabilities, ACLs, user.*) and its hard links (a run layer's key covers only the
# script, so its bytes changed for the same inputs; a copy tree's digest now covers its hard links and capabilities)
KEY_FORMAT = 4
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


_KNOWN = ("format", "kind", "recipe", "epoch", "inputs", "needs", "platform")  # a key document's fields


@dataclass(frozen=True)
class Difference:
    """One way a key document differs from an earlier one. ``what``: "format", "kind", "recipe" (``name`` the
    field), "epoch", "input" (``name`` the input), "need" (``name`` the layer), "platform", or another top-level
    key of the document; ``before`` and ``now`` its values (None: absent then, or now)."""

    what: str
    name: str | None
    before: Any
    now: Any

    def to_dict(self) -> dict[str, Any]:
        return {"what": self.what, "name": self.name, "before": self.before, "now": self.now}


def differences(before: Mapping[str, Any], before_needs: Sequence[str], now: Mapping[str, Any],
                now_needs: Sequence[str]) -> list[Difference]:
    """What differs between two key documents (as JSON values: lists, not tuples), in the document's order:
    recipe fields, inputs and needs one by one (needs named by ``*_needs``, the names of the keys each lists)."""
    found: list[Difference] = []
    for field in (*_KNOWN, *sorted((set(before) | set(now)) - set(_KNOWN))):
        old, new = before.get(field), now.get(field)
        if old == new:
            continue
        if field == "recipe" and isinstance(old, dict) and isinstance(new, dict):
            found += _changed("recipe", old, new)
        elif field == "inputs" and isinstance(old, list) and isinstance(new, list):
            found += _changed("input", _by_name(old), _by_name(new))
        elif field == "needs" and isinstance(old, list) and isinstance(new, list):
            found += _changed("need", _named(old, before_needs), _named(new, now_needs))
        elif field == "platform":
            found.append(Difference("platform", None, _platform(old), _platform(new)))
        else:
            found.append(Difference(field, None, old, new))
    return found


def _changed(what: str, old: Mapping[str, Any], new: Mapping[str, Any]) -> list[Difference]:
    names = list(old) + [name for name in new if name not in old]
    return [Difference(what, name, old.get(name), new.get(name)) for name in names if old.get(name) != new.get(name)]


def _by_name(inputs: Sequence[Any]) -> dict[str, Any]:
    return {str(i.get("name")): i.get("digest") for i in inputs if isinstance(i, dict)}


def _named(keys: Sequence[Any], names: Sequence[str]) -> dict[str, Any]:
    """Need keys by name; by position (``#1``…) when the names do not match the keys (an entry that lacks them)."""
    if len(names) != len(keys):
        names = [f"#{i + 1}" for i in range(len(keys))]
    return dict(zip(names, keys))


def _platform(value: Any) -> str | None:
    if not isinstance(value, dict):
        return None
    return "/".join(str(value[k]) for k in ("os", "architecture", "variant") if value.get(k))
