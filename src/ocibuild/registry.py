"""The distribution API client: push and fetch blobs and manifests, auth, retries.

ocibuild speaks the OCI distribution spec itself, over HTTP/1.1 of its own (:mod:`ocibuild.transport`: one
keep-alive connection per thread and host, on the standard library's socket and ssl); ``requests`` and then
``http.client`` served first, and were dropped for their import time (see that module). What moves:

- blobs stream between the store and the socket in 1 MiB pieces, so memory stays flat whatever their size;
  a download goes through :meth:`Store.writer` with the expected digest and size, so nothing unverified is
  stored; an interrupted download resumes with ``Range`` (the 206 and its Content-Range are checked; a server
  that ignores Range makes the download restart cleanly), within a run and across runs (the partial blob is
  kept in the store's tmp/ until a later run completes it);
- an upload is skipped when ``HEAD`` finds the blob, mounted from another repository of the same registry when
  ocibuild has seen the blob there (``POST …/blobs/uploads/?mount=&from=``), sent in one ``PUT`` when small and
  in ``PATCH`` chunks otherwise, resuming from the offset the registry reports after a failure;
- manifests are pushed as the exact bytes in the store (their digest is ours) and verified when fetched.

Requests are retried with exponential backoff and full jitter on connection errors, timeouts, 408, 429 (its
Retry-After is honoured) and 5xx. Auth: anonymous, basic, and the bearer-token flow with one token per set of
scopes; credentials come from :func:`find_credentials` and only ever go to the registry's own host (redirects
elsewhere, e.g. to blob storage, carry no Authorization header, and are never followed from https to http).
TLS is verified; plain HTTP is used only for loopback hosts and hosts listed in ``[registry] insecure``, and only
when the server does not speak TLS at all (a certificate error is an error, never a reason to downgrade).
Proxies come from ``$https_proxy``/``$http_proxy``/``$all_proxy`` and ``$no_proxy`` (upper case too); like
Go's net/http (skopeo, podman), loopback hosts never go through a proxy.

Errors::

    OSError (refused, reset, timeout, protocol errors)        retried, then RegistryError(retryable=True)
    transport.TLSError (certificate refused)                  RegistryError(code TLS), never retried
    HTTP 408, 429, 5xx                                        retried, then RegistryError(status, code, retryable)
    HTTP 401, 403                                             RegistryError(status, code) with a login hint
    other HTTP errors                                         RegistryError(status, code from the error body)
    content not matching its digest or size                   retried once, then RegistryError(code DIGEST_INVALID)

No message, log line or stored file ever holds a password or token.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import random
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO
from urllib.parse import urlencode, urljoin, urlsplit

from .errors import DigestMismatch, FormatError, RegistryError
from .oci import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    INDEX_TYPES,
    MANIFEST_TYPES,
    OCI_INDEX,
    OCI_MANIFEST,
    Descriptor,
    Digest,
    Index,
    Manifest,
    Platform,
    Reference,
)
from .store import BlobWriter, Store

if TYPE_CHECKING:  # imported on first contact with a registry: see the transport module
    from .transport import Connection, Response, TLSContext

log = logging.getLogger(__name__)

DEFAULT_JOBS = 4
_PIECE = 1 << 20  # read/write granularity of blob streams
_MONOLITHIC_MAX = 32 << 20  # blobs up to this size are uploaded in one PUT
_CHUNK = 128 << 20  # larger blobs go in PATCH chunks of this size (Client.chunk_size)
_MANIFEST_MAX = 4 << 20  # the distribution spec's limit for a manifest
_ACCEPT = ", ".join((OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST))
_RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_RERUN = "re-run the same command: blobs already transferred are kept and the rest continues"
_DOCKER_HUB = "docker.io"
_DOCKER_HUB_API = "registry-1.docker.io"
_DOCKER_HUB_AUTH_KEY = "https://index.docker.io/v1/"


# ---- credentials ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Credentials:
    """A username and secret for one registry. ``identity_token``: the secret is an OAuth2 refresh token."""

    username: str
    password: str = field(repr=False)
    identity_token: bool = False


def _auth_key(registry: str) -> str:
    """How a registry is named in auth files: docker.io as Docker names it, others as host[:port]."""
    return _DOCKER_HUB_AUTH_KEY if registry == _DOCKER_HUB else registry


def _normalise_auth_key(key: str) -> str:
    host = re.sub(r"^[a-z]+://", "", key).split("/", 1)[0]
    return _DOCKER_HUB if host in ("index.docker.io", _DOCKER_HUB_API, _DOCKER_HUB) else host


def auth_files(env: Mapping[str, str] | None = None) -> list[Path]:
    """Where credentials are looked for, first match wins: $REGISTRY_AUTH_FILE, containers' auth.json
    (${XDG_RUNTIME_DIR}/containers, then ~/.config/containers), then Docker's config.json ($DOCKER_CONFIG or
    ~/.docker)."""
    env = os.environ if env is None else env
    home = Path(env.get("HOME") or Path.home())
    files = []
    if env.get("REGISTRY_AUTH_FILE"):
        files.append(Path(env["REGISTRY_AUTH_FILE"]))
    if env.get("XDG_RUNTIME_DIR"):
        files.append(Path(env["XDG_RUNTIME_DIR"]) / "containers" / "auth.json")
    files.append(Path(env.get("XDG_CONFIG_HOME") or home / ".config") / "containers" / "auth.json")
    files.append(Path(env.get("DOCKER_CONFIG") or home / ".docker") / "config.json")
    return files


def _read_auth_file(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        log.warning("ignoring credentials file %s: %s", path, getattr(err, "strerror", None) or type(err).__name__)
        return {}
    return value if isinstance(value, dict) else {}


def _credential_helper(helper: str, registry: str, env: Mapping[str, str]) -> Credentials | None:
    import shutil
    import subprocess  # (here, not at the top: start-up time of every registry command)

    exe = shutil.which(f"docker-credential-{helper}", path=env.get("PATH"))
    if exe is None:
        raise RegistryError(f"credential helper docker-credential-{helper} (configured for {registry}) is not installed",
                            "install it, or remove it from credHelpers/credsStore in the auth file")
    for key in dict.fromkeys((_auth_key(registry), registry)):
        try:
            result = subprocess.run([exe, "get"], input=key, capture_output=True, text=True, timeout=60,
                                    env=dict(env))
        except (OSError, subprocess.TimeoutExpired) as err:
            raise RegistryError(f"credential helper docker-credential-{helper} failed: {type(err).__name__}",
                                "check the helper works: echo HOST | docker-credential-HELPER get") from None
        if result.returncode != 0:
            continue  # "credentials not found in native keychain": try the next name, then anonymous
        try:
            value = json.loads(result.stdout)
            username, secret = value["Username"], value["Secret"]
        except (ValueError, KeyError, TypeError):
            raise RegistryError(f"credential helper docker-credential-{helper} returned malformed output",
                                "check the helper works: echo HOST | docker-credential-HELPER get") from None
        if isinstance(username, str) and isinstance(secret, str) and secret:
            return Credentials(username, secret, identity_token=username == "<token>")
    return None


def find_credentials(registry: str, env: Mapping[str, str] | None = None) -> Credentials | None:
    """The credentials recorded for ``registry`` (host[:port]) in the first auth file that knows it, asking a
    docker-credential-* helper where one is configured; None for anonymous access."""
    env = os.environ if env is None else env
    for path in auth_files(env):
        data = _read_auth_file(path)
        helpers = data.get("credHelpers") or {}
        if isinstance(helpers, dict):
            for key, helper in helpers.items():
                if _normalise_auth_key(key) == registry and isinstance(helper, str):
                    return _credential_helper(helper, registry, env)
        auths = data.get("auths") or {}
        if isinstance(auths, dict):
            for key, entry in auths.items():
                if _normalise_auth_key(key) != registry or not isinstance(entry, dict):
                    continue
                found = _decode_auth_entry(entry, path, registry)
                if found is not None:
                    return found
        store = data.get("credsStore")
        if isinstance(store, str) and store:
            found = _credential_helper(store, registry, env)
            if found is not None:
                return found
    return None


def _decode_auth_entry(entry: Mapping[str, Any], path: Path, registry: str) -> Credentials | None:
    token = entry.get("identitytoken")
    username, password = entry.get("username"), entry.get("password")
    if isinstance(entry.get("auth"), str) and entry["auth"]:
        try:
            username, _, password = base64.b64decode(entry["auth"], validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            raise RegistryError(f"{path}: the 'auth' entry for {registry} is not valid base64 of user:password",
                                f"run `ocibuild login {registry}` again") from None
    if isinstance(token, str) and token:
        return Credentials(username if isinstance(username, str) else "", token, identity_token=True)
    if isinstance(username, str) and isinstance(password, str) and username:
        return Credentials(username, password)
    return None


def save_credentials(registry: str, credentials: Credentials, env: Mapping[str, str] | None = None) -> Path:
    """Record credentials as ``docker login`` does: through the configured helper, else base64 in the auth file
    ($REGISTRY_AUTH_FILE, else Docker's config.json), written atomically with mode 0600. Returns the file."""
    import shutil
    import subprocess

    env = os.environ if env is None else env
    path = Path(env["REGISTRY_AUTH_FILE"]) if env.get("REGISTRY_AUTH_FILE") else auth_files(env)[-1]
    data = _read_auth_file(path)
    helper = (data.get("credHelpers") or {}).get(_auth_key(registry)) or data.get("credsStore")
    if isinstance(helper, str) and helper:
        exe = shutil.which(f"docker-credential-{helper}", path=env.get("PATH"))
        if exe is None:
            raise RegistryError(f"credential helper docker-credential-{helper} is not installed",
                                "install it, or remove credsStore/credHelpers from " + str(path))
        payload = json.dumps({"ServerURL": _auth_key(registry), "Username": credentials.username,
                              "Secret": credentials.password})
        result = subprocess.run([exe, "store"], input=payload, capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            raise RegistryError(f"credential helper docker-credential-{helper} could not store the credentials",
                                "check the helper works, or remove it from " + str(path))
        return path
    auths = data.get("auths") if isinstance(data.get("auths"), dict) else {}
    assert isinstance(auths, dict)
    secret = base64.b64encode(f"{credentials.username}:{credentials.password}".encode()).decode()
    auths[_auth_key(registry)] = {"auth": secret}
    data["auths"] = auths
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with open(fd, "w") as file:
            file.write(json.dumps(data, indent="\t") + "\n")
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except OSError as err:
        raise RegistryError(f"cannot write {path}: {err.strerror}", "check the permissions of its directory") from None
    return path


# ---- WWW-Authenticate, Retry-After, backoff -------------------------------------------------------------------


@dataclass(frozen=True)
class Challenge:
    scheme: str  # lower case: "basic" or "bearer"
    params: Mapping[str, str]


_TOKEN68 = r"[A-Za-z0-9._~+/-]+=*"
_PARAM = re.compile(r'\s*([A-Za-z0-9!#$%&\'*+.^_`|~-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^\s,]*)\s*(?:,|$)')


def parse_challenges(header: str) -> list[Challenge]:
    """The challenges of a WWW-Authenticate header (RFC 7235): scheme and parameters, quoted or not."""
    challenges: list[Challenge] = []
    rest = header.strip()
    while rest:
        match = re.match(r"([A-Za-z][A-Za-z0-9!#$%&'*+.^_`|~-]*)\s*", rest)
        if match is None:
            break
        scheme = match.group(1).lower()
        rest = rest[match.end():]
        params: dict[str, str] = {}
        while rest:
            param = _PARAM.match(rest)
            if param is None:
                token = re.match(rf"\s*{_TOKEN68}\s*(?:,|$)", rest)
                if token is not None and not params:
                    rest = rest[token.end():]
                break
            value = param.group(2)
            if value.startswith('"'):
                value = re.sub(r"\\(.)", r"\1", value[1:-1])
            params[param.group(1).lower()] = value
            rest = rest[param.end():].lstrip()
        challenges.append(Challenge(scheme, params))
        rest = rest.lstrip(", ")
    return challenges


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    import email.utils  # rare; not worth its import time on every start

    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, when - (time.time() if now is None else now))


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently requests are retried, and the socket timeouts."""

    attempts: int = 6  # tries of one request (or one resumable transfer without progress)
    base: float = 0.5  # first backoff, doubled each time, with full jitter
    cap: float = 15.0  # longest backoff
    max_retry_after: float = 60.0  # longest Retry-After honoured; a longer one fails at once
    connect_timeout: float = 15.0
    read_timeout: float = 60.0

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        if retry_after is not None:
            return min(retry_after, self.max_retry_after)
        return random.uniform(0, min(self.cap, self.base * (2 ** attempt)))


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


# ---- statistics ---------------------------------------------------------------------------------------------------


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


# ---- the client ----------------------------------------------------------------------------------------------------


class _Retry(RegistryError):
    """A retryable failure of a request made with ``retry=False``; ``delay`` honours Retry-After."""

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None,
                 delay: float | None = None) -> None:
        super().__init__(message, _RERUN, status=status, code=code, retryable=True)
        self.delay = delay


class _FileSlice:
    """Bytes ``start``..``end`` of an open file as a request body (the transport ``read``s it in 1 MiB blocks);
    counts what was actually read."""

    def __init__(self, file: BinaryIO, start: int, end: int) -> None:
        self._file = file
        self._position = start
        self._end = end
        self.sent = 0

    def read(self, size: int = -1) -> bytes:
        remaining = self._end - self._position
        if size < 0 or size > remaining:
            size = remaining
        data = os.pread(self._file.fileno(), size, self._position) if size else b""
        self._position += len(data)
        self.sent += len(data)
        return data


def _tls_error(registry: str, err: OSError, plain_http_allowed: bool) -> RegistryError:
    return RegistryError(
        f"TLS connection to {registry} failed: {_short(err)}",
        "give its CA in ~/.config/containers/certs.d/HOST/ca.crt or $SSL_CERT_FILE"
        + ("" if plain_http_allowed else ", or list it in [registry] insecure to allow plain HTTP"),
        code="TLS")


def _strip(url: str) -> str:
    """A URL for messages: no query (upload state), never credentials."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}{':' + str(parts.port) if parts.port else ''}{parts.path}"


class Client:
    """One registry (host[:port]); thread-safe, one keep-alive connection per thread and host. Use
    :meth:`Registries.client`."""

    def __init__(self, registry: str, *, insecure: bool = False, credentials: Credentials | None = None,
                 policy: RetryPolicy | None = None, stats: TransferStats | None = None,
                 env: Mapping[str, str] | None = None, sleep: Callable[[float], None] = time.sleep) -> None:
        self.registry = registry
        self.host = _DOCKER_HUB_API if registry == _DOCKER_HUB else registry
        self.plain_http_allowed = insecure or is_loopback(self.host)
        self.credentials = credentials
        self.policy = policy or RetryPolicy()
        self.stats = stats or TransferStats()
        self._env = dict(os.environ if env is None else env)
        self._sleep = sleep
        self._local = threading.local()
        self._lock = threading.Lock()
        self._base: str | None = None
        self._challenge: Challenge | None = None
        self._tokens: dict[tuple[str, ...], tuple[str, float]] = {}
        self._tls: dict[str, TLSContext] = {}
        self._connections: list[Connection] = []
        self.monolithic_max = _MONOLITHIC_MAX
        self.chunk_size = _CHUNK

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close every thread's connections."""
        with self._lock:
            connections, self._connections = self._connections, []
        for connection in connections:
            connection.close()

    def __repr__(self) -> str:
        return f"Client({self.registry!r})"

    # -- plumbing

    def _tls_context(self, netloc: str) -> TLSContext:
        """Verifying TLS settings for a host: its own CAs from certs.d, when it has any, trusted besides the store."""
        from . import transport

        with self._lock:
            context = self._tls.get(netloc)
            if context is None:
                try:
                    context = self._tls[netloc] = transport.tls_context(*_ca_files(netloc, self._env))
                except OSError as err:
                    raise RegistryError(f"TLS settings for {self.registry}: {err}",
                                        "fix or remove that file (a PEM certificate)") from None
            return context

    def _connection(self, scheme: str, netloc: str) -> tuple[Connection, bool]:
        """This thread's connection to scheme://netloc, and whether it is new (a kept-alive one may have been
        closed by the server meanwhile)."""
        from . import transport

        pool: dict[tuple[str, str], Connection] | None = getattr(self._local, "pool", None)
        if pool is None:
            pool = self._local.pool = {}
        connection = pool.get((scheme, netloc))
        if connection is not None:
            if transport.reusable(connection):
                return connection, connection.sock is None
            connection.close()
            return connection, True
        proxy = proxy_for(scheme, netloc, self._env)
        try:
            connection = transport.connect(scheme, netloc, proxy=proxy, connect_timeout=self.policy.connect_timeout,
                                           read_timeout=self.policy.read_timeout,
                                           context=self._tls_context(netloc) if scheme == "https" else None)
        except ValueError as err:
            raise RegistryError(f"proxy {_strip(proxy or '')} for {netloc}: {err}",
                                "set $https_proxy to an http://HOST:PORT proxy, or list the host in $no_proxy") from None
        pool[(scheme, netloc)] = connection
        with self._lock:
            self._connections.append(connection)
        return connection, True

    @property
    def base(self) -> str:
        """``https://host`` or, for loopback and insecure hosts that do not speak TLS, ``http://host``."""
        if self._base is None:
            self._ping()
        assert self._base is not None
        return self._base

    def _ping(self) -> None:
        """GET /v2/ once: picks the scheme and learns the auth challenge."""
        from .transport import TLSError

        try:
            response = self._raw("GET", f"https://{self.host}/v2/", {}, tries=self.policy.attempts, probe=True)
        except TLSError as err:
            if not self.plain_http_allowed or err.certificate:
                raise _tls_error(self.registry, err, self.plain_http_allowed) from None
            log.debug("%s does not speak TLS; using plain HTTP (allowed for it)", self.registry)
            response = self._raw("GET", f"http://{self.host}/v2/", {}, tries=self.policy.attempts)
            with self._lock:
                self._base = f"http://{self.host}"
        else:
            with self._lock:
                self._base = f"https://{self.host}"
        with response:
            if response.status_code == 401:
                self._learn_challenge(response)
            elif response.status_code >= 400 and response.status_code not in _RETRY_STATUS:
                raise self._error(response, f"{self.registry} is not a registry (GET /v2/)")

    def _raw(self, method: str, url: str, headers: Mapping[str, str], body: bytes | _FileSlice | None = None, *,
             tries: int = 1, probe: bool = False) -> Response:
        """One HTTP exchange (retried ``tries`` times on connection errors); _Retry when the host cannot be
        reached. ``probe``: the first contact, where a TLS failure other than a refused certificate propagates
        (the caller may fall back to plain HTTP)."""
        from .transport import TLSError, exchange

        parts = urlsplit(url)
        stale_retry = body is None or isinstance(body, bytes)
        attempt = 0
        error: OSError
        while True:
            connection, fresh = self._connection(parts.scheme, parts.netloc)
            try:
                return exchange(connection, method, url, {"User-Agent": "ocibuild", **headers}, body)
            except TLSError as err:
                if probe:
                    raise
                if err.certificate:
                    raise _tls_error(self.registry, err, self.plain_http_allowed) from None
                error = err
            except OSError as err:
                error = err
            if not fresh and stale_retry:
                stale_retry = False  # a kept-alive connection the server had closed: once more on a new one
                continue
            attempt += 1
            if attempt >= tries:
                raise _Retry(f"{method} {_strip(url)}: {_short(error)}") from None
            self.stats.add(retries=1)
            self._sleep(self.policy.delay(attempt - 1))

    def _learn_challenge(self, response: Response) -> None:
        for challenge in parse_challenges(response.headers.get("WWW-Authenticate", "")):
            if challenge.scheme in ("bearer", "basic"):
                with self._lock:
                    self._challenge = challenge
                return

    def _authorization(self, scopes: tuple[str, ...]) -> str | None:
        challenge = self._challenge
        if challenge is None:
            return None
        if challenge.scheme == "basic":
            if self.credentials is None:
                return None
            pair = f"{self.credentials.username}:{self.credentials.password}".encode()
            return "Basic " + base64.b64encode(pair).decode()
        with self._lock:
            cached = self._tokens.get(scopes)
        if cached is not None and cached[1] > time.monotonic():
            return f"Bearer {cached[0]}"
        token, lifetime = self._fetch_token(challenge, scopes)
        with self._lock:
            self._tokens[scopes] = (token, time.monotonic() + max(lifetime - 10, 5))
        return f"Bearer {token}"

    def _fetch_token(self, challenge: Challenge, scopes: tuple[str, ...]) -> tuple[str, float]:
        realm = challenge.params.get("realm", "")
        parts = urlsplit(realm)
        if parts.scheme not in ("https", "http") or not parts.hostname:
            raise RegistryError(f"{self.registry} asks for a token from {realm!r}, which is not a URL",
                                code="UNAUTHORIZED", status=401)
        realm_host = parts.netloc
        if parts.scheme == "http" and not (is_loopback(realm_host) or self.plain_http_allowed):
            raise RegistryError(f"{self.registry} asks for a token over plain HTTP ({_strip(realm)}); refused",
                                "a token server must use https", code="UNAUTHORIZED", status=401)
        query: list[tuple[str, str]] = []
        if challenge.params.get("service"):
            query.append(("service", challenge.params["service"]))
        query += [("scope", scope) for scope in scopes]
        headers: dict[str, str] = {}
        body: bytes | None = None
        method = "GET"
        creds = self.credentials
        if creds is not None and creds.identity_token:
            method = "POST"
            headers["Content-Type"] = "application/x-www-form-urlencoded"
            body = urlencode([("grant_type", "refresh_token"), ("refresh_token", creds.password),
                              ("client_id", "ocibuild"), *query]).encode()
        elif creds is not None:
            pair = f"{creds.username}:{creds.password}".encode()
            headers["Authorization"] = "Basic " + base64.b64encode(pair).decode()
        url = realm + ("&" if "?" in realm else "?") + urlencode(query) if method == "GET" and query else realm
        for attempt in range(self.policy.attempts):
            with self._raw(method, url, headers, body, tries=self.policy.attempts) as response:
                if response.status_code in _RETRY_STATUS and attempt + 1 < self.policy.attempts:
                    self.stats.add(retries=1)
                    self._sleep(self.policy.delay(attempt, parse_retry_after(response.headers.get("Retry-After"))))
                    continue
                if response.status_code != 200:
                    who = f"as '{creds.username}'" if creds is not None else "anonymously"
                    raise RegistryError(
                        f"{self.registry}: the token server {_strip(realm)} refused {' '.join(scopes) or 'access'} "
                        f"{who} (HTTP {response.status_code})",
                        f"run `ocibuild login {self.registry}` with an account allowed to do this",
                        status=response.status_code, code="UNAUTHORIZED")
                try:
                    value = json.loads(response.read(1 << 20))
                    token = value.get("token") or value.get("access_token")
                    lifetime = float(value.get("expires_in") or 60)
                except (ValueError, AttributeError, TypeError):
                    token = None
                if not isinstance(token, str) or not token:
                    raise RegistryError(f"{self.registry}: the token server {_strip(realm)} returned no token",
                                        status=200, code="UNAUTHORIZED")
                return token, lifetime
        raise AssertionError("unreachable")

    def _error(self, response: Response, what: str) -> RegistryError:
        status = response.status_code
        code = message = None
        try:
            value = json.loads(response.read(64 << 10) or b"{}")
            first = (value.get("errors") or [{}])[0]
            code, message = first.get("code"), first.get("message")
        except (ValueError, AttributeError, TypeError, IndexError, OSError):
            pass
        text = f"{what}: HTTP {status}" + (f" {code}" if code else "") + (f": {message}" if message else "")
        if status in (401, 403):
            return RegistryError(text, f"run `ocibuild login {self.registry}` with an account allowed to do this "
                                 "(credentials are read from ~/.docker/config.json, $REGISTRY_AUTH_FILE, "
                                 "containers' auth.json and docker-credential helpers)",
                                 status=status, code=code or "UNAUTHORIZED")
        retryable = status in _RETRY_STATUS
        return RegistryError(text, _RERUN if retryable else None, status=status, code=code, retryable=retryable)

    def request(self, method: str, path: str, *, scopes: tuple[str, ...], what: str,
                headers: Mapping[str, str] | None = None, body: Callable[[], Any] | None = None,
                ok: Iterable[int] = (200,), retry: bool = True) -> Response:
        """One API request; ``path`` is relative to the registry (or an absolute URL it gave, e.g. an upload
        Location). Follows redirects, authenticates, retries. The caller closes the response."""
        accepted = frozenset(ok)
        url = path if "://" in path else self.base + path
        origin = urlsplit(self.base).netloc
        auth_retried = False
        redirects = 0
        attempt = 0
        while True:
            sent = dict(headers or {})
            same_host = urlsplit(url).netloc == origin and urlsplit(url).scheme == urlsplit(self.base).scheme
            if same_host:
                authorization = self._authorization(scopes)
                if authorization:
                    sent["Authorization"] = authorization
            data = body() if body is not None else None
            try:
                response = self._raw(method, url, sent, data)
            except _Retry as err:
                if not retry or attempt + 1 >= self.policy.attempts:
                    raise _Retry(f"{what}: {err}") from None
                self.stats.add(retries=1)
                self._sleep(self.policy.delay(attempt))
                attempt += 1
                continue
            status = response.status_code
            if status in accepted:
                return response
            if status in _REDIRECTS and "Location" in response.headers and redirects < 5:
                target = urljoin(url, response.headers["Location"])
                response.close()
                if urlsplit(url).scheme == "https" and urlsplit(target).scheme != "https":
                    raise RegistryError(f"{what}: redirected from https to {_strip(target)}; refused",
                                        status=status, code="REDIRECT")
                url, redirects = target, redirects + 1
                if method not in ("GET", "HEAD"):
                    raise RegistryError(f"{what}: unexpected redirect of a {method}", status=status)
                continue
            if status == 401 and same_host and not auth_retried:
                self._learn_challenge(response)
                with self._lock:
                    self._tokens.pop(scopes, None)
                response.close()
                auth_retried = True
                if self._challenge is not None and (self._challenge.scheme == "bearer" or self.credentials):
                    continue
                raise self._error(response, what)
            if status in _RETRY_STATUS:
                delay = parse_retry_after(response.headers.get("Retry-After"))
                error = self._error(response, what)
                response.close()
                if delay is not None and delay > self.policy.max_retry_after:
                    raise RegistryError(f"{error} (the registry asks to wait {delay:.0f} s)", _RERUN + " later",
                                        status=status, code=error.code, retryable=True)
                if not retry:
                    raise _Retry(str(error), status=status, code=error.code, delay=delay)
                if attempt + 1 >= self.policy.attempts:
                    raise error
                self.stats.add(retries=1)
                self._sleep(self.policy.delay(attempt, delay))
                attempt += 1
                continue
            error = self._error(response, what)
            response.close()
            raise error

    # -- API

    def check_login(self) -> None:
        """Raise RegistryError unless the credentials are accepted (GET /v2/, or a token without scope)."""
        with self._lock:
            self._base = None
            self._challenge = None
        self._ping()
        challenge = self._challenge
        if challenge is None:
            return
        if challenge.scheme == "bearer":
            self._fetch_token(challenge, ())
            return
        if self.credentials is None:
            raise RegistryError(f"{self.registry} requires credentials", f"run `ocibuild login {self.registry}`",
                                status=401, code="UNAUTHORIZED")
        self.request("GET", "/v2/", scopes=(), what=f"log in to {self.registry}").close()

    def blob_exists(self, repository: str, digest: Digest, *, push: bool = False) -> bool:
        scopes = _scopes(repository, push)
        with self.request("HEAD", f"/v2/{repository}/blobs/{digest}", scopes=scopes, ok=(200, 404),
                          what=f"check blob {digest.short} in {self.registry}/{repository}") as response:
            return response.status_code == 200

    def resolve(self, repository: str, reference: str) -> Descriptor | None:
        """HEAD of a manifest by tag or digest: its descriptor, or None when absent."""
        with self.request("HEAD", f"/v2/{repository}/manifests/{reference}", scopes=_scopes(repository, False),
                          headers={"Accept": _ACCEPT}, ok=(200, 404),
                          what=f"look up {self.registry}/{repository}:{reference}") as response:
            if response.status_code == 404:
                return None
            digest_text = response.headers.get("Docker-Content-Digest")
            length = response.headers.get("Content-Length")
            media_type = response.headers.get("Content-Type", "").split(";")[0].strip()
        if not digest_text or not length or not length.isdigit() or media_type not in MANIFEST_TYPES | INDEX_TYPES:
            data, media_type, digest = self.fetch_manifest(repository, reference)
            return Descriptor(media_type, digest, len(data))
        return Descriptor(media_type, Digest.parse(digest_text), int(length))

    def fetch_manifest(self, repository: str, reference: str) -> tuple[bytes, str, Digest]:
        """A manifest or index by tag or digest: its bytes (verified when addressed by digest), media type, digest."""
        what = f"fetch manifest {self.registry}/{repository}{'@' if ':' in reference else ':'}{reference}"
        with self.request("GET", f"/v2/{repository}/manifests/{reference}", scopes=_scopes(repository, False),
                          headers={"Accept": _ACCEPT}, what=what) as response:
            try:
                data = response.read(_MANIFEST_MAX + 1)
            except OSError as err:
                raise RegistryError(f"{what}: {_short(err)}", _RERUN, retryable=True) from None
            media_type = response.headers.get("Content-Type", "").split(";")[0].strip()
            header_digest = response.headers.get("Docker-Content-Digest")
        if len(data) > _MANIFEST_MAX:
            raise RegistryError(f"{what}: larger than {_MANIFEST_MAX} bytes", code="MANIFEST_INVALID")
        try:
            media_type = media_type if media_type in MANIFEST_TYPES | INDEX_TYPES else \
                str(json.loads(data).get("mediaType") or OCI_MANIFEST)
        except (ValueError, AttributeError):
            raise RegistryError(f"{what}: not a JSON document", code="MANIFEST_INVALID") from None
        digest = Digest.of(data)
        expected = Digest.parse(reference) if ":" in reference else (
            Digest.parse(header_digest) if header_digest and header_digest.startswith("sha256:") else None)
        if expected is not None and expected != digest:
            raise RegistryError(f"{what}: content hashes to {digest}, not {expected}",
                                "the registry or a proxy corrupted it; " + _RERUN, code="DIGEST_INVALID",
                                retryable=True)
        return data, media_type, digest

    def push_manifest(self, repository: str, reference: str, data: bytes, media_type: str) -> Digest:
        """PUT our exact manifest bytes under a tag (or digest)."""
        digest = Digest.of(data)
        with self.request("PUT", f"/v2/{repository}/manifests/{reference}", scopes=_scopes(repository, True),
                          headers={"Content-Type": media_type}, body=lambda: data, ok=(201, 200),
                          what=f"push manifest {self.registry}/{repository}:{reference}") as response:
            echoed = response.headers.get("Docker-Content-Digest")
        if echoed and echoed != str(digest):
            raise RegistryError(f"{self.registry}/{repository}:{reference}: the registry stored the manifest as "
                                f"{echoed}, not {digest}", code="DIGEST_INVALID")
        return digest

    def fetch_blob(self, repository: str, descriptor: Descriptor, store: Store) -> str:
        """Download a blob into the store, verified; "present" when it already was, else "fetched"."""
        digest = descriptor.digest
        if store.has(digest):
            self.stats.add(blobs_present=1)
            return "present"
        for corrupt in (False, True):
            try:
                with store.writer(expected=digest, size=descriptor.size, resumable=True) as writer:
                    self._download(repository, descriptor, writer)
            except DigestMismatch as err:
                self.stats.add(retransferred=descriptor.size)
                if corrupt:
                    raise RegistryError(
                        f"blob {digest} from {self.registry}/{repository} is corrupt: {err}; nothing was stored",
                        "the registry's copy or a proxy on the way is damaged; " + _RERUN,
                        code="DIGEST_INVALID", retryable=True) from None
                log.warning("blob %s arrived corrupt (%s); fetching it again", digest.short, err)
                continue
            self.stats.add(blobs_fetched=1)
            return "fetched"
        raise AssertionError("unreachable")

    def _download(self, repository: str, descriptor: Descriptor, writer: BlobWriter) -> None:
        """Fill ``writer`` (which may already hold a first part: a resumed download) with the blob's bytes."""
        digest, size = descriptor.digest, descriptor.size
        what = f"fetch blob {digest.short} from {self.registry}/{repository}"
        stalled = 0
        view = memoryview(bytearray(_PIECE))
        while True:
            offset = writer.size
            headers = {"Accept-Encoding": "identity"}
            if offset:
                headers["Range"] = f"bytes={offset}-"
            response = self.request("GET", f"/v2/{repository}/blobs/{digest}", scopes=_scopes(repository, False),
                                    headers=headers, ok=(200, 206), what=what)
            with response:
                if offset:
                    if response.status_code == 206 and _range_starts(response.headers.get("Content-Range"), offset,
                                                                     size):
                        log.info("%s: resuming at byte %d", what, offset)
                    else:
                        log.info("%s: the server ignored Range; starting over", what)
                        self.stats.add(retransferred=offset)
                        writer.restart()
                        if response.status_code != 200:
                            continue  # some other range: ask for the whole blob
                before = writer.size
                try:
                    while n := response.readinto(view):
                        writer.write(view[:n])
                except OSError as err:
                    error: str | None = _short(err)
                else:
                    error = None if writer.size >= size else "the body ended early"
                self.stats.add(downloaded=writer.size - before)
            if error is None:
                return
            stalled = 0 if writer.size > before else stalled + 1
            if stalled >= self.policy.attempts:
                raise RegistryError(f"{what}: {error} ({writer.size} of {size} bytes); the bytes received are kept",
                                    _RERUN, retryable=True)
            log.info("%s: %s at byte %d of %d; resuming", what, error, writer.size, size)
            self.stats.add(retries=1)
            self._sleep(self.policy.delay(stalled))

    def push_blob(self, repository: str, descriptor: Descriptor, store: Store,
                  mount_from: Sequence[str] = ()) -> str:
        """Make a blob of the store present in the repository: "present", "mounted" or "pushed"."""
        digest = descriptor.digest
        if self.blob_exists(repository, digest, push=True):
            self.stats.add(blobs_present=1)
            return "present"
        location = None
        for source in mount_from:
            if source == repository:
                continue
            response = self.request("POST", f"/v2/{repository}/blobs/uploads/?mount={digest}&from={source}",
                                    scopes=(f"repository:{repository}:pull,push", f"repository:{source}:pull"),
                                    ok=(201, 202), what=f"mount blob {digest.short} from {source}")
            with response:
                if response.status_code == 201:
                    self.stats.add(blobs_mounted=1)
                    return "mounted"
                location = response.headers.get("Location")
            break
        what = f"push blob {digest.short} to {self.registry}/{repository}"
        path = store.blob_path(digest)
        try:
            file = open(path, "rb", buffering=0)
        except OSError as err:
            raise RegistryError(f"{what}: cannot read {path}: {err.strerror}",
                                "run `ocibuild verify`; rebuild or re-pull the layer") from None
        with file:
            for restart in range(2):
                if self._upload(repository, descriptor, file, location, what):
                    self.stats.add(blobs_pushed=1)
                    return "pushed"
                location = None
                self.stats.add(retransferred=descriptor.size)
        raise RegistryError(f"{what}: the registry rejected the uploaded content twice",
                            "check the store with `ocibuild verify`, then " + _RERUN, code="DIGEST_INVALID")

    def _start_upload(self, repository: str, what: str) -> str:
        with self.request("POST", f"/v2/{repository}/blobs/uploads/", scopes=_scopes(repository, True),
                          headers={"Content-Length": "0"}, ok=(202,), what=what) as response:
            location = response.headers.get("Location")
        if not location:
            raise RegistryError(f"{what}: the registry gave no upload location", status=202)
        return location

    def _upload(self, repository: str, descriptor: Descriptor, file: BinaryIO, location: str | None,
                what: str) -> bool:
        """Upload one blob; False when the registry rejected the result (digest invalid): start again."""
        digest, size = descriptor.digest, descriptor.size
        url = urljoin(self.base + "/", location or self._start_upload(repository, what))
        scopes = _scopes(repository, True)
        octet = {"Content-Type": "application/octet-stream"}
        if size <= self.monolithic_max:
            for attempt in range(self.policy.attempts):
                slice_ = _FileSlice(file, 0, size)
                try:
                    response = self.request("PUT", _with_digest(url, digest), scopes=scopes, retry=False,
                                            headers={**octet, "Content-Length": str(size)},
                                            body=lambda: slice_, ok=(201, 400), what=what)
                except _Retry as err:
                    self.stats.add(retransferred=slice_.sent, retries=1)
                    if attempt + 1 >= self.policy.attempts:
                        raise RegistryError(str(err), _RERUN, status=err.status, code=err.code,
                                            retryable=True) from None
                    self._sleep(self.policy.delay(attempt, err.delay))
                    url = urljoin(self.base + "/", self._start_upload(repository, what))
                    continue
                with response:
                    self.stats.add(uploaded=size)
                    if response.status_code == 400:
                        return self._rejected(response, what)
                    return True
            raise AssertionError("unreachable")
        offset = 0
        stalled = 0
        while offset < size:
            end = min(offset + self.chunk_size, size)
            slice_ = _FileSlice(file, offset, end)
            try:
                response = self.request("PATCH", url, scopes=scopes, retry=False, body=lambda: slice_,
                                        headers={**octet, "Content-Range": f"{offset}-{end - 1}",
                                                 "Content-Length": str(end - offset)}, ok=(202,), what=what)
            except _Retry as err:
                stalled += 1
                if stalled >= self.policy.attempts:
                    raise RegistryError(f"{err} ({offset} of {size} bytes accepted)", _RERUN, status=err.status,
                                        code=err.code, retryable=True) from None
                self.stats.add(retries=1)
                self._sleep(self.policy.delay(stalled, err.delay))
                url, reported = self._upload_status(repository, url, what)
                self.stats.add(uploaded=max(0, reported - offset), retransferred=max(0, slice_.sent - (reported - offset)))
                log.info("%s: %s; resuming at byte %d (the registry has %d)", what, err, reported, reported)
                offset = reported
                continue
            with response:
                url = urljoin(url, response.headers.get("Location") or url)
                accepted = _range_end(response.headers.get("Range"))
            new_offset = end if accepted is None else accepted
            self.stats.add(uploaded=new_offset - offset)
            if new_offset > offset:
                stalled = 0
            offset = new_offset
        with self.request("PUT", _with_digest(url, digest), scopes=scopes, headers={"Content-Length": "0"},
                          ok=(201, 400), what=what) as response:
            if response.status_code == 400:
                return self._rejected(response, what)
        return True

    def _rejected(self, response: Response, what: str) -> bool:
        error = self._error(response, what)
        if error.code in ("DIGEST_INVALID", "SIZE_INVALID", "BLOB_UPLOAD_INVALID"):
            log.warning("%s: %s; uploading it again", what, error)
            return False
        raise error

    def _upload_status(self, repository: str, url: str, what: str) -> tuple[str, int]:
        """(location, offset) of an upload after a failure; a vanished upload starts again at 0."""
        with self.request("GET", url, scopes=_scopes(repository, True), ok=(204, 404), what=what) as response:
            if response.status_code == 404:
                return urljoin(self.base + "/", self._start_upload(repository, what)), 0
            location = urljoin(url, response.headers.get("Location") or url)
            end = _range_end(response.headers.get("Range"))
        return location, end or 0


def _scopes(repository: str, push: bool) -> tuple[str, ...]:
    return (f"repository:{repository}:{'pull,push' if push else 'pull'}",)


def _with_digest(url: str, digest: Digest) -> str:
    return url + ("&" if "?" in url else "?") + urlencode({"digest": str(digest)})


def _range_starts(header: str | None, offset: int, size: int) -> bool:
    match = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", (header or "").strip())
    return match is not None and int(match.group(1)) == offset and match.group(3) in (str(size), "*")


def _range_end(header: str | None) -> int | None:
    """The offset after a registry's ``Range: 0-N`` (N+1), or None."""
    match = re.fullmatch(r"(?:bytes=)?0-(\d+)", (header or "").strip())
    return int(match.group(1)) + 1 if match else None


def _short(err: BaseException) -> str:
    """An exception as one line, without URL queries (upload state)."""
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    return re.sub(r"\?[^\s'\")]*", "", text)[:300]


# ---- registries, and whole images ---------------------------------------------------------------------------------


class Registries:
    """Hands out one :class:`Client` per registry, sharing settings, credentials lookup and statistics."""

    def __init__(self, *, insecure: Sequence[str] = (), env: Mapping[str, str] | None = None,
                 policy: RetryPolicy | None = None, credentials: Mapping[str, Credentials] | None = None) -> None:
        self.insecure = tuple(insecure)
        self.env = dict(os.environ if env is None else env)
        self.policy = policy or RetryPolicy()
        self.stats = TransferStats()
        self._credentials = dict(credentials or {})
        self._clients: dict[str, Client] = {}
        self._lock = threading.Lock()

    def client(self, registry: str) -> Client:
        with self._lock:
            if registry not in self._clients:
                creds = self._credentials.get(registry) or find_credentials(registry, self.env)
                self._clients[registry] = Client(registry, insecure=registry in self.insecure, credentials=creds,
                                                 policy=self.policy, stats=self.stats, env=self.env)
            return self._clients[registry]

    def close(self) -> None:
        with self._lock:
            clients = list(self._clients.values())
        for client in clients:
            client.close()

    def __enter__(self) -> Registries:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def parse_repository(text: str) -> Reference:
    """A cache or image repository reference; FormatError (as RegistryError's sibling) when malformed."""
    try:
        return Reference.parse(text)
    except FormatError as err:
        raise FormatError(str(err), "write registry.example.com/team/repository") from None


class _Locations:
    """Which repositories of a registry ocibuild has seen each blob in, kept in the store's private area; the
    sources of cross-repository mounts."""

    def __init__(self, store: Store, registry: str) -> None:
        self._dir = store.private_dir("registry") / re.sub(r"[^A-Za-z0-9._-]", "_", registry)

    def get(self, digest: Digest) -> list[str]:
        try:
            return list(dict.fromkeys((self._dir / digest.hex).read_text().split()))
        except OSError:
            return []

    def add(self, digest: Digest, repository: str) -> None:
        if repository in self.get(digest):
            return
        try:
            self._dir.mkdir(parents=True, exist_ok=True)
            with open(self._dir / digest.hex, "a") as file:
                file.write(repository + "\n")
        except OSError as err:
            log.debug("cannot record where blob %s is: %s", digest.short, err.strerror)


def _parallel(jobs: int, work: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
    if jobs <= 1 or len(items) <= 1:
        return [work(item) for item in items]
    from concurrent.futures import ThreadPoolExecutor  # only when there is more than one thing to move

    with ThreadPoolExecutor(max_workers=min(jobs, len(items)), thread_name_prefix="ocibuild-transfer") as pool:
        return list(pool.map(work, items))


def push_manifests(client: Client, store: Store, repository: str, tagged: Sequence[tuple[str, Descriptor]], *,
                   jobs: int = DEFAULT_JOBS, output: Callable[[str], None] = lambda line: None) -> dict[str, str]:
    """Push each (tag, manifest in the store) with its config and layers: tag → "present" (the registry already
    has that manifest under that tag: nothing moves) or "pushed"."""
    locations = _Locations(store, client.registry)
    remote = _parallel(jobs, lambda item: client.resolve(repository, item[0]), list(tagged))
    todo = [(tag, d) for (tag, d), found in zip(tagged, remote) if found is None or found.digest != d.digest]
    result = {tag: "present" for (tag, d), found in zip(tagged, remote) if found is not None and
              found.digest == d.digest}
    blobs: dict[Digest, Descriptor] = {}
    manifests: list[tuple[str, bytes, str]] = []
    for tag, descriptor in todo:
        data = store.read_blob(descriptor.digest)
        manifest = Manifest.parse(data, f"manifest {descriptor.digest}")
        for blob in (manifest.config, *manifest.layers):
            blobs.setdefault(blob.digest, blob)
        manifests.append((tag, data, manifest.media_type))

    def push(blob: Descriptor) -> None:
        how = client.push_blob(repository, blob, store, locations.get(blob.digest))
        locations.add(blob.digest, repository)
        if how != "present" and blob.size > _PIECE:
            output(f"{how} blob {blob.digest.short} ({blob.size / 1e6:.1f} MB)")

    ordered = sorted(blobs.values(), key=lambda b: -b.size)  # big ones first: the pool drains evenly
    _parallel(jobs, push, ordered)
    _parallel(jobs, lambda m: client.push_manifest(repository, m[0], m[1], m[2]), manifests)
    result.update({tag: "pushed" for tag, _ in todo})
    return result


def select_platform(index: Index, platform: Platform, what: str) -> Descriptor:
    """The manifest of ``index`` for ``platform`` (os/architecture[/variant])."""
    candidates = [d for d in index.manifests if d.media_type in MANIFEST_TYPES and d.platform is not None and
                  d.platform.os == platform.os and d.platform.architecture == platform.architecture and
                  (platform.variant is None or d.platform.variant == platform.variant)]
    if not candidates:
        offered = ", ".join(sorted(str(d.platform) for d in index.manifests if d.platform)) or "none"
        raise RegistryError(f"{what}: no image for {platform} (the index offers {offered})",
                            "set [image] architecture to one the image offers, or pick another image")
    return candidates[0]


def resolve_image(client: Client, repository: str, reference: str, platform: Platform) -> Descriptor:
    """The digest of the image manifest a tag (or digest) means for ``platform``: an index is resolved."""
    data, media_type, digest = client.fetch_manifest(repository, reference)
    what = f"{client.registry}/{repository}:{reference}"
    if media_type in INDEX_TYPES:
        return select_platform(Index.parse(data, what), platform, what)
    if media_type not in MANIFEST_TYPES:
        raise RegistryError(f"{what}: '{media_type}' is neither an image manifest nor an index")
    return Descriptor(media_type, digest, len(data))


@dataclass(frozen=True)
class Remote:
    """A manifest found in a registry, ready to fetch: its bytes, parsed form and the bytes still missing."""

    descriptor: Descriptor
    data: bytes
    manifest: Manifest


def find_manifests(client: Client, repository: str, references: Sequence[str], *,
                   jobs: int = DEFAULT_JOBS) -> dict[str, Remote | None]:
    """Fetch (not store) the manifests of ``references`` that exist; None for those that do not."""

    def one(reference: str) -> Remote | None:
        if client.resolve(repository, reference) is None:
            return None
        data, media_type, digest = client.fetch_manifest(repository, reference)
        if media_type not in MANIFEST_TYPES:
            raise RegistryError(f"{client.registry}/{repository}:{reference} is not an image manifest "
                                f"({media_type})", code="MANIFEST_INVALID")
        manifest = Manifest.parse(data, f"{client.registry}/{repository}:{reference}")
        return Remote(Descriptor(media_type, digest, len(data)), data, manifest)

    return dict(zip(references, _parallel(jobs, one, list(references))))


def missing_bytes(store: Store, remotes: Iterable[Remote]) -> int:
    seen: dict[Digest, int] = {}
    for remote in remotes:
        for blob in (remote.manifest.config, *remote.manifest.layers):
            if not store.has(blob.digest):
                seen[blob.digest] = blob.size
    return sum(seen.values())


def fetch_manifests(client: Client, store: Store, repository: str, remotes: Mapping[str, Remote], *,
                    jobs: int = DEFAULT_JOBS, tag: bool = True,
                    output: Callable[[str], None] = lambda line: None) -> dict[str, Descriptor]:
    """Fetch the blobs of each remote manifest into the store (verified), store the manifest, and (``tag``) tag it
    under the same name. Holds a store lease, so gc cannot take the blobs before they are tagged."""
    locations = _Locations(store, client.registry)
    blobs: dict[Digest, Descriptor] = {}
    for remote in remotes.values():
        for blob in (remote.manifest.config, *remote.manifest.layers):
            blobs.setdefault(blob.digest, blob)

    def fetch(blob: Descriptor) -> None:
        how = client.fetch_blob(repository, blob, store)
        locations.add(blob.digest, repository)
        if how == "fetched" and blob.size > _PIECE:
            output(f"fetched blob {blob.digest.short} ({blob.size / 1e6:.1f} MB)")

    result = {}
    with store.lease():
        _parallel(jobs, fetch, sorted(blobs.values(), key=lambda b: -b.size))
        for name, remote in remotes.items():
            stored = store.put(remote.data, remote.descriptor.media_type)
            if tag:
                store.tag(name, stored)
            result[name] = stored
    return result


def fetch_image(client: Client, store: Store, repository: str, digest: Digest, *,
                jobs: int = DEFAULT_JOBS) -> Manifest:
    """An image manifest by digest with its config and layers into the store (not tagged)."""
    data, media_type, actual = client.fetch_manifest(repository, str(digest))
    what = f"{client.registry}/{repository}@{digest}"
    if media_type not in MANIFEST_TYPES:
        raise RegistryError(f"{what} is not an image manifest ({media_type})", code="MANIFEST_INVALID")
    manifest = Manifest.parse(data, what)
    fetch_manifests(client, store, repository, {str(digest): Remote(Descriptor(media_type, actual, len(data)), data,
                                                                    manifest)}, jobs=jobs, tag=False)
    return manifest
