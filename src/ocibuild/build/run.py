"""``run`` layers: a script run in a container on the stack of the layer's needs; what it changed becomes the
layer. The stack is staged into the engine as an image (:func:`staged`); the change set comes from the engine's
container diff and the files from its mounted root filesystem (:func:`capture`). The layer's ``caches`` are
directories of the store (:func:`ocibuild.runcache.layer_caches`) bind-mounted into the container: a mount's
content never shows in the container diff, so it never enters the layer.

The layer keeps what the step made of each path it changed: type, mode, owner, content, the names of a hard-linked
file (within the layer: one file, then hardlinks to it), and the extended attributes of :func:`step_xattrs` (file
capabilities, POSIX ACLs, ``user.*``), as ``podman build`` keeps them.

Rootless podman keeps a container's files under subordinate ids, so there the capture runs as a process of its
own inside ``podman unshare``: ``python -m ocibuild.build.run`` (see :func:`_capture_main`).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import stat
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .. import engineimages, oci, runcache
from ..tar import read
from ..engine import BindMount, Engine
from ..errors import EngineError, OcibuildError
from ..inputs import IgnoreRules
from ..net.download import fetch_file
from ..oci import LayerBlob, Descriptor, Digest, Manifest
from ..recipe.project import LayerRecipe
from ..store import Store
from ..tar.write import Entry
from .context import BuildContext, write_entries

log = logging.getLogger(__name__)


@contextmanager
def staged(store: Store, config_bytes: bytes, manifest: Manifest, key: Digest, engine: Engine) -> Iterator[str]:
    """The image of ``config_bytes`` and ``manifest`` (a stack of layers, see :func:`planner.image_manifest`),
    tagged in the store for the engine to load while the context lasts; yields the engine's image id. The engine
    copies only layers it lacks; nothing moves when it has the image. ``key`` names the stage, in the store and
    in the engine (see :mod:`ocibuild.engineimages`), which removes it later: stale once the context ends."""
    tag = f"ocibuild-stage-{key.hex[:16]}"
    store.put(config_bytes, oci.OCI_CONFIG)
    descriptor = store.put_manifest(manifest)
    store.tag(tag, descriptor)
    try:
        image = engineimages.stage(store, engine, tag, descriptor, key.hex)
        try:
            yield image
        finally:
            engineimages.retire(store, engine, image)
    finally:
        store.untag(tag)


#: Paths a run layer never keeps (``exclude`` in layer.toml extends the list): scratch space, package-manager
#: caches and indexes, logs, byte-code caches, and ocibuild's own mount points.
VOLATILE = (
    "tmp/*", "var/tmp/*", "var/lib/apt/lists/*", "var/cache/apt/*", "var/cache/debconf/*-old",
    "var/lib/dpkg/*-old", "var/log/*", "**/__pycache__", "root/.cache", "var/cache/ldconfig/aux-cache",
    "ocibuild", "run/*",
)
SCRIPT_PATH = "/ocibuild/script"
INPUTS_DIR = "/ocibuild/inputs"


def run_inputs(ctx: BuildContext, layer: LayerRecipe) -> list[BindMount]:
    """The script and the inputs of a run layer as read-only bind mounts (downloads fetched and verified)."""
    mounts = [BindMount(layer.dir / layer.str_("script"), SCRIPT_PATH, read_only=True)]
    for ref in layer.inputs:
        if ref.path is not None:
            mounts.append(BindMount(layer.dir / ref.path, f"{INPUTS_DIR}/{PurePosixPath(ref.path).name}", True))
        else:
            assert ref.url is not None and ref.sha256 is not None and ref.name is not None
            path = fetch_file(ref.url, Digest.from_hex(ref.sha256), ctx.store, offline=ctx.offline,
                              progress=ctx.output, what=f"layer '{layer.name}'")
            mounts.append(BindMount(path, f"{INPUTS_DIR}/{ref.name}", True))
    return mounts


@dataclass(frozen=True)
class CaptureFilter:
    """Which changed paths a run step keeps: not ``exclude``-matched, and within ``only`` when it is given."""

    exclude: tuple[str, ...] = ()
    only: frozenset[str] | None = None

    def keeps(self, path: str, rules: IgnoreRules) -> bool:
        return (self.only is None or path in self.only) and not rules.excluded(path)


def build_run(ctx: BuildContext, engine: Engine, layer: LayerRecipe, key: Digest, image: str) -> list[LayerBlob]:
    """``run``: the script in a container on the stack of its needs; what it changed becomes the layer."""
    if ctx.offline and layer.bool_("network"):
        raise OcibuildError(f"layer '{layer.name}' is a run layer with network = true, which --offline forbids",
                            "bring the layer from a connected machine (`ocibuild export` / `import`)")
    keep = CaptureFilter((*VOLATILE, *layer.strings("exclude")))
    caches = layer.strings("caches")

    def waiting() -> None:
        ctx.output(f"layer '{layer.name}': waiting for its caches, which another ocibuild process is using")

    with runcache.layer_caches(ctx.store, ctx.project_root, engine.name, layer.name, caches,
                               waiting=waiting) as dirs:
        mounts = [*run_inputs(ctx, layer), *(BindMount(host, path) for host, path in dirs)]
        return [run_and_capture(ctx, engine, image, name=layer.name, key=key, mounts=mounts, env=layer.table("env"),
                                workdir=layer.str_("workdir"), network=layer.bool_("network"), keep=keep,
                                mount_points=caches)]


def run_and_capture(ctx: BuildContext, engine: Engine, image: str, *, name: str, key: Digest,
                    mounts: Sequence[BindMount], env: Mapping[str, str], workdir: str, network: bool,
                    keep: CaptureFilter, mount_points: Sequence[str] = ()) -> LayerBlob:
    """Run the script mounted at SCRIPT_PATH in a container of ``image``; the paths it changed that ``keep``
    accepts become one layer, less ``mount_points`` (see :func:`without_mount_points`). The change set comes from
    the engine's container diff and the files from its mounted root filesystem, so capturing costs in proportion
    to the change, not to the image. The output streams to ``ctx.output`` and to a log file in the store. When
    ``ctx.stop`` is set the container is killed and removed, and :class:`~ocibuild.threads.Stopped`, or the
    engine's error, is raised."""
    # the pid keeps two builds of the same layer (into two stores, say) from removing each other's container
    container = f"ocibuild-{re.sub(r'[^a-z0-9_.-]', '-', name.lower())}-{key.hex[:12]}-{os.getpid()}"
    log_path = ctx.store.private_dir("logs") / f"{name}-{key.hex[:12]}.log"
    engine.remove_container(container)
    try:
        with open(log_path, "w", encoding="utf-8", errors="replace") as log_file:
            def tee(line: str) -> None:
                log_file.write(line + "\n")
                ctx.output(line)
                ctx.stop.check()  # a container that started after the stop's kill ends at its next line

            ctx.step("running the script")
            with ctx.stop.hook(lambda: engine.kill_container(container)):  # the build stops: kill it
                engine.run(image, ["/bin/sh", "-eu", SCRIPT_PATH], name=container, mounts=mounts, env=env,
                           workdir=workdir, network=network, output=tee, what=f"layer '{name}'")
        ctx.stop.check()
        ctx.step("capturing the changes")
        changes = without_mount_points(engine.diff(container), mount_points)
        if engine.needs_unshare():
            return _capture_in_user_namespace(ctx, engine, container, changes, keep, name)
        return capture_container(ctx, engine, container, changes, keep, what=f"layer '{name}'")
    finally:
        if ctx.stop.is_set():  # started after the stop's kill: killed now (rm alone waits 10 s for sh to exit)
            engine.kill_container(container)
            engine.remove_container(container)
        else:  # captured, or failed: the build goes on (or reports) while the engine deletes its files
            engine.remove_container_later(container)


