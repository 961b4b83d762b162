"""The team's layer cache in a registry: the same cache entries as the local store (see :mod:`ocibuild.planner`),
pushed and pulled by tag. A pulled entry is checked to be the entry of the layer whose key it is tagged with."""

from __future__ import annotations

from dataclasses import replace

from . import registry
from .errors import RegistryError
from .oci import Reference
from .planner import Output, Plan
from .store.entries import LABEL_PREFIX, cache_tag
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
        for layer in plan.layers:
            if layer.status != "pull":
                continue
            tag = cache_tag(layer.name, layer.key)
            config = store.get_config(pulling[tag].manifest.config.digest)
            if config.labels.get(LABEL_PREFIX + "key") != str(layer.key) or \
                    len(config.diff_ids) != len(pulling[tag].manifest.layers):
                raise RegistryError(
                    f"{client.registry}/{repository}:{tag} is not the cache entry of layer '{layer.name}' "
                    f"(its key label is {config.labels.get(LABEL_PREFIX + 'key')!r})",
                    "something else was pushed under that tag; delete it from the registry and push the cache again")
            store.tag(tag, stored[tag])
    return replace(plan, layers=tuple(replace(l, status="pulled") if l.status == "pull" else l for l in plan.layers))


def push_layers(plan: Plan, store: Store, client: registry.Client, repository: str, *,
                jobs: int = registry.DEFAULT_JOBS, output: Output = lambda line: None) -> dict[str, str]:
    """Push the cache entry of every layer the store holds: layer name → "pushed", "present" (the registry had
    it: nothing moved) or "missing" (not built here)."""
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
                                     output=output)
    result.update({name: pushed[tag] for name, tag, _ in tagged})
    return result
