"""Costs that grow with the work, not faster: many tags, many entries in a layer, deep paths, replaced entries.

Times are measured in bench/scale.py; these tests pin what makes them linear (one index.json update for a batch of
tags, the bound on a layer's entries, ancestors found by component) and what the faster code must still give.
"""

from __future__ import annotations

import gzip
import json
import io
import tarfile
from dataclasses import replace
from pathlib import Path

import pytest

from ocibuild import oci
from ocibuild.errors import FormatError, UnsafeArchive
from ocibuild.oci import Descriptor, Digest, ImageConfig, Index, Manifest
from ocibuild.store import Store
from ocibuild.store.entries import LABEL_PREFIX, add_cache_entries
from ocibuild.store.layout import Layout
from ocibuild.tar import read, write

# ------------------------------------------------------------------------------------------------------- tags


def _descriptor(n: int) -> Descriptor:
    return Descriptor(oci.OCI_MANIFEST, Digest.of(str(n).encode()), n + 1)


def test_with_tags_is_with_tag_for_each_name_in_one_pass() -> None:
    index = Index(()).with_tag("a", _descriptor(0)).with_tag("b", _descriptor(1)).with_tag("c", _descriptor(2))
    tags = {"b": _descriptor(3), "d": _descriptor(4), "a": _descriptor(5)}
    one_by_one = index
    for name, descriptor in tags.items():
        one_by_one = one_by_one.with_tag(name, descriptor)
    assert index.with_tags(tags) == one_by_one
    assert [d.ref_name for d in one_by_one.manifests] == ["c", "b", "d", "a"]
    assert one_by_one.tags() == {"c": _descriptor(2).with_annotations({oci.ANNOTATION_REF_NAME: "c"}),
                                 **{n: d.with_annotations({oci.ANNOTATION_REF_NAME: n}) for n, d in tags.items()}}


def _entries(store: Store, count: int) -> dict[str, Descriptor]:
    layer = store.put(gzip.compress(b"", mtime=0), oci.LAYER_GZIP)
    entries = {}
    for n in range(count):
        key = Digest.of(f"key {n}".encode())
        config = store.put(ImageConfig(diff_ids=(Digest.of(b""),), labels={LABEL_PREFIX + "key": str(key)}).to_json(),
                           oci.OCI_CONFIG)
        entries[f"layer-{key.hex}"] = store.put_manifest(Manifest(config, (layer,)))
    return entries


def test_adding_many_entries_reads_and_writes_index_json_a_fixed_number_of_times(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = Store.open(tmp_path / "store")
    store.tag_all({f"other-{n}": d for n, d in enumerate(_entries(store, 50).values())})  # tags there already
    counts = {"read": 0, "write": 0}
    real_index, real_write = Layout.index, Layout.write_index

    def counted_index(self: Layout) -> Index:
        counts["read"] += 1
        return real_index(self)

    def counted_write(self: Layout, index: Index) -> None:
        counts["write"] += 1
        real_write(self, index)

    monkeypatch.setattr(Layout, "index", counted_index)
    monkeypatch.setattr(Layout, "write_index", counted_write)
    entries = _entries(store, 200)
    add_cache_entries(store, entries, what="test")
    assert counts["write"] == 1 and counts["read"] <= 3  # not one per entry
    monkeypatch.undo()
    for tag, d in entries.items():  # each tagged as given (tagging adds the config's platform)
        resolved = store.resolve(tag)
        assert resolved is not None and resolved.digest == d.digest
        assert resolved.annotations[oci.ANNOTATION_REF_NAME] == tag
    assert store.verify() == []


# ------------------------------------------------------------------------------------------ entries of a layer


def _layer(names: list[str], *, pax: bool = False) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT if pax else tarfile.USTAR_FORMAT) as tar:
        for name in names:
            info = tarfile.TarInfo(name)
            if pax:
                info.pax_headers = {"comment": "an extended header"}
            tar.addfile(info)
    return raw.getvalue()


def test_a_layer_of_more_entries_than_the_bound_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(read, "LAYER", replace(read.LAYER, max_entries=3))
    assert len(read.list_layer(io.BytesIO(_layer(["a", "b", "c"], pax=True)), "none", what="layer")) == 3
    with pytest.raises(UnsafeArchive, match=r"^layer: more than 3 entries$") as caught:
        read.list_layer(io.BytesIO(_layer(["a", "b", "c", "d"])), "none", what="layer")
    assert "split the tree into several layers" in caught.value.hint


def test_the_bound_is_a_million_entries_for_layers_tarballs_and_archives() -> None:
    assert read.MAX_ENTRIES == 1_000_000
    assert {read.LAYER.max_entries, read.TARBALL.max_entries, read.LAYOUT.max_entries} == {read.MAX_ENTRIES}


