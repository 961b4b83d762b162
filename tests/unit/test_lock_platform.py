"""ocibuild.lock entries of ``image`` layers name the platform they were resolved for: a ref may name an index,
whose manifest differs per platform, so an entry made for amd64 must not pin an arm64 build's base. (No network:
registry refs resolve through a fake registry; local refs are layouts and archives made here.)"""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from pathlib import Path

import pytest

from conftest import write
from ocibuild import cli, oci, resolve
from ocibuild.errors import RecipeError
from ocibuild.oci import Descriptor, Digest, Index, Platform
from ocibuild.recipe.lock import LOCK_FILE, Lock, load_lock
from ocibuild.recipe.project import load_project
from ocibuild.store import Store

REF = "registry.invalid/base:1"
AMD64, ARM64 = Platform("linux", "amd64"), Platform("linux", "arm64")


class FakeRegistry:
    """The one call resolving makes: a manifest (or an index) by repository and tag."""

    registry = "registry.invalid"

    def __init__(self) -> None:
        self.manifests: dict[tuple[str, str], tuple[bytes, str]] = {}

    def fetch_manifest(self, repository: str, reference: str) -> tuple[bytes, str, Digest]:
        data, media_type = self.manifests[(repository, reference)]
        return data, media_type, Digest.of(data)

    def client(self, registry: str) -> FakeRegistry:  # stands for Registries as well
        assert registry == self.registry
        return self


def _layer(text: str) -> tuple[bytes, Digest]:
    """A gzip layer holding /arch with ``text``, and its diff_id."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("arch")
        info.size = len(text)
        tar.addfile(info, io.BytesIO(text.encode()))
    return gzip.compress(raw.getvalue(), mtime=0), Digest.of(raw.getvalue())


def _put_image(store: Store, platform: Platform, content: str) -> Descriptor:
    """An image of one layer saying ``content``, for ``platform``, in ``store``; its descriptor for an index."""
    blob, diff_id = _layer(content)
    layer = store.put(blob, oci.LAYER_GZIP)
    config = store.put(oci.ImageConfig((diff_id,), architecture=platform.architecture).to_json(), oci.OCI_CONFIG)
    manifest = store.put_manifest(oci.Manifest(config, (layer,)))
    return Descriptor(manifest.media_type, manifest.digest, manifest.size, platform=platform)


def _index(*manifests: Descriptor) -> bytes:
    return Index(manifests).to_json()


def _registry_with(index: bytes) -> FakeRegistry:
    fake = FakeRegistry()
    fake.manifests[("base", "1")] = (index, oci.OCI_INDEX)
    return fake


def _manifest(platform: Platform, content: str) -> Descriptor:
    """An image manifest's descriptor for a registry index (resolving reads only the index)."""
    data = json.dumps({"schemaVersion": 2, "content": content}).encode()
    return Descriptor(oci.OCI_MANIFEST, Digest.of(data), len(data), platform=platform)


def _project(make_project, architecture: str, root: Path | None = None, ref: str = REF) -> Path:
    return make_project({"base": f'kind = "image"\nref = "{ref}"\n',
                         "app": 'kind = "copy"\nfrom = "src"\nto = "/app"\nneeds = ["base"]\n'},
                        image=f'architecture = "{architecture}"\n', root=root, files={"src/f": "x\n"})


def _plan(root: Path, store: Path, capsys: pytest.CaptureFixture[str]) -> tuple[dict[str, dict], str]:
    assert cli.main(["plan", "--json", "-C", str(root), "--store", str(store)]) == 0
    out, err = capsys.readouterr()
    return {layer["name"]: layer for layer in json.loads(out)["layers"]}, err


