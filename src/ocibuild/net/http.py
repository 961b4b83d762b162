"""HTTP/1.1 for the registry client: keep-alive connections, proxies, TLS, timeouts.

Only :mod:`ocibuild.registry` uses this module, and it imports it on first contact with a registry, so commands
that never reach one (a no-op build) do not pay for ``socket`` and ``ssl``. It speaks the small part of HTTP/1.1
a registry client needs — one request at a time per connection, bodies framed by Content-Length, chunked
encoding or the connection's end — on a socket of its own: ``http.client`` served first, but importing it (it
parses headers through the ``email`` package) took ~25 ms, an eighth of the 0.2 s a push that finds everything
present may take. It knows nothing of registries, and turns every failure into an ``OSError``::

    OSError                   connection refused, reset, timed out (a read, or the response's deadline), …
    ├── TooSlow               (a TimeoutError) the response came slower than the connection's minimum rate
    ├── ConnectionError       a cut response, or a server that closed a kept-alive connection
    │   └── ProtocolError     a malformed response: status line, header, framing, too many interim responses
    ├── InvalidRequest        (also a ValueError) a target or header that cannot be sent; nothing was sent
    └── TLSError              the TLS handshake failed; ``certificate``: the server's certificate was refused

Responses are read as strictly as h11 reads them (tests/unit/test_http_parsing.py holds the two to the same
recorded responses): RFC 9112 framing, one Content-Length value of ASCII digits, chunk sizes of hex digits only,
heads of at most 64 KiB. A response must end within :data:`DEADLINE` seconds of its request, besides the read
timeout that bounds each wait; and once its first byte came, each ``rate_window`` seconds must bring at least
``min_rate`` bytes a second on average (the way curl's --speed-limit/--speed-time cut a stalled transfer; the
wait for the first byte, while a server works on a request, is bounded by the read timeout alone): a server that
sends a byte a second holds a request for a window, not for the deadline.

At ~670 lines this module is past STYLE.md's ~500: the request checks, the reader with its deadline and the
response framing share one socket and buffer. Should it grow, the framing (``_Head`` to ``Response``) is the room
to split off.
"""

from __future__ import annotations

import os
import re
import select
import socket
import ssl
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, overload
from urllib.parse import unquote, urlsplit

BLOCK = 1 << 20  # request bodies are sent in writes of this size
TLSContext = ssl.SSLContext
# Seconds from a request's last byte to its response's last. A download that takes longer is cut (the registry
# client resumes it with Range); a server that drips bytes loses its hold.
DEADLINE = 600.0
INTERIM_MAX = 10  # interim (1xx) responses accepted before the final one; a stream of them is a malformed response
_HEAD_MAX = 64 << 10  # a response head (status line and headers), or a chunked body's trailers: longer is malformed
_LINE_MAX = 64 << 10  # a chunk-size line longer than this is malformed
_DRAIN = 64 << 10  # a body with at most this much left is read to its end to keep the connection

# What a response may hold (RFC 9110 5.1, 5.5; RFC 9112 4, 7.1), as h11 reads it: a line folded onto the previous
# (obs-fold) counts as one space; a field value holds no NUL, CR, LF, VT or FF.
_STATUS = re.compile(rb"HTTP/1\.[0-9] ([0-9]{3})(?: .*)?", re.DOTALL)
_FIELD_LINES = re.compile(rb"(?:[-!#$%&'*+.^_`|~0-9A-Za-z]+:[^\n]*\n)*")  # name (a token), colon, value
_FOLD = re.compile(rb"\n[ \t]+")  # obs-fold: a line that continues the previous one
_BLANK_LINE = re.compile(rb"\n\r?\n")  # the end of a head: a line end, then an empty line
_CHUNK = re.compile(rb"([0-9A-Fa-f]{1,20})(?:;.*)?[ \t]*\r\n")  # hex size, extensions (ignored), CRLF
_DIGITS = re.compile(r"[0-9]{1,20}")
# What a request may hold: a target of visible ASCII, header names that are tokens, values without controls.
_TARGET = re.compile(r"[!-~]+")
_TOKEN = re.compile(r"[-!#$%&'*+.^_`|~0-9A-Za-z]+")
_TOKENS = re.compile(r"[-!#$%&'*+.^_`|~0-9A-Za-z]+(?::[-!#$%&'*+.^_`|~0-9A-Za-z]+)*")  # ":"-separated
_VALUE = re.compile(r"[\t\x20-\x7e\x80-\xff]*")
_HEAD_BYTES = bytes([0x09, *range(0x20, 0x7F), *range(0x80, 0x100)])  # a request head holds these and its CRLFs


