"""What every layer builder shares: the build context and the one way a layer blob enters the store.

A builder returns the layers it made as :class:`LayerBlob` (blob descriptor + diff_id), bottom first; the planner
records them as a cache entry. Builders write blobs only through ``Store.writer``, so a failure part-way leaves
nothing in the store.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import BinaryIO, cast

from .. import oci, registry
from ..bookkeeping import STANZA_FILES
from ..tar import read, write
from ..errors import RecipeError
from ..oci import LayerBlob, Descriptor
from ..recipe.project import LayerRecipe
from ..store import Store
from ..tar.write import Entry
from ..threads import Stop
from .listing import save_layer_records

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
    step: Output = lambda text: None  # receives what the builder does now ("running the script"), for a live line
    stop: Stop = field(default_factory=Stop)  # set when the build stops: a builder stops what it runs (a container)


def write_entries(ctx: BuildContext, entries: Sequence[Entry]) -> LayerBlob:
    """Write ``entries`` as one reproducible, compressed layer blob into the store, and record its listing and
    bookkeeping record from what the writer saw (so the blob is never read back for them)."""
    with ctx.store.writer() as blob:
        stats = write.write_layer(entries, cast(BinaryIO, blob), ctx.compression, epoch=ctx.epoch,
                                  keep=STANZA_FILES)
    save_layer_records(ctx.store, stats.diff_id, stats.listing, stats.kept)
    return LayerBlob(Descriptor(oci.layer_media_type(ctx.compression), blob.digest, blob.size), stats.diff_id)


def owner(layer: LayerRecipe) -> tuple[int, int]:
    """The uid and gid of a layer's ``owner = "UID:GID"``."""
    uid, gid = layer.str_("owner").split(":")
    return int(uid), int(gid)


def under(dest: str, path: str) -> str:
    """``path`` placed below ``dest``, as a normalised layer path; the root itself is refused."""
    joined = str(PurePosixPath(dest) / path) if path else dest
    normal = read.normalise_path(joined)
    if normal is None:
        raise RecipeError(f"destination {joined!r} is the root itself")
    return normal


@contextmanager
def temp_file(ctx: BuildContext, suffix: str) -> Iterator[Path]:
    """A scratch file in the store's private area (not created yet), removed when the context ends; if the process
    is killed, by the next ocibuild that opens the store (:meth:`Store.temp_dir`)."""
    with ctx.store.temp_dir() as directory:
        yield directory / f"file{suffix}"
