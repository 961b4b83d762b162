"""The distribution API calls on one registry: blobs (``HEAD``, fetch, push with cross-repository mounts) and
manifests (resolve, fetch, push), on :class:`.transport.Transport`; :class:`Registries` hands out one
:class:`Client` per registry.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from ..errors import DigestMismatch, FormatError, RegistryError
from ..net import download
from ..net.auth import Credentials, find_credentials
from ..net.retry import RetryableFailure, RetryPolicy
from ..net.session import one_line
from ..oci import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    INDEX_TYPES,
    MANIFEST_TYPES,
    OCI_INDEX,
    OCI_MANIFEST,
    Descriptor,
    Digest,
    Reference,
    parse_json,
)
from ..store import Store
from .transport import RERUN, TransferStats, Transport, scopes_of
from .upload import BlobUpload, Rejected

if TYPE_CHECKING:  # imported on first contact with a registry: see ocibuild.net.session
    from ..net.http import Response

log = logging.getLogger(__name__)

_MONOLITHIC_MAX = 32 << 20
_CHUNK = 128 << 20
_MANIFEST_MAX = 4 << 20  # the distribution spec's limit for a manifest
_TAGS_PAGE = 1000
_NEXT = re.compile(r'<([^>]+)>\s*;\s*rel="?next"?')
_ACCEPT = ", ".join((OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST))


class Client(Transport):
    """One registry (host[:port]): the distribution API calls, on :class:`.transport.Transport` (scheme, auth,
    retries). Thread-safe, one keep-alive connection per thread and host. Use :meth:`Registries.client`."""

    monolithic_max = _MONOLITHIC_MAX  # blobs up to this size are uploaded in one PUT (tests lower both)
    chunk_size = _CHUNK  # larger blobs go in PATCH chunks of this size

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client({self.registry!r})"

    def blob_exists(self, repository: str, digest: Digest, *, push: bool = False) -> bool:
        scopes = scopes_of(repository, push)
        with self.request("HEAD", f"/v2/{repository}/blobs/{digest}", scopes=scopes, ok=(200, 404),
                          what=f"check blob {digest.short} in {self.registry}/{repository}") as response:
            return response.status_code == 200

    def resolve(self, repository: str, reference: str) -> Descriptor | None:
        """HEAD of a manifest by tag or digest: its descriptor, or None when absent."""
        with self.request("HEAD", f"/v2/{repository}/manifests/{reference}", scopes=scopes_of(repository, False),
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
        with self.request("GET", f"/v2/{repository}/manifests/{reference}", scopes=scopes_of(repository, False),
                          headers={"Accept": _ACCEPT}, what=what) as response:
            try:
                data = response.read(_MANIFEST_MAX + 1)
            except OSError as err:
                raise RegistryError(f"{what}: {one_line(err)}", RERUN, retryable=True) from None
            media_type = response.headers.get("Content-Type", "").split(";")[0].strip()
            header_digest = response.headers.get("Docker-Content-Digest")
        if len(data) > _MANIFEST_MAX:
            raise RegistryError(f"{what}: larger than {_MANIFEST_MAX} bytes", code="MANIFEST_INVALID")
        if media_type not in MANIFEST_TYPES | INDEX_TYPES:
            try:
                value = parse_json(data, what, limit=_MANIFEST_MAX)
            except FormatError as err:
                raise RegistryError(str(err), code="MANIFEST_INVALID") from None
            declared = value.get("mediaType") if isinstance(value, dict) else None
            media_type = declared if isinstance(declared, str) and declared else OCI_MANIFEST
        digest = Digest.of(data)
        expected = Digest.parse(reference) if ":" in reference else (
            Digest.parse(header_digest) if header_digest and header_digest.startswith("sha256:") else None)
        if expected is not None and expected != digest:
            raise RegistryError(f"{what}: content hashes to {digest}, not {expected}",
                                "the registry or a proxy corrupted it; " + RERUN, code="DIGEST_INVALID",
                                retryable=True)
        return data, media_type, digest

    def list_tags(self, repository: str) -> list[str]:
        """Every tag of ``repository``, page after page (``Link: <…>; rel="next"``); [] when it does not exist."""
        tags: list[str] = []
        path = f"/v2/{repository}/tags/list?n={_TAGS_PAGE}"
        while path:
            what = f"list the tags of {self.registry}/{repository}"
            with self.request("GET", path, scopes=scopes_of(repository, False), ok=(200, 404), what=what) as response:
                if response.status_code == 404:
                    return tags
                try:
                    data = response.read(_MANIFEST_MAX + 1)
                except OSError as err:
                    raise RegistryError(f"{what}: {one_line(err)}", RERUN, retryable=True) from None
                link = response.headers.get("Link", "")
            try:
                value = parse_json(data, f"{what}: the answer", limit=_MANIFEST_MAX)
            except FormatError as err:
                raise RegistryError(str(err), code="UNSUPPORTED") from None
            page = (value.get("tags") or []) if isinstance(value, dict) else None
            if not isinstance(page, list) or not all(isinstance(tag, str) for tag in page):
                raise RegistryError(f"{what}: the answer is not a list of tags", code="UNSUPPORTED")
            tags += page
            match = _NEXT.search(link)
            path = match.group(1) if match and match.group(1).startswith(f"/v2/{repository}/tags/list") else ""
        return tags

    def push_manifest(self, repository: str, reference: str, data: bytes, media_type: str) -> Digest:
        """PUT our exact manifest bytes under a tag (or digest)."""
        digest = Digest.of(data)
        with self.request("PUT", f"/v2/{repository}/manifests/{reference}", scopes=scopes_of(repository, True),
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
            return self.request("GET", f"/v2/{repository}/blobs/{digest}", scopes=scopes_of(repository, False),
                                headers=headers, ok=(200, 206), what=what)

        def attempt() -> None:
            try:
                download.into_store(store, digest, descriptor.size, get, what=what, retrier=self.retrier,
                                    error=lambda message: RegistryError(message, RERUN, retryable=True),
                                    counts=self.stats)
            except DigestMismatch as err:
                self.stats.add(retransferred=descriptor.size)
                raise RetryableFailure(RegistryError(
                    f"blob {digest} from {self.registry}/{repository} is corrupt: {err}; nothing was stored",
                    "the registry's copy or a proxy on the way is damaged; " + RERUN,
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
        upload = BlobUpload(self, repository, descriptor, file, what, location, monolithic_max=self.monolithic_max,
                            chunk_size=self.chunk_size)

        def attempt() -> None:
            try:
                upload.run()
            except Rejected:
                raise RetryableFailure(RegistryError(f"{what}: the registry rejected the uploaded content twice",
                                                     "check the store with `ocibuild verify`, then " + RERUN,
                                                     code="DIGEST_INVALID")) from None

        with file:
            self.retrier.with_attempts(2).run(attempt)
        self.stats.add(blobs_pushed=1)
        return "pushed"


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