def _lock(root: Path, registries: FakeRegistry) -> Lock:
    """Resolve the project's lock through the fake registry and write it, as `ocibuild lock` does."""
    project = load_project(root)
    lock = resolve.resolve_lock(project, load_lock(root), registries=registries)  # type: ignore[arg-type]
    resolve.write_lock(project, lock)
    return lock


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access: {args[:2]}")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_a_lock_resolved_for_amd64_does_not_pin_an_arm64_build(make_project, tmp_path: Path, no_network,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """The ref names an index. Locked for amd64, then `[image] architecture` becomes arm64: `plan` shows the image
    layer (and the layer on it) waiting for the lock rather than keyed by the amd64 manifest, a build offline
    refuses, and resolving picks the index's arm64 manifest."""
    amd64, arm64 = _manifest(AMD64, "amd64"), _manifest(ARM64, "arm64")
    fake = _registry_with(_index(amd64, arm64))
    root = _project(make_project, "amd64")
    store = tmp_path / "store"
    entry = _lock(root, fake).entries["base"]
    assert (entry.digest, entry.platform) == (amd64.digest, AMD64)
    assert 'platform = "linux/amd64"' in (root / LOCK_FILE).read_text()
    layers, _ = _plan(root, store, capsys)
    assert layers["base"]["inputs"] == [{"name": REF, "digest": str(amd64.digest)}]

    _project(make_project, "arm64", root=root)
    locked = (root / LOCK_FILE).read_text()
    layers, err = _plan(root, store, capsys)
    assert {name: (layer["status"], layer["key"]) for name, layer in layers.items()} == {
        "base": ("lock", None), "app": ("lock", None)}
    assert layers["base"]["inputs"] == [{"name": REF, "digest": None}]
    assert f"layer 'base': ocibuild.lock has no entry for {REF} for linux/arm64" in err
    assert (root / LOCK_FILE).read_text() == locked, "plan only reads the lock"
    assert cli.main(["build", "--offline", "-C", str(root), "--store", str(store)]) == 1
    assert f"no entry for layer 'base' ({REF} for linux/arm64) and --offline forbids" in capsys.readouterr().err

    entry = _lock(root, fake).entries["base"]
    assert (entry.digest, entry.platform) == (arm64.digest, ARM64)
    layers, err = _plan(root, store, capsys)
    assert [layer["status"] for layer in layers.values()] == ["build", "build"] and err == ""
    assert layers["base"]["inputs"] == [{"name": REF, "digest": str(arm64.digest)}]


