"""The team's layer cache in a registry: the same cache entries as the local store (see :mod:`ocibuild.planner`),
pushed and pulled by tag. A pulled entry is checked to be the entry of the layer whose key it is tagged with."""

from __future__ import annotations

from dataclasses import replace

from . import registry
from .oci import ImageConfig, Reference
from .planner import Output, Plan
from .store.entries import LABEL_PREFIX, add_cache_entries, cache_tag, entry_tag_pattern
from .recipe.project import Project
from .store import Store


def cache_repository(project: Project, override: str | None) -> Reference | None:
    """The registry repository of the shared layer cache: ``--cache``, else ``[cache] ref``, else None."""
    text = override or project.cache_ref
    return registry.parse_repository(text) if text else None


def remote_status(plan: Plan, client: registry.Client, repository: str, *,
                  jobs: int = registry.DEFAULT_JOBS) -> tuple[Plan, dict[str, registry.FetchedManifest]]:
    """``plan`` with status "pull" for every missing layer whose cache entry the registry holds (and those
    entries' manifests, by layer name). Nothing is stored."""
    wanted = {cache_tag(l.name, l.key): l for l in plan.layers if l.status == "build"}
    found = registry.find_manifests(client, repository, list(wanted), jobs=jobs)
    remotes = {wanted[tag].name: remote for tag, remote in found.items() if remote is not None}
    layers = tuple(replace(l, status="pull") if l.name in remotes else l for l in plan.layers)
    return replace(plan, layers=layers), remotes


def pull_layers(plan: Plan, store: Store, client: registry.Client, repository: str,
                remotes: dict[str, registry.FetchedManifest], *, jobs: int = registry.DEFAULT_JOBS,
                output: Output = lambda line: None) -> Plan:
    """Fetch the cache entries of the layers with status "pull" (verified) and tag them: status "pulled"."""
    pulling = {cache_tag(l.name, l.key): remotes[l.name] for l in plan.layers if l.status == "pull"}
    with store.lease():
        stored = registry.fetch_manifests(client, store, repository, pulling, jobs=jobs, tag=False, output=output)
        add_cache_entries(store, {tag: stored[tag] for tag in pulling}, what=f"{client.registry}/{repository}")
    return replace(plan, layers=tuple(replace(l, status="pulled") if l.status == "pull" else l for l in plan.layers))


def push_layers(plan: Plan, store: Store, client: registry.Client, repository: str, *,
                jobs: int = registry.DEFAULT_JOBS, output: Output = lambda line: None) -> dict[str, str]:
    """Push the cache entry of every layer the store holds: layer name → "pushed", "present" (the registry has an
    entry for that key, whatever its compression: nothing moved, its tag is never re-pointed) or "missing" (not
    built here)."""
    tagged = []
    result = {}
    for layer in plan.layers:
        tag = cache_tag(layer.name, layer.key)
        descriptor = store.resolve(tag)
        if descriptor is None:
            result[layer.name] = "missing"
        else:
            tagged.append((layer.name, tag, descriptor))
    pushed = registry.push_manifests(client, store, repository, [(t, d) for _, t, d in tagged], jobs=jobs,
                                     output=output, immutable=True)
    result.update({name: pushed[tag] for name, tag, _ in tagged})
    return result


def cache_entries(client: registry.Client, repository: str, store: Store, name: str, *,
                  jobs: int = registry.DEFAULT_JOBS) -> list[tuple[str, ImageConfig]]:
    """The cache entries of layer ``name`` in the registry (tag, config), in the registry's tag order (it keeps no
    other). Only their configs move, into the store (small; gc removes them unless the entry is pulled later)."""
    pattern = entry_tag_pattern(name)
    tags = [tag for tag in client.list_tags(repository) if pattern.fullmatch(tag)]
    found = registry.find_manifests(client, repository, tags, jobs=jobs)
    entries = [(tag, fetched) for tag, fetched in found.items() if fetched is not None]
    out = []
    with store.lease():
        for tag, fetched in entries:
            client.fetch_blob(repository, fetched.manifest.config, store)
            config = store.get_config(fetched.manifest.config.digest)
            if config.labels.get(LABEL_PREFIX + "name", name) == name:
                out.append((tag, config))
    return out
