"""The documents every client reads: image configs with dated history, cache entries that are images other tools
build on, index.json entries with their platform, OCI media types only, and refs that name a tag with a colon.
(The clients themselves read them in tests/integration/test_interop_matrix.py.)"""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from pathlib import Path

import pytest

from conftest import ProjectFactory
from ocibuild import cli, oci
from ocibuild.archive import write_oci_archive
from ocibuild.oci import Descriptor, Digest, ImageConfig, Manifest
from ocibuild.resolve import split_oci_ref
from ocibuild.store import Store
from ocibuild.store.entries import cache_tag

EPOCH = 1_700_000_000
CREATED = "2023-11-14T22:13:20Z"


def _build(root: Path, store: Store, capsys: pytest.CaptureFixture[str]) -> dict:  # type: ignore[type-arg]
    capsys.readouterr()
    assert cli.main(["build", "--json", "-C", str(root), "--store", str(store.root)]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)  # type: ignore[no-any-return]


def _two_layers(make_project: ProjectFactory, image: str = "") -> Path:
    return make_project({"a": 'kind = "copy"\nfrom = "a"\nto = "/a"\n',
                         "b": 'kind = "copy"\nfrom = "b"\nto = "/b"\nneeds = ["a"]\n'},
                        image=f"source_date_epoch = {EPOCH}\n{image}", files={"a/f": "a\n", "b/g": "b\n"})


def _entry(store: Store, layer: dict) -> tuple[Manifest, ImageConfig]:  # type: ignore[type-arg]
    descriptor = store.resolve(cache_tag(layer["name"], Digest.parse(layer["key"])))
    assert descriptor is not None
    manifest = store.get_manifest(descriptor.digest)
    return manifest, store.get_config(manifest.config.digest)


