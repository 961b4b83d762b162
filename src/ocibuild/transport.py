"""HTTP/1.1 for the registry client: keep-alive connections over ``http.client``, proxies, TLS, timeouts.

Only :mod:`ocibuild.registry` uses this module, and it imports it on first contact with a registry: ``http.client``
and ``ssl`` cost ~30 ms of start-up that commands which never reach a registry (a no-op build) must not pay.
It knows nothing of registries; it moves requests and responses and turns every failure into an ``OSError``::

    OSError                   connection refused, reset, timed out (socket.timeout), …
    ├── ConnectionError       also http.client's protocol errors (a bad status line, an incomplete chunk)
    └── TLSError              the TLS handshake failed; ``certificate``: the server's certificate was refused
"""

from __future__ import annotations

import base64
import http.client
import os
import select
import ssl
from collections.abc import Mapping
from typing import Protocol
from urllib.parse import unquote, urlsplit

BLOCK = 1 << 20  # request bodies are sent in writes of this size (http.client's default: 8 KiB)
TLSContext = ssl.SSLContext


class Readable(Protocol):
    """A streamed request body: http.client reads it in :data:`BLOCK` pieces."""

    def read(self, size: int = -1, /) -> bytes: ...


class TLSError(OSError):
    """The TLS handshake failed. ``certificate``: the server's certificate was refused (never a reason to fall
    back to plain HTTP); otherwise the server may not speak TLS at all."""

    def __init__(self, message: str, *, certificate: bool) -> None:
        super().__init__(message)
        self.certificate = certificate


class _HTTPConnection(http.client.HTTPConnection):
    read_timeout: float = 60.0
    absolute = False  # to a plain-HTTP proxy: absolute URLs and the proxy's credentials on every request
    proxy_authorization: str | None = None

    def connect(self) -> None:
        super().connect()  # under the connect timeout; the reads after it under the read timeout
        self.sock.settimeout(self.read_timeout)


class _HTTPSConnection(http.client.HTTPSConnection):
    read_timeout: float = 60.0
    absolute = False
    proxy_authorization: str | None = None

    def connect(self) -> None:
        super().connect()  # the TCP connect, a proxy's CONNECT and the TLS handshake, under the connect timeout
        self.sock.settimeout(self.read_timeout)


Connection = _HTTPConnection | _HTTPSConnection


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


def connect(scheme: str, netloc: str, *, proxy: str | None, context: TLSContext | None,
            connect_timeout: float, read_timeout: float) -> Connection:
    """A connection to scheme://netloc (opened on its first request), through an http:// ``proxy`` when given:
    a CONNECT tunnel for https, absolute URLs for http. ValueError for a proxy URL that cannot be used."""
    target = urlsplit(proxy) if proxy else None
    if target is not None and (target.scheme != "http" or not target.hostname):
        raise ValueError(f"only http://HOST:PORT proxies are supported, not {target.scheme}://")
    address = f"{target.hostname}:{target.port or 80}" if target is not None else netloc
    authorization = _proxy_authorization(target.username, target.password) if target is not None else None
    connection: Connection
    if scheme == "https":
        connection = _HTTPSConnection(address, timeout=connect_timeout, context=context, blocksize=BLOCK)
        if target is not None:
            connection.set_tunnel(netloc, headers={"Proxy-Authorization": authorization} if authorization else None)
    else:
        connection = _HTTPConnection(address, timeout=connect_timeout, blocksize=BLOCK)
        if target is not None:
            connection.absolute = True
            connection.proxy_authorization = authorization
    connection.read_timeout = read_timeout
    return connection


def _proxy_authorization(username: str | None, password: str | None) -> str | None:
    """Basic credentials for a proxy URL's user:password (percent-decoded), or None."""
    if not username:
        return None
    pair = f"{unquote(username)}:{unquote(password or '')}".encode()
    return "Basic " + base64.b64encode(pair).decode()


def reusable(connection: Connection) -> bool:
    """An idle kept-alive connection can take the next request: its socket is not readable (a readable idle
    socket means the server closed it, or sent what nobody asked for). A closed one reconnects by itself."""
    sock = connection.sock
    if sock is None:
        return True
    try:
        return not select.select([sock], [], [], 0)[0]
    except (OSError, ValueError):
        return False


class Response:
    """A response whose body is still to be read. Closing it leaves the connection ready for the next request
    when the body was read to its end (a small one is read for that), else closes the connection."""

    _DRAIN = 64 << 10

    def __init__(self, raw: http.client.HTTPResponse, connection: Connection) -> None:
        self._raw = raw
        self._connection = connection
        self.status_code = raw.status
        self.headers = raw.headers  # .get() ignores case

    def read(self, limit: int) -> bytes:
        """Up to ``limit`` bytes of the body; fewer at its end (also when it ended early: compare sizes)."""
        try:
            return self._raw.read(limit)
        except http.client.HTTPException as err:
            raise ConnectionError(_describe(err)) from None

    def readinto(self, buffer: memoryview) -> int:
        try:
            return self._raw.readinto(buffer)
        except http.client.HTTPException as err:
            raise ConnectionError(_describe(err)) from None

    def close(self) -> None:
        raw = self._raw
        if not raw.isclosed():
            try:
                raw.read(self._DRAIN)
            except (OSError, http.client.HTTPException):
                pass
            if not raw.isclosed():
                self._connection.close()  # an unread body is still on its way: this connection is done
        raw.close()

    def __enter__(self) -> Response:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def exchange(connection: Connection, method: str, url: str, headers: Mapping[str, str],
             body: bytes | Readable | None) -> Response:
    """Send one request (``body``: bytes, or an object with ``read`` whose length is in Content-Length) and read
    the response's status and headers. Any failure closes the connection and raises OSError."""
    parts = urlsplit(url)
    sent = dict(headers)
    if connection.proxy_authorization:
        sent["Proxy-Authorization"] = connection.proxy_authorization
    target = url if connection.absolute else (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    try:
        connection.request(method, target, body=body, headers=sent)
        return Response(connection.getresponse(), connection)
    except ssl.SSLError as err:
        connection.close()
        raise TLSError(_describe(err), certificate=isinstance(err, ssl.SSLCertVerificationError)) from None
    except http.client.HTTPException as err:
        connection.close()
        raise ConnectionError(_describe(err)) from None
    except OSError:
        connection.close()
        raise


def _describe(err: BaseException) -> str:
    text = str(err).splitlines()[0] if str(err) else ""
    return f"{type(err).__name__}: {text}" if text else type(err).__name__
