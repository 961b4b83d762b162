"""The images ocibuild loads into a container engine: their names there, the record of what it loaded, and the
removal of what it no longer needs (the image a new one replaced, run layers' stages, its stopped containers).

Names, with ``H`` the first 12 hex digits of the sha256 of the store's path (two checkouts with the same
``[image] name`` keep their own images in one engine):

- ``localhost/NAME:H``: the image `ocibuild run` and `shell` run, NAME being ``[image] name`` in lowercase with
  each run of characters other than letters and digits made ``-`` (``--source-mount`` runs the image
  ``NAME-source-mount``: the stack without the mounted copy layers);
- ``localhost/ocibuild-stage:H-KEY``: the stack a run layer runs on (KEY: 16 hex digits of the layer's key).

The record, one file per engine command line (engine and global flags: one engine storage), in the store's
private area: ``ocibuild/engine/<hash>.json`` = ``{"engine": "podman", "args": [...], "images": {name: id},
"stale": [id, ...]}``. ``images`` is what each name was last loaded as; ``stale`` what ocibuild loaded and no
longer runs: the image a new one replaced, a stage once its layer is built. Stale images are removed when
`ocibuild run` loads a new image, and by `ocibuild gc` — never by force: one a container still uses stays
listed until a later try. An image that also has a name ocibuild did not give it for this store (a user's
tag, another store's image of the same content) is no longer this store's: its names from this store are taken
off, and the image is left to whoever else names it.

The record lets a no-op `ocibuild run` skip everything but one question to the engine (does it still hold that
id?), asked while ocibuild plans (:meth:`Engine.has_image_later`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .engine import Engine
from .errors import EngineError, FormatError, StoreError
from .files import atomic_write
from .oci import Descriptor, parse_json
from .store import Store

log = logging.getLogger(__name__)

_DIR = "engine"
STAGE_REPOSITORY = "localhost/ocibuild-stage"
#: the suffix of the image name `--source-mount` runs
SOURCE_MOUNT = "-source-mount"
#: run layers' containers: ocibuild-<layer>-<12 hex of the key>-<pid of the ocibuild that ran it>
_CONTAINER = re.compile(r"ocibuild-.+-[0-9a-f]{12}-(\d+)")


def store_hash(store: Store) -> str:
    return hashlib.sha256(str(store.root.absolute()).encode()).hexdigest()[:12]


def image_name(name: str, store: Store) -> str:
    """The engine's name for the image ``name`` (``[image] name``) of ``store``."""
    return f"localhost/{re.sub(r'[^a-z0-9]+', '-', name.lower()).strip('-') or 'image'}:{store_hash(store)}"


def stage_name(store: Store, key_hex: str) -> str:
    return f"{STAGE_REPOSITORY}:{store_hash(store)}-{key_hex[:16]}"


@dataclass(frozen=True)
class Removed:
    """An image or container ocibuild removed from an engine."""

    engine: str
    kind: str  # "image" | "container"
    id: str
    names: tuple[str, ...] = ()


def _record_path(store: Store, engine: Engine) -> Path:
    key = hashlib.sha256(json.dumps([engine.name, *engine.args]).encode()).hexdigest()[:16]
    return store.private_dir(_DIR) / f"{key}.json"


def _read(path: Path) -> dict[str, Any]:
    try:
        doc = parse_json(path.read_bytes(), str(path))
    except FileNotFoundError:
        return {}
    except (OSError, FormatError) as err:
        log.warning("ignoring %s: %s", path, err)
        return {}
    return doc if isinstance(doc, dict) else {}


def loaded(store: Store, engine: Engine, name: str) -> str | None:
    """The id ``name`` was last loaded as into ``engine`` (which may have lost it since), or None."""
    image = _read(_record_path(store, engine)).get("images", {}).get(name)
    return image if isinstance(image, str) else None


