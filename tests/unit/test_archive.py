"""export → archive → import between stores, in process: round trips, deltas, inventories, input artifacts, and
archives that are cut, corrupt or mix up media types (rejected, the store left as it was)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import pytest

from ocibuild import archive as oci_archive, oci
from ocibuild.archive.export import _header
from ocibuild.errors import DigestMismatch, FormatError, OcibuildError, UnsafeArchive
from ocibuild.oci import Descriptor, Digest, ImageConfig, Manifest
from ocibuild.store import Store
from ocibuild.store.entries import is_cache_tag


def put_image(store: Store, tag: str, layers: list[bytes]) -> Descriptor:
    """An image of opaque 'layers' (only copied, never unpacked here), tagged ``tag``; under a cache entry's tag
    (``<name>-<64 hex>``) its config carries that key's label, as a genuine entry does."""
    descriptors = [store.put(data, oci.LAYER_GZIP) for data in layers]
    labels = {"dev.ocibuild.layer.key": f"sha256:{tag[-64:]}"} if is_cache_tag(tag) else {}
    config = store.put(ImageConfig(diff_ids=tuple(Digest.of(d) for d in layers), labels=labels).to_json(),
                       oci.OCI_CONFIG)
    manifest = store.put_manifest(Manifest(config, tuple(descriptors)))
    store.tag(tag, manifest)
    return manifest


def add_download(store: Store, data: bytes) -> Digest:
    digest = Digest.of(data)
    (oci_archive.downloads_dir(store) / digest.hex).write_bytes(data)
    return digest


def members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}  # type: ignore[union-attr]


@pytest.fixture
def source(tmp_path: Path) -> Store:
    s = Store.open(tmp_path / "source")
    put_image(s, "base-" + "a" * 64, [os.urandom(3 << 20), b"small layer"])
    put_image(s, "dev", [os.urandom(100), b"x" * 5000, b""])
    yield s
    assert s.verify() == []


@pytest.fixture
def target(tmp_path: Path) -> Store:
    s = Store.open(tmp_path / "target")
    yield s
    assert s.verify() == [], "the store must verify clean after every test"


def test_round_trip_carries_tags_blobs_and_inputs(source: Store, target: Store, tmp_path: Path) -> None:
    tarball = add_download(source, b"release tarball " * 1000)
    inputs = oci_archive.downloaded_inputs(source)
    archive = tmp_path / "all.tar"
    result = oci_archive.export_archive(source, archive, ["base-" + "a" * 64, "dev"], inputs=inputs)
    assert result.tags == ("base-" + "a" * 64, "dev") and result.inputs == (tarball,)
    # a plain layout: every blob under its digest
    for name, data in members(archive).items():
        if name.startswith("blobs/"):
            assert hashlib.sha256(data).hexdigest() == name.rsplit("/", 1)[1]
    imported = oci_archive.import_archive(target, archive)
    assert set(imported.tags) == set(result.tags) and imported.inputs == 1 and imported.untagged == 0
    for tag in ("dev", "base-" + "a" * 64):
        assert target.resolve(tag).digest == source.resolve(tag).digest  # type: ignore[union-attr]
    assert (oci_archive.downloads_dir(target) / tarball.hex).read_bytes() == b"release tarball " * 1000
    again = oci_archive.import_archive(target, archive)  # a second import writes nothing
    assert again.blobs == 0 and again.present > 0


def test_inputs_travel_untagged_so_image_importers_make_no_image_of_them(source: Store, tmp_path: Path) -> None:
    """`ctr images import` makes an image of every tagged manifest and unpacks it: each must be an image whose
    config lists a diff_id per layer. An input artifact is listed without a tag, found by its artifactType."""
    tarball = add_download(source, b"release tarball")
    archive = tmp_path / "all.tar"
    oci_archive.export_archive(source, archive, ["dev"], inputs=oci_archive.downloaded_inputs(source))
    files = members(archive)
    listed = oci.Index.parse(files["index.json"]).manifests
    for descriptor in listed:
        manifest = Manifest.parse(files[f"blobs/sha256/{descriptor.digest.hex}"])
        if descriptor.ref_name is None:
            assert descriptor.artifact_type == manifest.artifact_type == oci_archive.INPUT_ARTIFACT
            assert [d.digest for d in manifest.layers] == [tarball]
        else:
            config = ImageConfig.parse(files[f"blobs/sha256/{manifest.config.digest.hex}"])
            assert len(config.diff_ids) == len(manifest.layers)
    assert [d.ref_name for d in listed] == ["dev", None]


