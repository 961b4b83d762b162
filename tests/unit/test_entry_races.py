"""A property test of the cache-entry promise under concurrency: random interleavings of build, import of an
oci-archive, pull-cache-like adds and gc on one store, from several threads and several processes, leave a store
where every cache-entry tag names content whose key label is its key, every blob verifies, and no blob a tag
reaches is gone.

The schedule is a seeded ``random.Random`` per worker (no hypothesis: not a dependency), so a failure repeats with
its seed. Each worker opens its own Store, as separate ocibuild processes do: the locks are per Store. Besides
genuine entries, workers offer entries under the wrong key (always refused) and entries of other content for a key
(a conflict once the key is present), and wait a little between writing blobs and tagging them, so that a gc
that did not wait for the lease would take them.
"""

from __future__ import annotations

import gzip
import io
import multiprocessing
import os
import random
import tarfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from ocibuild import archive as oci_archive, oci
from ocibuild.errors import EntryConflict, StoreError
from ocibuild.oci import Descriptor, Digest, ImageConfig, LayerBlob, Manifest, canonical_json
from ocibuild.store import Store
from ocibuild.store.entries import LABEL_PREFIX, add_cache_entries, cache_tag, is_cache_tag, put_cache_entry

DOCUMENTS = {Digest.of(canonical_json({"key": n})): {"key": n} for n in range(4)}  # key -> its key document
KEYS = list(DOCUMENTS)
STEPS = 12  # per worker
THREADS = 3
PROCESSES = 2


def _tar(key: Digest, other: bool = False) -> bytes:
    """The uncompressed layer of ``key`` (``other``: a different content for it, a non-reproducible build)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        data = f"{key} {'other' if other else 'genuine'}".encode()
        info = tarfile.TarInfo("f")
        info.size, info.mode, info.mtime = len(data), 0o644, 0
        tar.addfile(info, io.BytesIO(data))
    return raw.getvalue()


@dataclass(frozen=True)
class _Recipe:
    kind: str = "copy"
    needs: tuple[()] = ()


@dataclass(frozen=True)
class _Layer:
    """What put_cache_entry records of a planned layer; its key document is any one that hashes to its key."""

    name: str
    key: Digest
    recipe: _Recipe = _Recipe()
    inputs: tuple[()] = ()

    @property
    def document(self) -> dict[str, int]:
        return DOCUMENTS[self.key]


def _entry(store: Store, key: Digest, *, label_key: Digest, media_type: str, other: bool = False) -> Descriptor:
    """Write an entry's blobs as pull-cache does (not tagged): a layer of ``media_type``, labelled ``label_key``."""
    raw = _tar(key, other)
    blob = gzip.compress(raw, mtime=0, compresslevel=1) if media_type == oci.LAYER_GZIP else raw
    layer = store.put(blob, media_type)
    labels = {LABEL_PREFIX + "name": "src", LABEL_PREFIX + "key": str(label_key)}
    config = store.put(ImageConfig(diff_ids=(Digest.of(raw),), labels=labels).to_json(), oci.OCI_CONFIG)
    return store.put_manifest(Manifest(config, (layer,)))


def _archives(tmp: Path) -> tuple[Path, Path]:
    """A good archive (an entry for every key) and one whose only entry is labelled with another key."""
    good, bad = Store.open(tmp / "good-src"), Store.open(tmp / "bad-src")
    for key in KEYS:
        good.tag(cache_tag("src", key), _entry(good, key, label_key=key, media_type=oci.LAYER_GZIP))
    bad.tag(cache_tag("src", KEYS[0]), _entry(bad, KEYS[0], label_key=KEYS[1], media_type=oci.LAYER_TAR))
    oci_archive.export_archive(good, tmp / "good.tar", [cache_tag("src", k) for k in KEYS])
    oci_archive.export_archive(bad, tmp / "bad.tar", [cache_tag("src", KEYS[0])])
    return tmp / "good.tar", tmp / "bad.tar"


