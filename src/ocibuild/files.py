"""Durable file replacement: the one atomic write, and the one "hard link, else copy".

``atomic_write`` writes a temporary file beside the target, fsyncs it, renames it over the target and fsyncs the
directory, as umoci and containerd commit content: a reader sees the old file or the new one, never a prefix, and
after a crash the new one is either wholly there or not at all. Errors are ``OSError``s; the caller, which knows
what the file is, translates them.

``link_or_copy`` puts a file of the store (a blob) under another name in the same store (the download cache) the
same way: through a temporary name and a rename, a copy fsynced when a hard link is not possible.
"""

from __future__ import annotations

import errno
import os
import secrets
from collections.abc import Iterable
from pathlib import Path


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
