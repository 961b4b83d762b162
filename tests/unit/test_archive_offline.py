"""`--offline` touches no network: missing layers and inputs are errors naming them and how to bring them; the
CLI's export / import / inventory on a small project of copy and archive layers."""

from __future__ import annotations

import gzip
import io
import json
import socket
import tarfile
from pathlib import Path
from typing import Any

import pytest

from conftest import ProjectFactory
from ocibuild import cli, resolve
from ocibuild.inputs import hash_file
from ocibuild.recipe.lock import Lock, LockEntry
from ocibuild.recipe.project import load_project
from ocibuild.oci import Digest
from ocibuild.store import Store


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"network access: {args[:1]}")

    monkeypatch.setattr(socket, "create_connection", refuse)


def _tarball(path: Path) -> str:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        info = tarfile.TarInfo("tool/VERSION")
        info.size = 6
        tar.addfile(info, io.BytesIO(b"1.2.3\n"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(raw.getvalue(), mtime=0))
    return hash_file(path)


def _project(make_project: ProjectFactory, tmp_path: Path) -> tuple[Path, str]:
    sha = _tarball(tmp_path / "tool.tar.gz")
    root = make_project({
        "base": 'kind = "copy"\nfrom = "files"\nto = "/etc"\n',
        "tool": f'kind = "archive"\nurl = "https://example.invalid/tool.tar.gz"\nsha256 = "{sha}"\ndest = "/opt"\n',
    }, files={"files/motd": "hello\n"})
    return root, sha


def _seed_download(store_dir: Path, tmp_path: Path, sha: str) -> None:
    downloads = Store.open(store_dir).private_dir("downloads")
    (downloads / sha).write_bytes((tmp_path / "tool.tar.gz").read_bytes())


def test_missing_input_offline_names_layer_and_remedy(make_project: ProjectFactory, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    root, _ = _project(make_project, tmp_path)
    assert cli.main(["build", "--offline", "-C", str(root), "--store", str(tmp_path / "store")]) == 1
    err = capsys.readouterr().err
    assert "layer 'tool'" in err and "--offline" in err and "import" in err
    assert Store.open(tmp_path / "store").verify() == []


def test_pull_cache_offline_names_missing_layers(make_project: ProjectFactory, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    root, sha = _project(make_project, tmp_path)
    store_dir = tmp_path / "store"
    assert cli.main(["pull-cache", "--offline", "-C", str(root), "--store", str(store_dir)]) == 1
    err = capsys.readouterr().err
    assert "base, tool" in err and "ocibuild export" in err
    _seed_download(store_dir, tmp_path, sha)
    assert cli.main(["build", "--offline", "-C", str(root), "--store", str(store_dir)]) == 0
    assert cli.main(["pull-cache", "--offline", "-C", str(root), "--store", str(store_dir)]) == 0


def test_bootstrap_offline_does_not_fetch_the_release_file(make_project: ProjectFactory, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    root = make_project({"base": 'kind = "bootstrap"\nsuite = "bookworm"\n'})
    project = load_project(root)
    source = resolve.lock_source(project.layers[0])
    assert source is not None
    resolve.write_lock(project, Lock().with_entry(LockEntry("base", source, Digest.of(b"release"))))
    assert cli.main(["build", "--offline", "-C", str(root), "--store", str(tmp_path / "store")]) == 1
    err = capsys.readouterr().err  # the no_network fixture turns any fetch into an AssertionError instead
    assert "layer 'base'" in err and "--offline forbids" in err and "import" in err


def test_cli_export_import_inventory(make_project: ProjectFactory, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    root, sha = _project(make_project, tmp_path)
    connected, airgapped = tmp_path / "connected", tmp_path / "airgapped"
    _seed_download(connected, tmp_path, sha)
    assert cli.main(["build", "--json", "-C", str(root), "--store", str(connected)]) == 0
    built = json.loads(capsys.readouterr().out)
    archive = tmp_path / "devenv.tar"
    assert cli.main(["export", str(archive), "--json", "-C", str(root), "--store", str(connected)]) == 0
    exported = json.loads(capsys.readouterr().out)
    assert exported["inputs"] == [f"sha256:{sha}"] and "dev" in exported["tags"]
    assert cli.main(["import", str(archive), "--store", str(airgapped)]) == 0
    assert "imported" in capsys.readouterr().out
    assert cli.main(["build", "--offline", "--json", "-C", str(root), "--store", str(airgapped)]) == 0
    rebuilt = json.loads(capsys.readouterr().out)
    assert rebuilt["digest"] == built["digest"]
    assert [layer["status"] for layer in rebuilt["layers"]] == ["cached", "cached"]
    assert cli.main(["inventory", "--store", str(airgapped)]) == 0
    inventory = json.loads(capsys.readouterr().out)
    assert built["digest"] in inventory["blobs"] and inventory["tags"]["dev"] == built["digest"]
    assert f"sha256:{sha}" in inventory["inputs"]
    (tmp_path / "inventory.json").write_text(json.dumps(inventory))
    delta = tmp_path / "delta.tar"
    assert cli.main(["export", "--since", str(tmp_path / "inventory.json"), str(delta), "--json", "-C", str(root),
                     "--store", str(connected)]) == 0
    assert json.loads(capsys.readouterr().out)["blobs"] == 0  # the other side holds everything
    assert cli.main(["import", str(delta), "--store", str(airgapped)]) == 0
    for store in (connected, airgapped):
        assert Store.open(store).verify() == []


def test_export_refuses_an_unbuilt_project(make_project: ProjectFactory, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    root, _ = _project(make_project, tmp_path)
    assert cli.main(["export", str(tmp_path / "x.tar"), "-C", str(root), "--store", str(tmp_path / "s")]) == 1
    err = capsys.readouterr().err
    assert "layer 'base'" in err and "ocibuild build" in err
    assert not (tmp_path / "x.tar").exists()


def test_export_all_lists_inputs_untagged_even_where_an_older_import_tagged_them(
        make_project: ProjectFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Archives of earlier versions tagged each input artifact `ocibuild-input-<sha256>`, and importing one kept
    the tag; `export --all` carries the input untagged all the same (a tagged artifact breaks `ctr images import`)."""
    from ocibuild.archive import INPUT_ARTIFACT, downloaded_inputs
    from ocibuild.archive.export import input_artifact

    root, sha = _project(make_project, tmp_path)
    store_dir = tmp_path / "store"
    _seed_download(store_dir, tmp_path, sha)
    assert cli.main(["build", "-C", str(root), "--store", str(store_dir)]) == 0
    store = Store.open(store_dir)
    config, manifest_bytes, manifest = input_artifact(downloaded_inputs(store)[0])
    store.put(config, manifest.config.media_type)
    store.tag(f"ocibuild-input-{sha}", store.put_manifest(manifest))  # as an older import left it
    capsys.readouterr()
    assert cli.main(["export", "--all", str(tmp_path / "all.tar"), "--json", "--store", str(store_dir)]) == 0
    exported = json.loads(capsys.readouterr().out)
    assert exported["inputs"] == [f"sha256:{sha}"] and "dev" in exported["tags"]
    assert not any(tag.startswith("ocibuild-input-") for tag in exported["tags"])
    with tarfile.open(tmp_path / "all.tar") as tar:
        index = json.loads(tar.extractfile("index.json").read())  # type: ignore[union-attr]
    artifacts = [d for d in index["manifests"] if d.get("artifactType") == INPUT_ARTIFACT]
    assert len(artifacts) == 1 and "annotations" not in artifacts[0]
