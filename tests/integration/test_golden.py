"""Golden values: the cache keys and layer bytes of a small fixed project, built through the CLI only.

The project has an ``archive`` layer, a ``copy`` layer and a ``network = false`` ``run`` layer (on a base of
static busybox). Their keys, diff_ids and layer digests are written below. A change to the tar writer, the run
layer's volatile-path list, the key document or a compressor's version changes them: that is a change of what
ocibuild writes for the same inputs, so it comes with a bump of ``KEY_FORMAT`` and new golden values here
(every cache entry made before it would otherwise be reused for bytes the new code no longer makes).

Everything the test feeds in is fixed: the archive is made here with fixed names, modes, owners and mtimes;
the copy tree's files get explicit modes and mtimes (so the umask does not matter); the run layer's script
writes fixed content, and a file under every volatile path (a path dropped from the list would then show up in
the layer) and beside them (a path added to the list would then vanish from it). Two entries of the list cannot
be exercised that way: ``run/*`` (podman mounts a tmpfs there) and ``ocibuild`` (the mount points of the script
and inputs, which do appear should it leave the list).

The base holds the host's busybox, whose bytes differ between Debian point releases, so the base's key (and
so the run layer's key, which covers its needs' keys) differs between hosts. The run layer's key *document* is
pinned instead, with the needs' keys as the one variable; its layer bytes hold only what the script changed and
do not depend on the busybox build.

Containers run on a podman storage of the test's own (``--root``), removed at the end: the host's podman
storage is left as it was.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import require, run_ocibuild

pytestmark = pytest.mark.podman

HERE = Path(__file__).resolve()
REPO = HERE.parents[2]
EPOCH = 1_700_000_000  # [image] source_date_epoch: mtimes after it are clamped to it, mtimes before it kept
OLD, NEW = 1_600_000_000, 1_800_000_000  # an mtime kept and one clamped

# ---- the golden values ---------------------------------------------------------------------------------------

#: sha256 of the archive the test makes: if this fails, the test's input changed (Python's tarfile writes other
#: bytes), not ocibuild.
ARCHIVE_SHA256 = "ebbdc68364c7bdff90f063546b6c43e18c3765cfa7b65742afe432aba088939a"

#: Per layer: its cache key, its diff_id (the digest of its tar) and its blob's digest for each compression.
GOLDEN: dict[str, dict[str, str]] = {
    "archive": {
        "key": "sha256:7f96335fe9d3838c6a771fbdbd4eb601f868149ceb542267bcd8646a0aad0e63",
        "diff_id": "sha256:ed4004ff1f48d3cace83a89d446896408c9b3445a3f2320c404820db5c625fa8",
        "zstd": "sha256:1544728434d6c988c1030653251077c2062813771951f91bda1a6fa3dac13adb",
        "gzip": "sha256:0c156d535dd7a16806abd452122e97dc18c9dc8f0a74cdae7f7cedda05e86a37",
    },
    "tree": {
        "key": "sha256:4e205cacf7fdd524d0bf0f23a0df5c638f45f7513df62a609fece572f7f39766",
        "diff_id": "sha256:0e33d2bae3b30e1edf848c1f73210ea02e7ebea0e97180919e0eadfbee1c7812",
        "zstd": "sha256:a245635f887e7400383ca365c79f45dc97ae284f6927db1d6ef33c5f43b8a687",
        "gzip": "sha256:bca2a5bcd74cf070892fd950cb87ad061b97470edd2ac801348bf23e60714bd1",
    },
    "run": {  # its key: RUN_KEY_DOCUMENT's
        "diff_id": "sha256:952f5a8e9a60363deba9a8264222099e142a7db3f49e1cb281666ea86c0d648f",
        "zstd": "sha256:c006328edcd9d309edc40535e3b03521dd41875bf3353a5d9b2babfca81e8f78",
        "gzip": "sha256:8e35c4d7251a842505123b6f35a23b3c8ef25739b078a719b6f36ae0d05b35fd",
    },
}

#: The run layer's key document (the README's "Cache keys"); "needs", the keys of base, archive and tree, is
#: filled in from the build (base's differs between hosts, archive's and tree's are pinned above).
RUN_KEY_DOCUMENT: dict[str, Any] = {
    "format": 4,
    "platform": {"os": "linux", "architecture": "amd64", "variant": None},
    "kind": "run",
    "recipe": {"script": "build.sh", "inputs": [{"path": "data.txt"}], "network": False,
               "env": {"GOLDEN_ENV": "yes"}, "workdir": "/opt", "exclude": ["opt/golden/skip.me"]},
    "epoch": EPOCH,
    "inputs": [
        {"name": "layers/run/build.sh",
         "digest": "sha256:57ea2f945d88411cc3529d4b1dc90d82d365ce93daa857bd8510216649541ab6"},
        {"name": "layers/run/data.txt",
         "digest": "sha256:084c799cd551dd1d8d5c5f9a5d593b2e931f5e36122ee5c793c1d08a19839cc0"},
    ],
}


# ---- the fixed project ---------------------------------------------------------------------------------------

SCRIPT = """\
cd /opt
mkdir -p golden/bin
echo "run layer" > golden/hello
cat archive/README > golden/from-archive
cat tree/etc/app.conf > golden/from-tree
cat /ocibuild/inputs/data.txt > golden/input
echo "$GOLDEN_ENV" > golden/env
printf '#!/bin/sh\\necho hi\\n' > golden/bin/hi
chmod 0755 golden/bin/hi
chmod 0600 golden/input
ln -s hello golden/link
rm /etc/motd
rm -rf /srv/old && mkdir /srv/old && echo new > /srv/old/file
echo skip > golden/skip.me
# every path of the volatile list gets a file (none may be kept) and a neighbour (which is kept)
mkdir -p /var/tmp /var/lib/apt/lists /var/cache/apt /var/cache/debconf /var/lib/dpkg /var/log \\
    golden/__pycache__ /root/.cache /var/cache/ldconfig
