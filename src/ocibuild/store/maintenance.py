"""Looking after a store: which blobs index.json reaches, verify (every blob, every reachable descriptor) and gc.

gc deletes what no tag reaches, so it holds the lease exclusively (no writer or build is between its first blob
and its tag) and the lock (no tag changes meanwhile), and refuses when a tagged manifest or index cannot be read:
what that one refers to is then unknown. Temporary files are removed as described in :func:`gc`.
"""

from __future__ import annotations

import hashlib
import logging
import stat
import time
from pathlib import Path

from ..errors import FormatError, StoreError
from ..oci import CONFIG_TYPES, INDEX_TYPES, MANIFEST_TYPES, OCI_LAYOUT_VERSION, Descriptor, Digest, ImageConfig, \
    Index, Manifest, parse_json
from .content import BLOB_TMP, Content, sync_dir
from .entries import entry_problems, is_cache_tag
from .layout import INDEX_LEFTOVERS, LAYOUT_LEFTOVERS, Layout, hint_for, reason

log = logging.getLogger(__name__)

_STALE_AFTER = 3600.0  # seconds after which a temporary file of no blob writer is presumed abandoned


class _Walk:
    """Follows index.json down through manifests and indexes to every descriptor, noting problems on the way.

    ``reached``: every digest met, present or not. ``problems``: one line each. ``blocking``: the problems that hide
    what a manifest or index refers to, so that gc cannot know what is in use. A blob in ``corrupt`` (reported by
    verify's scan) is not reported again when it cannot be read.
    """

    def __init__(self, layout: Layout, content: Content, corrupt: set[Digest]) -> None:
        self._layout = layout
        self._content = content
        self._corrupt = corrupt
        self.reached: set[Digest] = set()
        self.problems: list[str] = []
        self.blocking: list[str] = []

    def run(self) -> _Walk:
        try:
            index = self._layout.index()
        except StoreError as err:
            self.problems.append(str(err))
            self.blocking.append(str(err))
            return self
        stack: list[tuple[Descriptor, str]] = []
        for position, descriptor in reversed(list(enumerate(index.manifests))):
            name = descriptor.ref_name
            stack.append((descriptor, f"tag '{name}'" if name else f"index.json manifest {position}"))
        checked: set[tuple[Digest, int, str]] = set()
        while stack:
            descriptor, via = stack.pop()
            self.reached.add(descriptor.digest)
            identity = (descriptor.digest, descriptor.size, descriptor.media_type)
            if identity in checked:
                continue
            checked.add(identity)
            if self._present(descriptor, via):
                stack.extend(reversed(self._children(descriptor, via)))
        return self

    def _present(self, descriptor: Descriptor, via: str) -> bool:
        """Whether the blob is there (a size other than the descriptor's is a problem, but the blob is there)."""
        digest = descriptor.digest
        try:
            actual = self._layout.blob_path(digest).stat().st_size
        except FileNotFoundError:
            self.problems.append(f"{via}: blob {digest} is missing")
            if _is_parent(descriptor):
                self.blocking.append(self.problems[-1])
            return False
        except OSError as err:
            self.problems.append(f"{via}: blob {digest}: {reason(err)}")
            self.blocking.append(self.problems[-1])
            return False
        if actual != descriptor.size:
            self.problems.append(f"{via}: blob {digest} has {actual} bytes, the descriptor says {descriptor.size}")
        return True

    def _children(self, descriptor: Descriptor, via: str) -> list[tuple[Descriptor, str]]:
        """Parse a manifest, index or image config; the descriptors a manifest or index refers to."""
        digest, media_type = descriptor.digest, descriptor.media_type
        if media_type in CONFIG_TYPES:
            kind = "config"
        elif media_type in MANIFEST_TYPES:
            kind = "manifest"
        elif media_type in INDEX_TYPES:
            kind = "index"
        else:
            return []  # a layer, or a blob of a kind nothing here reads
        try:
            data = self._content.read_blob(digest)
            if kind == "manifest":
                manifest = Manifest.parse(data, f"{via}: manifest {digest}")
                return [(manifest.config, f"{via} > config"),
                        *((layer, f"{via} > layer {i}") for i, layer in enumerate(manifest.layers))]
            if kind == "index":
                nested = Index.parse(data, f"{via}: index {digest}")
                return [(child, f"{via} > manifest {i}") for i, child in enumerate(nested.manifests)]
            ImageConfig.parse(data, f"{via}: config {digest}")
        except (StoreError, FormatError) as err:
            if _is_parent(descriptor):
                self.blocking.append(f"{via}: {kind} {digest} cannot be read: {err}")
            if digest not in self._corrupt:  # a corrupt blob is reported once, by the scan
                self.problems.append(str(err) if isinstance(err, FormatError) else f"{via}: {err}")
        return []


