"""Per layer: cached in the store, or to build; then build what is missing and assemble the image.

Data flows one way: recipes → inputs and lock → cache keys → status → builders → cache entries → image.

Every built (or imported) layer is recorded as a *cache entry*: an OCI image manifest tagged
``<name>-<64 hex of the key>`` in the store's index.json, whose layers are the layer blobs and whose config
carries ``rootfs.diff_ids`` and the labels ``dev.ocibuild.layer.{name,kind,key,inputs}``. A layer is cached
exactly when its entry's tag is present. The registry cache uses the same entries.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import bookkeeping, oci, registry
from .errors import FetchError, LayerConflict, LockError, OcibuildError, RecipeError, RegistryError
from .inputs import StatCache, Tree, fetch_bytes, hash_file, tree_digest, walk_tree
from .oci import Built, Descriptor, Digest, History, ImageConfig, Manifest, Platform, Reference, canonical_json
from .recipe import KEY_FORMAT, Input, LayerRecipe, Lock, LockEntry, Project, cache_key
from .store import Store

# A build that finds every layer cached (the common case, and a benchmark) needs none of the modules that make
# layers: builders, archive, tar (zstandard, isal), engine, tempfile together took ~35 ms of its start-up. They
# are imported in the functions that use them.
if TYPE_CHECKING:
    from . import archive as oci_archive
    from .builders import BuildContext
    from .engine import Engine

log = logging.getLogger(__name__)

LABEL_PREFIX = "dev.ocibuild.layer."
Output = Callable[[str], None]


def cache_tag(name: str, key: Digest) -> str:
    """The ref name of a layer's cache entry: ``<name>-<64 hex>``, name lowered to [a-z0-9._-], at most 63."""
    lowered = re.sub(r"[^a-z0-9._-]", "-", name.lower())[:63]
    return f"{lowered}-{key.hex}"


@dataclass(frozen=True)
class LayerPlan:
    recipe: LayerRecipe
    key: Digest
    inputs: tuple[Input, ...]
    status: str  # plan: "cached" | "pull" | "build"; after build: "cached" | "pulled" | "built"
    # a copy layer's tree when planning had to walk it in full (the tree cache did not know it), for the builder
    tree: Tree | None = field(default=None, compare=False)

    @property
    def name(self) -> str:
        return self.recipe.name

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.recipe.name,
            "kind": self.recipe.kind,
            "needs": list(self.recipe.needs),
            "key": str(self.key),
            "status": self.status,
            "inputs": [i.to_dict() for i in self.inputs],
        }


