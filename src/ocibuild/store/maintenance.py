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
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Literal

from ..errors import FormatError, StoreError
from ..oci import CONFIG_TYPES, INDEX_TYPES, LAYER_TYPES, MANIFEST_TYPES, OCI_EMPTY, OCI_LAYOUT_VERSION, Descriptor, \
    Digest, ImageConfig, Index, Manifest, parse_json
from .content import BLOB_TMP, Content, sync_dir
from .entries import entry_problems, is_cache_tag
from .layout import INDEX_LEFTOVERS, LAYOUT_LEFTOVERS, Layout, hint_for, reason

log = logging.getLogger(__name__)

_MAX_CONFIG = 16 << 20  # Content.read_blob's default limit
_STALE_AFTER = 3600.0  # seconds after which a temporary file of no blob writer is presumed abandoned


#: What refers to a descriptor, and so what its media type must be (see :func:`media_type_problem`).
Role = Literal["listed", "config", "image layer", "artifact layer"]


def media_type_problem(role: Role, media_type: str) -> str | None:
    """What is wrong with a descriptor of ``media_type`` where ``role`` says it is (None when nothing): index.json
    and indexes list ("listed") manifests and indexes; a manifest's config is not a manifest, index or layer; the
    layers of an image (whose config is an image config) are layers; an artifact's are no manifest, index or
    config. The one statement of these rules: verify, gc, the door of the store and import apply it."""
    if role == "listed":
        if media_type in MANIFEST_TYPES or media_type in INDEX_TYPES:
            return None
        return f"has media type '{media_type}': index.json and indexes list only manifests and indexes"
    if role == "config":
        wrong = media_type in MANIFEST_TYPES or media_type in INDEX_TYPES or media_type in LAYER_TYPES
        return f"has media type '{media_type}', not a config" if wrong else None
    if role == "image layer":
        return None if media_type in LAYER_TYPES else f"has media type '{media_type}', not a layer"
    wrong = media_type in MANIFEST_TYPES or media_type in INDEX_TYPES or media_type in CONFIG_TYPES
    return f"has media type '{media_type}', not a layer" if wrong else None


class _Walk:
    """Follows descriptors down through manifests and indexes, noting problems on the way.

    ``reached``: every digest met, present or not. ``problems``: one line each. ``blocking``: the problems that hide
    what a manifest or index refers to, so that gc cannot know what is in use. A blob in ``corrupt`` (reported by
    verify's scan) is not reported again when it cannot be read. A descriptor whose media type does not fit where
    it is (:func:`media_type_problem`) is a problem, and is not read: it refers to nothing but its own blob.
    """

    def __init__(self, layout: Layout, content: Content, corrupt: set[Digest]) -> None:
        self._layout = layout
        self._content = content
        self._corrupt = corrupt
        self.reached: set[Digest] = set()
        self.problems: list[str] = []
        self.blocking: list[str] = []
        self.manifests: dict[Digest, tuple[Manifest, ImageConfig | None]] = {}  # read on the way
        self._configs: set[Digest] = set()  # image configs read and parsed with their manifest

    def run(self) -> _Walk:
        """The walk from every entry of index.json."""
        try:
            index = self._layout.index()
        except StoreError as err:
            self.problems.append(str(err))
            self.blocking.append(str(err))
            return self
        return self.walk((d, f"tag '{d.ref_name}'" if d.ref_name else f"index.json manifest {position}")
                         for position, d in enumerate(index.manifests))

    def walk(self, roots: Iterable[tuple[Descriptor, str]]) -> _Walk:
        """The walk from ``roots`` (descriptor, how to name it), each a manifest or index listed in index.json."""
        stack: list[tuple[Descriptor, str, Role]] = [(d, via, "listed") for d, via in roots]
        stack.reverse()
        checked: set[tuple[Digest, int, str, Role]] = set()
        while stack:
            descriptor, via, role = stack.pop()
            self.reached.add(descriptor.digest)
            identity = (descriptor.digest, descriptor.size, descriptor.media_type, role)
            if identity in checked:
                continue
            checked.add(identity)
            problem = media_type_problem(role, descriptor.media_type)
            if problem is not None:
                self.problems.append(f"{via} {problem}")
            if self._present(descriptor, via, read=problem is None) and problem is None:
                stack.extend(reversed(self._children(descriptor, via)))
        return self

    def _present(self, descriptor: Descriptor, via: str, *, read: bool) -> bool:
        """Whether the blob is there (a size other than the descriptor's is a problem, but the blob is there).
        A missing manifest or index that is to be ``read`` hides what it refers to: blocking."""
        digest = descriptor.digest
        try:
            actual = self._layout.blob_path(digest).stat().st_size
        except FileNotFoundError:
            self.problems.append(f"{via}: blob {digest} is missing")
            if read and _is_parent(descriptor):
                self.blocking.append(self.problems[-1])
            return False
        except OSError as err:
            self.problems.append(f"{via}: blob {digest}: {reason(err)}")
            self.blocking.append(self.problems[-1])
            return False
        if actual != descriptor.size:
            self.problems.append(f"{via}: blob {digest} has {actual} bytes, the descriptor says {descriptor.size}")
        return True

    def _children(self, descriptor: Descriptor, via: str) -> list[tuple[Descriptor, str, Role]]:
        """Parse a manifest, index or image config; the descriptors a manifest or index refers to."""
        digest, media_type = descriptor.digest, descriptor.media_type
        if media_type in CONFIG_TYPES:
            if digest in self._configs:
                return []
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
                return self._manifest_children(digest, manifest, via)
            if kind == "index":
                nested = Index.parse(data, f"{via}: index {digest}")
                return [(child, f"{via} > manifest {i}", "listed") for i, child in enumerate(nested.manifests)]
            ImageConfig.parse(data, f"{via}: config {digest}")
        except (StoreError, FormatError) as err:
            if _is_parent(descriptor):
                self.blocking.append(f"{via}: {kind} {digest} cannot be read: {err}")
            if digest not in self._corrupt:  # a corrupt blob is reported once, by the scan
                self.problems.append(str(err) if isinstance(err, FormatError) else f"{via}: {err}")
        return []

    def _manifest_children(self, digest: Digest, manifest: Manifest, via: str) -> list[tuple[Descriptor, str, Role]]:
        """A manifest's config and layers, the layers' role told by the config's media type (an image's, or an
        artifact's); the image config is read here too, for the checks of cache entries."""
        image = manifest.config.media_type in CONFIG_TYPES
        if not image and manifest.artifact_type is None and manifest.config.media_type == OCI_EMPTY:
            self.problems.append(f"{via}: manifest {digest} has an empty config but no artifactType")
        config = None
        if image and manifest.config.size <= _MAX_CONFIG:
            try:
                config = ImageConfig.parse(self._content.read_blob(manifest.config.digest), "config")
                self._configs.add(manifest.config.digest)
            except (StoreError, FormatError):
                pass  # reported when the walk reaches the config
        self.manifests[digest] = (manifest, config)
        layer_role: Role = "image layer" if image else "artifact layer"
        return [(manifest.config, f"{via} > config", "config"),
                *((layer, f"{via} > layer {i}", layer_role) for i, layer in enumerate(manifest.layers))]


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
            hint="run `ocibuild verify --repair`: it removes the tags of what is damaged (then gc can run)",
        )
    return walk.reached


