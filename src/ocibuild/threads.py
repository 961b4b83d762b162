"""Work on a few threads: independent I/O-bound items (blob copies, transfers) with :func:`parallel_map`; items
that need others (the layers of a build) with :func:`run_by_needs`, which a :class:`Stop` stops cleanly."""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TypeVar, cast

from .errors import OcibuildError

log = logging.getLogger(__name__)

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


# ---- work that needs other work -------------------------------------------------------------------------------

#: Memory one job of a build may take (a package manager, a compressor): the default number of jobs leaves it.
MEMORY_PER_JOB = 1 << 30


def default_jobs() -> int:
    """How many layers a build makes at once by default: one per core this process may run on, fewer when
    available memory (Linux's MemAvailable) cannot give each :data:`MEMORY_PER_JOB`; at least one."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    available = _available_memory()
    by_memory = cores if available is None else available // MEMORY_PER_JOB
    return max(1, min(cores, by_memory))


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


class Stopped(Exception):
    """Work given up because its run was stopped (another item failed, or the user interrupted): a consequence,
    never the error reported."""


class Stop:
    """The stop signal of one run of work: set once, when an item fails or the user interrupts. Work in progress
    says how to stop it (:meth:`hook`: kill a container) and looks (:meth:`check`) before each step it cannot be
    stopped in the middle of."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._mutex = threading.Lock()
        self._hooks: dict[int, Callable[[], None]] = {}
        self._next = 0

    def is_set(self) -> bool:
        return self._event.is_set()

    def set(self) -> None:
        """Stop: every hook registered now is called (in this thread), once; an error of one is logged."""
        with self._mutex:
            if self._event.is_set():
                return
            self._event.set()
            hooks = list(self._hooks.values())
        for hook in hooks:
            try:
                hook()
            except Exception as err:  # stopping goes on: the run's own failure is the one to report
                log.warning("while stopping: %s", err)

    def check(self) -> None:
        """Raise :class:`Stopped` when the run was stopped."""
        if self._event.is_set():
            raise Stopped()

    @contextmanager
    def hook(self, stop: Callable[[], None]) -> Iterator[None]:
        """While the context lasts, :meth:`set` calls ``stop()``; raises :class:`Stopped` at once if it was set."""
        with self._mutex:
            if self._event.is_set():
                raise Stopped()
            token = self._next
            self._next += 1
            self._hooks[token] = stop
        try:
            yield
        finally:
            with self._mutex:
                self._hooks.pop(token, None)


def run_by_needs(work: Callable[[str], R], needs: Mapping[str, Collection[str]], *, jobs: int,
                 stop: Stop | None = None, name: str = "ocibuild") -> dict[str, R]:
    """``work(item)`` for each item of ``needs`` (its keys, in order), each started once every item it needs has
    returned (a need that is not a key is done already), up to ``jobs`` at once, each on a thread of its own. Of
    the items ready, the first in order starts first: with ``jobs=1`` items given bottom first run in that order.

    The first failure stops the run: no item starts after it, ``stop`` is set (its hooks stop what is running),
    and once every running item has returned, that failure is raised; later failures are its consequences.
    Ctrl-C (KeyboardInterrupt, which reaches the waiting caller) does the same and is raised again; a second one
    leaves the threads behind (they are daemons). A ``stop`` set from outside raises :class:`Stopped`."""
    stop = stop if stop is not None else Stop()
    pending = list(needs)
    inside = {item: {n for n in needs[item] if n in needs} for item in pending}
    finished: queue.SimpleQueue[tuple[str, R | None, BaseException | None]] = queue.SimpleQueue()
    results: dict[str, R] = {}
    running: set[str] = set()
    failure: BaseException | None = None

    def run(item: str) -> None:
        try:
            result = work(item)
        except BaseException as err:  # handed to the waiting thread, which decides
            finished.put((item, None, err))
        else:
            finished.put((item, result, None))

    try:
        while True:
            ready = [item for item in pending if inside[item] <= results.keys()] if not stop.is_set() else []
            for item in ready[:max(1, jobs) - len(running)]:
                pending.remove(item)
                running.add(item)
                threading.Thread(target=run, args=(item,), name=f"{name}-{item}", daemon=True).start()
            if not running:
                break
            item, result, error = finished.get()
            running.discard(item)
            if error is None:
                results[item] = cast(R, result)
            elif failure is None and not stop.is_set():
                failure = error
                stop.set()
    except KeyboardInterrupt:
        stop.set()
        while running:
            running.discard(finished.get()[0])
        raise
    if failure is not None:
        raise failure
    if pending:
        if not stop.is_set():
            raise ValueError(f"items that need each other: {', '.join(pending)}")
        raise Stopped()
    return results
