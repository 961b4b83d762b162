"""The interop matrix: every artefact ocibuild writes, with zstd and with gzip layers, read by every common client,
each cell run for real.

Artefacts: the store (`oci:STORE:IMAGE`), a full `ocibuild export` (cache entries, the image and a downloaded input),
`export --image-only`, the image pushed to a registry, and a cache entry (in the store and in the registry cache).
Clients: skopeo (inspect, copy), podman (pull or load, run), buildah (from, run; a cache entry: `FROM` it in
`buildah bud`), umoci (stat, unpack), containerd's ctr (import or pull, run; its own daemon under the test's tmp
dir) and oras-py (fetch). A cell that cannot work for a reason outside ocibuild is in :data:`LIMITS` with that
reason; the README shows :func:`matrix_markdown` (a test keeps the two equal).

The project: a busybox root filesystem (a copy layer, ``base``) and a tarball fetched over HTTP (an archive layer,
``tool``), so a full export carries a downloaded input. Podman and buildah work on the session's own storage
(``podman_storage``), ctr on a daemon of its own, stopped at the end; nothing is left in the host's.

The other direction closes the module: what the clients write (a layer `umoci insert` made, an archive `podman
save` tagged `localhost/bb-amd64:1`), ocibuild builds on.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import http.server
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from conftest import PodmanStorage, RegistryServer, require, write
from ocibuild import oci
from ocibuild.store import Store
from ocibuild.store.entries import cache_tag
from test_run_layers import busybox_rootfs

ARTEFACTS = {
    "store": "the store, `oci:STORE:IMAGE`",
    "export": "a full `ocibuild export` (entries, image, downloaded inputs)",
    "image-only": "`ocibuild export --image-only`",
    "registry": "the image after `ocibuild push`",
    "entry": "a cache entry (`oci:STORE:<name>-<key>`, and after `push-cache`)",
}
CLIENTS = {
    "skopeo": "inspect, copy",
    "podman": "pull or load, run",
    "buildah": "from, run",
    "umoci": "stat, unpack",
    "ctr": "import or pull, run",
    "oras": "fetch",
}
COMPRESSIONS = ("zstd", "gzip")
ALL = "*"
_NO_DOCKER_ZSTD = "no copy to `docker-archive:`: Docker archives have no zstd layers"
_UMOCI_ZSTD = "stat only: umoci 0.4 cannot unpack zstd layers"
_REGISTRY_ONLY = "oras-py reads registries only"
# (artefact, client, compression or ALL) → what that cell leaves out, and why (always a reason outside ocibuild)
LIMITS = {
    ("store", "ctr", ALL): "ctr reads no layout directory (its content is the export cells')",
    ("store", "oras", ALL): _REGISTRY_ONLY,
    ("export", "oras", ALL): _REGISTRY_ONLY,
    ("image-only", "oras", ALL): _REGISTRY_ONLY,
    ("registry", "umoci", ALL): "umoci reads OCI layouts only",
    **{(artefact, "skopeo", "zstd"): _NO_DOCKER_ZSTD for artefact in ARTEFACTS},
    **{(artefact, "umoci", "zstd"): _UMOCI_ZSTD for artefact in ("store", "export", "image-only", "entry")},
}
CELLS = [(a, c) for a in ARTEFACTS for c in CLIENTS if (a, c, ALL) not in LIMITS]
IMAGE = "bb"
MOTD = "old\n"  # /etc/motd of the busybox root filesystem
VERSION = "1.2.3\n"  # /opt/tool/VERSION, from the tarball


def matrix_markdown() -> str:
    """The matrix as the README shows it: ✓ where every action of the client works with both compressions."""
    notes: list[str] = []

    def mark(artefact: str, client: str) -> str:
        whole = LIMITS.get((artefact, client, ALL))
        parts = [f"zstd: {LIMITS[(artefact, client, 'zstd')]}"] if (artefact, client, "zstd") in LIMITS else []
        if whole is None and not parts:
            return "✓"
        text = whole or "; ".join(parts)
        if text not in notes:
            notes.append(text)
        number = notes.index(text) + 1
        return f"— ({number})" if whole else f"✓ ({number})"

    lines = ["| artefact | " + " | ".join(f"{c} ({a})" for c, a in CLIENTS.items()) + " |",
             "|---|" + "---|" * len(CLIENTS)]
    for artefact, what in ARTEFACTS.items():
        lines.append(f"| {what} | " + " | ".join(mark(artefact, c) for c in CLIENTS) + " |")
    lines.append("")
    lines += [f"({i}) {note}" for i, note in enumerate(notes, 1)]
    return "\n".join(lines) + "\n"


def test_the_readme_shows_this_matrix() -> None:
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    assert matrix_markdown() in readme, "README.md must show matrix_markdown() of this module:\n" + matrix_markdown()


# ---- helpers ----------------------------------------------------------------------------------------------------


def run(*argv: str, timeout: float = 300, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
    assert result.returncode == 0, f"{' '.join(argv)} exited {result.returncode}:\n{result.stderr[-3000:]}"
    return result.stdout


def skopeo(*args: str) -> str:
    return run(require("skopeo"), "--insecure-policy", *args)


def _isolated_env(base: Path) -> dict[str, str]:
    """No credentials or config of the host for ocibuild and the clients it starts."""
    home = base / "home"
    home.mkdir(exist_ok=True)
    return {**os.environ, "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"),
            "OCIBUILD_CONFIG": str(home / "ocibuild.toml"), "REGISTRY_AUTH_FILE": "", "DOCKER_CONFIG": ""}


def ocibuild(env: dict[str, str], *args: str) -> Any:
    return json.loads(run(sys.executable, "-m", "ocibuild.cli", *args, "--json", timeout=600, env=env))


def _tool_tarball() -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        info = tarfile.TarInfo("tool/VERSION")
        info.size = len(VERSION)
        tar.addfile(info, io.BytesIO(VERSION.encode()))
    return gzip.compress(raw.getvalue(), mtime=0)


@contextlib.contextmanager
def _serving(directory: Path) -> Iterator[str]:
    """An HTTP server on loopback for the files of ``directory``; yields its base URL."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@dataclass(frozen=True)