def test_history_entries_carry_the_clamped_epoch(make_project: ProjectFactory, store: Store,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """umoci stat dereferences every history entry's `created`; the image's and each entry's carry the epoch."""
    doc = _build(_two_layers(make_project), store, capsys)
    config = store.get_config(store.get_manifest(Digest.parse(doc["digest"])).config.digest)
    assert config.created == CREATED
    assert [h.created for h in config.history] == [CREATED, CREATED]
    for layer in doc["layers"]:
        _, entry = _entry(store, layer)
        assert entry.created == CREATED and [h.created for h in entry.history] == [CREATED]


def test_cache_entries_have_one_history_entry_per_layer(make_project: ProjectFactory, store: Store,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """buildah builds on an image only when its history lists as many non-empty layers as it has."""
    doc = _build(_two_layers(make_project, 'architecture = "arm64"\n'), store, capsys)
    for layer in doc["layers"]:
        manifest, config = _entry(store, layer)
        assert len(config.history) == len(manifest.layers) == len(config.diff_ids)
        assert not any(h.empty_layer for h in config.history)
        assert config.history[0].created_by == f"ocibuild copy layer '{layer['name']}'"
        assert config.history[0].comment == f"key {layer['key']}"
        assert (config.os, config.architecture) == ("linux", "arm64")


def test_index_json_lists_the_platform_of_image_manifests(make_project: ProjectFactory, store: Store,
                                                          tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = _build(_two_layers(make_project, 'architecture = "arm64"\n'), store, capsys)
    listed = json.loads((store.root / "index.json").read_bytes())["manifests"]
    assert {d["annotations"][oci.ANNOTATION_REF_NAME] for d in listed} == \
        {"dev", *(cache_tag(l["name"], Digest.parse(l["key"])) for l in doc["layers"])}
    assert all(d["platform"] == {"os": "linux", "architecture": "arm64"} for d in listed)
    # an archive of the image lists it so too
    image = store.resolve("dev")
    assert image is not None
    write_oci_archive(store, image, "dev", tmp_path / "dev.tar")
    with tarfile.open(tmp_path / "dev.tar") as tar:
        index = json.loads(tar.extractfile("index.json").read())  # type: ignore[union-attr]
    assert index["manifests"][0]["platform"] == {"os": "linux", "architecture": "arm64"}


def test_a_variant_is_listed_and_artifacts_and_indexes_carry_no_platform(store: Store) -> None:
    config = store.put(ImageConfig((), architecture="arm", variant="v7").to_json(), oci.OCI_CONFIG)
    image = store.put_manifest(Manifest(config, ()))
    empty = store.put(b"{}", oci.OCI_EMPTY)
    artifact = store.put_manifest(Manifest(empty, (store.put(b"x", "application/octet-stream"),),
                                           artifact_type="application/vnd.example"))
    index = store.put(oci.Index((image,)).to_json(), oci.OCI_INDEX)
    store.tag_all({"image": image, "artifact": artifact})
    store.tag("index", index)
    assert store.resolve("image").platform == oci.Platform("linux", "arm", "v7")  # type: ignore[union-attr]
    assert store.resolve("artifact").platform is None  # type: ignore[union-attr]
    assert store.resolve("index").platform is None  # type: ignore[union-attr]
    assert ImageConfig.parse(store.read_blob(config.digest)).variant == "v7"


def _docker_base(path: Path, tag: str) -> None:
    """An OCI layout holding a Docker schema 2 image, as `skopeo copy --format v2s2 … oci:` writes one."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        info = tarfile.TarInfo("etc/os-release")
        data = b"ID=docker\n"
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    base = Store.open(path)
    layer = base.put(gzip.compress(raw.getvalue(), mtime=0), oci.DOCKER_LAYER_GZIP)
    config = base.put(ImageConfig((Digest.of(raw.getvalue()),)).to_json(), oci.DOCKER_CONFIG)
    manifest = Manifest(config, (layer,), media_type=oci.DOCKER_MANIFEST)
    base.tag(tag, base.put_manifest(manifest))


def test_a_docker_schema2_base_is_listed_with_oci_media_types(make_project: ProjectFactory, store: Store,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """The same bytes under the OCI type: buildah refuses Docker types inside an OCI manifest."""
    root = make_project({"base": 'kind = "image"\nref = "oci:layout:v1"\n',
                         "app": 'kind = "copy"\nfrom = "src"\nto = "/app"\n'}, files={"src/f": "x"})
    _docker_base(root / "layers/base/layout", "v1")
    doc = _build(root, store, capsys)
    image = store.get_manifest(Digest.parse(doc["digest"]))
    entry, _ = _entry(store, doc["layers"][0])
    for manifest in (image, entry):
        assert manifest.media_type == oci.OCI_MANIFEST and manifest.config.media_type == oci.OCI_CONFIG
        assert [d.media_type for d in manifest.layers][:1] == [oci.LAYER_GZIP]
        assert not any("docker" in d.media_type for d in manifest.layers)
    assert entry.layers[0].digest == image.layers[0].digest  # the blob itself is the base's


def test_oci_refs_split_at_the_first_colon_as_skopeo_does() -> None:
    assert split_oci_ref("oci-archive:bb.tar:localhost/bb-amd64:1") == ("bb.tar", "localhost/bb-amd64:1")
    assert split_oci_ref("oci:layout:v1") == ("layout", "v1")
    assert split_oci_ref("oci:layout") == ("layout", None)
    assert split_oci_ref("oci:layout:") == ("layout", None)


def test_an_oci_archive_tag_with_a_colon_is_a_base(make_project: ProjectFactory, store: Store, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """`podman save` names the image localhost/bb-amd64:1 inside the archive."""
    source = Store.open(tmp_path / "source")
    base_root = make_project({"a": 'kind = "copy"\nfrom = "src"\nto = "/"\n'}, root=tmp_path / "base",
                             files={"src/etc/os-release": "ID=test\n"})
    base = _build(base_root, source, capsys)
    root = make_project({"base": 'kind = "image"\nref = "oci-archive:bb.tar:localhost/bb-amd64:1"\n'})
    descriptor = Descriptor(oci.OCI_MANIFEST, Digest.parse(base["digest"]),
                            source.resolve("dev").size)  # type: ignore[union-attr]
    write_oci_archive(source, descriptor, "localhost/bb-amd64:1", root / "layers/base/bb.tar")
    doc = _build(root, store, capsys)
    assert store.get_manifest(Digest.parse(doc["digest"])).layers == \
        source.get_manifest(Digest.parse(base["digest"])).layers
