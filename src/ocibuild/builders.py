"""One function per layer kind: each turns a recipe and its resolved inputs into layer blobs in the store.

A builder returns the layers it made as :class:`Built` (blob descriptor + diff_id), bottom first; the planner
records them as a cache entry. Builders write blobs only through ``Store.writer``, so a failure part-way leaves
nothing in the store.
"""

from __future__ import annotations

import json
import logging
import os
import re
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import BinaryIO, cast

from . import archive as oci_archive, oci, registry
from .tar import codecs, read, write
from .errors import EngineError, FormatError, OcibuildError, RecipeError, StepFailed, StoreError
from .engine import BindMount, Engine
from .inputs import IgnoreRules, Tree, fetch
from .oci import Built, Descriptor, Digest
from .recipe import LayerRecipe
from .store import Store
from .tar.write import Entry

log = logging.getLogger(__name__)

Output = Callable[[str], None]


@dataclass(frozen=True)
class BuildContext:
    store: Store
    project_root: Path
    compression: str
    epoch: int
    offline: bool
    output: Output  # receives progress lines and the output of build steps
    registries: registry.Registries | None = None  # for image layers with a registry reference


def write_entries(ctx: BuildContext, entries: Sequence[Entry]) -> Built:
    """Write ``entries`` as one reproducible, compressed layer blob into the store."""
    with ctx.store.writer() as blob:
        stats = write.write_layer(entries, cast(BinaryIO, blob), ctx.compression, epoch=ctx.epoch)
    return Built(Descriptor(oci.layer_media_type(ctx.compression), blob.digest, blob.size), stats.diff_id)


def _owner(layer: LayerRecipe) -> tuple[int, int]:
    uid, gid = layer.str_("owner").split(":")
    return int(uid), int(gid)


def _under(dest: str, path: str) -> str:
    joined = str(PurePosixPath(dest) / path) if path else dest
    normal = read.normalise_path(joined)
    if normal is None:
        raise RecipeError(f"destination {joined!r} is the root itself")
    return normal


def build_copy(ctx: BuildContext, layer: LayerRecipe, tree: Tree) -> list[Built]:
    """``copy``: the tree below ``from`` at ``to``. Owners default to 0:0; modes are normalised to 0755 for
    directories and executables, 0644 for other files, so that umask and checkout do not change the layer."""
    uid, gid = _owner(layer)
    to = layer.str_("to")
    single_file = not (ctx.project_root / layer.str_("from")).is_dir()
    entries = []
    for item in tree.entries:
        # a single file lands at `to` itself, or inside it when `to` ends with '/' (as COPY does)
        path = _under(to, item.path) if not single_file or to.endswith("/") else _under(to, "")
        if item.type == "dir":
            entries.append(Entry(path, "dir", 0o755, uid, gid, mtime=ctx.epoch))
        elif item.type == "symlink":
            entries.append(Entry(path, "symlink", 0o777, uid, gid, linkname=item.linkname, mtime=ctx.epoch))
        else:
            mode = 0o755 if item.mode & 0o111 else 0o644
            entries.append(Entry(path, "file", mode, uid, gid, size=item.size, source=item.source, mtime=ctx.epoch))
    entries = write.with_parents(entries, uid=uid, gid=gid, mtime=ctx.epoch)
    built = write_entries(ctx, entries)
    # The tree walk already hashed every file: record the layer's listing now rather than re-reading the blob.
    content = {item.source: item.sha256 for item in tree.entries if item.type == "file"}
    save_listing(ctx.store, built.diff_id, {
        e.path: f"file:{e.mode:04o}:{content[e.source or '']}" if e.type == "file"
        else f"dir:{e.mode:04o}" if e.type == "dir" else f"{e.type}:{e.linkname}"
        for e in entries
    })
    return [built]


def listing_path(store: Store, diff_id: Digest) -> Path:
    """Where a layer's listing (path → fingerprint, as :func:`read.list_layer` makes it) is cached."""
    return store.private_dir("listings") / f"{diff_id.hex}.json"


def save_listing(store: Store, diff_id: Digest, listing: Mapping[str, str]) -> None:
    path = listing_path(store, diff_id)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(listing, sort_keys=True))
    tmp.replace(path)


@contextmanager
def _temp_file(ctx: BuildContext, suffix: str) -> Iterator[Path]:
    fd, name = tempfile.mkstemp(suffix=suffix, dir=ctx.store.private_dir("tmp"))
    os.close(fd)
    try:
        yield Path(name)
    finally:
        Path(name).unlink(missing_ok=True)


