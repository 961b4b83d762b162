"""The whole CLI over a corpus of hostile or careless inputs: no hang, no traceback, nothing written where it should
not be; each refusal one ``error:`` line naming the file, with a hint.

Every case hung or raised a traceback before (a fifo opened for reading waits for a writer; /dev/zero never ends;
a pattern backtracked; a deep TOML file overflowed the parser's recursion; a full disk raised OSError). Each runs
``python -m ocibuild.cli`` in a subprocess, bounded in time (a hang fails the case) and in memory (a read without
end fails it too, instead of filling the machine).
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ocibuild import cli
from ocibuild.errors import RegistryError
from ocibuild.net.auth import find_credentials
from ocibuild.store import Store

COPY = 'kind = "copy"\nfrom = "src"\nto = "/src"\n'
DEEP = "x = " + "[" * 20_000 + "]" * 20_000 + "\n"
MEMORY = 2 << 30  # address space of each run: an endless read fails at it rather than swapping the host
HANG = 60  # seconds: every case takes about one; a hang is what this bounds, not speed


@dataclass(frozen=True)
class Run:
    """What a case sets up: the arguments, extra environment, and what its one error line must name (None: the
    input is valid and the command succeeds)."""

    args: list[str]
    names: str | None
    env: dict[str, str] | None = None


def _project(root: Path, layers: dict[str, str], image: str = "") -> Path:
    (root / "src").mkdir(parents=True, exist_ok=True)
    (root / "src" / "a").write_text("a\n")
    names = ", ".join(f'"{n}"' for n in layers)
    (root / "ocibuild.toml").write_text(f'[image]\nname = "dev"\nlayers = [{names}]\n{image}')
    for name, text in layers.items():
        (root / "layers" / name).mkdir(parents=True, exist_ok=True)
        (root / "layers" / name / "layer.toml").write_text(text)
    return root


def _build(root: Path, store: Path) -> list[str]:
    return ["build", "-C", str(root), "--store", str(store)]


def _based_on(tmp: Path, base: Path, damage: Callable[[Path, dict[str, str]], str]) -> Run:
    """A project whose image layer is ``oci:`` a copy of ``base``, damaged by ``damage`` (given the layout and the
    digests of its image: manifest, config, layer; it returns what the error must name)."""
    layout = tmp / "base"
    shutil.copytree(base, layout, symlinks=True)
    names = damage(layout, json.loads((base / "ocibuild" / "digests.json").read_text()))
    root = _project(tmp / "project", {"base": f'kind = "image"\nref = "oci:{layout}:dev"\n'})
    return Run(_build(root, tmp / "store"), names)


def _replace(path: Path, kind: str) -> str:
    path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
    else:
        path.symlink_to("/dev/zero")
    return str(path)


def _blob(layout: Path, digest: str) -> Path:
    return layout / "blobs" / "sha256" / digest.split(":", 1)[1]


def _fifo(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(path)
    return path


def import_fifo(tmp: Path, base: Path) -> Run:
    return Run(["import", str(_fifo(tmp / "archive.tar")), "--store", str(tmp / "store")], "archive.tar")


def oci_layout_file_is_a_fifo(tmp: Path, base: Path) -> Run:
    return _based_on(tmp, base, lambda layout, image: _replace(layout / "oci-layout", "fifo"))


def oci_layout_file_is_dev_zero(tmp: Path, base: Path) -> Run:
    return _based_on(tmp, base, lambda layout, image: _replace(layout / "oci-layout", "zero"))


def oci_manifest_blob_is_dev_zero(tmp: Path, base: Path) -> Run:
    return _based_on(tmp, base, lambda layout, image: _replace(_blob(layout, image["manifest"]), "zero"))


def oci_config_blob_is_a_fifo(tmp: Path, base: Path) -> Run:
    return _based_on(tmp, base, lambda layout, image: _replace(_blob(layout, image["config"]), "fifo"))


def oci_layer_blob_is_a_fifo(tmp: Path, base: Path) -> Run:
    return _based_on(tmp, base, lambda layout, image: _replace(_blob(layout, image["layer"]), "fifo"))


def oci_archive_ref_is_a_fifo(tmp: Path, base: Path) -> Run:
    _fifo(tmp / "project" / "layers" / "base" / "base.tar")
    root = _project(tmp / "project", {"base": 'kind = "image"\nref = "oci-archive:base.tar:dev"\n'})
    return Run(_build(root, tmp / "store"), "base.tar")


def copy_from_is_a_fifo(tmp: Path, base: Path) -> Run:
    root = _project(tmp / "project", {"src": 'kind = "copy"\nfrom = "pipe"\nto = "/src"\n'})
    _fifo(root / "pipe")
    return Run(_build(root, tmp / "store"), str(root / "pipe"))


def layer_toml_is_a_fifo(tmp: Path, base: Path) -> Run:
    root = _project(tmp / "project", {"src": COPY})
    (root / "layers" / "src" / "layer.toml").unlink()
    _fifo(root / "layers" / "src" / "layer.toml")
    return Run(_build(root, tmp / "store"), "layers/src/layer.toml")


def lock_is_a_fifo(tmp: Path, base: Path) -> Run:
    root = _project(tmp / "project", {"src": COPY})
    _fifo(root / "ocibuild.lock")
    return Run(_build(root, tmp / "store"), "ocibuild.lock")


def config_file_is_a_fifo(tmp: Path, base: Path) -> Run:
    root = _project(tmp / "project", {"src": COPY})
    config = _fifo(tmp / "config.toml")
    return Run(_build(root, tmp / "store"), str(config), {"OCIBUILD_CONFIG": str(config)})


def inventory_is_a_fifo(tmp: Path, base: Path) -> Run:
    inventory = _fifo(tmp / "inventory.json")
    return Run(["export", str(tmp / "out.tar"), "--store", str(base), "--since", str(inventory)], "inventory.json")


def project_toml_nested_too_deeply(tmp: Path, base: Path) -> Run:
    root = _project(tmp / "project", {"src": COPY}, image=DEEP)
    return Run(_build(root, tmp / "store"), "ocibuild.toml: malformed TOML")


def layer_toml_nested_too_deeply(tmp: Path, base: Path) -> Run:
    root = _project(tmp / "project", {"src": COPY + DEEP})
    return Run(_build(root, tmp / "store"), "layers/src/layer.toml: malformed TOML")


def lock_nested_too_deeply(tmp: Path, base: Path) -> Run:
    root = _project(tmp / "project", {"src": COPY})
    (root / "ocibuild.lock").write_text("version = 1\n" + DEEP)
    return Run(_build(root, tmp / "store"), "ocibuild.lock: malformed TOML")


def config_nested_too_deeply(tmp: Path, base: Path) -> Run:
    root = _project(tmp / "project", {"src": COPY})
    config = tmp / "config.toml"
    config.write_text(DEEP)
    return Run(_build(root, tmp / "store"), "config.toml: malformed TOML", {"OCIBUILD_CONFIG": str(config)})


def epoch_past_year_9999(tmp: Path, base: Path) -> Run:
    root = _project(tmp / "project", {"src": COPY}, image="source_date_epoch = 253402300800\n")
    return Run(_build(root, tmp / "store"), "ocibuild.toml: [image] source_date_epoch")


def copy_tree_name_not_utf8(tmp: Path, base: Path) -> Run:
    root = _project(tmp / "project", {"src": COPY})
    (root / "src" / os.fsdecode(b"caf\xe9")).write_text("stored as its bytes\n")
    return Run(_build(root, tmp / "store"), None)


def ignore_pattern_that_backtracked(tmp: Path, base: Path) -> Run:
    root = _project(tmp / "project", {"src": COPY})
    (root / "src" / ".containerignore").write_text("*a" * 25 + "*b\n")
    (root / "src" / ("a" * 250)).write_text("kept\n")
    return Run(_build(root, tmp / "store"), None)


CASES = [import_fifo, oci_layout_file_is_a_fifo, oci_layout_file_is_dev_zero, oci_manifest_blob_is_dev_zero,
         oci_config_blob_is_a_fifo, oci_layer_blob_is_a_fifo, oci_archive_ref_is_a_fifo, copy_from_is_a_fifo,
         layer_toml_is_a_fifo, lock_is_a_fifo, config_file_is_a_fifo, inventory_is_a_fifo,
         project_toml_nested_too_deeply, layer_toml_nested_too_deeply, lock_nested_too_deeply,
         config_nested_too_deeply, epoch_past_year_9999, copy_tree_name_not_utf8, ignore_pattern_that_backtracked]


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store holding the image 'dev' (one copy layer): the layout every ``oci:`` case copies and damages, with
    the digests of its image in ocibuild/digests.json."""
    tmp = tmp_path_factory.mktemp("base")
    root = _project(tmp / "project", {"src": COPY})
    assert cli.main(["build", "-q", "-C", str(root), "--store", str(tmp / "store")]) == 0
    store = Store.open(tmp / "store")
    manifest = store.resolve("dev")
    assert manifest is not None
    image = store.get_manifest(manifest.digest)
    digests = {"manifest": str(manifest.digest), "config": str(image.config.digest),
               "layer": str(image.layers[0].digest)}
    (tmp / "store" / "ocibuild" / "digests.json").write_text(json.dumps(digests))
    return tmp / "store"


