"""``copy`` layers: a tree of the project placed in the image."""

from __future__ import annotations

from ..tar import write
from ..inputs import Tree
from ..oci import LayerBlob
from ..recipe.project import LayerRecipe
from ..tar.write import Entry
from .context import BuildContext, owner, under, write_entries

CAPABILITY = "security.capability"


def build_copy(ctx: BuildContext, layer: LayerRecipe, tree: Tree) -> list[LayerBlob]:
    """``copy``: the tree below ``from`` at ``to``. Owners default to 0:0; modes are normalised to 0755 for
    directories and executables, 0644 for other files, so that umask and checkout do not change the layer. A file's
    other names in the tree are hardlinks to it; of its xattrs only ``security.capability`` is kept."""
    uid, gid = owner(layer)
    to = layer.str_("to")
    single_file = not (ctx.project_root / layer.str_("from")).is_dir()
    entries = []
    for item in tree.entries:
        # a single file lands at `to` itself, or inside it when `to` ends with '/' (as COPY does)
        path = under(to, item.path) if not single_file or to.endswith("/") else under(to, "")
        if item.type == "dir":
            entries.append(Entry(path, "dir", 0o755, uid, gid, mtime=ctx.epoch))
        elif item.type == "symlink":
            entries.append(Entry(path, "symlink", 0o777, uid, gid, linkname=item.linkname, mtime=ctx.epoch))
        elif item.type == "hardlink":  # the writer gives it the mode of its file
            entries.append(Entry(path, "hardlink", 0o644, uid, gid, linkname=under(to, item.linkname),
                                 mtime=ctx.epoch))
        else:
            mode = 0o755 if item.mode & 0o111 else 0o644
            xattrs = {CAPABILITY: item.capability.decode("utf-8", "surrogateescape")} if item.capability else {}
            entries.append(Entry(path, "file", mode, uid, gid, size=item.size, source=item.source, mtime=ctx.epoch,
                                 xattrs=xattrs, sha256=item.sha256))
    return [write_entries(ctx, write.with_parents(entries, uid=uid, gid=gid, mtime=ctx.epoch))]
