"""HTTP/1.1 for the registry client: keep-alive connections, proxies, TLS, timeouts.

Only :mod:`ocibuild.registry` uses this module, and it imports it on first contact with a registry, so commands
that never reach one (a no-op build) do not pay for ``socket`` and ``ssl``. It speaks the small part of HTTP/1.1
a registry client needs — one request at a time per connection, bodies framed by Content-Length, chunked
encoding or the connection's end — on a socket of its own: ``http.client`` served first, but importing it (it
parses headers through the ``email`` package) took ~25 ms, an eighth of the 0.2 s a push that finds everything
present may take. It knows nothing of registries, and turns every failure into an ``OSError``::

    OSError                   connection refused, reset, timed out (socket.timeout), …
    ├── ConnectionError       a malformed or cut response, or a server that closed a kept-alive connection
    └── TLSError              the TLS handshake failed; ``certificate``: the server's certificate was refused
"""

from __future__ import annotations

import base64
import os
import select
import socket
import ssl
from collections.abc import Mapping
from typing import Protocol, overload
from urllib.parse import unquote, urlsplit

BLOCK = 1 << 20  # request bodies are sent in writes of this size
TLSContext = ssl.SSLContext
_LINE_MAX = 64 << 10  # a status, header or chunk-size line longer than this is malformed
_HEADERS_MAX = 200
_DRAIN = 64 << 10  # a body at most this long is read to its end to keep the connection


class Readable(Protocol):
    """A streamed request body, read in :data:`BLOCK` pieces; its length goes in a Content-Length header."""

    def read(self, size: int = -1, /) -> bytes: ...


class TLSError(OSError):
    """The TLS handshake failed. ``certificate``: the server's certificate was refused (never a reason to fall
    back to plain HTTP); otherwise the server may not speak TLS at all."""

    def __init__(self, message: str, *, certificate: bool) -> None:
        super().__init__(message)
        self.certificate = certificate


def tls_context(cafile: str | None) -> TLSContext:
    """Verifying TLS settings: the system's trust store, or only ``cafile`` when given.

    The system store is used through its hashed directory (/etc/ssl/certs) where it has one: OpenSSL then reads
    the few certificates a handshake needs, where loading the bundle file parses all of them, ~50 ms at every
    start. A ``cafile`` that is the system bundle itself ($SSL_CERT_FILE often names it) counts as the system
    store: update-ca-certificates writes the bundle and the directory from the same certificates."""
    defaults = ssl.get_default_verify_paths()
    if cafile is None or os.path.realpath(cafile) == os.path.realpath(defaults.openssl_cafile):
        capath = defaults.capath  # $SSL_CERT_DIR, else OpenSSL's built-in directory; None when missing
        try:
            hashed = capath is not None and any(name.endswith(".0") for name in os.listdir(capath))
        except OSError:
            hashed = False
        if hashed:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies certificates and host names
            context.load_verify_locations(capath=capath)
            return context
    return ssl.create_default_context(cafile=cafile)


class Headers:
    """Response headers: ``get`` ignores case; repeated headers are joined with ", " (RFC 9110 5.3)."""

    def __init__(self) -> None:
        self._values: dict[str, str] = {}

    def add(self, name: str, value: str) -> None:
        key = name.lower()
        self._values[key] = f"{self._values[key]}, {value}" if key in self._values else value

    @overload
    def get(self, name: str) -> str | None: ...

    @overload
    def get(self, name: str, default: str) -> str: ...

    def get(self, name: str, default: str | None = None) -> str | None:
        return self._values.get(name.lower(), default)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._values

    def __getitem__(self, name: str) -> str:
        return self._values[name.lower()]