def test_inventory_and_delta_export(source: Store, target: Store, tmp_path: Path) -> None:
    oci_archive.import_archive(target, _export(source, tmp_path / "base.tar", ["base-" + "a" * 64]))
    inventory = oci_archive.Inventory.parse(oci_archive.inventory(target).to_json())
    assert inventory.tags["base-" + "a" * 64] == source.resolve("base-" + "a" * 64).digest  # type: ignore[union-attr]
    put_image(source, "dev2", [os.urandom(2 << 20), b"small layer"])  # shares a layer with base
    delta = tmp_path / "delta.tar"
    result = oci_archive.export_archive(source, delta, ["base-" + "a" * 64, "dev2"], since=inventory)
    blobs = {name.rsplit("/", 1)[1] for name in members(delta) if name.startswith("blobs/")}
    missing = {d.digest.hex for tag in ("base-" + "a" * 64, "dev2")
               for d in oci_archive.manifest_closure(source, source.resolve(tag))  # type: ignore[arg-type]
               if not target.has(d.digest)}
    assert blobs == missing and result.skipped > 0
    index = oci.Index.parse(members(delta)["index.json"])
    assert [d.ref_name for d in index.manifests] == ["base-" + "a" * 64, "dev2"]  # the index lists every manifest
    imported = oci_archive.import_archive(target, delta)
    assert imported.blobs == len(missing)
    assert target.resolve("dev2").digest == source.resolve("dev2").digest  # type: ignore[union-attr]
    # a delta imports only where the rest already is
    with pytest.raises(FormatError, match="in neither the archive nor the store"):
        oci_archive.import_archive(Store.open(tmp_path / "empty"), delta)
    assert Store.open(tmp_path / "empty").index().manifests == ()


def _export(store: Store, path: Path, tags: list[str]) -> Path:
    oci_archive.export_archive(store, path, tags)
    return path


def test_write_oci_archive_holds_one_manifest(source: Store, tmp_path: Path) -> None:
    path = tmp_path / "image.tar"
    oci_archive.write_oci_archive(source, source.resolve("dev"), "dev", path)  # type: ignore[arg-type]
    index = oci.Index.parse(members(path)["index.json"])
    assert [d.ref_name for d in index.manifests] == ["dev"]


def test_long_blob_names_use_pax(tmp_path: Path) -> None:
    header = _header("blobs/sha512/" + "a" * 128, 3)
    with tarfile.open(fileobj=io.BytesIO(header + b"abc" + bytes(509) + bytes(1024))) as tar:
        assert tar.getnames() == ["blobs/sha512/" + "a" * 128]


# ---- damaged archives: rejected, nothing tagged, the store verifies clean -----------------------------------


@pytest.fixture
def archive(source: Store, tmp_path: Path) -> Path:
    return _export(source, tmp_path / "good.tar", ["base-" + "a" * 64, "dev"])


def _rejected(target: Store, path: Path, error: type[OcibuildError], match: str) -> None:
    before = (target.root / "index.json").read_bytes()
    with pytest.raises(error, match=match):
        oci_archive.import_archive(target, path)
    assert (target.root / "index.json").read_bytes() == before
    assert target.verify() == []


@pytest.mark.parametrize("keep", [0.3, 0.9999, -1024, -1])
def test_truncated_archive_is_rejected(archive: Path, target: Store, tmp_path: Path, keep: float) -> None:
    data = archive.read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: int(len(data) * keep)] if keep > 0 else data[: int(keep)])
    _rejected(target, cut, UnsafeArchive, "truncated")


def test_bit_flip_in_a_layer_is_rejected(archive: Path, target: Store, tmp_path: Path, source: Store) -> None:
    data = bytearray(archive.read_bytes())
    big = next(d for d in source.get_manifest(source.resolve("base-" + "a" * 64).digest).layers  # type: ignore[union-attr]
               if d.size > 1 << 20)
    position = data.find(source.read_blob(big.digest, max_size=8 << 20)[:4096])
    data[position + 2_000_000] ^= 0x01
    flipped = tmp_path / "flipped.tar"
    flipped.write_bytes(bytes(data))
    _rejected(target, flipped, DigestMismatch, f"blob {big.digest} is corrupt")
    assert not target.has(big.digest)


