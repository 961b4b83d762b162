"""`run`, `shell` and `doctor`: the container engine's side, the compile step (or a shell) in the assembled image
and the checks of the host that runs it.

The compile step's container: the image's workdir; mounts from ``[run] mounts`` (inside the project, checked when
the recipe is read), the copy layers' trees with ``--source-mount``, the ``[run] caches`` directories of the store,
then the user's own ``-v`` (any host path: the user typed it, a cloned recipe did not), which replaces a mount of
the same container path; environment ``[run] env``, then ``[run] pass_env`` and ``-e`` (later wins).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import load_config
from ..errors import OcibuildError
from ..recipe.project import ENV_NAME, RunSpec
from .build import build_project
from .common import engine_factory, open_store, project_of, report, unexpected

if TYPE_CHECKING:
    from ..engine import BindMount
    from ..recipe.project import LayerRecipe, Project
    from ..store import Store

#: `ocibuild shell`: bash where the image has it (as Docker's `make shell`), else sh; commands from stdin when
#: it is not a terminal.
SHELL = ("/bin/sh", "-c", "if command -v bash >/dev/null 2>&1; then exec bash; else exec sh; fi")


def add_options(p: argparse.ArgumentParser) -> None:
    """The options `run` and `shell` share."""
    p.add_argument("--engine", choices=("auto", "podman", "nerdctl"), help="container engine (default: [run] engine)")
    p.add_argument("--offline", action="store_true", help="never touch the network")
    p.add_argument("--source-mount", action="store_true",
                   help="bind-mount the live trees of copy layers (except one copied to /) over their baked layers")
    p.add_argument("-e", "--env", action="append", type=env_option, default=[], metavar="NAME[=VALUE]",
                   help="set NAME, or pass the host's NAME (skipped when unset); repeatable")
    p.add_argument("-v", "--volume", action="append", type=volume_option, default=[],
                   metavar="HOST:CONTAINER[:ro]", help="bind-mount a host path (any path); repeatable")
    p.add_argument("--privileged", action="store_true",
                   help="give the container every privilege, as `make test` needs (not rootless)")


def env_option(text: str) -> tuple[str, str | None]:
    """``-e NAME[=VALUE]``: (NAME, VALUE), or (NAME, None) for the host's value."""
    name, sep, value = text.partition("=")
    if not ENV_NAME.fullmatch(name):
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME or NAME=VALUE")
    return name, value if sep else None


def volume_option(text: str) -> tuple[Path, str, bool]:
    """``-v HOST:CONTAINER[:ro|rw]``: (absolute host path, container path, read-only). A relative HOST is relative
    to the current directory, as for every path on the command line."""
    parts = text.split(":")
    if len(parts) not in (2, 3) or not parts[0] or not parts[1].startswith("/") or \
            len(parts) == 3 and parts[2] not in ("ro", "rw"):
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:CONTAINER[:ro] (CONTAINER an absolute path)")
    return Path(parts[0]).expanduser().absolute(), parts[1], len(parts) == 3 and parts[2] == "ro"


def compile_env(run: RunSpec, options: Sequence[tuple[str, str | None]],
                host: Mapping[str, str]) -> dict[str, str | None]:
    """The compile step's environment: ``[run] env``, then ``[run] pass_env``, then ``-e`` (a later one wins). A
    value of None is passed by name from the host (the engine reads it; it is not on its command line); a name
    the host does not set is skipped."""
    env: dict[str, str | None] = dict(run.env)
    for name, value in [(name, None) for name in run.pass_env] + list(options):
        if value is not None:
            env[name] = value
        elif name in host:
            env[name] = None
    return env


def run_command(args: argparse.Namespace) -> int:
    """`ocibuild run`: build (a no-op when cached), hand the image to the engine, run the command. Exits with the
    command's exit code; 125 when ocibuild fails before the command starts, as podman does."""
    command = args.cmd[1:] if args.cmd[:1] == ["--"] else list(args.cmd)
    return _in_container(args, command, shell=False)


def shell_command(args: argparse.Namespace) -> int:
    """`ocibuild shell`: as `run`, with an interactive shell for the command (``-it`` on a terminal)."""
    return _in_container(args, list(SHELL), shell=True)