def archive_source(ctx: BuildContext, layer: LayerRecipe) -> Path:
    """The archive file of an ``archive`` layer, downloaded (or found in the download cache) and verified."""
    url = layer.str_("url")
    where = url if "://" in url else str(layer.dir / url)
    return fetch(where, layer.str_("sha256"), ctx.store.private_dir("downloads"), offline=ctx.offline,
                 progress=ctx.output, what=f"layer '{layer.name}'")


def build_archive(ctx: BuildContext, layer: LayerRecipe) -> list[Built]:
    """``archive``: a release tarball unpacked at ``dest`` with ``strip_components``, owners 0:0 by default."""
    source = archive_source(ctx, layer)
    uid, gid = _owner(layer)
    strip = layer.int_("strip_components")
    dest = layer.str_("dest")
    what = f"layer '{layer.name}': {layer.str_('url')}"
    with _temp_file(ctx, ".tar") as plain:
        with open(source, "rb") as src, open(plain, "wb") as dst:
            compression = codecs.sniff_compression(src.read(8))
            src.seek(0)
            codecs.decompress_to(src, dst, compression)
        entries = []
        for entry in write.tarball_entries(plain, what=what):
            parts = entry.path.split("/")
            if len(parts) <= strip:
                continue
            path = _under(dest, "/".join(parts[strip:]))
            linkname = entry.linkname
            if entry.type == "hardlink":
                link_parts = linkname.split("/")
                if len(link_parts) <= strip:
                    continue
                linkname = _under(dest, "/".join(link_parts[strip:]))
            entries.append(replace(entry, path=path, linkname=linkname, uid=uid, gid=gid))
        return [write_entries(ctx, write.with_parents(entries, uid=uid, gid=gid, mtime=ctx.epoch))]


def build_bootstrap(ctx: BuildContext, layer: LayerRecipe) -> list[Built]:
    """``bootstrap``: a root filesystem by mmdebstrap, reproducible via SOURCE_DATE_EPOCH; owners kept."""
    if ctx.offline:
        raise OcibuildError(f"layer '{layer.name}': a bootstrap layer downloads packages, which --offline forbids",
                            "build it on a connected machine and bring it with `ocibuild export`/`import`")
    mirror, suite = layer.str_("mirror"), layer.str_("suite")
    components = " ".join(layer.strings("components"))
    sources = [f"deb {mirror} {suite} {components}"]
    if layer.bool_("deb_src"):
        sources.append(f"deb-src {mirror} {suite} {components}")
    with _temp_file(ctx, ".tar") as out:
        argv = ["mmdebstrap", f"--variant={layer.str_('variant')}", f"--components={','.join(layer.strings('components'))}",
                '--aptopt=Acquire::Retries "5"']  # a dropped connection to the archive is retried, not fatal
        if layer.strings("packages"):
            argv.append(f"--include={','.join(layer.strings('packages'))}")
        if os.geteuid() != 0:
            argv.append("--mode=unshare")
        argv += [suite, str(out), *sources]
        env = {**os.environ, "SOURCE_DATE_EPOCH": str(ctx.epoch)}
        run_streaming(argv, env=env, output=ctx.output, what=f"layer '{layer.name}': mmdebstrap",
                      missing_hint="install mmdebstrap (apt-get install mmdebstrap), or run `ocibuild doctor`")
        entries = [e for e in write.tarball_entries(out, what=f"layer '{layer.name}'", skip_devices=True)]
        return [write_entries(ctx, entries)]


def run_streaming(argv: Sequence[str], *, env: dict[str, str] | None, output: Output, what: str,
                  missing_hint: str, tail_lines: int = 20) -> None:
    """Run a helper tool, streaming its output lines to ``output``; StepFailed with the last lines on failure."""
    tail: list[str] = []
    try:
        proc = subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise EngineError(f"{what}: '{argv[0]}' is not installed", missing_hint) from None
    assert proc.stdout is not None
    with proc:
        for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            output(line)
            tail = (tail + [line])[-tail_lines:]
    if proc.returncode != 0:
        raise StepFailed(f"{what} exited {proc.returncode}", "see the output above; fix the recipe and build again",
                         exit_code=proc.returncode, tail="\n".join(tail))


def build_image(ctx: BuildContext, layer: LayerRecipe, manifest_digest: Digest) -> tuple[list[Built], oci.ImageConfig]:
    """``image``: the layers of an existing image, copied (verified) into the store; returns them and its config."""
    ref = layer.str_("ref")
    what = f"layer '{layer.name}': {ref}"
    if ref.startswith("oci-archive:"):
        _import_oci_archive(ctx, layer, ref)
    elif ref.startswith("oci:"):
        source = open_oci_dir(ctx.project_root, layer, ref)[0]
        _copy_manifest_blobs(source, ctx.store, manifest_digest, what)
    else:
        _fetch_registry_image(ctx, layer, ref, manifest_digest)
    manifest = ctx.store.get_manifest(manifest_digest)
    config = ctx.store.get_config(manifest.config.digest)
    if len(config.diff_ids) != len(manifest.layers):
        raise FormatError(f"{what}: the config lists {len(config.diff_ids)} diff_ids for {len(manifest.layers)} layers")
    for descriptor in manifest.layers:
        if descriptor.media_type not in oci.LAYER_TYPES:
            raise FormatError(f"{what}: layer media type '{descriptor.media_type}' is not supported",
                              "use an image with OCI or Docker tar/gzip/zstd layers")
    return [Built(d, diff) for d, diff in zip(manifest.layers, config.diff_ids)], config