def test_bit_flip_in_a_header_is_rejected(archive: Path, target: Store, tmp_path: Path) -> None:
    data = bytearray(archive.read_bytes())
    data[1] ^= 0x40  # inside the name in the first header: its checksum no longer matches
    flipped = tmp_path / "flipped.tar"
    flipped.write_bytes(bytes(data))
    _rejected(target, flipped, UnsafeArchive, "checksum")


def _rewrite(archive: Path, out: Path, change: dict[str, bytes]) -> Path:
    """``archive`` with some files' content replaced (written by tarfile, as another tool would)."""
    files = members(archive)
    files.update(change)
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out


def _put_json(files: dict[str, bytes], value: object) -> tuple[str, bytes, Digest]:
    data = oci.canonical_json(value)
    digest = Digest.of(data)
    return f"blobs/sha256/{digest.hex}", data, digest


def test_descriptor_says_manifest_but_blob_is_an_index(archive: Path, target: Store, tmp_path: Path) -> None:
    files = members(archive)
    name, data, digest = _put_json(files, {"schemaVersion": 2, "mediaType": oci.OCI_INDEX, "manifests": []})
    index = {"schemaVersion": 2, "mediaType": oci.OCI_INDEX, "manifests": [
        {"mediaType": oci.OCI_MANIFEST, "digest": str(digest), "size": len(data),
         "annotations": {oci.ANNOTATION_REF_NAME: "x"}}]}
    bad = _rewrite(archive, tmp_path / "mixed.tar", {name: data, "index.json": json.dumps(index).encode()})
    _rejected(target, bad, FormatError, "is a 'application/vnd.oci.image.index.v1\\+json'")


def test_layer_descriptor_with_a_manifest_media_type(source: Store, archive: Path, target: Store,
                                                     tmp_path: Path) -> None:
    manifest = source.get_manifest(source.resolve("dev").digest)  # type: ignore[union-attr]
    layers = [Descriptor(oci.OCI_MANIFEST, d.digest, d.size) for d in manifest.layers]
    mixed = Manifest(manifest.config, tuple(layers)).to_json()
    digest = Digest.of(mixed)
    index = {"schemaVersion": 2, "manifests": [{"mediaType": oci.OCI_MANIFEST, "digest": str(digest),
                                                "size": len(mixed), "annotations": {oci.ANNOTATION_REF_NAME: "x"}}]}
    bad = _rewrite(archive, tmp_path / "mixed.tar",
                   {f"blobs/sha256/{digest.hex}": mixed, "index.json": json.dumps(index).encode()})
    _rejected(target, bad, FormatError, "not a layer")


def test_config_that_is_not_a_config(source: Store, archive: Path, target: Store, tmp_path: Path) -> None:
    manifest = source.get_manifest(source.resolve("dev").digest)  # type: ignore[union-attr]
    config = Descriptor(oci.OCI_CONFIG, manifest.layers[1].digest, manifest.layers[1].size)  # a layer as config
    mixed = Manifest(config, manifest.layers).to_json()
    digest = Digest.of(mixed)
    index = {"schemaVersion": 2, "manifests": [{"mediaType": oci.OCI_MANIFEST, "digest": str(digest),
                                                "size": len(mixed), "annotations": {oci.ANNOTATION_REF_NAME: "x"}}]}
    bad = _rewrite(archive, tmp_path / "mixed.tar",
                   {f"blobs/sha256/{digest.hex}": mixed, "index.json": json.dumps(index).encode()})
    _rejected(target, bad, FormatError, "config")


def test_size_in_descriptor_differs_from_the_blob(source: Store, archive: Path, target: Store,
                                                  tmp_path: Path) -> None:
    descriptor = source.resolve("dev")
    assert descriptor is not None
    index = {"schemaVersion": 2, "manifests": [{"mediaType": oci.OCI_MANIFEST, "digest": str(descriptor.digest),
                                                "size": descriptor.size + 1,
                                                "annotations": {oci.ANNOTATION_REF_NAME: "dev"}}]}
    bad = _rewrite(archive, tmp_path / "size.tar", {"index.json": json.dumps(index).encode()})
    _rejected(target, bad, DigestMismatch, "bytes")


def test_blob_whose_content_does_not_match_its_name(source: Store, archive: Path, target: Store,
                                                    tmp_path: Path) -> None:
    manifest = source.get_manifest(source.resolve("dev").digest)  # type: ignore[union-attr]
    layer = manifest.layers[1]
    bad = _rewrite(archive, tmp_path / "swapped.tar", {f"blobs/sha256/{layer.digest.hex}": b"y" * layer.size})
    _rejected(target, bad, DigestMismatch, "corrupt")
    assert not target.has(layer.digest)


