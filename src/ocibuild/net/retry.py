"""Retries: how often and how patiently (:class:`RetryPolicy`), what a server asks (Retry-After), and the one loop.

Every request and transfer that may be tried again goes through :meth:`Retrier.run`: a try either returns, raises
:class:`RetryableFailure` (a connection error, a timeout, a status in :data:`RETRY_STATUS`, a body cut short), or
raises any other error, which ends the loop at once. Between tries the loop backs off (exponentially, with full
jitter, or as long as Retry-After asks) and calls a *resume* callback, which readies the next try: a download finds
the bytes it holds, an upload asks the registry how far it got. A try that moved the work forward (``progressed``)
gives the transfer its tries back, so a long download over a flaky link ends as long as each try brings something.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TypeVar

from ..errors import OcibuildError

T = TypeVar("T")

RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})


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
    """How often and how patiently requests are retried, the socket timeouts, and the minimum rate of a response
    (once its first byte came, each ``rate_window`` seconds must bring ``min_rate`` bytes a second on average: a
    server that drips a manifest or a blob is cut, and a cut for slowness is no progress that earns more tries)."""

    attempts: int = 6  # tries of one request (or one resumable transfer without progress)
    base: float = 0.5  # first backoff, doubled each time, with full jitter
    cap: float = 15.0  # longest backoff
    max_retry_after: float = 60.0  # longest Retry-After honoured; a longer one fails at once
    connect_timeout: float = 15.0
    read_timeout: float = 60.0
    min_rate: float = 1024.0  # bytes a second; a slower link than this cannot carry a useful download anyway
    rate_window: float = 30.0  # seconds the minimum rate is averaged over (0: no minimum)

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        if retry_after is not None:
            return min(retry_after, self.max_retry_after)
        return random.uniform(0, min(self.cap, self.base * (2 ** attempt)))


class RetryableFailure(OcibuildError):
    """One try failed in a way a later try may not. ``error`` is raised when the tries run out; ``delay`` is the
    wait the server asked for (Retry-After); ``progressed``: the try moved the work forward before failing."""

    def __init__(self, error: OcibuildError, *, delay: float | None = None, progressed: bool = False) -> None:
        super().__init__(str(error), error.hint)
        self.error = error
        self.delay = delay
        self.progressed = progressed


def _nothing() -> None:
    pass


@dataclass(frozen=True)
class Retrier:
    """A :class:`RetryPolicy` put to work: the one retry loop, with its clock (tests pass a recording ``sleep``)
    and ``on_retry``, called before each wait (the transfer statistics count retries with it)."""

    policy: RetryPolicy = field(default_factory=RetryPolicy)
    sleep: Callable[[float], None] = time.sleep
    on_retry: Callable[[], None] = _nothing

    def run(self, attempt: Callable[[], T], resume: Callable[[RetryableFailure], None] | None = None) -> T:
        """``attempt()`` until it returns. After a :class:`RetryableFailure`: back off, then ``resume(failure)``
        readies the next try. After ``policy.attempts`` failures in a row (a try that progressed counts as the
        first of a new row), the last failure's ``error`` is raised."""
        failures = 0
        while True:
            try:
                return attempt()
            except RetryableFailure as failure:
                failures = 1 if failure.progressed else failures + 1
                if failures >= self.policy.attempts:
                    raise failure.error from None
                self.on_retry()
                self.sleep(self.policy.delay(failures - 1, failure.delay))
                if resume is not None:
                    resume(failure)

    def with_attempts(self, attempts: int) -> Retrier:
        """The same loop with another number of tries (e.g. a corrupt transfer is fetched once more)."""
        return replace(self, policy=replace(self.policy, attempts=attempts))
