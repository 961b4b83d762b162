"""No state the tool cannot get out of: each way `ocibuild verify` can reject a store, made by hand in a built
store; verify fails, `verify --repair` names what it removes, verify is clean, gc runs and a build works again.
And the door: what a registry or an archive brings in passes the same checks before it is tagged."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import ProjectFactory
from ocibuild import cli, oci
from ocibuild.errors import StoreError
from ocibuild.oci import Descriptor, Digest, ImageConfig, Index, Manifest
from ocibuild.store import Store
from ocibuild.store.entries import add_cache_entries


def _built(make_project: ProjectFactory, tmp_path: Path) -> tuple[Path, Store]:
    root = make_project({"base": 'kind = "copy"\nfrom = "base"\nto = "/"\n',
                         "app": 'kind = "copy"\nfrom = "app"\nto = "/app"\nneeds = ["base"]\n'},
                        files={"base/etc/motd": "hello\n", "app/main.c": "int main(void) { return 0; }\n"})
    store = Store.open(tmp_path / "store")
    assert cli.main(["build", "-C", str(root), "--store", str(store.root)]) == 0
    return root, store


def _entry(store: Store, name: str) -> tuple[str, Descriptor]:
    return next((tag, d) for tag, d in store.index().tags().items() if tag.startswith(f"{name}-"))


def _retag(store: Store, tag: str, descriptor: Descriptor) -> None:
    """Point ``tag`` at ``descriptor`` by hand: index.json written as another tool (or an old bug) would."""
    index = store.index()
    (store.root / "index.json").write_bytes(index.with_tag(tag, descriptor).to_json())


def _layer_with_a_manifest_media_type(store: Store) -> tuple[str, str]:
    """The instance the issue names: a cache entry whose layer descriptor has a manifest's media type."""
    tag, descriptor = _entry(store, "app")
    manifest = store.get_manifest(descriptor.digest)
    layer = manifest.layers[0]
    bad = Manifest(manifest.config, (Descriptor(oci.OCI_MANIFEST, layer.digest, layer.size),))
    _retag(store, tag, store.put_manifest(bad))
    return f"tag {tag}", re.escape(f"tag '{tag}' > layer 0 has media type '{oci.OCI_MANIFEST}', not a layer")


def _flip_last_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))


def _corrupt_blob(store: Store) -> tuple[str, str]:
    _, descriptor = _entry(store, "base")
    layer = store.get_manifest(descriptor.digest).layers[0].digest
    _flip_last_bit(store.blob_path(layer))
    return f"blob {layer}", rf"blob {layer} is corrupt \(content hashes to sha256:"


def _corrupt_manifest(store: Store) -> tuple[str, str]:
    _, descriptor = _entry(store, "app")
    _flip_last_bit(store.blob_path(descriptor.digest))
    return f"blob {descriptor.digest}", rf"blob {descriptor.digest} is corrupt"


def _dangling_tag(store: Store) -> tuple[str, str]:
    missing = Descriptor(oci.OCI_MANIFEST, Digest.of(b"never stored"), 12)
    _retag(store, "gone", missing)
    return "tag gone", rf"tag 'gone': blob {missing.digest} is missing"


def _key_label_mismatch(store: Store) -> tuple[str, str]:
    tag, descriptor = _entry(store, "app")
    manifest = store.get_manifest(descriptor.digest)
    config = store.get_config(manifest.config.digest)
    other = "sha256:" + "f" * 64
    forged = ImageConfig(config.diff_ids, config.architecture, labels={**config.labels, "dev.ocibuild.layer.key": other})
    _retag(store, tag, store.put_manifest(Manifest(store.put(forged.to_json(), oci.OCI_CONFIG), manifest.layers)))
    return f"tag {tag}", rf"cache entry '{tag}': its key label is '{other}', its tag names the key"


def _diff_ids_mismatch(store: Store) -> tuple[str, str]:
    tag, descriptor = _entry(store, "base")
    manifest = store.get_manifest(descriptor.digest)
    config = store.get_config(manifest.config.digest)
    forged = ImageConfig(config.diff_ids * 2, config.architecture, labels=dict(config.labels))
    _retag(store, tag, store.put_manifest(Manifest(store.put(forged.to_json(), oci.OCI_CONFIG), manifest.layers)))
    return f"tag {tag}", rf"cache entry '{tag}': 1 layers but 2 diff_ids"


def _size_mismatch(store: Store) -> tuple[str, str]:
    descriptor = store.resolve("dev")
    assert descriptor is not None
    _retag(store, "dev", Descriptor(descriptor.media_type, descriptor.digest, descriptor.size + 1))
    return "tag dev", rf"tag 'dev': blob {descriptor.digest} has {descriptor.size} bytes, the descriptor says"


def _not_a_manifest(store: Store) -> tuple[str, str]:
    _, descriptor = _entry(store, "base")
    layer = store.get_manifest(descriptor.digest).layers[0]
    _retag(store, "odd", Descriptor(oci.OCI_MANIFEST, layer.digest, layer.size))
    return "tag odd", rf"tag 'odd': manifest {layer.digest} is not valid JSON"


def _layer_tagged(store: Store) -> tuple[str, str]:
    _, descriptor = _entry(store, "base")
    layer = store.get_manifest(descriptor.digest).layers[0]
    _retag(store, "a-layer", layer)
    return "tag a-layer", rf"tag 'a-layer' has media type '{re.escape(layer.media_type)}': index.json and indexes"


