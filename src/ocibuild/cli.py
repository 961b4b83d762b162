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
from typing import Any

from . import __version__, bundle, doctor, planner
from .config import Config, load_config
from .engine import BindMount, Engine
from .errors import OcibuildError
from .inputs import StatCache
from .oci import Descriptor
from .planner import Plan
from .recipe import Project, load_lock, load_project
from .store import Store

log = logging.getLogger("ocibuild")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ocibuild", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--version", action="version", version=f"ocibuild {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-C", "--project", default=".", help="project directory (default: .)")
    common.add_argument("--store", help="local OCI layout store (default: $OCIBUILD_STORE or ~/.cache/ocibuild/store)")
    common.add_argument("--debug", action="store_true", help="log details and show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("plan", parents=[common], help="show each layer's key and whether it is cached")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--offline", action="store_true", help="never touch the network")

    p = sub.add_parser("build", parents=[common], help="build missing layers and assemble the image")
    p.add_argument("--json", action="store_true", help="print the result as JSON (progress goes to stderr)")
    p.add_argument("--offline", action="store_true", help="never touch the network")
    p.add_argument("--strict", action="store_true", help="fail when independent layers write the same path")
    p.add_argument("--output", metavar="oci-archive:PATH", help="also write the image as an oci-archive")
    p.add_argument("--engine", choices=("auto", "podman", "nerdctl"), help="container engine for run layers")

    p = sub.add_parser("run", parents=[common], help="run the compile step (or COMMAND) in the assembled image")
    p.add_argument("--engine", choices=("auto", "podman", "nerdctl"), help="container engine (default: [run] engine)")
    p.add_argument("--offline", action="store_true", help="never touch the network")
    p.add_argument("--source-mount", action="store_true",
                   help="bind-mount the live trees of copy layers instead of their baked layers")
    p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- COMMAND", help="command instead of [run] command")

    p = sub.add_parser("doctor", parents=[common], help="check the engine, runtime, cgroups, ulimits, subuid, mmdebstrap")
    p.add_argument("--engine", choices=("auto", "podman", "nerdctl"), default="auto")

    p = sub.add_parser("lock", parents=[common], help="resolve moving inputs (image tags, suites) into ocibuild.lock")
    p.add_argument("layers", nargs="*", help="refresh only these layers (default: all)")

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


def _plan(args: argparse.Namespace, store: Store) -> Plan:
    project = _project(args)
    lock = load_lock(project.root)
    resolved = planner.resolve_lock(project, lock, offline=getattr(args, "offline", False))
    if resolved != lock:
        planner.write_lock(project, resolved)
    cache = StatCache(store.private_dir("statcache") / "files.json")
    plan = planner.make_plan(project, store, resolved, cache)
    cache.save()
    return plan


def _run(args: argparse.Namespace) -> int:
    console = _Console()
    if args.command == "plan":
        _, store = _open(args)
        plan = _plan(args, store)
        if args.json:
            _print_json(plan.to_dict())
        else:
            _print_layers(plan.to_dict())
        return 0
    if args.command == "build":
        config, store = _open(args)
        plan = _plan(args, store)
        result = planner.build(plan, store, offline=args.offline, strict=args.strict, output=console,
                               engine=_engine_factory(config, plan.project, args.engine))
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
        project = _project(args)
        lock = planner.resolve_lock(project, load_lock(project.root), refresh=args.layers or project.layer_names)
        planner.write_lock(project, lock)
        for entry in sorted(lock.entries.values(), key=lambda e: e.layer):
            print(f"{entry.layer}: {entry.source} {entry.digest}")
        return 0
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


def _compile(args: argparse.Namespace, console: _Console) -> int:
    """`ocibuild run`: build (a no-op when cached), hand the image to the engine, run the command. Exits with the
    command's exit code; 125 when ocibuild fails before the command starts, as podman does."""
    try:
        config, store = _open(args)
        plan = _plan(args, store)
        project = plan.project
        factory = _engine_factory(config, project, args.engine)
        result = planner.build(plan, store, offline=args.offline, output=console, engine=factory)
        command = [c for c in args.cmd if c != "--"] if args.cmd and args.cmd[0] == "--" else list(args.cmd)
        command = command or list(project.run.command)
        if not command:
            raise OcibuildError("nothing to run: [run] command is empty and no command was given",
                                "add [run] command = [...] to ocibuild.toml, or run `ocibuild run -- COMMAND`")
        engine = factory()
        mounts = [BindMount(project.root / m.host, m.container, m.read_only) for m in project.run.mounts]
        if args.source_mount:
            mounts += [BindMount(project.root / l.recipe.str_("from"), l.recipe.str_("to"))
                       for l in plan.layers if l.recipe.kind == "copy"]
        for mount in mounts:
            if not mount.host.exists():
                mount.host.mkdir(parents=True)
        config_digest = store.get_manifest(result.image.digest).config.digest

        def archive() -> Path:
            path = store.private_dir("tmp") / f"{project.image.name}-{os.getpid()}.tar"
            bundle.write_oci_archive(store, result.image, project.image.name, path)
            return path

        image = engine.load_from_layout(store.root, project.image.name, config_digest.hex, archive)
        image_config = store.get_config(config_digest)
    except OcibuildError as err:
        _report(err, args.debug)
        return 125
    return engine.run_attached(image, command, mounts=mounts, env=project.run.env, workdir=image_config.workdir,
                               interactive=sys.stdin.isatty(), network=project.run.network)


def _write_output(store: Store, image: Descriptor, name: str, target: str) -> None:
    if not target.startswith("oci-archive:"):
        raise OcibuildError(f"--output {target}: only oci-archive:PATH is supported", "write --output oci-archive:out.tar")
    bundle.write_oci_archive(store, image, name, Path(target.split(":", 1)[1]))


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
