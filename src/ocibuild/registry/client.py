"""The distribution API: push and fetch blobs and manifests, cross-repository mounts, whole images.

ocibuild speaks the OCI distribution spec itself, through :mod:`ocibuild.net` (its own HTTP/1.1, auth, the one
retry loop, resumable downloads). What moves:

- blobs stream between the store and the socket in 1 MiB pieces, so memory stays flat whatever their size;
  a download goes through the store's resumable writer (:func:`ocibuild.net.download.into_store`) with the expected
  digest and size, so nothing unverified is stored, and an interrupted one resumes with ``Range``, within a run
  and across runs;
- an upload is skipped when ``HEAD`` finds the blob, mounted from another repository of the same registry when
  ocibuild has seen the blob there (``POST …/blobs/uploads/?mount=&from=``), sent in one ``PUT`` when small and
  in ``PATCH`` chunks otherwise, resuming from the offset the registry reports after a failure;
- manifests are pushed as the exact bytes in the store (their digest is ours) and verified when fetched.

Requests are retried with exponential backoff and full jitter on connection errors, timeouts, 408, 429 (its
Retry-After is honoured) and 5xx. Auth (:mod:`ocibuild.net.auth`): anonymous, basic, and the bearer-token flow
with one token per set of scopes; credentials only ever go to the registry's own host (redirects elsewhere, e.g.
to blob storage, carry no Authorization header, and are never followed from https to http). TLS is verified;
plain HTTP is used only for loopback hosts and hosts listed in ``[registry] insecure``, and only when the server
does not speak TLS at all (a certificate error is an error, never a reason to downgrade).

The functions on whole images (:func:`push_manifests`, :func:`find_manifests`, :func:`fetch_manifests`,
:func:`fetch_image`, :func:`resolve_image`) take any :class:`Distribution`; :class:`Client` is the real one, and
tests plug in a fake. Errors::

    OSError (refused, reset, timeout, protocol errors)        retried, then RegistryError(retryable=True)
    net.http.TLSError (certificate refused)                   RegistryError(code TLS), never retried
    HTTP 408, 429, 5xx                                        retried, then RegistryError(status, code, retryable)
    HTTP 401, 403                                             RegistryError(status, code) with a login hint
    other HTTP errors                                         RegistryError(status, code from the error body)
    content not matching its digest or size                   retried once, then RegistryError(code DIGEST_INVALID)

No message, log line or stored file ever holds a password or token.

(Some 800 lines, past the ~500 of STYLE.md: the client, its uploads and the operations on whole images are the
one distribution API, in that order; the plumbing under them is in :mod:`ocibuild.net`.)
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol, TypeVar
from urllib.parse import urlencode, urljoin, urlsplit

from ..errors import DigestMismatch, FormatError, OcibuildError, RegistryError
from ..net import download
from ..net.auth import DOCKER_HUB, DOCKER_HUB_API, Authenticator, Credentials, find_credentials
from ..net.retry import RETRY_STATUS, Retrier, RetryableFailure, RetryPolicy, parse_retry_after
from ..net.session import (CAFileError, ProxyError, RedirectRefused, Session, is_loopback, one_line,
                           printable_url)
from ..oci import (
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
from ..store import Store
from ..threads import parallel_map

if TYPE_CHECKING:  # imported on first contact with a registry: see ocibuild.net.session
    from ..net.http import Response

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_JOBS = 4
_PIECE = 1 << 20  # read/write granularity of blob streams
_MONOLITHIC_MAX = 32 << 20  # blobs up to this size are uploaded in one PUT
_CHUNK = 128 << 20  # larger blobs go in PATCH chunks of this size (Client.chunk_size)
_MANIFEST_MAX = 4 << 20  # the distribution spec's limit for a manifest
_ACCEPT = ", ".join((OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST))
_RERUN = "re-run the same command: blobs already transferred are kept and the rest continues"


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


class Distribution(Protocol):
    """The distribution API of one registry, as the functions on whole images use it (:class:`Client`, or a
    fake in tests)."""

    @property
    def registry(self) -> str: ...

    def resolve(self, repository: str, reference: str) -> Descriptor | None: ...

    def fetch_manifest(self, repository: str, reference: str) -> tuple[bytes, str, Digest]: ...

    def push_manifest(self, repository: str, reference: str, data: bytes, media_type: str) -> Digest: ...

    def fetch_blob(self, repository: str, descriptor: Descriptor, store: Store) -> str: ...

    def push_blob(self, repository: str, descriptor: Descriptor, store: Store,
                  mount_from: Sequence[str] = ()) -> str: ...


# ---- the client ----------------------------------------------------------------------------------------------------


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


def _unreachable(what: str, method: str, url: str, err: OSError) -> RetryableFailure:
    message = f"{what + ': ' if what else ''}{method} {printable_url(url)}: {one_line(err)}"
    return RetryableFailure(RegistryError(message, _RERUN, retryable=True))


def _tls_error(registry: str, err: OSError, plain_http_allowed: bool) -> RegistryError:
    return RegistryError(
        f"TLS connection to {registry} failed: {one_line(err)}",
        "give its CA in ~/.config/containers/certs.d/HOST/ca.crt or $SSL_CERT_FILE"
        + ("" if plain_http_allowed else ", or list it in [registry] insecure to allow plain HTTP"),
        code="TLS")


class Client:
    """One registry (host[:port]); thread-safe, one keep-alive connection per thread and host. Use
    :meth:`Registries.client`."""

    def __init__(self, registry: str, *, insecure: bool = False, credentials: Credentials | None = None,
                 policy: RetryPolicy | None = None, stats: TransferStats | None = None,
                 env: Mapping[str, str] | None = None, sleep: Callable[[float], None] = time.sleep) -> None:
        self.registry = registry
        self.host = DOCKER_HUB_API if registry == DOCKER_HUB else registry
        self.plain_http_allowed = insecure or is_loopback(self.host)
        self.policy = policy or RetryPolicy()
        self.stats = stats or TransferStats()
        self.monolithic_max = _MONOLITHIC_MAX
        self.chunk_size = _CHUNK
        self.retrier = Retrier(self.policy, sleep, lambda: self.stats.add(retries=1))
        self._session = Session(env, connect_timeout=self.policy.connect_timeout,
                                read_timeout=self.policy.read_timeout)
        self._auth = Authenticator(registry, credentials, plain_http_allowed=self.plain_http_allowed,
                                   send=self._exchange, retrier=self.retrier)
        self._lock = threading.Lock()
        self._base: str | None = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close every thread's connections."""
        self._session.close()

    def __repr__(self) -> str:
        return f"Client({self.registry!r})"

    # -- one exchange, one try, one request

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
                self._auth.learn(response.headers.get("WWW-Authenticate", ""))
            elif response.status_code >= 400 and response.status_code not in RETRY_STATUS:
                raise _error_of(response, self.registry, f"{self.registry} is not a registry (GET /v2/)")

    def request(self, method: str, path: str, *, scopes: tuple[str, ...], what: str,
                headers: Mapping[str, str] | None = None, body: Callable[[], Any] | None = None,
                ok: Iterable[int] = (200,), retry: bool = True) -> Response:
        """One API request; ``path`` is relative to the registry (or an absolute URL it gave, e.g. an upload
        Location). Follows redirects, authenticates, and retries, unless ``retry`` is False: then a failure
        worth another try raises RetryableFailure for the caller's own loop. The caller closes the response."""
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
                return headers  # credentials never go to another host
            authorization = self._auth.header(scopes)
            return {**headers, "Authorization": authorization} if authorization else headers

        data = body() if body is not None else None
        url, response = self._call(what, method, url, lambda: self._session.send(method, url, authorized, data))
        status = response.status_code
        if status in accepted:
            return response
        if status == 401 and urlsplit(url)[:2] == origin and not answered:
            self._auth.learn(response.headers.get("WWW-Authenticate", ""))
            self._auth.forget(scopes)
            if self._auth.can_answer():
                response.close()
                return self._try(method, url, scopes, what, headers, body, accepted, answered=True)
        error = _error_of(response, self.registry, what)
        response.close()
        if status not in RETRY_STATUS:
            raise error
        delay = parse_retry_after(response.headers.get("Retry-After"))
        if delay is not None and delay > self.policy.max_retry_after:
            raise RegistryError(f"{error} (the registry asks to wait {delay:.0f} s)", _RERUN + " later",
                                status=status, code=error.code, retryable=True)
        raise RetryableFailure(error, delay=delay)

    # -- API

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
                raise RegistryError(f"{what}: {one_line(err)}", _RERUN, retryable=True) from None
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
        """Download a blob into the store, verified; "present" when it already was, else "fetched". A blob that
        arrives corrupt is fetched once more."""
        digest = descriptor.digest
        if store.has(digest):
            self.stats.add(blobs_present=1)
            return "present"
        what = f"fetch blob {digest.short} from {self.registry}/{repository}"

        def get(headers: Mapping[str, str]) -> Response:
            return self.request("GET", f"/v2/{repository}/blobs/{digest}", scopes=_scopes(repository, False),
                                headers=headers, ok=(200, 206), what=what)

        def attempt() -> None:
            try:
                download.into_store(store, digest, descriptor.size, get, what=what, retrier=self.retrier,
                                    error=lambda message: RegistryError(message, _RERUN, retryable=True),
                                    counts=self.stats)
            except DigestMismatch as err:
                self.stats.add(retransferred=descriptor.size)
                raise RetryableFailure(RegistryError(
                    f"blob {digest} from {self.registry}/{repository} is corrupt: {err}; nothing was stored",
                    "the registry's copy or a proxy on the way is damaged; " + _RERUN,
                    code="DIGEST_INVALID", retryable=True)) from None

        self.retrier.with_attempts(2).run(attempt, resume=lambda failure: log.warning("%s; fetching it again",
                                                                                      failure))
        self.stats.add(blobs_fetched=1)
        return "fetched"

    def push_blob(self, repository: str, descriptor: Descriptor, store: Store,
                  mount_from: Sequence[str] = ()) -> str:
        """Make a blob of the store present in the repository: "present", "mounted" or "pushed". Content the
        registry rejects is uploaded once more."""
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
        upload = _BlobUpload(self, repository, descriptor, file, what, location)

        def attempt() -> None:
            try:
                upload.run()
            except _Rejected:
                raise RetryableFailure(RegistryError(f"{what}: the registry rejected the uploaded content twice",
                                                     "check the store with `ocibuild verify`, then " + _RERUN,
                                                     code="DIGEST_INVALID")) from None

        with file:
            self.retrier.with_attempts(2).run(attempt)
        self.stats.add(blobs_pushed=1)
        return "pushed"


