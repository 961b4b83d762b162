"""`push`, `push-cache`, `pull-cache` and `login`: the image and the layer cache to and from registries.

Each transfer ends with one document (printed as JSON with --json): what moved, the transfer statistics and
the time it took."""

from __future__ import annotations

import argparse
import sys
import time
from typing import TYPE_CHECKING, Any

from .. import registry
from ..config import load_config
from ..errors import OcibuildError
from ..net import auth
from ..store import Store
from .build import load_plan
from .common import print_json, project_of, registries_of
from .progress import progress_of

if TYPE_CHECKING:
    from ..planner import Plan


def push_command(args: argparse.Namespace) -> int:
    registries, store = _open(args)
    start = time.monotonic()
    project = project_of(args)
    image = store.resolve(project.image.name)
    if image is None:
        raise OcibuildError(f"the image '{project.image.name}' is not in the store {store.root}",
                            "run `ocibuild build` first")
    reference = registry.parse_repository(args.ref)
    client = registries.client(reference.registry)
    tag = str(reference.digest) if reference.digest and not reference.tag else reference.tag or "latest"
    with progress_of(args) as progress, \
            progress.transfer(f"pushing to {client.registry}/{reference.repository}", lambda: registries.stats.uploaded):
        status = registry.push_manifests(client, store, reference.repository, [(tag, image)], jobs=args.jobs,
                                         output=progress.line)[tag]
    doc: dict[str, Any] = {"ref": f"{reference.registry}/{reference.repository}:{tag}",
                           "digest": str(image.digest), "status": status}
    return _finish(args, doc, registries, start)


def push_cache_command(args: argparse.Namespace) -> int:
    from .. import teamcache

    registries, store = _open(args)
    start = time.monotonic()
    plan = load_plan(args, store, registries, offline=False)
    client, repository, cache = _cache(args, plan, registries, args.ref or args.cache_option)
    with progress_of(args) as progress, progress.transfer(f"pushing to {cache}", lambda: registries.stats.uploaded):
        statuses = teamcache.push_layers(plan, store, client, repository, jobs=args.jobs, output=progress.line)
    doc: dict[str, Any] = {"cache": cache, "layers": [{"name": l.name, "key": str(l.key), "status": statuses[l.name]}
                                                      for l in plan.layers]}
    return _finish(args, doc, registries, start)


def pull_cache_command(args: argparse.Namespace) -> int:
    from .. import teamcache

    registries, store = _open(args)
    start = time.monotonic()
    if args.offline:
        return _check_offline(load_plan(args, store, offline=True))
    plan = load_plan(args, store, registries, offline=False)
    client, repository, cache = _cache(args, plan, registries, args.ref or args.cache)
    remote_plan, remotes = teamcache.remote_status(plan, client, repository, jobs=args.jobs)
    layers: list[dict[str, Any]] = []
    for layer in remote_plan.layers:
        remote = remotes.get(layer.name)
        size = registry.missing_bytes(store, [remote]) if remote is not None else 0
        status = {"cached": "cached", "pull": "pull", "build": "missing"}[layer.status]
        layers.append({"name": layer.name, "key": str(layer.key), "status": status, "bytes": size})
    doc: dict[str, Any] = {"cache": cache, "layers": layers, "bytes": registry.missing_bytes(store, remotes.values())}
    if not args.plan:
        with progress_of(args) as progress, \
                progress.transfer(f"pulling from {cache}", lambda: registries.stats.downloaded, doc["bytes"]):
            done = teamcache.pull_layers(remote_plan, store, client, repository, remotes, jobs=args.jobs,
                                         output=progress.line)
        for entry, layer in zip(layers, done.layers):
            entry["status"] = layer.status
    return _finish(args, doc, registries, start)


def _open(args: argparse.Namespace) -> tuple[registry.Registries, Store]:
    config = load_config(args.store)
    return registries_of(config), Store.open(config.store)


def _cache(args: argparse.Namespace, plan: Plan, registries: registry.Registries, text: str | None
           ) -> tuple[registry.Client, str, str]:
    """The client and repository of the layer cache (``text``, else ``[cache] ref``), and its name for output."""
    from .. import teamcache

    cache_ref = teamcache.cache_repository(plan.project, text)
    if cache_ref is None:
        raise OcibuildError(f"{args.command}: no cache repository given",
                            f"run `ocibuild {args.command} REGISTRY/REPOSITORY`, or set [cache] ref in ocibuild.toml")
    return registries.client(cache_ref.registry), cache_ref.repository, f"{cache_ref.registry}/{cache_ref.repository}"


def _finish(args: argparse.Namespace, doc: dict[str, Any], registries: registry.Registries, start: float) -> int:
    doc["transfer"] = registries.stats.to_dict()
    doc["seconds"] = round(time.monotonic() - start, 3)
    if args.json:
        print_json(doc)
    else:
        _print_transfer(args.command, doc)
    return 0


def _check_offline(plan: Plan) -> int:
    """`pull-cache --offline`: nothing may be fetched, so succeed only when every layer is already present."""
    missing = [layer.name for layer in plan.layers if layer.status != "cached"]
    if missing:
        raise OcibuildError(f"layers not in the store: {', '.join(missing)}; --offline forbids pulling them",
                            "on a connected machine run `ocibuild export devenv.tar` (or `export --since` this "
                            "store's `ocibuild inventory`), then `ocibuild import devenv.tar` here")
    print(f"every layer of {plan.project.image.name} is in the store; nothing to pull")
    return 0


def login_command(args: argparse.Namespace) -> int:
    import getpass

    registries = registries_of(load_config(args.store))
    username = args.username or input("Username: ")
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = getpass.getpass("Password: ")
    if not username or not password:
        raise OcibuildError("login: a username and a password are needed", "give -u USER and the password")
    credentials = auth.Credentials(username, password)
    client = registry.Client(args.registry, insecure=args.registry in registries.insecure, credentials=credentials,
                             policy=registries.policy, env=registries.env)
    client.check_login()
    path = auth.save_credentials(args.registry, credentials, registries.env)
    print(f"logged in to {args.registry} as {username} (credentials in {path})")
    return 0


def _print_transfer(command: str, doc: dict[str, Any]) -> None:
    for layer in doc.get("layers", []):
        size = f"  {layer['bytes'] / 1e6:.1f} MB" if layer.get("bytes") else ""
        print(f"{layer['name']:<20}  {layer['key'][7:19]}  {layer['status']}{size}")
    if "ref" in doc:
        print(f"{doc['ref']} {doc['digest']} {doc['status']}")
    t = doc["transfer"]
    retransferred = f", {t['retransferred'] / 1e6:.1f} MB re-transferred after interruptions" if t["retransferred"] else ""
    where = doc.get("cache") or doc.get("ref")
    if command == "pull-cache" and "bytes" in doc:
        print(f"{where}: {doc['bytes'] / 1e6:.1f} MB to fetch", file=sys.stderr)
    print(f"{command} {where}: {t['uploaded'] / 1e6:.1f} MB sent, {t['downloaded'] / 1e6:.1f} MB received, "
          f"{t['blobs_mounted']} blobs mounted, {t['blobs_present']} already present{retransferred} "
          f"({doc['seconds']:.2f} s)", file=sys.stderr)
