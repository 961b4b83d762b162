"""The parser of the command line and the table that hands each command to the function that carries it out."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from .. import __version__, registry
from . import airgap, build, explain, run, transfer
from .common import Command

# What `ocibuild --help` says about the tool, before and after the list of commands.
DESCRIPTION = (
    "ocibuild builds a project's development environment as explicit OCI layers, without a daemon. Each layer "
    "(a Debian base, a toolchain, tools, the source) is a folder under layers/ with its own cache key, so a change "
    "rebuilds only that layer and the layers that need it. Layers live in a local OCI image layout, the store, "
    "that skopeo, umoci and podman read; they are shared through any OCI registry or an air-gapped archive, and "
    "`ocibuild run` runs the compile step in the image with podman."
)
EPILOG = """\
common commands:
  ocibuild plan               each layer's key and status (cached, pull, build)
  ocibuild build              build what changed, assemble the image
  ocibuild build LAYER...     only these layers and what they need, no image
  ocibuild explain LAYER      why a layer is not cached: what changed since its last entry
  ocibuild run [-- CMD...]    build if needed, run the compile step (or CMD)
  ocibuild shell              an interactive shell in the image, set up as for run
  ocibuild push-cache REF     push the built layers to a registry cache
  ocibuild pull-cache REF     fetch the layers this project needs from it

Global options (-C, --store, --debug, -q) go before or after the command. `ocibuild COMMAND --help` describes a \
command; the README describes the recipes."""

COMMANDS: dict[str, Command] = {
    "plan": build.plan_command, "build": build.build_command, "explain": explain.explain_command,
    "lock": build.lock_command,
    "verify": build.verify_command, "gc": build.gc_command,
    "run": run.run_command, "shell": run.shell_command, "doctor": run.doctor_command,
    "push": transfer.push_command, "push-cache": transfer.push_cache_command,
    "pull-cache": transfer.pull_cache_command, "login": transfer.login_command,
    "export": airgap.export_command, "import": airgap.import_command, "inventory": airgap.inventory_command,
}


def dispatch(args: argparse.Namespace) -> int:
    """Carry out the parsed command; its exit code."""
    return COMMANDS[args.command](args)


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ocibuild", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=_Formatter)
    parser.add_argument("--version", action="version", version=f"ocibuild {__version__}")
    _global_options(parser, top=True)
    common = argparse.ArgumentParser(add_help=False)
    _global_options(common, top=False)
    transfer_options = argparse.ArgumentParser(add_help=False)
    transfer_options.add_argument("--jobs", type=_jobs, default=registry.DEFAULT_JOBS,
                                  help=f"blobs transferred in parallel (default: {registry.DEFAULT_JOBS})")
    build_options = argparse.ArgumentParser(add_help=False)
    build_options.add_argument("--jobs", type=_jobs, default=None,
                               help="layers built at once (default: one per core, fewer when memory is short), and "
                                    f"blobs transferred at once (default: {registry.DEFAULT_JOBS})")
    cache = argparse.ArgumentParser(add_help=False)
    cache.add_argument("--cache", metavar="REF", help="registry repository of the layer cache (default: [cache] ref)")

    sub = Subparsers(parser.add_subparsers(title="commands", dest="command", required=True, metavar="COMMAND"))
    # in the order `ocibuild --help` lists them
    _build_commands(sub, common, cache, transfer_options, build_options)
    _registry_commands(sub, common, cache, transfer_options)
    _store_commands(sub, common)
    return parser


class _Formatter(argparse.HelpFormatter):
    """Wraps each paragraph of the description and epilog to the terminal, but keeps a block of indented lines
    (the examples) as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "\n\n".join(part if "\n " in part else super(_Formatter, self)._fill_text(part, width, indent)
                           for part in text.split("\n\n"))


class Subparsers:
    """The subcommands: each one's line in `ocibuild --help` is also the description its own --help starts with."""

    def __init__(self, action: Any) -> None:  # argparse._SubParsersAction, which typeshed keeps private
        self.action = action

    def add_parser(self, name: str, *, help: str, parents: Sequence[argparse.ArgumentParser] = ()
                   ) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = self.action.add_parser(
            name, help=help, description=f"ocibuild {name}: {help}.", parents=list(parents))
        return parser



