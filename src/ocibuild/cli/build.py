"""`plan`, `build`, `lock`, `verify` and `gc`: the project's layers, and the store that holds them.

``plan`` only looks: it reads ocibuild.lock but neither resolves nor writes it (a layer whose moving input the
lock lacks has status "lock"); ``build`` and ``lock`` resolve moving inputs and write the lock.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .. import registry, runcache
from ..config import Config
from ..errors import OcibuildError, UsageError
from ..recipe.lock import load_lock
from ..recipe.project import PROJECT_FILE
from ..store import Store
from .common import (build_jobs, engine_factory, open_store, print_json, print_layers, project_of, registries_of,
                     transfer_jobs)
from .progress import Progress, progress_of

# planner, resolve and teamcache are imported where they are used: `verify` and `gc` need none of them.
if TYPE_CHECKING:
    from ..oci import Descriptor
    from ..planner import BuildResult, Plan
    from ..recipe.project import Project


def load_plan(args: argparse.Namespace, store: Store, registries: registry.Registries | None = None, *,
              offline: bool, resolve: bool = True, only: Sequence[str] = (), project: Project | None = None) -> Plan:
    """The plan of the project at ``-C`` (or of ``project``, read from it already; with ``only``: of those layers
    and the layers they need). With ``resolve``, moving inputs missing from ocibuild.lock are resolved first (not
    ``offline``: only those that need no network) and the lock is written; without, it is only read."""
    from .. import planner
    from ..inputs import StatCache

    project = project or project_of(args)
    unknown = [name for name in only if name not in project.layer_names]
    if unknown:
        raise UsageError(f"{args.command}: no layer {', '.join(repr(n) for n in unknown)} in {PROJECT_FILE}",
                         f"the layers are: {', '.join(project.layer_names)}")
    lock = load_lock(project.root)
    if resolve:
        from ..resolve import resolve_lock, write_lock

        resolved = resolve_lock(project, lock, offline=offline, registries=registries)
        if resolved != lock:
            write_lock(project, resolved)
        lock = resolved
    cache = StatCache(store.private_dir("statcache") / "files.json")
    plan = planner.make_plan(project, store, lock, cache, only=only)
    cache.save()
    return plan


def remote_plan(args: argparse.Namespace, plan: Plan, registries: registry.Registries
                ) -> tuple[Plan, tuple[registry.Client, str, dict[str, registry.FetchedManifest]] | None]:
    """With a cache (--cache or [cache] ref) and not --offline: the plan with status "pull" where the registry
    holds a missing layer, and what is needed to pull those layers."""
    from .. import teamcache

    reference = teamcache.cache_repository(plan.project, args.cache)
    if reference is None or args.offline or all(layer.status != "build" for layer in plan.layers):
        return plan, None
    client = registries.client(reference.registry)
    plan, remotes = teamcache.remote_status(plan, client, reference.repository, jobs=transfer_jobs(args))
    return plan, (client, reference.repository, remotes)


def pulled_plan(args: argparse.Namespace, store: Store, registries: registry.Registries, progress: Progress, *,
                only: Sequence[str] = (), project: Project | None = None) -> Plan:
    """The plan (of ``only`` and what they need, or of every layer), with what the team cache holds pulled."""
    from .. import teamcache

    plan = load_plan(args, store, registries, offline=args.offline, only=only, project=project)
    plan, remote = remote_plan(args, plan, registries)
    if remote is not None:
        client, repository, remotes = remote
        with progress.transfer(f"pulling from {client.registry}/{repository}", lambda: registries.stats.downloaded,
                               registry.missing_bytes(store, remotes.values())):
            plan = teamcache.pull_layers(plan, store, client, repository, remotes, jobs=transfer_jobs(args),
                                         output=progress.line)
    return plan


def build_project(args: argparse.Namespace, config: Config, store: Store, *, strict: bool = False,
                  project: Project | None = None) -> tuple[Plan, BuildResult]:
    """Plan, pull from the cache what it holds, build the rest (``--jobs`` layers at once), assemble: `build`,
    and the first half of `run` (which may pass the project, read already). Its progress display is gone when it
    returns."""
    from .. import planner

    registries = registries_of(config)
    jobs = build_jobs(args)
    with progress_of(args, jobs=jobs) as progress:
        plan = pulled_plan(args, store, registries, progress, project=project)
        result = planner.build(plan, store, offline=args.offline, strict=strict, jobs=jobs, output=progress.line,
                               events=progress.event, engine=engine_factory(config, plan.project, args.engine),
                               registries=registries)
    return plan, result


def plan_command(args: argparse.Namespace) -> int:
    config, store = open_store(args)
    registries = registries_of(config)
    plan = load_plan(args, store, registries, offline=args.offline, resolve=False)
    plan, _ = remote_plan(args, plan, registries)
    if args.json:
        print_json(plan.to_dict())
    else:
        print_layers(plan.to_dict())
    missing = [layer for layer in plan.unlocked if layer.source is not None]
    for layer in missing:
        print(f"layer '{layer.name}': ocibuild.lock has no entry for {layer.wanted}", file=sys.stderr)
    if missing:
        print("hint: run `ocibuild lock` (a build resolves moving inputs too); the layers above get their keys then",
              file=sys.stderr)
    return 0


def build_command(args: argparse.Namespace) -> int:
    config, store = open_store(args)
    if args.layers:
        return _build_layers(args, config, store)
    plan, result = build_project(args, config, store, strict=args.strict)
    if args.output:
        _write_output(store, result.image, plan.project.image.name, args.output)
    if args.json:
        print_json(result.to_dict())
    else:
        if not args.quiet:
            print_layers(result.to_dict(), file=sys.stderr)
        print(f"{plan.project.image.name} {result.image.digest}")
    return 0


def _build_layers(args: argparse.Namespace, config: Config, store: Store) -> int:
    """`build LAYER…`: those layers and the layers they need, pulled from the team cache or built; no image. With
    --json the document of `build`, listing only those layers, its "digest" null."""
    from .. import planner

    for option, given in (("--output", args.output), ("--strict", args.strict)):
        if given:
            raise UsageError(f"build {' '.join(args.layers)}: {option} concerns the image, and building only some "
                             "layers makes none", f"leave out {option}, or the layer names")
    registries = registries_of(config)
    jobs = build_jobs(args)
    with progress_of(args, jobs=jobs) as progress:
        plan = pulled_plan(args, store, registries, progress, only=args.layers)
        built = planner.build_layers(plan, store, offline=args.offline, jobs=jobs, output=progress.line,
                                     events=progress.event, engine=engine_factory(config, plan.project, args.engine),
                                     registries=registries)
    doc = {**built.to_dict(), "digest": None}
    if args.json:
        print_json(doc)
    else:
        print_layers(doc)
    return 0


def _write_output(store: Store, image: Descriptor, name: str, target: str) -> None:
    from ..archive import write_oci_archive

    if not target.startswith("oci-archive:"):
        raise OcibuildError(f"--output {target}: only oci-archive:PATH is supported", "write --output oci-archive:out.tar")
    write_oci_archive(store, image, name, Path(target.split(":", 1)[1]))


def lock_command(args: argparse.Namespace) -> int:
    from ..resolve import resolve_lock, write_lock

    project = project_of(args)
    lock = resolve_lock(project, load_lock(project.root), refresh=args.layers or project.layer_names)
    write_lock(project, lock)
    for entry in sorted(lock.entries.values(), key=lambda e: e.layer):
        print(f"{entry.layer}: {entry.source} {entry.digest}" + (f" ({entry.platform})" if entry.platform else ""))
    return 0


def verify_command(args: argparse.Namespace) -> int:
    _, store = open_store(args)
    removed = store.repair() if args.repair else []
    problems = store.verify()
    if args.json:
        print_json({"store": str(store.root), "ok": not problems, "problems": problems,
                    "removed": [r.to_dict() for r in removed]})
    else:
        for r in removed:
            print(f"removed {r.kind} {r.name}: {r.reason}")
        for problem in problems:
            print(problem)
    if problems and args.repair:
        raise OcibuildError(f"store {store.root}: {len(problems)} problem(s) left after the repair",
                            "what is left could not be removed: check the permissions of the files named")
    if problems:
        raise OcibuildError(f"store {store.root}: {len(problems)} problem(s) found",
                            "run `ocibuild verify --repair`: it removes what is damaged, naming each removal; the next "
                            "build makes (or pulls) again what it removed")
    if not args.json:
        if removed:
            print("run `ocibuild gc` to free the blobs only the removed entries used; the next build makes (or "
                  "pulls) again the layers whose cache entries were removed")
        print(f"store {store.root}: ok")
    return 0


def gc_command(args: argparse.Namespace) -> int:
    from .. import engineimages

    config, store = open_store(args)
    removed, freed = store.gc()
    engine = engineimages.gc(store)
    caches = None
    if args.caches:
        with progress_of(args) as progress:
            caches = _remove_caches(config, store, progress)
    if args.json:
        doc: dict[str, object] = {"removed": removed, "bytes": freed,
                                  "engine": [{"engine": r.engine, "kind": r.kind, "id": r.id, "names": list(r.names)}
                                             for r in engine]}
        if caches is not None:
            doc["caches"] = [{"project": c.project, "engine": c.engine, "path": c.path, "bytes": c.bytes,
                              "layer": c.layer} for c in caches]
        print_json(doc)
        return 0
    print(f"removed {removed} blobs, {freed / 1e6:.1f} MB")
    for r in engine:
        print(f"removed the {r.engine} {r.kind} {r.id[:12] if r.kind == 'image' else r.id}"
              + (f" ({', '.join(r.names)})" if r.names else ""))
    if caches is not None:
        for c in caches:
            of = f"layer '{c.layer}' of {c.project}" if c.layer is not None else c.project
            print(f"removed the cache {c.path} of {of} ({c.engine}), {c.bytes / 1e6:.1f} MB")
        if not caches:
            print("no caches to remove")
    return 0


def _remove_caches(config: Config, store: Store, progress: Progress) -> list[runcache.CacheDir]:
    """`gc --caches`: the compile step's caches and run layers'. Rootless, what a container wrote as another user is
    removed inside podman's namespace."""
    def fallback(path: Path) -> None:
        from ..engine import Engine

        engine = Engine.detect("podman", config.engine_args)
        if not engine.needs_unshare():
            raise OcibuildError(f"cannot remove the caches {path}", "check the store's permissions")
        engine.unshare(["rm", "-rf", str(path)], b"", what=f"removing {path}")

    def waiting(layer: str) -> None:
        progress.line(f"waiting for the build of layer '{layer}' to finish with its caches")

    return runcache.remove(store, fallback=fallback, waiting=waiting)