def _is_parent(descriptor: Descriptor) -> bool:
    return descriptor.media_type in MANIFEST_TYPES or descriptor.media_type in INDEX_TYPES


def reachable(layout: Layout, content: Content) -> set[Digest]:
    """Every digest index.json reaches (manifests, nested indexes, configs, layers), present or not.

    Raises StoreError when index.json, or a manifest or index it reaches, cannot be read: what it refers to
    is then unknown.
    """
    walk = _Walk(layout, content, set()).run()
    if walk.blocking:
        more = f" (and {len(walk.blocking) - 1} more problems)" if len(walk.blocking) > 1 else ""
        raise StoreError(
            f"cannot tell which blobs are in use: {walk.blocking[0]}{more}",
            hint="run `ocibuild verify`; untag, rebuild or fetch again the images it names",
        )
    return walk.reached


def verify(layout: Layout, content: Content, *, unreachable: bool = False) -> list[str]:
    """Problems found, one line each (empty when the store is sound).

    Every blob must hash to its name; every descriptor reachable from index.json must name a present blob of
    its size; manifests, indexes and image configs must parse. With ``unreachable``, blobs no tag reaches
    count as problems too. Temporary files and ocibuild's private directory are not looked at.
    """
    with layout.locks.lease_if_writable():
        problems = _check_layout_file(layout.root / "oci-layout")
        present, corrupt = _scan_blobs(layout, problems)
        walk = _Walk(layout, content, corrupt).run()
        problems += walk.problems
        problems += _check_cache_entries(layout, content)
        if unreachable:
            for digest in sorted(present - walk.reached):
                problems.append(f"blob {digest} is not reachable from index.json (`ocibuild gc` removes it)")
    return problems


def _check_cache_entries(layout: Layout, content: Content) -> list[str]:
    """Problems of the cache entries index.json tags (see entries.entry_problems). An entry whose manifest or config
    cannot be read is left out: the walk has reported that already."""
    problems: list[str] = []
    try:
        index = layout.index()
    except StoreError:
        return problems  # reported by the walk
    for descriptor in index.manifests:
        tag = descriptor.ref_name
        if not tag or not is_cache_tag(tag) or descriptor.media_type not in MANIFEST_TYPES:
            continue
        try:
            manifest = Manifest.parse(content.read_blob(descriptor.digest), f"manifest {descriptor.digest}")
            config = ImageConfig.parse(content.read_blob(manifest.config.digest), f"config {manifest.config.digest}")
        except (StoreError, FormatError):
            continue
        problems += entry_problems(tag, manifest, config)
    return problems


def _check_layout_file(path: Path) -> list[str]:
    try:
        value = parse_json(path.read_bytes(), "it", limit=4096)
    except (OSError, FormatError) as err:
        return [f"{path} cannot be read: {err}"]
    if not isinstance(value, dict) or value.get("imageLayoutVersion") != OCI_LAYOUT_VERSION:
        return [f"{path}: imageLayoutVersion is not {OCI_LAYOUT_VERSION}"]
    return []