class Connection:
    """One keep-alive connection to scheme://netloc, opened on its first request and again after it closed;
    through an http:// proxy when given (a CONNECT tunnel for https; absolute URLs for http)."""

    def __init__(self, scheme: str, netloc: str, *, proxy: tuple[str, int, str | None] | None,
                 context: TLSContext | None, connect_timeout: float, read_timeout: float) -> None:
        target = urlsplit(f"//{netloc}")
        self.scheme = scheme
        self.netloc = netloc
        self.host = target.hostname or netloc
        self.port = target.port or (443 if scheme == "https" else 80)
        self.proxy = proxy  # (host, port, Proxy-Authorization or None)
        self.absolute = proxy is not None and scheme == "http"
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
        self._file = _Reader(sock)

    def _tunnel(self, sock: socket.socket) -> None:
        assert self.proxy is not None
        authority = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        lines = [f"CONNECT {authority} HTTP/1.1", f"Host: {authority}"]
        if self.proxy[2]:
            lines.append(f"Proxy-Authorization: {self.proxy[2]}")
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        reader = _Reader(sock)
        status, _, headers = _read_head(reader)
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
    """Buffered reads from a socket (``socket.makefile`` would do, at the price of the io stack's layers)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buffer = bytearray()

    def buffered(self) -> int:
        return len(self._buffer)

    def readline(self) -> bytes:
        while True:
            end = self._buffer.find(b"\n")
            if end >= 0:
                line = bytes(self._buffer[:end + 1])
                del self._buffer[:end + 1]
                return line
            if len(self._buffer) > _LINE_MAX:
                raise ConnectionError("malformed response: a line longer than 64 KiB")
            data = self._sock.recv(65536)
            if not data:
                line = bytes(self._buffer)
                self._buffer.clear()
                return line
            self._buffer += data

    def readinto(self, view: memoryview) -> int:
        """Up to len(view) bytes (at least one unless the connection ended)."""
        if self._buffer:
            n = min(len(view), len(self._buffer))
            view[:n] = self._buffer[:n]
            del self._buffer[:n]
            return n
        return self._sock.recv_into(view)


def _read_head(reader: _Reader) -> tuple[int, str, Headers]:
    """Status code, HTTP version and headers of the next response (1xx interim responses skipped)."""
    while True:
        line = reader.readline()
        if not line:
            raise ConnectionError("the server closed the connection without a response")
        parts = line.decode("latin-1").rstrip("\r\n").split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not (parts[1].isdigit() and len(parts[1]) == 3):
            raise ConnectionError(f"malformed response status line {line[:80]!r}")
        status = int(parts[1])
        headers = Headers()
        name = ""
        for _ in range(_HEADERS_MAX + 1):
            line = reader.readline()
            if line in (b"\r\n", b"\n"):
                break
            if not line:
                raise ConnectionError("the response ended inside its headers")
            text = line.decode("latin-1").rstrip("\r\n")
            if text[:1] in (" ", "\t") and name:  # obsolete line folding: a continuation of the last header
                headers.add(name, text.strip())
                continue
            name, colon, value = text.partition(":")
            if not colon or not name or name != name.strip():
                raise ConnectionError(f"malformed response header {line[:80]!r}")
            headers.add(name, value.strip())
        else:
            raise ConnectionError(f"more than {_HEADERS_MAX} response headers")
        if 100 <= status < 200 and status != 101:
            continue
        return status, parts[0], headers


class Response:
    """A response whose body is still to be read. Closing it leaves the connection ready for the next request
    when the body was read to its end (a small one is read for that), else closes the connection."""

    def __init__(self, connection: Connection, method: str, status: int, version: str, headers: Headers) -> None:
        self._connection = connection
        self._reader = connection.reader()
        self.status_code = status
        self.headers = headers
        connection_header = (headers.get("Connection") or "").lower()
        self._keep = "close" not in connection_header and (version != "HTTP/1.0" or "keep-alive" in connection_header)
        self._chunked = False
        self._remaining: int | None = 0  # bytes left (of the body, or of the current chunk); None: until the end
        self._done = False
        length = headers.get("Content-Length")
        if method == "HEAD" or status in (204, 304):
            self._done = True
        elif "chunked" in (headers.get("Transfer-Encoding") or "").lower():
            self._chunked = True
            self._next_chunk()
        elif length is not None:
            if not length.strip().isdigit():
                raise ConnectionError(f"malformed Content-Length {length[:40]!r}")
            self._remaining = int(length)
            self._done = self._remaining == 0
        else:
            self._remaining = None  # until the server closes the connection
            self._keep = False

    def _next_chunk(self) -> None:
        line = self._reader.readline()
        size = line.split(b";", 1)[0].strip()
        try:
            self._remaining = int(size, 16)
        except ValueError:
            raise ConnectionError(f"malformed chunk size {line[:40]!r}") from None
        if self._remaining == 0:
            while self._reader.readline() not in (b"\r\n", b"\n", b""):  # trailers
                pass
            self._done = True

    def readinto(self, view: memoryview) -> int:
        """Up to len(view) bytes of the body; 0 at its end. A body cut short reads as ending early (the caller
        compares sizes) and leaves the connection closed."""
        while not self._done:
            want = len(view) if self._remaining is None else min(len(view), self._remaining)
            if want == 0 and self._chunked:
                if self._reader.readline() not in (b"\r\n", b"\n"):
                    raise ConnectionError("malformed chunked body: no line end after a chunk")
                self._next_chunk()
                continue
            n = self._reader.readinto(view[:want])
            if not n:
                self._done, self._keep = True, False
                if self._remaining is not None:
                    self._connection.close()
                return 0
            if self._remaining is not None:
                self._remaining -= n
                if self._remaining == 0 and not self._chunked:
                    self._done = True
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
        if not self._done:
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
            connect_timeout: float, read_timeout: float) -> Connection:
    """A connection to scheme://netloc (opened on its first request), through an http:// ``proxy`` when given.
    ValueError for a proxy URL that cannot be used."""
    via = None
    if proxy:
        target = urlsplit(proxy)
        if target.scheme != "http" or not target.hostname:
            raise ValueError(f"only http://HOST:PORT proxies are supported, not {target.scheme}://")
        via = (target.hostname, target.port or 80, _proxy_authorization(target.username, target.password))
    return Connection(scheme, netloc, proxy=via, context=context, connect_timeout=connect_timeout,
                      read_timeout=read_timeout)


def _proxy_authorization(username: str | None, password: str | None) -> str | None:
    """Basic credentials for a proxy URL's user:password (percent-decoded), or None."""
    if not username:
        return None
    pair = f"{unquote(username)}:{unquote(password or '')}".encode()
    return "Basic " + base64.b64encode(pair).decode()


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
    and read the response's status and headers. Any failure closes the connection and raises OSError."""
    parts = urlsplit(url)
    target = url if connection.absolute else (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    lines = [f"{method} {target} HTTP/1.1", f"Host: {parts.netloc}"]
    names = {name.lower() for name in headers}
    lines += [f"{name}: {value}" for name, value in headers.items()]
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
    if any("\r" in line or "\n" in line for line in lines):
        raise ValueError("a request line or header holds a line break")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    try:
        if connection.sock is None:
            connection.open()
        sock = connection.sock
        assert sock is not None
        if isinstance(body, bytes) and len(body) <= BLOCK:
            sock.sendall(head + body)
        else:
            sock.sendall(head)
            if isinstance(body, bytes):
                sock.sendall(body)
            elif body is not None:
                while piece := body.read(BLOCK):
                    sock.sendall(piece)
        status, version, response_headers = _read_head(connection.reader())
        return Response(connection, method, status, version, response_headers)
    except ssl.SSLError as err:
        connection.close()
        raise TLSError(_describe(err), certificate=isinstance(err, ssl.SSLCertVerificationError)) from None
    except OSError:
        connection.close()
        raise


def _describe(err: BaseException) -> str:
    text = str(err).splitlines()[0] if str(err) else ""
    return f"{type(err).__name__}: {text}" if text else type(err).__name__
