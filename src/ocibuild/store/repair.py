"""Bringing a store that `ocibuild verify` rejects back to one it accepts: :func:`repair` (`ocibuild verify --repair`).

What verify can report, and what repair does about each, in this order, every removal named:

1. oci-layout unreadable, or of another version: written again.
2. A file under ``blobs/`` that is not a blob (an unexpected name or type): removed.
3. A blob whose content does not hash to its name, or that cannot be read: removed (hashed again first, so a
   blob another process has just put right stays).
4. index.json that cannot be parsed: replaced by one of the entries that can be read (none, when it is not
   JSON at all; what it tagged is unknown then, and gc removes the blobs).
5. Each entry of index.json (a tag, or an untagged manifest) about which verify reports a problem (a missing
   blob, a size or media type that does not fit, a manifest, index or config that does not parse, a cache entry
   that is not its key's): removed, all in one index.json update under the store lock.

Blobs only the removed entries reached stay until `ocibuild gc`, which can run again. A layer whose cache entry
was removed is built (or pulled) again by the next build.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

from ..errors import FormatError, StoreError
from ..files import atomic_write, read_bounded, remove_path
from ..oci import OCI_LAYOUT_VERSION, Descriptor, Digest, Index, canonical_json, parse_json
from .content import Content
from .layout import FILE_MODE, INDEX_LIMIT, Layout, hint_for, reason
from .maintenance import check_layout_file, listed_problems, scan_blobs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Removal:
    """One thing :func:`repair` removed: ``kind`` "tag", "index entry", "blob" or "file" (oci-layout, index.json,
    or a file under blobs/ that is no blob); ``name`` names it; ``reason`` is the problem verify reported."""

    kind: str
    name: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"kind": self.kind, "name": self.name, "reason": self.reason}


def repair(layout: Layout, content: Content) -> list[Removal]:
    """Remove what verify rejects, as the module docstring says; what was removed, in that order."""
    removed = _repair_layout_file(layout)
    with layout.locks.lease_if_writable():  # gc waits meanwhile; builds and tagging go on
        removed += _remove_bad_blobs(layout)
    with layout.locks.lock():  # no tag changes between the check of the entries and their removal
        index, removed_index = _readable_index(layout)
        removed += removed_index
        removed += _remove_bad_entries(layout, content, index, rewrite=bool(removed_index))
    for removal in removed:
        log.info("repair of %s: removed %s %s: %s", layout.root, removal.kind, removal.name, removal.reason)
    return removed


def _repair_layout_file(layout: Layout) -> list[Removal]:
    path = layout.root / "oci-layout"
    problems = check_layout_file(path)
    if not problems:
        return []
    try:
        atomic_write(path, canonical_json({"imageLayoutVersion": OCI_LAYOUT_VERSION}), mode=FILE_MODE)
    except OSError as err:
        raise StoreError(f"write oci-layout: {path}: {reason(err)}", hint_for(err, layout.root)) from err
    return [Removal("file", "oci-layout", f"{problems[0]} (written again)")]


def _remove_bad_blobs(layout: Layout) -> list[Removal]:
    """Remove every file under blobs/ the scan of verify rejects (a blob is hashed again before it goes)."""
    problems: list[str] = []
    _, corrupt = scan_blobs(layout, problems)
    if not problems:
        return []
    removed = []
    for path, digest in layout.blob_files():
        if digest is None or not path.is_file():
            _remove(path, layout.root)
            removed.append(Removal("file", str(path.relative_to(layout.root)), "not a blob (unexpected name or type)"))
        elif digest in corrupt and (why := _corrupt(path, digest)) is not None:
            _remove(path, layout.root)
            removed.append(Removal("blob", str(digest), why))
    return removed


def _corrupt(path: Path, digest: Digest) -> str | None:
    """Why the blob at ``path`` is not ``digest`` (None when it is)."""
    try:
        with open(path, "rb") as file:
            actual = Digest(digest.algorithm, hashlib.file_digest(file, digest.algorithm).hexdigest())
    except OSError as err:
        return f"cannot be read: {reason(err)}"
    return None if actual == digest else f"corrupt (content hashes to {actual})"


def _remove(path: Path, root: Path) -> None:
    try:
        remove_path(path)
    except OSError as err:
        raise StoreError(f"remove {path}: {reason(err)}", hint_for(err, root)) from err


def _readable_index(layout: Layout) -> tuple[Index, list[Removal]]:
    """index.json, or (when it does not parse) what can be read of it, with the removal of the rest."""
    try:
        return layout.index(), []
    except StoreError as err:
        if isinstance(err.__cause__, OSError):
            raise  # unreadable, not malformed: nothing here can repair that
        problem = str(err)
    try:
        value = parse_json(read_bounded(layout.root / "index.json", INDEX_LIMIT), "index.json", limit=INDEX_LIMIT)
    except (OSError, FormatError):
        value = None
    listed = value.get("manifests") if isinstance(value, dict) else None
    kept, removed = [], []
    for position, item in enumerate(listed if isinstance(listed, list) else []):
        try:
            kept.append(Descriptor.from_dict(item, f"index.json manifest {position}"))
        except FormatError as bad:
            removed.append(Removal("index entry", f"index.json manifest {position}", str(bad)))
    removed.insert(0, Removal("file", "index.json", f"{problem} (replaced by an index of the {len(kept)} entries "
                                                    "that could be read)"))
    return Index(tuple(kept)), removed


def _remove_bad_entries(layout: Layout, content: Content, index: Index, *, rewrite: bool) -> list[Removal]:
    """Remove every entry of ``index`` verify reports a problem about (index.json written when any was, or when
    ``rewrite``)."""
    listed = [(d.ref_name, d) for d in index.manifests]
    kept, removed = [], []
    for position, ((tag, descriptor), problems) in enumerate(zip(listed, listed_problems(layout, content, listed))):
        if not problems:
            kept.append(descriptor)
        elif tag is not None:
            removed.append(Removal("tag", tag, "; ".join(problems)))
        else:
            removed.append(Removal("index entry", f"index.json manifest {position} ({descriptor.digest})",
                                   "; ".join(problems)))
    if removed or rewrite:
        layout.write_index(Index(tuple(kept), index.annotations, index.media_type))
    return removed
