"""plan → build → assemble on small projects of copy and archive layers (no network, no containers)."""

from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from conftest import write
from ocibuild import cli, oci
from ocibuild.errors import LayerConflict, OcibuildError, RecipeError
from ocibuild.inputs import StatCache, hash_file
from ocibuild.planner import build, build_layers, make_plan
from ocibuild.recipe.lock import Lock
from ocibuild.recipe.project import load_project
from ocibuild.store import Store
from ocibuild.store.entries import cache_tag
from ocibuild.tar import read


def _tarball(path: Path, files: dict[str, bytes]) -> str:
    """A .tar.gz of ``files`` (owned by a user with a name, as release tarballs are); returns its sha256."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.uid, info.uname = len(data), 0o755, 1000, "someone"
            tf.addfile(info, io.BytesIO(data))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(raw.getvalue(), mtime=0))
    return hash_file(path)


TOOLCHAIN = {"go/bin/go": b"#!/bin/sh\necho go\n", "go/VERSION": b"go1.19"}


def _project(make_project, tmp_path: Path, root: Path | None = None) -> Path:
    root = root or tmp_path / "project"
    sha = _tarball(root / "layers/go/toolchain.tar.gz", TOOLCHAIN)
    make_project(
        {
            "go": f'kind = "archive"\nurl = "toolchain.tar.gz"\nsha256 = "{sha}"\ndest = "/usr/local"\n',
            "tools": 'kind = "copy"\nfrom = "tools"\nto = "/usr/local/bin"\nneeds = ["go"]\n',
            "source": 'kind = "copy"\nfrom = "src"\nto = "/go/src/example"\n',
        },
        image='env = { GOPATH = "/go" }\nworkdir = "/go/src/example"\n',
        root=root,
        files={"src/main.go": "package main\n", "src/hack/make.sh": "#!/bin/sh\n", "tools/lint": "#!/bin/sh\n",
               "src/.containerignore": "bundles\n", "src/bundles/old": "stale\n"},
    )
    (root / "src/hack/make.sh").chmod(0o755)
    return root


def _build(root: Path, store: Store, **kw):
    project = load_project(root)
    plan = make_plan(project, store, Lock(), StatCache(None))
    return plan, build(plan, store, **kw)


def test_build_then_everything_cached(make_project, tmp_path: Path, store: Store) -> None:
    root = _project(make_project, tmp_path)
    plan, result = _build(root, store)
    assert [l.status for l in plan.layers] == ["build"] * 3
    assert [l.status for l in result.plan.layers] == ["built"] * 3
    again, result2 = _build(root, store)
    assert [l.status for l in again.layers] == ["cached"] * 3
    assert result2.image.digest == result.image.digest
    tagged = store.resolve("dev")
    assert tagged is not None and tagged.digest == result.image.digest
    manifest = store.get_manifest(result.image.digest)
    config = store.get_config(manifest.config.digest)
    assert len(manifest.layers) == 3 and all(l.media_type == oci.LAYER_ZSTD for l in manifest.layers)
    assert config.env == ("GOPATH=/go",) and config.workdir == "/go/src/example"
    assert [h.created_by.split("'")[1] for h in config.history] == ["go", "tools", "source"]
    # every layer has a cache entry carrying its metadata as labels
    for layer in result.plan.layers:
        entry = store.get_manifest(store.resolve(cache_tag(layer.name, layer.key)).digest)
        labels = store.get_config(entry.config.digest).labels
        assert labels["dev.ocibuild.layer.key"] == str(layer.key)
        assert json.loads(labels["dev.ocibuild.layer.inputs"]) == [i.to_dict() for i in layer.inputs]
        # and what its key was made of: the key document (whose hash is the key) and the needs' names
        assert oci.Digest.of(labels["dev.ocibuild.layer.document"].encode()) == layer.key
        assert json.loads(labels["dev.ocibuild.layer.document"]) == json.loads(json.dumps(layer.document))
        assert json.loads(labels["dev.ocibuild.layer.needs"]) == list(layer.recipe.needs)


def test_only_the_changed_layer_and_its_dependents_rebuild(make_project, tmp_path: Path, store: Store) -> None:
    root = _project(make_project, tmp_path)
    _build(root, store)
    (root / "src/main.go").write_text("package main // edited\n")
    plan, _ = _build(root, store)
    assert {l.name: l.status for l in plan.layers} == {"go": "cached", "tools": "cached", "source": "build"}
    sha = _tarball(root / "layers/go/toolchain.tar.gz", {"go/bin/go": b"#!/bin/sh\necho go2\n"})
    write(root / "layers/go/layer.toml", f'kind = "archive"\nurl = "toolchain.tar.gz"\nsha256 = "{sha}"\ndest = "/usr/local"\n')
    plan, _ = _build(root, store)
    assert {l.name: l.status for l in plan.layers} == {"go": "build", "tools": "build", "source": "cached"}


def test_excluded_files_do_not_change_the_key(make_project, tmp_path: Path, store: Store) -> None:
    root = _project(make_project, tmp_path)
    _build(root, store)
    (root / "src/bundles/new-output").write_text("binary")
    plan, _ = _build(root, store)
    assert all(l.status == "cached" for l in plan.layers)


def test_reproducible_across_paths_mtimes_and_umask(make_project, tmp_path: Path) -> None:
    stores, digests = [], []
    for i, umask in enumerate((0o022, 0o002)):
        old = os.umask(umask)
        try:
            root = _project(make_project, tmp_path / f"t{i}", root=tmp_path / f"copy{i}" / "project")
        finally:
            os.umask(old)
        for path in root.rglob("*"):
            os.utime(path, (1_000_000 * (i + 1), 1_000_000 * (i + 1)), follow_symlinks=False)
        store = Store.open(tmp_path / f"store{i}")
        _, result = _build(root, store)
        stores.append(store)
        digests.append((result.image.digest, [l.digest for l in store.get_manifest(result.image.digest).layers]))
    assert digests[0] == digests[1]
    for store in stores:
        assert store.verify() == []


def test_gzip_and_zstd_layers_share_diff_ids(make_project, tmp_path: Path, store: Store) -> None:
    root = _project(make_project, tmp_path)
    _, zstd = _build(root, store)
    config = root / "ocibuild.toml"
    config.write_text(config.read_text().replace('name = "dev"', 'name = "dev"\ncompression = "gzip"'))
    other = Store.open(tmp_path / "gz")
    _, gz = _build(root, other)
    diff = lambda s, r: s.get_config(s.get_manifest(r.image.digest).config.digest).diff_ids
    assert diff(store, zstd) == diff(other, gz)
    assert {l.media_type for l in other.get_manifest(gz.image.digest).layers} == {oci.LAYER_GZIP}
    assert other.verify() == []


def test_conflicting_independent_layers_warn_or_fail(make_project, tmp_path: Path, store: Store) -> None:
    root = make_project(
        {"a": 'kind = "copy"\nfrom = "a"\nto = "/etc"\n', "b": 'kind = "copy"\nfrom = "b"\nto = "/etc"\n'},
        files={"a/app.conf": "one\n", "b/app.conf": "two\n", "b/same": "x", "a/same": "x"},
    )
    _, result = _build(root, store)
    assert len(result.warnings) == 1 and "/etc/app.conf" in result.warnings[0]
    assert "/etc/same" not in result.warnings[0]
    (root / "b/app.conf").write_text("three\n")
    with pytest.raises(LayerConflict, match="/etc/app.conf"):
        _build(root, store, strict=True)


def test_copy_layer_writes_a_hard_linked_file_once_and_a_hardlink(make_project, tmp_path: Path,
                                                                  store: Store) -> None:
    root = make_project({"src": 'kind = "copy"\nfrom = "src"\nto = "/app"\n'}, files={"src/z": "same\n"})
    os.link(root / "src/z", root / "src/a")
    _, result = _build(root, store)
    [layer] = store.get_manifest(result.image.digest).layers
    with store.open_blob(layer.digest) as f:
        members = {m.path: (m.type, m.linkname, r.read() if r else None)
                   for m, r in read.iter_members(f, oci.layer_compression(layer.media_type), what="t")}
    assert members["app/a"] == ("file", "", b"same\n") and members["app/z"] == ("hardlink", "app/a", None)


def test_archive_strip_components_and_owner(make_project, tmp_path: Path, store: Store) -> None:
    tarball = tmp_path / "t.tar.gz"
    sha = _tarball(tarball, {"go/bin/go": b"x", "go/doc/README": b"y"})
    root = make_project({"go": f'kind = "archive"\nurl = "file://{tarball}"\nsha256 = "{sha}"\ndest = "/opt/go"\n'
                               'strip_components = 1\nowner = "10:20"\n'})
    _, result = _build(root, store)
    blob = store.get_manifest(result.image.digest).layers[0]
    with store.open_blob(blob.digest) as f:
        data = subprocess.run(["zstd", "-dc"], input=f.read(), capture_output=True, check=True).stdout
    members = {m.name: m for m in tarfile.open(fileobj=io.BytesIO(data))}
    assert {"opt/go/bin/go", "opt/go/doc/README"} <= set(members)
    assert members["opt/go/bin/go"].uid == 10 and members["opt/go/bin/go"].gid == 20
    assert members["opt/go/bin/go"].uname == ""


def test_a_plan_of_some_layers_builds_those_and_no_image(make_project, tmp_path: Path, store: Store) -> None:
    root = _project(make_project, tmp_path)
    project = load_project(root)
    plan = make_plan(project, store, Lock(), StatCache(None), only=["tools"])
    assert [l.name for l in plan.layers] == ["go", "tools"] and not plan.complete
    assert [l["name"] for l in plan.to_dict()["layers"]] == ["go", "tools"]
    with pytest.raises(ValueError, match="makes no image"):
        build(plan, store)
    built = build_layers(plan, store)
    assert [(l.name, l.status) for l in built.layers] == [("go", "built"), ("tools", "built")]
    assert store.resolve("dev") is None
    whole = make_plan(project, store, Lock(), StatCache(None))
    assert whole.complete and [l.status for l in whole.layers] == ["cached", "cached", "build"]
    assert [l.key for l in whole.layers[:2]] == [l.key for l in built.layers]


def test_cli_json_contract(make_project, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _project(make_project, tmp_path)
    store = str(tmp_path / "cli-store")
    assert cli.main(["plan", "--json", "-C", str(root), "--store", store]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["image"] == "dev"
    assert [sorted(l) for l in plan["layers"]] == [["inputs", "key", "kind", "name", "needs", "status"]] * 3
    assert plan["layers"][1]["needs"] == ["go"]
    assert all(l["status"] == "build" and l["key"].startswith("sha256:") for l in plan["layers"])
    assert plan["layers"][2]["inputs"][0]["name"] == "src"
    assert cli.main(["build", "--json", "-C", str(root), "--store", store]) == 0
    built = json.loads(capsys.readouterr().out)
    assert [l["status"] for l in built["layers"]] == ["built"] * 3
    assert built["digest"].startswith("sha256:")
    assert cli.main(["build", "--json", "-C", str(root), "--store", store]) == 0
    again = json.loads(capsys.readouterr().out)
    assert [l["status"] for l in again["layers"]] == ["cached"] * 3 and again["digest"] == built["digest"]


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda root: (root / "src").rename(root / "gone"), "does not exist"),
        (lambda root: (root / "ocibuild.toml").write_text("[image\n"), "malformed TOML"),
        (lambda root: write(root / "layers/go/layer.toml", 'kind = "archive"\nurl = "missing.tar"\nsha256 = "' + "0" * 64 + '"\n'),
         "not found"),
    ],
)
def test_bad_input_is_one_line_exit_1_and_store_untouched(make_project, tmp_path: Path, change, message,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    root = _project(make_project, tmp_path)
    change(root)
    store = tmp_path / "bad-store"  # (one job: an independent layer would otherwise build beside the bad one)
    assert cli.main(["build", "--jobs", "1", "-C", str(root), "--store", str(store)]) == 1
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], err
    assert "hint:" in err
    s = Store.open(store)
    assert s.index().manifests == () and s.verify() == []


def test_unwritable_store_is_a_clear_error(make_project, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _project(make_project, tmp_path)
    (tmp_path / "file").write_text("not a dir")
    assert cli.main(["build", "-C", str(root), "--store", str(tmp_path / "file" / "store")]) == 1
    assert "error:" in capsys.readouterr().err


def test_run_layer_without_needs_is_a_clear_error(make_project, store: Store) -> None:
    root = make_project({"x": 'kind = "run"\nscript = "s.sh"\n'}, files={"layers/x/s.sh": "true\n"})
    project = load_project(root)
    plan = make_plan(project, store, Lock(), StatCache(None))
    assert plan.layers[0].inputs[0].name == "layers/x/s.sh"
    with pytest.raises(RecipeError, match="a run layer needs the layers it runs on"):
        build(plan, store, engine=lambda: pytest.fail("no engine may be started"))


def test_records_kept_when_layers_are_written_match_the_blob(make_project, tmp_path: Path, store: Store,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Every layer written records its listing and bookkeeping record from what the tar writer saw (the build
    reads no layer back); they must be what reading the blob gives."""
    from ocibuild.tar import read
    from ocibuild.bookkeeping import load_record
    from ocibuild.build.listing import layer_record, listing_path

    root = _project(make_project, tmp_path)
    (root / "src/link").symlink_to("main.go")
    with monkeypatch.context() as patched:
        patched.setattr(read, "iter_members", lambda *a, **k: pytest.fail("a layer blob was read back"))
        _, result = _build(root, store)
    manifest = store.get_manifest(result.image.digest)
    config = store.get_config(manifest.config.digest)
    for layer, diff_id in zip(manifest.layers, config.diff_ids):
        with store.open_blob(layer.digest) as f:
            assert json.loads(listing_path(store, diff_id).read_text()) == read.list_layer(f, "zstd", what="test")
        written = load_record(store, diff_id)
        assert written is not None and written == layer_record(store, oci.LayerBlob(layer, diff_id), again=True)


