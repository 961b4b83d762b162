"""transport.py's HTTP/1.1 reading, held to h11's: the same recorded responses (good, truncated, hostile) go to
both, through a socketpair standing in for the TCP connection; they must agree on every status and body, or both
refuse. Then the request side (what is refused before anything is sent), the cap on interim responses and the
deadline of a response."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

import h11
import pytest

from ocibuild.net import http as transport

HOST = "registry.test"


class _PairEnd(socket.socket):
    """One end of a socketpair standing in for a TCP connection: TCP options are ignored."""

    def setsockopt(self, level: int, option: int, value: Any, *rest: Any) -> None:  # type: ignore[override]
        if level != socket.IPPROTO_TCP:
            super().setsockopt(level, option, value, *rest)


class Peer:
    """The server side of the next connection transport opens: sends ``pieces``, ``pace`` seconds apart, then
    closes; stops early when the client hangs up. ``received``: what the client sent; ``dialled``: connections
    asked for."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, pieces: Iterable[bytes], pace: float = 0.0) -> None:
        self.pieces, self.pace = pieces, pace
        self.received = bytearray()
        self.dialled: list[tuple[str, int]] = []
        self._threads: list[threading.Thread] = []
        monkeypatch.setattr(transport.socket, "create_connection", self._dial)

    def _dial(self, address: tuple[str, int], timeout: float | None = None) -> socket.socket:
        self.dialled.append(address)
        ours, theirs = socket.socketpair()
        client = _PairEnd(fileno=ours.detach())
        client.settimeout(timeout)
        thread = threading.Thread(target=self._serve, args=(theirs,), daemon=True)
        thread.start()
        self._threads.append(thread)
        return client

    def _serve(self, sock: socket.socket) -> None:
        with sock:
            try:
                for n, piece in enumerate(self.pieces):
                    if n and self.pace:
                        time.sleep(self.pace)
                    sock.sendall(piece)
                sock.shutdown(socket.SHUT_WR)
                sock.settimeout(5)
                while data := sock.recv(65536):  # what the client sent, until it hangs up
                    self.received += data
            except OSError:
                pass  # the client hung up first

    def join(self) -> None:
        for thread in self._threads:
            thread.join(10)
            assert not thread.is_alive(), "the peer still sends: the client never hung up"


@contextlib.contextmanager
def _connection(**options: Any) -> Iterator[transport.Connection]:
    settings: dict[str, Any] = {"proxy": None, "connect_timeout": 5, "read_timeout": 5, **options}
    connection = transport.connect("http", HOST, context=None, **settings)
    try:
        yield connection
    finally:
        connection.close()


# ---- the corpus ----------------------------------------------------------------------------------------------------

OK = b"HTTP/1.1 200 OK\r\n"
CHUNKED = OK + b"Transfer-Encoding: chunked\r\n\r\n"


def _cl(length: bytes, body: bytes = b"hello") -> bytes:
    return OK + b"Content-Length: " + length + b"\r\n\r\n" + body