def _fetch_registry_image(ctx: BuildContext, layer: LayerRecipe, ref: str, manifest_digest: Digest) -> None:
    """The locked manifest of a registry image, with its config and layers, into the store (verified)."""
    if ctx.offline:
        raise OcibuildError(f"layer '{layer.name}': {ref} must be fetched from its registry and --offline forbids it",
                            "run the build once without --offline, pull-cache the layer, or bring it from a connected "
                            "machine (`ocibuild export` there, `ocibuild import` here)")
    reference = oci.Reference.parse(ref)
    registries = ctx.registries or registry.Registries()
    registry.fetch_image(registries.client(reference.registry), ctx.store, reference.repository, manifest_digest)


def split_oci_ref(text: str) -> tuple[str, str | None]:
    """``oci:DIR[:TAG]`` / ``oci-archive:PATH[:TAG]`` → (path, tag or None)."""
    body = text.split(":", 1)[1]
    if ":" in body:
        path, tag = body.rsplit(":", 1)
        return path, tag or None
    return body, None


def open_oci_dir(root: Path, layer: LayerRecipe, ref: str) -> tuple[Store, str | None]:
    """The layout of an ``oci:DIR[:TAG]`` ref and its tag (None: the layout's single manifest, as skopeo reads it)."""
    path, tag = split_oci_ref(ref)
    directory = (layer.dir / path) if not os.path.isabs(path) else Path(path)
    try:
        return Store.open(directory, create=False), tag
    except StoreError as err:
        raise RecipeError(f"layer '{layer.name}': {ref}: {err}", "point ref at an OCI image layout directory") from None


def _copy_manifest_blobs(source: Store, target: Store, manifest_digest: Digest, what: str) -> None:
    manifest_bytes = source.read_blob(manifest_digest)
    manifest = oci.Manifest.parse(manifest_bytes, what)
    for descriptor in (manifest.config, *manifest.layers):
        if not target.has(descriptor.digest):
            with source.open_blob(descriptor.digest, size=descriptor.size) as src, \
                    target.writer(expected=descriptor.digest, size=descriptor.size) as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
    target.put(manifest_bytes, manifest.media_type)


def _import_oci_archive(ctx: BuildContext, layer: LayerRecipe, ref: str) -> None:
    """The blobs of an oci-archive into the store, checked as `ocibuild import` checks an archive."""
    path, _ = split_oci_ref(ref)
    archive = layer.dir / path
    if not archive.is_file():
        raise RecipeError(f"layer '{layer.name}': {ref}: {archive} is not a file", "fix ref in the layer.toml")
    oci_archive.import_archive(ctx.store, archive, tag=False)


def read_oci_archive_index(path: Path, what: str) -> oci.Index:
    try:
        f = open(path, "rb")
    except OSError as err:
        raise RecipeError(f"{what}: cannot open {path}: {err.strerror}",
                          "fix ref in the layer.toml (paths are relative to the layer folder)") from None
    with f:
        for member, reader in read.iter_members(f, "none", what=what):
            if member.path == "index.json" and reader is not None:
                return oci.Index.parse(reader.read(16 << 20), f"{what}: index.json")
    raise FormatError(f"{what}: no index.json inside; is it an oci-archive?",
                      "make one with `skopeo copy … oci-archive:PATH`")