class _Rejected(Exception):
    """The registry refused the content of a finished upload (digest or size invalid): upload it again."""


class _BlobUpload:
    """One blob going up to a repository: in one PUT when small, else in PATCH chunks that resume, after a
    failure, from the offset the registry reports. :meth:`run` is one whole upload."""

    def __init__(self, client: Client, repository: str, descriptor: Descriptor, file: BinaryIO, what: str,
                 location: str | None) -> None:
        self.client = client
        self.repository = repository
        self.descriptor = descriptor
        self.file = file
        self.what = what
        self.location = location  # where the first upload goes (a mount the registry answered with an upload)
        self.scopes = _scopes(repository, True)
        self.url = ""  # of the upload in progress
        self.offset = 0  # bytes of it the registry holds
        self.sent = 0  # bytes of the last request body read before it failed

    def run(self) -> None:
        """Upload the blob; _Rejected when the registry refuses what arrived."""
        self.url, self.location = self._absolute(self.location or self._start()), None
        if self.descriptor.size <= self.client.monolithic_max:
            self.client.retrier.run(self._put, resume=lambda failure: self._restart())
            return
        self.offset = 0
        self.client.retrier.run(self._patch, resume=self._resume)
        with self.client.request("PUT", _with_digest(self.url, self.descriptor.digest), scopes=self.scopes,
                                 headers={"Content-Length": "0"}, ok=(201, 400), what=self.what) as response:
            if response.status_code == 400:
                raise self._rejected(response)

    def _absolute(self, location: str) -> str:
        return urljoin(self.client.base + "/", location)

    def _start(self) -> str:
        with self.client.request("POST", f"/v2/{self.repository}/blobs/uploads/", scopes=self.scopes,
                                 headers={"Content-Length": "0"}, ok=(202,), what=self.what) as response:
            location = response.headers.get("Location")
        if not location:
            raise RegistryError(f"{self.what}: the registry gave no upload location", status=202)
        return location

    def _restart(self) -> None:
        self.url = self._absolute(self._start())

    def _put(self) -> None:
        """One try of the whole blob in the PUT that completes the upload."""
        size = self.descriptor.size
        body = _FileSlice(self.file, 0, size)
        try:
            response = self.client.request("PUT", _with_digest(self.url, self.descriptor.digest), scopes=self.scopes,
                                           headers={**_OCTETS, "Content-Length": str(size)}, body=lambda: body,
                                           ok=(201, 400), what=self.what, retry=False)
        except RetryableFailure:
            self.client.stats.add(retransferred=body.sent)
            raise
        with response:
            self.client.stats.add(uploaded=size)
            if response.status_code == 400:
                raise self._rejected(response)

    def _patch(self) -> None:
        """One try at sending the rest in chunks, from the offset the registry holds."""
        start, size = self.offset, self.descriptor.size
        while self.offset < size:
            end = min(self.offset + self.client.chunk_size, size)
            body = _FileSlice(self.file, self.offset, end)
            headers = {**_OCTETS, "Content-Range": f"{self.offset}-{end - 1}", "Content-Length": str(end - self.offset)}
            try:
                response = self.client.request("PATCH", self.url, scopes=self.scopes, headers=headers,
                                               body=lambda: body, ok=(202,), what=self.what, retry=False)
            except RetryableFailure as failure:
                self.sent = body.sent
                raise RetryableFailure(_noted(failure.error, f"({self.offset} of {size} bytes accepted)"),
                                       delay=failure.delay, progressed=self.offset > start) from None
            with response:
                self.url = urljoin(self.url, response.headers.get("Location") or self.url)
                accepted = _range_end(response.headers.get("Range"))
            offset = end if accepted is None else accepted
            self.client.stats.add(uploaded=offset - self.offset)
            self.offset = offset

    def _resume(self, failure: RetryableFailure) -> None:
        """After a failed chunk: where the upload stands (one that vanished starts again at 0)."""
        with self.client.request("GET", self.url, scopes=self.scopes, ok=(204, 404), what=self.what) as response:
            found = response.status_code == 204
            location = urljoin(self.url, response.headers.get("Location") or self.url)
            reported = _range_end(response.headers.get("Range")) or 0
        if not found:
            location, reported = self._absolute(self._start()), 0
        self.url = location
        self.client.stats.add(uploaded=max(0, reported - self.offset),
                              retransferred=max(0, self.sent - (reported - self.offset)))
        log.info("%s; resuming at byte %d (the registry has it)", failure, reported)
        self.offset = reported

    def _rejected(self, response: Response) -> Exception:
        """What to raise for a 400 to the completing PUT: _Rejected for content the registry refused."""
        error = _error_of(response, self.client.registry, self.what)
        if error.code not in ("DIGEST_INVALID", "SIZE_INVALID", "BLOB_UPLOAD_INVALID"):
            return error
        log.warning("%s; uploading it again", error)
        self.client.stats.add(retransferred=self.descriptor.size)
        return _Rejected()


