"""Durable file replacement: the one atomic write.

``atomic_write`` writes a temporary file beside the target, fsyncs it, renames it over the target and fsyncs the
directory, as umoci and containerd commit content: a reader sees the old file or the new one, never a prefix, and
after a crash the new one is either wholly there or not at all. Errors are ``OSError``s; the caller, which knows
what the file is, translates them.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def fsync_dir(directory: Path) -> None:
    """Make the directory's entries (a rename into it, a new file) durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data``: temporary file in the same directory, fsync, rename, fsync the directory.

    The temporary name is unique per call, so concurrent writers of one path never write into each other's file;
    the last rename wins. Nothing is left behind when a step fails.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        try:
            view = memoryview(data)
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
