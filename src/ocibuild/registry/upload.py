"""A blob going up to a repository: the upload state machine under :meth:`.client.Client.push_blob`.

A blob up to ``monolithic_max`` bytes goes in the one ``PUT`` that completes the upload; a larger one in
``PATCH`` chunks of ``chunk_size``, and after a failed chunk the upload resumes from the offset the registry
reports (``GET`` of the upload's location; one that vanished starts again). A completing ``PUT`` the registry
answers with 400 DIGEST_INVALID, SIZE_INVALID or BLOB_UPLOAD_INVALID raises :class:`Rejected`, for the client to
upload the blob once more.
"""

from __future__ import annotations

import logging
import os
import re
from typing import TYPE_CHECKING, BinaryIO
from urllib.parse import urlencode, urljoin

from ..errors import OcibuildError, RegistryError
from ..net.retry import RetryableFailure
from ..oci import Descriptor, Digest
from .transport import RERUN, Transport, error_of, scopes_of

if TYPE_CHECKING:  # imported on first contact with a registry: see ocibuild.net.session
    from ..net.http import Response

log = logging.getLogger(__name__)


class Rejected(Exception):
    """The registry refused the content of a finished upload (digest or size invalid): upload it again."""


class BlobUpload:
    """One blob going up to a repository: in one PUT when small, else in PATCH chunks that resume, after a
    failure, from the offset the registry reports. :meth:`run` is one whole upload."""

    def __init__(self, client: Transport, repository: str, descriptor: Descriptor, file: BinaryIO, what: str,
                 location: str | None, *, monolithic_max: int, chunk_size: int) -> None:
        self.client = client
        self.repository = repository
        self.descriptor = descriptor
        self.file = file
        self.what = what
        self.location = location  # where the first upload goes (a mount the registry answered with an upload)
        self.monolithic_max = monolithic_max  # up to this size, in one PUT
        self.chunk_size = chunk_size  # else in PATCH chunks of this size
        self.scopes = scopes_of(repository, True)
        self.url = ""  # of the upload in progress
        self.offset = 0  # bytes of it the registry holds
        self.sent = 0  # bytes of the last request body read before it failed

    def run(self) -> None:
        """Upload the blob; Rejected when the registry refuses what arrived."""
        self.url, self.location = self._absolute(self.location or self._start()), None
        if self.descriptor.size <= self.monolithic_max:
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
        bodies = _Bodies(self.file, 0, size)
        try:
            response = self.client.request("PUT", _with_digest(self.url, self.descriptor.digest), scopes=self.scopes,
                                           headers={**_OCTETS, "Content-Length": str(size)}, body=bodies.open,
                                           ok=(201, 400), what=self.what, retry=False)
        except RetryableFailure:
            self.client.stats.add(retransferred=bodies.sent)
            raise
        with response:
            self.client.stats.add(uploaded=size)
            if response.status_code == 400:
                raise self._rejected(response)

    def _patch(self) -> None:
        """One try at sending the rest in chunks, from the offset the registry holds."""
        start, size = self.offset, self.descriptor.size
        while self.offset < size:
            end = min(self.offset + self.chunk_size, size)
            bodies = _Bodies(self.file, self.offset, end)
            headers = {**_OCTETS, "Content-Range": f"{self.offset}-{end - 1}", "Content-Length": str(end - self.offset)}
            try:
                response = self.client.request("PATCH", self.url, scopes=self.scopes, headers=headers,
                                               body=bodies.open, ok=(202,), what=self.what, retry=False)
            except RetryableFailure as failure:
                self.sent = bodies.sent
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
        """What to raise for a 400 to the completing PUT: Rejected for content the registry refused."""
        error = error_of(response, self.client.registry, self.what)
        if error.code not in ("DIGEST_INVALID", "SIZE_INVALID", "BLOB_UPLOAD_INVALID"):
            return error
        log.warning("%s; uploading it again", error)
        self.client.stats.add(retransferred=self.descriptor.size)
        return Rejected()


_OCTETS = {"Content-Type": "application/octet-stream"}


def _noted(error: OcibuildError, note: str) -> RegistryError:
    """``error`` with a note appended to its message, as a retryable RegistryError."""
    status, code = (error.status, error.code) if isinstance(error, RegistryError) else (None, None)
    return RegistryError(f"{error} {note}", RERUN, status=status, code=code, retryable=True)


def _with_digest(url: str, digest: Digest) -> str:
    return url + ("&" if "?" in url else "?") + urlencode({"digest": str(digest)})


def _range_end(header: str | None) -> int | None:
    """The offset after a registry's ``Range: 0-N`` (N+1), or None."""
    match = re.fullmatch(r"(?:bytes=)?0-(\d+)", (header or "").strip())
    return int(match.group(1)) + 1 if match else None


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


class _Bodies:
    """The request body of one PUT or PATCH, for every try of it: :meth:`open` (the transport calls it once per
    try, e.g. again after answering a 401) starts a fresh :class:`_FileSlice` at ``start``, never handing on one
    a failed try has already read. ``sent`` is what the last try read."""

    def __init__(self, file: BinaryIO, start: int, end: int) -> None:
        self._file = file
        self._start = start
        self._end = end
        self._last: _FileSlice | None = None

    def open(self) -> _FileSlice:
        self._last = _FileSlice(self._file, self._start, self._end)
        return self._last

    @property
    def sent(self) -> int:
        return self._last.sent if self._last is not None else 0
