"""Package bookkeeping files: the stanza merge, and the merge layer of a build (its key, its inputs)."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest

from conftest import write
from ocibuild.bookkeeping import load_record, read_content
from ocibuild.build import merge
from ocibuild.build.listing import layer_record
from ocibuild.build.merge import merge_changes, parse_stanzas
from ocibuild.inputs import StatCache
from ocibuild.oci import Descriptor, LayerBlob
from ocibuild.planner import BuildResult, build, make_plan, merge_inputs, merge_key
from ocibuild.recipe.lock import Lock
from ocibuild.recipe.project import load_project
from ocibuild.store import Store
from ocibuild.tar import read

ID = ("Package", "Architecture")
BASE = "Package: libc6\nArchitecture: amd64\nStatus: install ok installed\n\nPackage: dash\nArchitecture: amd64\n"


def test_side_by_side_layers_keep_each_others_packages() -> None:
    go = BASE + "\nPackage: golang-go\nArchitecture: amd64\nDescription: Go\n more text\n"
    lvm = BASE + "\nPackage: libaio-dev\nArchitecture: amd64\n"
    merged = merge_changes([(None, BASE), (BASE, go), (BASE, lvm)], ID)
    assert set(parse_stanzas(merged, ID)) == {("libc6", "amd64"), ("dash", "amd64"), ("golang-go", "amd64"),
                                              ("libaio-dev", "amd64")}
    assert " more text" in merged


def test_removal_and_upgrade_in_a_layer_survive() -> None:
    upgraded = "Package: libc6\nArchitecture: amd64\nVersion: 2\n"  # dash removed, libc6 replaced
    merged = parse_stanzas(merge_changes([(None, BASE), (BASE, upgraded)], ID), ID)
    assert list(merged) == [("libc6", "amd64")] and "Version: 2" in merged[("libc6", "amd64")]


def test_output_is_deterministic_whatever_the_layer_order_of_independent_additions() -> None:
    a = BASE + "\nPackage: a\nArchitecture: all\n"
    b = BASE + "\nPackage: b\nArchitecture: all\n"
    assert merge_changes([(None, BASE), (BASE, a), (BASE, b)], ID) == merge_changes([(None, BASE), (BASE, b), (BASE, a)], ID)


# ---- the merge layer in a build: keyed by the layers that hold bookkeeping files, made from their records ------

STATUS = "var/lib/dpkg/status"
BASE_STATUS = "Package: base-files\nArchitecture: amd64\nStatus: install ok installed\n"


def _stanza(package: str) -> str:
    return f"\nPackage: {package}\nArchitecture: amd64\nStatus: install ok installed\n"


def _tarball(path: Path, files: dict[str, str]) -> str:
    """A .tar.gz of ``files``; returns its sha256."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tf:
        for name, text in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(text.encode()), 0o644
            tf.addfile(info, io.BytesIO(text.encode()))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(raw.getvalue(), mtime=0))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _package_layer(root: Path, name: str, status: str, needs: str = '["base"]') -> None:
    """An archive layer (our stand-in for a run layer that installs packages) whose tree holds ``status``."""
    sha = _tarball(root / "layers" / name / "tree.tar.gz", {STATUS: status, f"opt/{name}/bin": name})
    write(root / "layers" / name / "layer.toml", f'kind = "archive"\nurl = "tree.tar.gz"\nsha256 = "{sha}"\n'
                                                  f'needs = {needs}\n')


def _merge_project(make_project, base_kind: str = "archive") -> Path:
    """``base``, then ``a`` and ``b`` on it side by side, each adding a package; ``source``, a copy layer that
    holds no bookkeeping file, beside them all."""
    root = make_project({"base": "", "a": "", "b": "", "source": 'kind = "copy"\nfrom = "src"\nto = "/src"\n'},
                        files={"src/main.go": "package main\n"})
    if base_kind == "archive":
        _package_layer(root, "base", BASE_STATUS, needs="[]")
    else:  # a root filesystem copied as the base, as the integration tests' busybox base is
        write(root / "rootfs" / STATUS, BASE_STATUS)
        write(root / "layers/base/layer.toml", 'kind = "copy"\nfrom = "rootfs"\nto = "/"\n')
    _package_layer(root, "a", BASE_STATUS + _stanza("tool-a"))
    _package_layer(root, "b", BASE_STATUS + _stanza("tool-b"))
    return root


