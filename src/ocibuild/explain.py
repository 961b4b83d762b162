"""`ocibuild explain LAYER`: why a layer is not cached — what differs between its key document now and the one
recorded by the last entry of that layer's name (:mod:`ocibuild.store.entries` records it).

The entry compared with is the one of that name added to the store last (index.json keeps tags in the order they
arrived: a build, a pull or an import). With a registry cache and none in the store, it is the cache's entry whose
document differs least, since a registry keeps no order among tags. An entry made before documents were recorded
is compared by its inputs label alone (``Comparison.recorded`` False).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import FormatError
from .oci import Digest, ImageConfig, canonical_json, parse_json
from .planner import LayerPlan, Plan
from .recipe.key import Difference, differences
from .store import Store
from .store.entries import LABEL_PREFIX, entries_of, tag_key

#: The entries of a layer's name somewhere else than the store (the registry cache): (where, [(tag, config)]).
Elsewhere = Callable[[str], tuple[str, list[tuple[str, ImageConfig]]]]


@dataclass(frozen=True)
class Comparison:
    """The entry a layer is compared with: where it is ("store", or the cache's reference), its tag and key,
    whether it recorded its key document (else only inputs are compared), and what differs."""

    where: str
    tag: str
    key: Digest
    recorded: bool
    differences: tuple[Difference, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"where": self.where, "tag": self.tag, "key": str(self.key), "recorded": self.recorded}


@dataclass(frozen=True)
class Explanation:
    """Why layer ``name`` is (not) cached. ``status`` is its plan status ("cached", "pull", "build", or "lock"
    when its key waits for ocibuild.lock); ``comparison`` None when no entry of its name was found; ``needs`` the
    plan status of each need, for the needs that differ."""

    name: str
    kind: str
    key: Digest | None
    status: str
    comparison: Comparison | None
    needs: Mapping[str, str]

    def to_dict(self) -> dict[str, Any]:
        compared = self.comparison
        diffs = [d.to_dict() for d in (compared.differences if compared else ())]
        for diff in diffs:
            if diff["what"] == "need" and diff["name"] in self.needs:
                diff["status"] = self.needs[diff["name"]]
        return {"layer": self.name, "kind": self.kind, "key": str(self.key) if self.key else None,
                "status": self.status, "compared": compared.to_dict() if compared else None, "differences": diffs}


def explain(plan: Plan, store: Store, name: str, *, elsewhere: Elsewhere | None = None) -> Explanation:
    """Explain layer ``name`` of ``plan`` (a plan of at least that layer and its needs): compared with the last
    entry of its name in ``store``, else with the closest one ``elsewhere`` finds (None: look nowhere else)."""
    unlocked = next((layer for layer in plan.unlocked if layer.name == name), None)
    if unlocked is not None:
        return Explanation(name, unlocked.recipe.kind, None, "lock", None, {})
    layer = plan.layer(name)
    if layer.status in ("cached", "pull", "pulled"):
        return Explanation(name, layer.recipe.kind, layer.key, layer.status, None, {})
    now = json.loads(canonical_json(layer.document))  # as recorded: lists, not tuples
    statuses = {l.name: l.status for l in plan.layers}
    comparison = None
    found = [(tag, config) for tag, config in entries_of(store, name) if tag_key(tag) != layer.key]
    if found:
        comparison = _compare("store", *found[-1], now, layer)
    elif elsewhere is not None:
        where, entries = elsewhere(name)
        compared = [_compare(where, tag, config, now, layer) for tag, config in entries
                    if tag_key(tag) != layer.key]
        comparison = min(compared, key=lambda c: (not c.recorded, len(c.differences)), default=None)
    needs = {d.name: statuses.get(d.name, "unknown") for d in (comparison.differences if comparison else ())
             if d.what == "need" and d.name is not None}
    return Explanation(name, layer.recipe.kind, layer.key, layer.status, comparison, needs)


def _compare(where: str, tag: str, config: ImageConfig, now: Mapping[str, Any], layer: LayerPlan) -> Comparison:
    key = tag_key(tag)
    assert key is not None
    labels = config.labels
    document = _json(labels.get(LABEL_PREFIX + "document"))
    if isinstance(document, dict):
        recorded_needs = _json(labels.get(LABEL_PREFIX + "needs"))
        names = [str(n) for n in recorded_needs] if isinstance(recorded_needs, list) else []
        found = differences(document, names, now, layer.recipe.needs)
        return Comparison(where, tag, key, True, tuple(found))
    inputs = _json(labels.get(LABEL_PREFIX + "inputs"))
    old = {"inputs": inputs if isinstance(inputs, list) else []}
    return Comparison(where, tag, key, False, tuple(differences(old, [], {"inputs": now.get("inputs", [])}, [])))


def _json(text: str | None) -> Any:
    if text is None:
        return None
    try:
        return parse_json(text, "a label")
    except FormatError:
        return None