_OCTETS = {"Content-Type": "application/octet-stream"}


def _error_of(response: Response, registry: str, what: str) -> RegistryError:
    """The RegistryError for an error response: status, and the code and message of the error body."""
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
        return RegistryError(text, f"run `ocibuild login {registry}` with an account allowed to do this "
                             "(credentials are read from ~/.docker/config.json, $REGISTRY_AUTH_FILE, "
                             "containers' auth.json and docker-credential helpers)",
                             status=status, code=code or "UNAUTHORIZED")
    retryable = status in RETRY_STATUS
    return RegistryError(text, _RERUN if retryable else None, status=status, code=code, retryable=retryable)


def _noted(error: OcibuildError, note: str) -> RegistryError:
    """``error`` with a note appended to its message, as a retryable RegistryError."""
    status, code = (error.status, error.code) if isinstance(error, RegistryError) else (None, None)
    return RegistryError(f"{error} {note}", _RERUN, status=status, code=code, retryable=True)


def _scopes(repository: str, push: bool) -> tuple[str, ...]:
    return (f"repository:{repository}:{'pull,push' if push else 'pull'}",)


def _with_digest(url: str, digest: Digest) -> str:
    return url + ("&" if "?" in url else "?") + urlencode({"digest": str(digest)})


def _range_end(header: str | None) -> int | None:
    """The offset after a registry's ``Range: 0-N`` (N+1), or None."""
    match = re.fullmatch(r"(?:bytes=)?0-(\d+)", (header or "").strip())
    return int(match.group(1)) + 1 if match else None


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