@dataclass(frozen=True)
class Plan:
    project: Project
    layers: tuple[LayerPlan, ...]
    # the cache planning used, for build() to walk copy trees that planning only fingerprinted
    stat_cache: StatCache | None = field(default=None, compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {"image": self.project.image.name, "layers": [layer.to_dict() for layer in self.layers]}

    def layer(self, name: str) -> LayerPlan:
        return next(layer for layer in self.layers if layer.name == name)


@dataclass(frozen=True)
class BuildResult:
    plan: Plan
    image: Descriptor
    warnings: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        out = self.plan.to_dict()
        out["digest"] = str(self.image.digest)
        if self.warnings:
            out["warnings"] = list(self.warnings)
        return out


# ---- the lock -------------------------------------------------------------------------------------------------


def lock_source(layer: LayerRecipe) -> str | None:
    """What a layer's moving input is resolved from, or None when the layer has no moving input."""
    if layer.kind == "bootstrap":
        return f"{layer.str_('mirror').rstrip('/')}/dists/{layer.str_('suite')}/InRelease"
    if layer.kind == "image":
        return layer.str_("ref")
    return None


def resolve_lock(project: Project, lock: Lock, *, refresh: Sequence[str] = (), offline: bool = False,
                 registries: registry.Registries | None = None) -> Lock:
    """``lock`` with an entry for every layer with a moving input; entries are kept unless missing, made for
    another source (the recipe changed) or named in ``refresh``."""
    resolved = lock.only(project.layer_names)
    for layer in project.layers:
        source = lock_source(layer)
        if source is None:
            continue
        if resolved.get(layer.name, source) is not None and layer.name not in refresh:
            continue
        if offline and (layer.kind == "bootstrap" or is_registry_ref(source)):
            raise LockError(f"ocibuild.lock has no entry for layer '{layer.name}' ({source}) and --offline forbids "
                            "resolving it", "run `ocibuild lock` on a connected machine and commit ocibuild.lock")
        resolved = resolved.with_entry(LockEntry(layer.name, source, _resolve(project, layer, source, registries)))
    return resolved


def is_registry_ref(source: str) -> bool:
    return not source.startswith(("oci-archive:", "oci:", "/", "http://", "https://", "file:"))


def _resolve(project: Project, layer: LayerRecipe, source: str, registries: registry.Registries | None) -> Digest:
    from . import builders

    if layer.kind == "bootstrap":
        return Digest.of(fetch_bytes(source, what=f"layer '{layer.name}'"))
    if source.startswith("oci-archive:"):
        path, tag = builders.split_oci_ref(source)
        index = builders.read_oci_archive_index(layer.dir / path, f"layer '{layer.name}': {source}")
        return _pick(index, tag, layer, source)
    if source.startswith("oci:"):
        store, tag = builders.open_oci_dir(project.root, layer, source)
        return _pick(store.index(), tag, layer, source)
    ref = Reference.parse(source)
    client = (registries or registry.Registries()).client(ref.registry)
    platform = Platform("linux", project.image.architecture)
    return registry.resolve_image(client, ref.repository, str(ref.digest or ref.tag), platform).digest


def _pick(index: oci.Index, tag: str | None, layer: LayerRecipe, source: str) -> Digest:
    if tag is not None:
        found = index.find(tag)
    else:
        manifests = [d for d in index.manifests if d.media_type in oci.MANIFEST_TYPES]
        found = manifests[0] if len(manifests) == 1 else None
    if found is None or found.media_type not in oci.MANIFEST_TYPES:
        tags = ", ".join(sorted(d.ref_name for d in index.manifests if d.ref_name)) or "none"
        raise RecipeError(f"layer '{layer.name}': {source}: no image manifest "
                          f"{'tagged ' + repr(tag) if tag else '(several or none, give a tag)'}",
                          f"tags present: {tags}")
    return found.digest


def write_lock(project: Project, lock: Lock) -> None:
    path = project.root / "ocibuild.lock"
    text = lock.to_toml()
    try:
        if path.exists() and path.read_text() == text:
            return
        tmp = path.with_name(".ocibuild.lock.tmp")
        tmp.write_text(text)
        tmp.replace(path)
    except OSError as err:
        raise LockError(f"{path}: cannot write: {err.strerror}", "check the project directory is writable") from None


# ---- planning -------------------------------------------------------------------------------------------------


def make_plan(project: Project, store: Store, lock: Lock, stat_cache: StatCache) -> Plan:
    """Keys and status of every layer, bottom first. Reads inputs (through the stat cache), not the network."""
    keys: dict[str, Digest] = {}
    layers = []
    index = store.index()
    epoch = project.image.source_date_epoch
    for layer in project.layers:
        inputs, tree = _inputs(project, layer, lock, stat_cache)
        key = cache_key(layer, epoch, inputs, [keys[n] for n in layer.needs])
        keys[layer.name] = key
        status = "cached" if index.find(cache_tag(layer.name, key)) is not None else "build"
        layers.append(LayerPlan(layer, key, tuple(inputs), status, tree))
    return Plan(project, tuple(layers), stat_cache)


def _relative(project: Project, path: Path) -> str:
    try:
        return str(path.relative_to(project.root))
    except ValueError:
        return str(path)


def _inputs(project: Project, layer: LayerRecipe, lock: Lock, cache: StatCache) -> tuple[list[Input], Tree | None]:
    where = _relative(project, layer.file)
    source = lock_source(layer)
    if source is not None:
        entry = lock.get(layer.name, source)
        if entry is None:
            raise LockError(f"ocibuild.lock has no entry for layer '{layer.name}' ({source})",
                            "run `ocibuild lock` to resolve it")
        return [Input(source, entry.digest)], None
    if layer.kind == "copy":
        digest, tree = tree_digest(_copy_root(project, layer, where), layer.strings("exclude"), cache, what=where)
        return [Input(layer.str_("from"), digest)], tree
    if layer.kind == "archive":
        url = layer.str_("url")
        name = url if "://" in url else _relative(project, layer.dir / url)
        return [Input(name, Digest.from_hex(layer.str_("sha256")))], None
    if layer.kind == "run":
        inputs = [_file_input(project, layer, layer.str_("script"), cache, where)]
        for ref in layer.inputs:
            if ref.path is not None:
                inputs.append(_file_input(project, layer, ref.path, cache, where))
            else:
                assert ref.url is not None and ref.sha256 is not None
                inputs.append(Input(ref.url, Digest.from_hex(ref.sha256)))
        return inputs, None
    raise RecipeError(f"{where}: unknown kind '{layer.kind}'")


def _copy_root(project: Project, layer: LayerRecipe, where: str) -> Path:
    root = (project.root / layer.str_("from")).resolve()
    if root != project.root and project.root not in root.parents:
        raise RecipeError(f"{where}: 'from' {layer.str_('from')!r} leaves the project directory",
                          "copy only paths inside the project")
    return root


def _copy_tree(plan: Plan, layer: LayerPlan) -> Tree:
    """The tree a copy layer is built from: the one planning walked, else walked now (through the plan's stat
    cache), which must still have the digest its key was made from."""
    if layer.tree is not None:
        return layer.tree
    project, recipe = plan.project, layer.recipe
    where = _relative(project, recipe.file)
    cache = plan.stat_cache or StatCache(None)
    tree = walk_tree(_copy_root(project, recipe, where), recipe.strings("exclude"), cache, what=where)
    cache.save()
    if tree.digest != layer.inputs[0].digest:
        raise RecipeError(f"{where}: '{recipe.str_('from')}' changed while the build ran (its digest was "
                          f"{layer.inputs[0].digest.short} when planned, {tree.digest.short} now)",
                          "run the build again")
    return tree


def _file_input(project: Project, layer: LayerRecipe, rel: str, cache: StatCache, where: str) -> Input:
    path = layer.dir / rel
    try:
        st = path.stat()
    except OSError:
        raise RecipeError(f"{where}: {rel!r} not found beside layer.toml", f"create {_relative(project, path)}") from None
    if not path.is_file():
        raise RecipeError(f"{where}: {rel!r} is not a file", "name a file beside layer.toml")
    return Input(_relative(project, path), Digest.from_hex(cache.digest(str(path), st)))


# ---- building -------------------------------------------------------------------------------------------------


def build(plan: Plan, store: Store, *, offline: bool = False, strict: bool = False,
          output: Output = lambda line: None, engine: Callable[[], Engine] | None = None,
          registries: registry.Registries | None = None) -> BuildResult:
    """Build every layer whose entry is missing, then assemble and tag the image.

    ``engine`` makes the container engine, asked for only when a run layer must be built."""
    project = plan.project
    done: list[LayerPlan] = []
    contexts: list[BuildContext] = []
    engines: list[Engine] = []

    def get_context() -> BuildContext:
        if not contexts:
            from .builders import BuildContext

            contexts.append(BuildContext(store, project.root, project.image.compression,
                                         project.image.source_date_epoch, offline, output, registries))
        return contexts[0]

    def get_engine() -> Engine:
        if not engines:
            from .engine import Engine

            engines.append(engine() if engine is not None else Engine.detect(project.run.engine))
        return engines[0]

    with store.lease():  # gc waits: blobs written here are unreachable until they are tagged
        for layer in plan.layers:
            if layer.status in ("cached", "pulled") and store.resolve(cache_tag(layer.name, layer.key)) is not None:
                done.append(layer)
                continue
            output(f"building layer '{layer.name}' ({layer.recipe.kind})")
            if layer.recipe.kind == "run":
                built = _build_run_layer(get_context(), plan, done, layer, get_engine)
            else:
                built = _build_layer(get_context(), plan, layer)
            put_cache_entry(store, layer, built, architecture=project.image.architecture)
            done.append(replace(layer, status="built"))
        result_plan = replace(plan, layers=tuple(done))
        merge = build_merge(store, result_plan, get_context, get_engine)
        image, warnings = assemble(result_plan, store, strict=strict, output=output, merge=merge)
    return BuildResult(result_plan, image, tuple(warnings))


def _build_layer(ctx: BuildContext, plan: Plan, layer: LayerPlan) -> list[Built]:
    from . import builders

    recipe = layer.recipe
    if recipe.kind == "copy":
        built = builders.build_copy(ctx, recipe, _copy_tree(plan, layer))
    elif recipe.kind == "archive":
        built = builders.build_archive(ctx, recipe)
    elif recipe.kind == "bootstrap":
        if not ctx.offline:  # offline, build_bootstrap refuses before anything reaches the network
            _check_release(recipe, layer.inputs[0])
        built = builders.build_bootstrap(ctx, recipe)
    else:
        built, _ = builders.build_image(ctx, recipe, layer.inputs[0].digest)
    return built


def _build_run_layer(ctx: BuildContext, plan: Plan, done: Sequence[LayerPlan], layer: LayerPlan,
                     get_engine: Callable[[], Engine]) -> list[Built]:
    """Stage the stack of the layer's needs as an image, hand it to the engine, run the script, capture."""
    below = plan.project.closure(layer.name)
    if not below:
        raise RecipeError(f"{_relative(plan.project, layer.recipe.file)}: a run layer needs the layers it runs on",
                          "add needs = [\"base\"] (a bootstrap or image layer) to the layer.toml")
    from . import builders

    engine = get_engine()
    by_name = {l.name: l for l in done}
    with _staged(ctx.store, plan.project, [by_name[name] for name in below], layer.key, engine) as image:
        return builders.build_run(ctx, engine, layer.recipe, layer.key, image)


@contextmanager
def _staged(store: Store, project: Project, stack: Sequence[LayerPlan], key: Digest, engine: Engine) -> Iterator[str]:
    """The image stacking ``stack``, tagged in the store for the engine to load while the context lasts; yields
    the engine's image id. The engine copies only layers it lacks; nothing moves when it has the image."""
    config_bytes, manifest = image_manifest(project, store, stack, cmd=None)
    tag = f"ocibuild-stage-{key.hex[:16]}"
    archive = store.private_dir("tmp") / f"{tag}.tar"
    store.put(config_bytes, oci.OCI_CONFIG)
    descriptor = store.put_manifest(manifest)
    store.tag(tag, descriptor)

    def write_archive() -> Path:
        from . import archive as oci_archive

        oci_archive.write_oci_archive(store, descriptor, tag, archive)
        return archive

    try:
        yield engine.load_from_layout(store.root, tag, Digest.of(config_bytes).hex, write_archive)
    finally:
        store.untag(tag)
        archive.unlink(missing_ok=True)


def _check_release(layer: LayerRecipe, locked: Input) -> None:
    """A bootstrap layer is built only from the archive state the lock records."""
    current = Digest.of(fetch_bytes(locked.name, what=f"layer '{layer.name}'"))
    if current != locked.digest:
        raise LockError(
            f"layer '{layer.name}': {locked.name} changed since ocibuild.lock was written "
            f"(locked {locked.digest.short}, now {current.short})",
            "run `ocibuild lock` to take the archive's new state (this rebuilds the layer and those above it)",
        )


def put_cache_entry(store: Store, layer: LayerPlan, built: Sequence[Built], *, architecture: str) -> Descriptor:
    """Record built layers as the cache entry of ``layer`` (see the module docstring) and tag it."""
    labels = {
        LABEL_PREFIX + "name": layer.name,
        LABEL_PREFIX + "kind": layer.recipe.kind,
        LABEL_PREFIX + "key": str(layer.key),
        LABEL_PREFIX + "inputs": json.dumps([i.to_dict() for i in layer.inputs], sort_keys=True, separators=(",", ":")),
    }
    config = ImageConfig(diff_ids=tuple(b.diff_id for b in built), architecture=architecture, labels=labels)
    config_descriptor = store.put(config.to_json(), oci.OCI_CONFIG)
    manifest = Manifest(config_descriptor, tuple(b.descriptor for b in built))
    descriptor = store.put_manifest(manifest)
    store.tag(cache_tag(layer.name, layer.key), descriptor)
    return descriptor


def entry_layers(store: Store, layer: LayerPlan) -> list[Built]:
    """The layers recorded in ``layer``'s cache entry."""
    descriptor = store.resolve(cache_tag(layer.name, layer.key))
    if descriptor is None:
        raise OcibuildError(f"layer '{layer.name}' is not in the store", "run `ocibuild build`")
    manifest = store.get_manifest(descriptor.digest)
    config = store.get_config(manifest.config.digest)
    return [Built(d, diff) for d, diff in zip(manifest.layers, config.diff_ids)]


def assemble(plan: Plan, store: Store, *, strict: bool = False, output: Output = lambda line: None,
             merge: LayerPlan | None = None) -> tuple[Descriptor, list[str]]:
    """The image of ``plan``: every cache entry's layers in order (then the bookkeeping merge layer, if any),
    one config, tagged ``[image] name``."""
    image = plan.project.image
    stack = plan.layers + ((merge,) if merge is not None else ())
    config_bytes, manifest = image_manifest(plan.project, store, stack, cmd=image.cmd or None)
    manifest_bytes = manifest.to_json()
    current = store.resolve(image.name)
    if current is not None and current.digest == Digest.of(manifest_bytes) and store.has(current.digest):
        return current, []
    warnings = find_conflicts(plan, store)
    if warnings and strict:
        raise LayerConflict(warnings[0], "make one layer need the other, or remove the path from one of them")
    for warning in warnings:
        output(f"warning: {warning}")
    store.put(config_bytes, oci.OCI_CONFIG)
    descriptor = store.put_manifest(manifest)
    store.tag(image.name, descriptor)
    return descriptor, warnings


def image_manifest(project: Project, store: Store, plans: Sequence[LayerPlan], *,
                   cmd: Sequence[str] | None) -> tuple[bytes, Manifest]:
    """Config bytes and manifest of an image stacking the cache entries of ``plans``, bottom first."""
    image = project.image
    layers: list[Built] = []
    history: list[History] = []
    for layer in plans:
        recipe = layer.recipe
        built = entry_layers(store, layer)
        layers += built
        where = _relative(project, recipe.file)
        for i, _ in enumerate(built):
            suffix = f" [{i + 1}/{len(built)}]" if len(built) > 1 else ""
            history.append(History(f"ocibuild {recipe.kind} layer '{recipe.name}' from {where}{suffix}",
                                   comment=f"key {layer.key}"))
    config = ImageConfig(
        diff_ids=tuple(b.diff_id for b in layers),
        architecture=image.architecture,
        env=tuple(f"{k}={v}" for k, v in image.env.items()),
        workdir=image.workdir or None,
        cmd=tuple(cmd) if cmd else None,
        history=tuple(history),
        created=_rfc3339(image.source_date_epoch),
    )
    config_bytes = config.to_json()
    manifest = Manifest(Descriptor(oci.OCI_CONFIG, Digest.of(config_bytes), len(config_bytes)),
                        tuple(b.descriptor for b in layers))
    return config_bytes, manifest


def _rfc3339(epoch: int) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def layer_listing(store: Store, built: Built) -> dict[str, str]:
    """Path → content fingerprint of a layer; cached by diff_id in the store's private area (copy layers record
    theirs when they are built, from the hashes of the tree walk)."""
    from . import builders
    from .tar import read

    try:
        listing: dict[str, str] = json.loads(builders.listing_path(store, built.diff_id).read_bytes())
        return listing
    except (OSError, ValueError):
        pass
    with store.open_blob(built.descriptor.digest, size=built.descriptor.size) as f:
        listing = read.list_layer(f, oci.layer_compression(built.descriptor.media_type),
                                  what=f"layer {built.descriptor.digest.short}")
    builders.save_listing(store, built.diff_id, listing)
    return listing


def find_conflicts(plan: Plan, store: Store) -> list[str]:
    """One warning per pair of independent layers that put different content at the same paths."""
    listings: dict[str, dict[str, str]] = {}
    for layer in plan.layers:
        merged: dict[str, str] = {}
        for built in entry_layers(store, layer):
            merged.update(layer_listing(store, built))
        listings[layer.name] = merged
    warnings = []
    names = [layer.name for layer in plan.layers]
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            if not plan.project.independent(a, b):
                continue
            clashes = sorted(
                path for path, fingerprint in listings[a].items()
                if not fingerprint.startswith("dir") and listings[b].get(path, fingerprint) != fingerprint
                and path not in bookkeeping.MERGED_PATHS  # merged by build_merge instead
            )
            if clashes:
                shown = ", ".join("/" + p for p in clashes[:5]) + (f" and {len(clashes) - 5} more" if len(clashes) > 5 else "")
                warnings.append(f"independent layers '{a}' and '{b}' write different content at {shown}; "
                                f"'{b}' wins")
    return warnings


# ---- the bookkeeping merge layer ------------------------------------------------------------------------------

MERGE_LAYER = "ocibuild-merge"


def merge_key(plan: Plan) -> Digest:
    """The key of the bookkeeping merge layer of ``plan``: the keys of every layer below it."""
    return Digest.of(canonical_json({"format": KEY_FORMAT, "merge": [str(layer.key) for layer in plan.layers]}))


def export_selection(plan: Plan, store: Store) -> tuple[list[str], list[oci_archive.InputFile]]:
    """What another machine needs to build ``plan`` with nothing rebuilt and nothing fetched: the tags of every
    layer's cache entry (and of the merge layer's, when there is one) and of the image, and the downloaded inputs
    (archive tarballs, run layers' url inputs) that a missing key would need."""
    from . import archive as oci_archive

    index = store.index()
    tags = []
    for layer in plan.layers:
        tag = cache_tag(layer.name, layer.key)
        if index.find(tag) is None:
            raise OcibuildError(f"layer '{layer.name}' (key {layer.key.short}) is not built",
                                "run `ocibuild build` first, then export")
        tags.append(tag)
    merge = cache_tag(MERGE_LAYER, merge_key(plan))
    if index.find(merge) is not None:
        tags.append(merge)
    if index.find(plan.project.image.name) is None:
        raise OcibuildError(f"the image '{plan.project.image.name}' is not in the store {store.root}",
                            "run `ocibuild build` first, then export")
    tags.append(plan.project.image.name)
    urls: dict[Digest, str] = {}
    for layer in plan.layers:
        recipe = layer.recipe
        if recipe.kind == "archive" and "://" in recipe.str_("url") and not recipe.str_("url").startswith("file:"):
            urls[Digest.from_hex(recipe.str_("sha256"))] = recipe.str_("url")
        elif recipe.kind == "run":
            for ref in recipe.inputs:
                if ref.url is not None and ref.sha256 is not None:
                    urls[Digest.from_hex(ref.sha256)] = ref.url
    inputs = [replace(item, url=urls[item.digest]) for item in oci_archive.downloaded_inputs(store, urls)]
    return tags, inputs


def build_merge(store: Store, plan: Plan, get_context: Callable[[], BuildContext],
                get_engine: Callable[[], Engine]) -> LayerPlan | None:
    """The layer that merges package bookkeeping of layers built side by side (see :mod:`bookkeeping`), or None
    when stacking alone gives the right files. Keyed by the keys of every layer below; cached like a layer.
    ``get_context`` makes the build context, asked for only when the layer must be built."""
    project = plan.project
    key = merge_key(plan)
    recipe = LayerRecipe(MERGE_LAYER, "merge", project.root / "ocibuild.toml", project.layer_names,
                         "package bookkeeping of independent layers, merged", {})
    merge = LayerPlan(recipe, key, (), "cached")
    marker = store.private_dir("merge") / key.hex
    if store.resolve(cache_tag(MERGE_LAYER, key)) is not None:
        return merge
    order = project.layer_names
    if marker.exists() or not any(project.independent(a, b) for i, a in enumerate(order) for b in order[i + 1:]):
        return None  # in a chain of needs, stacking alone gives each file's right version
    holders: dict[str, list[str]] = {path: [] for path in bookkeeping.MERGED_PATHS}
    for layer in plan.layers:
        listing = {}
        for built in entry_layers(store, layer):
            listing.update(layer_listing(store, built))
        for path in holders:
            if listing.get(path, "").startswith("file:"):
                holders[path].append(layer.name)
    texts: dict[tuple[str, str], str] = {}

    def text(name: str, path: str) -> str:
        if (name, path) not in texts:
            found = _read_files(store, plan.layer(name), {p for p, names in holders.items() if name in names})
            texts.update({(name, p): content.decode("utf-8", "replace") for p, content in found.items()})
        return texts.get((name, path), "")

    merged: dict[str, str] = {}
    for path, identity in bookkeeping.STANZA_FILES.items():
        names = holders[path]
        if len(names) < 2:
            continue
        changes = []
        for name in names:
            below = next((n for n in reversed(project.closure(name)) if n in names), None)
            changes.append((text(below, path) if below else None, text(name, path)))
        result = bookkeeping.merge_changes(changes, identity)
        if bookkeeping.parse_stanzas(result, identity) != bookkeeping.parse_stanzas(text(names[-1], path), identity):
            merged[path] = result
    ld_holders = holders[bookkeeping.LD_SO_CACHE]
    ldconfig = any(project.independent(a, b) for i, a in enumerate(ld_holders) for b in ld_holders[i + 1:])
    if not merged and not ldconfig:
        marker.write_text("none\n")
        return None
    ctx = get_context()
    ctx.output(f"merging package bookkeeping of independent layers ({', '.join(sorted(merged)) or 'ld.so.cache'})")
    if ldconfig:
        built = _merge_with_ldconfig(ctx, plan, merge, merged, get_engine())
    else:
        built = _merge_files(ctx, merged)
    put_cache_entry(store, merge, [built], architecture=project.image.architecture)
    return merge


def _read_files(store: Store, layer: LayerPlan, paths: set[str]) -> dict[str, bytes]:
    """The content of ``paths`` in a layer's blobs (a later blob of the same entry wins)."""
    from .tar import read

    found: dict[str, bytes] = {}
    for built in entry_layers(store, layer):
        with store.open_blob(built.descriptor.digest, size=built.descriptor.size) as f:
            for member, reader in read.iter_members(f, oci.layer_compression(built.descriptor.media_type),
                                                    what=f"layer '{layer.name}'"):
                if member.path in paths and member.type == "file" and reader is not None:
                    found[member.path] = reader.read()
    return found


def _merge_files(ctx: BuildContext, merged: dict[str, str]) -> Built:
    import shutil
    import tempfile

    from . import builders
    from .tar import write

    directory = Path(tempfile.mkdtemp(dir=ctx.store.private_dir("tmp")))
    try:
        entries = []
        for i, (path, content) in enumerate(sorted(merged.items())):
            file = directory / str(i)
            file.write_text(content)
            entries.append(write.Entry(path, "file", 0o644, size=file.stat().st_size, source=str(file)))
        return builders.write_entries(ctx, write.with_parents(entries))
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _merge_with_ldconfig(ctx: BuildContext, plan: Plan, merge: LayerPlan, merged: dict[str, str],
                         engine: Engine) -> Built:
    """Put the merged files in place and re-run ldconfig over the whole stack, in a container."""
    import shutil
    import tempfile

    from . import builders
    from .engine import BindMount

    directory = Path(tempfile.mkdtemp(dir=ctx.store.private_dir("tmp")))
    try:
        lines = []
        for i, (path, content) in enumerate(sorted(merged.items())):
            (directory / str(i)).write_text(content)
            lines.append(f"cat {builders.INPUTS_DIR}/{i} > /{path}")
        lines.append("ldconfig")
        script = directory / "script"
        script.write_text("\n".join(lines) + "\n")
        mounts = [BindMount(script, builders.SCRIPT_PATH, True)]
        mounts += [BindMount(directory / str(i), f"{builders.INPUTS_DIR}/{i}", True) for i in range(len(merged))]
        wanted = bookkeeping.MERGED_PATHS
        ancestors = {p.rsplit("/", n)[0] for p in wanted for n in range(1, p.count("/") + 1)}
        with _staged(ctx.store, plan.project, plan.layers, merge.key, engine) as image:
            return builders.run_and_capture(ctx, engine, image, name=MERGE_LAYER, key=merge.key, mounts=mounts,
                                            env={}, workdir="/", network=False,
                                            keep=builders.CaptureFilter(only=frozenset(wanted | ancestors)))
    finally:
        shutil.rmtree(directory, ignore_errors=True)


# ---- the registry cache ---------------------------------------------------------------------------------------


def cache_repository(project: Project, override: str | None) -> Reference | None:
    """The registry repository of the shared layer cache: ``--cache``, else ``[cache] ref``, else None."""
    text = override or project.cache_ref
    return registry.parse_repository(text) if text else None


def remote_status(plan: Plan, client: registry.Client, repository: str, *,
                  jobs: int = registry.DEFAULT_JOBS) -> tuple[Plan, dict[str, registry.Remote]]:
    """``plan`` with status "pull" for every missing layer whose cache entry the registry holds (and those
    entries' manifests, by layer name). Nothing is stored."""
    wanted = {cache_tag(l.name, l.key): l for l in plan.layers if l.status == "build"}
    found = registry.find_manifests(client, repository, list(wanted), jobs=jobs)
    remotes = {wanted[tag].name: remote for tag, remote in found.items() if remote is not None}
    layers = tuple(replace(l, status="pull") if l.name in remotes else l for l in plan.layers)
    return replace(plan, layers=layers), remotes


def pull_layers(plan: Plan, store: Store, client: registry.Client, repository: str,
                remotes: dict[str, registry.Remote], *, jobs: int = registry.DEFAULT_JOBS,
                output: Output = lambda line: None) -> Plan:
    """Fetch the cache entries of the layers with status "pull" (verified) and tag them: status "pulled"."""
    pulling = {cache_tag(l.name, l.key): remotes[l.name] for l in plan.layers if l.status == "pull"}
    with store.lease():
        stored = registry.fetch_manifests(client, store, repository, pulling, jobs=jobs, tag=False, output=output)
        for layer in plan.layers:
            if layer.status != "pull":
                continue
            tag = cache_tag(layer.name, layer.key)
            config = store.get_config(pulling[tag].manifest.config.digest)
            if config.labels.get(LABEL_PREFIX + "key") != str(layer.key) or \
                    len(config.diff_ids) != len(pulling[tag].manifest.layers):
                raise RegistryError(
                    f"{client.registry}/{repository}:{tag} is not the cache entry of layer '{layer.name}' "
                    f"(its key label is {config.labels.get(LABEL_PREFIX + 'key')!r})",
                    "something else was pushed under that tag; delete it from the registry and push the cache again")
            store.tag(tag, stored[tag])
    return replace(plan, layers=tuple(replace(l, status="pulled") if l.status == "pull" else l for l in plan.layers))


def push_layers(plan: Plan, store: Store, client: registry.Client, repository: str, *,
                jobs: int = registry.DEFAULT_JOBS, output: Output = lambda line: None) -> dict[str, str]:
    """Push the cache entry of every layer the store holds: layer name → "pushed", "present" (the registry had
    it: nothing moved) or "missing" (not built here)."""
    tagged = []
    result = {}
    for layer in plan.layers:
        tag = cache_tag(layer.name, layer.key)
        descriptor = store.resolve(tag)
        if descriptor is None:
            result[layer.name] = "missing"
        else:
            tagged.append((layer.name, tag, descriptor))
    pushed = registry.push_manifests(client, store, repository, [(t, d) for _, t, d in tagged], jobs=jobs,
                                     output=output)
    result.update({name: pushed[tag] for name, tag, _ in tagged})
    return result