class Built:
    """What one build left, for one compression: the store, the archives, and the refs in the registry."""

    compression: str
    store: Path
    export: Path
    image_only: Path
    image_digest: str
    entry: str  # the tag of the base layer's cache entry (a busybox root filesystem)
    entry_digest: str
    pushed: str  # registry/repository:tag of the image
    cache: str  # registry/repository of the registry cache

    def digest(self, artefact: str) -> str:
        return self.entry_digest if artefact == "entry" else self.image_digest

    def command(self, artefact: str) -> tuple[list[str], str]:
        """What to run in the artefact's image, and what it prints."""
        if artefact == "entry":
            return ["cat", "/etc/motd"], MOTD
        return ["cat", "/etc/motd", "/opt/tool/VERSION"], MOTD + VERSION


def _build(compression: str, registry: RegistryServer, base: Path) -> Built:
    """Build the project with ``compression`` layers, export it both ways, push the image and the cache."""
    root, store = base / "project", base / "store"
    env = _isolated_env(base)
    busybox_rootfs(root / "rootfs")
    (base / "www").mkdir()
    (base / "www/tool.tar.gz").write_bytes(_tool_tarball())
    sha = hashlib.sha256(_tool_tarball()).hexdigest()
    write(root / "ocibuild.toml", f'[image]\nname = "{IMAGE}"\nlayers = ["base", "tool"]\n'
                                  f'compression = "{compression}"\nsource_date_epoch = 1700000000\n')
    write(root / "layers/base/layer.toml", 'kind = "copy"\nfrom = "rootfs"\nto = "/"\n')
    with _serving(base / "www") as url:
        write(root / "layers/tool/layer.toml",
              f'kind = "archive"\nurl = "{url}/tool.tar.gz"\nsha256 = "{sha}"\ndest = "/opt"\n')
        doc = ocibuild(env, "build", "-C", str(root), "--store", str(store))
    export, image_only = base / "export.tar", base / "image-only.tar"
    exported = ocibuild(env, "export", str(export), "-C", str(root), "--store", str(store))
    assert exported["inputs"] == [f"sha256:{sha}"]
    ocibuild(env, "export", "--image-only", str(image_only), "-C", str(root), "--store", str(store))
    pushed, cache = f"{registry.host}/matrix-{compression}/{IMAGE}:1", f"{registry.host}/matrix-{compression}/cache"
    ocibuild(env, "push", pushed, "-C", str(root), "--store", str(store))
    ocibuild(env, "push-cache", cache, "-C", str(root), "--store", str(store))
    entry = cache_tag("base", oci.Digest.parse(doc["layers"][0]["key"]))
    descriptor = Store.open(store, create=False).resolve(entry)
    assert descriptor is not None
    return Built(compression, store, export, image_only, doc["digest"], entry, str(descriptor.digest), pushed, cache)


