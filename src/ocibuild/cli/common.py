"""What the commands share: the error report, the store and project a command works on, how many jobs, and
the printing of layers and JSON (progress is :mod:`.progress`'s)."""

from __future__ import annotations

import argparse
import errno
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import registry
from ..config import Config, load_config
from ..errors import OcibuildError
from ..recipe.project import Project, load_project
from ..store import Store

if TYPE_CHECKING:
    from ..engine import Engine

log = logging.getLogger("ocibuild")  # the name --debug has always shown before a traceback
_DEBUG_HINT = "run the command again with --debug to see where it happened"


#: A command: the parsed arguments in, the exit code out.
Command = Callable[[argparse.Namespace], int]


def report(err: OcibuildError, debug: bool) -> None:
    """The one place an error reaches the user: ``error:``, the failed step's output if any, ``hint:``."""
    if debug:
        log.exception("failed")
    print(f"error: {err}", file=sys.stderr)
    tail = getattr(err, "tail", "")
    if tail:
        print(tail, file=sys.stderr)
    if err.hint:
        print(f"hint: {err.hint}", file=sys.stderr)


def unexpected(err: Exception) -> OcibuildError:
    """An exception no module translated, as the one-line error of a failure the user can still act on: a disk
    that filled up, a permission, memory, an input nested too deeply; anything else is a bug to report."""
    if isinstance(err, OSError):
        where = f": {err.filename}" if err.filename else ""
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            hint = "free disk space and inodes on that file system (`ocibuild gc` removes unused blobs)"
        elif err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            hint = "check the permissions of that path"
        else:
            hint = _DEBUG_HINT
        return OcibuildError(f"{err.strerror or err}{where}", hint)
    if isinstance(err, MemoryError):
        return OcibuildError("out of memory", f"build fewer layers at once (--jobs), or free memory; {_DEBUG_HINT}")
    if isinstance(err, RecursionError):
        return OcibuildError("an input is nested too deeply to be read", _DEBUG_HINT)
    return OcibuildError(f"internal error: {type(err).__name__}: {err}",
                         "this is a bug in ocibuild: run the command again with --debug and report what it prints")


def open_store(args: argparse.Namespace) -> tuple[Config, Store]:
    config = load_config(args.store)
    return config, Store.open(config.store)


def project_of(args: argparse.Namespace) -> Project:
    return load_project(Path(args.project))


def registries_of(config: Config) -> registry.Registries:
    return registry.Registries(insecure=config.insecure_registries)


def transfer_jobs(args: argparse.Namespace) -> int:
    """Blobs transferred at once: --jobs, else the registry's default."""
    return int(args.jobs or registry.DEFAULT_JOBS)


def build_jobs(args: argparse.Namespace) -> int:
    """Layers built at once: --jobs, else by the cores and memory of the machine."""
    from ..threads import default_jobs

    return int(args.jobs or default_jobs())


def engine_factory(config: Config, project: Project, choice: str | None) -> Callable[[], Engine]:
    """Makes the container engine when asked: engine.py is imported only then (a no-op build never asks)."""

    def make() -> Engine:
        from ..engine import Engine

        return Engine.detect(choice or project.run.engine, config.engine_args)

    return make


def print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2) + "\n")


def print_layers(doc: dict[str, Any], file: Any = None) -> None:
    out = file or sys.stdout
    width = max((len(layer["name"]) for layer in doc["layers"]), default=4)
    for layer in doc["layers"]:
        needs = ",".join(layer["needs"]) or "-"
        key = layer["key"][7:19] if layer["key"] is not None else "-".ljust(12)  # None: waits for ocibuild.lock
        print(f"{layer['name']:<{width}}  {layer['kind']:<9}  {key}  {layer['status']:<6}  needs: {needs}", file=out)