def _ocibuild(args: list[str], home: Path, env: dict[str, str] | None) -> subprocess.CompletedProcess[str]:
    def bounded() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY, MEMORY))

    environment = {k: v for k, v in os.environ.items() if not k.startswith(("OCIBUILD_", "REGISTRY_AUTH", "XDG_"))}
    environment.update(HOME=str(home), **(env or {}))
    return subprocess.run([sys.executable, "-m", "ocibuild.cli", *args], capture_output=True, text=True,
                          env=environment, timeout=HANG, preexec_fn=bounded)


def _files(tmp: Path) -> set[str]:
    """What is below ``tmp`` but the outputs of a command: its store, and the lock a build writes."""
    outputs = (tmp / "store", tmp / "project" / "ocibuild.lock")
    return {str(path) for path in tmp.rglob("*") if not any(o in (path, *path.parents) for o in outputs)}


def _check(run: Run, tmp: Path) -> None:
    """Run the case's command and check its outcome: one error line naming the file and a hint, or (a valid input)
    success; never a traceback; nothing written but into the store (and the project's lock)."""
    store = tmp / "store"
    home = tmp / "home"
    home.mkdir(exist_ok=True)
    before = _files(tmp)
    result = _ocibuild(run.args, home, run.env)
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    if run.names is None:
        assert result.returncode == 0 and errors == [], output
        assert Store.open(store, create=False).verify() == []
    else:
        assert result.returncode in (1, 2), output
        assert len(errors) == 1 and run.names in errors[0], output
        assert any(line.startswith("hint: ") for line in result.stderr.splitlines()), output
    assert _files(tmp) == before, "written outside the store"


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.__name__.replace("_", "-"))
def test_hostile_input_is_refused_in_one_line_or_taken(case: Callable[[Path, Path], Run], base: Path,
                                                        tmp_path: Path) -> None:
    _check(case(tmp_path, base), tmp_path)