def test_an_archive_written_by_tarfile_imports(archive: Path, target: Store, tmp_path: Path) -> None:
    """GNU and PAX writers (as other tools use) are read: './'-prefixed names, directories, PAX headers."""
    files = members(archive)
    out = tmp_path / "gnu.tar"
    with tarfile.open(out, "w", format=tarfile.GNU_FORMAT) as tar:
        for directory in ("./", "./blobs/", "./blobs/sha256/"):
            info = tarfile.TarInfo(directory)
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
        for name, data in files.items():
            info = tarfile.TarInfo("./" + name)
            info.size, info.uname, info.mtime = len(data), "someone", 1700000000
            tar.addfile(info, io.BytesIO(data))
    assert set(oci_archive.import_archive(target, out).tags) == {"base-" + "a" * 64, "dev"}


def test_invalid_tag_name_is_refused_before_anything_is_written(archive: Path, target: Store,
                                                                tmp_path: Path, source: Store) -> None:
    descriptor = source.resolve("dev")
    assert descriptor is not None
    index = oci.Index((descriptor.with_annotations({oci.ANNOTATION_REF_NAME: "../bad name"}),))
    bad = _rewrite(archive, tmp_path / "name.tar", {"index.json": index.to_json()})
    _rejected(target, bad, FormatError, "not a valid tag name")
    assert list(target.blobs()) == []


def test_scan_reads_from_the_start_whatever_the_fd_position(archive: Path) -> None:
    fd = os.open(archive, os.O_RDONLY)
    try:
        first = oci_archive.scan_archive(fd, "archive")
        assert "index.json" in first and oci_archive.scan_archive(fd, "archive") == first
    finally:
        os.close(fd)


def test_import_adds_cache_entries_only_through_the_checks(tmp_path: Path) -> None:
    """An imported cache entry must carry the key its tag names, and never re-points a tag of the store: the same
    layer otherwise compressed leaves the first entry; other content for the key is a conflict naming both
    digests, and the store keeps the first. Nothing of a refused archive is tagged."""
    from ocibuild.errors import EntryConflict, StoreError

    tag = "base-" + "a" * 64
    target = Store.open(tmp_path / "target")
    first = put_image(target, tag, [b"the layer"])

    def archive(name: str, layers: list[bytes], label: str | None = None) -> Path:
        source = Store.open(tmp_path / name)
        manifest = put_image(source, tag, layers)
        if label is not None:  # the same layers under a config whose key label names another key
            config = source.put(ImageConfig(diff_ids=tuple(Digest.of(d) for d in layers),
                                            labels={"dev.ocibuild.layer.key": label}).to_json(), oci.OCI_CONFIG)
            manifest = source.put_manifest(Manifest(config, source.get_manifest(manifest.digest).layers))
            source.tag(tag, manifest)
        put_image(source, "dev", [b"image layer"])
        return _export(source, tmp_path / f"{name}.tar", [tag, "dev"])

    with pytest.raises(StoreError, match=rf"cache entry '{tag}': its key label is 'sha256:b{{64}}', its tag names"):
        oci_archive.import_archive(target, archive("mislabelled", [b"the layer"], label="sha256:" + "b" * 64))
    with pytest.raises(EntryConflict, match=rf"cache entry {tag}: the store has {first.digest}.* as sha256:") as err:
        oci_archive.import_archive(target, archive("other", [b"other content"]))
    assert str(first.digest) in str(err.value)
    assert target.resolve(tag).digest == first.digest and target.resolve("dev") is None  # type: ignore[union-attr]
    # the same layer otherwise compressed (another blob, the same diff_id): no conflict, the first entry stays
    source = Store.open(tmp_path / "recompressed")
    layer = source.put(b"the layer, as zstd", oci.LAYER_ZSTD)
    config = source.put(ImageConfig(diff_ids=(Digest.of(b"the layer"),),
                                    labels={"dev.ocibuild.layer.key": "sha256:" + "a" * 64}).to_json(), oci.OCI_CONFIG)
    source.tag(tag, source.put_manifest(Manifest(config, (layer,))))
    put_image(source, "dev", [b"image layer"])
    oci_archive.import_archive(target, _export(source, tmp_path / "recompressed.tar", [tag, "dev"]))
    assert target.resolve(tag).digest == first.digest and target.resolve("dev") is not None  # type: ignore[union-attr]
    assert target.verify() == []
