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


# ---- a real registry (docker-registry on loopback) and a fault-injecting proxy in front of it ----------------------

import http.client  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import socket  # noqa: E402
import ssl  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Any  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RegistryServer:
    """A docker-registry process on 127.0.0.1:<port>; ``host`` is what a reference names."""

    host: str
    storage: Path
    process: "subprocess.Popen[bytes]"
    log: Path
    ca: Path | None = None  # the CA of its TLS certificate, when it speaks TLS

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start_registry(base: Path, *, auth: dict[str, Any] | None = None, tls: tuple[Path, Path] | None = None,
                   ca: Path | None = None) -> RegistryServer:
    """Start the real registry with a generated config and storage under ``base``; returns once GET /v2/ answers."""
    exe = require("docker-registry")
    base.mkdir(parents=True, exist_ok=True)
    port = free_port()
    http_config: dict[str, Any] = {"addr": f"127.0.0.1:{port}", "secret": os.urandom(16).hex()}
    if tls is not None:
        http_config["tls"] = {"certificate": str(tls[0]), "key": str(tls[1])}
    config: dict[str, Any] = {
        "version": 0.1,
        "log": {"level": "warn", "accesslog": {"disabled": True}},
        "storage": {"filesystem": {"rootdirectory": str(base / "storage")}, "delete": {"enabled": True},
                    "maintenance": {"uploadpurging": {"enabled": False}}},
        "http": http_config,
    }
    if auth is not None:
        config["auth"] = auth
    (base / "config.yml").write_text(json.dumps(config, indent=2))  # JSON is YAML
    log = base / "registry.log"
    with open(log, "ab") as out:
        process = subprocess.Popen([exe, "serve", str(base / "config.yml")], stdout=out, stderr=subprocess.STDOUT,
                                   env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")})
    server = RegistryServer(f"127.0.0.1:{port}", base / "storage", process, log, ca)
    deadline = time.monotonic() + 30
    while True:
        try:
            if tls is not None:
                context = ssl.create_default_context(cafile=str(ca)) if ca else ssl._create_unverified_context()
                conn: http.client.HTTPConnection = http.client.HTTPSConnection("127.0.0.1", port, timeout=2,
                                                                                context=context)
            else:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/v2/")
            status = conn.getresponse().status
            conn.close()
            if status in (200, 401):
                return server
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            server.stop()
            pytest.fail(f"docker-registry did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    """An anonymous plain-HTTP registry on loopback, shared by the session (tests use their own repositories)."""
    server = start_registry(tmp_path_factory.mktemp("registry"))
    yield server
    server.stop()
