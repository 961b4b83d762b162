"""The one atomic write, the one "hard link, else copy", and the one thread-pool helper."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import pytest

from ocibuild.errors import OcibuildError
from ocibuild.files import atomic_write, link_or_copy
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


def test_link_or_copy_links_when_it_can(tmp_path: Path) -> None:
    source, target = tmp_path / "blob", tmp_path / "download"
    source.write_bytes(b"input")
    link_or_copy(source, target)
    assert os.path.samefile(source, target)
    assert sorted(os.listdir(tmp_path)) == ["blob", "download"]


@pytest.mark.parametrize("code", [errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP])
def test_link_or_copy_copies_and_fsyncs_when_a_link_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                code: int) -> None:
    source, target = tmp_path / "blob", tmp_path / "download"
    source.write_bytes(b"input" * 1000)
    synced: list[int] = []
    real_fsync = os.fsync

    def refuse(src: object, dst: object) -> None:
        raise OSError(code, os.strerror(code))

    def fsync(fd: int) -> None:
        synced.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "link", refuse)
    monkeypatch.setattr(os, "fsync", fsync)
    link_or_copy(source, target, sync_directory=False)
    assert target.read_bytes() == source.read_bytes() and not os.path.samefile(source, target)
    assert len(synced) == 1  # the copy; the directory is the caller's
    assert sorted(os.listdir(tmp_path)) == ["blob", "download"]


def test_link_or_copy_leaves_nothing_when_it_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source, target = tmp_path / "blob", tmp_path / "download"
    source.write_bytes(b"input")

    def refuse(src: object, dst: object) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "link", refuse)
    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OSError, match="No space"):
        link_or_copy(source, target)
    assert os.listdir(tmp_path) == ["blob"]
    monkeypatch.undo()
    with pytest.raises(FileNotFoundError):  # other errors are the caller's to translate
        link_or_copy(tmp_path / "missing", target)
    assert os.listdir(tmp_path) == ["blob"]


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
