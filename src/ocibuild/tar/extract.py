"""Applying a layer to a directory, safely: OCI whiteouts included, nothing written outside the root.

:func:`extract_layer` opens every directory relative to its parent with O_NOFOLLOW, so an entry whose parent is a
symlink (from this layer or one below) is refused, never followed; what an entry replaces is removed first (a
directory recursively, a symlink itself). Whiteouts remove only what lower layers left: a path this layer wrote
survives a whiteout of it, whatever the order of the two in the stream. Directory modes and mtimes are set last,
so that a read-only directory can still be filled. Owners and xattrs are set only with ``chown`` (as root), and of
the xattrs only ``security.capability`` and ``user.*``. The members come from :func:`ocibuild.tar.read.iter_members`
(the :data:`~ocibuild.tar.read.LAYER` policy), which refuses the rest of what could escape.
"""

from __future__ import annotations

import errno
import io
import logging
import os
import shutil
import stat
from pathlib import Path
from typing import BinaryIO, Final, cast

from ..errors import OcibuildError, StoreError, UnsafeArchive
from .read import LAYER, Member, iter_members, quoted

log = logging.getLogger(__name__)

_READ: Final = 1 << 20
_ENC: Final = "surrogateescape"
# Only these (and user.*) are set when extracting: trusted.overlay.* and the like could steer the filesystem.
_EXTRACTED_XATTRS: Final = frozenset({"security.capability"})
_NEW_FILE_FLAGS: Final = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_DIR_FLAGS: Final = os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC | getattr(os, "O_PATH", os.O_RDONLY)


