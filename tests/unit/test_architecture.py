"""The architecture of ../shared/STYLE.md, enforced: data flows one way, and each third-party library is
imported by exactly one module (which translates its errors).

Modules are named by their dotted path inside the package (``tar.read``, ``cli.build``). In :data:`ALLOWED`, a
package's name stands for every module in it; a module may always import its own package's siblings only when
the table says so.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "ocibuild"

LEAVES = {"errors", "files", "threads"}
# module (or package: every module in it) -> the ocibuild modules or packages it may import
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "files": set(),
    "threads": {"errors"},
    "events": set(),  # what a build tells its caller while it runs: layer events, their plain lines
    "oci": {"errors"},
    "config": {"errors", "files"},
    "recipe": LEAVES | {"oci"},  # schema, project, lock, key: the recipe format, ocibuild.lock, cache keys
    "tar": LEAVES | {"oci"},  # write, read (the one parser), extract, codecs
    "store": LEAVES | {"oci"},
    "globs": set(),  # ignore patterns, matched in linear time
    "inputs": LEAVES | {"oci", "globs"},
    "net": LEAVES | {"oci", "store"},
    "registry": LEAVES | {"oci", "store", "net"},
    "archive": LEAVES | {"oci", "store", "tar"},  # oci-archive export and import
    "engine": LEAVES | {"oci"},
    "engineimages": LEAVES | {"oci", "store", "engine", "archive"},  # what ocibuild loaded into an engine
    "runcache": LEAVES | {"store"},  # the cache directories of the compile step and of run layers, in the store
    "bookkeeping": LEAVES | {"oci", "store"},  # package bookkeeping files, and each layer's record of them
    "doctor": LEAVES | {"config", "engine"},
    "resolve": LEAVES | {"oci", "recipe", "tar", "store", "inputs", "net", "registry"},
    "build": LEAVES | {"oci", "recipe", "tar", "store", "inputs", "net", "registry", "archive", "engine",
                       "engineimages", "resolve", "bookkeeping", "runcache"},
    "planner": LEAVES | {"oci", "recipe", "store", "inputs", "registry", "engine", "resolve", "build",
                         "bookkeeping", "events"},
    "teamcache": LEAVES | {"oci", "recipe", "store", "registry", "planner"},
    "explain": LEAVES | {"oci", "recipe", "store", "planner"},  # `ocibuild explain`: key documents compared
    "cli": {"*"},
}
# inside a package: module -> the siblings it may import (the package's own __init__ is named by the package)
INSIDE: dict[str, set[str]] = {
    "store.layout": set(),  # oci-layout, index.json, tags, locks
    "store.scratch": {"store.layout"},  # temporary files held under a flock, and the sweep of those left behind
    "store.content": {"store.layout", "store.scratch"},  # blobs in and out
    "store.maintenance": {"store.layout", "store.content", "store.entries"},  # verify, gc
    "store.repair": {"store.layout", "store.content", "store.maintenance"},  # verify --repair
    "store.entries": {"store"},  # the cache-entry format, on the Store facade
    "archive.contents": set(),  # input artifacts, the download cache, inventories, a manifest's closure
    "archive.export": {"archive.contents"},  # writing
    "archive.importing": {"archive.contents"},  # reading, checked
    "registry.transport": set(),  # one registry's HTTP side: scheme, auth, retries, errors of responses
    "registry.upload": {"registry.transport"},  # a blob going up: one PUT, or PATCH chunks that resume
    "registry.client": {"registry.transport", "registry.upload"},  # the distribution API calls; Registries
    "registry.images": set(),  # whole images, on any Distribution
}
# third-party library -> the one module that wraps it
OWNERS = {"zstandard": "tar.codecs", "isal": "tar.codecs", "python_on_whales": "engine", "http": "net.http",
          "ssl": "net.http", "requests": None, "urllib3": None, "oras": None, "h11": None}


def modules() -> dict[str, Path]:
    """Dotted name (relative to the package) -> file, for every module but the package's own __init__."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if parts:
            found[".".join(parts)] = path
    return found


def imports(name: str, path: Path) -> tuple[set[str], set[str]]:
    """(ocibuild modules as dotted names, top-level third-party or stdlib packages) imported anywhere in it."""
    package = name.split(".")[:-1] if path.name != "__init__.py" else name.split(".")
    ours, others = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                stem = [*base, *(node.module.split(".") if node.module else [])]
                if node.module:
                    ours.add(".".join(stem))
                else:
                    ours.update(".".join([*stem, alias.name]) for alias in node.names)
            elif node.module and node.module.split(".")[0] == "ocibuild":
                ours.add(".".join(node.module.split(".")[1:]) or "__version__")
            elif node.module:
                others.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            others.update(alias.name.split(".")[0] for alias in node.names)
    return ours - {"__version__", ""}, others


def rule(name: str) -> set[str] | None:
    """The row of ALLOWED for a module: its own, else its package's."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        row = ALLOWED.get(".".join(parts[:i]))
        if row is not None:
            return row
    return None


def permitted(target: str, row: set[str], own_package: str) -> bool:
    if "*" in row or target.split(".")[0] == own_package and own_package in row:
        return True
    parts = target.split(".")
    return any(".".join(parts[:i]) in row for i in range(1, len(parts) + 1))


def test_modules_import_only_in_the_direction_of_the_data() -> None:
    for name, path in modules().items():
        row = rule(name)
        assert row is not None, f"{path.relative_to(PACKAGE)} has no place in the architecture table"
        ours, _ = imports(name, path)
        own_package = name.split(".")[0] if "." in name or path.name == "__init__.py" else ""
        wrong = sorted(t for t in ours if t.split(".")[0] != own_package and not permitted(t, row, own_package))
        assert not wrong, f"{name} imports {wrong} against the direction"


def test_modules_of_a_package_import_their_siblings_in_one_direction() -> None:
    found = modules()
    for name, row in INSIDE.items():
        assert name in found, f"{name} is in INSIDE but not in the package"
        package = name.split(".")[0]
        ours, _ = imports(name, found[name])
        siblings = {t for t in ours if t.split(".")[0] == package and t != name}
        # `from . import Store` reads as store.Store: a name of the package's __init__
        wrong = sorted(t for t in siblings if t not in row and (t in found or t.rsplit(".", 1)[0] not in row))
        assert not wrong, f"{name} imports {wrong}, against the direction inside {package}"


def test_each_library_is_wrapped_by_one_module() -> None:
    for name, path in modules().items():
        _, others = imports(name, path)
        for library, owner in OWNERS.items():
            if library in others:
                assert name == owner, f"{name} imports {library}, which only {owner} may import"


def test_only_the_cli_prints() -> None:
    """Output reaches the terminal through callbacks the CLI passes in. The one exception is the capture step's
    entry point, a process of its own inside `podman unshare`, which reports its result to its parent."""
    for name, path in modules().items():
        if name == "cli" or name.startswith("cli."):
            continue
        tree = ast.parse(path.read_text())
        allowed: set[int] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and node.name == "_capture_main":
                allowed.update(range(node.lineno, (node.end_lineno or node.lineno) + 1))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                assert node.lineno in allowed, f"{name}:{node.lineno} prints; pass an output callback instead"


def test_the_checker_resolves_relative_imports_in_packages(tmp_path: Path) -> None:
    """The checker itself: a sibling import inside a package and a parent import resolve to dotted names."""
    module = tmp_path / "read.py"
    module.write_text("from .codecs import x\nfrom ..oci import Digest\nfrom .. import errors\nimport zstandard\n")
    assert imports("tar.read", module) == ({"tar.codecs", "oci", "errors"}, {"zstandard"})