@pytest.fixture(scope="module")
def builds(registry: RegistryServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Built]]:
    """One build per compression, made when a cell first needs it; every store verifies clean at the end."""
    class Builds(dict[str, Built]):
        def __missing__(self, compression: str) -> Built:
            self[compression] = _build(compression, registry, tmp_path_factory.mktemp(f"matrix-{compression}"))
            return self[compression]

    builds = Builds()
    yield builds
    for built in builds.values():
        assert Store.open(built.store, create=False).verify() == []


@pytest.fixture
def built(request: pytest.FixtureRequest, builds: dict[str, Built]) -> Built:
    return builds[request.param]


def _cell(client: str) -> Any:
    """Parametrize a client's test over its cells: (the build of a compression, artefact)."""
    cells = [pytest.param(c, a, id=f"{a}-{c}") for c in COMPRESSIONS for a, cl in CELLS if cl == client]
    return pytest.mark.parametrize(("built", "artefact"), cells, indirect=["built"])


def _limited(built: Built, artefact: str, client: str) -> bool:
    return (artefact, client, built.compression) in LIMITS


# ---- skopeo -----------------------------------------------------------------------------------------------------


def _skopeo_refs(built: Built, artefact: str) -> list[str]:
    return {
        "store": [f"oci:{built.store}:{IMAGE}"],
        "export": [f"oci-archive:{built.export}:{IMAGE}"],
        "image-only": [f"oci-archive:{built.image_only}"],
        "registry": [f"docker://{built.pushed}"],
        "entry": [f"oci:{built.store}:{built.entry}", f"docker://{built.cache}:{built.entry}"],
    }[artefact]


@_cell("skopeo")
def test_skopeo(built: Built, artefact: str, tmp_path: Path) -> None:
    """inspect (digest, platform), copy to a layout (the same manifest), and to a Docker archive (gzip)."""
    for i, ref in enumerate(_skopeo_refs(built, artefact)):
        tls = ["--tls-verify=false"] if ref.startswith("docker://") else []
        info = json.loads(skopeo("inspect", *tls, ref))
        assert (info["Digest"], info["Os"], info["Architecture"]) == (built.digest(artefact), "linux", "amd64")
        tls = ["--src-tls-verify=false"] if tls else []
        skopeo("copy", "-q", *tls, ref, f"oci:{tmp_path / f'copy{i}'}:copied")
        copied = Store.open(tmp_path / f"copy{i}", create=False)
        assert str(copied.resolve("copied").digest) == built.digest(artefact)  # type: ignore[union-attr]
        assert copied.verify() == []
        if not _limited(built, artefact, "skopeo"):
            skopeo("copy", "-q", *tls, ref, f"docker-archive:{tmp_path / f'docker{i}.tar'}:matrix/copied:1")
            docker = json.loads(skopeo("inspect", f"docker-archive:{tmp_path / f'docker{i}.tar'}"))
            assert len(docker["Layers"]) == len(info["Layers"])


# ---- podman -----------------------------------------------------------------------------------------------------