def _in_container(args: argparse.Namespace, command: list[str], *, shell: bool) -> int:
    """Build (a no-op when cached), make sure the engine holds the image, then hand the process over to the
    engine (exec): from there signals, terminal and exit code are the engine's own. Nothing on the no-op path
    imports python-on-whales: the engine's id of the image comes from the record of what ocibuild loaded (see
    :mod:`ocibuild.engineimages`), and the one question to the engine — does it still hold it? — runs while
    ocibuild plans. Only when the engine would create mount points in a mounted host tree does ocibuild stay,
    as the engine's parent, to remove them afterwards (see :func:`engine.created_mount_points`)."""
    from .. import engineimages
    from ..engine import created_mount_points, remove_mount_points

    try:
        config, store = open_store(args)
        project = project_of(args)
        engine = engine_factory(config, project, args.engine)()
        privileged = args.privileged or project.run.privileged
        if privileged:
            engine.check_privileged()
        command = command or list(project.run.command)
        if not command:
            raise OcibuildError("nothing to run: [run] command is empty and no command was given",
                                "add [run] command = [...] to ocibuild.toml, or run `ocibuild run -- COMMAND`")
        mounts = _mounts(args, project, store, engine.name)
        image_project = _without_mounted(project) if args.source_mount else project
        name = engineimages.image_name(image_project.image.name, store)
        recorded = engineimages.loaded(store, engine, name)
        present = engine.has_image_later(recorded) if recorded else lambda: False
        try:
            _, result = build_project(args, config, store, project=image_project)
        finally:
            held = present()  # waited for in any case: no process left behind
        config_digest = store.get_manifest(result.image.digest).config.digest
        image = config_digest.hex
        if not held or recorded != image:
            image = engineimages.load(store, engine, image_project.image.name, result.image, name,
                                      present=None if recorded != image else False)
        stdin_tty = sys.stdin.isatty()
        env = compile_env(project.run, args.env, os.environ)
        argv = engine.run_command_line(image, command, mounts=mounts, env=env,
                                       workdir=store.get_config(config_digest).workdir,
                                       interactive=shell or stdin_tty, tty=stdin_tty if shell else None,
                                       network=project.run.network and not args.offline, privileged=privileged)
        created = created_mount_points(mounts)
        if not created:
            engine.hand_over(argv)
        return engine.supervise(argv, after=lambda: remove_mount_points(created))
    except Exception as err:  # (ours, or one no module translated: see `unexpected`)
        report(err if isinstance(err, OcibuildError) else unexpected(err), args.debug)
        return 125


def _without_mounted(project: Project) -> Project:
    """`--source-mount`'s project: the copy layers it mounts left out (except one a kept layer needs), so an
    edit of their trees rebuilds nothing, under the image name ``NAME-source-mount`` (the store's ``NAME`` stays
    the whole image). Environment and workdir are the project's."""
    from ..engineimages import SOURCE_MOUNT

    mounted = {layer.name for layer in _mounted_layers(project)}
    needed = set().union(*(project.closure(l.name) for l in project.layers if l.name not in mounted))
    kept = tuple(l for l in project.layers if l.name not in mounted or l.name in needed)
    image = replace(project.image, name=project.image.name + SOURCE_MOUNT, layers=tuple(l.name for l in kept))
    return replace(project, image=image, layers=kept)


def _mounted_layers(project: Project) -> list[LayerRecipe]:
    """The copy layers ``--source-mount`` mounts: every one but a root filesystem copied to / (mounting over /
    is not a source)."""
    return [l for l in project.layers if l.kind == "copy" and l.str_("to").rstrip("/")]


def _mounts(args: argparse.Namespace, project: Project, store: Store, engine: str) -> list[BindMount]:
    from .. import runcache
    from ..engine import BindMount

    mounts = [BindMount(project.root / m.host, m.container, m.read_only) for m in project.run.mounts]
    if args.source_mount:
        mounts += [BindMount(project.root / l.str_("from"), l.str_("to")) for l in _mounted_layers(project)]
    for mount in mounts:
        if not mount.host.exists():
            mount.host.mkdir(parents=True)
    mounts += [BindMount(host, path) for host, path in runcache.prepare(store, project.root, engine,
                                                                         project.run.caches)]
    own = [BindMount(host, container, read_only) for host, container, read_only in args.volume]
    for mount in own:
        if not mount.host.exists():
            raise OcibuildError(f"-v {mount.to_arg()}: {mount.host} does not exist",
                                "create it first, or fix the path (ocibuild creates only [run] mounts)")
    replaced = {m.container.rstrip("/") for m in own}
    return [m for m in mounts if m.container.rstrip("/") not in replaced] + own


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