def verify(layout: Layout, content: Content, *, unreachable: bool = False) -> list[str]:
    """Problems found, one line each (empty when the store is sound).

    Every blob must hash to its name; every descriptor reachable from index.json must name a present blob of
    its size, of a media type that fits where it is; manifests, indexes and image configs must parse; every
    cache entry must be the entry of the key its tag names (:func:`.entries.entry_problems`). With
    ``unreachable``, blobs no tag reaches count as problems too. Temporary files and ocibuild's private
    directory are not looked at.
    """
    with layout.locks.lease_if_writable():
        problems = check_layout_file(layout.root / "oci-layout")
        present, corrupt = scan_blobs(layout, problems)
        walk = _Walk(layout, content, corrupt).run()
        problems += walk.problems
        problems += _entry_problems(layout, walk)
        if unreachable:
            for digest in sorted(present - walk.reached):
                problems.append(f"blob {digest} is not reachable from index.json (`ocibuild gc` removes it)")
    return problems


def tag_problems(layout: Layout, content: Content, tags: Mapping[str, Descriptor]) -> list[str]:
    """What verify would report about these tags (the graph each reaches, and a cache entry's labels), were
    they in index.json: the checks of :func:`verify` but the scan of every blob's content (blobs are verified
    as they are written)."""
    return [problem for problems in listed_problems(layout, content, list(tags.items())) for problem in problems]


def listed_problems(layout: Layout, content: Content, listed: Sequence[tuple[str | None, Descriptor]],
                    ) -> list[list[str]]:
    """For each entry of index.json (its tag, or None for an untagged manifest, and its descriptor), what verify
    reports about it, on its own: a problem of a blob two entries reach is told for both."""
    result = []
    for position, (tag, descriptor) in enumerate(listed):
        via = f"tag '{tag}'" if tag is not None else f"index.json manifest {position}"
        walk = _Walk(layout, content, set()).walk([(descriptor, via)])
        result.append(walk.problems + (_entry_problems(layout, walk, {tag: descriptor}) if tag is not None else []))
    return result


def _entry_problems(layout: Layout, walk: _Walk, tags: Mapping[str, Descriptor] | None = None) -> list[str]:
    """Problems of the cache entries among ``tags`` (default: index.json's), see entries.entry_problems. An entry
    whose manifest or config the walk could not read is left out: the walk has reported that already."""
    if tags is None:
        try:
            tags = layout.index().tags()
        except StoreError:
            return []  # reported by the walk
    problems: list[str] = []
    for tag, descriptor in tags.items():
        read = walk.manifests.get(descriptor.digest)
        if is_cache_tag(tag) and descriptor.media_type in MANIFEST_TYPES and read is not None and read[1] is not None:
            problems += entry_problems(tag, read[0], read[1])
    return problems


def check_layout_file(path: Path) -> list[str]:
    try:
        value = parse_json(path.read_bytes(), "it", limit=4096)
    except (OSError, FormatError) as err:
        return [f"{path} cannot be read: {err}"]
    if not isinstance(value, dict) or value.get("imageLayoutVersion") != OCI_LAYOUT_VERSION:
        return [f"{path}: imageLayoutVersion is not {OCI_LAYOUT_VERSION}"]
    return []


def scan_blobs(layout: Layout, problems: list[str]) -> tuple[set[Digest], set[Digest]]:
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
        freed += _remove_leftovers(layout) + content.sweep()
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
