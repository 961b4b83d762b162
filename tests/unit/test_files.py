"""The one atomic write, the one "hard link, else copy", the one guarded open, and the one thread-pool helper."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import pytest

from ocibuild.errors import OcibuildError
from ocibuild.files import (NotRegularFile, TooLarge, atomic_write, link_or_copy, open_regular, read_bounded,
                            read_toml)
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


@pytest.mark.timeout(30)  # an open that waits for a fifo's writer would wait forever
def test_open_regular_refuses_a_fifo_without_waiting_for_a_writer(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(NotRegularFile, match=r"not a regular file \(a fifo\)"):
        open_regular(tmp_path / "fifo")
    with pytest.raises(NotRegularFile, match="a fifo"):
        read_bounded(tmp_path / "fifo", 100)


@pytest.mark.parametrize("target, kind", [("/dev/zero", "a character device"), ("/", "a directory")])
def test_open_regular_checks_what_a_symlink_leads_to(tmp_path: Path, target: str, kind: str) -> None:
    (tmp_path / "blob").symlink_to(target)
    with pytest.raises(NotRegularFile, match=rf"not a regular file \({kind}\)"):
        read_bounded(tmp_path / "blob", 1 << 20)


def test_open_regular_gives_a_blocking_descriptor_and_refuses_symlinks_when_asked(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"content")
    (tmp_path / "link").symlink_to("file")
    fd = open_regular(tmp_path / "link")
    try:
        assert os.get_blocking(fd) and os.read(fd, 100) == b"content"
    finally:
        os.close(fd)
    with pytest.raises(OSError) as refused:
        open_regular(tmp_path / "link", follow_symlinks=False)
    assert refused.value.errno == errno.ELOOP


def test_read_bounded_reads_up_to_its_limit_and_refuses_more(tmp_path: Path) -> None:
    (tmp_path / "doc").write_bytes(b"x" * 3000)
    assert read_bounded(tmp_path / "doc", 3000) == b"x" * 3000
    with pytest.raises(TooLarge, match="larger than the 2999 bytes expected of it"):
        read_bounded(tmp_path / "doc", 2999)


def test_read_bounded_counts_what_it_reads_not_only_the_size_fstat_gives() -> None:
    """A file may grow after its fstat, or, as /proc files do, report size 0: the bound holds while reading."""
    assert os.stat("/proc/self/maps").st_size == 0
    with pytest.raises(TooLarge):
        read_bounded("/proc/self/maps", 64)


def test_read_toml_tells_nesting_too_deep_for_the_parser_as_a_value_error(tmp_path: Path) -> None:
    (tmp_path / "deep.toml").write_text("a = " + "[" * 50_000 + "]" * 50_000 + "\n")
    with pytest.raises(ValueError, match="nested too deeply"):
        read_toml(tmp_path / "deep.toml")
    (tmp_path / "latin1.toml").write_bytes(b'a = "\xe9"\n')
    with pytest.raises(ValueError, match=r"not UTF-8 text \(byte 5\)"):
        read_toml(tmp_path / "latin1.toml")
    (tmp_path / "ok.toml").write_text('a = [[1], {b = "c"}]\n')
    assert read_toml(tmp_path / "ok.toml") == {"a": [[1], {"b": "c"}]}


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