def push_manifests(client: Distribution, store: Store, repository: str, tagged: Sequence[tuple[str, Descriptor]], *,
                   jobs: int = DEFAULT_JOBS, output: Callable[[str], None] = lambda line: None) -> dict[str, str]:
    """Push each (tag, manifest in the store) with its config and layers: tag → "present" (the registry already
    has that manifest under that tag: nothing moves) or "pushed"."""
    locations = _Locations(store, client.registry)
    remote = parallel_map(lambda item: client.resolve(repository, item[0]), list(tagged), jobs=jobs,
                          name="ocibuild-transfer")
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
    parallel_map(push, ordered, jobs=jobs, name="ocibuild-transfer")
    parallel_map(lambda m: client.push_manifest(repository, m[0], m[1], m[2]), manifests, jobs=jobs,
                 name="ocibuild-transfer")
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


def resolve_image(client: Distribution, repository: str, reference: str, platform: Platform) -> Descriptor:
    """The digest of the image manifest a tag (or digest) means for ``platform``: an index is resolved."""
    data, media_type, digest = client.fetch_manifest(repository, reference)
    what = f"{client.registry}/{repository}:{reference}"
    if media_type in INDEX_TYPES:
        return select_platform(Index.parse(data, what), platform, what)
    if media_type not in MANIFEST_TYPES:
        raise RegistryError(f"{what}: '{media_type}' is neither an image manifest nor an index")
    return Descriptor(media_type, digest, len(data))


