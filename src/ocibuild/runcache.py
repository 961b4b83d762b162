"""Persistent cache directories, kept in the store: the compile step's (``[run] caches``) and run layers'
(``caches`` in a run layer's layer.toml, BuildKit's ``RUN --mount=type=cache``)::

    <store>/ocibuild/caches/<project-id>/project                     the project's root, for `gc --caches` to name it
    <store>/ocibuild/caches/<project-id>/<engine>/<hash>             a compile-step cache, mounted read-write
    <store>/ocibuild/caches/<project-id>/<engine>/<hash>.path        its container path
    <store>/ocibuild/caches/<project-id>/<engine>/layers/<layer>/…   a run layer's: <hash>, <hash>.path, and lock

``<project-id>`` is the first 16 hex digits of the sha256 of the project root's absolute path, ``<hash>`` those of
the container path. They are kept per engine because each engine's containers write them with its own owners
(rootless podman maps the container's users to the invoking user and its subordinate ids). They are outside
every layer and every cache key: what a compiler or apt keeps there changes nothing ocibuild builds.

A run layer's caches are its own (never shared with another layer, so two layers built at once never contend
for apt's locks), and a build holds an exclusive flock on the layer's ``lock`` while it uses them
(:func:`layer_caches`): a second ocibuild building the same layer waits rather than let two apt runs write one
cache. `gc --caches` takes the same flocks before it removes a project's caches.

Rootless, the directory belongs to the invoking user, which is the container's root: the container can write
it. What the container writes as another user (apt's ``_apt``) belongs to a subordinate id the user cannot
delete; :func:`remove` then hands the directory to a fallback (the CLI passes ``podman unshare rm -rf``).
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import logging
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from .errors import StoreError
from .files import atomic_write
from .store import Store

log = logging.getLogger(__name__)

_DIR = "caches"
_LAYERS = "layers"  # beside the compile step's <hash> directories: never 16 hex digits
_LOCK = "lock"


@dataclass(frozen=True)
class CacheDir:
    """One cache directory: the project it belongs to, the engine, the path in the container, where it is, and
    the run layer it belongs to (None: the compile step's)."""

    project: str
    engine: str
    path: str
    host: Path
    bytes: int = 0
    layer: str | None = None


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def prepare(store: Store, project_root: Path, engine: str, paths: Sequence[str]) -> list[tuple[Path, str]]:
    """The host directory of each container path in ``paths``, created: ``[(host, container), …]``."""
    if not paths:
        return []
    return _make(_engine_dir(store, project_root, engine), paths)


@contextmanager
def layer_caches(store: Store, project_root: Path, engine: str, layer: str, paths: Sequence[str], *,
                 waiting: Callable[[], None]) -> Iterator[list[tuple[Path, str]]]:
    """The host directory of each container path of run layer ``layer``'s ``caches``, created: ``[(host,
    container), …]``, held under the layer's flock while the context lasts. When another process holds it,
    ``waiting()`` is called and this waits."""
    if not paths:
        yield []
        return
    layer_dir = _engine_dir(store, project_root, engine) / _LAYERS / layer
    with _flocked(layer_dir / _LOCK, waiting):
        _engine_dir(store, project_root, engine)  # again: gc --caches may have removed it while this waited
        yield _make(layer_dir, paths)


def _engine_dir(store: Store, project_root: Path, engine: str) -> Path:
    """``<project-id>/<engine>`` (created, with the project's root recorded beside it)."""
    project_dir = store.private_dir(_DIR) / _short_hash(str(project_root))
    try:
        (project_dir / engine).mkdir(parents=True, exist_ok=True)
        _write_once(project_dir / "project", str(project_root))
    except OSError as err:
        raise _create_error(err) from None
    return project_dir / engine


def _make(directory: Path, paths: Sequence[str]) -> list[tuple[Path, str]]:
    out = []
    try:
        directory.mkdir(parents=True, exist_ok=True)
        for path in paths:
            host = directory / _short_hash(path)
            host.mkdir(exist_ok=True)
            _write_once(directory / f"{host.name}.path", path)
            out.append((host, path))
    except OSError as err:
        raise _create_error(err) from None
    return out


def _create_error(err: OSError) -> StoreError:
    return StoreError(f"create the cache directory {err.filename}: {err.strerror or err}",
                      "check the store's permissions, or use another store with --store")


@contextmanager
def _flocked(path: Path, waiting: Callable[[], None]) -> Iterator[None]:
    """An exclusive flock on ``path`` (created) while the context lasts. A lock file that `gc --caches` removed
    while this waited is no lock any more: then the new file at ``path`` is locked instead."""
    while True:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as err:
            raise _create_error(err) from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                waiting()
                fcntl.flock(fd, fcntl.LOCK_EX)
            if _same_file(fd, path):
                break
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    try:
        yield
    finally:
        os.close(fd)  # closing releases the flock


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (held.st_dev, held.st_ino)


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
    """Every cache directory of the store, with its size, sorted by project, engine, layer (the compile step's
    first) and path."""
    root = store.private_dir(_DIR)
    found = []
    for project_dir in _dirs(root):
        project = _read(project_dir / "project", project_dir.name)
        for engine_dir in _dirs(project_dir):
            found += _listed(project, engine_dir.name, engine_dir, None)
            for layer_dir in _dirs(engine_dir / _LAYERS):
                found += _listed(project, engine_dir.name, layer_dir, layer_dir.name)
    return found


def _dirs(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.is_dir() and not p.is_symlink())


def _listed(project: str, engine: str, directory: Path, layer: str | None) -> list[CacheDir]:
    found = [CacheDir(project, engine, _read(directory / f"{host.name}.path", host.name), host, _size(host), layer)
             for host in _dirs(directory) if host.name != _LAYERS]
    return sorted(found, key=lambda cache: cache.path)


def remove(store: Store, *, fallback: Callable[[Path], None] | None = None,
           waiting: Callable[[str], None] = lambda layer: None) -> list[CacheDir]:
    """Delete every cache directory of the store; what was removed. A run layer's caches are removed under its
    flock, so this waits (calling ``waiting(layer)``) for a build that uses them. A directory Python cannot
    delete (files of a rootless container's other users) goes to ``fallback``, else StoreError."""
    caches = list_caches(store)
    root = store.private_dir(_DIR)
    for project_dir in _dirs(root):
        with ExitStack() as held:
            for engine_dir in _dirs(project_dir):
                for layer_dir in _dirs(engine_dir / _LAYERS):
                    held.enter_context(_flocked(layer_dir / _LOCK, functools.partial(waiting, layer_dir.name)))
            try:
                shutil.rmtree(project_dir)
            except OSError as err:
                if fallback is None:
                    raise StoreError(f"remove the caches {project_dir}: {err.strerror or err}",
                                     f"remove it by hand (rootless podman: podman unshare rm -rf {project_dir})"
                                     ) from None
                log.debug("rmtree %s failed (%s): handing it to the fallback", project_dir, err)
                fallback(project_dir)
    return caches