def test_switching_back_resolves_the_ref_again(make_project, tmp_path: Path, no_network,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """The lock holds one entry per layer, for the project's platform now: amd64 → arm64 → amd64 resolves the ref
    again for amd64 (it keeps no earlier amd64 entry), so a tag moved meanwhile gives its new amd64 manifest."""
    amd64, arm64, amd64_new = _manifest(AMD64, "amd64"), _manifest(ARM64, "arm64"), _manifest(AMD64, "amd64 v2")
    fake = _registry_with(_index(amd64, arm64))
    root = _project(make_project, "amd64")
    _lock(root, fake)
    _project(make_project, "arm64", root=root)
    assert _lock(root, fake).entries["base"].digest == arm64.digest

    fake.manifests[("base", "1")] = (_index(amd64_new, arm64), oci.OCI_INDEX)
    _project(make_project, "amd64", root=root)
    layers, _ = _plan(root, tmp_path / "store", capsys)
    assert layers["base"]["status"] == "lock"
    entry = _lock(root, fake).entries["base"]
    assert (entry.digest, entry.platform) == (amd64_new.digest, AMD64)


def test_an_image_entry_without_a_platform_is_resolved_again(make_project, tmp_path: Path, no_network,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """A lock written before entries named their platform (here: holding the arm64 manifest, for an amd64 project)
    is read, but its image entry is not trusted: `plan` waits for it and resolving replaces it with the amd64
    manifest. A suite's entry never carried a platform and still holds (no InRelease is fetched again)."""
    amd64, arm64 = _manifest(AMD64, "amd64"), _manifest(ARM64, "arm64")
    fake = _registry_with(_index(amd64, arm64))
    root = make_project({"base": f'kind = "image"\nref = "{REF}"\n',
                         "boot": 'kind = "bootstrap"\nmirror = "http://deb.invalid/debian"\nsuite = "bookworm"\n'},
                        image='architecture = "amd64"\n')
    release = Digest.of(b"InRelease")
    write(root / LOCK_FILE, f'version = 1\n\n[layers."base"]\nsource = "{REF}"\ndigest = "{arm64.digest}"\n\n'
                            '[layers."boot"]\nsource = "http://deb.invalid/debian/dists/bookworm/InRelease"\n'
                            f'digest = "{release}"\n')
    layers, err = _plan(root, tmp_path / "store", capsys)
    assert (layers["base"]["status"], layers["base"]["inputs"]) == ("lock", [{"name": REF, "digest": None}])
    assert layers["boot"]["status"] == "build" and layers["boot"]["inputs"][0]["digest"] == str(release)

    lock = _lock(root, fake)
    assert (lock.entries["base"].digest, lock.entries["base"].platform) == (amd64.digest, AMD64)
    assert (lock.entries["boot"].digest, lock.entries["boot"].platform) == (release, None)
    text = (root / LOCK_FILE).read_text()
    assert f'source = "{REF}"\nplatform = "linux/amd64"\ndigest = "{amd64.digest}"' in text
    assert f'InRelease"\ndigest = "{release}"' in text


def _multi_platform_layout(path: Path) -> tuple[Store, dict[str, Descriptor]]:
    """An OCI layout tagged "dev" at an index of an amd64 and an arm64 image, as `skopeo copy --all` writes one."""
    layout = Store.open(path)
    images = {"amd64": _put_image(layout, AMD64, "amd64"), "arm64": _put_image(layout, ARM64, "arm64")}
    layout.tag("dev", layout.put(_index(*images.values()), oci.OCI_INDEX))
    return layout, images


def _archive(layout: Path, path: Path) -> None:
    """An oci-archive of the layout (its oci-layout, index.json and blobs only)."""
    with tarfile.open(path, "w") as tar:
        for name in ("oci-layout", "index.json", "blobs"):
            tar.add(layout / name, arcname=name)


@pytest.mark.parametrize("kind", ["oci", "oci-archive"])
def test_a_local_multi_platform_image_is_resolved_and_built_for_the_project_platform(
        make_project, tmp_path: Path, kind: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`oci:DIR:TAG` and `oci-archive:PATH:TAG` tagging an index resolve to the manifest of the project's platform,
    the lock says for which, and the build takes that image's layers; another platform re-resolves."""
    layout, images = _multi_platform_layout(tmp_path / "layout")
    if kind == "oci":
        ref = f"oci:{layout.root}:dev"
    else:
        _archive(layout.root, tmp_path / "base.tar")
        ref = f"oci-archive:{tmp_path / 'base.tar'}:dev"
    root = _project(make_project, "arm64", ref=ref)
    store = tmp_path / "store"
    for architecture, platform in (("arm64", ARM64), ("amd64", AMD64)):
        _project(make_project, architecture, root=root, ref=ref)
        assert cli.main(["build", "--json", "-C", str(root), "--store", str(store)]) == 0
        built = json.loads(capsys.readouterr().out)
        assert [layer["status"] for layer in built["layers"]] == ["built", "built"]
        entry = load_lock(root).entries["base"]
        assert (entry.digest, entry.platform) == (images[architecture].digest, platform)
        expected = Store.open(layout.root).get_manifest(images[architecture].digest).layers[0]
        image = Store.open(store).get_manifest(Digest.parse(built["digest"]))
        assert image.layers[0].digest == expected.digest, f"the {architecture} image's layer comes first"
    assert Store.open(store).verify() == [] and layout.verify() == []


def test_a_local_index_without_the_project_platform_is_refused(make_project, tmp_path: Path) -> None:
    layout, _ = _multi_platform_layout(tmp_path / "layout")
    root = _project(make_project, "riscv64", ref=f"oci:{layout.root}:dev")
    with pytest.raises(RecipeError, match=r"no image for linux/riscv64 \(the index offers linux/amd64, linux/arm64\)"):
        resolve.resolve_lock(load_project(root), Lock())
