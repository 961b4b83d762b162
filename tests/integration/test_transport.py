"""ocibuild's HTTP/1.1 (net/http.py) against real servers: the docker-registry (plain and TLS), reached directly
and through a proxy (absolute URLs for http, a CONNECT tunnel for https, with proxy credentials), and small
servers for the framings the registry does not use (chunked with trailers, a body ended by closing)."""

from __future__ import annotations

import base64
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trustme

from conftest import RegistryServer, start_registry
from ocibuild.errors import RegistryError
from ocibuild.net import http as transport
from ocibuild.net.retry import RetryPolicy
from ocibuild.registry import Client

PROXY_AUTH = "Basic " + base64.b64encode(b"me:pa ss").decode()


class Proxy:
    """An HTTP proxy on loopback: absolute-form requests are relayed, CONNECT is tunnelled. Every request must
    carry ``PROXY_AUTH``; ``seen`` holds each request line."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.seen: list[str] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._handle_quietly, args=(client,), daemon=True).start()

    def _handle_quietly(self, client: socket.socket) -> None:
        try:
            self._handle(client)
        except OSError:
            pass  # the client went away: a proxy just drops the connection

    def _handle(self, client: socket.socket) -> None:
        with client:
            head = b""
            while b"\r\n\r\n" not in head:
                data = client.recv(65536)
                if not data:
                    return
                head += data
            text, _, rest = head.partition(b"\r\n\r\n")
            lines = text.decode("latin-1").split("\r\n")
            self.seen.append(lines[0])
            if f"Proxy-Authorization: {PROXY_AUTH}" not in lines:
                client.sendall(b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n")
                return
            upstream = socket.create_connection(self.upstream)
            with upstream:
                if lines[0].startswith("CONNECT "):
                    client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                else:  # GET http://host/path HTTP/1.1: relay it in origin form, then the rest both ways
                    method, url, version = lines[0].split(" ")
                    path = "/" + url.split("://", 1)[1].split("/", 1)[1]
                    kept = [line for line in lines[1:] if not line.startswith("Proxy-Authorization")]
                    upstream.sendall("\r\n".join([f"{method} {path} {version}", *kept]).encode() + b"\r\n\r\n")
                if rest:
                    upstream.sendall(rest)
                _pump(client, upstream)

    def close(self) -> None:
        self.listener.close()


def _pump(a: socket.socket, b: socket.socket) -> None:
    while True:
        ready, _, _ = select.select([a, b], [], [], 10)
        if not ready:
            return
        for sock in ready:
            data = sock.recv(65536)
            if not data:
                return
            (b if sock is a else a).sendall(data)


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RegistryServer, Path]]:
    base = tmp_path_factory.mktemp("transport-tls")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert.private_key_pem.write_to_path(str(base / "server.key"))
    with open(base / "server.crt", "wb") as f:
        for blob in cert.cert_chain_pems:
            f.write(blob.bytes())
    ca.cert_pem.write_to_path(str(base / "ca.pem"))
    server = start_registry(base / "server", tls=(base / "server.crt", base / "server.key"), ca=base / "ca.pem")
    yield server, base / "ca.pem"
    server.stop()


def _connect(scheme: str, netloc: str, *, proxy: str | None = None, ca: Path | None = None) -> transport.Connection:
    context = transport.tls_context(str(ca) if ca else None) if scheme == "https" else None
    return transport.connect(scheme, netloc, proxy=proxy, context=context, connect_timeout=5, read_timeout=10)


def test_plain_http_through_a_proxy_with_credentials(registry: RegistryServer) -> None:
    host, port = registry.host.split(":")
    proxy = Proxy((host, int(port)))
    try:
        connection = _connect("http", registry.host, proxy=f"http://me:pa%20ss@127.0.0.1:{proxy.port}")
        with transport.exchange(connection, "GET", f"http://{registry.host}/v2/", {}, None) as response:
            assert response.status_code == 200 and response.read(1 << 16) == b"{}"
        connection.close()
        refused = _connect("http", registry.host, proxy=f"http://127.0.0.1:{proxy.port}")
        with transport.exchange(refused, "GET", f"http://{registry.host}/v2/", {}, None) as response:
            assert response.status_code == 407
        refused.close()
    finally:
        proxy.close()
    assert proxy.seen[0] == f"GET http://{registry.host}/v2/ HTTP/1.1", "absolute-form to a plain-HTTP proxy"


def test_https_through_a_connect_tunnel_verifies_the_registry(tls_server: tuple[RegistryServer, Path]) -> None:
    server, ca = tls_server
    host, port = server.host.split(":")
    proxy = Proxy((host, int(port)))
    try:
        connection = _connect("https", server.host, proxy=f"http://me:pa%20ss@127.0.0.1:{proxy.port}", ca=ca)
        with transport.exchange(connection, "GET", f"https://{server.host}/v2/", {}, None) as response:
            assert response.status_code == 200
        with transport.exchange(connection, "GET", f"https://{server.host}/v2/", {}, None) as response:
            assert response.status_code == 200, "the tunnel is kept alive"
        connection.close()
        untrusted = _connect("https", server.host, proxy=f"http://me:pa%20ss@127.0.0.1:{proxy.port}")
        with pytest.raises(transport.TLSError) as caught:
            transport.exchange(untrusted, "GET", f"https://{server.host}/v2/", {}, None)
        assert caught.value.certificate
    finally:
        proxy.close()
    assert proxy.seen == [f"CONNECT {server.host} HTTP/1.1"] * 2, "one tunnel per connection, reused"


def test_tls_to_a_plain_http_server_is_not_a_certificate_error(registry: RegistryServer) -> None:
    with pytest.raises(transport.TLSError) as caught:
        transport.exchange(_connect("https", registry.host), "GET", f"https://{registry.host}/v2/", {}, None)
    assert not caught.value.certificate, "the registry client may fall back to plain HTTP for such a host"


def test_keep_alive_reuses_one_socket(registry: RegistryServer) -> None:
    connection = _connect("http", registry.host)
    with transport.exchange(connection, "GET", f"http://{registry.host}/v2/", {}, None) as response:
        assert response.status_code == 200
    sock = connection.sock
    assert sock is not None and transport.reusable(connection)
    with transport.exchange(connection, "HEAD", f"http://{registry.host}/v2/nothing/blobs/sha256:{'0' * 64}", {},
                            None) as response:
        assert response.status_code == 404 and response.headers.get("content-length") is not None
    with transport.exchange(connection, "GET", f"http://{registry.host}/v2/nothing/manifests/latest", {},
                            None) as response:
        assert response.status_code == 404 and b"MANIFEST_UNKNOWN" in response.read(1 << 16)
    assert connection.sock is sock
    connection.close()


def _one_shot_server(reply: bytes, requests: list[bytes] | None = None) -> tuple[socket.socket, int]:
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        client, _ = listener.accept()
        with client:
            data = b""
            while b"\r\n\r\n" not in data:
                data += client.recv(65536)
            if requests is not None:
                requests.append(data)
            client.sendall(reply)

    threading.Thread(target=serve, daemon=True).start()
    return listener, listener.getsockname()[1]


@pytest.mark.parametrize("reply, body, reusable", [
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-A: 1\r\nx-a: 2\r\n\r\n"
     b"5;ext=1\r\nhello\r\n1\r\n,\r\n6\r\n world\r\n0\r\nTrailer: t\r\n\r\n", b"hello, world", True),
    (b"HTTP/1.0 200 OK\r\n\r\nuntil the end", b"until the end", False),
    (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc", b"abc",
     False),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", b"short", False),
])
def test_framings(reply: bytes, body: bytes, reusable: bool) -> None:
    listener, port = _one_shot_server(reply)
    with listener:
        connection = _connect("http", f"127.0.0.1:{port}")
        response = transport.exchange(connection, "GET", f"http://127.0.0.1:{port}/", {}, None)
        assert response.read(1 << 16) == body
        response.close()
        assert (connection.sock is not None) is reusable
        if b"X-A" in reply:
            assert response.headers.get("x-a") == "1, 2"
        connection.close()


@pytest.mark.parametrize("reply", [b"", b"SSH-2.0-OpenSSH\r\n", b"HTTP/1.1 200 OK\r\nbroken header\r\n\r\n",
                                   b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n"])
def test_malformed_responses_are_connection_errors(reply: bytes) -> None:
    listener, port = _one_shot_server(reply)
    with listener:
        connection = _connect("http", f"127.0.0.1:{port}")
        with pytest.raises(ConnectionError):
            transport.exchange(connection, "GET", f"http://127.0.0.1:{port}/", {}, None)
        assert connection.sock is None


def test_requests_ask_for_bodies_as_they_are() -> None:
    """Without Accept-Encoding a server may compress any response; manifests and blobs are hashed as received."""
    seen: list[bytes] = []
    listener, port = _one_shot_server(b"HTTP/1.1 204 No Content\r\n\r\n", seen)
    with listener:
        connection = _connect("http", f"127.0.0.1:{port}")
        with transport.exchange(connection, "PUT", f"http://127.0.0.1:{port}/v2/x?digest=sha256:1", {"X-Y": "z"},
                                b"body") as response:
            assert response.status_code == 204 and response.read(10) == b""
        connection.close()
    head = seen[0].split(b"\r\n\r\n")[0].decode().split("\r\n")
    assert head[0] == "PUT /v2/x?digest=sha256:1 HTTP/1.1"
    assert {"Host: 127.0.0.1:%d" % port, "X-Y: z", "Content-Length: 4", "Accept-Encoding: identity"} <= set(head)


# ---- hardening (issue 9): the deadline, interim responses, certs.d, malformed lengths, over real sockets ----------

def _server(handle: Callable[[socket.socket], None]) -> tuple[socket.socket, int]:
    """A loopback server that runs ``handle`` on every connection it accepts until the listener is closed."""
    listener = socket.create_server(("127.0.0.1", 0))

    def handle_quietly(client: socket.socket) -> None:
        with client:
            try:
                handle(client)
            except OSError:
                pass  # the client hung up

    def serve() -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=handle_quietly, args=(client,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return listener, listener.getsockname()[1]


def _read_request(client: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        piece = client.recv(65536)
        if not piece or (not data and piece.startswith(b"\x16")):  # gone, or a TLS ClientHello: plain HTTP here
            return b""
        data += piece
    return data


@pytest.mark.timeout(30)  # without the bound, this would wait forever
def test_a_server_sending_a_byte_a_second_meets_the_deadline() -> None:
    def drip(client: socket.socket) -> None:
        _read_request(client)
        for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 100:
            client.sendall(bytes([byte]))
            time.sleep(0.1)

    listener, port = _server(drip)
    with listener:
        connection = transport.connect("http", f"127.0.0.1:{port}", proxy=None, context=None, connect_timeout=5,
                                       read_timeout=10, deadline=1.5)
        started = time.monotonic()
        with pytest.raises(TimeoutError, match="the response took longer than 1.5 s"):
            transport.exchange(connection, "GET", f"http://127.0.0.1:{port}/", {}, None)
        assert time.monotonic() - started < 5 and connection.sock is None


@pytest.mark.timeout(30)  # without the bound, this would wait forever
def test_an_endless_stream_of_100_continue_is_refused() -> None:
    def endless(client: socket.socket) -> None:
        _read_request(client)
        while True:
            client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n" * 100)

    listener, port = _server(endless)
    with listener:
        connection = _connect("http", f"127.0.0.1:{port}")
        with pytest.raises(transport.ProtocolError, match=r"more than 10 interim \(1xx\) responses"):
            transport.exchange(connection, "GET", f"http://127.0.0.1:{port}/", {}, None)
        assert connection.sock is None


def test_a_content_length_of_superscript_two_is_a_registry_error_not_a_traceback() -> None:
    """'²'.isdigit() is true and int('²') raises ValueError: `ocibuild login` once showed a traceback."""
    def reply(client: socket.socket) -> None:
        if _read_request(client):
            client.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: \xb2\r\n\r\n{}")

    listener, port = _server(reply)
    with listener:
        client = Client(f"127.0.0.1:{port}", policy=RetryPolicy(attempts=2, base=0.0, cap=0.0), env={})
        with client, pytest.raises(RegistryError, match=r"malformed Content-Length '²'") as caught:
            client.check_login()
        assert caught.value.retryable


def test_every_crt_of_certs_d_is_trusted(tls_server: tuple[RegistryServer, Path], tmp_path: Path) -> None:
    """a.crt (a CA that did not sign the registry's certificate) sorts before b.crt (the one that did): all count."""
    server, ca = tls_server
    certs = tmp_path / "config/containers/certs.d" / server.host
    certs.mkdir(parents=True)
    trustme.CA().cert_pem.write_to_path(str(certs / "a.crt"))
    (certs / "b.crt").write_bytes(ca.read_bytes())
    with Client(server.host, env={"HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path / "config")}) as client:
        client.check_login()
        assert client.base == f"https://{server.host}"