def _scan_blobs(layout: Layout, problems: list[str]) -> tuple[set[Digest], set[Digest]]:
    """Hash every blob file, adding a line to ``problems`` for each bad one: (digests present, digests corrupt)."""
    present: set[Digest] = set()
    corrupt: set[Digest] = set()
    for path, digest in layout.blob_files():
        if digest is None or not path.is_file():
            problems.append(f"{path.relative_to(layout.root)} is not a blob (unexpected name or type)")
            continue
        present.add(digest)
        try:
            with open(path, "rb") as file:
                actual = Digest(digest.algorithm, hashlib.file_digest(file, digest.algorithm).hexdigest())
        except OSError as err:
            problems.append(f"blob {digest} cannot be read: {reason(err)}")
            corrupt.add(digest)
            continue
        if actual != digest:
            problems.append(f"blob {digest} is corrupt (content hashes to {actual})")
            corrupt.add(digest)
    return present, corrupt


def gc(layout: Layout, content: Content, *, wait: bool = True) -> tuple[int, int]:
    """Delete blobs index.json does not reach and leftover temporary files; (blobs removed, bytes freed).

    Waits for every lease (running builds, writers) to end, or with ``wait=False`` raises StoreError when
    one is held. Refuses (StoreError) when a tagged manifest or index cannot be read.
    """
    with layout.locks.exclusive_lease(wait), layout.locks.lock():
        removed, freed, touched = _remove_unreachable(layout, reachable(layout, content))
        freed += _remove_leftovers(layout)
        for directory in sorted(touched):
            sync_dir(directory, layout.root)
    log.info("gc of %s: removed %d blobs, freed %d bytes", layout.root, removed, freed)
    return removed, freed


def _remove_unreachable(layout: Layout, keep: set[Digest]) -> tuple[int, int, set[Path]]:
    """Delete every blob not in ``keep``: (blobs removed, bytes freed, the directories changed)."""
    removed = freed = 0
    touched: set[Path] = set()
    for path, digest in layout.blob_files():
        if digest is None or digest in keep:
            continue
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            continue
        except OSError as err:
            raise StoreError(f"remove blob: {path}: {reason(err)}", hint_for(err, layout.root)) from err
        removed += 1
        freed += size
        touched.add(path.parent)
        log.debug("removed unreachable blob %s (%d bytes)", digest, size)
    return removed, freed, touched


def _remove_leftovers(layout: Layout) -> int:
    """Delete temporary files no one is writing (gc holds the lock and the lease exclusively): bytes freed.

    index.json's temporary files are only written under the lock, and blob writers hold a lease: theirs are
    leftovers of crashed processes. An interrupted store creation's temporary oci-layout, and other modules'
    temporary files in tmp/ (partial downloads included), go after an hour. Directories are their owners' to remove.
    """
    tmp_dir = layout.tmp_dir
    # (path, removed only when older than _STALE_AFTER)
    leftovers = [(layout.root / "index.json.tmp", False)]  # the fixed name earlier versions wrote index.json through
    leftovers += [(path, False) for path in sorted(layout.root.glob(INDEX_LEFTOVERS))]
    leftovers += [(path, True) for path in sorted(layout.root.glob(LAYOUT_LEFTOVERS))]
    try:
        leftovers += [(path, not path.name.startswith(BLOB_TMP)) for path in sorted(tmp_dir.iterdir())]
    except FileNotFoundError:
        pass
    except OSError as err:
        raise StoreError(f"list temporary files: {tmp_dir}: {reason(err)}", hint_for(err, layout.root)) from err
    stale_before = time.time() - _STALE_AFTER
    freed = 0
    for path, only_when_stale in leftovers:
        try:
            info = path.lstat()
            if stat.S_ISDIR(info.st_mode) or only_when_stale and info.st_mtime > stale_before:
                continue
            path.unlink()
        except FileNotFoundError:
            continue
        except OSError as err:
            log.warning("could not remove temporary file %s: %s", path, reason(err))
            continue
        freed += info.st_size
        log.debug("removed temporary file %s", path)
    return freed