@pytest.mark.podman
@_cell("podman")
def test_podman(built: Built, artefact: str, request: pytest.FixtureRequest) -> None:
    """pull (a full export: by its tag; `podman load` of podman 4.3 takes one manifest) or load, then run."""
    podman = request.getfixturevalue("podman")
    if artefact == "image-only":
        image = podman("load", "-q", "-i", str(built.image_only)).stdout.strip().split()[-1]
    else:
        ref = {"store": f"oci:{built.store}:{IMAGE}", "export": f"oci-archive:{built.export}:{IMAGE}",
               "registry": built.pushed, "entry": f"oci:{built.store}:{built.entry}"}[artefact]
        tls = ["--tls-verify=false"] if artefact == "registry" else []
        image = podman("pull", "-q", *tls, ref).stdout.strip()
    try:
        command, expected = built.command(artefact)
        assert podman("run", "--rm", "--network=none", image, *command).stdout == expected
        digest = podman("image", "inspect", "--format", "{{.Digest}}", image).stdout.strip()
        assert digest == built.digest(artefact)
    finally:
        podman("rmi", "--force", image)


# ---- buildah ----------------------------------------------------------------------------------------------------


def _buildah(storage: PodmanStorage) -> list[str]:
    """buildah on the session's podman storage (its --root and --runroot), so the podman fixture cleans it."""
    flags = dict(zip(storage.flags[::2], storage.flags[1::2]))
    return [require("buildah"), "--root", flags["--root"], "--runroot", flags["--runroot"]]


