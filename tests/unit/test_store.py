"""The local OCI layout store: blobs, tags, locking, verify, gc."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import multiprocessing
import os
import tarfile
from dataclasses import replace
from pathlib import Path

import pytest

from ocibuild import oci
from ocibuild.errors import BlobNotFound, DigestMismatch, FormatError, StoreError
from ocibuild.oci import Descriptor, Digest, ImageConfig, Index, Manifest
from ocibuild.store import Store
from ocibuild.store.entries import add_cache_entries


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store.open(tmp_path / "store")


def tar_gz(files: dict[str, bytes]) -> tuple[bytes, Digest]:
    """A reproducible gzip layer and its diff_id."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))
    return gzip.compress(raw.getvalue(), mtime=0), Digest.of(raw.getvalue())


def put_image(store: Store, tag: str | None, files: dict[str, bytes]) -> tuple[Descriptor, Descriptor, Descriptor]:
    """Store a one-layer image; return (manifest, config, layer) descriptors, the manifest tagged ``tag``."""
    blob, diff_id = tar_gz(files)
    layer = store.put(blob, oci.LAYER_GZIP)
    config = store.put(ImageConfig(diff_ids=(diff_id,)).to_json(), oci.OCI_CONFIG)
    manifest = store.put_manifest(Manifest(config, (layer,)))
    if tag is not None:
        store.tag(tag, manifest)
    return manifest, config, layer


def blob_files(store: Store) -> set[str]:
    return {p.name for p in (store.root / "blobs" / "sha256").iterdir()}


def tmp_files(store: Store) -> list[Path]:
    return list((store.root / "ocibuild" / "tmp").iterdir())


def assert_clean(store: Store) -> None:
    assert store.verify() == []
    assert tmp_files(store) == []


def flip_byte(path: Path, offset: int = 0) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


# ------------------------------------------------------------------------------------------------ open


def test_open_creates_a_layout(tmp_path: Path) -> None:
    root = tmp_path / "a" / "store"
    store = Store.open(root)
    assert store.root == root
    assert json.loads((root / "oci-layout").read_bytes()) == {"imageLayoutVersion": "1.0.0"}
    assert Index.parse((root / "index.json").read_bytes()).manifests == ()
    assert (root / "blobs" / "sha256").is_dir()
    assert store.index() == Index(())
    assert Store.open(root, create=False).index() == Index(())
    assert_clean(store)


def test_open_an_empty_directory_creates_a_layout(tmp_path: Path) -> None:
    Store.open(tmp_path)
    assert (tmp_path / "oci-layout").is_file()


