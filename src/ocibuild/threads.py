"""The one thread-pool helper: run independent I/O-bound work (blob copies, transfers) a few at a time."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import TypeVar

from .errors import OcibuildError

T = TypeVar("T")
R = TypeVar("R")


def parallel_map(work: Callable[[T], R], items: Sequence[T], *, jobs: int, name: str = "ocibuild") -> list[R]:
    """``[work(item) for item in items]`` on up to ``jobs`` threads, results in the order of ``items``.

    After the first failure no further item is started; once every running one has stopped, the first
    :class:`OcibuildError` raised (else the first exception) is raised. One item, or ``jobs <= 1``, runs inline.
    """
    if jobs <= 1 or len(items) <= 1:
        return [work(item) for item in items]
    from concurrent.futures import Future, ThreadPoolExecutor  # only when there is more than one thing to do

    failed = threading.Event()

    def guarded(item: T) -> R:
        if failed.is_set():
            raise _Skipped()
        try:
            return work(item)
        except BaseException:
            failed.set()
            raise

    with ThreadPoolExecutor(max_workers=min(jobs, len(items)), thread_name_prefix=name) as pool:
        futures: list[Future[R]] = [pool.submit(guarded, item) for item in items]
    errors = [e for f in futures if (e := f.exception()) is not None and not isinstance(e, _Skipped)]
    if errors:
        raise next((e for e in errors if isinstance(e, OcibuildError)), errors[0])
    return [f.result() for f in futures]


class _Skipped(Exception):
    """An item not started because another had already failed."""