def _step(store: Store, rng: random.Random, good: Path, bad: Path) -> str:
    """One random operation; what it was. Raises only what the operation may legitimately raise."""
    key = rng.choice(KEYS)
    tag = cache_tag("src", key)
    op = rng.choices(["build", "pull", "import", "gc", "wrong-key", "bad-import", "other"],
                     weights=[4, 3, 2, 2, 1, 1, 1])[0]
    pause = rng.random() * 0.004
    try:
        if op == "build":
            with store.lease():  # as the planner: from the first blob until the tag
                raw = _tar(key)
                built = [LayerBlob(store.put(gzip.compress(raw, mtime=0), oci.LAYER_GZIP), Digest.of(raw))]
                time.sleep(pause)
                put_cache_entry(store, _Layer("src", key), built, platform=oci.Platform(), epoch=0)
        elif op in ("pull", "wrong-key", "other"):
            label = rng.choice([k for k in KEYS if k != key]) if op == "wrong-key" else key
            with store.lease():
                descriptor = _entry(store, key, label_key=label, media_type=oci.LAYER_TAR, other=op == "other")
                time.sleep(pause)
                add_cache_entries(store, {tag: descriptor}, what=f"pull {op}")
            if op == "wrong-key":
                raise AssertionError(f"an entry labelled {label} was tagged {tag}")
        elif op in ("import", "bad-import"):
            oci_archive.import_archive(store, good if op == "import" else bad)
            if op == "bad-import":
                raise AssertionError("an archive entry labelled with another key was imported")
        else:
            store.gc()
    except EntryConflict:
        pass  # another content for a key already present: refused, the first kept
    except StoreError as err:
        if op not in ("wrong-key", "bad-import") or "its key label is" not in str(err):
            raise
    return op


def _worker(root: str, seed: int, good: str, bad: str) -> None:
    store = Store.open(Path(root), create=False)
    rng = random.Random(seed)
    for _ in range(STEPS):
        _step(store, rng, Path(good), Path(bad))


def _check(store: Store) -> None:
    """The properties: every cache-entry tag names a sound entry of its key, every blob it reaches is there, the
    store verifies."""
    for descriptor in store.index().manifests:
        tag = descriptor.ref_name
        assert tag is not None and is_cache_tag(tag), tag
        manifest = store.get_manifest(descriptor.digest)
        config = store.get_config(manifest.config.digest)
        assert config.labels[LABEL_PREFIX + "key"] == f"sha256:{tag[-64:]}", tag
        assert len(config.diff_ids) == len(manifest.layers), tag
        for blob in (manifest.config, *manifest.layers):
            assert store.blob_path(blob.digest).is_file(), f"{tag} reaches {blob.digest}, which is gone"
    assert store.verify() == []


@pytest.mark.parametrize("seed", [11, 12])
def test_random_interleavings_keep_every_entry_sound(tmp_path: Path, seed: int,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # The locks are under test, not durability: without fsync each step is shorter and interleavings denser.
    monkeypatch.setattr(os, "fsync", lambda fd: None)
    good, bad = _archives(tmp_path)
    root = tmp_path / "store"
    Store.open(root)
    context = multiprocessing.get_context("fork")  # fast to start; started before this process's threads
    processes = [context.Process(target=_worker, args=(str(root), seed * 100 + p, str(good), str(bad)))
                 for p in range(PROCESSES)]
    for process in processes:
        process.start()
    failures: list[BaseException] = []

    def thread_worker(n: int) -> None:
        try:
            _worker(str(root), seed * 100 + PROCESSES + n, str(good), str(bad))
        except BaseException as err:  # reported by the test below
            failures.append(err)

    threads = [threading.Thread(target=thread_worker, args=(n,)) for n in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for process in processes:
        process.join(60)
    store = Store.open(root, create=False)
    _check(store)  # first the store's properties, then what the workers saw
    assert failures == []
    assert [p.exitcode for p in processes] == [0] * PROCESSES
    store.gc()  # and nothing a tag reaches is garbage
    _check(store)
