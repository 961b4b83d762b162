"""A hostile registry (and download server) on 127.0.0.1: each case answers one request the way a broken or
malicious server would, and asserts the specific refusal. Reads have a minimum rate (a server dripping a byte a
second is cut, and its tries run out), a blob is never read past its descriptor's size, a download that cannot fit
in the store's free space is refused before its body is read, every JSON answer is parsed with a depth limit, a
token realm over plain HTTP is refused for an https registry, and a token that cannot go into a header is refused
where it arrives."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from ocibuild import oci
from ocibuild.errors import FetchError, FormatError, RegistryError, StoreError
from ocibuild.net.auth import Authenticator, Credentials
from ocibuild.net.download import fetch_file
from ocibuild.net.retry import Retrier, RetryPolicy
from ocibuild.oci import Descriptor, Digest
from ocibuild.registry import Client, find_manifests, resolve_image
from ocibuild.store import Store

DEEP = b"[" * 100_000 + b"]" * 100_000  # a JSON document nested 100,000 deep
# One try, or a few quick ones; a minimum rate averaged over half a second instead of 30 s.
QUICK = RetryPolicy(attempts=1, base=0.01, cap=0.02, read_timeout=10, rate_window=0.5)

Answer = Callable[[BaseHTTPRequestHandler], None]


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a client that hung up on a hostile answer: what the cases want


class Hostile:
    """An HTTP server answering each path with the function ``routes`` gives it (GET /v2/: 200 unless told);
    ``hits`` counts the requests per path."""

    def __init__(self) -> None:
        self.routes: dict[str, Answer] = {"/v2/": lambda handler: reply(handler, 200, b"{}")}
        self.hits: dict[str, int] = {}
        routes, hits = self.routes, self.hits

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                path = self.path.split("?")[0]
                hits[path] = hits.get(path, 0) + 1
                try:
                    routes.get(path, lambda handler: reply(handler, 404, b""))(self)
                except OSError:
                    self.close_connection = True  # the client hung up: what it was told to do
            do_HEAD = do_GET

        self.server = _QuietServer(("127.0.0.1", 0), Handler)
        self.host = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def reply(handler: BaseHTTPRequestHandler, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
    handler.send_response(status)
    for name, value in {"Content-Length": str(len(body)), **(headers or {})}.items():
        handler.send_header(name, value)
    handler.end_headers()
    if handler.command != "HEAD":
        handler.wfile.write(body)


def drip(body: bytes, headers: dict[str, str]) -> Answer:
    """The head at once, then the body a byte a second."""
    def answer(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        for name, value in {"Content-Length": str(len(body)), **headers}.items():
            handler.send_header(name, value)
        handler.end_headers()
        handler.wfile.flush()
        for byte in body:
            handler.wfile.write(bytes([byte]))
            handler.wfile.flush()
            time.sleep(1)
    return answer


@pytest.fixture
def hostile() -> Iterator[Hostile]:
    server = Hostile()
    yield server
    server.close()


MANIFEST_HEADERS = {"Content-Type": oci.OCI_MANIFEST}


# ---- the minimum rate ---------------------------------------------------------------------------------------------

def test_a_manifest_sent_a_byte_a_second_is_cut_by_the_minimum_rate(hostile: Hostile) -> None:
    hostile.routes["/v2/team/x/manifests/v1"] = drip(b'{"schemaVersion":2}', MANIFEST_HEADERS)
    with Client(hostile.host, env={}, policy=QUICK) as client:
        with pytest.raises(RegistryError, match=r"fetch manifest .*/team/x:v1: the server sent \d+ bytes in "
                                                r"[0-9.]+ s, slower than the minimum of 1024 bytes/s"):
            client.fetch_manifest("team/x", "v1")


def test_a_blob_sent_a_byte_a_second_runs_out_of_tries(hostile: Hostile, tmp_path: Path) -> None:
    """Each try brings a byte or two before the minimum rate cuts it: no progress that would earn more tries."""
    content = b"layer!"
    digest = Digest.of(content)
    hostile.routes[f"/v2/team/x/blobs/{digest}"] = drip(content, {})
    store = Store.open(tmp_path / "store")
    policy = RetryPolicy(attempts=3, base=0.01, cap=0.02, read_timeout=10, rate_window=0.5)
    with Client(hostile.host, env={}, policy=policy) as client:
        with pytest.raises(RegistryError, match=r"slower than the minimum of 1024 bytes/s"):
            client.fetch_blob("team/x", Descriptor(oci.LAYER_GZIP, digest, len(content)), store)
    assert hostile.hits[f"/v2/team/x/blobs/{digest}"] == 3
    assert list(store.blobs()) == [] and store.verify() == []


# ---- a blob is read up to its size, and only if it fits ---------------------------------------------------------

def test_a_blob_is_never_read_past_its_descriptors_size(hostile: Hostile, tmp_path: Path) -> None:
    """The server sends without end (no length: until it closes); the client takes the descriptor's 4096 bytes,
    finds they are not the blob, and stops: a digest refusal, after exactly 4096 bytes per try."""
    size = 4096

    def endless(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Connection", "close")
        handler.end_headers()
        while True:
            handler.wfile.write(b"x" * 65536)

    digest = Digest.of(b"y" * size)
    hostile.routes[f"/v2/team/x/blobs/{digest}"] = endless
    store = Store.open(tmp_path / "store")
    with Client(hostile.host, env={}, policy=QUICK) as client:
        with pytest.raises(RegistryError, match=rf"blob {digest} .* is corrupt: content written for {digest} hashes "
                                                rf"to {Digest.of(b'x' * size)}") as caught:
            client.fetch_blob("team/x", Descriptor(oci.LAYER_GZIP, digest, size), store)
        assert caught.value.code == "DIGEST_INVALID"
        assert client.stats.downloaded == 2 * size, "each of the two tries read exactly the descriptor's size"
    assert list(store.blobs()) == [] and store.verify() == []


def _free(path: Path) -> int:
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize


def test_a_layer_larger_than_the_free_space_is_refused_before_its_download(hostile: Hostile, tmp_path: Path) -> None:
    """A manifest may declare a 10^12-byte layer: nothing is read or written, whatever the server would send."""
    store = Store.open(tmp_path / "store")
    size = max(10**12, 2 * _free(store.root))
    digest = Digest.of(b"never sent")
    hostile.routes[f"/v2/team/x/blobs/{digest}"] = lambda handler: reply(handler, 200, b"z" * 100)
    with Client(hostile.host, env={}, policy=QUICK) as client:
        with pytest.raises(StoreError, match=rf"fetch blob {digest.short} from .*: {size:,} bytes to download, but "
                                             rf"the file system of {store.root} has only [0-9,]+ bytes free; refused "
                                             "before downloading them") as caught:
            client.fetch_blob("team/x", Descriptor(oci.LAYER_GZIP, digest, size), store)
        assert "ocibuild gc" in (caught.value.hint or "")
        assert client.stats.downloaded == 0
    assert list(store.blobs()) == [] and list((store.root / "ocibuild" / "tmp").iterdir()) == []


def test_an_input_whose_announced_size_cannot_fit_is_refused_before_its_download(hostile: Hostile,
                                                                                 tmp_path: Path) -> None:
    """A download of unknown size (a run layer's {url, sha256}) is held to the size the server announces."""
    store = Store.open(tmp_path / "store")
    size = max(10**12, 2 * _free(store.root))

    def announced(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Length", str(size))
        handler.end_headers()
        handler.wfile.write(b"z" * 100)  # then closes: a body cut short, were it read

    hostile.routes["/input.tar"] = announced
    with pytest.raises(StoreError, match=rf"{size:,} bytes to download, but the file system of {store.root} has "
                                         "only"):
        fetch_file(f"http://{hostile.host}/input.tar", Digest.of(b"input"), store, what="layer 'x'",
                   retrier=Retrier(QUICK))
    assert list(store.blobs()) == [] and list((store.root / "ocibuild" / "tmp").iterdir()) == []


# ---- JSON nested 100,000 deep -------------------------------------------------------------------------------------

@pytest.mark.parametrize("content_type, lookup", [
    (oci.OCI_MANIFEST, "find_manifests"), (oci.OCI_INDEX, "resolve_image"), ("", "find_manifests"),
    ("", "resolve_image"),
])
def test_a_manifest_nested_100000_deep_is_refused(hostile: Hostile, content_type: str, lookup: str) -> None:
    """Whether the registry names its type (parsed as a manifest or an index: a cache lookup, an image base) or
    not (its mediaType is looked up first)."""
    hostile.routes["/v2/team/x/manifests/v1"] = lambda handler: reply(
        handler, 200, DEEP, {"Content-Type": content_type} if content_type else {})
    with Client(hostile.host, env={}, policy=QUICK) as client:
        with pytest.raises((FormatError, RegistryError), match="nested more than 100 levels deep; refused"):
            if lookup == "find_manifests":
                find_manifests(client, "team/x", ["v1"])
            else:
                resolve_image(client, "team/x", "v1", oci.Platform())


def test_an_error_response_nested_100000_deep_is_still_an_error_response(hostile: Hostile) -> None:
    hostile.routes["/v2/team/x/manifests/v1"] = lambda handler: reply(handler, 400, DEEP)
    with Client(hostile.host, env={}, policy=QUICK) as client:
        with pytest.raises(RegistryError, match=r"fetch manifest .*/team/x:v1: HTTP 400$"):
            client.fetch_manifest("team/x", "v1")


def _bearer(hostile: Hostile, realm: str) -> None:
    hostile.routes["/v2/"] = lambda handler: reply(handler, 401, b"", {
        "WWW-Authenticate": f'Bearer realm="{realm}",service="hostile"'})


def test_a_token_response_nested_100000_deep_gives_no_token(hostile: Hostile) -> None:
    _bearer(hostile, f"http://{hostile.host}/token")
    hostile.routes["/token"] = lambda handler: reply(handler, 200, DEEP)
    with Client(hostile.host, env={}, policy=QUICK) as client:
        with pytest.raises(RegistryError, match=r"the token server http://.*/token returned no token"):
            client.fetch_manifest("team/x", "v1")


# ---- tokens: where they come from, what they hold ---------------------------------------------------------------

@pytest.mark.parametrize("token", ["abc\r\nX-Injected: 1", "abc\ndef", "caf\u00e9", "\u20ac", "a b"])
def test_a_token_that_cannot_go_into_a_header_is_refused_naming_the_registry(hostile: Hostile, token: str) -> None:
    _bearer(hostile, f"http://{hostile.host}/token")
    hostile.routes["/token"] = lambda handler: reply(handler, 200, json.dumps({"token": token}).encode())
    with Client(hostile.host, env={}, policy=QUICK) as client:
        with pytest.raises(RegistryError, match=rf"^{hostile.host}: the token server http://{hostile.host}/token "
                                                "returned a token holding a control character, a space or a "
                                                "character beyond ASCII") as caught:
            client.fetch_manifest("team/x", "v1")
    assert token not in str(caught.value) and "hostile" in (caught.value.hint or "")
    assert "/v2/team/x/manifests/v1" not in hostile.hits, "the token was never sent"


def test_a_plain_http_realm_is_refused_for_a_registry_reached_over_https() -> None:
    """Even a loopback or insecure registry's token server: the challenge came over https, so the credentials
    must not leave it for plain HTTP. (Over plain HTTP, as a loopback registry may be reached, it may.)"""
    sent: list[str] = []

    def send(method: str, url: str, headers: object, body: bytes | None) -> object:
        sent.append(url)
        raise AssertionError("nothing is sent")

    creds = Credentials("ci", "secret")
    auth = Authenticator("127.0.0.1:5000", creds, plain_http_allowed=True, send=send,  # type: ignore[arg-type]
                         retrier=Retrier(QUICK))
    auth.learn('Bearer realm="http://127.0.0.1:5001/token",service="r"', "https://127.0.0.1:5000/v2/")
    with pytest.raises(RegistryError, match=r"^127.0.0.1:5000 asks for a token over plain HTTP "
                                            r"\(http://127.0.0.1:5001/token\), which would carry the credentials in "
                                            "the clear; refused: the registry itself is reached over https"):
        auth.header(("repository:team/x:pull",))
    assert sent == []
    auth.learn('Bearer realm="https://auth.example.com/token",service="r"', "https://127.0.0.1:5000/v2/")
    with pytest.raises(AssertionError, match="nothing is sent"):
        auth.header(("repository:team/x:pull",))
    assert sent == ["https://auth.example.com/token?service=r&scope=repository%3Ateam%2Fx%3Apull"], \
        "a realm on another host, over https, receives them (as Docker Hub's auth.docker.io does)"


def test_an_input_sent_a_byte_a_second_is_cut_by_the_minimum_rate(hostile: Hostile, tmp_path: Path) -> None:
    """A run layer's {url, sha256} input, through the same HTTP stack: a FetchError naming it."""
    hostile.routes["/slow.tar"] = drip(b"slow input", {})
    with pytest.raises(FetchError, match=r"layer 'x': downloading http://.*/slow.tar: the server sent \d+ bytes"):
        fetch_file(f"http://{hostile.host}/slow.tar", Digest.of(b"slow input"), Store.open(tmp_path / "store"),
                   what="layer 'x'", retrier=Retrier(QUICK))