# name -> (method, the recorded response, the body both must read, or None: both must refuse)
GOOD: dict[str, tuple[str, bytes, bytes | None]] = {
    "content-length": ("GET", _cl(b"5"), b"hello"),
    "content-length with leading zeros": ("GET", _cl(b"005"), b"hello"),
    "content-length zero": ("GET", _cl(b"0", b""), b""),
    "content-length repeated, same value": ("GET", OK + b"Content-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
                                            b"hello"),
    "content-length listed twice, same value": ("GET", _cl(b"5, 5"), b"hello"),
    "content-length with spaces around": ("GET", OK + b"Content-Length: \t 5 \t\r\n\r\nhello", b"hello"),
    "content-length body of 300 KiB": ("GET", _cl(b"307200", bytes(range(256)) * 1200), bytes(range(256)) * 1200),
    "chunked with extensions and trailers": (
        "GET", CHUNKED + b'5;name=value\r\nhello\r\n1;a;b="c, d"\r\n,\r\n6 \t\r\n world\r\n0;last\r\n'
                         b"Trailer-A: 1\r\nTrailer-B: x y\r\n\r\n", b"hello, world"),
    "chunked, upper-case hex and padded size": ("GET", CHUNKED + b"000A\r\n0123456789\r\n0\r\n\r\n", b"0123456789"),
    "chunked, Transfer-Encoding in capitals": (
        "GET", OK + b"Transfer-Encoding: CHUNKED\r\n\r\n3\r\nabc\r\n0\r\n\r\n", b"abc"),
    "chunked, a 300 KiB chunk": ("GET", CHUNKED + b"4b000\r\n" + b"x" * 0x4B000 + b"\r\n0\r\n\r\n", b"x" * 0x4B000),
    "chunked beats content-length": (
        "GET", OK + b"Transfer-Encoding: chunked\r\nContent-Length: 100\r\n\r\n5\r\nhello\r\n0\r\n\r\n", b"hello"),
    "close-delimited": ("GET", OK + b"\r\nuntil the end", b"until the end"),
    "close-delimited, HTTP/1.0": ("GET", b"HTTP/1.0 200 OK\r\n\r\nold", b"old"),
    "interim responses, then the final one": (
        "GET", b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>; rel=preload\r\n\r\n"
               + _cl(b"3", b"abc"), b"abc"),
    "204 without a body": ("GET", b"HTTP/1.1 204 No Content\r\n\r\n", b""),
    "304 with the length of what it does not send": ("GET", b"HTTP/1.1 304 Not Modified\r\nContent-Length: 99\r\n\r\n",
                                                     b""),
    "HEAD with the length of what it does not send": ("HEAD", _cl(b"1000", b""), b""),
    "HEAD of a chunked resource": ("HEAD", CHUNKED, b""),
    "404 with a body": ("GET", b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\n{}", b"{}"),
    "no reason phrase": ("GET", b"HTTP/1.1 200\r\nContent-Length: 2\r\n\r\nok", b"ok"),
    "empty reason phrase": ("GET", b"HTTP/1.1 200 \r\nContent-Length: 2\r\n\r\nok", b"ok"),
    "bare LF line ends in the head": ("GET", b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok", b"ok"),
    "obs-fold in a header": ("GET", OK + b"X-Long: a\r\n  b\r\nContent-Length: 2\r\n\r\nok", b"ok"),
    "obs-fold continuing Content-Length": ("GET", OK + b"Content-Length:\r\n 2\r\n\r\nok", b"ok"),
    "empty header value": ("GET", OK + b"X-Empty:\r\nContent-Length: 2\r\n\r\nok", b"ok"),
    "controls other than NUL, CR, LF in a value (RFC 9110 5.5 lets a recipient keep them)": (
        "GET", OK + b"X-Odd: a\x01b\x7fc\xe9\r\nContent-Length: 2\r\n\r\nok", b"ok"),
    "a head of 60 KiB": ("GET", OK + b"X-Big: " + b"x" * (60 << 10) + b"\r\nContent-Length: 2\r\n\r\nok", b"ok"),
}

TRUNCATED: dict[str, tuple[str, bytes, bytes | None]] = {
    "nothing at all": ("GET", b"", None),
    "in the status line": ("GET", b"HTTP/1.1 200 OK", None),
    "in the headers": ("GET", OK + b"Content-Le", None),
    "after the headers, before the blank line": ("GET", OK + b"Content-Length: 5\r\n", None),
    "in a content-length body": ("GET", _cl(b"10", b"short"), None),
    "in a content-length body, nothing of it": ("GET", _cl(b"10", b""), None),
    "in a chunk": ("GET", CHUNKED + b"5\r\nhel", None),
    "after a chunk's data": ("GET", CHUNKED + b"5\r\nhello", None),
    "before the last chunk": ("GET", CHUNKED + b"5\r\nhello\r\n", None),
    "in a chunk-size line": ("GET", CHUNKED + b"5\r\nhello\r\n0", None),
    "after the last chunk": ("GET", CHUNKED + b"5\r\nhello\r\n0\r\n", None),
    "in the trailers": ("GET", CHUNKED + b"0\r\nTrailer: 1\r\n", None),
    "a 300 KiB chunk cut": ("GET", CHUNKED + b"4b000\r\n" + b"x" * 0x40000, None),
}

HOSTILE: dict[str, tuple[str, bytes, bytes | None]] = {
    "content-length not a number": ("GET", _cl(b"x"), None),
    "content-length '²' (isdigit, not a digit)": ("GET", _cl("²".encode("latin-1")), None),
    "content-length '²' in UTF-8": ("GET", _cl("²".encode()), None),
    "content-length negative": ("GET", _cl(b"-1"), None),
    "content-length with a sign": ("GET", _cl(b"+5"), None),
    "content-length hexadecimal": ("GET", _cl(b"0x5"), None),
    "content-length with a space inside": ("GET", _cl(b"5 5"), None),
    "content-length empty": ("GET", _cl(b""), None),
    "content-length of 21 digits": ("GET", _cl(b"1" * 21), None),
    "content-length of 20 digits, short body": ("GET", _cl(b"9" * 20), None),
    "content-lengths that differ": ("GET", OK + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!", None),
    "content-lengths that differ, listed": ("GET", _cl(b"5, 6"), None),
    "content-length with an empty list item": ("GET", _cl(b"5,"), None),
    "content-lengths that differ by leading zeros": ("GET", _cl(b"5, 05"), None),
    "bad content-length on a 204": ("GET", b"HTTP/1.1 204 No Content\r\nContent-Length: x\r\n\r\n", None),
    "bad content-length on a HEAD response": ("HEAD", _cl(b"-1", b""), None),
    "bad content-length on an interim response": (
        "GET", b"HTTP/1.1 100 Continue\r\nContent-Length: x\r\n\r\n" + _cl(b"5"), None),
    "transfer-encoding gzip, chunked": ("GET", OK + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", None),
    "transfer-encoding twice": (
        "GET", OK + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", None),
    "transfer-encoding identity": ("GET", OK + b"Transfer-Encoding: identity\r\n\r\nhello", None),
    "transfer-encoding empty": ("GET", OK + b"Transfer-Encoding:\r\n\r\nhello", None),
    "chunk size negative": ("GET", CHUNKED + b"-1\r\nhello\r\n0\r\n\r\n", None),
    "chunk size 0x5": ("GET", CHUNKED + b"0x5\r\nhello\r\n0\r\n\r\n", None),
    "chunk size not hexadecimal": ("GET", CHUNKED + b"g\r\nhello\r\n0\r\n\r\n", None),
    "chunk size of 21 hex digits": ("GET", CHUNKED + b"f" * 21 + b"\r\nhello\r\n0\r\n\r\n", None),
    "chunk size of 20 hex digits, short body": ("GET", CHUNKED + b"f" * 20 + b"\r\nhello\r\n0\r\n\r\n", None),
    "chunk size after a space": ("GET", CHUNKED + b" 5\r\nhello\r\n0\r\n\r\n", None),
    "chunk size with a space before its extension": ("GET", CHUNKED + b"5 ;x\r\nhello\r\n0\r\n\r\n", None),
    "chunk size missing": ("GET", CHUNKED + b"\r\nhello\r\n0\r\n\r\n", None),
    "chunk-size line ended by a bare LF": ("GET", CHUNKED + b"5\nhello\r\n0\r\n\r\n", None),
    "chunk data followed by a bare LF": ("GET", CHUNKED + b"5\r\nhello\n0\r\n\r\n", None),
    "chunk data longer than its size": ("GET", CHUNKED + b"5\r\nhelloXY\r\n0\r\n\r\n", None),
    "chunk-size line of 70 KiB": ("GET", CHUNKED + b"5;" + b"x" * (70 << 10) + b"\r\nhello\r\n0\r\n\r\n", None),
    "malformed trailer": ("GET", CHUNKED + b"0\r\nnot a trailer\r\n\r\n", None),
    "trailers of 100 KiB": ("GET", CHUNKED + b"0\r\n" + b"T: " + b"x" * (100 << 10) + b"\r\n\r\n", None),
    "NUL in a header value": ("GET", OK + b"X: a\x00b\r\nContent-Length: 2\r\n\r\nok", None),
    "bare CR in a header value": ("GET", OK + b"X: a\rSet-Cookie: b\r\nContent-Length: 2\r\n\r\nok", None),
    "vertical tab in a header value": ("GET", OK + b"X: a\x0bb\r\nContent-Length: 2\r\n\r\nok", None),
    "space in a header name": ("GET", OK + b"Bad Name: x\r\nContent-Length: 2\r\n\r\nok", None),
    "space before the colon": ("GET", OK + b"Content-Length : 2\r\n\r\nok", None),
    "DEL in a header name": ("GET", OK + b"X\x7f: x\r\nContent-Length: 2\r\n\r\nok", None),
    "non-ASCII header name": ("GET", OK + b"X\xe9: x\r\nContent-Length: 2\r\n\r\nok", None),
    "header line without a colon": ("GET", OK + b"broken header\r\n\r\n", None),
    "header with an empty name": ("GET", OK + b": x\r\nContent-Length: 2\r\n\r\nok", None),
    "obs-fold as the first header line": ("GET", OK + b" X: 1\r\nContent-Length: 2\r\n\r\nok", None),
    "bare CR line ends": ("GET", b"HTTP/1.1 200 OK\rContent-Length: 2\r\rok", None),
    "CR CR LF line ends": ("GET", b"HTTP/1.1 200 OK\r\r\nContent-Length: 2\r\r\n\r\nok", None),
    "a blank line before the status line": ("GET", b"\r\n" + _cl(b"5"), None),
    "not HTTP": ("GET", b"SSH-2.0-OpenSSH_9.2\r\n", None),
    "status of two digits": ("GET", b"HTTP/1.1 20 OK\r\nContent-Length: 2\r\n\r\nok", None),
    "status of four digits": ("GET", b"HTTP/1.1 2000 OK\r\nContent-Length: 2\r\n\r\nok", None),
    "status below 100": ("GET", b"HTTP/1.1 099 Odd\r\nContent-Length: 2\r\n\r\nok", None),
    "status glued to its reason": ("GET", b"HTTP/1.1 200OK\r\nContent-Length: 2\r\n\r\nok", None),
    "two spaces before the status": ("GET", b"HTTP/1.1  200 OK\r\nContent-Length: 2\r\n\r\nok", None),
    "NUL in the reason phrase": ("GET", b"HTTP/1.1 200 O\x00K\r\nContent-Length: 2\r\n\r\nok", None),
    "lower-case protocol name": ("GET", b"http/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", None),
    "101 Switching Protocols, unasked": ("GET", b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\nhello", None),
    "1000 interim responses, then nothing": ("GET", b"HTTP/1.1 100 Continue\r\n\r\n" * 1000, None),
    "a header of 100 KiB": ("GET", OK + b"X-Big: " + b"x" * (100 << 10) + b"\r\nContent-Length: 2\r\n\r\nok", None),
    "a head of 100 KiB in small headers": (
        "GET", OK + b"X-A: 1\r\n" * ((100 << 10) // 8) + b"Content-Length: 2\r\n\r\nok", None),
}

# Deliberate differences: name -> (method, response, what transport reads, what h11 reads, why).
DIVERGENCES: dict[str, tuple[str, bytes, bytes | None, bytes | None, str]] = {
    "more interim responses than the cap, then the final one": (
        "GET", b"HTTP/1.1 102 Processing\r\n\r\n" * (transport.INTERIM_MAX + 1) + _cl(b"2", b"ok"), None, b"ok",
        "transport refuses more than INTERIM_MAX interim responses, so that a stream of them cannot hold a request "
        "forever; h11 leaves that to its caller"),
}


class Reading(NamedTuple):
    status: int
    body: bytes


def read_with_transport(monkeypatch: pytest.MonkeyPatch, method: str, reply: bytes) -> Reading | None:
    """What transport reads (None: it refused, or the body was cut short, which its callers see as ``complete``
    False)."""
    peer = Peer(monkeypatch, [reply])
    try:
        with _connection() as connection, \
                transport.exchange(connection, method, f"http://{HOST}/v2/", {}, None) as response:
            body = bytearray()
            while piece := response.read(1 << 16):
                body += piece
            return Reading(response.status_code, bytes(body)) if response.complete else None
    except ConnectionError:  # ProtocolError, or a connection closed before any response
        return None
    finally:
        peer.join()


def read_with_h11(method: str, reply: bytes) -> Reading | None:
    """What h11 reads, fed as a socket would feed it (512-byte pieces, then the end); None: it refused."""
    connection = h11.Connection(h11.CLIENT, max_incomplete_event_size=transport._HEAD_MAX)
    connection.send(h11.Request(method=method, target="/v2/", headers=[("Host", HOST)]))
    connection.send(h11.EndOfMessage())
    status, body = 0, bytearray()
    try:
        for piece in [reply[i:i + 512] for i in range(0, len(reply), 512)] + [b""]:
            connection.receive_data(piece)
            while (event := connection.next_event()) is not h11.NEED_DATA:
                if isinstance(event, h11.Response):
                    status = event.status_code
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    return Reading(status, bytes(body))
                elif isinstance(event, h11.ConnectionClosed):
                    return None
    except h11.RemoteProtocolError:
        return None
    return None


CORPUS = {**GOOD, **TRUNCATED, **HOSTILE}


@pytest.mark.parametrize("name", CORPUS)
def test_transport_reads_every_recorded_response_as_h11_does(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    method, reply, body = CORPUS[name]
    ours, theirs = read_with_transport(monkeypatch, method, reply), read_with_h11(method, reply)
    assert ours == theirs, f"transport read {ours!r:.120}, h11 {theirs!r:.120}"
    assert _body(ours) == body, "the corpus says what both must read"


@pytest.mark.parametrize("name", DIVERGENCES)
def test_deliberate_differences_from_h11_are_listed(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    method, reply, ours, theirs, _why = DIVERGENCES[name]
    assert _body(read_with_transport(monkeypatch, method, reply)) == ours
    assert _body(read_with_h11(method, reply)) == theirs


def _body(reading: Reading | None) -> bytes | None:
    return None if reading is None else reading.body


def test_malformed_responses_raise_protocol_errors_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Never ValueError, IndexError or UnicodeError (a traceback from `ocibuild login`): the registry client turns
    OSError into its own errors."""
    for name in ["content-length '²' (isdigit, not a digit)", "chunk size negative", "NUL in a header value",
                 "transfer-encoding gzip, chunked", "content-lengths that differ", "a header of 100 KiB"]:
        method, reply, _ = HOSTILE[name]
        peer = Peer(monkeypatch, [reply])
        with _connection() as connection:
            with pytest.raises(transport.ProtocolError):
                with transport.exchange(connection, method, f"http://{HOST}/", {}, None) as response:
                    response.read(1 << 16)
            assert connection.sock is None, "a connection that read a malformed response is not reused"
        peer.join()


def test_headers_join_repeats_with_commas_and_unfold_with_a_space(monkeypatch: pytest.MonkeyPatch) -> None:
    reply = OK + b"X-A: 1\r\nx-a: 2\r\nX-Fold: a\r\n\t b\r\nContent-Length: 0\r\n\r\n"
    peer = Peer(monkeypatch, [reply])
    with _connection() as connection, transport.exchange(connection, "GET", f"http://{HOST}/", {}, None) as response:
        assert response.headers.get("X-A") == "1, 2" and response.headers["x-fold"] == "a b"
        assert response.complete
    peer.join()


# ---- the request side ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("url", [
    f"http://{HOST}/v2/a\x00b", f"http://{HOST}/v2/a\rb", f"http://{HOST}/v2/a\nb", f"http://{HOST}/v2/a\r\nX: y",
    f"http://{HOST}/v2/a\x7fb", f"http://{HOST}/v2/a b", f"http://{HOST}/v2/a\tb", f"http://{HOST}/v2/\xe9",
    f"http://{HOST}/v2/?q=a b", f"http://{HOST} /v2/",
])
def test_a_target_with_a_control_a_space_or_non_ascii_is_refused_before_sending(monkeypatch: pytest.MonkeyPatch,
                                                                               url: str) -> None:
    peer = Peer(monkeypatch, [b"HTTP/1.1 204 No Content\r\n\r\n"])
    with _connection() as connection, pytest.raises(transport.InvalidRequest) as caught:
        transport.exchange(connection, "GET", url, {}, None)
    assert isinstance(caught.value, OSError) and isinstance(caught.value, ValueError)
    assert peer.dialled == [], "refused before connecting, so before sending anything"


@pytest.mark.parametrize("name, value", [
    ("X-A", "a\r\nInjected: 1"), ("X-A", "a\nb"), ("X-A", "a\rb"), ("X-A", "a\x00b"), ("X-A", "a\x7fb"),
    ("X-A", "a\x01b"), ("X-A", "\u20ac"), ("X A", "1"), ("X-A:", "1"), ("X\r\nInjected", "1"), ("X\x00", "1"),
    ("X\x7f", "1"), ("", "1"), ("X\xe9", "1"),
])
def test_a_header_name_or_value_that_could_smuggle_is_refused_before_sending(monkeypatch: pytest.MonkeyPatch,
                                                                             name: str, value: str) -> None:
    peer = Peer(monkeypatch, [b"HTTP/1.1 204 No Content\r\n\r\n"])
    with _connection() as connection, pytest.raises(transport.InvalidRequest) as caught:
        transport.exchange(connection, "GET", f"http://{HOST}/", {name: value}, None)
    assert value not in str(caught.value) or value == "1", "a header's value (a token?) is never echoed"
    assert peer.dialled == []


@pytest.mark.parametrize("method", ["GET /x", "GET\r\n", "", "G\x00T"])
def test_a_method_that_is_not_a_token_is_refused(monkeypatch: pytest.MonkeyPatch, method: str) -> None:
    peer = Peer(monkeypatch, [])
    with _connection() as connection, pytest.raises(transport.InvalidRequest):
        transport.exchange(connection, method, f"http://{HOST}/", {}, None)
    assert peer.dialled == []


def _sent_head(monkeypatch: pytest.MonkeyPatch, url: str, headers: dict[str, str], **options: Any) -> list[str]:
    peer = Peer(monkeypatch, [b"HTTP/1.1 204 No Content\r\n\r\n"])
    with _connection(**options) as connection, transport.exchange(connection, "GET", url, headers, None) as response:
        assert response.status_code == 204
    peer.join()
    return peer.received.decode("latin-1").split("\r\n\r\n")[0].split("\r\n")


def test_what_may_be_sent_is_sent_as_given(monkeypatch: pytest.MonkeyPatch) -> None:
    head = _sent_head(monkeypatch, f"http://{HOST}/v2/a%20b?x=%0D#fragment",
                      {"Authorization": "Bearer a.b-c_d~e+f/g=", "X-Tab": "a\tb", "X-Latin": "caf\xe9"})
    assert head[0] == "GET /v2/a%20b?x=%0D HTTP/1.1"
    assert {f"Host: {HOST}", "Authorization: Bearer a.b-c_d~e+f/g=", "X-Tab: a\tb", "X-Latin: caf\xe9"} <= set(head)


def test_user_and_password_of_a_url_never_reach_the_host_header(monkeypatch: pytest.MonkeyPatch) -> None:
    head = _sent_head(monkeypatch, f"http://me:secret@{HOST}:5000/v2/", {})
    assert head[0] == "GET /v2/ HTTP/1.1" and f"Host: {HOST}:5000" in head
    assert not any("secret" in line or "me:" in line for line in head)
    via_proxy = _sent_head(monkeypatch, f"http://me:secret@{HOST}/v2/", {}, proxy="http://127.0.0.1:3128")
    assert via_proxy[0] == f"GET http://{HOST}/v2/ HTTP/1.1", "nor the absolute target sent to a proxy"
    assert not any("secret" in line for line in via_proxy)


# ---- interim responses and the deadline ----------------------------------------------------------------------------

def _endless(piece: bytes) -> Iterator[bytes]:
    while True:
        yield piece


@pytest.mark.timeout(30)  # without the bound, this would wait forever
def test_an_endless_stream_of_interim_responses_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    peer = Peer(monkeypatch, _endless(b"HTTP/1.1 100 Continue\r\n\r\n"))
    started = time.monotonic()
    with _connection(interim_max=5) as connection:
        with pytest.raises(transport.ProtocolError, match=r"more than 5 interim \(1xx\) responses"):
            transport.exchange(connection, "GET", f"http://{HOST}/", {}, None)
        assert connection.sock is None and time.monotonic() - started < 5
    peer.join()
    assert transport.INTERIM_MAX == 10


@pytest.mark.timeout(30)  # without the bound, this would wait forever
def test_a_head_sent_a_byte_at_a_time_meets_the_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    peer = Peer(monkeypatch, _endless(b"X"), pace=0.02)
    started = time.monotonic()
    with _connection(deadline=0.3) as connection, \
            pytest.raises(TimeoutError, match=r"the response took longer than 0.3 s"):
        transport.exchange(connection, "GET", f"http://{HOST}/", {}, None)
    assert 0.25 < time.monotonic() - started < 3, "the per-read timeout (5 s) never fired: each byte came in time"
    peer.join()


@pytest.mark.timeout(30)  # without the bound, this would wait forever
def test_a_body_sent_a_byte_at_a_time_meets_the_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    peer = Peer(monkeypatch, [_cl(b"1000000", b""), *([b"x"] * 1000)], pace=0.02)
    started = time.monotonic()
    with _connection(deadline=0.3) as connection:
        with transport.exchange(connection, "GET", f"http://{HOST}/", {}, None) as response:
            with pytest.raises(TimeoutError, match=r"the response took longer than 0.3 s"):
                while response.readinto(memoryview(bytearray(1 << 16))):
                    pass
        assert time.monotonic() - started < 3 and connection.sock is None
    peer.join()


def test_the_deadline_counts_from_each_request(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two responses on one kept-alive connection, 0.65 s apart: each within 0.5 s of its own request."""
    peer = Peer(monkeypatch, [_cl(b"2", b"ok"), _cl(b"2", b"ok")], pace=0.65)
    with _connection(deadline=0.5) as connection:
        with transport.exchange(connection, "GET", f"http://{HOST}/", {}, None) as response:
            assert response.read(10) == b"ok"
        time.sleep(0.6)  # past the first request's deadline
        with transport.exchange(connection, "GET", f"http://{HOST}/", {}, None) as response:
            assert response.read(10) == b"ok" and response.complete
    assert peer.dialled == [(HOST, 80)], "one connection, kept alive"
    peer.join()
