"""Inputs downloaded over HTTP through the registry client's stack (net.download): a loopback file server that
cuts bodies, ignores Range or fails, and a proxy named by the environment. Each case ends verified in the store's
download cache, or with a clear error and nothing unverified kept."""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from integration.test_transport import Proxy
from ocibuild.errors import FetchError
from ocibuild.net.download import fetch_bytes, fetch_file
from ocibuild.net.retry import Retrier, RetryPolicy
from ocibuild.oci import Digest
from ocibuild.store import Store

SIZE = 3 << 20
DATA = random.Random("download").randbytes(SIZE)
DIGEST = Digest.of(DATA)


@dataclass
class Files:
    """What the server does: ``cut`` closes the connection after that many body bytes (once each), ``statuses``
    answer the next requests instead of the file, ``ignore_range`` serves whole files; ``seen`` holds the Range
    header of each GET (None without one)."""

    host: str = ""
    cut: list[int] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)
    ignore_range: bool = False
    seen: list[str | None] = field(default_factory=list)


@pytest.fixture
def files() -> Iterator[Files]:
    state = Files()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802
            state.seen.append(self.headers.get("Range"))
            if state.statuses:
                self.send_response(state.statuses.pop(0))
                self.send_header("Retry-After", "1")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if self.path == "/redirect":
                self.send_response(302)
                self.send_header("Location", "/tool.tar.gz")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if self.path != "/tool.tar.gz":
                self.send_error(404)
                return
            start = 0
            asked = self.headers.get("Range")
            if asked and not state.ignore_range:
                start = int(asked.removeprefix("bytes=").split("-")[0])
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{SIZE - 1}/{SIZE}")
            else:
                self.send_response(200)
            self.send_header("Content-Length", str(SIZE - start))
            self.end_headers()
            body = DATA[start:]
            if state.cut:
                self.wfile.write(body[:state.cut.pop(0)])
                self.close_connection = True
                return
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    state.host = f"127.0.0.1:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield state
    server.shutdown()
    server.server_close()


@pytest.fixture(autouse=True)
def no_proxy_of_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)


class Sleeps(list[float]):
    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def fast(sleep: Sleeps | None = None) -> Retrier:
    return Retrier(RetryPolicy(attempts=3, base=0.01, cap=0.05, read_timeout=10), Sleeps() if sleep is None else sleep)


def partials(store: Store) -> list[Path]:
    return [p for p in (store.root / "ocibuild/tmp").glob("partial-*")]


def test_a_download_cut_twice_resumes_with_range_into_the_download_cache(files: Files, store: Store) -> None:
    files.cut = [SIZE // 4, SIZE // 4]
    lines: list[str] = []
    path = fetch_file(f"http://{files.host}/tool.tar.gz", DIGEST, store, what="layer 'tool'", progress=lines.append,
                      retrier=fast())
    assert path == store.private_dir("downloads") / DIGEST.hex and path.read_bytes() == DATA
    assert files.seen == [None, f"bytes={SIZE // 4}-", f"bytes={SIZE // 2}-"], "each try asks only for the rest"
    assert lines[0] == f"downloading http://{files.host}/tool.tar.gz" and "resuming at" in lines[1]
    assert not partials(store)
    files.seen.clear()
    assert fetch_file(f"http://{files.host}/tool.tar.gz", DIGEST, store, what="layer 'tool'") == path
    assert files.seen == [], "a cached download is not fetched again"


def test_a_server_ignoring_range_makes_the_download_start_over(files: Files, store: Store) -> None:
    files.cut, files.ignore_range = [SIZE // 3], True
    path = fetch_file(f"http://{files.host}/redirect", DIGEST, store, what="layer 'tool'", retrier=fast())
    assert path.read_bytes() == DATA and store.verify() == []


def test_an_interrupted_download_resumes_next_run(files: Files, store: Store) -> None:
    """Ctrl-C while backing off after a cut: the bytes received stay in the store's locked partial file, and the
    next run asks only for the rest."""
    def interrupt(seconds: float) -> None:
        raise KeyboardInterrupt

    files.cut = [SIZE // 3]
    url = f"http://{files.host}/tool.tar.gz"
    with pytest.raises(KeyboardInterrupt):
        fetch_file(url, DIGEST, store, what="layer 'tool'", retrier=Retrier(RetryPolicy(), interrupt))
    assert [p.stat().st_size for p in partials(store)] == [SIZE // 3]
    files.seen.clear()
    assert fetch_file(url, DIGEST, store, what="layer 'tool'", retrier=fast()).read_bytes() == DATA
    assert files.seen == [f"bytes={SIZE // 3}-"] and not partials(store)


def test_wrong_content_is_an_error_and_nothing_is_kept(files: Files, store: Store) -> None:
    wrong = Digest.of(b"something else")
    with pytest.raises(FetchError) as caught:
        fetch_file(f"http://{files.host}/tool.tar.gz", wrong, store, what="layer 'tool'", retrier=fast())
    assert "layer 'tool'" in str(caught.value) and str(DIGEST) in str(caught.value)
    assert caught.value.hint is not None and "sha256" in caught.value.hint
    assert not (store.private_dir("downloads") / wrong.hex).exists() and not partials(store)


def test_http_errors_fail_at_once_and_5xx_is_retried(files: Files, store: Store) -> None:
    with pytest.raises(FetchError, match="HTTP 404") as caught:
        fetch_file(f"http://{files.host}/missing.tar.gz", DIGEST, store, what="layer 'tool'", retrier=fast())
    assert caught.value.hint == "check the URL" and len(files.seen) == 1, "a 404 is not retried"
    sleeps = Sleeps()
    files.statuses = [503, 502]
    assert fetch_file(f"http://{files.host}/tool.tar.gz", DIGEST, store, what="layer 'tool'",
                      retrier=fast(sleeps)).read_bytes() == DATA
    assert sleeps == [1.0, 1.0], "Retry-After is honoured"
    files.statuses = [503] * 3
    with pytest.raises(FetchError, match="HTTP 503"):
        fetch_bytes(f"http://{files.host}/tool.tar.gz", what="layer 'base'", retrier=fast())


def test_the_environment_proxy_carries_downloads(files: Files, store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """As for registries: $http_proxy (with credentials) for a host it covers; loopback hosts go direct."""
    host, port = files.host.split(":")
    proxy = Proxy((host, int(port)))
    try:
        monkeypatch.setenv("http_proxy", f"http://me:pa%20ss@127.0.0.1:{proxy.port}")
        data = fetch_bytes("http://mirror.example/tool.tar.gz", what="layer 'base'", retrier=fast())
        assert data == DATA and proxy.seen == ["GET http://mirror.example/tool.tar.gz HTTP/1.1"]
        fetch_file(f"http://{files.host}/tool.tar.gz", DIGEST, store, what="layer 'tool'", retrier=fast())
        assert len(proxy.seen) == 1, "loopback never goes through the proxy"
    finally:
        proxy.close()
