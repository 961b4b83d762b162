"""End to end, with real podman and Debian's archive: the default environment of this repository (layers/ and
ocibuild.toml) builds cold, compiles the example with `ocibuild run`, and rebuilds only what a change touches."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ocibuild.store import Store

pytestmark = [pytest.mark.e2e, pytest.mark.podman]
REPO = Path(__file__).resolve().parents[2]
OCIBUILD = [sys.executable, "-m", "ocibuild.cli"]


def ocibuild(project: Path, store: Path, command: str, *args: str, check: bool = True
             ) -> subprocess.CompletedProcess[str]:
    """``ocibuild COMMAND -C project --store store ARGS``: the options before ARGS, which may hold ``-- CMD``."""
    result = subprocess.run([*OCIBUILD, command, "-C", str(project), "--store", str(store), *args],
                            capture_output=True, text=True, timeout=2400)
    if check:
        assert result.returncode == 0, result.stderr[-4000:]
    return result


def statuses(project: Path, store: Path) -> dict[str, str]:
    doc = json.loads(ocibuild(project, store, "build", "--json").stdout)
    return {layer["name"]: layer["status"] for layer in doc["layers"]}


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A copy of the repository's default environment, built cold into a fresh store."""
    root = tmp_path_factory.mktemp("default-env")
    project = root / "project"
    project.mkdir()
    for name in ("ocibuild.toml", "layers", "examples"):
        source = REPO / name
        (shutil.copytree if source.is_dir() else shutil.copy)(source, project / name)
    store = root / "store"
    cold = statuses(project, store)
    assert cold == {n: "built" for n in ("base", "go", "lvm2", "tools", "source")}
    return project, store


def test_cold_build_has_no_conflicts_and_compiles_a_binary_that_runs(env: tuple[Path, Path]) -> None:
    project, store = env
    strict = ocibuild(project, store, "build", "--strict", "--json")
    assert "warnings" not in json.loads(strict.stdout)
    run = ocibuild(project, store, "run")
    assert "Created binary" in run.stdout
    binary = project / "bundles/0.1.0/binary/devmapper-version-0.1.0"
    assert binary.exists()
    sha = (project / "bundles/0.1.0/binary/devmapper-version-0.1.0.sha256").read_text().split()[0]
    assert sha == subprocess.run(["sha256sum", str(binary)], capture_output=True, text=True).stdout.split()[0]
    assert (project / "bundles/0.1.0/binary/devmapper-version-0.1.0.md5").exists()
    out = ocibuild(project, store, "run", "--", "sh", "-c",
                   "unset LD_LIBRARY_PATH; bundles/0.1.0/binary/devmapper-version; "
                   "dpkg -l golang-go libaio-dev go-md2man | grep -c '^ii'")
    lines = out.stdout.split("\n")
    assert lines[0].startswith("libdevmapper 1.02."), out.stdout
    assert lines[1] == "3", "dpkg -l must list the packages of go, lvm2 and tools"
    assert Store.open(store).verify() == []


def test_warm_rebuild_is_all_cached(env: tuple[Path, Path]) -> None:
    project, store = env
    assert set(statuses(project, store).values()) == {"cached"}


def test_source_change_rebuilds_only_source(env: tuple[Path, Path]) -> None:
    project, store = env
    main = project / "examples/devmapper-version/main.go"
    main.write_text(main.read_text() + "\n// edited\n")
    assert statuses(project, store) == {"base": "cached", "go": "cached", "lvm2": "cached", "tools": "cached",
                                        "source": "built"}


def test_lvm2_recipe_change_rebuilds_only_lvm2(env: tuple[Path, Path]) -> None:
    project, store = env
    script = project / "layers/lvm2/build.sh"
    script.write_text(script.read_text() + "# a change to the recipe\n")
    assert statuses(project, store) == {"base": "cached", "go": "cached", "lvm2": "built", "tools": "cached",
                                        "source": "cached"}
    out = ocibuild(project, store, "run", "--", "sh", "-c", "hack/make.sh binary >/dev/null && "
                   "bundles/0.1.0/binary/devmapper-version")
    assert out.stdout.startswith("libdevmapper 1.02.")
    assert Store.open(store).verify() == []
