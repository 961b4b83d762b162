"""Temporary files and directories in ``ocibuild/tmp/`` that a killed process cannot leave behind for long.

Each (a blob being written, :meth:`Store.temp_dir` for other modules) is named ``<kind>-<pid>-<random>`` and held
under an exclusive flock for as long as it is in use (:func:`create_held`): one whose flock can be taken was left by
a process that ended, killed or not, and :func:`sweep` (every writable open of the store, and gc) removes it; one
in use never is, whoever uses it (another process, another thread). flock is released by the kernel when the
process dies, which is what proves a file abandoned: a pid alone would not (pids are reused, and another pid
namespace or host may share the store).
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import secrets
import stat
import time
from pathlib import Path

from ..errors import StoreError
from ..files import remove_path
from .layout import FILE_MODE, STORE_HINT, hint_for, reason

log = logging.getLogger(__name__)

_HELD = re.compile(r"(\.?)(?:blob|dir)-[0-9]+-[0-9a-f]{16}")  # create_held's names; hidden until locked
_HIDDEN_STALE = 3600.0  # seconds after which a hidden one (made, not locked yet: microseconds) is abandoned


def create_held(tmp_dir: Path, kind: str, root: Path) -> tuple[Path, int]:
    """A new temporary file (``kind`` "blob": the fd is open for writing) or directory ("dir": the fd is the
    directory's) in ``tmp_dir``, named ``<kind>-<pid>-<random>``, under an exclusive flock that lasts while the fd
    is open: :func:`sweep` removes only what no one holds. It is made under a hidden name and renamed once locked,
    so no sweep ever finds it unlocked. (On a file system without flock it is never swept; gc removes it.)"""
    name = f"{kind}-{os.getpid()}-{secrets.token_hex(8)}"
    hidden, path = tmp_dir / f".{name}", tmp_dir / name
    for attempt in (1, 2):
        try:
            if kind == "dir":
                os.mkdir(hidden, 0o700)
                fd = os.open(hidden, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            else:
                fd = os.open(hidden, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
            break
        except FileNotFoundError:
            if attempt == 2:
                raise StoreError(f"create a temporary file in {tmp_dir}: it is missing", hint=STORE_HINT) from None
            tmp_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise StoreError(f"create a temporary file in {tmp_dir}: {reason(err)}", hint_for(err, root)) from err
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            log.debug("temporary %s without a lock: %s", hidden, reason(err))
        os.rename(hidden, path)
    except BaseException as err:
        os.close(fd)
        remove_tree(hidden)
        if isinstance(err, OSError):
            raise StoreError(f"create a temporary file in {tmp_dir}: {reason(err)}", hint_for(err, root)) from err
        raise
    return path, fd


def sweep(tmp_dir: Path) -> int:
    """Remove the temporary files and directories of :func:`create_held` whose flock no one holds any more (their
    process ended without removing them: killed, say); bytes freed (of files; a directory's content uncounted).
    What is held, or cannot be told, stays."""
    try:
        names = sorted(os.listdir(tmp_dir))
    except FileNotFoundError:
        return 0
    except OSError as err:
        log.warning("cannot look for leftovers in %s: %s", tmp_dir, reason(err))
        return 0
    freed = 0
    for name in names:
        match = _HELD.fullmatch(name)
        if match is None:
            continue
        path = tmp_dir / name
        if match.group(1):  # killed between its creation and its lock
            try:
                if path.lstat().st_mtime < time.time() - _HIDDEN_STALE:
                    remove_tree(path)
            except OSError:
                pass
            continue
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            continue  # gone meanwhile, or not ours to open
        try:
            info = os.fstat(fd)
            if not (stat.S_ISREG(info.st_mode) or stat.S_ISDIR(info.st_mode)):
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # in use (or no flock here: not provably abandoned)
            if is_at(fd, path):  # still this name's file: its holder neither committed nor removed it
                remove_tree(path)
                freed += info.st_size if stat.S_ISREG(info.st_mode) else 0
                log.info("removed %s, left by process %s", path, name.split("-")[1])
        finally:
            os.close(fd)
    return freed


def remove_tree(path: Path) -> None:
    """Remove a file or a directory tree; what cannot be removed is logged and left."""
    try:
        remove_path(path)
    except OSError as err:
        log.warning("could not remove temporary %s: %s", path, reason(err))


def is_at(fd: int, path: Path) -> bool:
    """Whether the open file ``fd`` is the file ``path`` names now (same device and inode, not unlinked)."""
    try:
        held, named = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return held.st_nlink > 0 and (held.st_dev, held.st_ino) == (named.st_dev, named.st_ino)
