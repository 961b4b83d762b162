"""Downloads with Range resume into the store's locked partial files.

A download writes through ``Store.writer(expected=…, resumable=True)``: what an earlier try (or run) left in the
blob's partial file is kept, and each try asks only for the rest (``Range: bytes=N-``). A 206 must start where
asked (its Content-Range is checked); a server that ignores Range makes the download start over cleanly. A body
cut short is a :class:`~ocibuild.net.retry.RetryableFailure` that ``progressed`` when it brought bytes, so a slow,
flaky link still ends. Nothing unverified is kept: the store checks the digest (and size) before it commits.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Protocol

from ..errors import OcibuildError
from ..oci import Digest
from ..store import Store
from .retry import Retrier, RetryableFailure
from .session import one_line

if TYPE_CHECKING:
    from .http import Response

log = logging.getLogger(__name__)

PIECE = 1 << 20  # read/write granularity of downloads

Get = Callable[[Mapping[str, str]], "Response"]  # one GET of the content with these headers: a 200 or 206
Failure = Callable[[str], OcibuildError]  # the error to raise when a download stalls, from its message


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
        resume_into(writer, get, size=size, what=what, retrier=retrier, error=error, counts=counts)


def resume_into(sink: Sink, get: Get, *, size: int | None, what: str, retrier: Retrier, error: Failure,
                counts: Counts | None = None) -> None:
    """Fill ``sink`` (which may hold a first part already) with the rest of the content, trying again from where
    each try stopped; ``error(message)`` is raised when tries without progress run out."""
    view = memoryview(bytearray(PIECE))
    tally = counts or _NoCounts()
    retrier.run(lambda: _one_try(sink, get, size, what, error, tally, view),
                resume=lambda failure: log.info("%s; resuming", failure))


def _one_try(sink: Sink, get: Get, size: int | None, what: str, error: Failure, counts: Counts,
             view: memoryview) -> None:
    offset = before = sink.size
    expected = size
    problem: str | None = None
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
            problem = _copy(response, sink, view, expected)
            counts.add(downloaded=sink.size - before)
    if ask_again:
        return _one_try(sink, get, size, what, error, counts, view)
    if problem is not None:
        total = "?" if expected is None else str(expected)
        raise RetryableFailure(error(f"{what}: {problem} ({sink.size} of {total} bytes); the bytes received are kept"),
                               progressed=sink.size > before)


def _copy(response: Response, sink: Sink, view: memoryview, expected: int | None) -> str | None:
    """The body into the sink; what went wrong, or None."""
    try:
        while n := response.readinto(view):
            sink.write(view[:n])
    except OSError as err:
        return one_line(err)
    return None if expected is None or sink.size >= expected else "the body ended early"


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
