"""A run layer's caches (``caches`` in its layer.toml): directories of the store, one set per layer, used under
an flock, listed and removed by `gc --caches`; and the capture leaving their mount points out of the layer."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import threading
from pathlib import Path

import pytest

from ocibuild import runcache
from ocibuild.build.run import without_mount_points
from ocibuild.cli import main
from ocibuild.store import Store

CACHES = ("/var/cache/apt", "/var/lib/apt/lists")


def nothing() -> None:
    raise AssertionError("waited, though no other build held the caches")


def test_each_layer_has_its_own_directories(store: Store, tmp_path: Path) -> None:
    project = tmp_path / "project"
    with runcache.layer_caches(store, project, "podman", "go", CACHES, waiting=nothing) as go, \
            runcache.layer_caches(store, project, "podman", "tools", CACHES, waiting=nothing) as tools:
        assert [path for _, path in go] == list(CACHES) == [path for _, path in tools]
        hosts = [host for host, _ in go + tools]
        assert all(host.is_dir() for host in hosts) and len(set(hosts)) == 4
    with runcache.layer_caches(store, project, "podman", "go", CACHES, waiting=nothing) as again:
        assert again == go  # the next build of the layer finds the same directories
    listed = [(c.layer, c.engine, c.path) for c in runcache.list_caches(store)]
    assert listed == [("go", "podman", "/var/cache/apt"), ("go", "podman", "/var/lib/apt/lists"),
                      ("tools", "podman", "/var/cache/apt"), ("tools", "podman", "/var/lib/apt/lists")]


def test_a_second_build_of_the_same_layer_waits_for_the_first(store: Store, tmp_path: Path) -> None:
    project = tmp_path / "project"
    waited, finished = threading.Event(), threading.Event()
    seen: list[bool] = []

    def second() -> None:
        with runcache.layer_caches(store, project, "podman", "tools", CACHES, waiting=waited.set) as dirs:
            seen.append((dirs[0][0] / "written-by-first").exists())
        finished.set()

    with runcache.layer_caches(store, project, "podman", "tools", CACHES, waiting=nothing) as dirs:
        # another layer's caches are free meanwhile
        with runcache.layer_caches(store, project, "podman", "go", CACHES, waiting=nothing):
            pass
        thread = threading.Thread(target=second)
        thread.start()
        assert waited.wait(60), "the second build did not wait for the layer's lock"
        assert not finished.is_set()
        (dirs[0][0] / "written-by-first").write_text("x")
    thread.join(60)
    assert seen == [True]


def test_the_lock_is_an_flock_other_processes_see(store: Store, tmp_path: Path) -> None:
    with runcache.layer_caches(store, tmp_path, "podman", "tools", CACHES, waiting=nothing) as dirs:
        lock = dirs[0][0].parent / "lock"
        fd = os.open(lock, os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)


def test_no_caches_no_directories(store: Store, tmp_path: Path) -> None:
    with runcache.layer_caches(store, tmp_path, "podman", "tools", (), waiting=nothing) as dirs:
        assert dirs == []
    assert runcache.list_caches(store) == []


def test_gc_caches_removes_layer_caches_and_names_their_layer(store: Store, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    project = tmp_path / "project"
    [(compile_cache, _)] = runcache.prepare(store, project, "podman", ["/root/.cache/go-build"])
    with runcache.layer_caches(store, project, "podman", "tools", CACHES[:1], waiting=nothing) as [(apt, _)]:
        (apt / "archives").mkdir()
        (apt / "archives" / "jq.deb").write_bytes(b"x" * 1000)
    assert main(["gc", "--store", str(store.root), "--caches", "--json"]) == 0
    removed = json.loads(capsys.readouterr().out)["caches"]
    assert [(c["layer"], c["path"]) for c in removed] == [(None, "/root/.cache/go-build"), ("tools", "/var/cache/apt")]
    assert removed[1]["bytes"] >= 1000 and removed[1]["project"] == str(project)
    assert not apt.exists() and not compile_cache.exists()


def test_gc_caches_waits_for_a_build_using_them(store: Store, tmp_path: Path) -> None:
    waited, done = threading.Event(), threading.Event()
    result: list[list[runcache.CacheDir]] = []

    def gc() -> None:
        result.append(runcache.remove(store, waiting=lambda layer: waited.set()))
        done.set()

    with runcache.layer_caches(store, tmp_path, "podman", "tools", CACHES, waiting=nothing) as dirs:
        thread = threading.Thread(target=gc)
        thread.start()
        assert waited.wait(60), "gc --caches did not wait for the build"
        assert not done.is_set() and dirs[0][0].is_dir()
    thread.join(60)
    assert [c.layer for c in result[0]] == ["tools", "tools"] and not dirs[0][0].exists()
    # a build after gc makes them again, under a lock of its own
    with runcache.layer_caches(store, tmp_path, "podman", "tools", CACHES, waiting=nothing) as again:
        assert all(host.is_dir() for host, _ in again)


def test_a_build_that_waited_while_gc_removed_the_caches_locks_the_new_lock_file(store: Store,
                                                                                tmp_path: Path) -> None:
    """A build waiting on the lock file that gc --caches then deleted (gc removes under the lock) does not count
    that file's flock as the layer's lock: a later build would open the new file and get that too."""
    waited, inside, release = threading.Event(), threading.Event(), threading.Event()

    def builder() -> None:
        with runcache.layer_caches(store, tmp_path, "podman", "tools", CACHES, waiting=waited.set):
            inside.set()
            release.wait(60)

    with runcache.layer_caches(store, tmp_path, "podman", "tools", CACHES, waiting=nothing) as dirs:
        thread = threading.Thread(target=builder)
        thread.start()
        assert waited.wait(60)
        shutil.rmtree(dirs[0][0].parents[3])  # what gc --caches does while it holds the lock
    try:
        assert inside.wait(60)
        lock = dirs[0][0].parent / "lock"
        fd = os.open(lock, os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):  # the builder holds the lock file that is there now
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
        assert all(host.is_dir() for host, _ in dirs)  # and its directories are there again
        assert [c.project for c in runcache.list_caches(store)] == [str(tmp_path)] * 2  # named as before
    finally:
        release.set()
        thread.join(60)


def test_mount_points_and_the_directories_made_to_hold_them_stay_out_of_the_layer() -> None:
    changes = {
        "/usr/bin/jq": "A", "/usr/bin": "C",
        "/var/cache/apt": "C", "/var/cache/apt/archives/x.deb": "A",  # a mount point in the image, and below it
        "/new": "A", "/new/sub": "A", "/new/sub/cache": "A",  # podman made a missing mount point and its parents
        "/opt": "A", "/opt/cache": "A", "/opt/tool": "A",  # a parent the script also wrote into
    }
    kept = without_mount_points(changes, ["/var/cache/apt", "/new/sub/cache", "/opt/cache"])
    assert kept == {"/usr/bin/jq": "A", "/usr/bin": "C", "/opt": "A", "/opt/tool": "A"}
    assert without_mount_points(changes, []) == changes
    # a path that only starts like a mount point is not below it
    assert without_mount_points({"/var/cache/apt2": "A"}, ["/var/cache/apt"]) == {"/var/cache/apt2": "A"}