def _build(root: Path, store: Store) -> BuildResult:
    return build(make_plan(load_project(root), store, Lock(), StatCache(None)), store)


def _merge_layer_file(store: Store, result: BuildResult, path: str) -> tuple[Descriptor, str]:
    """The image's top layer (the merge layer) and the content of ``path`` in it."""
    top = store.get_manifest(result.image.digest).layers[-1]
    return top, _file_in_layer(store, top, path)


def _file_in_layer(store: Store, layer: Descriptor, path: str) -> str:
    with store.open_blob(layer.digest) as f:
        found = {m.path: r.read() for m, r in read.iter_members(f, "zstd", what="test") if r is not None}
    return found[path].decode()


def _packages(text: str) -> list[str]:
    return sorted(block[0] for block in parse_stanzas(text, ID))


def test_the_merge_key_covers_the_layers_holding_bookkeeping_files_not_a_copy_layer(make_project,
                                                                                      store: Store) -> None:
    root = _merge_project(make_project)
    first = _build(root, store)
    inputs = merge_inputs(first.plan, store)
    assert inputs is not None and inputs.holders == ("base", "a", "b")
    assert [layer.name for layer in inputs.stack] == ["base", "a", "b"]
    (root / "src/main.go").write_text("package main // edited\n")
    edited = _build(root, store)
    assert edited.plan.layer("source").key != first.plan.layer("source").key
    assert merge_key(edited.plan, store) == inputs.key
    _package_layer(root, "b", BASE_STATUS + _stanza("tool-b") + _stanza("tool-b2"))
    changed = _build(root, store)
    assert merge_key(changed.plan, store) not in (None, inputs.key)


