"""Shared fixtures: projects written on the fly, a temporary store, and the real tools (registry, podman)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass
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


@dataclass(frozen=True)
class PodmanStorage:
    """A podman storage of the session's own: the global flags that name it, and an ocibuild config
    (``OCIBUILD_CONFIG``) whose ``[engine] args`` are those flags."""

    flags: tuple[str, ...]
    config: Path


@pytest.fixture(scope="session")
def podman_storage(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PodmanStorage]:
    exe = require("podman")
    base = tmp_path_factory.mktemp("podman")  # a short path: podman refuses a runroot over 50 characters
    flags = ("--root", str(base / "root"), "--runroot", str(base / "runroot"), "--tmpdir", str(base / "tmp"))
    config = base / "ocibuild.toml"
    config.write_text(f"[engine]\nargs = {json.dumps(list(flags))}\n")
    yield PodmanStorage(flags, config)
    for args in (("rm", "--all", "--force"), ("rmi", "--all", "--force")):
        subprocess.run([exe, *flags, *args], capture_output=True, timeout=300)
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def podman(podman_storage: PodmanStorage) -> Podman:
    """``podman(*args)`` → the completed process (asserted to succeed), on the session's own storage: tests
    neither see the host's images nor leave any behind, and images pulled once are reused."""
    argv = [require("podman"), *podman_storage.flags]

    def run(*args: str, timeout: float = 300) -> "subprocess.CompletedProcess[str]":
        result = subprocess.run([*argv, *args], capture_output=True, text=True, timeout=timeout)
        assert result.returncode == 0, f"podman {' '.join(args)} exited {result.returncode}:\n{result.stderr}"
        return result

    return run


@pytest.fixture(scope="session", autouse=True)
def podman_leaves_nothing(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
                          ) -> Iterator[None]:
    """When the session runs tests marked ``podman``: every ocibuild they start (and the ``podman`` fixture)
    works on the session's own storage (``OCIBUILD_CONFIG`` names it, unless a test gives a config of its own
    with its own storage); at the end the host's podman storage must hold no image or container of this session.

    Only what this session could have made counts, so images other processes make meanwhile do not: an image is
    ours when a store under pytest's base temporary directory records it as loaded into the host's storage (see
    ``ocibuild.engineimages``), or when a name of it holds that directory (podman names an image pulled from
    ``oci:PATH`` after PATH, a name ocibuild drops right after) or the alias ocibuild made for such a path (see
    ``engine.podman_layout_path``); a container is ours when its image is. The session's own storage must hold no container either: ocibuild
    removes every container it starts."""
    if not any(item.get_closest_marker("podman") for item in request.session.items):
        yield
        return
    storage: PodmanStorage = request.getfixturevalue("podman_storage")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OCIBUILD_CONFIG", str(storage.config))
        yield
    problems = host_leftovers(tmp_path_factory.getbasetemp())
    left = subprocess.run([require("podman"), *storage.flags, "ps", "--all", "--format", "{{.Names}}"],
                          capture_output=True, text=True, timeout=120).stdout.split()
    problems += [f"container {name} in the session's own storage" for name in left]
    if problems:
        pytest.fail("the tests left these in podman's storage:\n  " + "\n  ".join(problems), pytrace=False)


def host_leftovers(basetemp: Path) -> list[str]:
    """The images and containers in the host's podman storage that a test of this session made."""
    exe = require("podman")
    ours = [f"{basetemp.resolve()}/"]  # with the slash: pytest-16 is not pytest-161
    uid = os.getuid()
    for private in {Path(os.environ.get("XDG_RUNTIME_DIR") or "/run"), Path("/run"), Path("/tmp")}:
        for alias in (private / f"ocibuild-{uid}").glob("*"):
            with contextlib.suppress(OSError):
                if os.readlink(alias).startswith(ours[0]):
                    ours.append(f"{alias}:")  # the image is named localhost<alias>:<tag>
    listed = subprocess.run([exe, "images", "--format", "json"], capture_output=True, text=True, timeout=120)
    containers = subprocess.run([exe, "ps", "--all", "--format", "json"], capture_output=True, text=True,
                                timeout=120)
    assert listed.returncode == 0 and containers.returncode == 0, listed.stderr + containers.stderr
    recorded = set()
    for record in basetemp.glob("**/ocibuild/engine/*.json"):
        doc = json.loads(record.read_text())
        if "--root" not in doc.get("args", []):  # loaded into the host's storage
            recorded.update([*doc.get("images", {}).values(), *doc.get("stale", [])])
    found, ids = [], set()
    for image in json.loads(listed.stdout or "[]"):
        names = [name for name in image.get("Names") or () if any(path in name for path in ours)]
        if names or image["Id"] in recorded:
            found.append(f"image {image['Id'][:12]} {' '.join(names)}")
            ids.add(image["Id"])
    for container in json.loads(containers.stdout or "[]"):
        if container.get("ImageID") in ids or any(path in container.get("Image", "") for path in ours):
            found.append(f"container {' '.join(container.get('Names') or ())} (image {container.get('Image')})")
    return found