for path in /tmp/x /var/tmp/x /var/lib/apt/lists/x /var/cache/apt/x.deb /var/cache/debconf/config.dat-old \\
        /var/lib/dpkg/status-old /var/log/x.log golden/__pycache__/m.pyc /root/.cache/x \\
        /var/cache/ldconfig/aux-cache; do
    echo volatile > "$path"
done
for path in /var/lib/apt/extended_states /var/cache/debconf/config.dat /var/lib/dpkg/status /root/.profile \\
        /var/cache/ldconfig/keep golden/pycache.txt; do
    echo kept > "$path"
done
"""


def _fixed(path: Path, mode: int, mtime: int) -> None:
    """Mode and mtime set explicitly, so neither the umask nor the clock reaches the project."""
    path.chmod(mode)
    os.utime(path, (mtime, mtime), follow_symlinks=False)


def _file(path: Path, data: bytes | str, mode: int = 0o644, mtime: int = OLD) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    _fixed(path, mode, mtime)


def make_archive() -> bytes:
    """A plain (uncompressed, so no zlib build enters its bytes) pax tar of a release-like tree: foreign owners
    and names, mtimes kept and clamped (alternately OLD and NEW), a symlink, a hard link, a long and a non-ASCII
    name."""
    long_dir = "pkg-1.0/share/" + "long-directory-name-" * 6
    members = [  # name, type, mode, content (a regular file) or target (a link)
        ("pkg-1.0", tarfile.DIRTYPE, 0o755, ""),
        ("pkg-1.0/README", tarfile.REGTYPE, 0o644, "archive layer\n"),
        ("pkg-1.0/bin", tarfile.DIRTYPE, 0o750, ""),
        ("pkg-1.0/bin/tool", tarfile.REGTYPE, 0o755, "#!/bin/sh\necho tool\n"),
        ("pkg-1.0/bin/tool-hard", tarfile.LNKTYPE, 0o755, "pkg-1.0/bin/tool"),
        ("pkg-1.0/bin/tool-link", tarfile.SYMTYPE, 0o777, "tool"),
        ("pkg-1.0/private", tarfile.REGTYPE, 0o600, "secret\n"),
        (f"{long_dir}/file", tarfile.REGTYPE, 0o644, "deep\n"),
        ("pkg-1.0/share/na\u00efve.txt", tarfile.REGTYPE, 0o644, "utf-8 name\n"),
    ]
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for i, (name, type_, mode, text) in enumerate(members):
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.mtime = type_, mode, OLD if i % 2 else NEW
            info.uid, info.gid, info.uname, info.gname = 1000, 1000, "builder", "builder"
            content = None
            if type_ == tarfile.REGTYPE:
                content = io.BytesIO(text.encode())
                info.size = len(text.encode())
            elif type_ != tarfile.DIRTYPE:
                info.linkname = text
            tar.addfile(info, content)
    return raw.getvalue()


def make_project(root: Path) -> None:
    busybox = require("busybox")
    layer_file = (
        ("ocibuild.toml", '[image]\nname = "golden"\nlayers = ["base", "archive", "tree", "run"]\n'
                          f"source_date_epoch = {EPOCH}\n"),
        ("layers/base/layer.toml", 'kind = "copy"\nfrom = "rootfs"\nto = "/"\n'),
        ("layers/archive/layer.toml", 'kind = "archive"\nurl = "pkg-1.0.tar"\n'
                                      f'sha256 = "{ARCHIVE_SHA256}"\ndest = "/opt/archive"\nstrip_components = 1\n'),
        ("layers/tree/layer.toml", 'kind = "copy"\nfrom = "tree"\nto = "/opt/tree"\nexclude = ["*.log"]\n'
                                   'owner = "1000:100"\n'),
        ("layers/run/layer.toml", 'kind = "run"\nneeds = ["base", "archive", "tree"]\nscript = "build.sh"\n'
                                  'inputs = ["data.txt"]\nnetwork = false\nenv = { GOLDEN_ENV = "yes" }\n'
                                  'workdir = "/opt"\nexclude = ["opt/golden/skip.me"]\n'),
        ("layers/run/build.sh", SCRIPT),
        ("layers/run/data.txt", "42\n"),
    )
    for rel, text in layer_file:
        _file(root / rel, text)
    _file(root / "layers/archive/pkg-1.0.tar", make_archive())

    # the base: busybox with the applets the script uses, and files for it to delete
    rootfs = root / "rootfs"
    (rootfs / "bin").mkdir(parents=True)
    shutil.copyfile(busybox, rootfs / "bin/busybox")
    _fixed(rootfs / "bin/busybox", 0o755, OLD)
    for applet in ("sh", "cat", "chmod", "echo", "ln", "mkdir", "printf", "rm"):
        (rootfs / "bin" / applet).symlink_to("busybox")
    _file(rootfs / "etc/passwd", "root:x:0:0:root:/root:/bin/sh\n")
    _file(rootfs / "etc/group", "root:x:0:\n")
    _file(rootfs / "etc/motd", "old\n")
    _file(rootfs / "srv/old/file", "old\n")
    for d in ("tmp", "proc", "sys", "dev", "root", "opt"):
        (rootfs / d).mkdir()

    # the copy tree: an executable, a private file (modes are normalised), a symlink, an empty directory, an
    # excluded file, an ignore file, and 100 kB of half-compressible data for the compressor
    tree = root / "tree"
    blob = b"".join(hashlib.sha256(b"%d" % i).digest()[:8] + b" golden line %d\n" % i for i in range(4000))
    _file(tree / "bin/run.sh", "#!/bin/sh\necho run\n", 0o755, NEW)
    _file(tree / "etc/app.conf", "setting = 1\n", 0o600, OLD)
    _file(tree / "data/blob.bin", blob, 0o644, NEW)
    _file(tree / "debug.log", "left out\n")
    _file(tree / "scratch.tmp", "left out by .containerignore\n")
    _file(tree / ".containerignore", "*.tmp\n")
    (tree / "link").symlink_to("bin/run.sh")
    (tree / "empty").mkdir()
    for directory in (tree / "empty", tree / "bin", tree / "etc", tree / "data", tree):
        _fixed(directory, 0o700, NEW)
    for path in [*rootfs.rglob("*"), rootfs, root / "layers", *(root / "layers").rglob("*")]:
        if path.is_dir() and not path.is_symlink():
            _fixed(path, 0o755, OLD)


# ---- reading the result (the OCI layout is a contract; no ocibuild module is used) ---------------------------


def _blob(store: Path, digest: str) -> Any:
    algorithm, hex_ = digest.split(":")
    return json.loads((store / "blobs" / algorithm / hex_).read_bytes())


def image_layers(store: Path, name: str) -> list[dict[str, str]]:
    """{digest, diff_id} of every layer of the image tagged ``name``, bottom first."""
    index = json.loads((store / "index.json").read_text())
    [descriptor] = [d for d in index["manifests"]
                    if d.get("annotations", {}).get("org.opencontainers.image.ref.name") == name]
    manifest = _blob(store, descriptor["digest"])
    config = _blob(store, manifest["config"]["digest"])
    return [{"digest": layer["digest"], "diff_id": diff_id}
            for layer, diff_id in zip(manifest["layers"], config["rootfs"]["diff_ids"], strict=True)]


def key_of(document: dict[str, Any]) -> str:
    """The key of a key document: sha256 of its canonical JSON (sorted keys, no spaces), as the README says."""
    text = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def key_format_location() -> str:
    """Where KEY_FORMAT is defined (found by text, so this message follows the constant when it moves)."""
    for path in sorted((REPO / "src" / "ocibuild").rglob("*.py")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.match(r"KEY_FORMAT\b.*=", line):
                return f"KEY_FORMAT in {path.relative_to(REPO)}:{number}"
    return "KEY_FORMAT in src/ocibuild"


def changed(what: str) -> str:
    return (f"layer bytes or cache keys changed: if intended, bump the key format ({key_format_location()}) and "
            f"update the golden values in {HERE.relative_to(REPO)}\n{what}")


# ---- the test ------------------------------------------------------------------------------------------------


@pytest.fixture
def own_podman(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """An environment whose ocibuild config points podman at a storage of this test's own."""
    podman = require("podman")
    base = tmp_path_factory.mktemp("podman")  # a short path: podman refuses a runroot over 50 characters
    args = ["--root", str(base / "root"), "--runroot", str(base / "runroot"), "--tmpdir", str(base / "tmp")]
    config = tmp_path / "config.toml"
    config.write_text(f"[engine]\nargs = {json.dumps(args)}\n")
    yield {"OCIBUILD_CONFIG": str(config)}
    subprocess.run([podman, *args, "rmi", "--all", "--force"], capture_output=True, timeout=120)
    shutil.rmtree(base, ignore_errors=True)