class _Extractor:
    """Applies members below a root through directory fds, never following a symlink."""

    def __init__(self, root: Path, what: str, chown: bool) -> None:
        self.what = what
        self.chown = chown
        self.root_fd = os.open(root, os.O_DIRECTORY | os.O_CLOEXEC | getattr(os, "O_PATH", os.O_RDONLY))
        self.stack: list[tuple[str, int]] = []  # the open directories leading to the last parent
        self.written: set[str] = set()  # paths this layer created
        self.touched: set[str] = set()  # ancestors of those
        self.dirs: dict[str, Member] = {}  # directory metadata, applied at the end
        self.buf = bytearray(_READ)
        self.entry = ""

    def close(self) -> None:
        for _, fd in self.stack:
            os.close(fd)
        self.stack = []
        os.close(self.root_fd)

    def _unsafe(self, problem: str) -> UnsafeArchive:
        return UnsafeArchive(f"{self.what}: entry {quoted(self.entry)} {problem}", hint=LAYER.hint_unsafe)

    def _mark(self, path: str) -> None:
        self.written.add(path)
        parent = path.rpartition("/")[0]
        while parent and parent not in self.touched:
            self.touched.add(parent)
            parent = parent.rpartition("/")[0]

    def _open_dir(self, parent_fd: int, name: str, rel: str, *, create: bool, strict: bool) -> int | None:
        try:
            return os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
        except FileNotFoundError:
            if not create:
                return None
            os.mkdir(name, 0o755, dir_fd=parent_fd)
            self._mark(rel)
            return os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
        except OSError as err:
            if err.errno not in (errno.ENOTDIR, errno.ELOOP):
                raise
            if not strict:
                return None
            if stat.S_ISLNK(os.stat(name, dir_fd=parent_fd, follow_symlinks=False).st_mode):
                raise self._unsafe(f"would be written through the symlink {quoted(rel)}") from None
            raise self._unsafe(f"is beneath {quoted(rel)}, which is not a directory") from None

    def _dir(self, parts: list[str], *, create: bool = True, strict: bool = True) -> int | None:
        """An fd of the directory ``parts`` below the root (cached along the current path), or None."""
        stack = self.stack
        keep = 0
        while keep < len(stack) and keep < len(parts) and stack[keep][0] == parts[keep]:
            keep += 1
        for _, fd in stack[keep:]:
            os.close(fd)
        del stack[keep:]
        cur = stack[-1][1] if stack else self.root_fd
        for i in range(keep, len(parts)):
            opened = self._open_dir(cur, parts[i], "/".join(parts[: i + 1]), create=create, strict=strict)
            if opened is None:
                return None
            stack.append((parts[i], opened))
            cur = opened
        return cur

    def _remove(self, dir_fd: int, name: str) -> None:
        """Remove ``name`` (recursively for a directory), never following a symlink."""
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(name, dir_fd=dir_fd)
        else:
            os.unlink(name, dir_fd=dir_fd)

    def _whiteout(self, dir_fd: int, name: str, rel: str) -> None:
        """Remove what lower layers have at ``rel``, keeping what this layer wrote."""
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return
        if rel not in self.written and rel not in self.touched:
            self._remove(dir_fd, name)
        elif stat.S_ISDIR(st.st_mode):
            fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
            try:
                self._prune(fd, rel)
            finally:
                os.close(fd)

    def _prune(self, fd: int, rel: str) -> None:
        list_fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fd)
        try:
            names = sorted(os.listdir(list_fd))
        finally:
            os.close(list_fd)
        for child in names:
            self._whiteout(fd, child, f"{rel}/{child}" if rel else child)

    def _metadata(self, fd: int, m: Member) -> None:
        if self.chown:
            os.fchown(fd, m.uid, m.gid)
            for key, value in m.xattrs.items():
                if key not in _EXTRACTED_XATTRS and not key.startswith("user."):
                    log.warning("%s: not setting xattr %s on %r", self.what, key, m.path)
                    continue
                try:
                    os.setxattr(fd, key, value.encode("utf-8", _ENC))
                except OSError as err:
                    log.warning("%s: cannot set xattr %s on %r: %s", self.what, key, m.path, err.strerror)
        os.fchmod(fd, m.mode)
        ns = m.mtime * 1_000_000_000
        os.utime(fd, ns=(ns, ns))

    def apply(self, m: Member, data: BinaryIO | None) -> None:
        self.entry = m.path
        if m.type in ("whiteout", "opaque"):
            self._remove_lower(m)
            return
        parts = m.path.split("/")
        name = parts[-1]
        parent_fd = self._dir(parts[:-1])
        assert parent_fd is not None
        self._mark(m.path)
        if m.type == "dir":
            self._make_dir(m, parent_fd, name)
        elif m.type == "file":
            assert data is not None
            self._write_file(m, data, parent_fd, name)
        elif m.type == "symlink":
            self._remove(parent_fd, name)
            os.symlink(m.linkname, name, dir_fd=parent_fd)
            if self.chown:
                os.chown(name, m.uid, m.gid, dir_fd=parent_fd, follow_symlinks=False)
            ns = m.mtime * 1_000_000_000
            os.utime(name, ns=(ns, ns), dir_fd=parent_fd, follow_symlinks=False)
        elif m.type == "hardlink":
            self._link(m, parent_fd, name)

    def _remove_lower(self, m: Member) -> None:
        """Apply a whiteout (its path) or an opaque marker (its directory's content) to the lower layers."""
        target = m.linkname
        parts = target.split("/") if target else []
        if m.type == "opaque":
            fd = self._dir(parts, create=False)
            if fd is not None:
                self._prune(fd, target)
        else:
            fd = self._dir(parts[:-1], create=False)
            if fd is not None:
                self._whiteout(fd, parts[-1], target)

    def _make_dir(self, m: Member, parent_fd: int, name: str) -> None:
        """A directory (private until :meth:`finish` sets its metadata), replacing whatever else is there."""
        try:
            st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
            if not stat.S_ISDIR(st.st_mode):
                os.unlink(name, dir_fd=parent_fd)
                os.mkdir(name, 0o700, dir_fd=parent_fd)
        except FileNotFoundError:
            os.mkdir(name, 0o700, dir_fd=parent_fd)
        self.dirs[m.path] = m

    def _write_file(self, m: Member, data: BinaryIO, parent_fd: int, name: str) -> None:
        self._remove(parent_fd, name)
        fd = os.open(name, _NEW_FILE_FLAGS, 0o600, dir_fd=parent_fd)
        try:
            view = memoryview(self.buf)
            while n := cast(io.RawIOBase, data).readinto(view):
                chunk = view[:n]
                while chunk:
                    chunk = chunk[os.write(fd, chunk) :]
            self._metadata(fd, m)
        finally:
            os.close(fd)

    def _link(self, m: Member, parent_fd: int, name: str) -> None:
        if m.linkname == m.path:
            return
        tparts = m.linkname.split("/")
        fds: list[int] = []
        try:
            cur = self.root_fd
            for i, part in enumerate(tparts[:-1]):
                fd = self._open_dir(cur, part, "/".join(tparts[: i + 1]), create=False, strict=True)
                if fd is None:
                    raise self._unsafe(f"is a hardlink to {quoted(m.linkname)}, which does not exist")
                fds.append(fd)
                cur = fd
            try:
                st = os.stat(tparts[-1], dir_fd=cur, follow_symlinks=False)
            except FileNotFoundError:
                raise self._unsafe(f"is a hardlink to {quoted(m.linkname)}, which does not exist") from None
            if not stat.S_ISREG(st.st_mode):
                raise self._unsafe(f"is a hardlink to {quoted(m.linkname)}, which is not a regular file")
            self._remove(parent_fd, name)
            try:
                os.link(tparts[-1], name, src_dir_fd=cur, dst_dir_fd=parent_fd, follow_symlinks=False)
            except FileNotFoundError:
                raise self._unsafe(f"is a hardlink to {quoted(m.linkname)}, which it replaced") from None
        finally:
            for fd in fds:
                os.close(fd)

    def finish(self) -> None:
        """Directory modes, owners and mtimes, deepest first, once nothing more is written into them."""
        for path in sorted(self.dirs, reverse=True):
            self.entry = path
            parts = path.split("/")
            parent_fd = self._dir(parts[:-1], create=False, strict=False)
            if parent_fd is None:
                continue
            try:
                fd = os.open(parts[-1], os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent_fd)
            except OSError as err:
                if err.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                    continue  # replaced later in the layer
                raise
            try:
                self._metadata(fd, self.dirs[path])
            finally:
                os.close(fd)


def extract_layer(
    fileobj: BinaryIO,
    compression: str,
    root: Path,
    *,
    what: str,
    chown: bool | None = None,
    max_size: int | None = None,
) -> None:
    """Apply a layer to the directory ``root`` (which holds the layers below it), OCI whiteouts included.

    Never writes outside ``root``: every parent is opened relative to its own parent with O_NOFOLLOW, and an
    entry to be written through a symlink is refused. An existing path is removed (not followed) before being
    replaced. Hardlinks may only point at regular files inside ``root``. Sets modes and mtimes, and owners and
    xattrs when ``chown`` (default: when running as root). Missing parents are created with mode 0755.
    """
    if chown is None:
        chown = os.geteuid() == 0
    try:
        extractor = _Extractor(root, what, chown)
    except OSError as err:
        raise StoreError(f"{what}: cannot open the extraction root {root}: {err.strerror}") from err
    try:
        for member, data in iter_members(fileobj, compression, what=what, max_size=max_size):
            extractor.apply(member, data)
        extractor.finish()
    except OcibuildError:
        raise
    except OSError as err:
        raise StoreError(
            f"{what}: cannot extract entry {quoted(extractor.entry)} into {root}: {err.strerror or err}",
            hint="check free space and permissions below the root",
        ) from err
    finally:
        extractor.close()
