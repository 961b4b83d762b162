"""Faults between ocibuild and the real registry, injected by a proxy: cuts mid-blob (pull and push), 5xx then
success, 429 with Retry-After, a truncated body, a flipped byte, a server ignoring Range. Each case ends verified
or with a clear error, and the store verifies clean."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from conftest import Fault, FaultProxy, RegistryServer, run_ocibuild, write
from ocibuild import oci
from ocibuild.errors import RegistryError
from ocibuild.net.retry import RetryPolicy
from ocibuild.registry import Client, fetch_manifests, find_manifests, push_manifests
from ocibuild.store import Store

SIZE = 3 << 20
FAST = RetryPolicy(attempts=4, base=0.01, cap=0.05, read_timeout=10)


class Sleeps(list[float]):
    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def image(store: Store, seed: str, size: int = SIZE) -> oci.Descriptor:
    """An entry-shaped manifest: one incompressible layer of ``size`` bytes and its config."""
    data = random.Random(seed).randbytes(size)
    layer = store.put(data, oci.LAYER_GZIP)
    config = store.put(oci.ImageConfig(diff_ids=(layer.digest,)).to_json(), oci.OCI_CONFIG)
    return store.put_manifest(oci.Manifest(config, (layer,)))


def client(host: str, sleeps: Sleeps | None = None) -> Client:
    return Client(host, policy=FAST, sleep=sleeps if sleeps is not None else Sleeps())


@pytest.fixture
def pushed(registry: RegistryServer, tmp_path: Path, request: pytest.FixtureRequest) -> tuple[str, oci.Descriptor]:
    """A repository (named after the test) holding one entry, pushed straight to the registry."""
    repository = f"faults/{request.node.name.lower().replace('_', '-')[:50].rstrip('-')}"
    source = Store.open(tmp_path / "source")
    manifest = image(source, repository)
    with Client(registry.host) as direct:
        push_manifests(direct, source, repository, [("entry", manifest)])
    return repository, manifest


def pull(host: str, store: Store, repository: str, sleeps: Sleeps | None = None) -> Client:
    with client(host, sleeps) as c:
        remote = find_manifests(c, repository, ["entry"])["entry"]
        assert remote is not None
        fetch_manifests(c, store, repository, {"entry": remote})
    return c


def layer_of(store: Store, manifest: oci.Descriptor) -> oci.Descriptor:
    return store.get_manifest(manifest.digest).layers[0]


def blob_gets(proxy: FaultProxy) -> list[tuple[str, str, int, str]]:
    return [s for s in proxy.seen if s[0] == "GET" and "/blobs/sha256:" in s[1]]


def test_cut_mid_blob_resumes_with_range(fault_proxy: FaultProxy, pushed: tuple[str, oci.Descriptor],
                                         store: Store) -> None:
    repository, manifest = pushed
    fault_proxy.add(Fault("GET", r"/blobs/sha256:", "cut", after=SIZE // 3))
    c = pull(fault_proxy.host, store, repository)
    assert store.resolve("entry") is not None and store.has(manifest.digest)
    ranges = [s[3] for s in blob_gets(fault_proxy) if s[3]]
    assert ranges and ranges[0].startswith("bytes=") and int(ranges[0][6:-1]) > 0
    assert c.stats.retransferred == 0 and c.stats.retries >= 1


def test_a_server_ignoring_range_makes_the_download_restart_cleanly(
        fault_proxy: FaultProxy, pushed: tuple[str, oci.Descriptor], store: Store) -> None:
    repository, manifest = pushed
    fault_proxy.add(Fault("GET", r"/blobs/sha256:", "cut", after=SIZE // 2),
                    Fault("GET", r"/blobs/sha256:", "ignore-range", times=1))
    c = pull(fault_proxy.host, store, repository)
    assert store.has(manifest.digest)
    assert 0 < c.stats.retransferred <= SIZE // 2 + (1 << 20), "bytes received before the cut are fetched again"


def test_truncated_body_is_resumed(fault_proxy: FaultProxy, pushed: tuple[str, oci.Descriptor],
                                   store: Store) -> None:
    repository, manifest = pushed
    fault_proxy.add(Fault("GET", r"/blobs/sha256:", "truncate", after=SIZE // 4))
    pull(fault_proxy.host, store, repository)
    assert store.has(manifest.digest)


def test_a_flipped_byte_is_never_stored(fault_proxy: FaultProxy, pushed: tuple[str, oci.Descriptor],
                                        store: Store) -> None:
    repository, manifest = pushed
    fault_proxy.add(Fault("GET", r"/blobs/sha256:", "flip", after=12345, times=1))
    c = pull(fault_proxy.host, store, repository)
    assert store.has(manifest.digest) and c.stats.retransferred >= SIZE

    other = Store.open(store.root.parent / "other")
    fault_proxy.add(Fault("GET", r"/blobs/sha256:", "flip", after=777, times=10))
    with pytest.raises(RegistryError) as caught:
        pull(fault_proxy.host, other, repository)
    assert caught.value.code == "DIGEST_INVALID" and "nothing was stored" in str(caught.value)
    assert caught.value.hint is not None and "re-run" in caught.value.hint
    assert other.resolve("entry") is None and not other.has(layer_of(store, manifest).digest)
    assert other.verify() == []


def test_5xx_then_success_and_429_with_retry_after(fault_proxy: FaultProxy, pushed: tuple[str, oci.Descriptor],
                                                   store: Store) -> None:
    repository, manifest = pushed
    fault_proxy.add(Fault("GET", r"/blobs/sha256:", "status", status=500),
                    Fault("GET", r"/blobs/sha256:", "status", status=503),
                    Fault("GET", r"/manifests/", "status", status=429, retry_after="2"))
    sleeps = Sleeps()
    pull(fault_proxy.host, store, repository, sleeps)
    assert store.has(manifest.digest)
    assert 2.0 in sleeps, "Retry-After is honoured"


def test_a_registry_that_keeps_failing_gives_a_clear_error(fault_proxy: FaultProxy,
                                                           pushed: tuple[str, oci.Descriptor], store: Store) -> None:
    repository, _ = pushed
    fault_proxy.add(Fault("GET", r"/blobs/sha256:", "status", status=503, times=100))
    with pytest.raises(RegistryError) as caught:
        pull(fault_proxy.host, store, repository)
    assert caught.value.status == 503 and caught.value.retryable
    assert "fetch blob" in str(caught.value) and caught.value.hint is not None and "re-run" in caught.value.hint
    assert store.resolve("entry") is None


def test_push_cut_mid_chunk_resumes_from_the_registry_offset(fault_proxy: FaultProxy, registry: RegistryServer,
                                                             store: Store, tmp_path: Path) -> None:
    manifest = image(store, "chunked", 6 << 20)
    c = client(fault_proxy.host)
    c.monolithic_max = 1 << 20
    c.chunk_size = 2 << 20
    fault_proxy.add(Fault("PATCH", r"/blobs/uploads/", "cut-upload", after=(1 << 20) + 4321, times=1),
                    Fault("PUT", r"/manifests/", "status", status=500))
    with c:
        assert push_manifests(c, store, "faults/chunked", [("entry", manifest)]) == {"entry": "pushed"}
    assert any(s[3] == "cut-upload" for s in fault_proxy.seen)
    assert c.stats.uploaded >= 6 << 20
    back = Store.open(tmp_path / "back")
    with Client(registry.host) as direct:
        fetch_manifests(direct, back, "faults/chunked",
                        {"entry": find_manifests(direct, "faults/chunked", ["entry"])["entry"]})  # type: ignore[dict-item]
    assert back.verify() == [] and back.resolve("entry").digest == manifest.digest  # type: ignore[union-attr]


def test_push_cut_in_a_monolithic_upload_starts_again(fault_proxy: FaultProxy, store: Store) -> None:
    manifest = image(store, "monolithic", 2 << 20)
    c = client(fault_proxy.host)
    fault_proxy.add(Fault("PUT", r"/blobs/uploads/", "cut-upload", after=100_000, times=1))
    with c:
        assert push_manifests(c, store, "faults/monolithic", [("entry", manifest)]) == {"entry": "pushed"}
    assert c.stats.retransferred > 0


@pytest.mark.parametrize("method, size", [("PUT", 2 << 20), ("PATCH", 6 << 20)])
def test_a_401_during_an_upload_sends_the_body_again_from_its_start(fault_proxy: FaultProxy, store: Store,
                                                                    method: str, size: int) -> None:
    """The registry asks for credentials only when the blob's PUT (or first PATCH) arrives: the request sent again
    with them carries the whole body, not the stream the first try already read (which stalled the upload until
    the read timeout and a retry)."""
    from ocibuild.net.auth import Credentials

    manifest = image(store, f"unauthorized-{method}", size)
    c = Client(fault_proxy.host, policy=FAST, sleep=Sleeps(), credentials=Credentials("ci", "secret"))
    c.monolithic_max, c.chunk_size = 4 << 20, 4 << 20
    fault_proxy.add(Fault(method, r"/blobs/uploads/", "status", status=401))
    with c:
        assert push_manifests(c, store, f"faults/unauthorized-{method.lower()}", [("entry", manifest)]) == \
            {"entry": "pushed"}
    uploads = [s[2] for s in fault_proxy.seen if s[0] == method and "/blobs/uploads/" in s[1]]
    assert uploads[:2] == [401, 201 if method == "PUT" else 202], uploads
    assert c.stats.retries == 0 and c.stats.retransferred == 0, c.stats


def test_cli_reports_bytes_fetched_again_after_a_cut(fault_proxy: FaultProxy, tmp_path: Path) -> None:
    project = tmp_path / "project"
    write(project / "ocibuild.toml", '[image]\nname = "dev"\nlayers = ["data"]\n')
    write(project / "layers/data/layer.toml", 'kind = "copy"\nfrom = "tree"\nto = "/data"\n')
    (project / "tree").mkdir()
    (project / "tree/blob").write_bytes(random.Random("cli").randbytes(SIZE))
    env = {"HOME": str(tmp_path), "OCIBUILD_CONFIG": str(tmp_path / "none.toml")}
    cache = f"{fault_proxy.host}/faults/cli"
    run_ocibuild("build", "-C", str(project), "--store", str(tmp_path / "one"), env=env)
    run_ocibuild("push-cache", cache, "-C", str(project), "--store", str(tmp_path / "one"), env=env)
    fault_proxy.add(Fault("GET", r"/blobs/sha256:", "cut", after=SIZE // 2),
                    Fault("GET", r"/blobs/sha256:", "ignore-range"))
    result = run_ocibuild("pull-cache", "--cache", cache, "-C", str(project), "--store", str(tmp_path / "two"),
                          env=env)
    assert "re-transferred after interruptions" in result.stderr
    for name in ("one", "two"):
        assert Store.open(tmp_path / name).verify() == []


def test_an_interrupted_download_resumes_next_run(fault_proxy: FaultProxy, pushed: tuple[str, oci.Descriptor],
                                                  store: Store) -> None:
    """Ctrl-C while backing off after a cut: the bytes received stay in the store's tmp/ (not in blobs/: the
    store verifies clean), and the next run asks only for the rest."""
    repository, manifest = pushed

    def interrupt(seconds: float) -> None:
        raise KeyboardInterrupt

    fault_proxy.add(Fault("GET", r"/blobs/sha256:", "cut", after=SIZE // 3))
    with pytest.raises(KeyboardInterrupt), Client(fault_proxy.host, policy=FAST, sleep=interrupt) as first:
        remote = find_manifests(first, repository, ["entry"])["entry"]
        assert remote is not None
        fetch_manifests(first, store, repository, {"entry": remote}, jobs=1)
    layer = remote.manifest.layers[0]
    assert not store.has(layer.digest) and store.verify() == []
    kept = [p for p in (store.root / "ocibuild/tmp").iterdir() if p.name.startswith("partial-")]
    assert len(kept) == 1
    received = kept[0].stat().st_size
    assert 0 < received < SIZE

    fault_proxy.seen.clear()
    second = pull(fault_proxy.host, store, repository)
    assert store.resolve("entry") is not None and store.has(layer.digest)
    assert [s[3] for s in blob_gets(fault_proxy) if s[3]] == [f"bytes={received}-"]
    assert second.stats.downloaded == SIZE - received + remote.manifest.config.size, "only the rest moved"
    assert second.stats.retransferred == 0
    assert store.verify() == [] and not kept[0].exists()


def test_a_connection_the_server_closed_while_idle_is_replaced_silently(registry: RegistryServer,
                                                                        pushed: tuple[str, oci.Descriptor],
                                                                        store: Store) -> None:
    """A server (or a load balancer) that drops kept-alive connections without saying so: each request finds
    its connection gone and opens another, with no retry counted and no error."""
    import http.client
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    repository, manifest = pushed

    class Dropping(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802
            conn = http.client.HTTPConnection(registry.host, timeout=30)
            conn.request(self.command, self.path, headers={k: v for k, v in self.headers.items()
                                                           if k.lower() in ("accept", "range")})
            response = conn.getresponse()
            data = response.read() if self.command != "HEAD" else b""
            self.send_response(response.status)
            for name, value in response.getheaders():
                if name.lower() not in ("connection", "content-length", "transfer-encoding"):
                    self.send_header(name, value)
            self.send_header("Content-Length", response.getheader("Content-Length") or str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            conn.close()
            self.close_connection = True  # without "Connection: close": the client learns it only later

        do_HEAD = do_GET

    server = ThreadingHTTPServer(("127.0.0.1", 0), Dropping)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        c = pull(f"127.0.0.1:{server.server_address[1]}", store, repository)
    finally:
        server.shutdown()
        server.server_close()
    assert store.has(manifest.digest) and c.stats.retries == 0
    assert store.verify() == []