def without_mount_points(changes: Mapping[str, str], points: Sequence[str]) -> dict[str, str]:
    """``changes`` less the mount points ``points`` (absolute, normalised) and what lies below them, and less the
    directories the engine added only to hold one (it makes a missing mount point, and its missing parents, in the
    container): those are the same whatever the mounts, so the layer is too, as its key promises."""
    def under(path: str, top: str) -> bool:
        return path == top or path.startswith(top + "/")

    kept = {path: kind for path, kind in changes.items() if not any(under(path, point) for point in points)}
    holders = sorted((path for path, kind in kept.items() if kind == "A" and any(under(p, path) for p in points)),
                     key=lambda path: -path.count("/"))  # the deepest first: its parent may then hold nothing
    for holder in holders:
        if not any(path != holder and under(path, holder) for path in kept):
            del kept[holder]
    return kept


def capture_container(ctx: BuildContext, engine: Engine, container: str, changes: Mapping[str, str],
                      keep: CaptureFilter, *, what: str) -> LayerBlob:
    rules = IgnoreRules(keep.exclude, f"{what}: exclude")
    with engine.mounted(container) as root:
        return write_entries(ctx, capture(root, changes, lambda p: keep.keeps(p, rules), what=what))


def _capture_in_user_namespace(ctx: BuildContext, engine: Engine, container: str, changes: Mapping[str, str],
                               keep: CaptureFilter, name: str) -> LayerBlob:
    """Rootless: the container's files belong to subordinate ids, readable only inside podman's user namespace,
    so the capture runs there (``podman unshare``), writing the blob into the store as the invoking user."""
    spec = {
        "store": str(ctx.store.root), "project": str(ctx.project_root), "compression": ctx.compression,
        "epoch": ctx.epoch, "container": container, "changes": dict(changes), "name": name,
        "exclude": list(keep.exclude), "only": sorted(keep.only) if keep.only is not None else None,
        "engine": engine.name, "engine_args": list(engine.args),
    }
    out = engine.unshare([sys.executable, "-m", "ocibuild.build.run"], json.dumps(spec).encode(),
                         what=f"layer '{name}': capture")
    try:
        result = json.loads(out.strip().splitlines()[-1])
        return LayerBlob(Descriptor(result["media_type"], Digest.parse(result["digest"]), int(result["size"])),
                     Digest.parse(result["diff_id"]))
    except (ValueError, KeyError, IndexError):
        raise EngineError(f"layer '{name}': the capture in the user namespace printed no result",
                          "run with --debug and report the output") from None


