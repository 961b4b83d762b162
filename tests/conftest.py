"""Shared fixtures: projects written on the fly, a temporary store, and the real tools (registry, podman)."""

from __future__ import annotations

import shutil
import subprocess
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ocibuild.store import Store

ProjectFactory = Callable[..., Path]


def write(path: Path, text: str, mode: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip())
    if mode is not None:
        path.chmod(mode)
    return path


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store.open(tmp_path / "store")
    yield s
    assert s.verify() == [], "the store must verify clean after every test"


@pytest.fixture
def make_project(tmp_path: Path) -> ProjectFactory:
    """A project with ocibuild.toml and layer folders; ``layers`` maps name → layer.toml text."""

    def make(layers: dict[str, str], image: str = "", root: Path | None = None,
             files: dict[str, str] | None = None) -> Path:
        root = root or tmp_path / "project"
        names = ", ".join(f'"{n}"' for n in layers)
        write(root / "ocibuild.toml", f'[image]\nname = "dev"\nlayers = [{names}]\n{textwrap.dedent(image)}')
        for name, text in layers.items():
            write(root / "layers" / name / "layer.toml", text)
        for rel, content in (files or {}).items():
            write(root / rel, content)
        return root

    return make


def require(tool: str) -> str:
    """The path of a tool the tests need; CI installs all of them (scripts/setup-host), so absence fails."""
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"{tool} is not installed: run scripts/setup-host")
    return path


Podman = Callable[..., "subprocess.CompletedProcess[str]"]


@pytest.fixture(scope="session")
def podman(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Podman]:
    """``podman(*args)`` → the completed process (asserted to succeed), on an image storage of this session's
    own: tests neither see the host's images nor leave any behind, and images pulled once are reused."""
    exe = require("podman")
    base = tmp_path_factory.mktemp("podman")
    argv = [exe, "--root", str(base / "root"), "--runroot", str(base / "runroot"), "--tmpdir", str(base / "tmp")]

    def run(*args: str, timeout: float = 300) -> "subprocess.CompletedProcess[str]":
        result = subprocess.run([*argv, *args], capture_output=True, text=True, timeout=timeout)
        assert result.returncode == 0, f"podman {' '.join(args)} exited {result.returncode}:\n{result.stderr}"
        return result

    yield run
    shutil.rmtree(base, ignore_errors=True)  # containers ran with --rm: nothing is mounted there any more