@pytest.mark.podman
@_cell("buildah")
def test_buildah(built: Built, artefact: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """from, run; a cache entry copied into containers-storage is FROM in `buildah bud --layers` with RUN steps."""
    storage: PodmanStorage = request.getfixturevalue("podman_storage")
    buildah = _buildah(storage)
    if artefact == "entry":
        _buildah_builds_on_an_entry(built, buildah, storage, tmp_path)
        return
    ref = {"store": f"oci:{built.store}:{IMAGE}", "export": f"oci-archive:{built.export}:{IMAGE}",
           "image-only": f"oci-archive:{built.image_only}", "registry": f"docker://{built.pushed}"}[artefact]
    tls = ["--tls-verify=false"] if artefact == "registry" else []
    container = run(*buildah, "from", "-q", *tls, ref).strip()
    try:
        image = run(*buildah, "inspect", "--format", "{{.FromImageID}}", container).strip()
        command, expected = built.command(artefact)
        assert run(*buildah, "run", "--network", "none", container, "--", *command) == expected
    finally:
        run(*buildah, "rm", container)
    run(*buildah, "rmi", "--force", image)


def _buildah_builds_on_an_entry(built: Built, buildah: list[str], storage: PodmanStorage, tmp_path: Path) -> None:
    flags = dict(zip(storage.flags[::2], storage.flags[1::2]))
    driver = run(require("podman"), *storage.flags, "info", "--format", "{{.Store.GraphDriverName}}").strip()
    name = f"localhost/matrix-entry-{built.compression}"
    skopeo("copy", "-q", f"oci:{built.store}:{built.entry}",
           f"containers-storage:[{driver}@{flags['--root']}+{flags['--runroot']}]{name}")
    write(tmp_path / "Containerfile", f"FROM {name}\nRUN echo built > /built\nRUN cat /etc/motd /built\n")
    try:
        out = run(*buildah, "bud", "--layers", "--pull-never", "--network", "none", "-t", f"{name}-on-top",
                  str(tmp_path))
        assert MOTD + "built\n" in out
    finally:
        subprocess.run([*buildah, "rmi", "--force", f"{name}-on-top", name], capture_output=True, timeout=300)


# ---- umoci ------------------------------------------------------------------------------------------------------


@_cell("umoci")
def test_umoci(built: Built, artefact: str, tmp_path: Path) -> None:
    """stat (it needs every history entry's `created`) and unpack (gzip: umoci 0.4 has no zstd)."""
    layout, tag = built.store, built.entry if artefact == "entry" else IMAGE
    if artefact in ("export", "image-only"):
        layout = tmp_path / "layout"
        layout.mkdir()
        run("tar", "-xf", str(built.export if artefact == "export" else built.image_only), "-C", str(layout))
    umoci = require("umoci")
    assert "ocibuild" in run(umoci, "stat", "--image", f"{layout}:{tag}")  # panicked on history without `created`
    stat = json.loads(run(umoci, "stat", "--json", "--image", f"{layout}:{tag}"))
    layers = 1 if artefact == "entry" else 2
    assert len(stat["history"]) == layers and all(h["created"] == "2023-11-14T22:13:20Z" for h in stat["history"])
    if _limited(built, artefact, "umoci"):
        return
    bundle = tmp_path / "bundle"
    try:
        run(umoci, "unpack", "--image", f"{layout}:{tag}", str(bundle))
        command, expected = built.command(artefact)
        assert "".join((bundle / "rootfs" / path.lstrip("/")).read_text() for path in command[1:]) == expected
    finally:
        shutil.rmtree(bundle, ignore_errors=True)


# ---- containerd's ctr -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Containerd:
    base: Path
    socket: Path

    def ctr(self, namespace: str, *args: str) -> str:
        return run(require("ctr"), "--address", str(self.socket), "--namespace", namespace, *args)


@pytest.fixture(scope="module")
def containerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Containerd]:
    """containerd with its own root, state and sockets under a tmp dir (no CRI), stopped at the end."""
    exe = require("containerd")
    base = tmp_path_factory.mktemp("ctr")  # short: a unix socket path has at most 107 characters
    config = base / "config.toml"
    config.write_text(f'version = 2\nroot = "{base}/root"\nstate = "{base}/state"\n'
                      'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
                      f'[grpc]\naddress = "{base}/c.sock"\n[ttrpc]\naddress = "{base}/c.sock.ttrpc"\n'
                      f'[plugins."io.containerd.internal.v1.opt"]\npath = "{base}/opt"\n')
    shim_sockets = Path("/run/containerd/s")  # where containerd 1.6 puts shim sockets, whatever its state dir
    made = [p for p in (shim_sockets.parent, shim_sockets) if not p.exists()]
    with open(base / "containerd.log", "wb") as log:
        process = subprocess.Popen([exe, "--config", str(config)], stdout=log, stderr=subprocess.STDOUT)
    daemon = Containerd(base, base / "c.sock")
    try:
        deadline = time.monotonic() + 60
        while subprocess.run([require("ctr"), "--address", str(daemon.socket), "version"], capture_output=True,
                             timeout=30).returncode != 0:
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"containerd did not start:\n{(base / 'containerd.log').read_text()[-3000:]}")
            time.sleep(0.2)
        yield daemon
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        for path in reversed(made):  # what this daemon made outside its tmp dir, when nothing else uses it now
            with contextlib.suppress(OSError):
                path.rmdir()
        shutil.rmtree(base, ignore_errors=True)


@_cell("ctr")
def test_ctr(built: Built, artefact: str, request: pytest.FixtureRequest) -> None:
    """import (a full export whole: its downloaded input untagged) or pull (plain HTTP), then run."""
    daemon: Containerd = request.getfixturevalue("containerd")
    namespace = f"matrix-{built.compression}-{artefact}"
    if artefact in ("export", "image-only"):
        daemon.ctr(namespace, "images", "import", str(built.export if artefact == "export" else built.image_only))
    else:
        ref = built.pushed if artefact == "registry" else f"{built.cache}:{built.entry}"
        daemon.ctr(namespace, "images", "pull", "--plain-http", ref)
    images = {name: digest for name, digest in
              (line.split()[:3:2] for line in daemon.ctr(namespace, "images", "ls").splitlines()[1:])}
    name = next(n for n in images if n.endswith(f":{IMAGE}") or n in (built.pushed, f"{built.cache}:{built.entry}"))
    assert images[name] == built.digest(artefact)
    if artefact == "export":  # every entry and the image, and no image made of the input artifact
        assert len(images) == 3 and not any("ocibuild-input" in n for n in images)
    command, expected = built.command(artefact)
    out = daemon.ctr(namespace, "run", "--rm", "--fifo-dir", str(daemon.base / "fifo"), "--runc-root",
                     str(daemon.base / "runc"), name, f"{namespace}-run", *command)
    assert out.replace("\r\n", "\n") == expected
    daemon.ctr(namespace, "images", "rm", "--sync", *images)