@contextmanager
def _record(store: Store, engine: Engine) -> Iterator[dict[str, Any]]:
    """The record of ``engine``, to change in place; written back when the block ends (under the store lock)."""
    path = _record_path(store, engine)
    with store.lock():
        doc = _read(path)
        doc.update(engine=engine.name, args=list(engine.args))
        doc.setdefault("images", {})
        doc.setdefault("stale", [])
        before = json.dumps(doc, sort_keys=True)
        yield doc
        if json.dumps(doc, sort_keys=True) != before:
            try:
                atomic_write(path, (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode())
            except OSError as err:
                raise StoreError(f"write {path}: {err.strerror}", "check the store's permissions and free space") \
                    from None


def load(store: Store, engine: Engine, tag: str, image: Descriptor, name: str, *,
         present: bool | None = None) -> str:
    """Make the store's image ``tag`` (``image``) available in ``engine`` as ``name``; returns its id there. The
    image ``name`` was before becomes stale, and every stale image is removed that can be (see the module
    docstring), with the stopped containers of ocibuild processes that are gone. ``present``: whether the engine
    holds the image, when known already."""
    image_id = _load(store, engine, tag, image, name, present)
    with _record(store, engine) as record:
        previous = record["images"].get(name)
        record["images"][name] = image_id
        if previous not in (None, image_id) and previous not in record["stale"]:
            record["stale"].append(previous)
    try:
        sweep(store, engine)
    except EngineError as err:  # what stays is removed next time, or by gc
        log.warning("%s", err)
    return image_id


def stage(store: Store, engine: Engine, tag: str, image: Descriptor, key_hex: str) -> str:
    """A run layer's stack, tagged ``tag`` in the store, loaded into ``engine``; returns its id there. Call
    :func:`retire` when the layer is built."""
    return _load(store, engine, tag, image, stage_name(store, key_hex), None)


def retire(store: Store, engine: Engine, image_id: str) -> None:
    """A stage ocibuild no longer needs: stale, removed by the next `ocibuild run` that loads an image, or gc
    (a rebuild of the same layer meanwhile finds it still there)."""
    with _record(store, engine) as record:
        if image_id not in record["stale"]:
            record["stale"].append(image_id)


def _load(store: Store, engine: Engine, tag: str, image: Descriptor, name: str, present: bool | None) -> str:
    config = store.get_manifest(image.digest).config.digest
    with store.temp_dir() as directory:  # removed after the load, or by the next ocibuild if this one is killed

        def archive() -> Path:  # nerdctl's way in
            from .archive import write_oci_archive

            path = directory / "image.tar"
            write_oci_archive(store, image, name, path)
            return path

        return engine.load_from_layout(store.root, tag, config.hex, name, archive, present=present)


def _ours(store: Store, name: str) -> bool:
    """A name ocibuild gives images of ``store``."""
    return name.startswith("localhost/") and name.rpartition(":")[2].startswith(store_hash(store))


def sweep(store: Store, engine: Engine, *, stages: bool = False) -> list[Removed]:
    """Remove what ocibuild no longer needs from ``engine``: the stopped containers of ocibuild processes that
    are gone, the stale images of the record (never one a name runs again) and, with ``stages``, every stage of
    this store (gc: a build killed before it retired its stage leaves one). The engine is asked outside the store
    lock; the record is changed under it."""
    removed = _stopped_containers(engine)  # first: one may hold a stale image
    record = _read(_record_path(store, engine))
    current = set(record.get("images", {}).values())
    candidates = [i for i in record.get("stale", []) if isinstance(i, str)]
    if stages and engine.name == "podman":
        candidates += [i for i, names in engine.images_named(STAGE_REPOSITORY).items()
                       if i not in candidates and any(_ours(store, n) for n in names)]
    settled = []
    for image_id in candidates:
        names = None if image_id in current else engine.image_names(image_id)
        ours = [n for n in names or () if _ours(store, n)]
        if names is not None and len(ours) < len(names):  # named by someone else too (another store): theirs now
            if ours:
                engine.untag(image_id, ours)
        elif names is not None:
            if not engine.remove_image(image_id, names):
                continue  # a container uses it: next time
            removed.append(Removed(engine.name, "image", image_id, tuple(names)))
        settled.append(image_id)  # removed, gone, run again, or left to whoever else names it
    with _record(store, engine) as changed:
        changed["stale"] = [i for i in changed["stale"] if i not in settled]
    return removed


def _stopped_containers(engine: Engine) -> list[Removed]:
    """Remove the stopped containers of run layers whose ocibuild process is gone (killed mid-build)."""
    if engine.name != "podman":
        return []  # run layers need podman: nerdctl has none
    removed = []
    for container in engine.stopped_containers("ocibuild-"):
        match = _CONTAINER.fullmatch(container)
        if match is None or _alive(int(match.group(1))):
            continue
        engine.remove_container(container)
        removed.append(Removed(engine.name, "container", container))
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _gone(args: list[Any]) -> bool:
    """The engine's storage (``--root DIR``) no longer exists: nothing of ours is left there, and asking the
    engine would make it again."""
    return any(a == "--root" and i + 1 < len(args) and not Path(str(args[i + 1])).exists() for i, a in enumerate(args))


def gc(store: Store) -> list[Removed]:
    """`ocibuild gc`: in every engine ocibuild loaded images of ``store`` into, remove what :func:`sweep` removes,
    stages included. An engine no longer installed is skipped."""
    removed = []
    for path in sorted(store.private_dir(_DIR).glob("*.json")):
        doc = _read(path)
        name, args = doc.get("engine"), doc.get("args")
        if not isinstance(name, str) or not isinstance(args, list) or shutil.which(name) is None or _gone(args):
            continue
        try:
            removed += sweep(store, Engine(name, [str(a) for a in args]), stages=True)
        except EngineError as err:
            log.warning("%s: %s", path, err)
    return removed
