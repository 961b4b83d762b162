"""End to end through the CLI: what `ocibuild build` writes, skopeo, umoci and podman read; what skopeo writes
(an oci-archive, an oci: directory), an `image` layer reads.

One project with a real `bootstrap` base (mmdebstrap, bookworm minbase), a `copy` and an `archive` layer is built
once per session (`session_image`); the tests read it, copy it, run it and build other projects on top of it.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from conftest import Podman, require, write
from ocibuild import oci
from ocibuild.store import Store
from ocibuild.store.entries import cache_tag

# The session image's base is a bootstrap layer: mmdebstrap reaches Debian's archive, which only e2e tests do.
pytestmark = pytest.mark.e2e

MESSAGE = "hello from copy\n"
TOOL = b"#!/bin/sh\necho tool from archive\n"
CMD_OUTPUT = "hello from copy\ntool from archive\nhello from env\n"
JSON_LAYER_KEYS = ["inputs", "key", "kind", "name", "needs", "status"]


# ---- helpers --------------------------------------------------------------------------------------------------


def ocibuild(*args: str, env: dict[str, str] | None = None, umask: int = -1, cwd: Path | None = None,
             timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run the ocibuild command line in a process of its own (``python -m ocibuild.cli``: the venv's console
    script, without depending on it being in place); it must succeed. No host config file is read."""
    full_env = {**os.environ, "OCIBUILD_CONFIG": "/nonexistent/ocibuild-config.toml", **(env or {})}
    result = subprocess.run([sys.executable, "-m", "ocibuild.cli", *args], capture_output=True, text=True,
                            env=full_env, umask=umask, cwd=cwd, timeout=timeout)
    assert result.returncode == 0, f"ocibuild {' '.join(args)} exited {result.returncode}:\n{result.stderr[-4000:]}"
    return result


def ocibuild_json(*args: str, **kw: Any) -> dict[str, Any]:
    """``ocibuild … --json``: stdout is exactly one JSON document."""
    doc: dict[str, Any] = json.loads(ocibuild(*args, "--json", **kw).stdout)
    return doc


def verify_clean(store: Path) -> None:
    """`ocibuild verify` exits 0 (it runs Store.verify: every blob re-hashed, every reference checked)."""
    assert ocibuild("verify", "--store", str(store)).stdout.strip() == f"store {store}: ok"


def run(*argv: str, timeout: float = 300) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(argv)} exited {result.returncode}:\n{result.stderr}"
    return result.stdout


def skopeo(*args: str) -> str:
    return run(require("skopeo"), "--insecure-policy", *args)


def skopeo_json(*args: str) -> Any:
    return json.loads(skopeo(*args))