# ---- a real registry (docker-registry on loopback) and a fault-injecting proxy in front of it ----------------------

import http.client  # noqa: E402
import socket  # noqa: E402
import ssl  # noqa: E402
import time  # noqa: E402
from dataclasses import field  # noqa: E402
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


def run_ocibuild(*args: str, env: dict[str, str] | None = None, ok: bool = True, stdin: str | None = None,
                 timeout: float = 600) -> "subprocess.CompletedProcess[str]":
    """``python -m ocibuild.cli ARGS`` in a subprocess; asserted to succeed unless ``ok`` is False."""
    import sys

    result = subprocess.run([sys.executable, "-m", "ocibuild.cli", *args], capture_output=True, text=True,
                            env={**os.environ, **(env or {})}, input=stdin, timeout=timeout)
    if ok:
        assert result.returncode == 0, f"ocibuild {' '.join(args)} exited {result.returncode}:\n{result.stderr}"
    return result


def ocibuild_json(*args: str, env: dict[str, str] | None = None) -> Any:
    return json.loads(run_ocibuild(*args, "--json", env=env).stdout)


@dataclass
class Fault:
    """One fault of :class:`FaultProxy`, applied to the next ``times`` requests matching ``method`` and the
    ``path`` regex. Actions: "status" (answer ``status`` without asking the registry, with ``retry_after``),
    "cut" (close the connection after ``after`` bytes of the response body), "truncate" (announce and send only
    ``after`` bytes, keeping the connection), "flip" (invert the byte at offset ``after``), "ignore-range" (drop
    the request's Range header), "cut-upload" (forward only ``after`` bytes of the request body, then close
    without answering)."""

    method: str
    path: str
    action: str
    times: int = 1
    after: int = 0
    status: int = 500
    retry_after: str | None = None


@dataclass
class FaultProxy:
    host: str
    faults: list[Fault] = field(default_factory=list)
    seen: list[tuple[str, str, int, str]] = field(default_factory=list)  # method, path, status, Range header

    def add(self, *faults: Fault) -> None:
        self.faults.extend(faults)

    def take(self, method: str, path: str, action: str | None = None, length: int | None = None) -> Fault | None:
        """The next fault for this request; body faults only for bodies longer than their offset."""
        import re

        for fault in self.faults:
            if fault.times > 0 and fault.method == method and re.search(fault.path, path) and \
                    (action is None or fault.action == action) and (length is None or length > fault.after):
                fault.times -= 1
                return fault
        return None