@pytest.mark.parametrize(
    "command, layers, files, message",
    [
        ("plan", {"x": 'kind = "run"\nscript = "missing.sh"\n'}, {}, "'missing.sh' not found beside layer.toml"),
        # an image's source is read where refs are resolved: `plan` only reads ocibuild.lock (see below)
        ("build", {"x": 'kind = "image"\nref = "oci:nowhere:v1"\n'}, {}, "layers/x/nowhere"),
        ("build", {"x": 'kind = "image"\nref = "oci-archive:missing.tar"\n'}, {}, "missing.tar"),
        ("lock", {"x": 'kind = "image"\nref = "oci-archive:missing.tar"\n'}, {}, "missing.tar"),
    ],
)
def test_missing_script_or_image_is_a_clear_error(make_project, tmp_path: Path, command, layers, files, message,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    root = make_project(layers, files=files)
    assert cli.main([command, "-C", str(root), "--store", str(tmp_path / "s")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err.splitlines()[0] and "hint: " in err, err


def test_cache_entries_carry_the_image_architecture(make_project, store: Store) -> None:
    root = make_project({"a": 'kind = "copy"\nfrom = "src"\nto = "/app"\n'}, image='architecture = "arm64"\n',
                        files={"src/f": "x"})
    _, result = _build(root, store)
    layer = result.plan.layers[0]
    entry = store.get_manifest(store.resolve(cache_tag(layer.name, layer.key)).digest)
    assert store.get_config(entry.config.digest).architecture == "arm64"
    assert store.get_config(store.get_manifest(result.image.digest).config.digest).architecture == "arm64"


def test_copy_layer_planned_from_the_tree_cache_is_walked_when_built(make_project, tmp_path: Path, store: Store,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Planning reuses a tree's recorded digest without walking it in full; building walks it and refuses to
    build under a key made from a tree that changed in between."""
    import time

    monkeypatch.setattr("ocibuild.inputs.RACY_NS", 20_000_000)  # the fresh files may be recorded after 20 ms
    root = _project(make_project, tmp_path)
    time.sleep(0.05)
    cache = StatCache(None)
    project = load_project(root)
    first = build(make_plan(project, store, Lock(), cache), store)
    # a new toolchain: "tools" (needs = ["go"]) gets a new key, its tree comes from the tree cache
    sha = _tarball(root / "layers/go/toolchain.tar.gz", {"go/bin/go": b"#!/bin/sh\necho go2\n"})
    write(root / "layers/go/layer.toml", f'kind = "archive"\nurl = "toolchain.tar.gz"\nsha256 = "{sha}"\ndest = "/usr/local"\n')
    project = load_project(root)
    plan = make_plan(project, store, Lock(), cache)
    tools = plan.layer("tools")
    assert tools.status == "build" and tools.tree is None
    again = build(plan, store)
    assert again.plan.layer("tools").status == "built"
    layers = [store.get_manifest(r.image.digest).layers for r in (first, again)]
    assert layers[0][1] == layers[1][1]  # the same tools layer, from the tree walked at build time
    # the source layer's entry is gone and its tree changes after planning
    store.untag(cache_tag("source", plan.layer("source").key))
    plan = make_plan(project, store, Lock(), cache)
    assert plan.layer("source").status == "build" and plan.layer("source").tree is None
    (root / "src/main.go").write_text("package main // edited after planning\n")
    with pytest.raises(RecipeError, match="'src' changed while the build ran"):
        build(plan, store)


def test_a_file_edited_between_plan_and_write_is_refused_and_nothing_recorded(make_project, tmp_path: Path,
                                                                            store: Store) -> None:
    """The copy writer reuses the tree planning walked; a same-size edit in between must not store the new bytes
    under the key the old bytes made: the content is hashed as it is written."""
    root = _project(make_project, tmp_path)
    plan = make_plan(load_project(root), store, Lock(), StatCache(None))
    assert plan.layer("source").tree is not None  # walked at planning time, reused when written
    (root / "src/main.go").write_text("package niam\n")  # same size, other bytes
    with pytest.raises(OcibuildError, match=r"main\.go' changed during the build"):
        build(plan, store)
    assert store.resolve(cache_tag("source", plan.layer("source").key)) is None
    assert set(store.blobs()) == store.reachable()  # the refused layer's blob was never committed
    assert store.verify(unreachable=True) == []


def test_an_oci_archive_base_is_imported_checked_and_untagged(make_project, tmp_path: Path, store: Store,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """An image layer's oci-archive goes through the checks of `ocibuild import`: its blobs arrive verified,
    its own tags stay out of the store, and a hostile archive is refused with its name."""
    from ocibuild import archive as oci_archive

    source = Store.open(tmp_path / "source")
    base_root = make_project({"a": 'kind = "copy"\nfrom = "src"\nto = "/"\n'}, root=tmp_path / "base",
                             files={"src/etc/os-release": "ID=test\n"})
    _, base = _build(base_root, source)
    root = make_project({"base": 'kind = "image"\nref = "oci-archive:base.tar:v1"\n',
                         "app": 'kind = "copy"\nfrom = "src"\nto = "/app"\n'}, files={"src/f": "x"})
    oci_archive.write_oci_archive(source, base.image, "v1", root / "layers/base/base.tar")
    assert cli.main(["build", "-C", str(root), "--store", str(store.root)]) == 0
    assert store.resolve("v1") is None, "the archive's tag means nothing in this store"
    assert store.resolve("dev") is not None and store.verify() == []

    hostile = tmp_path / "hostile"
    make_project({"base": 'kind = "image"\nref = "oci-archive:base.tar:v1"\n'}, root=hostile)
    with tarfile.open(root / "layers/base/base.tar") as src, tarfile.open(hostile / "layers/base/base.tar", "w") as dst:
        for member in src.getmembers():
            dst.addfile(member, src.extractfile(member) if member.isfile() else None)
        link = tarfile.TarInfo("blobs/sha256/escape")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        dst.addfile(link)
    capsys.readouterr()
    assert cli.main(["build", "-C", str(hostile), "--store", str(tmp_path / "other")]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "base.tar: entry 'blobs/sha256/escape' is a symlink" in errors[0]
    assert not list(Store.open(tmp_path / "other").blobs()), "nothing is written before the archive is checked"


# ---- `ocibuild plan` only looks -----------------------------------------------------------------------------------


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any name lookup or connection fails the test (urllib and the registry client both go through these)."""
    import socket

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access: {args[:2]}")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


def _lock_state(root: Path) -> tuple[bytes, int] | None:
    lock = root / "ocibuild.lock"
    return (lock.read_bytes(), lock.stat().st_mtime_ns) if lock.exists() else None


def test_plan_reports_missing_lock_entries_without_network_or_writing(make_project, tmp_path: Path, no_network,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """Moving inputs the lock lacks (a registry image, a suite) are not resolved by `plan`: those layers, and the
    layers that need them, have status "lock" and no key; the others are planned as usual."""
    root = make_project({
        "base": 'kind = "image"\nref = "registry.invalid/base:1"\n',
        "boot": 'kind = "bootstrap"\nmirror = "http://deb.invalid/debian"\nsuite = "bookworm"\n',
        "tools": 'kind = "copy"\nfrom = "tools"\nto = "/opt"\nneeds = ["base"]\n',
        "src": 'kind = "copy"\nfrom = "src"\nto = "/src"\n',
    }, files={"tools/t": "x", "src/main.c": "int main;\n"})
    store = str(tmp_path / "store")
    assert cli.main(["plan", "--json", "-C", str(root), "--store", store]) == 0
    out, err = capsys.readouterr()
    layers = {layer["name"]: layer for layer in json.loads(out)["layers"]}
    assert [sorted(l) for l in layers.values()] == [["inputs", "key", "kind", "name", "needs", "status"]] * 4
    assert {name: (l["status"], l["key"]) for name, l in layers.items() if name != "src"} == {
        "base": ("lock", None), "boot": ("lock", None), "tools": ("lock", None)}
    assert layers["base"]["inputs"] == [{"name": "registry.invalid/base:1", "digest": None}]
    [tools_input] = layers["tools"]["inputs"]
    assert tools_input["name"] == "tools" and tools_input["digest"].startswith("sha256:")
    assert layers["src"]["status"] == "build" and layers["src"]["key"].startswith("sha256:")
    assert "layer 'base': ocibuild.lock has no entry for registry.invalid/base:1" in err and "ocibuild lock" in err
    assert _lock_state(root) is None, "plan must not write ocibuild.lock"
    assert cli.main(["plan", "-C", str(root), "--store", store]) == 0
    assert "lock    needs: base" in capsys.readouterr().out
    # a build cannot go on without the lock: offline, it says so (and touches no network either)
    assert cli.main(["build", "--offline", "-C", str(root), "--store", store]) == 1
    assert "ocibuild.lock has no entry for layer 'base'" in capsys.readouterr().err


def test_plan_leaves_the_lock_alone_while_build_and_lock_write_it(make_project, tmp_path: Path, no_network,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    base_store = Store.open(tmp_path / "base")
    base_root = make_project({"a": 'kind = "copy"\nfrom = "src"\nto = "/"\n'}, root=tmp_path / "base-project",
                             files={"src/etc/os-release": "ID=test\n"})
    _build(base_root, base_store)
    ref = f"oci:{tmp_path / 'base'}:dev"
    root = make_project({"base": f'kind = "image"\nref = "{ref}"\n',
                         "app": 'kind = "copy"\nfrom = "src"\nto = "/app"\nneeds = ["base"]\n'}, files={"src/f": "x"})
    store = str(tmp_path / "store")
    plan = ["plan", "--json", "-C", str(root), "--store", store]

    assert cli.main(plan) == 0
    assert [l["status"] for l in json.loads(capsys.readouterr().out)["layers"]] == ["lock", "lock"]
    assert _lock_state(root) is None
    assert cli.main(["build", "--json", "-C", str(root), "--store", store]) == 0  # build resolves and writes
    built = json.loads(capsys.readouterr().out)
    assert [l["status"] for l in built["layers"]] == ["built", "built"]
    assert 'source = "' + ref in (root / "ocibuild.lock").read_text()
    os.utime(root / "ocibuild.lock", ns=(1_000_000_000, 1_000_000_000))
    locked = _lock_state(root)

    assert cli.main(plan) == 0
    assert [(l["status"], l["key"]) for l in json.loads(capsys.readouterr().out)["layers"]] == \
        [("cached", l["key"]) for l in built["layers"]]
    # the recipe now names another source: the entry is outdated, and plan says so rather than resolving it
    write(root / "layers/base/layer.toml", f'kind = "image"\nref = "{ref}-other"\n')
    assert cli.main(plan) == 0
    assert [l["status"] for l in json.loads(capsys.readouterr().out)["layers"]] == ["lock", "lock"]
    assert _lock_state(root) == locked, "plan must leave ocibuild.lock untouched (bytes and mtime)"
    write(root / "layers/base/layer.toml", f'kind = "image"\nref = "{ref}"\n')
    assert cli.main(["lock", "base", "-C", str(root), "--store", store]) == 0  # lock resolves and writes
    assert f"base: {ref} sha256:" in capsys.readouterr().out
    assert _lock_state(root) == locked, "an unchanged lock is not rewritten"
    assert Store.open(Path(store)).verify() == [] and base_store.verify() == []


def test_a_no_op_build_imports_no_module_that_makes_layers(make_project, tmp_path: Path, store: Store) -> None:
    """Start-up time: a build that finds everything cached (and `plan`) loads neither the layer writer and its
    compressors, nor the builders, the archive code or the container engine."""
    root = _project(make_project, tmp_path)
    _build(root, store)
    argv = ["-C", str(root), "--store", str(store.root)]
    code = ("import sys; from ocibuild import cli\n"
            f"for command in ('plan', 'build'): assert cli.main([command, *{argv!r}]) == 0\n"
            "print(' '.join(sorted(sys.modules)))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    loaded = set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                env=env).stdout.split())
    heavy = {"zstandard", "isal", "python_on_whales", "tempfile", "ocibuild.tar.codecs", "ocibuild.tar.write", "ocibuild.archive",
             "ocibuild.engine", "ocibuild.build", "ocibuild.doctor"}
    assert "ocibuild.planner" in loaded and not loaded & heavy, sorted(loaded & heavy)


def test_bootstrap_builds_the_recipes_architecture_or_refuses_clearly(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """mmdebstrap ran without --architectures, so it built the host's architecture whatever the recipe said. It
    now gets the recipe's (as a Debian name); a foreign one the host cannot run (no qemu binfmt handler) is refused
    before anything is downloaded."""
    from ocibuild.build import bootstrap
    from ocibuild.build.context import BuildContext
    from ocibuild.errors import EngineError
    from ocibuild.oci import Digest, Platform
    from ocibuild.recipe.key import Input
    from ocibuild.recipe.project import LayerRecipe

    binfmt = tmp_path / "binfmt"
    binfmt.mkdir()
    arm64, arm = Platform("linux", "arm64"), Platform("linux", "arm")
    assert bootstrap.debian_architecture(Platform("linux", "amd64"), "x", machine="x86_64", binfmt=binfmt) == "amd64"
    assert bootstrap.debian_architecture(arm64, "x", machine="aarch64", binfmt=binfmt) == "arm64"
    with pytest.raises(EngineError, match=r"^layer 'base': this x86_64 host cannot build arm64 \(architecture "
                                          r"'arm64'\): no binfmt_misc handler qemu-aarch64 is registered") as caught:
        bootstrap.debian_architecture(arm64, "layer 'base'", machine="x86_64", binfmt=binfmt)
    assert "qemu-user-static" in (caught.value.hint or "")
    (binfmt / "qemu-aarch64").write_text("disabled\ninterpreter /usr/bin/qemu-aarch64-static\n")
    with pytest.raises(EngineError):
        bootstrap.debian_architecture(arm64, "x", machine="x86_64", binfmt=binfmt)
    (binfmt / "qemu-aarch64").write_text("enabled\ninterpreter /usr/bin/qemu-aarch64-static\n")
    assert bootstrap.debian_architecture(arm64, "x", machine="x86_64", binfmt=binfmt) == "arm64"
    (binfmt / "qemu-arm").write_text("enabled\n")
    assert bootstrap.debian_architecture(arm, "x", machine="x86_64", binfmt=binfmt) == "armhf"
    with pytest.raises(RecipeError, match="'sparc' has no Debian port"):
        bootstrap.debian_architecture(Platform("linux", "sparc"), "x", machine="x86_64", binfmt=binfmt)

    # the argv mmdebstrap gets: the recipe's architecture, whatever the host
    seen: list[list[str]] = []

    def fake_run(argv: list[str], **_: object) -> None:
        seen.append(list(argv))
        raise RuntimeError("stop here")

    monkeypatch.setattr(bootstrap, "check_release", lambda layer, locked: None)
    monkeypatch.setattr(bootstrap, "run_streaming", fake_run)
    monkeypatch.setattr(bootstrap, "debian_architecture", lambda platform, what: "arm64")
    layer = LayerRecipe("base", "bootstrap", tmp_path / "layer.toml", (), "",
                        {"suite": "bookworm", "mirror": "http://deb.debian.org/debian", "variant": "minbase",
                         "components": ("main",), "packages": (), "deb_src": False})
    ctx = BuildContext(Store.open(tmp_path / "store"), tmp_path, "zstd", 0, False, lambda line: None)
    with pytest.raises(RuntimeError, match="stop here"):
        bootstrap.build_bootstrap(ctx, layer, Input("http://x/InRelease", Digest.of(b"r")), arm64)
    assert "--architectures=arm64" in seen[0]
