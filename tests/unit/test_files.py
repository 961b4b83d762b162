"""The one atomic write and the one thread-pool helper."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from ocibuild.errors import OcibuildError
from ocibuild.files import atomic_write
from ocibuild.threads import parallel_map


def test_atomic_write_replaces_whole_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "ocibuild.lock"
    target.write_bytes(b"old")
    atomic_write(target, b"new content")
    assert target.read_bytes() == b"new content"
    assert os.listdir(tmp_path) == ["ocibuild.lock"]


def test_atomic_write_failure_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "cache.json"
    target.write_bytes(b"old")

    def no_space(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OSError, match="No space"):
        atomic_write(target, b"new")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["cache.json"]


def test_parallel_map_keeps_order_and_uses_threads() -> None:
    names: set[str] = set()
    barrier = threading.Barrier(3, timeout=5)

    def work(n: int) -> int:
        names.add(threading.current_thread().name)
        barrier.wait()  # only returns when three run at once
        return n * n

    assert parallel_map(work, [1, 2, 3], jobs=3, name="t") == [1, 4, 9]
    assert len(names) == 3


def test_parallel_map_raises_our_error_first_and_starts_nothing_after_a_failure() -> None:
    started: list[int] = []
    both = threading.Barrier(2, timeout=5)

    def work(n: int) -> None:
        started.append(n)
        if n < 2:
            both.wait()  # items 0 and 1 fail together
        if n == 0:
            raise ValueError("plain")
        if n == 1:
            raise OcibuildError("ours")

    with pytest.raises(OcibuildError, match="ours"):
        parallel_map(work, [0, 1, *range(2, 200)], jobs=2)
    assert len(started) < 200
