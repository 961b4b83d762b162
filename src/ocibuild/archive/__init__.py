"""oci-archive export and import (moved here from ``ocibuild/archive.py``; split into modules next)."""

from __future__ import annotations

from .importing import (
    INPUT_ARTIFACT,
    ExportResult,
    ImportResult,
    InputFile,
    Inventory,
    downloaded_inputs,
    downloads_dir,
    export_archive,
    import_archive,
    inventory,
    manifest_closure,
    scan_archive,
    write_oci_archive,
)

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
