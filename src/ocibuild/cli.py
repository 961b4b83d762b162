"""The command line: subcommands, progress, exit codes. The only module that prints.

Exit codes: 0 success, 1 an ocibuild error (``error:`` and ``hint:`` lines on stderr), 2 usage, 130 Ctrl-C.
With ``--json`` stdout holds exactly one JSON document; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__, registry
from .config import Config, load_config
from .errors import OcibuildError
from .recipe import Project, load_lock, load_project
from .store import Store

# Start-up time is part of every command's time (a no-op build, a push that finds everything present), so the
# modules only some commands need (planner, archive, engine, doctor: zstandard, isal, python-on-whales) are
# imported in the functions that use them.
if TYPE_CHECKING:
    from . import planner
    from .engine import Engine
    from .oci import Descriptor
    from .planner import Plan

log = logging.getLogger("ocibuild")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ocibuild", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--version", action="version", version=f"ocibuild {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-C", "--project", default=".", help="project directory (default: .)")
    common.add_argument("--store", help="local OCI layout store (default: $OCIBUILD_STORE or ~/.cache/ocibuild/store)")
    common.add_argument("--debug", action="store_true", help="log details and show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    transfer = argparse.ArgumentParser(add_help=False)
    transfer.add_argument("--jobs", type=_jobs, default=registry.DEFAULT_JOBS,
                          help=f"blobs transferred in parallel (default: {registry.DEFAULT_JOBS})")
    cache = argparse.ArgumentParser(add_help=False)
    cache.add_argument("--cache", metavar="REF", help="registry repository of the layer cache (default: [cache] ref)")

    p = sub.add_parser("plan", parents=[common, cache, transfer],
                       help="show each layer's key and whether it is cached (or can be pulled)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--offline", action="store_true", help="never touch the network")

    p = sub.add_parser("build", parents=[common, cache, transfer], help="build missing layers and assemble the image")
    p.add_argument("--json", action="store_true", help="print the result as JSON (progress goes to stderr)")
    p.add_argument("--offline", action="store_true", help="never touch the network")
    p.add_argument("--strict", action="store_true", help="fail when independent layers write the same path")
    p.add_argument("--output", metavar="oci-archive:PATH", help="also write the image as an oci-archive")
    p.add_argument("--engine", choices=("auto", "podman", "nerdctl"), help="container engine for run layers")

    p = sub.add_parser("run", parents=[common, cache, transfer],
                       help="run the compile step (or COMMAND) in the assembled image")
    p.add_argument("--engine", choices=("auto", "podman", "nerdctl"), help="container engine (default: [run] engine)")
    p.add_argument("--offline", action="store_true", help="never touch the network")
    p.add_argument("--source-mount", action="store_true",
                   help="bind-mount the live trees of copy layers (except one copied to /) over their baked layers")
    p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- COMMAND", help="command instead of [run] command")

    p = sub.add_parser("doctor", parents=[common], help="check the engine, runtime, cgroups, ulimits, subuid, mmdebstrap")
    p.add_argument("--engine", choices=("auto", "podman", "nerdctl"), default="auto")

    p = sub.add_parser("lock", parents=[common], help="resolve moving inputs (image tags, suites) into ocibuild.lock")
    p.add_argument("layers", nargs="*", help="refresh only these layers (default: all)")

    p = sub.add_parser("push-cache", parents=[common, transfer], help="push every layer of the store to the cache")
    p.add_argument("ref", nargs="?", metavar="REF", help="registry repository (default: --cache or [cache] ref)")
    p.add_argument("--cache", metavar="REF", dest="cache_option", help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p = sub.add_parser("pull-cache", parents=[common, cache, transfer],
                       help="fetch the missing layers whose keys match this project's recipes")
    p.add_argument("--plan", action="store_true", help="show which layers and how many bytes would come; move nothing")
    p.add_argument("--offline", action="store_true",
                   help="never touch the network: only check that every layer is present, naming the missing ones")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p = sub.add_parser("push", parents=[common, transfer], help="push the assembled image to a registry")
    p.add_argument("ref", metavar="REF", help="registry/repository:tag")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p = sub.add_parser("login", parents=[common], help="check and record credentials for a registry")
    p.add_argument("registry", metavar="REGISTRY", help="host[:port]")
    p.add_argument("-u", "--username", help="user name (asked for when missing)")
    p.add_argument("--password-stdin", action="store_true", help="read the password from standard input")

    p = sub.add_parser("export", parents=[common],
                       help="write cache entries, the image and downloaded inputs as one oci-archive (air-gapped use)")
    p.add_argument("path", metavar="PATH", help="the archive to write")
    p.add_argument("--all", action="store_true", help="every tag and download of the store, not only this project's")
    p.add_argument("--image-only", action="store_true", help="only the image: one manifest, as `podman load` wants")
    p.add_argument("--since", metavar="INVENTORY", help="leave out the blobs listed by `ocibuild inventory` of the "
                   "store the archive is for")
    p.add_argument("--sync", action="store_true", help="fsync the archive before finishing")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p = sub.add_parser("import", parents=[common], help="verify an oci-archive and add its blobs and tags to the store")
    p.add_argument("path", metavar="PATH", help="an archive of `ocibuild export` or `skopeo copy … oci-archive:`")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    sub.add_parser("inventory", parents=[common], help="print what the store holds (JSON), for `export --since`")

    sub.add_parser("verify", parents=[common], help="check every blob and reference in the store")
    p = sub.add_parser("gc", parents=[common], help="remove blobs no tag or cache entry reaches")
    p.add_argument("--json", action="store_true")
    return parser


class _Console:
    """Progress lines to stderr, marked with the time since start."""

    def __init__(self) -> None:
        self.start = time.monotonic()

    def __call__(self, line: str) -> None:
        print(line, file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, format="%(name)s: %(message)s",
                        stream=sys.stderr)
    try:
        return _run(args)
    except OcibuildError as err:
        _report(err, args.debug)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _engine_factory(config: Config, project: Project, choice: str | None) -> Callable[[], Engine]:
    from .engine import Engine

    return lambda: Engine.detect(choice or project.run.engine, config.engine_args)


def _report(err: OcibuildError, debug: bool) -> None:
    if debug:
        log.exception("failed")
    print(f"error: {err}", file=sys.stderr)
    tail = getattr(err, "tail", "")
    if tail:
        print(tail, file=sys.stderr)
    if err.hint:
        print(f"hint: {err.hint}", file=sys.stderr)


def _open(args: argparse.Namespace) -> tuple[Config, Store]:
    config = load_config(args.store)
    return config, Store.open(config.store)


def _project(args: argparse.Namespace) -> Project:
    return load_project(Path(args.project))


def _jobs(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 64:
        raise argparse.ArgumentTypeError("--jobs must be between 1 and 64")
    return value


def _registries(config: Config) -> registry.Registries:
    return registry.Registries(insecure=config.insecure_registries)


def _plan(args: argparse.Namespace, store: Store, registries: registry.Registries | None = None) -> Plan:
    from . import planner
    from .inputs import StatCache

    project = _project(args)
    lock = load_lock(project.root)
    resolved = planner.resolve_lock(project, lock, offline=getattr(args, "offline", False), registries=registries)
    if resolved != lock:
        planner.write_lock(project, resolved)
    cache = StatCache(store.private_dir("statcache") / "files.json")
    plan = planner.make_plan(project, store, resolved, cache)
    cache.save()
    return plan


def _run(args: argparse.Namespace) -> int:
    console = _Console()
    if args.command == "plan":
        config, store = _open(args)
        registries = _registries(config)
        plan = _plan(args, store, registries)
        plan, _ = _remote_plan(args, plan, registries)
        if args.json:
            _print_json(plan.to_dict())
        else:
            _print_layers(plan.to_dict())
        return 0
    if args.command == "build":
        config, store = _open(args)
        plan, result = _build(args, config, store, console, strict=args.strict)
        if args.output:
            _write_output(store, result.image, plan.project.image.name, args.output)
        if args.json:
            _print_json(result.to_dict())
        else:
            _print_layers(result.to_dict(), file=sys.stderr)
            print(f"{plan.project.image.name} {result.image.digest}")
        return 0
    if args.command == "run":
        return _compile(args, console)
    if args.command == "doctor":
        from . import doctor

        checks = doctor.run_checks(load_config(args.store), args.engine)
        for check in checks:
            print(f"{'ok  ' if check.ok else 'FAIL'} {check.name}: {check.detail}")
            if not check.ok and check.fix:
                print(f"     fix: {check.fix}")
        failed = [c for c in checks if not c.ok]
        if failed:
            raise OcibuildError(f"{len(failed)} check(s) failed", "apply the fixes above, then run `ocibuild doctor` again")
        return 0
    if args.command == "lock":
        from . import planner

        project = _project(args)
        lock = planner.resolve_lock(project, load_lock(project.root), refresh=args.layers or project.layer_names)
        planner.write_lock(project, lock)
        for entry in sorted(lock.entries.values(), key=lambda e: e.layer):
            print(f"{entry.layer}: {entry.source} {entry.digest}")
        return 0
    if args.command in ("push-cache", "pull-cache", "push", "login"):
        return _registry_command(args, console)
    if args.command in ("export", "import", "inventory"):
        return _bundle_command(args)
    if args.command == "verify":
        _, store = _open(args)
        problems = store.verify()
        for problem in problems:
            print(problem)
        if problems:
            raise OcibuildError(f"store {store.root}: {len(problems)} problem(s) found",
                                "run `ocibuild gc`, then rebuild or re-pull what is missing")
        print(f"store {store.root}: ok")
        return 0
    if args.command == "gc":
        _, store = _open(args)
        removed, freed = store.gc()
        if args.json:
            _print_json({"removed": removed, "bytes": freed})
        else:
            print(f"removed {removed} blobs, {freed / 1e6:.1f} MB")
        return 0
    raise AssertionError(args.command)


def _build(args: argparse.Namespace, config: Config, store: Store, console: _Console, *,
           strict: bool = False) -> tuple[Plan, planner.BuildResult]:
    """Plan, pull from the cache what it holds, build the rest, assemble: `build`, and the first half of `run`."""
    from . import planner

    registries = _registries(config)
    plan = _plan(args, store, registries)
    plan, remote = _remote_plan(args, plan, registries)
    if remote is not None:
        client, repository, remotes = remote
        plan = planner.pull_layers(plan, store, client, repository, remotes, jobs=args.jobs, output=console)
    result = planner.build(plan, store, offline=args.offline, strict=strict, output=console,
                           engine=_engine_factory(config, plan.project, args.engine), registries=registries)
    return plan, result


def _remote_plan(args: argparse.Namespace, plan: Plan, registries: registry.Registries
                 ) -> tuple[Plan, tuple[registry.Client, str, dict[str, registry.Remote]] | None]:
    """With a cache (--cache or [cache] ref) and not --offline: the plan with status "pull" where the registry
    holds a missing layer, and what is needed to pull those layers."""
    from . import planner

    reference = planner.cache_repository(plan.project, args.cache)
    if reference is None or args.offline or all(layer.status != "build" for layer in plan.layers):
        return plan, None
    client = registries.client(reference.registry)
    plan, remotes = planner.remote_status(plan, client, reference.repository, jobs=args.jobs)
    return plan, (client, reference.repository, remotes)


def _registry_command(args: argparse.Namespace, console: _Console) -> int:
    config = load_config(args.store)
    registries = _registries(config)
    if args.command == "login":
        return _login(args, registries)
    store = Store.open(config.store)
    start = time.monotonic()
    if args.command == "pull-cache" and args.offline:
        return _check_offline(_plan(args, store))
    if args.command == "push":
        project = _project(args)
        image = store.resolve(project.image.name)
        if image is None:
            raise OcibuildError(f"the image '{project.image.name}' is not in the store {store.root}",
                                "run `ocibuild build` first")
        reference = registry.parse_repository(args.ref)
        client = registries.client(reference.registry)
        tag = str(reference.digest) if reference.digest and not reference.tag else reference.tag or "latest"
        status = registry.push_manifests(client, store, reference.repository, [(tag, image)], jobs=args.jobs,
                                         output=console)[tag]
        doc: dict[str, Any] = {"ref": f"{reference.registry}/{reference.repository}:{tag}",
                               "digest": str(image.digest), "status": status}
    else:
        from . import planner

        plan = _plan(args, store, registries)
        cache_text = args.ref or args.cache_option if args.command == "push-cache" else args.cache
        cache_ref = planner.cache_repository(plan.project, cache_text)
        if cache_ref is None:
            raise OcibuildError(f"{args.command}: no cache repository given",
                                f"run `ocibuild {args.command} REGISTRY/REPOSITORY`, or set [cache] ref in ocibuild.toml")
        client = registries.client(cache_ref.registry)
        repository = cache_ref.repository
        cache = f"{cache_ref.registry}/{repository}"
        if args.command == "push-cache":
            statuses = planner.push_layers(plan, store, client, repository, jobs=args.jobs, output=console)
            doc = {"cache": cache,
                   "layers": [{"name": l.name, "key": str(l.key), "status": statuses[l.name]} for l in plan.layers]}
        else:
            remote_plan, remotes = planner.remote_status(plan, client, repository, jobs=args.jobs)
            layers: list[dict[str, Any]] = []
            for layer in remote_plan.layers:
                remote = remotes.get(layer.name)
                size = registry.missing_bytes(store, [remote]) if remote is not None else 0
                status = {"cached": "cached", "pull": "pull", "build": "missing"}[layer.status]
                layers.append({"name": layer.name, "key": str(layer.key), "status": status, "bytes": size})
            doc = {"cache": cache, "layers": layers,
                   "bytes": registry.missing_bytes(store, remotes.values())}
            if not args.plan:
                done = planner.pull_layers(remote_plan, store, client, repository, remotes, jobs=args.jobs,
                                           output=console)
                for entry, layer in zip(layers, done.layers):
                    entry["status"] = layer.status
    doc["transfer"] = registries.stats.to_dict()
    doc["seconds"] = round(time.monotonic() - start, 3)
    if args.json:
        _print_json(doc)
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


def _login(args: argparse.Namespace, registries: registry.Registries) -> int:
    import getpass

    username = args.username or input("Username: ")
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = getpass.getpass("Password: ")
    if not username or not password:
        raise OcibuildError("login: a username and a password are needed", "give -u USER and the password")
    credentials = registry.Credentials(username, password)
    client = registry.Client(args.registry, insecure=args.registry in registries.insecure, credentials=credentials,
                             policy=registries.policy, env=registries.env)
    client.check_login()
    path = registry.save_credentials(args.registry, credentials, registries.env)
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


def _bundle_command(args: argparse.Namespace) -> int:
    """`export`, `import` and `inventory`: archives for air-gapped machines (see :mod:`ocibuild.archive`)."""
    from . import archive as oci_archive, planner

    _, store = _open(args)
    if args.command == "inventory":
        sys.stdout.buffer.write(oci_archive.inventory(store).to_json() + b"\n")
        return 0
    path = Path(args.path)
    if args.command == "import":
        imported = oci_archive.import_archive(store, path)
        doc = imported.to_dict()
        summary = (f"imported {imported.blobs} blobs ({imported.bytes / 1e6:.1f} MB; {imported.present} already "
                   f"present), {len(imported.tags)} tags, {imported.inputs} inputs into the download cache")
        if imported.untagged:
            summary += f"; {imported.untagged} untagged manifests (gc removes them)"
    else:
        since = None
        if args.since:
            try:
                since = oci_archive.Inventory.parse(Path(args.since).read_bytes(), args.since)
            except OSError as err:
                raise OcibuildError(f"--since {args.since}: {err.strerror}", "run `ocibuild inventory > FILE` "
                                    "on the machine the archive is for") from None
        inputs: list[oci_archive.InputFile] = []
        if args.all:
            if args.image_only:
                raise OcibuildError("--all and --image-only exclude each other", "choose one")
            tags = [d.ref_name for d in store.index().manifests if d.ref_name]
            inputs = oci_archive.downloaded_inputs(store)
        else:
            project = _project(args)
            if args.image_only:
                tags = [project.image.name]
            else:
                tags, inputs = planner.export_selection(_plan(argparse.Namespace(**{**vars(args), "offline": True}),
                                                              store), store)
        exported = oci_archive.export_archive(store, path, tags, inputs=inputs, since=since, sync=args.sync)
        doc = exported.to_dict()
        summary = (f"exported {len(exported.tags)} tags, {exported.blobs} blobs ({exported.bytes / 1e6:.1f} MB) "
                   f"to {path}" + (f"; {exported.skipped} blobs left out (--since)" if since is not None else ""))
    if args.json:
        _print_json(doc)
    else:
        print(summary)
    return 0


def _compile(args: argparse.Namespace, console: _Console) -> int:
    """`ocibuild run`: build (a no-op when cached), hand the image to the engine, run the command. Exits with the
    command's exit code; 125 when ocibuild fails before the command starts, as podman does."""
    from . import archive as oci_archive
    from .engine import BindMount

    try:
        config, store = _open(args)
        plan, result = _build(args, config, store, console)
        project = plan.project
        factory = _engine_factory(config, project, args.engine)
        command = [c for c in args.cmd if c != "--"] if args.cmd and args.cmd[0] == "--" else list(args.cmd)
        command = command or list(project.run.command)
        if not command:
            raise OcibuildError("nothing to run: [run] command is empty and no command was given",
                                "add [run] command = [...] to ocibuild.toml, or run `ocibuild run -- COMMAND`")
        engine = factory()
        mounts = [BindMount(project.root / m.host, m.container, m.read_only) for m in project.run.mounts]
        if args.source_mount:
            # the trees of copy layers, except a root filesystem copied to / (mounting over / is not a source)
            mounts += [BindMount(project.root / l.recipe.str_("from"), l.recipe.str_("to"))
                       for l in plan.layers if l.recipe.kind == "copy" and l.recipe.str_("to").rstrip("/")]
        for mount in mounts:
            if not mount.host.exists():
                mount.host.mkdir(parents=True)
        config_digest = store.get_manifest(result.image.digest).config.digest

        def archive() -> Path:
            path = store.private_dir("tmp") / f"{project.image.name}-{os.getpid()}.tar"
            oci_archive.write_oci_archive(store, result.image, project.image.name, path)
            return path

        image = engine.load_from_layout(store.root, project.image.name, config_digest.hex, archive)
        image_config = store.get_config(config_digest)
    except OcibuildError as err:
        _report(err, args.debug)
        return 125
    return engine.run_attached(image, command, mounts=mounts, env=project.run.env, workdir=image_config.workdir,
                               interactive=sys.stdin.isatty(), network=project.run.network and not args.offline)


def _write_output(store: Store, image: Descriptor, name: str, target: str) -> None:
    from . import archive as oci_archive

    if not target.startswith("oci-archive:"):
        raise OcibuildError(f"--output {target}: only oci-archive:PATH is supported", "write --output oci-archive:out.tar")
    oci_archive.write_oci_archive(store, image, name, Path(target.split(":", 1)[1]))


def _print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2) + "\n")


def _print_layers(doc: dict[str, Any], file: Any = None) -> None:
    out = file or sys.stdout
    width = max((len(layer["name"]) for layer in doc["layers"]), default=4)
    for layer in doc["layers"]:
        needs = ",".join(layer["needs"]) or "-"
        print(f"{layer['name']:<{width}}  {layer['kind']:<9}  {layer['key'][7:19]}  {layer['status']:<6}  needs: {needs}",
              file=out)


if __name__ == "__main__":
    sys.exit(main())
