"""Downloads with Range resume into the store's locked partial files: registry blobs, and the inputs of layers.

A download writes through ``Store.writer(expected=…, resumable=True)``: what an earlier try (or run) left in the
blob's partial file is kept, and each try asks only for the rest (``Range: bytes=N-``). A 206 must start where
asked (its Content-Range is checked); a server that ignores Range makes the download start over cleanly. A body
cut short is a :class:`~ocibuild.net.retry.RetryableFailure` that ``progressed`` when it brought bytes, so a slow,
flaky link still ends (one cut for coming slower than the minimum rate did not progress: a dripping server runs out
of tries). Nothing unverified is kept: the store checks the digest (and size) before it commits. A blob is never
read past its descriptor's size, and one whose size (else the size the server announces) cannot fit in the free
space of the store's file system is refused before its body is read.

Inputs (:func:`fetch_file`: the archives of ``archive`` layers, the ``{url, sha256}`` inputs of run layers) are
blobs of the store on the way in, then hard-linked into its download cache ``downloads/<sha256 hex>``, where export
and the builders find them (the blob itself, which no tag reaches, goes at the next gc). :func:`fetch_bytes` reads a
small document (a suite's InRelease file). Both go through the registry client's HTTP stack: the same proxies,
TLS settings and retry loop.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Protocol
from urllib.parse import unquote, urlsplit

from ..errors import DigestMismatch, FetchError, OcibuildError, StoreError
from ..files import link_or_copy, open_regular
from ..oci import Digest
from ..store import Store
from .retry import RETRY_STATUS, Retrier, RetryableFailure, parse_retry_after
from .session import CAFileError, ProxyError, RedirectRefused, Session, one_line, printable_url

if TYPE_CHECKING:
    from .http import Response

log = logging.getLogger(__name__)

PIECE = 1 << 20  # read/write granularity of downloads
_NETWORK_HINT = "check the URL and the network; re-running resumes the download"

Get = Callable[[Mapping[str, str]], "Response"]  # one GET of the content with these headers: a 200 or 206
Failure = Callable[[str], OcibuildError]  # the error to raise when a download stalls, from its message
Progress = Callable[[str], None]
Room = Callable[[int], None]  # raises when this many more bytes cannot be stored


class Sink(Protocol):
    """Where a download goes: a :class:`~ocibuild.store.BlobWriter`."""

    @property
    def size(self) -> int: ...

    def write(self, data: memoryview, /) -> int: ...

    def restart(self) -> None: ...


class Counts(Protocol):
    """Transfer statistics: ``add(downloaded=…, retransferred=…)``."""

    def add(self, **counts: int) -> None: ...


class _NoCounts:
    def add(self, **counts: int) -> None:
        pass


def into_store(store: Store, digest: Digest, size: int | None, get: Get, *, what: str, retrier: Retrier,
               error: Failure, counts: Counts | None = None) -> None:
    """Download the blob ``digest`` (``size`` bytes, when known) into ``store``, resuming what an earlier run
    left. DigestMismatch when the content is not that blob (nothing is stored; the partial file is dropped)."""
    with store.writer(expected=digest, size=size, resumable=True) as writer:
        resume_into(writer, get, size=size, what=what, retrier=retrier, error=error, counts=counts,
                    room=lambda needed: _check_room(store, needed, what))


def resume_into(sink: Sink, get: Get, *, size: int | None, what: str, retrier: Retrier, error: Failure,
                room: Room, counts: Counts | None = None) -> None:
    """Fill ``sink`` (which may hold a first part already) with the rest of the content, never past ``size``,
    trying again from where each try stopped; ``error(message)`` is raised when tries without progress run out.
    ``room(n)``, called before the body is read when the bytes still to come are known, raises when they cannot
    be stored."""
    view = memoryview(bytearray(PIECE))
    tally = counts or _NoCounts()
    retrier.run(lambda: _one_try(sink, get, size, what, error, tally, view, room),
                resume=lambda failure: log.info("%s; resuming", failure))


def _check_room(store: Store, needed: int, what: str) -> None:
    """StoreError when ``needed`` more bytes cannot fit in the free space of the store's file system."""
    try:
        stats = os.statvfs(store.root)
    except OSError:
        return  # nothing to measure: the writes will tell
    free = stats.f_bavail * stats.f_frsize
    if needed > free:
        raise StoreError(f"{what}: {needed:,} bytes to download, but the file system of {store.root} has only "
                         f"{free:,} bytes free; refused before downloading them",
                         "free space there (`ocibuild gc` removes what no tag reaches), or use a store on a larger "
                         "file system (--store)")