class Readable(Protocol):
    """A streamed request body, read in :data:`BLOCK` pieces; its length goes in a Content-Length header."""

    def read(self, size: int = -1, /) -> bytes: ...


class ProtocolError(ConnectionError):
    """The response breaks HTTP/1.1: a malformed status line, header or framing, or too many interim responses.
    The connection is closed."""


class TooSlow(TimeoutError):
    """The response came slower than the connection's minimum rate: a stalled or dripping server. The
    connection is closed."""


class InvalidRequest(OSError, ValueError):
    """The request cannot be sent as asked (a target or header with a control character, a space or a character
    beyond Latin-1): refused before anything was sent. An OSError, as every failure of this module is."""


class TLSError(OSError):
    """The TLS handshake failed. ``certificate``: the server's certificate was refused (never a reason to fall
    back to plain HTTP); otherwise the server may not speak TLS at all."""

    def __init__(self, message: str, *, certificate: bool) -> None:
        super().__init__(message)
        self.certificate = certificate


def tls_context(cafile: str | None, cas: Sequence[str] = ()) -> TLSContext:
    """Verifying TLS settings: the system's trust store, or only ``cafile`` when given; the CA certificates in the
    files ``cas`` (a registry's own, from certs.d) are trusted besides. OSError naming a file that cannot be used."""
    try:
        context = _hashed_store(cafile) or ssl.create_default_context(cafile=cafile)
    except OSError as err:  # ssl.SSLError is one
        raise OSError(f"cannot use the CA certificates in {cafile or 'the system store'}: {_describe(err)}") \
            from None
    for path in cas:
        try:
            context.load_verify_locations(cafile=path)
        except OSError as err:
            raise OSError(f"cannot use the CA certificates in {path}: {_describe(err)}") from None
    return context


def _hashed_store(cafile: str | None) -> TLSContext | None:
    """The system store through its hashed directory (/etc/ssl/certs), when ``cafile`` names no other and it has
    one: OpenSSL then reads the few certificates a handshake needs, where loading the bundle file parses all of
    them, ~50 ms at every start. A ``cafile`` that is the system bundle itself ($SSL_CERT_FILE often names it)
    counts as the system store: update-ca-certificates writes the bundle and the directory from the same
    certificates."""
    defaults = ssl.get_default_verify_paths()
    if cafile is not None and os.path.realpath(cafile) != os.path.realpath(defaults.openssl_cafile):
        return None
    capath = defaults.capath  # $SSL_CERT_DIR, else OpenSSL's built-in directory; None when missing
    try:
        if capath is None or not any(name.endswith(".0") for name in os.listdir(capath)):
            return None
    except OSError:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies certificates and host names
    context.load_verify_locations(capath=capath)
    return context


class Headers:
    """Response headers: ``get`` ignores case; repeated headers are joined with ", " (RFC 9110 5.3)."""

    def __init__(self) -> None:
        self._values: dict[str, list[str]] = {}

    @classmethod
    def from_lines(cls, lines: list[bytes]) -> Headers:
        """Headers from lines already checked to be ``name:value`` with a token for a name."""
        headers = cls()
        for line in lines:
            name, _, value = line.partition(b":")
            headers._values.setdefault(name.decode("ascii").lower(), []).append(value.strip(b" \t").decode("latin-1"))
        return headers

    def add(self, name: str, value: str) -> None:
        self._values.setdefault(name.lower(), []).append(value)

    @overload
    def get(self, name: str) -> str | None: ...

    @overload
    def get(self, name: str, default: str) -> str: ...

    def get(self, name: str, default: str | None = None) -> str | None:
        values = self._values.get(name.lower())
        return default if values is None else ", ".join(values)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._values

    def __getitem__(self, name: str) -> str:
        return ", ".join(self._values[name.lower()])


