"""What the store writes, skopeo and umoci read; what they write, the store reads."""

from __future__ import annotations

import gzip
import io
import shutil
import subprocess
import tarfile
from pathlib import Path


from ocibuild import oci
from ocibuild.oci import Descriptor, Digest, History, ImageConfig, Manifest
from ocibuild.store import Store

# CI installs both (scripts/setup-host): a missing tool fails these tests rather than skipping them.
SKOPEO = shutil.which("skopeo") or "skopeo"
UMOCI = shutil.which("umoci") or "umoci"

FILES = {"etc/motd": b"built by ocibuild\n", "usr/bin/hello": b"#!/bin/sh\necho hello\n"}


def run(*argv: str) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{' '.join(argv)} failed:\n{result.stderr}"
    return result.stdout


def skopeo_copy(source: str, destination: str) -> None:
    assert SKOPEO is not None
    run(SKOPEO, "--insecure-policy", "copy", "--quiet", source, destination)


def put_image(store: Store, tag: str) -> tuple[Descriptor, Digest]:
    """A one-layer image: a reproducible gzip tar, its config and manifest; returns (manifest, diff_id)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for directory in ("etc", "usr", "usr/bin"):
            info = tarfile.TarInfo(directory)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        for name, data in FILES.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o755 if name.startswith("usr/bin") else 0o644
            tar.addfile(info, io.BytesIO(data))
    diff_id = Digest.of(raw.getvalue())
    layer = store.put(gzip.compress(raw.getvalue(), mtime=0), oci.LAYER_GZIP)
    config = ImageConfig(
        diff_ids=(diff_id,),
        env=("PATH=/usr/bin:/bin",),
        cmd=("/usr/bin/hello",),
        history=(History(created_by="ocibuild test layer"),),
        created="2024-01-01T00:00:00Z",
    )
    config_descriptor = store.put(config.to_json(), oci.OCI_CONFIG)
    manifest = store.put_manifest(Manifest(config_descriptor, (layer,)))
    store.tag(tag, manifest)
    return manifest, diff_id


def read_layer_files(store: Store, layer: Descriptor) -> dict[str, bytes]:
    files = {}
    with store.open_blob(layer.digest, size=layer.size) as reader, tarfile.open(fileobj=reader, mode="r|gz") as tar:
        for member in tar:
            extracted = tar.extractfile(member)
            if extracted is not None:
                files[member.name] = extracted.read()
        for _ in iter(lambda: reader.read(1 << 16), b""):  # to EOF, so the digest is checked
            pass
    return files


def test_skopeo_copies_what_we_wrote_and_we_read_what_skopeo_wrote(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "store")
    manifest, diff_id = put_image(store, "v1")

    skopeo_copy(f"oci:{store.root}:v1", f"oci:{tmp_path / 'other'}:copied")

    other = Store.open(tmp_path / "other", create=False)  # a layout skopeo created
    descriptor = other.resolve("copied")
    assert descriptor is not None and descriptor.media_type == oci.OCI_MANIFEST
    copied = other.get_manifest(descriptor.digest)
    assert other.get_config(copied.config.digest).diff_ids == (diff_id,)
    assert copied.layers == store.get_manifest(manifest.digest).layers
    assert read_layer_files(other, copied.layers[0]) == FILES
    assert other.verify() == []

    skopeo_copy(f"oci:{other.root}:copied", f"oci:{store.root}:back")  # skopeo rewrites our index.json

    back = store.resolve("back")
    assert back is not None and store.get_manifest(back.digest).layers == copied.layers
    v1 = store.resolve("v1")
    assert v1 is not None and v1.digest == manifest.digest
    store.tag("again", manifest)  # we keep working on an index.json skopeo wrote
    assert {d.ref_name for d in store.index().manifests} == {"v1", "back", "again"}
    assert store.verify() == [] and store.verify(unreachable=True) == []
    assert store.gc() == (0, 0)
    assert store.verify() == []


def test_umoci_lists_and_unpacks_what_we_wrote(tmp_path: Path) -> None:
    assert UMOCI is not None
    store = Store.open(tmp_path / "store")
    put_image(store, "v1")
    put_image(store, "v2")

    assert sorted(run(UMOCI, "ls", "--layout", str(store.root)).split()) == ["v1", "v2"]
    run(UMOCI, "unpack", "--image", f"{store.root}:v1", str(tmp_path / "bundle"))
    rootfs = tmp_path / "bundle" / "rootfs"
    assert {name: (rootfs / name).read_bytes() for name in FILES} == FILES
    assert store.verify() == []


def test_we_read_what_umoci_wrote(tmp_path: Path) -> None:
    assert UMOCI is not None
    layout = tmp_path / "umoci"
    run(UMOCI, "init", "--layout", str(layout))
    run(UMOCI, "new", "--image", f"{layout}:base")
    run(UMOCI, "config", "--image", f"{layout}:base", "--config.env", "A=1", "--tag", "configured")

    store = Store.open(layout, create=False)
    descriptor = store.resolve("configured")
    assert descriptor is not None
    manifest = store.get_manifest(descriptor.digest)
    assert manifest.layers == ()
    assert "A=1" in store.get_config(manifest.config.digest).env
    assert store.verify() == [] and store.verify(unreachable=True) == []
    run(UMOCI, "ls", "--layout", str(layout))