# ---- oras-py ----------------------------------------------------------------------------------------------------


@_cell("oras")
def test_oras(built: Built, artefact: str, tmp_path: Path) -> None:
    """the manifest, config and layers, each checked against its digest (oras-py's download_blob checks none)."""
    import oras.provider

    host = built.pushed.split("/", 1)[0]
    ref = built.pushed if artefact == "registry" else f"{built.cache}:{built.entry}"
    client = oras.provider.Registry(host, insecure=True)
    try:
        manifest = client.get_manifest(ref)
        assert manifest["mediaType"] == oci.OCI_MANIFEST
        for i, blob in enumerate([manifest["config"], *manifest["layers"]]):
            out = Path(client.download_blob(ref, blob["digest"], str(tmp_path / f"blob{i}")))
            assert "sha256:" + hashlib.sha256(out.read_bytes()).hexdigest() == blob["digest"]
        config = json.loads((tmp_path / "blob0").read_text())
        if artefact == "entry":
            assert config["config"]["Labels"]["dev.ocibuild.layer.name"] == "base"
        assert len(config["history"]) == len(manifest["layers"]) == len(config["rootfs"]["diff_ids"])
    finally:
        client.session.close()


# ---- a Docker schema 2 base -------------------------------------------------------------------------------------


@pytest.mark.podman
def test_a_docker_schema2_base_makes_an_image_buildah_and_skopeo_take(builds: dict[str, Built],
                                                                      registry: RegistryServer,
                                                                      request: pytest.FixtureRequest,
                                                                      tmp_path: Path) -> None:
    """A base pushed as Docker schema 2 (`skopeo copy --format v2s2`): its layers are listed with OCI media types in
    our manifests, so buildah builds on the image and skopeo converts it to a Docker archive."""
    built = builds["gzip"]
    base = f"{registry.host}/matrix-v2s2/base:1"
    skopeo("copy", "-q", "--format", "v2s2", "--dest-tls-verify=false", f"oci:{built.store}:{built.entry}",
           f"docker://{base}")
    raw = json.loads(skopeo("inspect", "--raw", "--tls-verify=false", f"docker://{base}"))
    assert raw["mediaType"] == oci.DOCKER_MANIFEST and raw["layers"][0]["mediaType"] == oci.DOCKER_LAYER_GZIP
    root, store = tmp_path / "project", tmp_path / "store"
    write(root / "ocibuild.toml", '[image]\nname = "on-v2s2"\nlayers = ["base", "app"]\ncompression = "gzip"\n')
    write(root / "layers/base/layer.toml", f'kind = "image"\nref = "{base}"\n')
    write(root / "layers/app/layer.toml", 'kind = "copy"\nfrom = "app"\nto = "/app"\n')
    write(root / "app/hello", "hello\n")
    doc = ocibuild(_isolated_env(tmp_path), "build", "-C", str(root), "--store", str(store))
    entry = f"oci:{store}:{cache_tag('base', oci.Digest.parse(doc['layers'][0]['key']))}"
    for ref in (f"oci:{store}:on-v2s2", entry):
        manifest = json.loads(skopeo("inspect", "--raw", ref))
        assert {layer["mediaType"] for layer in manifest["layers"]} == {oci.LAYER_GZIP}
        skopeo("copy", "-q", ref, f"docker-archive:{tmp_path / 'docker.tar'}:matrix/v2s2:1")
        (tmp_path / "docker.tar").unlink()
    buildah = _buildah(request.getfixturevalue("podman_storage"))
    container = run(*buildah, "from", "-q", f"oci:{store}:on-v2s2").strip()
    try:
        image = run(*buildah, "inspect", "--format", "{{.FromImageID}}", container).strip()
        assert run(*buildah, "run", "--network", "none", container, "--", "cat", "/etc/motd", "/app/hello") == \
            MOTD + "hello\n"
    finally:
        run(*buildah, "rm", container)
    run(*buildah, "rmi", "--force", image)
    assert Store.open(store, create=False).verify() == []