def _capture_main() -> int:
    """``python -m ocibuild.build.run`` < spec: the capture step inside ``podman unshare`` (see above)."""
    spec = json.load(sys.stdin)
    store = Store.open(Path(spec["store"]))
    ctx = BuildContext(store, Path(spec["project"]), spec["compression"], spec["epoch"], True,
                       lambda line: print(line, file=sys.stderr))
    keep = CaptureFilter(tuple(spec["exclude"]), frozenset(spec["only"]) if spec["only"] is not None else None)
    engine = Engine(spec["engine"], spec["engine_args"])
    built = capture_container(ctx, engine, spec["container"], spec["changes"], keep, what=f"layer '{spec['name']}'")
    print(json.dumps({"media_type": built.descriptor.media_type, "digest": str(built.descriptor.digest),
                      "size": built.descriptor.size, "diff_id": str(built.diff_id)}))
    return 0


#: The extended attributes a run layer keeps: those podman keeps (file capabilities, IMA signatures, ``user.*``) and
#: POSIX ACLs (as umoci), less the ``user.*`` names overlay filesystems and containers/storage use for themselves.
#: Others (``security.selinux``, ``trusted.*``) are the host's or the engine's, not what the step made.
KEPT_XATTRS = frozenset({"security.capability", "security.ima", "system.posix_acl_access",
                         "system.posix_acl_default"})
