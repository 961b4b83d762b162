"""Archives of the store for other tools and air-gapped machines: OCI image layouts in a tar file.

``write_oci_archive`` writes one tagged image as an ``oci-archive`` (what ``skopeo copy … oci-archive:`` and
``podman load`` read), streamed blob by blob: memory stays constant whatever the image's size.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from . import oci, tarlayer
from .errors import StoreError
from .oci import Descriptor, Digest, Index
from .store import Store
from .tarlayer import Entry


def manifest_closure(store: Store, descriptor: Descriptor) -> list[Descriptor]:
    """``descriptor`` and every blob it reaches (index children, config, layers), parents first."""
    out = [descriptor]
    if descriptor.media_type in oci.INDEX_TYPES:
        for child in Index.parse(store.read_blob(descriptor.digest), f"index {descriptor.digest.short}").manifests:
            out += manifest_closure(store, child)
    elif descriptor.media_type in oci.MANIFEST_TYPES:
        manifest = store.get_manifest(descriptor.digest)
        out += [manifest.config, *manifest.layers]
    return out


def write_oci_archive(store: Store, image: Descriptor, name: str, path: Path) -> None:
    """Write the image ``image`` tagged ``name`` as an oci-archive at ``path`` (atomically: temp, then rename)."""
    blobs: dict[Digest, Descriptor] = {}
    for descriptor in manifest_closure(store, image):
        blobs.setdefault(descriptor.digest, descriptor)
    index = Index(()).with_tag(name, image)
    directory = path.resolve().parent
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    except OSError as err:
        raise StoreError(f"{path}: cannot write: {err.strerror}", "choose a writable --output path") from None
    tmp = Path(tmp_name)
    index_file = store.private_dir("tmp") / f"index-{os.getpid()}.json"
    layout_file = store.private_dir("tmp") / f"oci-layout-{os.getpid()}.json"
    try:
        index_file.write_bytes(index.to_json())
        layout_file.write_bytes(oci.canonical_json({"imageLayoutVersion": oci.OCI_LAYOUT_VERSION}))
        entries = [
            Entry("blobs", "dir", 0o755),
            Entry("blobs/sha256", "dir", 0o755),
            Entry("index.json", "file", 0o644, size=index_file.stat().st_size, source=str(index_file)),
            Entry("oci-layout", "file", 0o644, size=layout_file.stat().st_size, source=str(layout_file)),
        ]
        for digest, descriptor in blobs.items():
            if not store.has(digest):
                raise StoreError(f"image {name}: blob {digest} is missing from the store",
                                 "run `ocibuild verify`, then rebuild the image")
            entries.append(Entry(f"blobs/{digest.algorithm}/{digest.hex}", "file", 0o644, size=descriptor.size,
                                 source=str(store.blob_path(digest))))
        with os.fdopen(fd, "wb") as out:
            tarlayer.write_layer(entries, out, "none", epoch=0)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        index_file.unlink(missing_ok=True)
        layout_file.unlink(missing_ok=True)