def test_open_missing_without_create(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no store at") as info:
        Store.open(tmp_path / "nope", create=False)
    assert info.value.hint and "--store" in info.value.hint
    assert not (tmp_path / "nope").exists()


def test_open_rejects_a_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(StoreError) as info:
        Store.open(tmp_path / "f")
    assert str(tmp_path / "f") in str(info.value) and "\n" not in str(info.value)


def test_open_rejects_a_directory_that_is_not_a_layout(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="neither an empty directory nor an OCI image layout") as info:
        Store.open(tmp_path)
    assert str(tmp_path) in str(info.value)
    assert sorted(os.listdir(tmp_path)) == ["notes.txt"]


def test_open_unwritable_location(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError) as info:
        Store.open(tmp_path / "file" / "store")
    message = str(info.value)
    assert str(tmp_path / "file" / "store") in message and "\n" not in message
    assert info.value.hint and "--store" in info.value.hint and "OCIBUILD_STORE" in info.value.hint


def test_open_rejects_a_bad_layout_version(tmp_path: Path) -> None:
    (tmp_path / "oci-layout").write_text('{"imageLayoutVersion":"9.9.9"}')
    with pytest.raises(StoreError, match="imageLayoutVersion"):
        Store.open(tmp_path)


def test_open_a_foreign_layout(tmp_path: Path) -> None:
    (tmp_path / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (tmp_path / "index.json").write_text('{"schemaVersion": 2, "manifests": []}')
    before = sorted(tmp_path.rglob("*"))
    reader = Store.open(tmp_path, create=False)  # e.g. an import source: read-only use writes nothing
    assert reader.index() == Index(())
    assert sorted(tmp_path.rglob("*")) == before
    store = Store.open(tmp_path)  # the store ocibuild writes to: completed
    assert (tmp_path / "blobs" / "sha256").is_dir() and (tmp_path / "ocibuild" / "tmp").is_dir()
    assert_clean(store)


def test_open_a_layout_without_index(tmp_path: Path) -> None:
    (tmp_path / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    with pytest.raises(StoreError, match="index.json is missing"):
        Store.open(tmp_path, create=False)
    assert Store.open(tmp_path).index() == Index(())  # no blobs: an interrupted creation, completed
    Store.open(tmp_path).put(b"x", oci.LAYER_TAR)
    (tmp_path / "index.json").unlink()
    with pytest.raises(StoreError, match="index.json is missing but the store holds blobs"):
        Store.open(tmp_path)


# ----------------------------------------------------------------------------------------------- blobs


def test_put_open_read_round_trip(store: Store) -> None:
    data = b"hello blob\n" * 1000
    descriptor = store.put(data, oci.OCI_CONFIG, annotations={"a": "b"})
    assert descriptor == Descriptor(oci.OCI_CONFIG, Digest.of(data), len(data), {"a": "b"})
    assert store.has(descriptor.digest)
    assert store.blob_path(descriptor.digest) == store.root / "blobs" / "sha256" / Digest.of(data).hex
    assert store.blob_path(descriptor.digest).read_bytes() == data
    assert store.read_blob(descriptor.digest) == data
    with store.open_blob(descriptor.digest, size=len(data)) as reader:
        assert reader.read(10) == data[:10]
        assert reader.read() == data[10:]
    assert store.put(data, oci.OCI_CONFIG) == Descriptor(oci.OCI_CONFIG, Digest.of(data), len(data))
    assert_clean(store)


def test_writer_streams_and_reports_digest_and_size(store: Store) -> None:
    chunks = [b"a" * 3_000_000, memoryview(b"b" * 10), b""]
    with store.writer() as blob:
        for chunk in chunks:
            blob.write(chunk)
    expected = Digest.of(b"a" * 3_000_000 + b"b" * 10)
    assert (blob.digest, blob.size) == (expected, 3_000_010)
    assert store.has(expected)
    with store.writer(expected=expected, size=3_000_010) as again:  # already present: temp dropped
        again.write(b"a" * 3_000_000 + b"b" * 10)
    assert again.digest == expected
    assert_clean(store)


def test_writer_is_a_file_for_tarfile_and_gzip(store: Store) -> None:
    with store.writer() as blob, gzip.GzipFile(fileobj=blob, mode="wb", mtime=0) as gz:  # type: ignore[arg-type]
        with tarfile.open(fileobj=gz, mode="w|") as tar:
            info = tarfile.TarInfo("etc/motd")
            info.size = 3
            tar.addfile(info, io.BytesIO(b"hi\n"))
    with store.open_blob(blob.digest) as reader, tarfile.open(fileobj=reader, mode="r|gz") as tar:
        assert [m.name for m in tar] == ["etc/motd"]
    assert_clean(store)


def test_reader_detects_a_flipped_byte(store: Store) -> None:
    data = os.urandom(100_000)
    digest = store.put(data, oci.LAYER_TAR).digest
    flip_byte(store.blob_path(digest), 50_000)
    reader = store.open_blob(digest)
    assert len(reader.read(60_000)) == 60_000  # not at EOF yet: nothing known
    with pytest.raises(DigestMismatch, match=f"blob {digest} is corrupt"):
        reader.read()
    reader.close()
    with pytest.raises(DigestMismatch):
        store.read_blob(digest)
    with pytest.raises(DigestMismatch), store.open_blob(digest) as again:
        while again.read(4096):
            pass


def test_reader_detects_a_truncated_blob(store: Store) -> None:
    data = os.urandom(10_000)
    digest = store.put(data, oci.LAYER_TAR).digest
    store.blob_path(digest).write_bytes(data[:9_000])
    with pytest.raises(DigestMismatch), store.open_blob(digest) as reader:
        reader.read()
    with pytest.raises(DigestMismatch, match="9000 bytes, expected 10000"):
        store.open_blob(digest, size=10_000)


def test_reader_checks_the_size_it_is_given(store: Store) -> None:
    digest = store.put(b"abc", oci.LAYER_TAR).digest
    with pytest.raises(DigestMismatch):
        store.open_blob(digest, size=4)


def test_missing_blob(store: Store) -> None:
    digest = Digest.of(b"absent")
    assert not store.has(digest)
    with pytest.raises(BlobNotFound, match=str(digest)) as info:
        store.open_blob(digest)
    assert info.value.hint and "ocibuild verify" in info.value.hint
    with pytest.raises(BlobNotFound):
        store.read_blob(digest)
    with pytest.raises(BlobNotFound):
        store.get_manifest(digest)


def test_writer_with_a_wrong_digest_commits_nothing(store: Store) -> None:
    wrong = Digest.of(b"something else")
    with pytest.raises(DigestMismatch) as info:
        with store.writer(expected=wrong) as blob:
            blob.write(b"content")
    assert str(wrong) in str(info.value) and str(Digest.of(b"content")) in str(info.value)
    assert blob_files(store) == set() and tmp_files(store) == []
    assert_clean(store)


def test_writer_with_a_wrong_size_commits_nothing(store: Store) -> None:
    with pytest.raises(DigestMismatch):
        with store.writer(size=10) as blob:
            blob.write(b"short")
    with pytest.raises(DigestMismatch, match="larger than expected"):
        with store.writer(size=3) as blob:
            blob.write(b"too long")
    assert blob_files(store) == set() and tmp_files(store) == []


def test_exception_inside_writer_commits_nothing(store: Store) -> None:
    with pytest.raises(KeyError):
        with store.writer() as blob:
            blob.write(b"partial")
            raise KeyError("compressor failed")
    assert blob_files(store) == set() and tmp_files(store) == []
    with pytest.raises(RuntimeError):
        blob.digest  # noqa: B018


def test_a_resumable_writer_keeps_what_it_got_for_the_next_run(store: Store) -> None:
    data = os.urandom(3 << 20)
    digest = Digest.of(data)
    with pytest.raises(ConnectionError):
        with store.writer(expected=digest, size=len(data), resumable=True) as blob:
            blob.write(data[:1000_000])
            raise ConnectionError("cut")
    assert blob_files(store) == set() and len(tmp_files(store)) == 1, "the partial blob stays in tmp/"
    assert store.verify() == []
    with store.writer(expected=digest, size=len(data), resumable=True) as blob:
        assert blob.size == 1000_000, "a new writer of the same blob starts where the last one stopped"
        blob.write(data[blob.size:])
    assert blob.digest == digest and store.read_blob(digest) == data
    assert tmp_files(store) == []


def test_a_resumed_partial_that_turns_out_corrupt_is_dropped(store: Store) -> None:
    data = os.urandom(1 << 20)
    digest = Digest.of(data)
    with pytest.raises(ConnectionError):
        with store.writer(expected=digest, size=len(data), resumable=True) as blob:
            blob.write(bytes([data[0] ^ 1]) + data[1:5000])  # a bit that was flipped on the way
            raise ConnectionError("cut")
    with pytest.raises(DigestMismatch):
        with store.writer(expected=digest, size=len(data), resumable=True) as blob:
            blob.write(data[blob.size:])
    assert tmp_files(store) == [] and not store.has(digest)
    with store.writer(expected=digest, size=len(data), resumable=True) as blob:
        assert blob.size == 0
        blob.write(data)
    assert store.read_blob(digest) == data


def test_gc_keeps_a_recent_partial_download_and_removes_an_abandoned_one(store: Store) -> None:
    for name, data in (("recent", b"r" * 5000), ("abandoned", b"a" * 5000)):
        with pytest.raises(ConnectionError):
            with store.writer(expected=Digest.of(name.encode()), size=10_000, resumable=True) as blob:
                blob.write(data)
                raise ConnectionError("cut")
    old = next(p for p in tmp_files(store) if p.name.endswith(Digest.of(b"abandoned").hex))
    os.utime(old, (0, 0))
    store.gc()
    assert [p.name for p in tmp_files(store)] == [f"partial-sha256-{Digest.of(b'recent').hex}"]


def test_restart_throws_away_what_was_written(store: Store) -> None:
    data = b"the whole blob"
    with store.writer(expected=Digest.of(data), size=len(data), resumable=True) as blob:
        blob.write(b"the wh")
        blob.restart()
        assert blob.size == 0
        blob.write(data)
    assert store.read_blob(blob.digest) == data


def test_a_partial_held_by_another_writer_is_not_shared(store: Store) -> None:
    data = os.urandom(100_000)
    digest = Digest.of(data)
    with store.writer(expected=digest, size=len(data), resumable=True) as first:
        first.write(data[:50_000])
        with store.writer(expected=digest, size=len(data), resumable=True) as second:
            assert second.size == 0, "the partial file is locked by the first writer"
            second.write(data)
        first.write(data[50_000:])
    assert store.read_blob(digest) == data and tmp_files(store) == []


def test_unsynced_writes_then_sync(store: Store) -> None:
    digests = []
    for i in range(5):
        with store.writer(sync=False) as blob:
            blob.write(b"blob %d" % i)
        digests.append(blob.digest)
    store.sync()
    assert all(store.read_blob(d) == b"blob %d" % i for i, d in enumerate(digests))


def test_put_file(store: Store, tmp_path: Path) -> None:
    source = tmp_path / "layer.tar"
    data = os.urandom(3 * 1024 * 1024 + 5)
    source.write_bytes(data)
    descriptor = store.put_file(source, oci.LAYER_TAR)
    assert descriptor == Descriptor(oci.LAYER_TAR, Digest.of(data), len(data))
    assert store.put_file(source, oci.LAYER_TAR, expected=Digest.of(data)) == descriptor
    other = tmp_path / "other"
    other.write_bytes(b"x")
    with pytest.raises(DigestMismatch):
        store.put_file(other, oci.LAYER_TAR, expected=Digest.of(b"y"))
    with pytest.raises(StoreError, match="missing"):
        store.put_file(tmp_path / "missing", oci.LAYER_TAR)
    assert blob_files(store) == {Digest.of(data).hex}
    assert_clean(store)


def test_manifest_and_config_round_trip(store: Store) -> None:
    manifest_descriptor, config_descriptor, layer = put_image(store, "dev", {"a": b"1"})
    manifest = store.get_manifest(manifest_descriptor.digest)
    assert store.read_blob(manifest_descriptor.digest) == manifest.to_json()
    assert manifest.config == config_descriptor and manifest.layers == (layer,)
    assert manifest_descriptor.media_type == oci.OCI_MANIFEST
    assert store.get_config(config_descriptor.digest).diff_ids == (tar_gz({"a": b"1"})[1],)
    with pytest.raises(FormatError, match=str(layer.digest)):
        store.get_manifest(layer.digest)
    assert_clean(store)


# ------------------------------------------------------------------------------------------------- tags


def test_tag_resolve_untag(store: Store) -> None:
    first, _, _ = put_image(store, "dev", {"a": b"1"})
    second, _, _ = put_image(store, None, {"a": b"2"})
    assert store.resolve("dev") == replace(first.with_annotations({oci.ANNOTATION_REF_NAME: "dev"}),
                                           platform=oci.Platform("linux", "amd64"))
    assert store.resolve("other") is None
    store.tag("dev", second)
    store.tag("registry.example/app:1.0", second)
    assert [d.ref_name for d in store.index().manifests] == ["dev", "registry.example/app:1.0"]
    resolved = store.resolve("dev")
    assert resolved is not None and resolved.digest == second.digest
    assert store.untag("dev") is True
    assert store.untag("dev") is False
    assert store.resolve("dev") is None
    with pytest.raises(FormatError):
        store.tag("bad tag", second)
    with pytest.raises(BlobNotFound):
        store.tag("ghost", Descriptor(oci.OCI_MANIFEST, Digest.of(b"ghost"), 5))
    assert_clean(store)


def test_update_index_and_lock_reentrancy(store: Store) -> None:
    manifest, _, _ = put_image(store, None, {})
    with store.lock(), store.lock():
        index = store.update_index(lambda i: i.with_tag("x", manifest).with_tag("y", manifest))
    assert [d.ref_name for d in index.manifests] == ["x", "y"]
    assert store.index() == index
    assert not (store.root / "index.json.tmp").exists() and not list(store.root.glob(".index.json.*"))


def test_malformed_index_names_the_file(store: Store) -> None:
    (store.root / "index.json").write_text("{nope")
    with pytest.raises(StoreError, match="index.json is not valid JSON"):
        store.index()
    assert any("index.json" in p for p in store.verify())
    with pytest.raises(StoreError, match="cannot tell which blobs are in use"):
        store.gc()


def _tag_many(root: str, worker: int, count: int, descriptor: Descriptor) -> None:
    # Only the lock is under test: without fsync each turn is shorter, so a lost update would be likelier.
    os.fsync = lambda fd: None
    store = Store.open(Path(root), create=False)
    for n in range(count):
        store.tag(f"w{worker}-{n}", descriptor)


def test_concurrent_tagging_loses_nothing(store: Store) -> None:
    manifest, _, _ = put_image(store, None, {})
    context = multiprocessing.get_context("fork")  # fast to start; the children open their own Store
    workers = [context.Process(target=_tag_many, args=(str(store.root), w, 50, manifest)) for w in range(3)]
    for process in workers:
        process.start()
    for process in workers:
        process.join(60)
    assert [p.exitcode for p in workers] == [0, 0, 0]
    names = [d.ref_name for d in store.index().manifests]
    assert sorted(names) == sorted(f"w{w}-{n}" for w in range(3) for n in range(50))
    assert_clean(store)


# ----------------------------------------------------------------------------------------- verify, gc


def test_verify_is_clean_on_a_good_store(store: Store) -> None:
    put_image(store, "one", {"a": b"1"})
    amd64, _, _ = put_image(store, None, {"b": b"2"})
    arm64, _, _ = put_image(store, None, {"c": b"3"})
    nested = Index((amd64, arm64))
    store.tag("multi", store.put(nested.to_json(), oci.OCI_INDEX))
    store.private_dir("cache")
    (store.root / "ocibuild" / "tmp" / "blob-stray").write_bytes(b"half written")
    assert store.verify() == []


def test_verify_reports_corrupt_missing_and_dangling(store: Store) -> None:
    manifest, config, layer = put_image(store, "app", {"a": b"1"})
    gone, _, _ = put_image(store, "gone", {"g": b"1"})
    orphan = store.put(b"orphan", oci.LAYER_TAR)
    flip_byte(store.blob_path(config.digest))
    store.blob_path(layer.digest).unlink()
    store.blob_path(gone.digest).unlink()  # the tag 'gone' now dangles
    (store.root / "blobs" / "sha256" / "not-a-digest").write_bytes(b"")
    problems = store.verify()
    assert problems == [
        f"blob {config.digest} is corrupt (content hashes to {Digest.of(store.blob_path(config.digest).read_bytes())})",
        "blobs/sha256/not-a-digest is not a blob (unexpected name or type)",
        f"tag 'app' > layer 0: blob {layer.digest} is missing",
        f"tag 'gone': blob {gone.digest} is missing",
    ]
    unreachable = store.verify(unreachable=True)
    assert f"blob {orphan.digest} is not reachable from index.json (`ocibuild gc` removes it)" in unreachable
    assert manifest.digest.hex in blob_files(store)


def test_verify_reports_size_mismatch_and_unparseable_manifest(store: Store) -> None:
    manifest, _, layer = put_image(store, "app", {"a": b"1"})
    store.tag("wrong-size", Descriptor(oci.OCI_MANIFEST, manifest.digest, manifest.size + 1))
    store.tag("not-a-manifest", Descriptor(oci.OCI_MANIFEST, layer.digest, layer.size))
    problems = store.verify()
    assert len(problems) == 2
    assert problems[0] == (
        f"tag 'wrong-size': blob {manifest.digest} has {manifest.size} bytes, the descriptor says {manifest.size + 1}"
    )
    assert problems[1].startswith(f"tag 'not-a-manifest': manifest {layer.digest} is not valid JSON")


def test_gc_removes_only_unreachable_blobs(store: Store) -> None:
    kept = put_image(store, "one", {"a": b"1"})
    amd64 = put_image(store, None, {"b": b"2"})
    arm64 = put_image(store, None, {"c": b"3"})
    nested = store.put(Index((amd64[0], arm64[0])).to_json(), oci.OCI_INDEX)
    store.tag("multi", nested)
    untagged = put_image(store, "old", {"d": b"4"})
    store.untag("old")
    loose = store.put(b"loose" * 100, oci.LAYER_TAR)
    cache = store.private_dir("cache")
    (cache / "entry").write_text("keep me")
    tmp = store.private_dir("tmp")
    (tmp / "blob-crashed").write_bytes(b"x" * 7)  # a writer's: stale, as no lease is held
    (store.root / "index.json.tmp").write_bytes(b"{}")  # stale, as gc holds the lock
    (tmp / "scratch-young").write_bytes(b"in use")  # another module's: kept for an hour
    (tmp / "scratch-old").write_bytes(b"abandoned")
    os.utime(tmp / "scratch-old", (0, 0))
    (tmp / "workdir").mkdir()
    expected_freed = sum(d.size for d in (*untagged, loose)) + 7 + 2 + 9

    assert store.gc() == (4, expected_freed)
    reachable = {d.digest for d in (*kept, *amd64, *arm64, nested)}
    assert blob_files(store) == {d.hex for d in reachable}
    assert store.reachable() == reachable
    assert (cache / "entry").read_text() == "keep me"
    assert (store.root / "ocibuild" / "lock").exists()
    assert not (store.root / "index.json.tmp").exists()
    assert sorted(p.name for p in tmp.iterdir()) == ["scratch-young", "workdir"]
    assert store.gc() == (0, 0)
    assert store.verify() == []


def test_gc_removes_what_an_interrupted_atomic_write_left(store: Store) -> None:
    """index.json and oci-layout are written with files.atomic_write: a crash leaves its temporary file beside them."""
    index_tmp = store.root / ".index.json.123.abcd.tmp"  # written under the lock, which gc holds: a leftover
    index_tmp.write_bytes(b"{}")
    young = store.root / ".oci-layout.123.abcd.tmp"  # a concurrent creation may still rename it: kept for an hour
    young.write_bytes(b"{}")
    old = store.root / ".oci-layout.456.abcd.tmp"
    old.write_bytes(b"{}")
    os.utime(old, (0, 0))
    assert store.gc() == (0, 4)
    assert not index_tmp.exists() and not old.exists() and young.exists()
    assert store.verify() == []


def test_open_ignores_what_an_interrupted_creation_left(tmp_path: Path) -> None:
    (tmp_path / ".oci-layout.123.abcd.tmp").write_bytes(b"{")
    store = Store.open(tmp_path)
    assert store.index() == Index(()) and store.verify() == []


def test_gc_refuses_when_a_tagged_manifest_is_unreadable(store: Store) -> None:
    manifest, _, layer = put_image(store, "app", {"a": b"1"})
    flip_byte(store.blob_path(manifest.digest))
    with pytest.raises(StoreError, match=f"tag 'app': manifest {manifest.digest} cannot be read"):
        store.gc()
    assert store.has(layer.digest)


def test_gc_waits_for_leases(store: Store) -> None:
    other = Store.open(store.root)
    orphan = store.put(b"orphan", oci.LAYER_TAR)
    with other.lease():
        with pytest.raises(StoreError, match="in use by another ocibuild process"):
            store.gc(wait=False)
        with pytest.raises(StoreError, match="cannot run while this process holds a lease"):
            other.gc()
    assert store.gc(wait=False) == (1, orphan.size)


def test_private_dir(store: Store) -> None:
    path = store.private_dir("downloads")
    assert path == store.root / "ocibuild" / "downloads" and path.is_dir()
    assert store.private_dir("tmp") == store.root / "ocibuild" / "tmp"  # for other modules' temporary files
    for bad in ("", "..", "a/b", "lock", "lease"):
        with pytest.raises(ValueError):
            store.private_dir(bad)


def test_sha512_blobs(store: Store) -> None:
    data = b"sha512 content"
    digest = Digest("sha512", hashlib.sha512(data).hexdigest())
    with store.writer(expected=digest) as blob:
        blob.write(data)
    assert blob.digest == digest and store.read_blob(digest) == data
    assert store.blob_path(digest) == store.root / "blobs" / "sha512" / digest.hex
    assert store.verify() == []


@pytest.mark.parametrize("first_writer", ["commits", "fails"])
def test_three_writers_of_one_partial_never_commit_each_others_file(store: Store, first_writer: str,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """C opens the partial file; before its flock is granted, A (holding it) commits it into blobs/ or fails and
    removes it, and B creates a new partial file at the path and writes half of the blob. C's lock is then on a
    file the path no longer names: C must not resume it, nor rename or remove B's unfinished file by path."""
    import contextlib
    import fcntl

    data = os.urandom(200_000)
    digest = Digest.of(data)
    real_flock = fcntl.flock
    later = contextlib.ExitStack()
    writers: dict[str, object] = {}

    def interleave(fd: int, operation: int) -> None:
        if "C" not in writers or "partial-" not in os.readlink(f"/proc/self/fd/{fd}"):
            return real_flock(fd, operation)
        del writers["C"]  # once: C has opened the partial file and asks for its lock
        try:
            with store.writer(expected=digest, size=len(data), resumable=True) as a:
                if first_writer == "fails":
                    raise ConnectionError("cut before the first byte")
                a.write(data)
        except ConnectionError:
            pass
        b = later.enter_context(store.writer(expected=digest, size=len(data), resumable=True))
        assert b.size == 0
        b.write(data[:100_000])
        writers["B"] = b
        return real_flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", interleave)
    writers["C"] = True
    with later:
        with store.writer(expected=digest, size=len(data), resumable=True) as c:
            c.write(data[c.size:])
        assert "B" in writers, "the interleaving ran"
        assert store.read_blob(digest) == data, "blobs/ holds the whole blob, not B's half"
        writers["B"].write(data[100_000:])  # type: ignore[attr-defined]
    assert store.read_blob(digest) == data and store.verify() == []
    assert tmp_files(store) == []


# ------------------------------------------------------------------------------------------------ cache entries


def _put_entry(store: Store, key: Digest, *, label: str | None = None, diff_ids: int = 1,
               layer_size: int | None = None, document: str | None = None) -> tuple[str, Descriptor]:
    """A one-layer cache entry tagged for ``key`` as it would be by hand (not through the checked door), with its
    key label, diff_ids count or layer size broken on demand, and a key document label when given: (its tag, its
    layer descriptor)."""
    blob, diff_id = tar_gz({"f": key.hex.encode()})
    layer = store.put(blob, oci.LAYER_GZIP)
    labels = {"dev.ocibuild.layer.key": str(key) if label is None else label}
    if document is not None:
        labels["dev.ocibuild.layer.document"] = document
    config = store.put(ImageConfig(diff_ids=(diff_id,) * diff_ids, labels=labels).to_json(), oci.OCI_CONFIG)
    listed = layer if layer_size is None else Descriptor(layer.media_type, layer.digest, layer_size)
    tag = f"src-{key.hex}"
    store.tag(tag, store.put_manifest(Manifest(config, (listed,))))
    return tag, layer


def test_verify_accepts_sound_cache_entries(store: Store) -> None:
    _put_entry(store, Digest.of(b"k1"))
    _put_entry(store, Digest.of(b"k2"))
    assert store.verify() == []


def test_verify_names_a_cache_entry_whose_key_label_is_another_key(store: Store) -> None:
    key, other = Digest.of(b"k1"), Digest.of(b"k2")
    tag, _ = _put_entry(store, key, label=str(other))
    assert store.verify() == [f"cache entry '{tag}': its key label is '{other}', its tag names the key {key}"]


def test_verify_names_a_cache_entry_without_a_key_label(store: Store) -> None:
    key = Digest.of(b"k1")
    tag, _ = _put_entry(store, key, label="")
    assert store.verify() == [f"cache entry '{tag}': its key label is '', its tag names the key {key}"]


def test_verify_accepts_an_entry_whose_key_document_is_its_key_and_names_one_whose_is_not(store: Store) -> None:
    document = '{"format":3,"kind":"copy"}'
    key = Digest.of(document.encode())
    _put_entry(store, key, document=document)
    assert store.verify() == []
    other = Digest.of(b"k2")
    tag, _ = _put_entry(store, other, document=document)
    assert store.verify() == [f"cache entry '{tag}': its key document hashes to {key}, its tag names {other}"]


def test_an_entry_whose_key_document_is_another_key_is_not_added(store: Store) -> None:
    document = '{"format":3,"kind":"copy"}'
    other = Digest.of(b"k2")
    blob, diff_id = tar_gz({"f": b"x"})
    layer = store.put(blob, oci.LAYER_GZIP)
    labels = {"dev.ocibuild.layer.key": str(other), "dev.ocibuild.layer.document": document}
    config = store.put(ImageConfig(diff_ids=(diff_id,), labels=labels).to_json(), oci.OCI_CONFIG)
    descriptor = store.put_manifest(Manifest(config, (layer,)))
    with pytest.raises(StoreError, match="its key document hashes to"):
        add_cache_entries(store, {f"src-{other.hex}": descriptor}, what="pull")
    assert store.resolve(f"src-{other.hex}") is None


def test_verify_names_a_cache_entry_whose_diff_ids_do_not_match_its_layers(store: Store) -> None:
    tag, _ = _put_entry(store, Digest.of(b"k1"), diff_ids=2)
    assert store.verify() == [f"cache entry '{tag}': 1 layers but 2 diff_ids"]


def test_verify_names_a_cache_entry_whose_layer_size_is_not_its_blobs(store: Store) -> None:
    tag, layer = _put_entry(store, Digest.of(b"k1"), layer_size=1)
    assert store.verify() == [
        f"tag '{tag}' > layer 0: blob {layer.digest} has {layer.size} bytes, the descriptor says 1"]