# ---- a full disk: a tiny tmpfs mounted where the store writes the file (mounting needs root) -------------------


@pytest.fixture
def full(tmp_path: Path) -> Iterator[Callable[[Path], None]]:
    """Mounts a tmpfs with no inode left (nr_inodes=1: its root) at the directories given; unmounted at the end."""
    mounted: list[Path] = []

    def mount(directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,nr_inodes=1", "tmpfs", str(directory)],
                              capture_output=True, text=True)
        assert done.returncode == 0, f"mounting a tmpfs needs root (as the CI runs): {done.stderr}"
        mounted.append(directory)

    yield mount
    for directory in reversed(mounted):
        subprocess.run(["umount", str(directory)], check=True)


def test_no_inode_left_for_the_layer_listing(tmp_path: Path, full: Callable[[Path], None]) -> None:
    full(tmp_path / "store" / "ocibuild" / "listings")
    root = _project(tmp_path / "project", {"src": COPY})
    _check(Run(_build(root, tmp_path / "store"), "record the listing of layer"), tmp_path)


def test_no_inode_left_for_an_archive_layers_temporary_tar(tmp_path: Path, full: Callable[[Path], None]) -> None:
    full(tmp_path / "store" / "ocibuild" / "tmp")
    archive = tmp_path / "project" / "layers" / "rel" / "rel.tar.gz"
    archive.parent.mkdir(parents=True)
    with tarfile.open(archive, "w:gz") as tar:
        tar.addfile(tarfile.TarInfo("empty"))
    sha = hashlib.sha256(archive.read_bytes()).hexdigest()
    root = _project(tmp_path / "project", {"rel": f'kind = "archive"\nurl = "rel.tar.gz"\nsha256 = "{sha}"\n'})
    _check(Run(_build(root, tmp_path / "store"), "create a temporary file in"), tmp_path)


@pytest.mark.timeout(30)  # an auth file opened for reading as it was, a fifo, waits for a writer forever
def test_an_auth_file_that_is_a_fifo_is_refused_naming_it(tmp_path: Path) -> None:
    """Reached only with a registry, so checked in-process: the lookup of credentials reads the auth files."""
    auth_file = _fifo(tmp_path / "auth.json")
    with pytest.raises(RegistryError, match=rf"^cannot read the auth file {auth_file}: not a regular file \(a fifo\)$"):
        find_credentials("registry.example", {"REGISTRY_AUTH_FILE": str(auth_file), "HOME": str(tmp_path)})
