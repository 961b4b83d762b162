"""Persistent cache directories of the compile step (``[run] caches``), kept in the store::

    <store>/ocibuild/caches/<project-id>/project              the project's root, for `gc --caches` to name it
    <store>/ocibuild/caches/<project-id>/<engine>/<hash>      one directory per container path, mounted read-write
    <store>/ocibuild/caches/<project-id>/<engine>/<hash>.path that container path

``<project-id>`` is the first 16 hex digits of the sha256 of the project root's absolute path, ``<hash>`` those of
the container path. They are kept per engine because each engine's containers write them with its own owners
(rootless podman maps the container's users to the invoking user and its subordinate ids). They are outside
every layer and every cache key: what a compiler keeps there changes nothing ocibuild builds.

Rootless, the directory belongs to the invoking user, which is the container's root: the compile step can write
it. What the container writes as another user belongs to a subordinate id the user cannot delete; :func:`remove`
then hands the directory to a fallback (the CLI passes ``podman unshare rm -rf``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import StoreError
from .files import atomic_write
from .store import Store

log = logging.getLogger(__name__)

_DIR = "caches"


@dataclass(frozen=True)
class CacheDir:
    """One cache directory: the project it belongs to, the engine, the path in the container, where it is."""

    project: str
    engine: str
    path: str
    host: Path
    bytes: int = 0


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def prepare(store: Store, project_root: Path, engine: str, paths: Sequence[str]) -> list[tuple[Path, str]]:
    """The host directory of each container path in ``paths``, created: ``[(host, container), …]``."""
    if not paths:
        return []
    project_dir = store.private_dir(_DIR) / _short_hash(str(project_root))
    engine_dir = project_dir / engine
    out = []
    try:
        engine_dir.mkdir(parents=True, exist_ok=True)
        _write_once(project_dir / "project", str(project_root))
        for path in paths:
            host = engine_dir / _short_hash(path)
            host.mkdir(exist_ok=True)
            _write_once(engine_dir / f"{host.name}.path", path)
            out.append((host, path))
    except OSError as err:
        raise StoreError(f"create the compile cache directory {err.filename}: {err.strerror or err}",
                         "check the store's permissions, or use another store with --store") from None
    return out


def _write_once(path: Path, text: str) -> None:
    if not path.exists():
        atomic_write(path, text.encode())


def _read(path: Path, default: str) -> str:
    try:
        return path.read_text().strip() or default
    except (OSError, UnicodeDecodeError):
        return default


def _size(directory: Path) -> int:
    """Bytes under ``directory``, counting what can be read (a rootless container's other users' files may not)."""
    total = 0
    for base, dirs, files in os.walk(directory, onerror=lambda err: None):
        for name in files + dirs:
            try:
                total += os.lstat(os.path.join(base, name)).st_size
            except OSError:
                pass
    return total


def list_caches(store: Store) -> list[CacheDir]:
    """Every cache directory of the store, with its size, sorted by project, engine and path."""
    root = store.private_dir(_DIR)
    found = []
    for project_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        project = _read(project_dir / "project", project_dir.name)
        for engine_dir in sorted(p for p in project_dir.iterdir() if p.is_dir() and not p.is_symlink()):
            for host in sorted(p for p in engine_dir.iterdir() if p.is_dir() and not p.is_symlink()):
                path = _read(engine_dir / f"{host.name}.path", host.name)
                found.append(CacheDir(project, engine_dir.name, path, host, _size(host)))
    return found


def remove(store: Store, *, fallback: Callable[[Path], None] | None = None) -> list[CacheDir]:
    """Delete every cache directory of the store; what was removed. A directory Python cannot delete (files of a
    rootless container's other users) goes to ``fallback``, else StoreError."""
    caches = list_caches(store)
    root = store.private_dir(_DIR)
    for project_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        try:
            shutil.rmtree(project_dir)
        except OSError as err:
            if fallback is None:
                raise StoreError(f"remove the compile caches {project_dir}: {err.strerror or err}",
                                 f"remove it by hand (rootless podman: podman unshare rm -rf {project_dir})") from None
            log.debug("rmtree %s failed (%s): handing it to the fallback", project_dir, err)
            fallback(project_dir)
    return caches