@dataclass(frozen=True)
class FetchedManifest:
    """An image manifest fetched from a registry (not stored yet): its descriptor, exact bytes and parsed form."""

    descriptor: Descriptor
    data: bytes
    manifest: Manifest


def find_manifests(client: Distribution, repository: str, references: Sequence[str], *,
                   jobs: int = DEFAULT_JOBS) -> dict[str, FetchedManifest | None]:
    """Fetch (not store) the manifests of ``references`` that exist; None for those that do not."""

    def one(reference: str) -> FetchedManifest | None:
        if client.resolve(repository, reference) is None:
            return None
        data, media_type, digest = client.fetch_manifest(repository, reference)
        if media_type not in MANIFEST_TYPES:
            raise RegistryError(f"{client.registry}/{repository}:{reference} is not an image manifest "
                                f"({media_type})", code="MANIFEST_INVALID")
        manifest = Manifest.parse(data, f"{client.registry}/{repository}:{reference}")
        return FetchedManifest(Descriptor(media_type, digest, len(data)), data, manifest)

    return dict(zip(references, parallel_map(one, list(references), jobs=jobs, name="ocibuild-transfer")))


def missing_bytes(store: Store, fetched: Iterable[FetchedManifest]) -> int:
    """The bytes of the blobs of these manifests that the store lacks."""
    seen: dict[Digest, int] = {}
    for entry in fetched:
        for blob in (entry.manifest.config, *entry.manifest.layers):
            if not store.has(blob.digest):
                seen[blob.digest] = blob.size
    return sum(seen.values())


def fetch_manifests(client: Distribution, store: Store, repository: str, fetched: Mapping[str, FetchedManifest], *,
                    jobs: int = DEFAULT_JOBS, tag: bool = True,
                    output: Callable[[str], None] = lambda line: None) -> dict[str, Descriptor]:
    """Fetch the blobs of each fetched manifest into the store (verified), store the manifest, and (``tag``) tag it
    under the same name. Holds a store lease, so gc cannot take the blobs before they are tagged."""
    locations = _Locations(store, client.registry)
    blobs: dict[Digest, Descriptor] = {}
    for entry in fetched.values():
        for blob in (entry.manifest.config, *entry.manifest.layers):
            blobs.setdefault(blob.digest, blob)

    def fetch(blob: Descriptor) -> None:
        how = client.fetch_blob(repository, blob, store)
        locations.add(blob.digest, repository)
        if how == "fetched" and blob.size > _PIECE:
            output(f"fetched blob {blob.digest.short} ({blob.size / 1e6:.1f} MB)")

    result = {}
    with store.lease():
        parallel_map(fetch, sorted(blobs.values(), key=lambda b: -b.size), jobs=jobs, name="ocibuild-transfer")
        for name, entry in fetched.items():
            stored = store.put(entry.data, entry.descriptor.media_type)
            if tag:
                store.tag(name, stored)
            result[name] = stored
    return result


def fetch_image(client: Distribution, store: Store, repository: str, digest: Digest, *,
                jobs: int = DEFAULT_JOBS) -> Manifest:
    """An image manifest by digest with its config and layers into the store (not tagged)."""
    data, media_type, actual = client.fetch_manifest(repository, str(digest))
    what = f"{client.registry}/{repository}@{digest}"
    if media_type not in MANIFEST_TYPES:
        raise RegistryError(f"{what} is not an image manifest ({media_type})", code="MANIFEST_INVALID")
    manifest = Manifest.parse(data, what)
    fetched = FetchedManifest(Descriptor(media_type, actual, len(data)), data, manifest)
    fetch_manifests(client, store, repository, {str(digest): fetched}, jobs=jobs, tag=False)
    return manifest
