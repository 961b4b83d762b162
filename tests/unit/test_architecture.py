"""The architecture of ../shared/STYLE.md, enforced: data flows one way, and each third-party library is
imported by exactly one module (which translates its errors)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "ocibuild"

# module -> the ocibuild modules it may import
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "oci": {"errors"},
    "bookkeeping": set(),
    "config": {"errors"},
    "recipe": {"oci", "errors"},
    "tarlayer": {"oci", "errors"},
    "store": {"oci", "errors"},
    "inputs": {"oci", "errors"},
    "transport": set(),
    "registry": {"oci", "store", "errors", "transport"},
    "bundle": {"oci", "store", "tarlayer", "errors"},
    "engine": {"oci", "errors"},
    "doctor": {"config", "engine", "errors"},
    "builders": {"errors", "oci", "recipe", "tarlayer", "store", "inputs", "registry", "bundle", "engine"},
    "planner": {"errors", "oci", "recipe", "tarlayer", "store", "inputs", "registry", "bundle", "engine",
                "builders", "bookkeeping"},
}
# third-party library -> the one module that wraps it
OWNERS = {"zstandard": "tarlayer", "isal": "tarlayer", "python_on_whales": "engine", "http": "transport",
          "ssl": "transport", "requests": None, "urllib3": None, "oras": None}


def imports(module: Path) -> tuple[set[str], set[str]]:
    """(ocibuild modules, top-level third-party or stdlib packages) imported anywhere in ``module``."""
    ours, others = set(), set()
    for node in ast.walk(ast.parse(module.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                if node.module:
                    ours.add(node.module.split(".")[0])
                else:
                    ours.update(alias.name for alias in node.names)
            elif node.module:
                (ours if node.module.startswith("ocibuild") else others).add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            others.update(alias.name.split(".")[0] for alias in node.names)
    return ours - {"__version__"}, others


def test_modules_import_only_in_the_direction_of_the_data() -> None:
    for path in sorted(PACKAGE.glob("*.py")):
        name = path.stem
        if name in ("__init__", "cli"):
            continue
        assert name in ALLOWED, f"{name}.py has no place in the architecture table"
        ours, _ = imports(path)
        assert ours <= ALLOWED[name], f"{name}.py imports {sorted(ours - ALLOWED[name])} against the direction"


def test_each_library_is_wrapped_by_one_module() -> None:
    for path in sorted(PACKAGE.glob("*.py")):
        _, others = imports(path)
        for library, owner in OWNERS.items():
            if library in others:
                assert path.stem == owner, f"{path.name} imports {library}, which only {owner}.py may import"


def test_only_the_cli_prints() -> None:
    """Output reaches the terminal through callbacks the CLI passes in. The one exception is the capture step's
    entry point, a process of its own inside `podman unshare`, which reports its result to its parent."""
    for path in sorted(PACKAGE.glob("*.py")):
        if path.stem == "cli":
            continue
        tree = ast.parse(path.read_text())
        allowed: set[int] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and (path.stem, node.name) == ("builders", "_capture_main"):
                allowed.update(range(node.lineno, (node.end_lineno or node.lineno) + 1))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                assert node.lineno in allowed, f"{path.name}:{node.lineno} prints; pass an output callback instead"
