"""Processes meeting in one store: creating it at once, and the temporary files a killed one leaves behind."""

from __future__ import annotations

import multiprocessing
import os
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
