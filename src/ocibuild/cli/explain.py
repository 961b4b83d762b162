"""`explain LAYER`: why a layer is not cached, as a small diff of its key document against its last entry's."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, Any

from .build import load_plan, remote_plan
from .common import open_store, print_json, registries_of

if TYPE_CHECKING:
    from ..explain import Elsewhere, Explanation
    from ..oci import ImageConfig


def explain_command(args: argparse.Namespace) -> int:
    from .. import explain, teamcache

    config, store = open_store(args)
    registries = registries_of(config)
    plan = load_plan(args, store, registries, offline=args.offline, resolve=False, only=[args.layer])
    plan, _ = remote_plan(args, plan, registries)
    reference = teamcache.cache_repository(plan.project, args.cache)
    cache = f"{reference.registry}/{reference.repository}" if reference is not None and not args.offline else None
    elsewhere: Elsewhere | None = None
    if reference is not None and cache is not None:
        def in_cache(name: str) -> tuple[str, list[tuple[str, ImageConfig]]]:
            client = registries.client(reference.registry)
            return cache, teamcache.cache_entries(client, reference.repository, store, name, jobs=args.jobs)

        elsewhere = in_cache
    result = explain.explain(plan, store, args.layer, elsewhere=elsewhere)
    if args.json:
        print_json(result.to_dict())
    else:
        _print(result, cache)
    return 0


def _print(result: Explanation, cache: str | None) -> None:
    name, key = result.name, result.key.short if result.key else None
    if result.status == "lock":
        print(f"layer '{name}' has no key yet: ocibuild.lock lacks a moving input of it or of a layer it needs; "
              "run `ocibuild lock` (a build resolves it too), then explain again")
        return
    if result.status == "cached":
        print(f"layer '{name}' is cached (key {key}): nothing to explain")
        return
    if result.status in ("pull", "pulled"):
        print(f"layer '{name}' is not in the store, but the cache {cache or ''} has its entry (key {key}): "
              "`ocibuild build` or `ocibuild pull-cache` fetches it")
        return
    compared = result.comparison
    if compared is None:
        where = f"the store or the cache {cache}" if cache else "the store"
        print(f"layer '{name}' is not cached (key {key}), and {where} has no entry of that name to compare with: "
              "it was never built here")
        return
    which = "the last one added" if compared.where == "store" else "the closest of its entries there"
    where = "the store" if compared.where == "store" else f"the cache {compared.where}"
    print(f"layer '{name}' is not cached (key {key}); compared with its entry in {where} "
          f"(key {compared.key.short}, {which}):")
    if not compared.recorded:
        print("  (that entry was made before entries recorded their key document: only its inputs are compared)")
    if not compared.differences:
        print("  its inputs are the same; the entry does not say what else its key was made of")
    width = max((len(d.name or "") for d in compared.differences), default=0)
    for d in compared.differences:
        line = f"  {d.what:<8} {d.name or '':<{width}}  {_value(d.before)} -> {_value(d.now)}"
        if d.what == "need" and result.needs.get(d.name or "") == "build":
            line += f"  (not cached either: `ocibuild explain {d.name}`)"
        print(line.rstrip() if d.name else line)


def _value(value: Any) -> str:
    """A value of a key document, short: digests to 12 hex digits, absent as "(none)", the rest as JSON."""
    if value is None:
        return "(none)"
    if isinstance(value, str) and value.startswith("sha256:") and len(value) == 71:
        return value[:19]
    return json.dumps(value, separators=(", ", ": "))
