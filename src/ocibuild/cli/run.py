"""`run` and `doctor`: the container engine's side, the compile step in the assembled image and the checks of
the host that runs it."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..config import load_config
from ..errors import OcibuildError
from .build import build_project
from .common import engine_factory, open_store, report


def run_command(args: argparse.Namespace) -> int:
    """`ocibuild run`: build (a no-op when cached), hand the image to the engine, run the command. Exits with the
    command's exit code; 125 when ocibuild fails before the command starts, as podman does."""
    from ..archive import write_oci_archive
    from ..engine import BindMount

    try:
        config, store = open_store(args)
        plan, result = build_project(args, config, store)
        project = plan.project
        factory = engine_factory(config, project, args.engine)
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
            write_oci_archive(store, result.image, project.image.name, path)
            return path

        image = engine.load_from_layout(store.root, project.image.name, config_digest.hex, archive)
        image_config = store.get_config(config_digest)
    except OcibuildError as err:
        report(err, args.debug)
        return 125
    return engine.run_attached(image, command, mounts=mounts, env=project.run.env, workdir=image_config.workdir,
                               interactive=sys.stdin.isatty(), network=project.run.network and not args.offline)


def doctor_command(args: argparse.Namespace) -> int:
    from .. import doctor

    checks = doctor.run_checks(load_config(args.store), args.engine)
    for check in checks:
        print(f"{'ok  ' if check.ok else 'FAIL'} {check.name}: {check.detail}")
        if not check.ok and check.fix:
            print(f"     fix: {check.fix}")
    failed = [c for c in checks if not c.ok]
    if failed:
        raise OcibuildError(f"{len(failed)} check(s) failed", "apply the fixes above, then run `ocibuild doctor` again")
    return 0