def test_the_writer_makes_no_layer_the_reader_would_refuse(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(read, "MAX_ENTRIES", 3)
    entries = [write.Entry(name, "file", 0o644) for name in ("a", "b", "c", "d")]
    with pytest.raises(FormatError, match="a layer of 4 entries: more than a layer may hold"):
        write.write_layer(entries, io.BytesIO(), "none", epoch=0)
    write.write_layer(entries[:3], io.BytesIO(), "none", epoch=0)


def test_a_listing_shares_one_string_among_the_paths_of_one_fingerprint() -> None:
    listing = read.list_layer(io.BytesIO(_layer(["d/", "e/", "d/a", "d/b"])), "none", what="layer")
    assert listing["d/a"] == listing["d/b"] == "file:0644:" + Digest.of(b"").hex
    assert listing["d/a"] is listing["d/b"]  # 3,000,000 empty files: one string, not 3,000,000
    assert listing["d"] is listing["e"]


def test_path_tree_finds_the_outermost_ancestor_by_component() -> None:
    tree: read.PathTree[int] = read.PathTree()
    assert not tree and tree.ancestor("a/b") is None
    tree.set("a/b", 1)
    tree.set("a/b/c/d", 2)
    tree.set("x", 3)
    assert tree.ancestor("a/b/c/d/e") == "a/b"
    assert tree.ancestor("a/b/c/d/e", lambda value: value > 1) == "a/b/c/d"
    assert tree.ancestor("a/b") is None and tree.ancestor("a/bc/d") is None and tree.ancestor("x/y") == "x"
    tree.discard("a/b")
    tree.discard("a/b/nothing")
    assert tree.ancestor("a/b/c") is None and tree.ancestor("a/b/c/d/e") == "a/b/c/d"
    tree.discard("a/b/c/d")
    tree.discard("x")
    assert not tree


def test_an_entry_beneath_a_symlink_is_found_through_a_path_of_many_components() -> None:
    deep = "/".join(["a"] * 100_000)
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        link = tarfile.TarInfo("a/a")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc"
        tar.addfile(link)
        tar.addfile(tarfile.TarInfo(deep))
    with pytest.raises(UnsafeArchive, match="is beneath symlink 'a/a' of the same archive"):
        read.list_layer(io.BytesIO(layer.getvalue()), "none", what="layer")


# --------------------------------------------------------------------------------- entries a tarball replaces


def _tarball(path: Path, members: list[tuple[str, str, str]]) -> None:
    """(name, kind, link target or content) each: "file", "dir", "link" (a hardlink) or "symlink"."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, kind, data in members:
            info = tarfile.TarInfo(name)
            if kind == "dir":
                info.type = tarfile.DIRTYPE
            elif kind in ("link", "symlink"):
                info.type, info.linkname = (tarfile.LNKTYPE if kind == "link" else tarfile.SYMTYPE), data
            else:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data.encode()) if kind == "file" else None)


def _content(archive: Path, entries: list[write.Entry]) -> dict[str, str]:
    data = archive.read_bytes()
    return {e.path: (data[e.offset:e.offset + e.size].decode() if e.type == "file" else f"{e.type}:{e.linkname}")
            for e in entries}


def test_a_replaced_file_leaves_its_content_to_its_hardlinks(tmp_path: Path) -> None:
    archive = tmp_path / "t.tar"
    _tarball(archive, [("f", "file", "one"), ("l1", "link", "f"), ("l2", "link", "f"), ("l3", "link", "l2"),
                       ("f", "file", "two"), ("l1", "symlink", "f")])
    assert _content(archive, write.tarball_entries(archive, what="t")) == {
        "l2": "one", "l3": "hardlink:l2", "f": "two", "l1": "symlink:f"}


def test_a_directory_replaced_by_a_file_takes_what_was_beneath_it_but_not_its_hardlinks(tmp_path: Path) -> None:
    archive = tmp_path / "t.tar"
    _tarball(archive, [("d/", "dir", ""), ("d/f", "file", "inside"), ("d/g", "file", "gone"), ("l", "link", "d/f"),
                       ("d", "file", "now a file"), ("e/", "dir", ""), ("e/x", "file", "x"), ("e/", "dir", "")])
    entries = write.tarball_entries(archive, what="t")
    assert _content(archive, entries) == {"l": "inside", "d": "now a file", "e": "dir:", "e/x": "x"}
    write.write_layer(write.with_parents(entries), io.BytesIO(), "none", epoch=0)  # a layer that can be written


def test_a_listing_is_written_in_pieces_byte_for_byte_what_one_json_dump_gives() -> None:
    from ocibuild.build.listing import _json_pieces

    listing = {f"usr/ünï/{n:03d}\"": f"file:0644:{n:064x}" for n in range(25)}
    for batch in (1, 4, 25, 100):
        pieces = list(_json_pieces(listing, batch=batch))
        assert b"".join(pieces) == json.dumps(listing, sort_keys=True).encode()
        assert len(pieces) == 2 + -(-25 // batch)
    assert b"".join(_json_pieces({})) == b"{}"