def _untagged_dangling(store: Store) -> tuple[str, str]:
    missing = Descriptor(oci.OCI_MANIFEST, Digest.of(b"never stored either"), 20)
    index = store.index()
    (store.root / "index.json").write_bytes(Index(index.manifests + (missing,)).to_json())
    position = len(index.manifests)
    return f"index entry index.json manifest {position} ({missing.digest})", \
        rf"index.json manifest {position}: blob {missing.digest} is missing"


def _not_a_blob(store: Store) -> tuple[str, str]:
    (store.root / "blobs" / "sha256" / "notes.txt").write_text("not a blob\n")
    return "file blobs/sha256/notes.txt", r"blobs/sha256/notes\.txt is not a blob \(unexpected name or type\)"


def _index_json_not_json(store: Store) -> tuple[str, str]:
    (store.root / "index.json").write_text("{nope")
    return "file index.json", r"index\.json is not valid JSON"


def _index_json_with_a_bad_entry(store: Store) -> tuple[str, str]:
    index = json.loads((store.root / "index.json").read_bytes())
    index["manifests"].insert(1, {"mediaType": oci.OCI_MANIFEST, "digest": "sha256:nothex", "size": 1})
    (store.root / "index.json").write_text(json.dumps(index))
    return "index entry index.json manifest 1", r"index\.json: manifest 1: 'sha256:nothex' is not a digest"


#: name -> damage done by hand to a built store: (what repair removes, as it prints it; verify's problem)
DAMAGE: dict[str, Callable[[Store], tuple[str, str]]] = {
    "layer-with-a-manifest-media-type": _layer_with_a_manifest_media_type,
    "corrupt-layer-blob": _corrupt_blob,
    "corrupt-manifest-blob": _corrupt_manifest,
    "dangling-tag": _dangling_tag,
    "key-label-mismatch": _key_label_mismatch,
    "diff-ids-mismatch": _diff_ids_mismatch,
    "size-mismatch": _size_mismatch,
    "tag-of-a-blob-that-is-no-manifest": _not_a_manifest,
    "tag-of-a-layer": _layer_tagged,
    "untagged-manifest-missing": _untagged_dangling,
    "file-in-blobs-that-is-no-blob": _not_a_blob,
    "index-json-not-json": _index_json_not_json,
    "index-json-with-a-bad-entry": _index_json_with_a_bad_entry,
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_verify_repair_brings_a_rejected_store_back(damage: str, make_project: ProjectFactory, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    root, store = _built(make_project, tmp_path)
    removal, problem = DAMAGE[damage](store)
    argv = ["--store", str(store.root)]
    capsys.readouterr()
    assert cli.main(["verify", *argv]) == 1
    out, err = capsys.readouterr()
    assert re.search(problem, out), out
    assert "ocibuild verify --repair" in err

    assert cli.main(["verify", "--repair", *argv]) == 0
    out, _ = capsys.readouterr()
    assert re.search(rf"^removed {re.escape(removal)}: ", out, re.MULTILINE), out
    assert out.rstrip().endswith(f"store {store.root}: ok")
    assert store.verify() == []
    assert cli.main(["verify", "--repair", "--json", *argv]) == 0  # nothing more to remove
    assert json.loads(capsys.readouterr().out) == {"store": str(store.root), "ok": True, "problems": [], "removed": []}

    assert cli.main(["gc", *argv]) == 0
    assert cli.main(["build", "-C", str(root), *argv]) == 0
    assert store.verify() == [] and store.resolve("dev") is not None


def test_verify_repair_json_lists_each_removal(make_project: ProjectFactory, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    _, store = _built(make_project, tmp_path)
    _dangling_tag(store)
    _not_a_blob(store)
    capsys.readouterr()
    assert cli.main(["verify", "--json", "--store", str(store.root)]) == 1
    before = json.loads(capsys.readouterr().out)
    assert before["ok"] is False and len(before["problems"]) == 2 and before["removed"] == []
    assert cli.main(["verify", "--repair", "--json", "--store", str(store.root)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is True and doc["problems"] == []
    assert [(r["kind"], r["name"]) for r in doc["removed"]] == [("file", "blobs/sha256/notes.txt"), ("tag", "gone")]
    assert all(r["reason"] for r in doc["removed"])


def test_gc_runs_on_a_store_with_a_layer_described_as_a_manifest(make_project: ProjectFactory, tmp_path: Path) -> None:
    """The layer blob is read as nothing but a blob: what it refers to is known, so gc keeps it and runs."""
    _, store = _built(make_project, tmp_path)
    tag, descriptor = _entry(store, "app")
    layer = store.get_manifest(descriptor.digest).layers[0]
    _layer_with_a_manifest_media_type(store)
    store.gc()
    assert store.has(layer.digest)


# ----------------------------------------------------------------------------------------------------- the door


def test_an_entry_verify_would_reject_is_not_added(store: Store) -> None:
    layer = store.put(b"layer", oci.LAYER_TAR)
    key = Digest.of(b"key")
    config = store.put(ImageConfig((Digest.of(b"layer"),), labels={"dev.ocibuild.layer.key": str(key)}).to_json(),
                       oci.OCI_CONFIG)
    bad = store.put_manifest(Manifest(config, (Descriptor(oci.OCI_MANIFEST, layer.digest, layer.size),)))
    tag = f"app-{key.hex}"
    with pytest.raises(StoreError, match=rf"pull: tag '{tag}' > layer 0 has media type .*, not a layer") as caught:
        add_cache_entries(store, {tag: bad}, what="pull")
    assert "nothing was tagged" in caught.value.hint
    assert store.resolve(tag) is None
    good = store.put_manifest(Manifest(config, (layer,)))
    assert store.tag_problems({tag: good}) == []
    add_cache_entries(store, {tag: good}, what="pull")
    assert store.verify() == []