def tarball(files: dict[str, tuple[bytes, int]]) -> bytes:
    """A .tar.gz (bytes, reproducible) of ``files``: path → (content, mode), owned by a named user 1000:1000."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tf:
        dirs = sorted({str(Path(p).parents[i]) for p in files for i in range(len(Path(p).parts) - 1)})
        for name in dirs:
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.uid, info.gid, info.uname = tarfile.DIRTYPE, 0o750, 1000, 1000, "someone"
            tf.addfile(info)
        for name, (data, mode) in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.uid, info.gid, info.uname = len(data), mode, 1000, 1000, "someone"
            tf.addfile(info, io.BytesIO(data))
    return gzip.compress(raw.getvalue(), mtime=0)


TOOL_TARBALL = tarball({"tool/bin/tool": (TOOL, 0o750), "tool/README": (b"a tool\n", 0o640)})


def write_small_layers(root: Path, umask: int = 0o022) -> None:
    """The copy layer `files` and the archive layer `tool` of a project, created honouring ``umask``."""
    write(root / "layers/files/layer.toml", 'kind = "copy"\nfrom = "files"\nto = "/srv/app"\n')
    write(root / "files/message.txt", MESSAGE, 0o600)
    write(root / "files/sub/run.sh", "#!/bin/sh\necho run\n", 0o777 & ~umask)
    write(root / "files/private/note.txt", "private\n", 0o600)
    (root / "files/private").chmod(0o700)
    (root / "files/link").symlink_to("message.txt")
    write(root / "files/scratch.tmp", "left out\n")
    write(root / "files/.containerignore", "*.tmp\n")
    (root / "layers/tool").mkdir(parents=True, exist_ok=True)
    (root / "layers/tool/tool.tar.gz").write_bytes(TOOL_TARBALL)
    sha = hashlib.sha256(TOOL_TARBALL).hexdigest()
    write(root / "layers/tool/layer.toml", f'kind = "archive"\nurl = "tool.tar.gz"\nsha256 = "{sha}"\ndest = "/opt"\n')


IMAGE_TOML = """\
[image]
name = "{name}"
layers = [{layers}]
compression = "gzip"
env = {{ GREETING = "hello from env", PATH = "/usr/local/bin:/usr/bin:/bin" }}
workdir = "/srv/app"
cmd = ["/bin/sh", "-c", "cat message.txt && /opt/tool/bin/tool && echo \\"$GREETING\\""]
"""


def cache_entry_diff_ids(store: Store, layer: dict[str, Any]) -> list[oci.Digest]:
    descriptor = store.resolve(cache_tag(layer["name"], oci.Digest.parse(layer["key"])))
    assert descriptor is not None, f"no cache entry for layer {layer['name']}"
    return list(store.get_config(store.get_manifest(descriptor.digest).config.digest).diff_ids)


# ---- the session's image ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SessionImage:
    root: Path
    store: Path
    name: str
    doc: dict[str, Any]  # `build --json` of the first build

    @property
    def digest(self) -> str:
        return str(self.doc["digest"])

    @property
    def ref(self) -> str:
        return f"oci:{self.store}:{self.name}"


@pytest.fixture(scope="session")
def session_image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SessionImage]:
    """bootstrap (bookworm minbase) + copy + archive, gzip, built once through the CLI into its own store."""
    require("mmdebstrap")
    base = tmp_path_factory.mktemp("session-image")
    root, store = base / "project", base / "store"
    write(root / "ocibuild.toml", IMAGE_TOML.format(name="interop", layers='"base", "files", "tool"'))
    write(root / "layers/base/layer.toml", 'kind = "bootstrap"\nsuite = "bookworm"\nvariant = "minbase"\n')
    write_small_layers(root)
    doc = ocibuild_json("build", "-C", str(root), "--store", str(store))
    assert [l["status"] for l in doc["layers"]] == ["built"] * 3
    yield SessionImage(root, store, "interop", doc)
    verify_clean(store)


# ---- what we wrote, skopeo / umoci / podman read ------------------------------------------------------------------


def test_skopeo_inspects_and_copies_the_image(session_image: SessionImage, tmp_path: Path) -> None:
    store = Store.open(session_image.store, create=False)
    manifest = store.get_manifest(oci.Digest.parse(session_image.digest))
    expected_diff_ids = [str(d) for layer in session_image.doc["layers"] for d in cache_entry_diff_ids(store, layer)]

    info = skopeo_json("inspect", session_image.ref)
    assert info["Digest"] == session_image.digest
    assert info["Layers"] == [str(l.digest) for l in manifest.layers] and len(info["Layers"]) == 3
    assert info["Env"] == ["GREETING=hello from env", "PATH=/usr/local/bin:/usr/bin:/bin"]
    assert (info["Architecture"], info["Os"]) == ("amd64", "linux")
    raw = skopeo_json("inspect", "--raw", session_image.ref)
    assert [l["mediaType"] for l in raw["layers"]] == [oci.LAYER_GZIP] * 3
    config = skopeo_json("inspect", "--config", session_image.ref)
    assert config["rootfs"]["diff_ids"] == expected_diff_ids
    assert config["config"]["WorkingDir"] == "/srv/app"
    assert config["config"]["Cmd"][:2] == ["/bin/sh", "-c"]
    assert len(config["history"]) == 3 and "'base'" in config["history"][0]["created_by"]
    # each diff_id is the sha256 of the uncompressed blob, as every reader checks
    for descriptor, diff_id in zip(manifest.layers, expected_diff_ids):
        with store.open_blob(descriptor.digest, size=descriptor.size) as blob, gzip.open(blob) as plain:
            sha = hashlib.sha256()
            while chunk := plain.read(1 << 20):
                sha.update(chunk)
        assert f"sha256:{sha.hexdigest()}" == diff_id

    skopeo("copy", "--quiet", session_image.ref, f"oci:{tmp_path / 'other'}:copied")
    other = Store.open(tmp_path / "other", create=False)
    copied = other.resolve("copied")
    assert copied is not None and str(copied.digest) == session_image.digest  # blobs copied as they are
    assert other.verify() == []
    verify_clean(session_image.store)


def test_umoci_unpacks_owners_and_normalised_modes(session_image: SessionImage, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    try:
        run(require("umoci"), "unpack", "--image", f"{session_image.store}:{session_image.name}", str(bundle))
        rootfs = bundle / "rootfs"

        def owner_mode(rel: str) -> tuple[int, int, int]:
            st = (rootfs / rel).lstat()
            return st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)

        assert (rootfs / "etc/debian_version").read_text().startswith("12")
        assert (rootfs / "srv/app/message.txt").read_text() == MESSAGE
        # copy: owners 0:0, modes normalised whatever the checkout had (0600 file, 0700 dir)
        assert owner_mode("srv/app/message.txt") == (0, 0, 0o644)
        assert owner_mode("srv/app/sub/run.sh") == (0, 0, 0o755)
        assert owner_mode("srv/app/private") == (0, 0, 0o755)
        assert owner_mode("srv/app/private/note.txt") == (0, 0, 0o644)
        assert owner_mode("srv/app") == (0, 0, 0o755) and owner_mode("srv") == (0, 0, 0o755)
        assert os.readlink(rootfs / "srv/app/link") == "message.txt"
        assert not (rootfs / "srv/app/scratch.tmp").exists()  # .containerignore honoured
        # archive: owners 0:0 (the tarball's are 1000:1000), modes kept, parents made 0755
        assert (rootfs / "opt/tool/bin/tool").read_bytes() == TOOL
        assert owner_mode("opt/tool/bin/tool") == (0, 0, 0o750)
        assert owner_mode("opt/tool/README") == (0, 0, 0o640)
        assert owner_mode("opt") == (0, 0, 0o755)
    finally:
        shutil.rmtree(bundle, ignore_errors=True)
    verify_clean(session_image.store)


@pytest.mark.podman
def test_podman_runs_the_image_from_the_store(session_image: SessionImage, podman: Podman) -> None:
    assert podman("run", "--rm", "--quiet", "--network=none", session_image.ref).stdout == CMD_OUTPUT
    out = podman("run", "--rm", "--quiet", "--network=none", session_image.ref, "cat", "/etc/debian_version").stdout
    assert out.startswith("12.")
    assert podman("run", "--rm", "--quiet", "--network=none", session_image.ref, "pwd").stdout == "/srv/app\n"
    verify_clean(session_image.store)


@pytest.mark.podman
def test_output_oci_archive_is_read_by_skopeo_and_podman_load(session_image: SessionImage, tmp_path: Path,
                                                               podman: Podman) -> None:
    archive = tmp_path / "out" / "interop.tar"
    archive.parent.mkdir()
    doc = ocibuild_json("build", "-C", str(session_image.root), "--store", str(session_image.store),
                        "--output", f"oci-archive:{archive}")
    assert doc["digest"] == session_image.digest
    assert sorted(p.name for p in archive.parent.iterdir()) == ["interop.tar"]  # no temporary file left

    assert skopeo_json("inspect", f"oci-archive:{archive}")["Digest"] == session_image.digest
    assert skopeo_json("inspect", f"oci-archive:{archive}:interop")["Digest"] == session_image.digest
    loaded = podman("load", "--quiet", "-i", str(archive)).stdout
    assert "localhost/interop:latest" in loaded, loaded
    assert podman("run", "--rm", "--network=none", "localhost/interop:latest").stdout == CMD_OUTPUT
    verify_clean(session_image.store)


# ---- what skopeo wrote, an `image` layer reads -------------------------------------------------------------------


def image_project(root: Path, ref: str) -> Path:
    """``base`` (kind image, ``ref``) with a copy layer on top that needs it."""
    write(root / "ocibuild.toml", '[image]\nname = "derived"\nlayers = ["base", "top"]\ncompression = "gzip"\n'
                                  'cmd = ["cat", "/srv/app/message.txt", "/srv/top/top.txt"]\n')
    write(root / "layers/base/layer.toml", f'kind = "image"\nref = "{ref}"\n')
    write(root / "layers/top/layer.toml", 'kind = "copy"\nfrom = "top"\nto = "/srv/top"\nneeds = ["base"]\n')
    write(root / "top/top.txt", "hello from top\n")
    return root


def locked(root: Path) -> dict[str, Any]:
    entries: dict[str, Any] = tomllib.loads((root / "ocibuild.lock").read_text())["layers"]
    return entries


@pytest.mark.podman
@pytest.mark.parametrize("ref", ["oci-archive:base.tar", "oci:layout:v1"])
def test_image_layer_from_what_skopeo_wrote(session_image: SessionImage, tmp_path: Path, store: Store,
                                            podman: Podman, ref: str) -> None:
    root = image_project(tmp_path / "project", ref)
    target = "oci-archive:" + str(root / "layers/base/base.tar") if ref.startswith("oci-archive:") \
        else f"oci:{root / 'layers/base/layout'}:v1"
    skopeo("copy", "--quiet", session_image.ref, target)

    doc = ocibuild_json("build", "-C", str(root), "--store", str(store.root))
    assert [(l["name"], l["kind"], l["status"]) for l in doc["layers"]] == [("base", "image", "built"),
                                                                          ("top", "copy", "built")]
    assert doc["layers"][0]["inputs"] == [{"name": ref, "digest": session_image.digest}]
    assert locked(root) == {"base": {"source": ref, "platform": "linux/amd64", "digest": session_image.digest}}
    info = skopeo_json("inspect", f"oci:{store.root}:derived")
    assert info["Layers"][:3] == skopeo_json("inspect", session_image.ref)["Layers"] and len(info["Layers"]) == 4

    out = podman("run", "--rm", "--quiet", "--network=none", f"oci:{store.root}:derived").stdout
    assert out == MESSAGE + "hello from top\n"
    out = podman("run", "--rm", "--quiet", "--network=none", f"oci:{store.root}:derived",
                 "cat", "/etc/debian_version").stdout
    assert out.startswith("12.")

    again = ocibuild_json("build", "-C", str(root), "--store", str(store.root))
    assert [l["status"] for l in again["layers"]] == ["cached", "cached"] and again["digest"] == doc["digest"]
    verify_clean(store.root)


def test_a_retagged_oci_dir_moves_the_plan_only_after_lock(session_image: SessionImage, tmp_path: Path,
                                                           store: Store) -> None:
    root = image_project(tmp_path / "project", "oci:layout:v1")
    layout = root / "layers/base/layout"
    skopeo("copy", "--quiet", session_image.ref, f"oci:{layout}:v1")
    first = ocibuild_json("build", "-C", str(root), "--store", str(store.root))
    keys = [l["key"] for l in first["layers"]]

    # another image under the same tag: umoci writes a new config and manifest and moves v1 to it
    run(require("umoci"), "config", "--image", f"{layout}:v1", "--config.env", "CHANGED=1")
    moved = Store.open(layout, create=False).resolve("v1")
    assert moved is not None and str(moved.digest) != session_image.digest

    plan = ocibuild_json("plan", "-C", str(root), "--store", str(store.root))
    assert [(l["key"], l["status"]) for l in plan["layers"]] == [(k, "cached") for k in keys]
    again = ocibuild_json("build", "-C", str(root), "--store", str(store.root))
    assert [l["status"] for l in again["layers"]] == ["cached", "cached"] and again["digest"] == first["digest"]
    assert locked(root)["base"]["digest"] == session_image.digest

    lock_out = ocibuild("lock", "-C", str(root)).stdout
    assert f"base: oci:layout:v1 {moved.digest}" in lock_out
    assert locked(root)["base"]["digest"] == str(moved.digest)
    plan = ocibuild_json("plan", "-C", str(root), "--store", str(store.root))
    assert plan["layers"][0]["key"] != keys[0] and plan["layers"][1]["key"] != keys[1]  # top needs base
    assert [l["status"] for l in plan["layers"]] == ["build", "build"]
    rebuilt = ocibuild_json("build", "-C", str(root), "--store", str(store.root))
    assert [l["status"] for l in rebuilt["layers"]] == ["built", "built"]
    assert rebuilt["layers"][0]["inputs"][0]["digest"] == str(moved.digest)
    assert rebuilt["digest"] != first["digest"]
    verify_clean(store.root)


# ---- reproducibility and the no-op build -------------------------------------------------------------------------


def test_reproducible_across_paths_mtimes_umask_and_stores(tmp_path: Path) -> None:
    """copy + archive from two copies of a project (other path, mtimes, umask) into two stores: one digest."""
    results = []
    for i, (umask, where) in enumerate([(0o022, "a/project"), (0o002, "b/deeper/other-name")]):
        old = os.umask(umask)
        try:
            root = tmp_path / where
            write(root / "ocibuild.toml", IMAGE_TOML.format(name="small", layers='"files", "tool"'))
            write_small_layers(root, umask)
        finally:
            os.umask(old)
        for path in [root, *root.rglob("*")]:
            os.utime(path, (1_000_000_000 + i * 12345, 1_000_000_000 + i * 12345), follow_symlinks=False)
        store = tmp_path / f"store{i}"
        env = {"OCIBUILD_STORE": str(store)}
        doc = ocibuild_json("build", "-C", str(root), env=env, umask=umask, cwd=tmp_path)
        assert [l["status"] for l in doc["layers"]] == ["built", "built"]
        manifest = Store.open(store, create=False).get_manifest(oci.Digest.parse(doc["digest"]))
        results.append((doc["digest"], [l["key"] for l in doc["layers"]], [str(l.digest) for l in manifest.layers]))
        assert ocibuild("verify", env=env).returncode == 0
        assert Store.open(store, create=False).verify() == []
    assert results[0] == results[1]


def test_noop_build_reports_every_layer_cached(session_image: SessionImage) -> None:
    result = ocibuild("build", "--json", "-C", str(session_image.root), "--store", str(session_image.store))
    doc = json.loads(result.stdout)  # stdout is exactly one JSON document; progress went to stderr
    assert sorted(doc) == ["digest", "image", "layers"]
    assert doc["image"] == "interop" and doc["digest"] == session_image.digest
    assert [sorted(l) for l in doc["layers"]] == [JSON_LAYER_KEYS] * 3
    assert [(l["name"], l["kind"], l["status"]) for l in doc["layers"]] == [
        ("base", "bootstrap", "cached"), ("files", "copy", "cached"), ("tool", "archive", "cached")]
    assert [l["key"] for l in doc["layers"]] == [l["key"] for l in session_image.doc["layers"]]
    assert "building layer" not in result.stderr
    verify_clean(session_image.store)
