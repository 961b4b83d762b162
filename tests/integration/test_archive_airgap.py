"""Air-gapped use end to end: build on a connected machine, export, import into a fresh store, `build --offline`
with nothing rebuilt; skopeo reads our archive and we import skopeo's; podman loads `--image-only`; a delta
export carries only what the other store lacks.

The "connected" machine serves the archive layer's tarball over HTTP from this process; the "air-gapped" one
builds after the server is gone, so any download attempt would fail.
"""

from __future__ import annotations

import functools
import gzip
import http.server
import io
import json
import subprocess
import sys
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import Podman, require, write
from ocibuild import oci
from ocibuild.archive import INPUT_ARTIFACT
from ocibuild.store import Store
from test_run_layers import busybox_rootfs

pytestmark = pytest.mark.podman
OCIBUILD = [sys.executable, "-m", "ocibuild.cli"]
STATUS = 'printf "\\nPackage: {0}\\nArchitecture: amd64\\nStatus: install ok installed\\n" >> /var/lib/dpkg/status\n'


def ocibuild(*args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([*OCIBUILD, *args], capture_output=True, text=True, timeout=600)
    if ok:
        assert result.returncode == 0, f"ocibuild {' '.join(args)}:\n{result.stderr}"
    return result


def build(root: Path, store: Path, *extra: str) -> tuple[dict, str]:
    result = ocibuild("build", "--json", "-C", str(root), "--store", str(store), *extra)
    return json.loads(result.stdout), result.stderr


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """An HTTP server of tmp_path/www: (base URL, directory)."""
    www = tmp_path / "www"
    www.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    handler.log_message = lambda *args: None  # type: ignore[attr-defined]
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", www
    httpd.shutdown()
    httpd.server_close()


def tool_tarball(path: Path) -> str:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for name, data in {"tool/VERSION": b"1.2.3\n", "tool/bin/tool": b"#!/bin/sh\necho tool\n"}.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o755
            tar.addfile(info, io.BytesIO(data))
    path.write_bytes(gzip.compress(raw.getvalue(), mtime=0))
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def devenv(tmp_path: Path, url: str, sha256: str) -> Path:
    """copy (busybox base), archive (over HTTP), two side-by-side run layers (so a merge layer), copy (source)."""
    root = tmp_path / "project"
    busybox_rootfs(root / "rootfs")
    write(root / "ocibuild.toml", '[image]\nname = "devenv"\nlayers = ["base", "tool", "a", "b", "src"]\n'
                                  'workdir = "/src"\n')
    write(root / "layers/base/layer.toml", 'kind = "copy"\nfrom = "rootfs"\nto = "/"\n')
    write(root / "layers/tool/layer.toml", f'kind = "archive"\nurl = "{url}"\nsha256 = "{sha256}"\n'
                                           'dest = "/opt"\n')
    for name in ("a", "b"):
        write(root / f"layers/{name}/layer.toml",
              'kind = "run"\nneeds = ["base", "tool"]\nscript = "s.sh"\nnetwork = false\n')
        write(root / f"layers/{name}/s.sh", STATUS.format(f"tool-{name}") + f"cp /opt/tool/VERSION /opt/{name}\n")
    write(root / "src/main.c", "int main(void) { return 0; }\n")
    write(root / "layers/src/layer.toml", 'kind = "copy"\nfrom = "src"\nto = "/src"\n')
    return root


def tar_names(path: Path) -> set[str]:
    with tarfile.open(path) as tar:
        return {m.name for m in tar.getmembers() if m.isfile()}


def test_air_gapped_round_trip(tmp_path: Path, server: tuple[str, Path], podman: Podman) -> None:
    require("skopeo")
    base_url, www = server
    sha = tool_tarball(www / "tool.tar.gz")
    root = devenv(tmp_path, f"{base_url}/tool.tar.gz", sha)
    connected, airgapped = tmp_path / "connected", tmp_path / "airgapped"
    first, _ = build(root, connected)
    assert [l["status"] for l in first["layers"]] == ["built"] * 5
    archive = tmp_path / "devenv.tar"
    ocibuild("export", str(archive), "-C", str(root), "--store", str(connected))
    names = tar_names(archive)
    assert f"blobs/sha256/{sha}" in names  # the downloaded input travels as an artifact
    _air_gapped(tmp_path, root, archive, www, sha, first)
    _peers(tmp_path, root, archive, connected, first, podman)
    _delta(tmp_path, root, connected, airgapped)


def _air_gapped(tmp_path: Path, root: Path, archive: Path, www: Path, sha: str, first: dict[str, Any]) -> None:
    """The air-gapped machine: no server, nothing to fetch."""
    airgapped = tmp_path / "airgapped"
    assert ocibuild("build", "--offline", "-C", str(root), "--store", str(tmp_path / "empty"), ok=False).returncode == 1
    www.joinpath("tool.tar.gz").unlink()
    imported = json.loads(ocibuild("import", str(archive), "--json", "--store", str(airgapped)).stdout)
    assert "devenv" in imported["tags"] and imported["inputs"] == 1
    second, progress = build(root, airgapped, "--offline")
    assert [l["status"] for l in second["layers"]] == ["cached"] * 5
    assert "building" not in progress and "merging" not in progress  # not even the merge layer
    assert second["digest"] == first["digest"]
    store = Store.open(airgapped)
    assert store.verify() == []
    assert (airgapped / "ocibuild/downloads" / sha).is_file()

    # a layer whose key is missing is rebuilt from the imported input, without network, to the same bytes
    tool_tag = next(d.ref_name for d in store.index().manifests if (d.ref_name or "").startswith("tool-"))
    assert tool_tag is not None and store.untag(tool_tag)
    third, _ = build(root, airgapped, "--offline")
    assert [l["status"] for l in third["layers"]] == ["cached", "built", "cached", "cached", "cached"]
    assert third["digest"] == first["digest"]
    run = ocibuild("run", "--offline", "-C", str(root), "--store", str(airgapped), "--", "cat", "/opt/a", "/opt/b")
    assert run.stdout.split() == ["1.2.3", "1.2.3"]


def _peers(tmp_path: Path, root: Path, archive: Path, connected: Path, first: dict[str, Any], podman: Podman) -> None:
    """skopeo reads our archive, we import skopeo's; podman loads --image-only."""
    skopeo_dir = tmp_path / "skopeo-layout"
    subprocess.run(["skopeo", "--insecure-policy", "copy", "-q", f"oci-archive:{archive}:devenv",
                    f"oci:{skopeo_dir}:devenv"], check=True, timeout=300)
    assert Store.open(skopeo_dir, create=False).resolve("devenv").digest.hex == first["digest"][7:]  # type: ignore[union-attr]
    skopeo_archive = tmp_path / "skopeo.tar"
    subprocess.run(["skopeo", "--insecure-policy", "copy", "-q", f"oci:{connected}:devenv",
                    f"oci-archive:{skopeo_archive}:devenv"], check=True, timeout=300)
    from_skopeo = tmp_path / "from-skopeo"
    ocibuild("import", str(skopeo_archive), "--store", str(from_skopeo))
    assert Store.open(from_skopeo).resolve("devenv").digest.hex == first["digest"][7:]  # type: ignore[union-attr]
    assert Store.open(from_skopeo).verify() == []
    image_only = tmp_path / "image.tar"
    ocibuild("export", "--image-only", str(image_only), "-C", str(root), "--store", str(connected))
    loaded = podman("load", "-i", str(image_only))
    image_id = loaded.stdout.strip().splitlines()[-1].split()[-1]
    out = podman("run", "--rm", "--network=none", image_id, "cat", "/opt/a", "/src/main.c").stdout
    assert out.splitlines() == ["1.2.3", "int main(void) { return 0; }"]


def _delta(tmp_path: Path, root: Path, connected: Path, airgapped: Path) -> None:
    """A source change on the connected side: the export carries only the blobs the air-gapped store lacks."""
    write(root / "src/main.c", "int main(void) { return 1; }\n")
    changed, _ = build(root, connected)
    assert [l["status"] for l in changed["layers"]] == ["cached"] * 4 + ["built"]
    inventory = tmp_path / "inventory.json"
    inventory.write_text(ocibuild("inventory", "--store", str(airgapped)).stdout)
    delta = tmp_path / "delta.tar"
    ocibuild("export", "--since", str(inventory), str(delta), "-C", str(root), "--store", str(connected))
    held = set(json.loads(inventory.read_text())["blobs"])
    source = Store.open(connected)
    with tarfile.open(delta) as tar:
        listed = oci.Index.parse(tar.extractfile("index.json").read())  # type: ignore[union-attr]
    tags = {d.ref_name for d in listed.manifests}
    assert {"devenv", *(f"{l['name']}-{l['key'][7:]}" for l in changed["layers"])} <= tags
    everything = {blob for d in listed.manifests for blob in _closure(source, Store.open(airgapped), d)}
    wanted = {f"blobs/sha256/{blob.hex}" for blob in everything if str(blob) not in held}
    assert tar_names(delta) - {"oci-layout", "index.json"} == wanted
    assert 0 < len(wanted) < len(everything) / 2
    ocibuild("import", str(delta), "--store", str(airgapped))
    fourth, progress = build(root, airgapped, "--offline")
    assert fourth["digest"] == changed["digest"] and "building" not in progress
    assert Store.open(airgapped).verify() == []


def _closure(store: Store, airgapped: Store, descriptor: oci.Descriptor) -> list[oci.Digest]:
    if descriptor.artifact_type == INPUT_ARTIFACT:  # made while exporting (untagged): the full import brought it
        manifest = airgapped.get_manifest(descriptor.digest)
        return [descriptor.digest, manifest.config.digest, *(d.digest for d in manifest.layers)]
    manifest = store.get_manifest(descriptor.digest)
    return [descriptor.digest, manifest.config.digest, *(d.digest for d in manifest.layers)]
