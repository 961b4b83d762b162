"""``image`` layers: the layers of an existing image (a registry, an OCI layout directory or an oci-archive),
copied into the store and verified on the way."""

from __future__ import annotations

from .. import oci, registry
from ..archive import import_archive
from ..errors import FormatError, OcibuildError, RecipeError
from ..oci import LayerBlob, Digest
from ..recipe.project import LayerRecipe
from ..resolve import open_oci_dir, split_oci_ref
from ..store import Store
from .context import BuildContext


def build_image(ctx: BuildContext, layer: LayerRecipe, manifest_digest: Digest) -> tuple[list[LayerBlob], oci.ImageConfig]:
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
    return [LayerBlob(d, diff) for d, diff in zip(manifest.layers, config.diff_ids)], config


def _fetch_registry_image(ctx: BuildContext, layer: LayerRecipe, ref: str, manifest_digest: Digest) -> None:
    """The locked manifest of a registry image, with its config and layers, into the store (verified)."""
    if ctx.offline:
        raise OcibuildError(f"layer '{layer.name}': {ref} must be fetched from its registry and --offline forbids it",
                            "run the build once without --offline, pull-cache the layer, or bring it from a connected "
                            "machine (`ocibuild export` there, `ocibuild import` here)")
    reference = oci.Reference.parse(ref)
    registries = ctx.registries or registry.Registries()
    registry.fetch_image(registries.client(reference.registry), ctx.store, reference.repository, manifest_digest)


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
    import_archive(ctx.store, archive, tag=False)