def _global_options(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """-C, --store, --debug and -q, before the command (``top``, as `git -C` and `podman --root`) and after it.
    After the command they default to SUPPRESS: argparse then leaves out what was not given there, so a value
    given before the command survives (one given after it wins)."""
    def default(value: Any) -> Any:
        return value if top else argparse.SUPPRESS

    parser.add_argument("-C", "--project", metavar="DIR", default=default("."), help="project directory (default: .)")
    parser.add_argument("--store", metavar="DIR", default=default(None),
                        help="local OCI layout store (default: $OCIBUILD_STORE or ~/.cache/ocibuild/store)")
    parser.add_argument("--debug", action="store_true", default=default(False), help="log details and show tracebacks")
    parser.add_argument("-q", "--quiet", action="store_true", default=default(False),
                        help="no progress: only results and errors")


def _build_commands(sub: Subparsers, common: argparse.ArgumentParser, cache: argparse.ArgumentParser,
                    transfer: argparse.ArgumentParser, building: argparse.ArgumentParser) -> None:
    """plan, build, explain, run, shell, doctor, lock (``building``: the --jobs of the commands that build layers)."""
    p = sub.add_parser("plan", parents=[common, cache, transfer],
                       help="show each layer's key and whether it is cached (or can be pulled)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--offline", action="store_true", help="never touch the network")

    p = sub.add_parser("build", parents=[common, cache, building], help="build missing layers and assemble the image")
    p.add_argument("layers", nargs="*", metavar="LAYER", help="only these layers and the layers they need (pulled "
                   "from the team cache or built), and no image")
    p.add_argument("--json", action="store_true", help="print the result as JSON (progress goes to stderr)")
    p.add_argument("--offline", action="store_true", help="never touch the network")
    p.add_argument("--strict", action="store_true", help="fail when independent layers write the same path")
    p.add_argument("--output", metavar="oci-archive:PATH", help="also write the image as an oci-archive")
    p.add_argument("--engine", choices=("auto", "podman", "nerdctl"), help="container engine for run layers")

    p = sub.add_parser("explain", parents=[common, cache, transfer],
                       help="why a layer is not cached: what in its key differs from its last entry in the store "
                            "(or the cache)")
    p.add_argument("layer", metavar="LAYER", help="a layer of ocibuild.toml")
    p.add_argument("--json", action="store_true", help="print the explanation as JSON")
    p.add_argument("--offline", action="store_true", help="never touch the network: look only in the store")

    p = sub.add_parser("run", parents=[common, cache, building],
                       help="run the compile step (or COMMAND) in the assembled image")
    run.add_options(p)
    p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- COMMAND", help="command instead of [run] command")
    p = sub.add_parser("shell", parents=[common, cache, building],
                       help="an interactive shell in the assembled image, set up as for the compile step")
    run.add_options(p)

    p = sub.add_parser("doctor", parents=[common], help="check the engine, runtime, cgroups, ulimits, subuid, mmdebstrap")
    p.add_argument("--engine", choices=("auto", "podman", "nerdctl"), default="auto")

    p = sub.add_parser("lock", parents=[common], help="resolve moving inputs (image tags, suites) into ocibuild.lock")
    p.add_argument("layers", nargs="*", help="refresh only these layers (default: all)")


def _registry_commands(sub: Subparsers, common: argparse.ArgumentParser, cache: argparse.ArgumentParser,
                       transfer: argparse.ArgumentParser) -> None:
    """push-cache, pull-cache, push, login."""
    p = sub.add_parser("push-cache", parents=[common, transfer], help="push every layer of the store to the cache")
    p.add_argument("ref", nargs="?", metavar="REF", help="registry repository (default: --cache or [cache] ref)")
    p.add_argument("--cache", metavar="REF", dest="cache_option", help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p = sub.add_parser("pull-cache", parents=[common, cache, transfer],
                       help="fetch the missing layers whose keys match this project's recipes")
    p.add_argument("ref", nargs="?", metavar="REF", help="registry repository (default: --cache or [cache] ref)")
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


def _store_commands(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    """export, import, inventory, verify, gc."""
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

    p = sub.add_parser("verify", parents=[common], help="check every blob and reference in the store")
    p.add_argument("--repair", action="store_true", help="remove what is damaged (corrupt blobs, then the tags and "
                   "cache entries that reach a problem), naming each, until the store verifies")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p = sub.add_parser("gc", parents=[common], help="remove blobs no tag or cache entry reaches")
    p.add_argument("--caches", action="store_true", help="also remove the caches of the compile step ([run] caches) and of run "
                   "layers (caches in layer.toml)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def _jobs(text: str) -> int:
    """``--jobs``; argparse names this function in its message for a value that is not a number."""
    value = int(text)
    if not 1 <= value <= 64:
        raise argparse.ArgumentTypeError("--jobs must be between 1 and 64")
    return value
