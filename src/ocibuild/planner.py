"""Per layer: cached in the store, or to build; then build what is missing and assemble the image.

Missing layers build concurrently, up to ``jobs`` at once, each as soon as the layers it needs are done
(:func:`ocibuild.threads.run_by_needs`); the first failure stops the others. What happens to each layer reaches
the caller as :class:`~ocibuild.events.LayerEvent` (or, without an ``events`` callback, as plain lines).

Data flows one way: recipes → inputs and lock → cache keys → status → builders (:mod:`ocibuild.build`) → cache
entries → image. The lock is resolved before (:mod:`ocibuild.resolve`); the team cache's pulls and pushes are
:mod:`ocibuild.teamcache`.

Every built (or imported) layer is recorded as a *cache entry* (:mod:`ocibuild.store.entries`); a layer is
cached exactly when its entry's tag is present.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import bookkeeping, oci, registry
from .errors import LayerConflict, LockError, RecipeError
from .events import Events, LayerEvent, event_lines
from .inputs import StatCache, Tree, tree_digest, walk_tree
from .oci import Descriptor, Digest, History, ImageConfig, LayerBlob, Manifest, Platform
from .recipe.key import KEY_FORMAT, Input, key_document, key_of
from .recipe.lock import Lock
from .recipe.project import LayerRecipe, Project
from .resolve import describe_source, lock_platform, lock_source
from .store import Store
from .store.entries import cache_tag, entry_layers, put_cache_entry
from .threads import Stop, Stopped, run_by_needs

# A build that finds every layer cached (the common case, and a benchmark) needs none of the modules that make
# layers: build/, bundle, tarlayer (zstandard, isal), engine, tempfile together took ~35 ms of its start-up. They
# are imported in the functions that use them.
if TYPE_CHECKING:
    from .build.context import BuildContext
    from .engine import Engine

Output = Callable[[str], None]
#: The bookkeeping merge layer's name (see :mod:`ocibuild.build.merge`); its entry is tagged like a layer's.
MERGE_LAYER = "ocibuild-merge"



@dataclass(frozen=True)
class LayerPlan:
    recipe: LayerRecipe
    key: Digest
    inputs: tuple[Input, ...]
    document: Mapping[str, Any] = field(compare=False, repr=False)  # the key document, whose hash ``key`` is
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
class Unlocked:
    """A layer whose key waits for ocibuild.lock: the lock has no entry for its moving input (``source``, for
    ``platform``; a missing entry, or one made for another source or platform), or a layer it needs is unlocked
    (``source`` None). Planning only reads the lock, so only ``ocibuild plan`` shows these (status "lock", key
    null); a build resolves first."""

    recipe: LayerRecipe
    source: str | None
    inputs: tuple[Input, ...] = ()
    platform: Platform | None = None

    @property
    def name(self) -> str:
        return self.recipe.name

    @property
    def wanted(self) -> str:
        """The moving input the lock lacks, as messages name it."""
        assert self.source is not None
        return describe_source(self.source, self.platform)

    def to_dict(self) -> dict[str, Any]:
        inputs: list[dict[str, Any]] = [i.to_dict() for i in self.inputs]
        if self.source is not None:  # the moving input, whose digest the lock lacks
            inputs = [{"name": self.source, "digest": None}]
        return {"name": self.recipe.name, "kind": self.recipe.kind, "needs": list(self.recipe.needs), "key": None,
                "status": "lock", "inputs": inputs}


@dataclass(frozen=True)
class Plan:
    project: Project
    layers: tuple[LayerPlan, ...]  # every layer whose key is known, bottom first
    # the cache planning used, for build() to walk copy trees that planning only fingerprinted
    stat_cache: StatCache | None = field(default=None, compare=False, repr=False)
    unlocked: tuple[Unlocked, ...] = ()  # the layers whose key waits for ocibuild.lock

    def to_dict(self) -> dict[str, Any]:
        docs = {layer.name: layer.to_dict() for layer in self.layers}
        docs.update((layer.name, layer.to_dict()) for layer in self.unlocked)
        return {"image": self.project.image.name,
                "layers": [docs[name] for name in self.project.layer_names if name in docs]}

    def layer(self, name: str) -> LayerPlan:
        return next(layer for layer in self.layers if layer.name == name)

    @property
    def complete(self) -> bool:
        """Every layer of the project is planned (not only some, see ``make_plan(only=)``): an image can be made."""
        return len(self.layers) + len(self.unlocked) == len(self.project.layers)


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


# ---- planning -------------------------------------------------------------------------------------------------


def make_plan(project: Project, store: Store, lock: Lock, stat_cache: StatCache, *,
              only: Sequence[str] = ()) -> Plan:
    """Keys and status of every layer, bottom first (with ``only``: of those layers and the layers they need, an
    image's worth of nothing: :func:`build_layers` builds such a plan). Reads inputs (through the stat cache) and
    ``lock``, never the network: a layer whose moving input ``lock`` lacks, and every layer above it, is
    :class:`Unlocked`."""
    keys: dict[str, Digest] = {}
    layers = []
    unlocked = []
    index = store.index()
    epoch = project.image.source_date_epoch
    wanted = set(only).union(*(project.closure(name) for name in only)) if only else set(project.layer_names)
    for layer in project.layers:
        if layer.name not in wanted:
            continue
        source = lock_source(layer)
        tree = None
        if source is not None:
            platform = lock_platform(project, layer)
            entry = lock.get(layer.name, source, platform)
            if entry is None:
                unlocked.append(Unlocked(layer, source, platform=platform))
                continue
            inputs = [Input(source, entry.digest)]
        else:
            inputs, tree = _inputs(project, layer, stat_cache)
        if any(need not in keys for need in layer.needs):
            unlocked.append(Unlocked(layer, None, tuple(inputs)))
            continue
        document = key_document(layer, epoch, inputs, [keys[n] for n in layer.needs], project.image.platform)
        key = key_of(document)
        keys[layer.name] = key
        status = "cached" if index.find(cache_tag(layer.name, key)) is not None else "build"
        layers.append(LayerPlan(layer, key, tuple(inputs), document, status, tree))
    return Plan(project, tuple(layers), stat_cache, tuple(unlocked))


def _relative(project: Project, path: Path) -> str:
    try:
        return str(path.relative_to(project.root))
    except ValueError:
        return str(path)


def _inputs(project: Project, layer: LayerRecipe, cache: StatCache) -> tuple[list[Input], Tree | None]:
    """The inputs of a layer without a moving input (those come from the lock)."""
    where = _relative(project, layer.file)
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


class _Builders:
    """What building layers shares: the build context and the container engine, each made when first asked for
    (a build that finds every layer cached imports no module that makes layers, and one without a run layer
    starts no engine), where events go, and the stop signal of the build."""

    def __init__(self, plan: Plan, store: Store, offline: bool, output: Output, events: Events,
                 engine: Callable[[], Engine] | None, registries: registry.Registries | None) -> None:
        self._plan, self._store, self._offline, self.output, self.events = plan, store, offline, output, events
        self._make_engine, self._registries = engine, registries
        self._context: BuildContext | None = None
        self._engine: Engine | None = None
        self.stop = Stop()
        self._making = threading.Lock()  # layers building at once share one context and one engine
        self._walking = threading.Lock()  # the stat cache is one thread's at a time

    def context(self) -> BuildContext:
        with self._making:
            if self._context is None:
                from .build.context import BuildContext

                image = self._plan.project.image
                self._context = BuildContext(self._store, self._plan.project.root, image.compression,
                                             image.source_date_epoch, self._offline, self.output, self._registries,
                                             stop=self.stop)
            return self._context

    def layer_context(self, name: str) -> BuildContext:
        """The context of one layer's builder: its lines and steps become events of that layer."""
        return replace(self.context(), output=lambda text: self.events(LayerEvent(name, "line", text)),
                       step=lambda text: self.events(LayerEvent(name, "step", text)))

    def engine(self) -> Engine:
        with self._making:
            if self._engine is None:
                from .engine import Engine

                self._engine = self._make_engine() if self._make_engine is not None else \
                    Engine.detect(self._plan.project.run.engine)
            return self._engine

    def __enter__(self) -> _Builders:
        return self

    def __exit__(self, *exc: object) -> None:
        """The build is over (done or failed): wait for the engine to remove the containers it ran."""
        if self._engine is not None:
            self._engine.wait_removals()

    def copy_tree(self, layer: LayerPlan) -> Tree:
        with self._walking:
            return _copy_tree(self._plan, layer)


def build(plan: Plan, store: Store, *, offline: bool = False, strict: bool = False, jobs: int = 1,
          output: Output = lambda line: None, events: Events | None = None, engine: Callable[[], Engine] | None = None,
          registries: registry.Registries | None = None) -> BuildResult:
    """Build every layer whose entry is missing (up to ``jobs`` at once), then assemble and tag the image.

    ``engine`` makes the container engine, asked for only when a run layer must be built. ``events`` receives
    what happens to each layer built; without it, :func:`~ocibuild.events.event_lines` makes them lines of
    ``output``, prefixed with the layer's name when ``jobs`` > 1."""
    if not plan.complete:
        raise ValueError("a plan of some layers makes no image: build it with build_layers()")
    builders = _Builders(plan, store, offline, output, events or event_lines(output, prefix=jobs > 1), engine,
                         registries)
    with store.lease(), builders:  # gc waits: blobs written here are unreachable until they are tagged
        result_plan = _build_missing(plan, store, builders, jobs)
        merge = _merge_layer(result_plan, store, builders.context, builders.engine)
        image, warnings = assemble(result_plan, store, strict=strict, output=output, merge=merge)
    return BuildResult(result_plan, image, tuple(warnings))


def build_layers(plan: Plan, store: Store, *, offline: bool = False, jobs: int = 1, output: Output = lambda line: None,
                 events: Events | None = None, engine: Callable[[], Engine] | None = None,
                 registries: registry.Registries | None = None) -> Plan:
    """Build every layer of ``plan`` whose entry is missing, and no image (`ocibuild build LAYER…`): ``plan`` with
    status "built" for those. The layers are cache entries like any, for `push-cache` or a later build. ``jobs``,
    ``output`` and ``events`` as for :func:`build`."""
    builders = _Builders(plan, store, offline, output, events or event_lines(output, prefix=jobs > 1), engine,
                         registries)
    with store.lease(), builders:
        return _build_missing(plan, store, builders, jobs)


def _build_missing(plan: Plan, store: Store, builders: _Builders, jobs: int) -> Plan:
    """The layers of ``plan`` whose entries are missing, built (under the caller's store lease) each once the
    layers it needs are done, up to ``jobs`` at once; with one job, bottom first as the plan lists them."""
    missing = next((layer for layer in plan.unlocked if layer.source is not None), None)
    if missing is not None:
        raise LockError(f"ocibuild.lock has no entry for layer '{missing.name}' ({missing.wanted})",
                        "run `ocibuild lock` to resolve it")
    todo = {layer.name: layer for layer in plan.layers
            if layer.status not in ("cached", "pulled") or store.resolve(cache_tag(layer.name, layer.key)) is None}
    run_by_needs(lambda name: _build_one(plan, store, builders, todo[name]),
                 {name: layer.recipe.needs for name, layer in todo.items()}, jobs=jobs, stop=builders.stop,
                 name="ocibuild-layer")
    return replace(plan, layers=tuple(replace(l, status="built") if l.name in todo else l for l in plan.layers))


def _build_one(plan: Plan, store: Store, builders: _Builders, layer: LayerPlan) -> None:
    """Build one layer by its kind's builder and record its cache entry, telling ``builders.events``."""
    builders.events(LayerEvent(layer.name, "start", layer.recipe.kind))
    ctx = builders.layer_context(layer.name)
    try:
        if layer.recipe.kind == "run":
            built = _build_run_layer(ctx, plan, layer, builders.engine)
        else:
            built = _build_layer(ctx, plan, layer, builders.copy_tree)
        builders.stop.check()  # after a failure nothing more is recorded (gc takes the blobs)
        put_cache_entry(store, layer, built, architecture=plan.project.image.architecture)
    except BaseException as err:
        stopped = isinstance(err, Stopped) or builders.stop.is_set()  # then a consequence, not the cause
        builders.events(LayerEvent(layer.name, "stopped") if stopped else LayerEvent(layer.name, "failed", str(err)))
        raise
    builders.events(LayerEvent(layer.name, "done"))


def _build_layer(ctx: BuildContext, plan: Plan, layer: LayerPlan,
                 copy_tree: Callable[[LayerPlan], Tree]) -> list[LayerBlob]:
    """A layer of any kind but ``run``, by its kind's builder (each imported only when a layer of it is built)."""
    recipe = layer.recipe
    if recipe.kind == "copy":
        from .build.copy import build_copy

        return build_copy(ctx, recipe, copy_tree(layer))
    if recipe.kind == "archive":
        from .build.tarball import build_archive

        return build_archive(ctx, recipe)
    if recipe.kind == "bootstrap":
        from .build.bootstrap import build_bootstrap

        return build_bootstrap(ctx, recipe, layer.inputs[0], plan.project.image.platform)
    from .build.image import build_image

    return build_image(ctx, recipe, layer.inputs[0].digest)[0]


def _build_run_layer(ctx: BuildContext, plan: Plan, layer: LayerPlan,
                     get_engine: Callable[[], Engine]) -> list[LayerBlob]:
    """Stage the stack of the layer's needs (each one done) as an image, hand it to the engine, run the script,
    capture."""
    below = plan.project.closure(layer.name)
    if not below:
        raise RecipeError(f"{_relative(plan.project, layer.recipe.file)}: a run layer needs the layers it runs on",
                          "add needs = [\"base\"] (a bootstrap or image layer) to the layer.toml")
    from .build import run

    ctx.step("staging its needs in the engine")
    engine = get_engine()
    stack = image_manifest(plan.project, ctx.store, [plan.layer(name) for name in below], cmd=None)
    with run.staged(ctx.store, *stack, layer.key, engine) as image:
        return run.build_run(ctx, engine, layer.recipe, layer.key, image)


@dataclass(frozen=True)
class MergeInputs:
    """What the bookkeeping merge layer of a plan is made from: the layers that hold bookkeeping files
    (:data:`ocibuild.bookkeeping.MERGED_PATHS`), and the stack of those and what they need, bottom first."""

    holders: tuple[str, ...]
    stack: tuple[LayerPlan, ...]

    @property
    def document(self) -> dict[str, Any]:
        """The merge layer's key document: name, key and needs of each layer of the stack (which holds the
        holders), and the key format. Nothing else enters the merge, so a layer outside the stack (a project's
        source) never changes it."""
        return {"format": KEY_FORMAT, "merge": [
            {"name": layer.name, "key": str(layer.key), "needs": list(layer.recipe.needs),
             "holds": layer.name in self.holders} for layer in self.stack]}

    @property
    def key(self) -> Digest:
        return key_of(self.document)


def merge_inputs(plan: Plan, store: Store) -> MergeInputs | None:
    """The inputs of the bookkeeping merge layer of ``plan`` (every layer built), or None when no two layers that
    hold bookkeeping files are independent: in a chain of needs, stacking alone gives each file's right version.
    Reads each layer's bookkeeping record (:mod:`ocibuild.bookkeeping`), not its blob."""
    project = plan.project
    if not _any_independent(project, project.layer_names):
        return None
    holders = tuple(layer.name for layer in plan.layers if _holds_bookkeeping(store, layer))
    if not _any_independent(project, holders):
        return None
    below = set(holders).union(*(project.closure(name) for name in holders))
    return MergeInputs(holders, tuple(layer for layer in plan.layers if layer.name in below))


def merge_key(plan: Plan, store: Store) -> Digest | None:
    """The key of the bookkeeping merge layer of ``plan``, None when it has none (see :func:`merge_inputs`)."""
    inputs = merge_inputs(plan, store)
    return inputs.key if inputs is not None else None


def _any_independent(project: Project, names: Sequence[str]) -> bool:
    return any(project.independent(a, b) for i, a in enumerate(names) for b in names[i + 1:])


def _holds_bookkeeping(store: Store, layer: LayerPlan) -> bool:
    """Whether the cache entry of ``layer`` holds any of the bookkeeping files, by its blobs' records; a blob
    without one (pulled, imported, or written before records were kept) is read once."""
    records = []
    for blob in entry_layers(store, layer):
        record = bookkeeping.load_record(store, blob.diff_id)
        if record is None:
            from .build.listing import layer_record

            record = layer_record(store, blob)
        records.append(record)
    return bool(bookkeeping.combine(records).holds)


def _merge_layer(plan: Plan, store: Store, get_context: Callable[[], BuildContext],
                 get_engine: Callable[[], Engine]) -> LayerPlan | None:
    """The layer that merges package bookkeeping of layers built side by side (see :mod:`ocibuild.build.merge`),
    or None when stacking alone gives the right files. Keyed by :class:`MergeInputs`; cached like a layer, and
    "nothing to merge" is remembered per key, so a build that changed only other layers (or none) imports no
    module that makes layers."""
    project = plan.project
    inputs = merge_inputs(plan, store)
    if inputs is None:
        return None
    document = inputs.document
    key = key_of(document)
    recipe = LayerRecipe(MERGE_LAYER, "merge", project.root / "ocibuild.toml", inputs.holders,
                         "package bookkeeping of independent layers, merged", {})
    merge = LayerPlan(recipe, key, (), document, "cached")
    marker = store.private_dir("merge") / key.hex
    if store.resolve(cache_tag(MERGE_LAYER, key)) is not None:
        return merge
    if marker.exists():
        return None
    from .build.merge import merge_bookkeeping

    entries = {name: entry_layers(store, plan.layer(name)) for name in inputs.holders}

    def stack_of(names: Sequence[str]) -> tuple[bytes, Manifest]:
        below = set(names).union(*(project.closure(name) for name in names))
        return image_manifest(project, store, [layer for layer in inputs.stack if layer.name in below], cmd=None)

    built = merge_bookkeeping(get_context(), project, entries, stack_of=stack_of, get_engine=get_engine)
    if built is None:
        marker.write_text("none\n")
        return None
    put_cache_entry(store, merge, [built], architecture=project.image.architecture)
    return merge


# ---- the image ------------------------------------------------------------------------------------------------


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
    from .build.merge import find_conflicts

    warnings = find_conflicts(store, plan.project, {layer.name: entry_layers(store, layer) for layer in plan.layers})
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
    layers: list[LayerBlob] = []
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
