"""Durable file replacement: the one atomic write, and the one "hard link, else copy"; the one guarded open.

``atomic_write`` writes a temporary file beside the target, fsyncs it, renames it over the target and fsyncs the
directory, as umoci and containerd commit content: a reader sees the old file or the new one, never a prefix, and
after a crash the new one is either wholly there or not at all. Errors are ``OSError``s; the caller, which knows
what the file is, translates them.

``link_or_copy`` puts a file of the store (a blob) under another name in the same store (the download cache) the
same way: through a temporary name and a rename, a copy fsynced when a hard link is not possible.

``open_regular`` is how ocibuild opens a file whose path a user, a cloned repository or an archive chose (a recipe,
a lock, a config or auth file, an inventory, an archive to import, a file of an ``oci:`` layout or of a copy
tree): without blocking (a fifo's ``open`` would wait for a writer), and only when the opened descriptor is a
regular file (checked with ``fstat`` on it: no window between check and open). ``read_bounded`` reads such a file
whole, refusing one larger than the caller's limit (a symlink to ``/dev/zero`` is refused before any read), and
``read_toml`` parses one, a nesting too deep for the parser being a ``ValueError`` like any other bad TOML.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import stat
import tomllib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

TOML_LIMIT = 4 << 20  # a recipe, a lock, a config file: far more than any real one


class NotRegularFile(OSError):
    """The path names a directory, fifo, socket or device where a regular file is expected."""


class TooLarge(OSError):
    """The file holds more bytes than its reader's limit."""


_KINDS = {stat.S_IFDIR: "a directory", stat.S_IFIFO: "a fifo", stat.S_IFSOCK: "a socket",
          stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device"}


def open_regular(path: str | Path, *, follow_symlinks: bool = True, dir_fd: int | None = None) -> int:
    """A read-only descriptor of the regular file at ``path``; :class:`NotRegularFile` for anything else.

    Opened with O_NONBLOCK, so that opening a fifo returns at once rather than waiting for a writer; the type is
    checked on the opened descriptor, then O_NONBLOCK is cleared. ``follow_symlinks=False`` refuses a symlink
    (ELOOP), for a path whose symlinks were seen as symlinks before (a copy tree's files)."""
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | (0 if follow_symlinks else os.O_NOFOLLOW)
    fd = os.open(path, flags, dir_fd=dir_fd)
    try:
        kind = stat.S_IFMT(os.fstat(fd).st_mode)
        if kind != stat.S_IFREG:
            raise NotRegularFile(errno.EINVAL, f"not a regular file ({_KINDS.get(kind, 'of an unknown type')})",
                                 str(path))
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_bounded(path: str | Path, limit: int, *, follow_symlinks: bool = True) -> bytes:
    """The content of the regular file at ``path`` (see :func:`open_regular`); :class:`TooLarge` when it holds
    more than ``limit`` bytes, found from its size before reading and checked again while reading (it may grow)."""
    fd = open_regular(path, follow_symlinks=follow_symlinks)
    with open(fd, "rb", buffering=0) as file:
        if os.fstat(fd).st_size > limit:
            raise _too_large(path, limit)
        chunks, total = [], 0
        while chunk := file.read(min(limit + 1 - total, 1 << 20)):
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:
                raise _too_large(path, limit)
    return b"".join(chunks)


def _too_large(path: str | Path, limit: int) -> TooLarge:
    return TooLarge(errno.EFBIG, f"larger than the {_size(limit)} expected of it", str(path))


def _size(limit: int) -> str:
    return f"{limit >> 20} MiB" if limit >= 1 << 20 else f"{limit} bytes"


def read_toml(path: str | Path, limit: int = TOML_LIMIT) -> dict[str, Any]:
    """The TOML document in the file at ``path``, read with :func:`read_bounded`. ``OSError`` when it cannot be
    read, ``ValueError`` (its text fit for "malformed TOML: …") when it is not UTF-8, not TOML, or nested too deeply
    for the parser."""
    data = read_bounded(path, limit)
    try:
        return tomllib.loads(data.decode())
    except UnicodeDecodeError as err:
        raise ValueError(f"not UTF-8 text (byte {err.start})") from None
    except RecursionError:
        raise ValueError("arrays or inline tables are nested too deeply") from None


def fsync_dir(directory: Path) -> None:
    """Make the directory's entries (a rename into it, a new file) durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes | Iterable[bytes], *, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` (bytes, or pieces of it: a large document never held whole): temporary file
    in the same directory, fsync, rename, fsync the directory.

    The temporary name is unique per call, so concurrent writers of one path never write into each other's file;
    the last rename wins. Nothing is left behind when a step fails.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        try:
            for piece in (data,) if isinstance(data, bytes) else data:
                view = memoryview(piece)
                while view:
                    view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def remove_path(path: Path) -> None:
    """Remove a file, a symlink or a directory tree (not following a symlink); one already gone is no error.
    Other failures raise OSError: the caller decides whether they matter."""
    try:
        if stat.S_ISDIR(path.lstat().st_mode):
            shutil.rmtree(path)
        else:
            path.unlink()
    except FileNotFoundError:
        pass


def link_or_copy(source: Path, target: Path, *, sync_directory: bool = True) -> None:
    """Put ``source`` at ``target`` (replacing it): a hard link, else (another filesystem, one without hard links,
    a file we may not link) a copy, fsynced before its rename. ``sync_directory=False`` leaves the directory's fsync
    to a caller placing several files, once after the last. Nothing is left behind when a step fails."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        try:
            os.link(source, tmp)
        except OSError as err:
            if err.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                raise
            import shutil  # (here: it imports the bz2 and lzma modules, start-up time of every command)

            shutil.copyfile(source, tmp)
            fd = os.open(tmp, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if sync_directory:
        fsync_dir(target.parent)