@pytest.mark.parametrize("compression", ["zstd", "gzip"])
def test_keys_and_layer_bytes_match_the_golden_values(tmp_path: Path, own_podman: dict[str, str],
                                                       compression: str) -> None:
    root, store = tmp_path / "project", tmp_path / "store"
    make_project(root)
    archive_sha256 = hashlib.sha256((root / "layers/archive/pkg-1.0.tar").read_bytes()).hexdigest()
    assert archive_sha256 == ARCHIVE_SHA256, \
        f"the test's own input archive changed (Python's tarfile?), not ocibuild: its sha256 is {archive_sha256}"
    with (root / "ocibuild.toml").open("a") as f:
        f.write(f'compression = "{compression}"\n')

    built = json.loads(run_ocibuild("build", "--json", "-C", str(root), "--store", str(store),
                                    env=own_podman).stdout)
    assert [layer["status"] for layer in built["layers"]] == ["built"] * 4
    keys = {layer["name"]: layer["key"] for layer in built["layers"]}
    layers = dict(zip(keys, image_layers(store, "golden"), strict=True))
    run_key = key_of({**RUN_KEY_DOCUMENT, "needs": [keys["base"], keys["archive"], keys["tree"]]})

    mismatches = []
    for name, golden in GOLDEN.items():
        expected = {"key": golden.get("key", run_key), "diff_id": golden["diff_id"], compression: golden[compression]}
        actual = {"key": keys[name], "diff_id": layers[name]["diff_id"], compression: layers[name]["digest"]}
        mismatches += [f"{name} {field}: golden {expected[field]}, now {actual[field]}"
                       for field in expected if expected[field] != actual[field]]
    assert not mismatches, changed("\n".join(mismatches))

    run_ocibuild("verify", "--store", str(store))
