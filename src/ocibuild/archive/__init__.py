"""Archives of the store for other tools and air-gapped machines: OCI image layouts in a tar file.

An *archive* is an ``oci-archive``: a plain (uncompressed) tar holding ``oci-layout``, ``index.json`` and
``blobs/<algorithm>/<hex>`` — what ``skopeo copy … oci-archive:`` writes and ``podman load`` reads.

- :func:`write_oci_archive` writes one tagged image (what ``podman load`` of podman 4.3 accepts: one manifest).
- :func:`export_archive` writes any set of tags — cache entries, the image — plus downloaded inputs as OCI
  artifacts (``artifactType`` :data:`INPUT_ARTIFACT`, listed in index.json without a tag, so that image
  importers such as `ctr images import` leave them alone). Given another
  store's :class:`Inventory` it leaves out the blobs that store holds (a *delta*; its index still lists every
  manifest, so it imports only into a store holding the rest).
- :func:`import_archive` brings an archive into the store. Nothing is written before the whole archive has been
  scanned and every document reachable from its ``index.json`` checked; then the missing blobs are copied, each
  verified, and one index.json update adds the tags.

Both directions stream in constant memory: blobs are copied in 1 MiB chunks by a few threads, each blob hashed
once by the thread copying it (hashing runs outside the GIL, so blobs are hashed on several cores at once).

The package's modules, in the direction of their imports:

- :mod:`.contents`: what both directions share: input artifacts and the download cache (:class:`InputFile`), a
  store's :class:`Inventory`, the closure of a manifest;
- :mod:`.export`: writing, every header and blob placed at an offset known in advance and copied there with
  ``pwrite``;
- :mod:`.importing`: reading, with what is checked when.

Errors: :class:`UnsafeArchive` for a tar that is hostile, truncated or not a layout; :class:`FormatError` for
malformed OCI documents or mixed-up media types; :class:`DigestMismatch` for content that does not hash to its
name; :class:`StoreError` for what cannot be read or written.
"""

from __future__ import annotations

from .contents import (INPUT_ARTIFACT, InputFile, Inventory, downloaded_inputs, downloads_dir, inventory,
                       manifest_closure)
from .export import ExportResult, export_archive, write_oci_archive
from .importing import ImportResult, import_archive, scan_archive

__all__ = [
    "INPUT_ARTIFACT",
    "ExportResult",
    "ImportResult",
    "InputFile",
    "Inventory",
    "downloaded_inputs",
    "downloads_dir",
    "export_archive",
    "import_archive",
    "inventory",
    "manifest_closure",
    "scan_archive",
    "write_oci_archive",
]