def test_a_source_edit_neither_recomputes_the_merge_nor_reads_a_layer(make_project, store: Store,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    root = _merge_project(make_project)
    merge_layer, status = _merge_layer_file(store, _build(root, store), STATUS)
    assert _packages(status) == ["base-files", "tool-a", "tool-b"]
    (root / "src/main.go").write_text("package main // edited\n")

    def no_blob_read(*args: object, **kwargs: object) -> None:
        raise AssertionError("a layer blob was read back")

    monkeypatch.setattr("ocibuild.build.merge.merge_bookkeeping", no_blob_read)
    monkeypatch.setattr(read, "iter_members", no_blob_read)
    result = _build(root, store)
    monkeypatch.undo()
    assert [(layer.name, layer.status) for layer in result.plan.layers] == \
        [("base", "cached"), ("a", "cached"), ("b", "cached"), ("source", "built")]
    assert _merge_layer_file(store, result, STATUS)[0] == merge_layer


def test_a_changed_package_layer_remerges_from_records_without_reading_the_others(
        make_project, store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """The merge is made from the records kept when the layers were written (no blob is read), and gives what
    merging the files' changes gives."""
    root = _merge_project(make_project)
    _build(root, store)
    b_status = BASE_STATUS + _stanza("tool-b") + _stanza("tool-b2")
    _package_layer(root, "b", b_status)
    calls = []
    merge_bookkeeping = merge.merge_bookkeeping

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(sorted(args[2]))  # the holders
        return merge_bookkeeping(*args, **kwargs)

    def no_blob_read(*args: object, **kwargs: object) -> None:
        raise AssertionError("a layer blob was read back")

    monkeypatch.setattr(merge, "merge_bookkeeping", counted)
    monkeypatch.setattr(read, "iter_members", no_blob_read)
    result = _build(root, store)
    monkeypatch.undo()
    assert calls == [["a", "b", "base"]]
    status = _merge_layer_file(store, result, STATUS)[1]
    assert status == merge_changes([(None, BASE_STATUS), (BASE_STATUS, BASE_STATUS + _stanza("tool-a")),
                                    (BASE_STATUS, b_status)], ID)
    assert _packages(status) == ["base-files", "tool-a", "tool-b", "tool-b2"]


def test_records_kept_when_written_are_what_the_blobs_give(make_project, store: Store) -> None:
    root = _merge_project(make_project)
    result = _build(root, store)
    manifest = store.get_manifest(result.image.digest)
    config = store.get_config(manifest.config.digest)
    holds = []
    for descriptor, diff_id in zip(manifest.layers, config.diff_ids):
        written = load_record(store, diff_id)
        assert written is not None and written == layer_record(store, LayerBlob(descriptor, diff_id), again=True)
        holds.append(sorted(written.holds))
        for path, digest in written.files.items():
            assert read_content(store, digest) == _file_in_layer(store, descriptor, path).encode()
    assert holds == [[STATUS]] * 3 + [[]] + [[STATUS]]  # base, a, b, source, the merge layer


def test_layers_without_records_are_read_once(make_project, store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """Layers ocibuild did not write itself (pulled, imported, or written before records were kept) have their
    blob read once for a record; the merge key is the same either way."""
    root = _merge_project(make_project)
    first = _build(root, store)
    key = merge_key(first.plan, store)
    shutil.rmtree(store.private_dir("bookkeeping"))
    assert merge_key(first.plan, store) == key  # read from the blobs, and recorded
    monkeypatch.setattr(read, "iter_members", lambda *a, **k: pytest.fail("a layer blob was read twice"))
    assert merge_key(first.plan, store) == key


def test_a_merge_whose_recorded_content_is_gone_reads_the_layers_again(make_project, store: Store) -> None:
    root = _merge_project(make_project)
    _build(root, store)
    shutil.rmtree(store.private_dir("bookkeeping") / "files")
    _package_layer(root, "b", BASE_STATUS + _stanza("tool-b") + _stanza("tool-b2"))
    status = _merge_layer_file(store, _build(root, store), STATUS)[1]
    assert _packages(status) == ["base-files", "tool-a", "tool-b", "tool-b2"]


def test_a_copy_layer_that_holds_a_bookkeeping_file_is_merged(make_project, store: Store) -> None:
    """A root filesystem copied as the base holds var/lib/dpkg/status: it is a holder like any other layer."""
    root = _merge_project(make_project, base_kind="copy")
    result = _build(root, store)
    inputs = merge_inputs(result.plan, store)
    assert inputs is not None and inputs.holders == ("base", "a", "b")
    assert _packages(_merge_layer_file(store, result, STATUS)[1]) == ["base-files", "tool-a", "tool-b"]
    (root / "src/main.go").write_text("package main // edited\n")
    assert merge_key(_build(root, store).plan, store) == inputs.key


def test_layers_of_one_chain_need_no_merge(make_project, store: Store) -> None:
    """Independent layers of which only one chain holds bookkeeping files: stacking gives the right files."""
    root = _merge_project(make_project)
    _package_layer(root, "b", BASE_STATUS + _stanza("tool-a") + _stanza("tool-b"), needs='["a"]')
    result = _build(root, store)
    assert merge_inputs(result.plan, store) is None
    assert len(store.get_manifest(result.image.digest).layers) == 4


def test_a_no_op_build_with_a_merge_layer_imports_no_module_that_makes_layers(make_project, store: Store) -> None:
    root = _merge_project(make_project)
    _build(root, store)
    argv = ["-C", str(root), "--store", str(store.root)]
    code = ("import sys; from ocibuild import cli\n"
            f"assert cli.main(['build', *{argv!r}]) == 0\n"
            "print(' '.join(sorted(sys.modules)))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    loaded = set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                env=env).stdout.split())
    heavy = {"zstandard", "isal", "python_on_whales", "tempfile", "ocibuild.tar.codecs", "ocibuild.tar.write",
             "ocibuild.tar.read", "ocibuild.engine", "ocibuild.build"}
    assert "ocibuild.bookkeeping" in loaded and not loaded & heavy, sorted(loaded & heavy)