@pytest.fixture
def fault_proxy(registry: RegistryServer) -> Iterator[FaultProxy]:
    """A loopback HTTP proxy in front of the session registry that injects :class:`Fault` s."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    upstream_host, upstream_port = registry.host.split(":")
    state = FaultProxy("")
    hop = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "upgrade"}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def _handle(self) -> None:
            method, path = self.command, self.path
            headers = {k: v for k, v in self.headers.items() if k.lower() not in hop}
            length = int(self.headers.get("Content-Length") or 0)
            status_fault = state.take(method, path, "status")
            if status_fault is not None:
                if length:
                    self.rfile.read(length)
                body = json.dumps({"errors": [{"code": "UNAVAILABLE", "message": "injected"}]}).encode()
                self.send_response(status_fault.status)
                if status_fault.retry_after is not None:
                    self.send_header("Retry-After", status_fault.retry_after)
                if status_fault.status == 401:  # as a registry asking for credentials would
                    self.send_header("WWW-Authenticate", 'Basic realm="faults"')
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                state.seen.append((method, path, status_fault.status, self.headers.get("Range", "")))
                return
            if "Range" in headers and state.take(method, path, "ignore-range") is not None:
                headers.pop("Range", None)
            upload = state.take(method, path, "cut-upload")
            conn = http.client.HTTPConnection(upstream_host, int(upstream_port), timeout=60)
            if upload is not None:
                partial = self.rfile.read(min(upload.after, length))
                headers["Content-Length"] = str(len(partial))
                if "Content-Range" in headers:
                    start = int(headers["Content-Range"].split("-")[0])
                    headers["Content-Range"] = f"{start}-{start + len(partial) - 1}"
                conn.request(method, path, body=partial, headers=headers)
                conn.getresponse().read()
                conn.close()
                state.seen.append((method, path, 0, "cut-upload"))
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            body_reader: Any = None
            if length:
                class Body:
                    remaining = length

                    def read(inner, size: int = -1) -> bytes:  # noqa: N805
                        size = inner.remaining if size < 0 else min(size, inner.remaining)
                        data = self.rfile.read(size) if size else b""
                        inner.remaining -= len(data)
                        return data

                body_reader = Body()
            with contextlib.closing(conn):
                self._forward(conn, method, path, headers, body_reader)

        def _forward(self, conn: http.client.HTTPConnection, method: str, path: str, headers: dict[str, str],
                     body_reader: Any) -> None:
            conn.request(method, path, body=body_reader, headers=headers)
            response = conn.getresponse()
            fault = None
            declared_length = int(response.getheader("Content-Length") or 0)
            for action in ("cut", "truncate", "flip"):
                fault = fault or state.take(method, path, action, declared_length)
            state.seen.append((method, path, response.status, self.headers.get("Range", "")))
            out_headers = [(k, v) for k, v in response.getheaders() if k.lower() not in hop]
            declared = response.getheader("Content-Length")
            if declared is None and method != "HEAD":
                payload = response.read()
                out_headers = [(k, v) for k, v in out_headers if k.lower() != "content-length"]
                out_headers.append(("Content-Length", str(len(payload))))
                chunks: Any = [payload]
            else:
                chunks = iter(lambda: response.read(1 << 16), b"")
            if fault is not None and fault.action == "truncate":
                out_headers = [(k, v) for k, v in out_headers if k.lower() != "content-length"]
                out_headers.append(("Content-Length", str(fault.after)))
            self.send_response_only(response.status)
            for key, value in out_headers:
                self.send_header(key, value)
            self.end_headers()
            sent = 0
            for chunk in chunks:
                if fault is not None and fault.action in ("cut", "truncate") and sent + len(chunk) >= fault.after:
                    self.wfile.write(chunk[: fault.after - sent])
                    self.wfile.flush()
                    if fault.action == "cut":
                        self.close_connection = True
                        self.connection.shutdown(socket.SHUT_RDWR)
                    else:
                        response.read()
                    conn.close()
                    return
                if fault is not None and fault.action == "flip" and sent <= fault.after < sent + len(chunk):
                    at = fault.after - sent
                    chunk = chunk[:at] + bytes([chunk[at] ^ 0xFF]) + chunk[at + 1:]
                self.wfile.write(chunk)
                sent += len(chunk)
            conn.close()

        def _safely(self) -> None:
            try:
                self._handle()
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True  # the client gave up on this response (ocibuild restarts a download)

        do_GET = do_HEAD = do_PUT = do_POST = do_PATCH = do_DELETE = _safely

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    state.host = f"127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()


def without_hanging(function: Callable[..., Any], *args: Any, seconds: float = 60) -> Any:
    """``function(*args)``, run in a forked child given ``seconds``: a hang there fails the test (TimeoutError) and
    the child is killed. For code that may hang inside C holding the GIL (``re`` backtracking), which neither a
    signal nor pytest-timeout's thread can stop. A guard against a hang, not a check of speed."""
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(1) as pool:
        return pool.apply_async(function, args).get(seconds)
