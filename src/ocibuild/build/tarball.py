"""``archive`` layers: a release tarball (downloaded, or beside the layer.toml) unpacked at a destination.

The module is named for what it unpacks, not ``archive``: that name is the oci-archive export and import."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ..errors import StoreError
from ..files import open_regular
from ..tar import codecs, write
from ..net.download import fetch_file
from ..oci import Digest, LayerBlob
from ..recipe.project import LayerRecipe
from .context import BuildContext, owner, temp_file, under, write_entries
from .listing import SPACE_HINT


def archive_source(ctx: BuildContext, layer: LayerRecipe) -> Path:
    """The archive file of an ``archive`` layer, downloaded (or found in the download cache) and verified."""
    url = layer.str_("url")
    where = url if "://" in url else str(layer.dir / url)
    return fetch_file(where, Digest.from_hex(layer.str_("sha256")), ctx.store, offline=ctx.offline,
                      progress=ctx.output, what=f"layer '{layer.name}'")


def build_archive(ctx: BuildContext, layer: LayerRecipe) -> list[LayerBlob]:
    """``archive``: a release tarball unpacked at ``dest`` with ``strip_components``, owners 0:0 by default."""
    source = archive_source(ctx, layer)
    uid, gid = owner(layer)
    strip = layer.int_("strip_components")
    dest = layer.str_("dest")
    what = f"layer '{layer.name}': {layer.str_('url')}"
    with temp_file(ctx, ".tar") as plain:
        try:
            with open(open_regular(source), "rb") as src, open(plain, "wb") as dst:
                compression = codecs.sniff_compression(src.read(8))
                src.seek(0)
                codecs.decompress_to(src, dst, compression, what=what)
        except OSError as err:  # (the archive was verified: most likely the store's disk is full)
            raise StoreError(f"{what}: unpack {source} into {plain}: {err.strerror or err}", SPACE_HINT) from err
        entries = []
        for entry in write.tarball_entries(plain, what=what):
            parts = entry.path.split("/")
            if len(parts) <= strip:
                continue
            path = under(dest, "/".join(parts[strip:]))
            linkname = entry.linkname
            if entry.type == "hardlink":
                link_parts = linkname.split("/")
                if len(link_parts) <= strip:
                    continue
                linkname = under(dest, "/".join(link_parts[strip:]))
            entries.append(replace(entry, path=path, linkname=linkname, uid=uid, gid=gid))
        return [write_entries(ctx, write.with_parents(entries, uid=uid, gid=gid, mtime=ctx.epoch))]
