"""Processes meeting in one store: creating it at once, and the temporary files a killed one leaves behind."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
from multiprocessing.synchronize import Barrier
from pathlib import Path

from ocibuild.oci import Index
from ocibuild.store import Store

PROCESSES = 16
ROUNDS = 25


def _open_each(base: str, barrier: Barrier, worker: int) -> None:
    """Open (so create) the store of each round at the same moment as the other workers; exit 1 on a failure."""
    os.fsync = lambda fd: None  # creation is under test, not durability: shorter turns, denser races
    failed = 0
    for round_ in range(ROUNDS):
        barrier.wait(60)
        try:
            Store.open(Path(base) / f"store-{round_}" / "nested")
        except Exception as err:  # every failure is counted, reported below
            print(f"worker {worker}, round {round_}: {err}", flush=True)
            failed += 1
    os._exit(1 if failed else 0)


def test_processes_creating_one_store_at_once_all_open_it(tmp_path: Path) -> None:
    context = multiprocessing.get_context("fork")  # fast to start: the race is between the opens, not the starts
    barrier = context.Barrier(PROCESSES)
    workers = [context.Process(target=_open_each, args=(str(tmp_path), barrier, w)) for w in range(PROCESSES)]
    for process in workers:
        process.start()
    for process in workers:
        process.join(120)
    assert [p.exitcode for p in workers] == [0] * PROCESSES
    for round_ in range(ROUNDS):
        store = Store.open(tmp_path / f"store-{round_}" / "nested", create=False)
        assert store.index() == Index(()) and store.verify() == []
        assert sorted(os.listdir(store.root)) == ["blobs", "index.json", "oci-layout", "ocibuild"]


# ------------------------------------------------------------------------------------------------- leftovers

_HOLDER = """
import sys, time
from pathlib import Path
from ocibuild.store import Store

store = Store.open(Path(sys.argv[1]))
with store.writer() as blob, store.temp_dir() as scratch:
    blob.write(b"x" * (3 << 20))
    (scratch / "layer.tar").write_bytes(b"y" * 1000)
    print("ready", flush=True)
    time.sleep(600)
"""


def _holder(root: Path) -> subprocess.Popen[str]:
    """A process writing a blob and holding a scratch directory in the store at ``root``, until it is killed."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    process = subprocess.Popen([sys.executable, "-c", _HOLDER, str(root)], env=env, text=True,
                               stdout=subprocess.PIPE)
    assert process.stdout is not None and process.stdout.readline() == "ready\n"
    return process


def _kill(process: subprocess.Popen[str]) -> None:
    process.kill()
    process.wait()
    assert process.stdout is not None
    process.stdout.close()


def _tmp(root: Path) -> list[str]:
    return sorted(os.listdir(root / "ocibuild" / "tmp"))


def test_the_next_open_removes_what_a_killed_process_left(tmp_path: Path) -> None:
    root = tmp_path / "store"
    Store.open(root)
    process = _holder(root)
    left = _tmp(root)
    assert [name.split("-")[:2] for name in left] == [["blob", str(process.pid)], ["dir", str(process.pid)]]
    _kill(process)
    assert _tmp(root) == left  # nothing removes them when the process dies
    store = Store.open(root)
    assert _tmp(root) == []
    assert store.verify() == []


def test_an_open_never_removes_what_a_live_process_holds(tmp_path: Path) -> None:
    root = tmp_path / "store"
    store = Store.open(root)
    process = _holder(root)
    try:
        held = _tmp(root)
        with store.temp_dir() as scratch:  # this process's own, held by another open file
            Store.open(root)
            assert scratch.is_dir() and _tmp(root) == sorted([*held, scratch.name])
    finally:
        _kill(process)
    assert _tmp(root) == held
    store.gc()
    assert _tmp(root) == []
