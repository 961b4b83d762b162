"""One registry's HTTP side, under the distribution API calls: the scheme (https, or plain HTTP where allowed),
auth, the retry loop, and the :class:`RegistryError` each failure or error response means (as
go-containerregistry's ``remote/transport`` is to ``remote``).

:class:`Transport` is the base of :class:`.client.Client` and all an upload (:mod:`.upload`) talks through;
:class:`TransferStats` counts what moved, retries included. The HTTP/1.1, auth and retry machinery itself is
:mod:`ocibuild.net`'s.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

from ..errors import FormatError, RegistryError
from ..net.auth import DOCKER_HUB, DOCKER_HUB_API, Authenticator, Credentials
from ..net.retry import RETRY_STATUS, Retrier, RetryableFailure, RetryPolicy, parse_retry_after
from ..net.session import CAFileError, ProxyError, RedirectRefused, Session, is_loopback, one_line, printable_url
from ..oci import parse_json

if TYPE_CHECKING:  # imported on first contact with a registry: see ocibuild.net.session
    from ..net.http import Response

log = logging.getLogger(__name__)
T = TypeVar("T")

RERUN = "re-run the same command: blobs already transferred are kept and the rest continues"


@dataclass
class TransferStats:
    """What moved, for the closing report. Thread-safe through :meth:`add`."""

    uploaded: int = 0  # layer and config bytes sent
    downloaded: int = 0  # bytes received into the store
    retransferred: int = 0  # bytes sent or received again after an interruption or a corrupt transfer
    blobs_pushed: int = 0
    blobs_mounted: int = 0
    blobs_present: int = 0  # already where they had to go: nothing moved
    blobs_fetched: int = 0
    retries: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **counts: int) -> None:
        with self._lock:
            for name, value in counts.items():
                setattr(self, name, getattr(self, name) + value)

    def to_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in ("uploaded", "downloaded", "retransferred", "blobs_pushed",
                                                       "blobs_mounted", "blobs_present", "blobs_fetched", "retries")}


class Transport:
    """One registry's HTTP side, under the API calls of :class:`.client.Client` (its subclass): the scheme, auth,
    retries, and the RegistryError each failure means. Thread-safe, one keep-alive connection per thread and host."""

    def __init__(self, registry: str, *, insecure: bool = False, credentials: Credentials | None = None,
                 policy: RetryPolicy | None = None, stats: TransferStats | None = None,
                 env: Mapping[str, str] | None = None, sleep: Callable[[float], None] = time.sleep) -> None:
        self.registry = registry
        self.host = DOCKER_HUB_API if registry == DOCKER_HUB else registry
        self.plain_http_allowed = insecure or is_loopback(self.host)
        self.policy = policy or RetryPolicy()
        self.stats = stats or TransferStats()
        self.retrier = Retrier(self.policy, sleep, lambda: self.stats.add(retries=1))
        self._session = Session(env, self.policy)
        self._auth = Authenticator(registry, credentials, plain_http_allowed=self.plain_http_allowed,
                                   send=self._exchange, retrier=self.retrier)
        self._lock = threading.Lock()
        self._base: str | None = None

    def close(self) -> None:
        """Close every thread's connections."""
        self._session.close()

    def _call(self, what: str, method: str, url: str, call: Callable[[], T], *, probe: bool = False) -> T:
        """``call()`` (the session at work), its failures made the registry's: a connection error is worth another
        try, a refused certificate is not. ``probe``: the first contact, where any TLS failure propagates (the
        caller may fall back to plain HTTP)."""
        from ..net.http import InvalidRequest, TLSError

        try:
            return call()
        except InvalidRequest as err:  # nothing was sent, and sending it again would not help
            raise RegistryError(f"{what + ': ' if what else ''}{method} {printable_url(url)}: {one_line(err)}",
                                "check the reference and the registry's name for stray characters") from None
        except TLSError as err:
            if probe:
                raise
            if err.certificate:
                raise _tls_error(self.registry, err, self.plain_http_allowed) from None
            raise _unreachable(what, method, url, err) from None
        except OSError as err:
            raise _unreachable(what, method, url, err) from None
        except CAFileError as err:
            raise RegistryError(str(err), "fix or remove that file (a PEM certificate)") from None
        except ProxyError as err:
            raise RegistryError(str(err), "set $https_proxy to an http://HOST:PORT proxy, or list the host in "
                                "$no_proxy") from None
        except RedirectRefused as err:
            raise RegistryError(f"{what}: {err}", status=err.status, code=err.code) from None

    def _exchange(self, method: str, url: str, headers: Mapping[str, str], body: bytes | None = None) -> Response:
        """One exchange, without redirects or auth (token requests)."""
        return self._call("", method, url, lambda: self._session.exchange(method, url, headers, body))

    @property
    def base(self) -> str:
        """``https://host`` or, for loopback and insecure hosts that do not speak TLS, ``http://host``."""
        if self._base is None:
            self._ping()
        assert self._base is not None
        return self._base

    def _ping(self) -> None:
        """GET /v2/ once: picks the scheme and learns the auth challenge."""
        from ..net.http import TLSError

        def probe(url: str) -> Response:
            return self._call("", "GET", url, lambda: self._session.exchange("GET", url, {}), probe=True)

        try:
            response = self.retrier.run(lambda: probe(f"https://{self.host}/v2/"))
            base = f"https://{self.host}"
        except TLSError as err:
            if not self.plain_http_allowed or err.certificate:
                raise _tls_error(self.registry, err, self.plain_http_allowed) from None
            log.debug("%s does not speak TLS; using plain HTTP (allowed for it)", self.registry)
            response = self.retrier.run(lambda: probe(f"http://{self.host}/v2/"))
            base = f"http://{self.host}"
        with self._lock:
            self._base = base
        with response:
            if response.status_code == 401:
                self._auth.learn(response.headers.get("WWW-Authenticate", ""), base)
            elif response.status_code >= 400 and response.status_code not in RETRY_STATUS:
                raise error_of(response, self.registry, f"{self.registry} is not a registry (GET /v2/)")

    def request(self, method: str, path: str, *, scopes: tuple[str, ...], what: str,
                headers: Mapping[str, str] | None = None, body: Callable[[], Any] | None = None,
                ok: Iterable[int] = (200,), retry: bool = True) -> Response:
        """One API request; ``path`` is relative to the registry (or an absolute URL it gave, e.g. an upload
        Location). Follows redirects, authenticates, and retries, unless ``retry`` is False: then a failure
        worth another try raises RetryableFailure for the caller's own loop. The caller closes the response.
        ``body`` is called once per try (a retry, or the request sent again after answering a 401) and must give
        the body from its start each time: a stream a try has read is never sent again."""
        url = path if "://" in path else self.base + path
        accepted = frozenset(ok)

        def attempt() -> Response:
            return self._try(method, url, scopes, what, headers or {}, body, accepted)

        return self.retrier.run(attempt) if retry else attempt()

    def _try(self, method: str, url: str, scopes: tuple[str, ...], what: str, headers: Mapping[str, str],
             body: Callable[[], Any] | None, accepted: frozenset[int], *, answered: bool = False) -> Response:
        """One try of a request: a 401 is answered once (a token for the scopes, or the credentials)."""
        origin = urlsplit(self.base)[:2]

        def authorized(target: str) -> Mapping[str, str]:
            if urlsplit(target)[:2] != origin:
                return headers  # a redirect to another host (blob storage) gets no credentials
            authorization = self._auth.header(scopes)
            return {**headers, "Authorization": authorization} if authorization else headers

        data = body() if body is not None else None
        url, response = self._call(what, method, url, lambda: self._session.send(method, url, authorized, data))
        status = response.status_code
        if status in accepted:
            return response
        if status == 401 and urlsplit(url)[:2] == origin and not answered:
            self._auth.learn(response.headers.get("WWW-Authenticate", ""), url)
            self._auth.forget(scopes)
            if self._auth.can_answer():
                response.close()
                return self._try(method, url, scopes, what, headers, body, accepted, answered=True)
        error = error_of(response, self.registry, what)
        response.close()
        if status not in RETRY_STATUS:
            raise error
        delay = parse_retry_after(response.headers.get("Retry-After"))
        if delay is not None and delay > self.policy.max_retry_after:
            raise RegistryError(f"{error} (the registry asks to wait {delay:.0f} s)", RERUN + " later",
                                status=status, code=error.code, retryable=True)
        raise RetryableFailure(error, delay=delay)

    def check_login(self) -> None:
        """Raise RegistryError unless the credentials are accepted (GET /v2/, or a token without scope)."""
        with self._lock:
            self._base = None
        self._auth.reset()
        self._ping()
        challenge = self._auth.challenge
        if challenge is None:
            return
        if challenge.scheme == "bearer":
            self._auth.fetch_token(())
            return
        if self._auth.credentials is None:
            raise RegistryError(f"{self.registry} requires credentials", f"run `ocibuild login {self.registry}`",
                                status=401, code="UNAUTHORIZED")
        self.request("GET", "/v2/", scopes=(), what=f"log in to {self.registry}").close()


