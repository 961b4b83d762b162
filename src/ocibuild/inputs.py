"""Inputs of layers: walking a copy tree (with ignore files), hashing files through a stat cache.

Neither cache can make a key stale; each only saves work.

- File digests (``files.json``), each with the file's ``security.capability`` (setting it moves ctime too): an
  entry is reused only when size, mtime, ctime, inode and mode all match, and
  an entry is never recorded for a file whose mtime or ctime lies within :data:`RACY_NS` of the moment it was
  hashed (a write in the same timestamp tick would leave its stat unchanged — git's "racy" entries); such files
  are hashed again next time.
- Tree digests (``trees.json``, beside it): a copy tree's *fingerprint* hashes the root, the ignore patterns and,
  for every entry the rules keep, its relative path and lstat (mode; for files size, mtime, ctime, inode, link
  count and device; for symlinks their target). Any content change moves a file's ctime (so do a new hard link and
  a new file capability), an added, removed or renamed entry changes the path list, a chmod the mode; so while
  the fingerprint is unchanged, so is the tree digest, and a no-op build stats the tree without opening the file
  cache. A fingerprint is recorded only when no file's mtime or ctime lies within :data:`RACY_NS` of the start of
  the walk (the same racy rule), and only the latest one per root and exclude list is kept.

A missing or damaged cache file is only slower, and failing to save one is no error. Each is saved only when
something in it changed (a no-op build writes neither), whole, with :func:`files.atomic_write`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import marshal
import os
import re
import stat
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from .errors import FormatError, RecipeError
from .files import atomic_write, open_regular, read_bounded
from .globs import Matcher, compile_glob
from .oci import Digest, parse_json

log = logging.getLogger(__name__)

RACY_NS = 2_000_000_000  # coarser than any filesystem timestamp tick we meet (FAT: 2 s)
IGNORE_FILES = (".containerignore", ".dockerignore")
TREE_FORMAT = 2  # part of every tree fingerprint: bump it when a tree's digest or its fingerprint changes meaning
TREE_SLOTS = 64  # trees (root and exclude list) whose latest fingerprint trees.json keeps
IGNORE_FILE_LIMIT = 4 << 20
_NAMES = "surrogateescape"  # how os.listdir keeps the bytes of a name that is not UTF-8, and how we get them back
_CHUNK = 1 << 20
_OPEN_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class TreeEntry(NamedTuple):
    """One entry of a copy tree: project-independent relative path, type, permission bits, and what it holds.

    A regular file of several names in the tree is a "file" under the first in path order and a "hardlink" (whose
    ``linkname`` is that first path) under each other; only the file is hashed.

    (A named tuple rather than a frozen dataclass: a copy tree makes tens of thousands of them on every no-op
    build, and a frozen dataclass's __init__ costs several times more.)"""

    path: str  # relative to the copy root, '/'-separated; "" never appears
    type: str  # "file", "dir", "symlink", "hardlink"
    mode: int
    size: int = 0
    linkname: str = ""  # a symlink's target; a hardlink's file, as a path of the tree
    source: str = ""  # absolute host path (files)
    sha256: str = ""  # content digest hex (files)
    capability: bytes = b""  # the file's security.capability xattr, the one a copy layer keeps (as Docker's COPY)


@dataclass(frozen=True)
class Tree:
    entries: tuple[TreeEntry, ...]
    digest: Digest  # over each entry's path, type, executable bit, link target, content digest and capability


class StatCache:
    """Content digests of files and digests of whole copy trees, each trusted only while the stats it was made
    from are unchanged (see the module docstring).

    ``path`` is the file cache; the tree cache is ``trees.json`` beside it. Each is read on first use, so a build
    whose copy trees are all unchanged never reads the (large) file cache. ``None``: nothing is read or saved."""

    def __init__(self, path: Path | None) -> None:
        self._path = path
        self._trees_path = path.with_name("trees.json") if path is not None else None
        self._files: dict[str, Any] | None = None
        self._trees: dict[str, Any] | None = None
        self._files_dirty = False
        self._trees_dirty = False

    def digest(self, path: str, st: os.stat_result) -> str:
        """The sha256 hex of the file at ``path``, whose lstat (or stat) is ``st``."""
        return self.file_facts(path, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_mode)[0]

    def file_facts(self, path: str, size: int, mtime_ns: int, ctime_ns: int, ino: int, mode: int
                   ) -> tuple[str, bytes]:
        """:meth:`digest` from the fields of the stat, and the file's ``security.capability`` (b"" for none)."""
        entries = self._files if self._files is not None else self._load_files()
        cached = entries.get(path)
        if (type(cached) is list and len(cached) == 7 and cached[1] == mtime_ns and cached[2] == ctime_ns
                and cached[0] == size and cached[3] == ino and cached[4] == mode):
            # (compared field by field: this runs once per file of a changed tree)
            return str(cached[5]), bytes.fromhex(cached[6]) if cached[6] else b""
        started = time.time_ns()
        hexdigest = hash_file(Path(path))
        capability = _capability(path)
        if mtime_ns < started - RACY_NS and ctime_ns < started - RACY_NS:
            entries[path] = [size, mtime_ns, ctime_ns, ino, mode, hexdigest, capability.hex()]
            self._files_dirty = True
        elif path in entries:
            del entries[path]
            self._files_dirty = True
        return hexdigest, capability

    def tree_digest(self, slot: str, fingerprint: str) -> Digest | None:
        """The digest recorded for ``fingerprint`` of the tree ``slot`` names, or None."""
        trees = self._trees if self._trees is not None else self._load_trees()
        found = trees.get(slot)
        if type(found) is list and len(found) == 2 and found[0] == fingerprint and isinstance(found[1], str):
            try:
                return Digest.parse(found[1])
            except FormatError:
                return None
        return None

    def record_tree(self, slot: str, fingerprint: str, digest: Digest) -> None:
        """Remember ``digest`` for ``fingerprint``, replacing what ``slot`` held (the newest slots are kept)."""
        trees = self._trees if self._trees is not None else self._load_trees()
        entry = [fingerprint, str(digest)]
        if trees.get(slot) == entry:
            return
        trees.pop(slot, None)
        trees[slot] = entry
        while len(trees) > TREE_SLOTS:
            del trees[next(iter(trees))]
        self._trees_dirty = True

    def save(self) -> None:
        if self._files_dirty and self._files is not None:
            _save_json(self._path, self._files)
        if self._trees_dirty and self._trees is not None:
            _save_json(self._trees_path, self._trees)
        self._files_dirty = self._trees_dirty = False

    def _load_files(self) -> dict[str, Any]:
        self._files = _load_json(self._path)
        return self._files

    def _load_trees(self) -> dict[str, Any]:
        self._trees = _load_json(self._trees_path)
        return self._trees


def _load_json(path: Path | None) -> dict[str, Any]:
    if path is not None:
        try:
            loaded = parse_json(path.read_bytes(), str(path))
            if isinstance(loaded, dict):
                return loaded
        except (OSError, FormatError):
            pass  # a missing or damaged cache is only slower
    return {}


def _save_json(path: Path | None, document: dict[str, Any]) -> None:
    if path is None:
        return
    try:  # (mode 0o666: the umask decides, as for any file the user's tools write)
        atomic_write(path, json.dumps(document, separators=(",", ":")).encode(), mode=0o666)
    except OSError as err:  # only a cache: the next run hashes again
        log.debug("could not save stat cache %s: %s", path, err)


def hash_file(path: Path) -> str:
    """sha256 hex of a file's content, read in large chunks."""
    h = hashlib.sha256()
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    try:
        with open(open_regular(path), "rb", buffering=0) as f:
            while n := f.readinto(buf):
                h.update(view[:n])
    except OSError as err:
        raise RecipeError(f"{path}: cannot read: {err.strerror}", "check that the file exists and is readable") from None
    return h.hexdigest()


class IgnoreRules:
    """``.containerignore`` / ``.dockerignore`` semantics: globs with ``*``, ``?``, ``**``, ``[...]`` (see
    :mod:`ocibuild.globs`, which matches them in linear time), ``!`` re-includes; the last matching pattern wins and
    a pattern matching a directory covers everything below it."""

    def __init__(self, patterns: Iterable[str], where: str | Sequence[str] = "exclude") -> None:
        """``where`` names the patterns' origin in errors: one name for all (``layers/x/layer.toml: exclude``) or
        one per pattern (``src/.containerignore, line 3``)."""
        self.patterns = tuple(patterns)
        origins = [where] * len(self.patterns) if isinstance(where, str) else list(where)
        self._rules: list[tuple[bool, Matcher]] = []
        for raw, origin in zip(self.patterns, origins, strict=True):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            negate = line.startswith("!")
            if negate:
                line = line[1:].strip()
            line = os.path.normpath(line.lstrip("/")).replace(os.sep, "/")
            if line in (".", ""):
                continue
            try:
                self._rules.append((negate, compile_glob(line)))
            except re.error as err:  # '[]', '[z-a]': refused, as Docker refuses a bad pattern
                raise RecipeError(f"{origin}: {raw.strip()!r} is not a valid pattern ({err.msg})",
                                  "fix or remove it: a [...] class must list at least one character and a range must "
                                  "go upwards (a-z)") from None
        self.has_negations = any(negate for negate, _ in self._rules)
        self.active = bool(self._rules)

    def excluded(self, path: str) -> bool:
        result = False
        for negate, rule in self._rules:
            if rule(path):
                result = not negate
        return result

    @classmethod
    def for_tree(cls, root: Path, extra: Sequence[str], where: str = "exclude") -> IgnoreRules:
        """The rules of ``root``'s ignore file, then ``extra`` (named ``where`` in errors)."""
        patterns: list[str] = []
        for name in IGNORE_FILES:
            file = root / name
            try:  # (bytes that are not UTF-8 kept as in names, where they can match)
                patterns = read_bounded(file, IGNORE_FILE_LIMIT).decode("utf-8", _NAMES).splitlines()
            except FileNotFoundError:
                continue
            except OSError as err:
                raise RecipeError(f"{file}: cannot read: {err.strerror}", "fix or remove the ignore file") from None
            break
        origins = [f"{file}, line {n}" for n in range(1, len(patterns) + 1)]
        return cls([*patterns, *extra], [*origins, *[where] * len(extra)])


class _Scan(NamedTuple):
    """What one pass over a copy tree saw: the kept entries' stats, in directory order, and their fingerprint."""

    root: Path
    single: bool  # the root is a file
    # (path, mode) for a directory, (path, mode, size, mtime_ns, ctime_ns, ino, nlink, dev) a file, (path, mode,
    # target) a symlink
    records: list[tuple[Any, ...]]
    slot: str  # which tree: the root and the exclude list
    fingerprint: str


def tree_digest(root: Path, exclude: Sequence[str], cache: StatCache, *, what: str) -> tuple[Digest, Tree | None]:
    """The digest :func:`walk_tree` gives, and the walked tree when it had to be made (None when the tree cache
    knew the digest: nothing was hashed and no entry built)."""
    started = time.time_ns()
    scan = _scan(root, exclude, what)
    known = cache.tree_digest(scan.slot, scan.fingerprint)
    if known is not None:
        return known, None
    tree = _tree(scan, cache)
    _record(scan, tree.digest, cache, started)
    return tree.digest, tree


def walk_tree(root: Path, exclude: Sequence[str], cache: StatCache, *, what: str) -> Tree:
    """Every entry below ``root`` that the ignore rules keep, sorted by path, with content digests."""
    started = time.time_ns()
    scan = _scan(root, exclude, what)
    tree = _tree(scan, cache)
    _record(scan, tree.digest, cache, started)
    return tree


def _scan(root: Path, exclude: Sequence[str], what: str) -> _Scan:
    if not root.exists():
        raise RecipeError(f"{what}: '{root}' does not exist", "fix the path, relative to the project root")
    single = not root.is_dir()
    records: list[tuple[Any, ...]] = []
    if single:
        rules = IgnoreRules(exclude, f"{what}: exclude")
        try:
            st = root.stat()
        except OSError as err:
            raise RecipeError(f"{what}: cannot read {root}: {err.strerror}", "check the path and its permissions"
                              ) from None
        if not stat.S_ISREG(st.st_mode):
            raise RecipeError(f"{what}: {root} is a device, socket or fifo, which a layer cannot hold",
                              "point 'from' at a directory or a regular file")
        records.append((root.name, st.st_mode, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_nlink,
                        st.st_dev))
    else:
        rules = IgnoreRules.for_tree(root, exclude, f"{what}: exclude")
        try:
            fd = os.open(root, _OPEN_DIRECTORY)
        except OSError as err:
            raise RecipeError(f"{what}: cannot list {root}: {err.strerror}", "check permissions") from None
        try:
            _walk(fd, str(root), "", rules.excluded if rules.active else None, rules.has_negations, records, what)
        finally:
            os.close(fd)
    slot = json.dumps([str(root), list(exclude)])
    # marshal version 2 writes no back-references, so equal lists always give equal bytes
    h = hashlib.sha256(marshal.dumps((TREE_FORMAT, slot, single, rules.patterns), 2))
    h.update(marshal.dumps(records, 2))
    return _Scan(root, single, records, slot, h.hexdigest())


def _walk(fd: int, directory: str, prefix: str, check: Callable[[str], bool] | None, negations: bool,
          out: list[tuple[Any, ...]], what: str) -> None:
    # The hot loop of a no-op build (one pass per entry of every copy tree): only an lstat and a tuple per entry,
    # names bound locally, file types compared as plain ints, rules skipped when there are none. Entries are
    # listed and lstat'ed relative to their directory's descriptor (``fd``; ``directory`` is its path, for
    # messages): the kernel looks up one name instead of the whole path, ~15% of the walk.
    try:
        names = os.listdir(fd)
    except OSError as err:
        raise RecipeError(f"{what}: cannot list {directory}: {err.strerror}", "check permissions") from None
    append, lstat = out.append, os.lstat
    excluded = False
    for name in names:
        rel = prefix + name
        if not prefix and rel in IGNORE_FILES:
            continue
        if check is not None:
            excluded = check(rel)
            if excluded and not negations:
                continue
        try:
            st = lstat(name, dir_fd=fd)
        except OSError as err:
            raise RecipeError(f"{what}: cannot read {directory}/{name}: {err.strerror}",
                              "check permissions (or build again if the tree was changing)") from None
        mode = st.st_mode
        kind = mode & 0o170000
        if kind == 0o100000:  # S_IFREG
            if not excluded:
                append((rel, mode, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_nlink, st.st_dev))
        elif kind == 0o040000:  # S_IFDIR
            if not excluded:
                append((rel, mode))
            try:  # (O_NOFOLLOW: a directory swapped for a symlink since the lstat is not followed out of the tree)
                sub = os.open(name, _OPEN_DIRECTORY, dir_fd=fd)
            except OSError as err:
                raise RecipeError(f"{what}: cannot list {directory}/{name}: {err.strerror}",
                                  "check permissions") from None
            try:
                _walk(sub, f"{directory}/{name}", rel + "/", check, negations, out, what)
            finally:
                os.close(sub)
        elif excluded:
            continue
        elif kind == 0o120000:  # S_IFLNK
            append((rel, mode, os.readlink(name, dir_fd=fd)))
        else:
            raise RecipeError(
                f"{what}: {directory}/{name} is a device, socket or fifo, which a layer cannot hold",
                "exclude it with 'exclude' or a .containerignore",
            )


def _tree(scan: _Scan, cache: StatCache) -> Tree:
    """The tree of a scan: entries sorted by path, files hashed through the stat cache, hard links found."""
    facts = cache.file_facts
    entries: list[TreeEntry] = []
    append = entries.append
    if scan.single:
        name, mode, size, mtime, ctime, ino, _, _ = scan.records[0]
        source = str(scan.root)
        append(TreeEntry(name, "file", mode & 0o7777, size, "", source, *facts(source, size, mtime, ctime, ino, mode)))
    else:
        base = os.path.join(str(scan.root), "")
        linked: dict[tuple[int, int], str] = {}  # (device, inode) of a file of several names -> its first path
        for record in sorted(scan.records, key=lambda r: r[0].encode("utf-8", _NAMES)):
            kind = record[1] & 0o170000
            if kind == stat.S_IFREG:
                rel, mode, size, mtime, ctime, ino, nlink, dev = record
                if nlink > 1 and linked.setdefault((dev, ino), rel) != rel:
                    append(TreeEntry(rel, "hardlink", mode & 0o7777, 0, linked[dev, ino]))
                    continue
                source = base + rel
                append(TreeEntry(rel, "file", mode & 0o7777, size, "", source,
                                 *facts(source, size, mtime, ctime, ino, mode)))
            elif kind == stat.S_IFDIR:
                append(TreeEntry(record[0], "dir", record[1] & 0o7777))
            else:
                append(TreeEntry(record[0], "symlink", record[1] & 0o7777, 0, record[2]))
    # the bytes of canonical_json([path, type, "x" | "-", linkname, sha256]) + "\n" per entry, with the capability
    # in hex as a sixth item when a file has one, written out by hand (building them through the encoder cost a
    # fifth of a no-op build) and hashed at once
    quote = json.encoder.encode_basestring  # C-accelerated, what canonical_json uses for strings
    executable, plain = '"x"', '"-"'
    text = "".join([f'[{quote(e.path)},"{e.type}",{executable if e.mode & 0o111 else plain},{quote(e.linkname)},'
                    f'"{e.sha256}"{("," + quote(e.capability.hex())) if e.capability else ""}]\n' for e in entries])
    # (surrogateescape: a name that is not UTF-8 is hashed, and stored, as its exact bytes, as tar holds it)
    return Tree(tuple(entries), Digest("sha256", hashlib.sha256(text.encode("utf-8", _NAMES)).hexdigest()))


def _capability(path: str) -> bytes:
    """The ``security.capability`` xattr of the file at ``path``, or b"" when it has none."""
    try:
        return os.getxattr(path, "security.capability", follow_symlinks=False)
    except OSError as err:
        if err.errno in (errno.ENODATA, errno.ENOTSUP):
            return b""
        raise RecipeError(f"{path}: cannot read its file capability: {err.strerror}",
                          "check permissions (or build again if the tree was changing)") from None


def _record(scan: _Scan, digest: Digest, cache: StatCache, started: int) -> None:
    """Put the scan's fingerprint in the tree cache unless a file in it may still change within its timestamp
    tick (the racy rule of the module docstring)."""
    limit = started - RACY_NS
    for record in scan.records:
        if len(record) == 8 and (record[3] >= limit or record[4] >= limit):
            return
    cache.record_tree(scan.slot, scan.fingerprint, digest)
