"""Where requests go: one keep-alive connection per thread and server, the proxy the environment names, verified TLS.

A :class:`Session` is what the registry client and the downloads of inputs share. It picks, per ``scheme://host``:
the proxy (``$https_proxy``/``$http_proxy``/``$all_proxy`` and ``$no_proxy``, upper case too; like Go's net/http
— skopeo, podman — loopback hosts never go through one) and the CA (containers'/Docker's ``certs.d/<host>/*.crt``,
else ``$SSL_CERT_FILE``, else the system's). It sends one request at a time per connection (:meth:`Session.exchange`,
which silently replaces a kept-alive connection the server had closed) and follows redirects of GET and HEAD
(:meth:`Session.send`), never from https to plain http.

:mod:`ocibuild.net.http` (socket, ssl) is imported on the first request, not with this module, so commands that
never reach the network do not pay for it. Errors, for the caller to translate into its own::

    OSError                   connection refused, reset, timed out, malformed response (retryable)
    └── http.TLSError         ``certificate``: the server's certificate was refused (not retryable)
    ProxyError                the proxy the environment names cannot be used
    CAFileError               a certs.d ``*.crt`` (or $SSL_CERT_FILE) cannot be loaded
    RedirectRefused           a redirect from https to http, or of a request with a body
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urljoin, urlsplit

from .retry import RetryPolicy

if TYPE_CHECKING:
    from .http import Connection, Readable, Response, TLSContext

REDIRECTS = frozenset({301, 302, 303, 307, 308})
_MAX_REDIRECTS = 5


class ProxyError(ValueError):
    """The proxy configured for a host cannot be used (not an http:// URL)."""


class CAFileError(Exception):
    """A CA file of the host's certs.d directory (or $SSL_CERT_FILE) cannot be loaded."""


class RedirectRefused(Exception):
    """A redirect ocibuild does not follow; ``status`` is the redirect's, ``code`` an OCI-style error code."""

    def __init__(self, message: str, *, status: int, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


def is_loopback(host: str) -> bool:
    """host[:port] is localhost, ::1 or in 127.0.0.0/8."""
    name = host.rsplit(":", 1)[0] if host.count(":") == 1 or host.startswith("[") else host
    name = name.strip("[]")
    if name == "localhost" or name.endswith(".localhost"):
        return True
    if not re.fullmatch(r"[0-9.]+|[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*", name):
        return False  # a host name (ipaddress, imported only for addresses, costs start-up time)
    import ipaddress

    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def proxy_for(scheme: str, netloc: str, env: Mapping[str, str]) -> str | None:
    """The proxy URL for requests to scheme://netloc: ``$<scheme>_proxy`` or ``$all_proxy`` (lower case first, as
    curl; without a scheme, http://), unless ``$no_proxy`` lists the host or a parent domain (or ``*``), or the host
    is loopback."""
    def get(name: str) -> str:
        return env.get(name) or env.get(name.upper()) or ""

    host = (urlsplit(f"//{netloc}").hostname or netloc).lower()
    if is_loopback(host):
        return None
    for item in (entry.strip().lower() for entry in get("no_proxy").split(",")):
        if item == "*":
            return None
        item = item.lstrip(".")  # ".example.com" and "example.com" both cover the subdomains
        if item and (host == item or host.endswith("." + item) or netloc.lower() == item):
            return None
    proxy = get(f"{scheme}_proxy") or get("all_proxy")
    if not proxy:
        return None
    return proxy if "://" in proxy else f"http://{proxy}"  # "proxy:3128" means http, as for curl and Go


def _ca_files(host: str, env: Mapping[str, str]) -> tuple[str | None, list[str]]:
    """Whom ``host``'s certificate may come from: the trust store ($SSL_CERT_FILE, else None: the system's), and
    the CA files trusted besides it, every ``*.crt`` in <certs.d>/<host>/ of the first of containers' and Docker's
    certs.d directories that has any (containers-certs.d(5): they add to the system's roots)."""
    home = Path(env.get("HOME") or Path.home())
    dirs = [Path(env.get("XDG_CONFIG_HOME") or home / ".config") / "containers" / "certs.d",
            Path("/etc/containers/certs.d"), Path("/etc/docker/certs.d")]
    store = env.get("SSL_CERT_FILE") or env.get("REQUESTS_CA_BUNDLE") or None
    for directory in dirs:
        try:
            found = sorted((directory / host).glob("*.crt"))
        except OSError:
            continue
        if found:
            return store, [str(path) for path in found]
    return store, []


def printable_url(url: str) -> str:
    """A URL for messages: no query (upload state, signatures), never credentials."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}{':' + str(parts.port) if parts.port else ''}{parts.path}"


def one_line(err: BaseException) -> str:
    """An exception as one line, without URL queries (upload state)."""
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    return re.sub(r"\?[^\s'\")]*", "", text)[:300]


class Session:
    """Connections to HTTP servers; thread-safe, one keep-alive connection per thread and ``scheme://host``, with
    the timeouts and minimum rate of ``policy``."""

    def __init__(self, env: Mapping[str, str] | None = None, policy: RetryPolicy | None = None) -> None:
        self.env = dict(os.environ if env is None else env)
        self._policy = policy or RetryPolicy()
        self._local = threading.local()
        self._lock = threading.Lock()
        self._tls: dict[str, TLSContext] = {}
        self._connections: list[Connection] = []

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close every thread's connections."""
        with self._lock:
            connections, self._connections = self._connections, []
        for connection in connections:
            connection.close()

    def _tls_context(self, netloc: str) -> TLSContext:
        """Verifying TLS settings for a host: its own CAs from certs.d, when it has any, trusted besides the store."""
        from . import http

        with self._lock:
            context = self._tls.get(netloc)
            if context is None:
                try:
                    context = self._tls[netloc] = http.tls_context(*_ca_files(netloc, self.env))
                except OSError as err:
                    raise CAFileError(f"TLS settings for {netloc}: {err}") from None
            return context

    def _connection(self, scheme: str, netloc: str) -> tuple[Connection, bool]:
        """This thread's connection to scheme://netloc, and whether it is new (a kept-alive one may have been
        closed by the server meanwhile)."""
        from . import http

        pool: dict[tuple[str, str], Connection] | None = getattr(self._local, "pool", None)
        if pool is None:
            pool = self._local.pool = {}
        connection = pool.get((scheme, netloc))
        if connection is not None:
            if http.reusable(connection):
                return connection, connection.sock is None
            connection.close()
            return connection, True
        proxy = proxy_for(scheme, netloc, self.env)
        policy = self._policy
        try:
            connection = http.connect(scheme, netloc, proxy=proxy, connect_timeout=policy.connect_timeout,
                                      read_timeout=policy.read_timeout, min_rate=policy.min_rate,
                                      rate_window=policy.rate_window,
                                      context=self._tls_context(netloc) if scheme == "https" else None)
        except ValueError as err:
            raise ProxyError(f"proxy {printable_url(proxy or '')} for {netloc}: {err}") from None
        pool[(scheme, netloc)] = connection
        with self._lock:
            self._connections.append(connection)
        return connection, True

    def exchange(self, method: str, url: str, headers: Mapping[str, str],
                 body: bytes | Readable | None = None) -> Response:
        """One request and the status and headers of its response; the caller reads and closes it. A kept-alive
        connection the server had closed is replaced once, silently (when ``body`` can be sent again)."""
        from .http import TLSError, exchange

        parts = urlsplit(url)
        stale_retry = body is None or isinstance(body, bytes)
        while True:
            connection, fresh = self._connection(parts.scheme, parts.netloc)
            try:
                return exchange(connection, method, url, {"User-Agent": "ocibuild", **headers}, body)
            except TLSError as err:
                if err.certificate or fresh or not stale_retry:
                    raise
            except OSError:
                if fresh or not stale_retry:
                    raise
            stale_retry = False  # a kept-alive connection the server had closed: once more on a new one

    def send(self, method: str, url: str, headers: Callable[[str], Mapping[str, str]],
             body: bytes | Readable | None = None) -> tuple[str, Response]:
        """:meth:`exchange`, following redirects of GET and HEAD (at most five, never from https to http);
        ``headers(url)`` gives the headers for each URL on the way. Returns the last URL and its response."""
        for hop in range(_MAX_REDIRECTS + 1):
            response = self.exchange(method, url, headers(url), body)
            status = response.status_code
            if status not in REDIRECTS or "Location" not in response.headers or hop == _MAX_REDIRECTS:
                return url, response
            target = urljoin(url, response.headers["Location"])
            response.close()
            if urlsplit(url).scheme == "https" and urlsplit(target).scheme != "https":
                raise RedirectRefused(f"redirected from https to {printable_url(target)}; refused", status=status,
                                      code="REDIRECT")
            if method not in ("GET", "HEAD"):
                raise RedirectRefused(f"unexpected redirect of a {method}", status=status)
            url = target
        raise AssertionError("unreachable")
