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

Its modules, each importing only those above it:

- :mod:`.transport`: one registry's HTTP side (scheme, auth, retries, the error of a response) and the
  :class:`TransferStats` it counts into;
- :mod:`.upload`: a blob going up, in one ``PUT`` or in ``PATCH`` chunks that resume;
- :mod:`.client`: :class:`Client`, the distribution API calls on a :class:`.transport.Transport`, and
  :class:`Registries`, which hands out one client per registry;
- :mod:`.images`: the operations on whole images, on any :class:`Distribution`.

The names below are the package's public face: import them from here (``registry.Client``).
"""

from .client import Client, Registries, parse_repository
from .images import (DEFAULT_JOBS, Distribution, FetchedManifest, fetch_image, fetch_manifests, find_manifests,
                     missing_bytes, push_manifests, resolve_image, select_platform)
from .transport import TransferStats

__all__ = ["DEFAULT_JOBS", "Client", "Distribution", "FetchedManifest", "Registries", "TransferStats", "fetch_image",
           "fetch_manifests", "find_manifests", "missing_bytes", "parse_repository", "push_manifests", "resolve_image",
           "select_platform"]
