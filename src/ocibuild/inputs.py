"""Inputs of layers: walking a copy tree (with ignore files), hashing files through a stat cache, downloads.

The stat cache only saves re-reading files; it can never make a key stale. An entry is reused only when size,
mtime, ctime, inode and mode all match, and an entry is never recorded for a file whose mtime lies within
:data:`RACY_NS` of the moment it was hashed (a write in the same timestamp tick would leave its stat unchanged —
git's "racy" entries); such files are hashed again next time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import stat
import time
import urllib.parse
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from .errors import FetchError, RecipeError
from .oci import Digest

log = logging.getLogger(__name__)

RACY_NS = 2_000_000_000  # coarser than any filesystem timestamp tick we meet (FAT: 2 s)
IGNORE_FILES = (".containerignore", ".dockerignore")
_CHUNK = 1 << 20


class TreeEntry(NamedTuple):
    """One entry of a copy tree: project-independent relative path, type, permission bits, and what it holds.

    (A named tuple rather than a frozen dataclass: a copy tree makes tens of thousands of them on every no-op
    build, and a frozen dataclass's __init__ costs several times more.)"""

    path: str  # relative to the copy root, '/'-separated; "" never appears
    type: str  # "file", "dir", "symlink"
    mode: int
    size: int = 0
    linkname: str = ""
    source: str = ""  # absolute host path (files)
    sha256: str = ""  # content digest hex (files)


@dataclass(frozen=True)
class Tree:
    entries: tuple[TreeEntry, ...]
    digest: Digest  # over each entry's path, type, executable bit, symlink target and content digest


class StatCache:
    """Maps absolute file paths to their content digest, trusted only while their stat is unchanged."""

    def __init__(self, path: Path | None) -> None:
        self._path = path
        self._entries: dict[str, list[int | str]] = {}
        self._dirty = False
        if path is not None:
            try:
                loaded = json.loads(path.read_bytes())
                if isinstance(loaded, dict):
                    self._entries = loaded
            except (OSError, ValueError):
                pass  # a missing or damaged cache is only slower

    def digest(self, path: str, st: os.stat_result) -> str:
        cached = self._entries.get(path)
        if (cached is not None and cached[1] == st.st_mtime_ns and cached[2] == st.st_ctime_ns
                and cached[0] == st.st_size and cached[3] == st.st_ino and cached[4] == st.st_mode):
            return str(cached[5])  # (compared field by field: this runs once per file of every no-op build)
        signature: list[int | str] = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_mode]
        started = time.time_ns()
        hexdigest = hash_file(Path(path))
        if st.st_mtime_ns < started - RACY_NS and st.st_ctime_ns < started - RACY_NS:
            self._entries[path] = [*signature, hexdigest]
            self._dirty = True
        elif path in self._entries:
            del self._entries[path]
            self._dirty = True
        return hexdigest

    def save(self) -> None:
        if not self._dirty or self._path is None:
            return
        tmp = self._path.with_name(f"{self._path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_bytes(json.dumps(self._entries, separators=(",", ":")).encode())
            os.replace(tmp, self._path)
        except OSError as err:  # only a cache: the next run hashes again
            log.debug("could not save stat cache %s: %s", self._path, err)
        self._dirty = False


def hash_file(path: Path) -> str:
    """sha256 hex of a file's content, read in large chunks."""
    h = hashlib.sha256()
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    try:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                h.update(view[:n])
    except OSError as err:
        raise RecipeError(f"{path}: cannot read: {err.strerror}", "check that the file exists and is readable") from None
    return h.hexdigest()


class IgnoreRules:
    """``.containerignore`` / ``.dockerignore`` semantics: globs with ``*``, ``?``, ``**``, ``!`` re-includes;
    the last matching pattern wins and a pattern matching a directory covers everything below it."""

    def __init__(self, patterns: Iterable[str]) -> None:
        self._rules: list[tuple[bool, re.Pattern[str]]] = []
        for raw in patterns:
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            negate = line.startswith("!")
            if negate:
                line = line[1:].strip()
            line = os.path.normpath(line.lstrip("/")).replace(os.sep, "/")
            if line in (".", ""):
                continue
            self._rules.append((negate, re.compile(_glob_to_regex(line))))
        self.has_negations = any(negate for negate, _ in self._rules)
        self.active = bool(self._rules)

    def excluded(self, path: str) -> bool:
        result = False
        for negate, rule in self._rules:
            if rule.match(path):
                result = not negate
        return result

    @classmethod
    def for_tree(cls, root: Path, extra: Sequence[str]) -> IgnoreRules:
        patterns: list[str] = []
        for name in IGNORE_FILES:
            file = root / name
            if file.is_file():
                try:
                    patterns += file.read_text().splitlines()
                except (OSError, UnicodeDecodeError) as err:
                    raise RecipeError(f"{file}: cannot read: {err}", "fix or remove the ignore file") from None
                break
        return cls([*patterns, *extra])


def _glob_to_regex(pattern: str) -> str:
    out = []
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
            continue
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            end = pattern.find("]", i + 1)
            if end == -1:
                out.append(re.escape(c))
            else:
                body = pattern[i + 1 : end]
                if body.startswith("^") or body.startswith("!"):
                    body = "^" + body[1:]
                out.append(f"[{body}]")
                i = end
        else:
            out.append(re.escape(c))
        i += 1
    # a match on a directory covers everything below it
    return "".join(out) + "(?:/.*)?$"


def walk_tree(root: Path, exclude: Sequence[str], cache: StatCache, *, what: str) -> Tree:
    """Every entry below ``root`` that the ignore rules keep, sorted by path, with content digests."""
    if not root.exists():
        raise RecipeError(f"{what}: '{root}' does not exist", "fix the path, relative to the project root")
    rules = IgnoreRules.for_tree(root, exclude) if root.is_dir() else IgnoreRules(exclude)
    entries: list[TreeEntry] = []
    if not root.is_dir():
        st = root.stat()
        entries.append(TreeEntry(root.name, "file", stat.S_IMODE(st.st_mode), st.st_size, "", str(root),
                                 cache.digest(str(root), st)))
    else:
        _walk(root, "", rules, cache, entries, what)
    entries.sort(key=lambda e: e.path.encode())
    h = hashlib.sha256()
    quote = json.encoder.encode_basestring  # C-accelerated, what canonical_json uses for strings
    for e in entries:
        # the bytes of canonical_json([path, type, "x" | "-", linkname, sha256]) + "\n", written out: one
        # document per file, where building them through the encoder cost a fifth of a no-op build
        executable = '"x"' if e.mode & 0o111 else '"-"'
        h.update(f'[{quote(e.path)},"{e.type}",{executable},{quote(e.linkname)},"{e.sha256}"]\n'.encode())
    return Tree(tuple(entries), Digest("sha256", h.hexdigest()))


def _walk(directory: str | Path, prefix: str, rules: IgnoreRules, cache: StatCache, out: list[TreeEntry],
          what: str) -> None:
    # the hot loop of a no-op build (one pass per entry of every copy tree): names bound locally, rules skipped
    # when there are none
    try:
        scanner = os.scandir(directory)
    except OSError as err:
        raise RecipeError(f"{what}: cannot list {directory}: {err.strerror}", "check permissions") from None
    check = rules.excluded if rules.active else None
    negations = rules.has_negations
    digest, append, imode = cache.digest, out.append, stat.S_IMODE
    with scanner:
        for item in scanner:
            name = item.name
            if not prefix and name in IGNORE_FILES:
                continue
            rel = prefix + name
            excluded = check is not None and check(rel)
            if excluded and not negations:
                continue
            st = item.stat(follow_symlinks=False)
            fmt = stat.S_IFMT(st.st_mode)
            if fmt == stat.S_IFDIR:
                if not excluded:
                    append(TreeEntry(rel, "dir", imode(st.st_mode)))
                _walk(item.path, rel + "/", rules, cache, out, what)
            elif excluded:
                continue
            elif fmt == stat.S_IFREG:
                append(TreeEntry(rel, "file", imode(st.st_mode), st.st_size, "", item.path, digest(item.path, st)))
            elif fmt == stat.S_IFLNK:
                append(TreeEntry(rel, "symlink", imode(st.st_mode), 0, os.readlink(item.path)))
            else:
                raise RecipeError(
                    f"{what}: {item.path} is a device, socket or fifo, which a layer cannot hold",
                    "exclude it with 'exclude' or a .containerignore",
                )


# ---- downloads -------------------------------------------------------------------------------------------------

Progress = Callable[[str], None]


def fetch_bytes(url: str, *, what: str, limit: int = 64 << 20) -> bytes:
    """The body at ``url`` (a small file: a suite's InRelease), or FetchError."""
    import urllib.error as url_errors
    import urllib.request as url_requests  # imported on use: ~0.07 s that a no-op build must not pay

    try:
        with url_requests.urlopen(url_requests.Request(url, headers={"User-Agent": "ocibuild"}), timeout=60) as r:
            data: bytes = r.read(limit)
            return data
    except (url_errors.URLError, OSError, TimeoutError) as err:
        raise FetchError(f"{what}: cannot fetch {url}: {err}", "check the mirror URL and the network") from None


def fetch(url: str, sha256: str, cache_dir: Path, *, offline: bool = False, progress: Progress | None = None,
          what: str) -> Path:
    """The file at ``url`` with content ``sha256``, from ``cache_dir`` or downloaded into it (resumed when a
    previous download was cut, verified before it is used). Local paths and file URLs are verified in place."""
    final = cache_dir / sha256
    if final.exists():
        return final
    if url.startswith("file://") or "://" not in url:
        path = Path(urllib.parse.unquote(urllib.parse.urlsplit(url).path)) if url.startswith("file://") else Path(url)
        if not path.is_file():
            raise FetchError(f"{what}: {path} not found", "fix 'url' (relative paths are from the layer folder)")
        actual = hash_file(path)
        if actual != sha256:
            raise FetchError(f"{what}: {path} has sha256 {actual}, the recipe says {sha256}",
                             "fix 'sha256' in the layer.toml if the file is the one you meant")
        return path
    if offline:
        raise FetchError(f"{what}: {url} is not in the download cache and --offline forbids fetching it",
                         "run once with network, or import an export made on a connected machine")
    import urllib.error as url_errors  # imported on use, like urllib.request

    cache_dir.mkdir(parents=True, exist_ok=True)
    partial = cache_dir / f"{sha256}.partial"
    attempts = 5
    for attempt in range(1, attempts + 1):
        try:
            _download(url, partial, progress)
            break
        except (url_errors.URLError, OSError, TimeoutError) as err:
            if isinstance(err, url_errors.HTTPError) and err.code in (401, 403, 404, 410):
                raise FetchError(f"{what}: {url}: HTTP {err.code} {err.reason}", "check the URL") from None
            if attempt == attempts:
                raise FetchError(f"{what}: downloading {url} failed: {err}",
                                 "check the network; re-running resumes the download") from None
            log.info("download of %s failed (%s), retrying", url, err)
            time.sleep(min(2**attempt, 10))
    actual = hash_file(partial)
    if actual != sha256:
        partial.unlink(missing_ok=True)
        raise FetchError(f"{what}: {url} has sha256 {actual}, the recipe says {sha256}",
                         "fix 'sha256' in the layer.toml, or check that the URL serves the file you meant")
    os.replace(partial, final)
    return final


def _download(url: str, partial: Path, progress: Progress | None) -> None:
    import urllib.request as url_requests

    offset = partial.stat().st_size if partial.exists() else 0
    request = url_requests.Request(url, headers={"User-Agent": "ocibuild"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    with url_requests.urlopen(request, timeout=60) as response:
        resumed = offset and response.status == 206 and str(response.headers.get("Content-Range", "")).startswith(
            f"bytes {offset}-")
        mode = "ab" if resumed else "wb"
        if offset and not resumed:
            log.info("%s ignored the range request; restarting the download", url)
        if progress:
            progress(f"downloading {url}" + (f" (resuming at {offset} bytes)" if resumed else ""))
        with open(partial, mode) as out:
            while chunk := response.read(_CHUNK):
                out.write(chunk)
