"""What the commands share: the error report, the store and project a command works on, how many jobs, and
the printing of layers and JSON (progress is :mod:`.progress`'s)."""

from __future__ import annotations

import argparse
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