# ---- run layers ------------------------------------------------------------------------------------------------

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
            path = fetch(ref.url, ref.sha256, ctx.store.private_dir("downloads"), offline=ctx.offline,
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


def build_run(ctx: BuildContext, engine: Engine, layer: LayerRecipe, key: Digest, image: str) -> list[Built]:
    """``run``: the script in a container on the stack of its needs; what it changed becomes the layer."""
    if ctx.offline and layer.bool_("network"):
        raise OcibuildError(f"layer '{layer.name}' is a run layer with network = true, which --offline forbids",
                            "bring the layer from a connected machine (`ocibuild export` / `import`)")
    keep = CaptureFilter((*VOLATILE, *layer.strings("exclude")))
    return [run_and_capture(ctx, engine, image, name=layer.name, key=key, mounts=run_inputs(ctx, layer),
                            env=layer.table("env"), workdir=layer.str_("workdir"), network=layer.bool_("network"),
                            keep=keep)]


def run_and_capture(ctx: BuildContext, engine: Engine, image: str, *, name: str, key: Digest,
                    mounts: Sequence[BindMount], env: Mapping[str, str], workdir: str, network: bool,
                    keep: CaptureFilter) -> Built:
    """Run the script mounted at SCRIPT_PATH in a container of ``image``; the paths it changed that ``keep``
    accepts become one layer. The change set comes from the engine's container diff and the files from its
    mounted root filesystem, so capturing costs in proportion to the change, not to the image. The output
    streams to ``ctx.output`` and to a log file in the store."""
    # the pid keeps two builds of the same layer (into two stores, say) from removing each other's container
    container = f"ocibuild-{re.sub(r'[^a-z0-9_.-]', '-', name.lower())}-{key.hex[:12]}-{os.getpid()}"
    log_path = ctx.store.private_dir("logs") / f"{name}-{key.hex[:12]}.log"
    engine.remove_container(container)
    try:
        with open(log_path, "w", encoding="utf-8", errors="replace") as log_file:
            def tee(line: str) -> None:
                log_file.write(line + "\n")
                ctx.output(line)

            engine.run(image, ["/bin/sh", "-eu", SCRIPT_PATH], name=container, mounts=mounts, env=env,
                       workdir=workdir, network=network, output=tee, what=f"layer '{name}'")
        changes = engine.diff(container)
        if engine.needs_unshare():
            return _capture_in_user_namespace(ctx, engine, container, changes, keep, name)
        return capture_container(ctx, engine, container, changes, keep, what=f"layer '{name}'")
    finally:
        engine.remove_container(container)


def capture_container(ctx: BuildContext, engine: Engine, container: str, changes: Mapping[str, str],
                      keep: CaptureFilter, *, what: str) -> Built:
    rules = IgnoreRules(keep.exclude)
    with engine.mounted(container) as root:
        return write_entries(ctx, capture(root, changes, lambda p: keep.keeps(p, rules), what=what))


def _capture_in_user_namespace(ctx: BuildContext, engine: Engine, container: str, changes: Mapping[str, str],
                               keep: CaptureFilter, name: str) -> Built:
    """Rootless: the container's files belong to subordinate ids, readable only inside podman's user namespace,
    so the capture runs there (``podman unshare``), writing the blob into the store as the invoking user."""
    spec = {
        "store": str(ctx.store.root), "project": str(ctx.project_root), "compression": ctx.compression,
        "epoch": ctx.epoch, "container": container, "changes": dict(changes), "name": name,
        "exclude": list(keep.exclude), "only": sorted(keep.only) if keep.only is not None else None,
        "engine": engine.name, "engine_args": list(engine.args),
    }
    out = engine.unshare([sys.executable, "-m", "ocibuild.builders"], json.dumps(spec).encode(),
                         what=f"layer '{name}': capture")
    try:
        result = json.loads(out.strip().splitlines()[-1])
        return Built(Descriptor(result["media_type"], Digest.parse(result["digest"]), int(result["size"])),
                     Digest.parse(result["diff_id"]))
    except (ValueError, KeyError, IndexError):
        raise EngineError(f"layer '{name}': the capture in the user namespace printed no result",
                          "run with --debug and report the output") from None


def _capture_main() -> int:
    """``python -m ocibuild.builders`` < spec: the capture step inside ``podman unshare`` (see above)."""
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


def capture(root: Path, changes: Mapping[str, str], keep: Callable[[str], bool], *, what: str) -> list[Entry]:
    """Layer entries for a container's changes (``{"/path": "A"|"C"|"D"}``) read from its root ``root``.

    Deleted paths become OCI whiteouts; a path reported deleted that exists again was replaced (``rm -rf d;
    mkdir d``), so it gets an opaque whiteout and its new content. Hard links are stored as separate files."""
    entries: dict[str, Entry] = {}
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
        mode = stat.S_IMODE(st.st_mode)
        common = dict(mode=mode, uid=st.st_uid, gid=st.st_gid, mtime=int(st.st_mtime))
        if stat.S_ISDIR(st.st_mode):
            entries[path] = Entry(path, "dir", **common)  # type: ignore[arg-type]
        elif stat.S_ISREG(st.st_mode):
            entries[path] = Entry(path, "file", size=st.st_size, source=str(root / path), **common)  # type: ignore[arg-type]
        elif stat.S_ISLNK(st.st_mode):
            entries[path] = Entry(path, "symlink", linkname=os.readlink(root / path), **common)  # type: ignore[arg-type]
        else:
            log.info("%s: leaving out %s (device, fifo or socket)", what, path)
    return list(entries.values())


if __name__ == "__main__":
    sys.exit(_capture_main())