def _unreachable(what: str, method: str, url: str, err: OSError) -> RetryableFailure:
    message = f"{what + ': ' if what else ''}{method} {printable_url(url)}: {one_line(err)}"
    return RetryableFailure(RegistryError(message, RERUN, retryable=True))


def _tls_error(registry: str, err: OSError, plain_http_allowed: bool) -> RegistryError:
    return RegistryError(
        f"TLS connection to {registry} failed: {one_line(err)}",
        "give its CA in ~/.config/containers/certs.d/HOST/ca.crt or $SSL_CERT_FILE"
        + ("" if plain_http_allowed else ", or list it in [registry] insecure to allow plain HTTP"),
        code="TLS")


def error_of(response: Response, registry: str, what: str) -> RegistryError:
    """The RegistryError for an error response: status, and the code and message of the error body."""
    status = response.status_code
    code = message = None
    try:
        value = parse_json(response.read(64 << 10) or b"{}", f"{what}: the error response")
        first = (value.get("errors") or [{}])[0]
        code, message = first.get("code"), first.get("message")
    except (FormatError, AttributeError, TypeError, IndexError, OSError):
        pass
    text = f"{what}: HTTP {status}" + (f" {code}" if code else "") + (f": {message}" if message else "")
    if status in (401, 403):
        return RegistryError(text, f"run `ocibuild login {registry}` with an account allowed to do this "
                             "(credentials are read from ~/.docker/config.json, $REGISTRY_AUTH_FILE, "
                             "containers' auth.json and docker-credential helpers)",
                             status=status, code=code or "UNAUTHORIZED")
    retryable = status in RETRY_STATUS
    return RegistryError(text, RERUN if retryable else None, status=status, code=code, retryable=retryable)


def scopes_of(repository: str, push: bool) -> tuple[str, ...]:
    return (f"repository:{repository}:{'pull,push' if push else 'pull'}",)