_ENGINE_XATTRS = ("user.overlay.", "user.fuseoverlayfs.", "user.containers.")


def step_xattrs(path: Path) -> dict[str, str]:
    """The extended attributes of ``path`` (not followed) that a run layer keeps (:data:`KEPT_XATTRS` and
    ``user.*``), as an Entry holds them; one with an empty value is left out (a tar header cannot hold it)."""
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as err:
        if err.errno in (errno.ENOTSUP, errno.ENOENT):  # a filesystem without xattrs; a path gone meanwhile
            return {}
        raise
    found: dict[str, str] = {}
    for name in sorted(names):
        if name in KEPT_XATTRS or (name.startswith("user.") and not name.startswith(_ENGINE_XATTRS)):
            try:
                value = os.getxattr(path, name, follow_symlinks=False)
            except OSError as err:
                if err.errno in (errno.ENODATA, errno.ENOENT):  # removed meanwhile
                    continue
                raise
            if value:
                found[name] = value.decode("utf-8", "surrogateescape")
    return found


def capture(root: Path, changes: Mapping[str, str], keep: Callable[[str], bool], *, what: str) -> list[Entry]:
    """Layer entries for a container's changes (``{"/path": "A"|"C"|"D"}``) read from its root ``root``.

    Deleted paths become OCI whiteouts; a path reported deleted that exists again was replaced (``rm -rf d;
    mkdir d``), so it gets an opaque whiteout and its new content. Regular files of more than one name are one
    file and hardlinks to it when several of their names are kept (the writer puts the content under the first
    name in path order). Files and directories carry their :func:`step_xattrs` (a symlink can hold none of them)."""
    entries: dict[str, Entry] = {}
    # a hard-linked file's first kept name, by its inode and what it says of itself (on overlayfs, two copies of
    # one lower file may report the inode number of their origin: their ctimes differ)
    linked: dict[tuple[int, ...], str] = {}
    for raw_path, kind in changes.items():
        path = read.normalise_path(raw_path)
        if path is None or not keep(path):
            continue
        parent, _, name = path.rpartition("/")
        try:
            st: os.stat_result | None = os.lstat(root / path)
        except FileNotFoundError:
            st = None
        if kind == "D":
            if st is None:
                whiteout = f"{parent}/.wh.{name}" if parent else f".wh.{name}"
                entries[whiteout] = Entry(whiteout, "file", 0o644)
                continue
            if stat.S_ISDIR(st.st_mode):
                opaque = f"{path}/.wh..wh..opq"
                entries[opaque] = Entry(opaque, "file", 0o644)
        if st is None:
            log.debug("%s: %s changed but is gone", what, path)
            continue
        mode, uid, gid, mtime = stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, int(st.st_mtime)
        if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
            first = linked.setdefault(
                (st.st_dev, st.st_ino, st.st_ctime_ns, st.st_mtime_ns, st.st_size, st.st_mode), path)
            if first != path:
                entries[path] = Entry(path, "hardlink", mode, uid, gid, linkname=first, mtime=mtime)
                continue
        if stat.S_ISDIR(st.st_mode):
            entries[path] = Entry(path, "dir", mode, uid, gid, mtime=mtime, xattrs=step_xattrs(root / path))
        elif stat.S_ISREG(st.st_mode):
            entries[path] = Entry(path, "file", mode, uid, gid, st.st_size, source=str(root / path), mtime=mtime,
                                  xattrs=step_xattrs(root / path))
        elif stat.S_ISLNK(st.st_mode):
            entries[path] = Entry(path, "symlink", mode, uid, gid, linkname=os.readlink(root / path), mtime=mtime)
        else:
            log.info("%s: leaving out %s (device, fifo or socket)", what, path)
    return list(entries.values())


if __name__ == "__main__":
    sys.exit(_capture_main())