def _one_try(sink: Sink, get: Get, size: int | None, what: str, error: Failure, counts: Counts,
             view: memoryview, room: Room) -> None:
    offset = before = sink.size
    expected = size
    problem: str | None = None
    slow = False
    headers = {"Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    with get(headers) as response:
        ask_again = False
        if offset and not (response.status_code == 206 and
                           _range_starts(response.headers.get("Content-Range"), offset, size)):
            log.info("%s: the server ignored Range; starting over", what)
            counts.add(retransferred=offset)
            sink.restart()
            ask_again = response.status_code != 200  # some other range: ask for the whole content
        elif offset:
            log.info("%s: resuming at byte %d", what, offset)
        if not ask_again:
            expected = size if size is not None else _announced_size(response, offset)
            before = sink.size
            if expected is not None:
                room(expected - before)
            problem, slow = _copy(response, sink, view, size, expected, counts)
    if ask_again:
        return _one_try(sink, get, size, what, error, counts, view, room)
    if problem is not None:
        total = "?" if expected is None else str(expected)
        raise RetryableFailure(error(f"{what}: {problem} ({sink.size} of {total} bytes); the bytes received are kept"),
                               progressed=sink.size > before and not slow)


def _copy(response: Response, sink: Sink, view: memoryview, size: int | None, expected: int | None,
          counts: Counts) -> tuple[str | None, bool]:
    """The body into the sink, never past ``size`` (what follows is left unread), counted as it arrives (a live
    display shows it): what went wrong or None, and whether it was the minimum rate."""
    from .http import TooSlow

    try:
        while (want := len(view) if size is None else min(len(view), size - sink.size)) > 0 and \
                (n := response.readinto(view[:want])):
            sink.write(view[:n])
            counts.add(downloaded=n)
    except OSError as err:
        return one_line(err), isinstance(err, TooSlow)
    return (None if expected is None or sink.size >= expected else "the body ended early"), False


def _range_starts(header: str | None, offset: int, size: int | None) -> bool:
    match = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", (header or "").strip())
    return match is not None and int(match.group(1)) == offset and (size is None or match.group(3) in (str(size), "*"))


def _announced_size(response: Response, offset: int) -> int | None:
    """The whole content's size as the response tells it (Content-Range's total, else offset + Content-Length)."""
    match = re.fullmatch(r"bytes \d+-\d+/(\d+)", (response.headers.get("Content-Range") or "").strip())
    if response.status_code == 206 and match:
        return int(match.group(1))
    length = _content_length(response)
    return None if length is None else (offset if response.status_code == 206 else 0) + length


def _content_length(response: Response) -> int | None:
    length = (response.headers.get("Content-Length") or "").strip()
    return int(length) if re.fullmatch(r"[0-9]{1,18}", length) else None


# ---- inputs: files by URL and sha256, and small documents -----------------------------------------------------------


def fetch_file(url: str, digest: Digest, store: Store, *, offline: bool = False, progress: Progress | None = None,
               what: str, retrier: Retrier | None = None) -> Path:
    """The file at ``url`` with content ``digest``, from the store's download cache or downloaded into it (resumed
    when a previous download was cut, verified before it is used). Local paths and file URLs are verified in
    place."""
    final = store.private_dir("downloads") / digest.hex
    if final.exists():
        return final
    if url.startswith("file://") or "://" not in url:
        return _verified_local(url, digest, what)
    if offline:
        raise FetchError(f"{what}: {url} is not in the download cache and --offline forbids fetching it",
                         "run once with network, or import an export made on a connected machine")
    retrier = retrier or Retrier()

    def get(headers: Mapping[str, str]) -> Response:
        if progress is not None:
            progress(f"downloading {url}" + (f" (resuming at {headers['Range'][6:-1]} bytes)"
                                             if "Range" in headers else ""))
        return _get(session, url, headers, what, _NETWORK_HINT)

    with _session(retrier) as session, store.lease():  # the lease: gc keeps the blob until it is linked
        try:
            into_store(store, digest, None, get, what=f"{what}: downloading {url}", retrier=retrier,
                       error=lambda message: FetchError(message, _NETWORK_HINT))
        except DigestMismatch as err:
            raise FetchError(f"{what}: {url} is not the file the recipe's sha256 names: {err}",
                             "fix 'sha256' in the layer.toml, or check that the URL serves the file you meant") from None
        _link(store, digest, final)
    return final


def fetch_bytes(url: str, *, what: str, limit: int = 64 << 20, retrier: Retrier | None = None) -> bytes:
    """The body at ``url`` (a small file: a suite's InRelease), or FetchError."""
    retrier = retrier or Retrier()
    hint = "check the mirror URL and the network"

    def attempt() -> bytes:
        with _get(session, url, {}, what, hint) as response:
            try:
                data = response.read(limit)
            except OSError as err:
                raise RetryableFailure(FetchError(f"{what}: cannot fetch {url}: {one_line(err)}", hint)) from None
            length = _content_length(response)
        if length is not None and len(data) < min(length, limit):
            raise RetryableFailure(FetchError(f"{what}: cannot fetch {url}: the body ended early", hint))
        return data

    with _session(retrier) as session:
        return retrier.run(attempt)


@contextmanager
def _session(retrier: Retrier) -> Iterator[Session]:
    with Session(policy=retrier.policy) as session:
        yield session


def _get(session: Session, url: str, headers: Mapping[str, str], what: str, hint: str) -> Response:
    """One GET (redirects followed): a 200 or 206 response, RetryableFailure, or FetchError."""
    from .http import InvalidRequest, TLSError

    try:
        _, response = session.send("GET", url, lambda _: headers)
    except InvalidRequest as err:  # nothing was sent, and sending it again would not help
        raise FetchError(f"{what}: {printable_url(url)}: {one_line(err)}", "check the URL for stray characters") from None
    except TLSError as err:
        if err.certificate:
            raise FetchError(f"{what}: TLS connection for {printable_url(url)} failed: {one_line(err)}",
                             "give its CA in ~/.config/containers/certs.d/HOST/ca.crt or $SSL_CERT_FILE") from None
        raise RetryableFailure(FetchError(f"{what}: cannot fetch {url}: {one_line(err)}", hint)) from None
    except OSError as err:
        raise RetryableFailure(FetchError(f"{what}: cannot fetch {url}: {one_line(err)}", hint)) from None
    except CAFileError as err:
        raise FetchError(f"{what}: {err}", "fix or remove that file (a PEM certificate)") from None
    except ProxyError as err:
        raise FetchError(f"{what}: {err}", "set $https_proxy to an http://HOST:PORT proxy, or list the host in "
                         "$no_proxy") from None
    except RedirectRefused as err:
        raise FetchError(f"{what}: {printable_url(url)}: {err}", "check the URL") from None
    status = response.status_code
    if status in (200, 206):
        return response
    delay = parse_retry_after(response.headers.get("Retry-After"))
    response.close()
    if status in RETRY_STATUS:
        raise RetryableFailure(FetchError(f"{what}: cannot fetch {url}: HTTP {status}", hint), delay=delay)
    raise FetchError(f"{what}: {url}: HTTP {status}", "check the URL")


def _verified_local(url: str, digest: Digest, what: str) -> Path:
    path = Path(unquote(urlsplit(url).path)) if url.startswith("file://") else Path(url)
    if not path.is_file():
        raise FetchError(f"{what}: {path} not found", "fix 'url' (relative paths are from the layer folder)")
    try:
        with open(open_regular(path), "rb") as file:
            actual = hashlib.file_digest(file, digest.algorithm).hexdigest()
    except OSError as err:
        raise FetchError(f"{what}: {path}: cannot read: {err.strerror}", "check that the file is readable") from None
    if actual != digest.hex:
        raise FetchError(f"{what}: {path} has sha256 {actual}, the recipe says {digest.hex}",
                         "fix 'sha256' in the layer.toml if the file is the one you meant")
    return path


def _link(store: Store, digest: Digest, target: Path) -> None:
    """The blob ``digest`` into the download cache as ``target``: a hard link, else a copy (durable either way)."""
    try:
        link_or_copy(store.blob_path(digest), target)
    except OSError as err:
        raise StoreError(f"put download {digest} into {target.parent}: {err.strerror or err}",
                         "check the permissions and free space of the store") from err