class Connection:
    """One keep-alive connection to scheme://netloc, opened on its first request and again after it closed;
    through an http:// proxy when given (a CONNECT tunnel for https; absolute URLs for http). Each response must
    end within ``deadline`` seconds of its request, follow at most ``interim_max`` interim (1xx) ones, and come at
    ``min_rate`` bytes a second or more over each ``rate_window`` seconds (0: no minimum)."""

    def __init__(self, scheme: str, netloc: str, *, proxy: tuple[str, int, str | None] | None,
                 context: TLSContext | None, connect_timeout: float, read_timeout: float,
                 deadline: float = DEADLINE, interim_max: int = INTERIM_MAX, min_rate: float = 0.0,
                 rate_window: float = 0.0) -> None:
        target = urlsplit(f"//{netloc}")
        self.scheme = scheme
        self.netloc = netloc
        self.host = target.hostname or netloc
        self.port = target.port or (443 if scheme == "https" else 80)
        self.proxy = proxy  # (host, port, Proxy-Authorization or None)
        self.absolute = proxy is not None and scheme == "http"
        self.deadline = deadline
        self.interim_max = interim_max
        self.rate = (min_rate, rate_window)
        self._context = context
        self._timeouts = (connect_timeout, read_timeout)
        self.sock: socket.socket | None = None
        self._file: _Reader | None = None

    def open(self) -> None:
        connect_timeout, read_timeout = self._timeouts
        address = (self.proxy[0], self.proxy[1]) if self.proxy else (self.host, self.port)
        sock = socket.create_connection(address, timeout=connect_timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.proxy is not None and self.scheme == "https":
                self._tunnel(sock)
            if self.scheme == "https":
                assert self._context is not None
                try:  # the handshake, under the connect timeout
                    sock = self._context.wrap_socket(sock, server_hostname=self.host)
                except ssl.SSLError as err:
                    raise TLSError(_describe(err), certificate=isinstance(err, ssl.SSLCertVerificationError)) \
                        from None
            sock.settimeout(read_timeout)
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        self._file = _Reader(sock, read_timeout, self.rate)

    def _tunnel(self, sock: socket.socket) -> None:
        assert self.proxy is not None
        authority = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        lines = [f"CONNECT {authority} HTTP/1.1", f"Host: {authority}"]
        if self.proxy[2]:
            lines.append(f"Proxy-Authorization: {self.proxy[2]}")
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        reader = _Reader(sock, self._timeouts[0], self.rate)
        reader.set_deadline(self.deadline)
        status = _read_head(reader, self.interim_max).status
        reader.set_deadline(None)  # the socket's own timeout again, for the handshake
        if status != 200:
            raise ConnectionError(f"the proxy refused to connect to {authority}: HTTP {status}")
        if reader.buffered():
            raise ConnectionError(f"the proxy sent data before the tunnel to {authority} was open")

    def close(self) -> None:
        sock, self.sock, self._file = self.sock, None, None
        if sock is not None:
            sock.close()

    def reader(self) -> _Reader:
        assert self._file is not None
        return self._file


class _Reader:
    """Buffered reads from a socket (``socket.makefile`` would do, at the price of the io stack's layers), each
    waiting at most ``read_timeout`` seconds, none past the deadline when one is set, and then at ``rate``'s
    (minimum bytes a second, window in seconds) from the first byte on."""

    def __init__(self, sock: socket.socket, read_timeout: float, rate: tuple[float, float]) -> None:
        self._sock = sock
        self._buffer = bytearray()
        self._read_timeout = read_timeout
        self._deadline: float | None = None  # time.monotonic() after which nothing more is read
        self._seconds = 0.0  # the deadline's length, for the message
        self._shortened = False  # the socket's timeout is what was left before the deadline
        self._min_rate, self._rate_window = rate
        self._window: tuple[float, int] | None = None  # since the first byte: when the window started, bytes since

    def set_deadline(self, seconds: float | None) -> None:
        """Read nothing more than ``seconds`` from now (None: no deadline); restores the socket's own timeout. The
        minimum rate starts again from the next byte received."""
        if self._shortened:
            self._sock.settimeout(self._read_timeout)
            self._shortened = False
        self._deadline = None if seconds is None else time.monotonic() + seconds
        self._seconds = seconds or 0.0
        self._window = None

    def _received(self, n: int) -> None:
        """Count ``n`` bytes received: TooSlow when a window of at least ``rate_window`` seconds ends with fewer
        than ``min_rate`` bytes a second (the check runs as bytes come; a wait without any is the read timeout's)."""
        if not self._rate_window:
            return
        now = time.monotonic()
        if self._window is None:
            self._window = (now, n)
            return
        start, count = self._window[0], self._window[1] + n
        elapsed = now - start
        if elapsed < self._rate_window:
            self._window = (start, count)
        elif count < self._min_rate * elapsed:
            raise TooSlow(f"the server sent {count} bytes in {elapsed:.1f} s, slower than the minimum of "
                          f"{self._min_rate:g} bytes/s")
        else:
            self._window = (now, 0)

    def _wait(self) -> None:
        """Before a read: shorten the socket's timeout to what is left before the deadline."""
        if self._deadline is None:
            return
        left = self._deadline - time.monotonic()
        if left < self._read_timeout:
            if left <= 0:
                raise self._expired()
            self._sock.settimeout(left)
            self._shortened = True

    def _expired(self) -> TimeoutError:
        return TimeoutError(f"the response took longer than {self._seconds:g} s")

    def buffered(self) -> int:
        return len(self._buffer)

    def _fill(self) -> bool:
        """Add what the socket receives next to the buffer; False when the connection ended."""
        self._wait()
        try:
            data = self._sock.recv(65536)
        except TimeoutError:
            if self._shortened:
                raise self._expired() from None
            raise
        self._received(len(data))
        self._buffer += data
        return bool(data)

    def readline(self, limit: int, too_long: str) -> bytes:
        """The next line, with its b"\\n"; without it when the connection ended first (b"" when it had ended).
        ProtocolError(``too_long``) for a line longer than ``limit``."""
        searched = 0
        while (end := self._buffer.find(b"\n", searched, limit)) < 0:
            if len(self._buffer) >= limit:
                raise ProtocolError(too_long)
            searched = len(self._buffer)
            if not self._fill():
                end = len(self._buffer) - 1
                break
        line = bytes(self._buffer[:end + 1])
        del self._buffer[:end + 1]
        return line

    def readhead(self, limit: int, too_long: str) -> bytes | None:
        """The lines of the next head (status line and header lines, or trailer lines), each ended by b"\\n", up to
        the blank line that ends it; None when the connection ended first (what came stays buffered).
        ProtocolError(``too_long``) for a head longer than ``limit``, or one holding a NUL, VT, FF or bare CR.
        One search for its end, not one per line: a registry's HEAD request is mostly this."""
        buffer, searched = self._buffer, 0
        while True:
            if buffer.startswith((b"\n", b"\r\n")):  # a blank line at once: no lines
                del buffer[:buffer.index(b"\n") + 1]
                return b""
            end = _BLANK_LINE.search(buffer, max(searched - 2, 0), limit)
            if end is not None:
                head = bytes(buffer[:end.start() + 1])
                del buffer[:end.end()]
                if b"\0" in head or b"\v" in head or b"\f" in head or head.count(b"\r") != head.count(b"\r\n"):
                    raise ProtocolError(f"malformed response: a NUL, VT, FF or bare CR in {head[:80]!r}")
                return head.replace(b"\r\n", b"\n")
            if len(buffer) >= limit:
                raise ProtocolError(too_long)
            searched = len(buffer)
            if not self._fill():
                return None

    def readinto(self, view: memoryview) -> int:
        """Up to len(view) bytes (at least one unless the connection ended)."""
        if self._buffer:
            n = min(len(view), len(self._buffer))
            view[:n] = self._buffer[:n]
            del self._buffer[:n]
            return n
        self._wait()
        try:
            n = self._sock.recv_into(view)
        except TimeoutError:
            if self._shortened:
                raise self._expired() from None
            raise
        self._received(n)
        return n


@dataclass(frozen=True)
class _Head:
    """A response's status line and headers, with its framing checked (not yet applied: that depends on the
    request's method)."""

    status: int
    version: str
    headers: Headers
    length: int | None  # the Content-Length, if any
    chunked: bool  # Transfer-Encoding: chunked


def _read_head(reader: _Reader, interim_max: int) -> _Head:
    """The next final response's head; interim (1xx) responses before it are skipped, at most ``interim_max``."""
    for _ in range(interim_max + 1):
        head = _read_one_head(reader)
        if head.status >= 200:
            return head
        if head.status == 101:
            raise ProtocolError("the server switched protocols, which no request of ours asks for")
    raise ProtocolError(f"malformed response: more than {interim_max} interim (1xx) responses")


def _read_one_head(reader: _Reader) -> _Head:
    text = reader.readhead(_HEAD_MAX, f"malformed response: a head longer than {_HEAD_MAX >> 10} KiB")
    if text is None:
        if reader.buffered():
            raise ProtocolError("the response ended inside its head")
        raise ConnectionError("the server closed the connection without a response")
    status_line, _, fields = text.partition(b"\n")
    match = _STATUS.fullmatch(status_line)
    if match is None or int(match[1]) < 100:
        raise ProtocolError(f"malformed response status line {status_line[:80]!r}")
    headers = _fields(fields)
    coding = headers.get("Transfer-Encoding")
    if coding is not None and coding.lower() != "chunked":
        raise ProtocolError(f"unsupported Transfer-Encoding {coding[:40]!r} (bodies are read as they are sent)")
    return _Head(int(match[1]), status_line[:8].decode("ascii"), headers,
                 _content_length(headers.get("Content-Length")), coding is not None)


def _fields(text: bytes) -> Headers:
    """Header (or trailer) lines, each ended by b"\\n"; a line starting with a space or a tab continues the
    previous one (obs-fold, joined by a space). One regex checks them all: a HEAD request is mostly this."""
    if text.startswith((b" ", b"\t")):
        raise ProtocolError(f"malformed response: a folded header line first {text[:80]!r}")
    if b"\n " in text or b"\n\t" in text:
        text = _FOLD.sub(b" ", text)
    lines = text.split(b"\n")[:-1]
    if not _FIELD_LINES.fullmatch(text):
        bad = next(line for line in lines if not _FIELD_LINES.fullmatch(line + b"\n"))
        raise ProtocolError(f"malformed response header {bad[:80]!r}")
    return Headers.from_lines(lines)


def _content_length(value: str | None) -> int | None:
    """The body's length from the Content-Length header(s): one value, repeated or not, of ASCII digits."""
    if value is None:
        return None
    if value.isascii() and value.isdigit() and len(value) <= 20:  # the common case, in short
        return int(value)
    lengths = {part.strip(" \t") for part in value.split(",")}
    if len(lengths) != 1:
        raise ProtocolError(f"malformed response: several Content-Length values {value[:80]!r}")
    length = lengths.pop()
    if not _DIGITS.fullmatch(length):
        raise ProtocolError(f"malformed Content-Length {value[:40]!r}")
    return int(length)


class Response:
    """A response whose body is still to be read. Closing it leaves the connection ready for the next request
    when the body was read to its end (a small one is read for that), else closes the connection. ``complete``:
    the body was read to the end its framing gives (a close-delimited one: to the connection's end)."""

    def __init__(self, connection: Connection, method: str, head: _Head) -> None:
        self._connection = connection
        self._reader = connection.reader()
        self.status_code = head.status
        self.headers = head.headers
        connection_header = (head.headers.get("Connection") or "").lower()
        self._keep = "close" not in connection_header and (
            head.version != "HTTP/1.0" or "keep-alive" in connection_header)
        self._chunked = False
        self._remaining: int | None = 0  # bytes left (of the body, or of the current chunk); None: until the end
        self._done = False
        self.complete = False
        if method == "HEAD" or head.status in (204, 304):
            self._finish(complete=True)
        elif head.chunked:
            self._chunked = True
            self._keep = self._keep and head.length is None  # both framings: a smuggling attempt, or a broken server
            self._next_chunk()
        elif head.length is not None:
            self._remaining = head.length
            if head.length == 0:
                self._finish(complete=True)
        else:
            self._remaining = None  # until the server closes the connection
            self._keep = False

    def _finish(self, *, complete: bool) -> None:
        """The body ended: at the end its framing gives (``complete``), or cut short (the connection is closed)."""
        self._done, self.complete = True, complete
        if not complete:
            self._keep = False
            self._connection.close()

    def _next_chunk(self) -> None:
        """Read a chunk-size line (and the trailers after the last chunk, discarded)."""
        line = self._reader.readline(_LINE_MAX, "malformed chunked body: a chunk-size line longer than 64 KiB")
        if not line.endswith(b"\n"):
            self._finish(complete=False)
            return
        match = _CHUNK.fullmatch(line)
        if match is None:
            raise ProtocolError(f"malformed chunk size {line[:40]!r}")
        self._remaining = int(match[1], 16)
        if self._remaining:
            return
        trailers = self._reader.readhead(_HEAD_MAX, "malformed chunked body: trailers longer than 64 KiB")
        if trailers is not None:
            _fields(trailers)  # well-formed, and of no use to us
        self._finish(complete=trailers is not None)

    def readinto(self, view: memoryview) -> int:
        """Up to len(view) bytes of the body; 0 at its end. A body cut short reads as ending early (the caller
        compares sizes, or reads ``complete``) and leaves the connection closed; so does a read that fails (a
        timeout, the minimum rate, a malformed chunk): nothing more is read from it."""
        try:
            return self._readinto(view)
        except OSError:
            self._finish(complete=False)
            raise

    def _readinto(self, view: memoryview) -> int:
        while not self._done and view:
            if self._remaining == 0:  # the end of a chunk: its CRLF, then the next chunk's size
                line = self._reader.readline(_LINE_MAX, "malformed chunked body: no line end after a chunk")
                if line == b"\r\n":
                    self._next_chunk()
                    continue
                if line.endswith(b"\n"):
                    raise ProtocolError("malformed chunked body: no line end after a chunk")
                self._finish(complete=False)
                break
            want = len(view) if self._remaining is None else min(len(view), self._remaining)
            n = self._reader.readinto(view[:want])
            if not n:
                self._finish(complete=self._remaining is None)
                break
            if self._remaining is not None:
                self._remaining -= n
                if self._remaining == 0 and not self._chunked:
                    self._finish(complete=True)
            return n
        return 0

    def read(self, limit: int) -> bytes:
        """Up to ``limit`` bytes of the body; fewer at its end (also when it ended early: compare sizes)."""
        out = bytearray()
        view = memoryview(bytearray(min(limit, 1 << 16)))
        while len(out) < limit and (n := self.readinto(view[:limit - len(out)])):
            out += view[:n]
        return bytes(out)

    def close(self) -> None:
        if not self._done and (self._chunked or (self._remaining is not None and self._remaining <= _DRAIN)):
            try:
                self.read(_DRAIN)
            except OSError:
                self._keep = False
        if not (self._done and self._keep):
            self._connection.close()  # an unread body is still on its way, or the server will close: done

    def __enter__(self) -> Response:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(scheme: str, netloc: str, *, proxy: str | None, context: TLSContext | None,
            connect_timeout: float, read_timeout: float, deadline: float = DEADLINE,
            interim_max: int = INTERIM_MAX, min_rate: float = 0.0, rate_window: float = 0.0) -> Connection:
    """A connection to scheme://netloc (opened on its first request), through an http:// ``proxy`` when given.
    ValueError for a proxy URL that cannot be used."""
    via = None
    if proxy:
        target = urlsplit(proxy)
        if target.scheme != "http" or not target.hostname:
            raise ValueError(f"only http://HOST:PORT proxies are supported, not {target.scheme}://")
        via = (target.hostname, target.port or 80, _proxy_authorization(target.username, target.password))
    return Connection(scheme, netloc, proxy=via, context=context, connect_timeout=connect_timeout,
                      read_timeout=read_timeout, deadline=deadline, interim_max=interim_max, min_rate=min_rate,
                      rate_window=rate_window)


def _proxy_authorization(username: str | None, password: str | None) -> str | None:
    """Basic credentials for a proxy URL's user:password (percent-decoded), or None."""
    from .auth import basic

    if not username:
        return None
    return "Basic " + basic(unquote(username), unquote(password or ""))


def reusable(connection: Connection) -> bool:
    """An idle kept-alive connection can take the next request: its socket is not readable (a readable idle
    socket means the server closed it, or sent what nobody asked for). A closed one reopens by itself."""
    sock = connection.sock
    if sock is None:
        return True
    try:
        return not select.select([sock], [], [], 0)[0] and not connection.reader().buffered()
    except (OSError, ValueError):
        return False


def exchange(connection: Connection, method: str, url: str, headers: Mapping[str, str],
             body: bytes | Readable | None) -> Response:
    """Send one request (``body``: bytes, or a :class:`Readable` whose length ``headers`` give as Content-Length)
    and read the response's status and headers. Any failure closes the connection and raises OSError; a request
    that cannot be sent raises :class:`InvalidRequest` before anything is sent."""
    head = _request_head(connection, method, url, headers, body)
    try:
        if connection.sock is None:
            connection.open()
        sock, reader = connection.sock, connection.reader()
        assert sock is not None
        reader.set_deadline(None)  # sending is bounded by the timeout of each write
        if isinstance(body, bytes) and len(body) <= BLOCK:
            sock.sendall(head + body)
        else:
            sock.sendall(head)
            if isinstance(body, bytes):
                sock.sendall(body)
            elif body is not None:
                while piece := body.read(BLOCK):
                    sock.sendall(piece)
        reader.set_deadline(connection.deadline)
        return Response(connection, method, _read_head(reader, connection.interim_max))
    except ssl.SSLError as err:
        connection.close()
        raise TLSError(_describe(err), certificate=isinstance(err, ssl.SSLCertVerificationError)) from None
    except OSError:
        connection.close()
        raise


def _request_head(connection: Connection, method: str, url: str, headers: Mapping[str, str],
                  body: bytes | Readable | None) -> bytes:
    """The request line and headers, checked: InvalidRequest for what would let a header or a request be
    smuggled (a control character, a space in the target) or cannot be encoded. Never echoes a header's value."""
    if not _TARGET.fullmatch(url):  # before urlsplit, which drops tabs and line breaks
        bad = next((char for char in url if not _TARGET.fullmatch(char)), "")
        raise InvalidRequest(f"the URL holds {bad!r}: only visible ASCII may be sent (percent-encode the rest)")
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]  # never user:password@ (RFC 9110 4.2.4)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    if connection.absolute:
        target = f"{parts.scheme}://{host}{target}"
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}", *(f"{name}: {value}" for name, value in headers.items())]
    names = {name.lower() for name in headers}
    if "accept-encoding" not in names:
        lines.append("Accept-Encoding: identity")  # no header would allow any coding: bodies are hashed as sent
    if "content-length" not in names:
        if isinstance(body, bytes):
            lines.append(f"Content-Length: {len(body)}")
        elif body is None and method in ("POST", "PUT", "PATCH"):
            lines.append("Content-Length: 0")
        elif body is not None:
            raise ValueError("a streamed request body needs a Content-Length header")
    if connection.absolute and connection.proxy is not None and connection.proxy[2]:
        lines.append(f"Proxy-Authorization: {connection.proxy[2]}")
    try:
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    except UnicodeEncodeError:
        head = b""
    # Two checks for the whole head (a registry's HEAD request is mostly this), then a closer look to say which
    if not _TOKENS.fullmatch(":".join([method, *headers])) or \
            head.translate(None, _HEAD_BYTES) != b"\r\n" * (len(lines) + 1):
        raise _refusal(method, headers)
    return head


def _refusal(method: str, headers: Mapping[str, str]) -> InvalidRequest:
    if not _TOKEN.fullmatch(method):
        return InvalidRequest(f"the method {method[:20]!r} is not a token")
    for name, value in headers.items():
        if not _TOKEN.fullmatch(name):
            return InvalidRequest(f"the header name {name[:40]!r} is not a token")
        if not _VALUE.fullmatch(value):
            return InvalidRequest(f"the value of header {name} holds a control character or one beyond Latin-1")
    return InvalidRequest("the request head holds a control character")  # not reached: the rest is ours


def _describe(err: BaseException) -> str:
    text = str(err).splitlines()[0] if str(err) else ""
    return f"{type(err).__name__}: {text}" if text else type(err).__name__