# ---- foreign inputs: what the clients write, ocibuild reads ---------------------------------------------------------


def _build_on(base_ref: str, tmp_path: Path) -> dict[str, Any]:
    """A project of an `image` layer ``base_ref`` and an independent copy layer (so the build reads both layers'
    listings, to find paths they disagree about)."""
    root = tmp_path / "project"
    write(root / "ocibuild.toml", '[image]\nname = "on-top"\nlayers = ["base", "app"]\n')
    write(root / "layers/base/layer.toml", f'kind = "image"\nref = "{base_ref}"\n')
    write(root / "layers/app/layer.toml", 'kind = "copy"\nfrom = "app"\nto = "/app"\n')
    write(root / "app/hello", "hello\n")
    doc: dict[str, Any] = ocibuild(_isolated_env(tmp_path), "build", "-C", str(root), "--store", str(tmp_path / "s"))
    assert Store.open(tmp_path / "s", create=False).verify() == []
    return doc


def test_a_layer_umoci_inserted_is_read(builds: dict[str, Built], tmp_path: Path) -> None:
    """umoci 0.4's `insert` writes a layer without the end-of-archive blocks, nor the last member's padding (GNU tar
    and Python's tarfile refuse it; podman and umoci read it): ocibuild builds on it."""
    built = builds["gzip"]
    layout = tmp_path / "layout"
    skopeo("copy", "-q", f"oci:{built.store}:{IMAGE}", f"oci:{layout}:{IMAGE}")
    write(tmp_path / "extra/etc/inserted", "by umoci\n")
    run(require("umoci"), "insert", "--image", f"{layout}:{IMAGE}", "--tag", "inserted", str(tmp_path / "extra"),
        "/")
    store = Store.open(layout, create=False)
    inserted = store.get_manifest(store.resolve("inserted").digest).layers[-1]  # type: ignore[union-attr]
    with store.open_blob(inserted.digest) as blob:
        plain = gzip.decompress(blob.read())
    assert not plain.endswith(bytes(512))  # the premise: no end-of-archive block
    doc = _build_on(f"oci:{layout}:inserted", tmp_path)
    assert [layer["status"] for layer in doc["layers"]] == ["built", "built"]


@pytest.mark.podman
def test_an_archive_podman_saved_with_a_colon_in_its_tag_is_a_base(builds: dict[str, Built],
                                                                   request: pytest.FixtureRequest,
                                                                   tmp_path: Path) -> None:
    """`podman save` names the image `localhost/bb-amd64:1` in the archive; the ref splits as skopeo splits it."""
    podman = request.getfixturevalue("podman")
    image = podman("pull", "-q", f"oci:{builds['gzip'].store}:{IMAGE}").stdout.strip()
    try:
        podman("tag", image, "localhost/bb-amd64:1")
        podman("save", "-q", "--format", "oci-archive", "-o", str(tmp_path / "bb.tar"), "localhost/bb-amd64:1")
    finally:
        podman("rmi", "--force", image)
    with tarfile.open(tmp_path / "bb.tar") as tar:
        index = json.loads(tar.extractfile("index.json").read())  # type: ignore[union-attr]
    assert [m["annotations"][oci.ANNOTATION_REF_NAME] for m in index["manifests"]] == ["localhost/bb-amd64:1"]
    doc = _build_on(f"oci-archive:{tmp_path / 'bb.tar'}:localhost/bb-amd64:1", tmp_path)
    assert [layer["status"] for layer in doc["layers"]] == ["built", "built"]
