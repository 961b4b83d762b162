"""Run layers and the compile step with real podman, on a busybox base made offline from Debian's busybox-static."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import Podman, require, write
from ocibuild import oci
from ocibuild.tar import read
from ocibuild.store import Store

pytestmark = pytest.mark.podman
OCIBUILD = [sys.executable, "-m", "ocibuild.cli"]


def busybox_rootfs(root: Path) -> Path:
    """A tiny root filesystem: static busybox with its applets, /etc, and a dpkg status file."""
    busybox = require("busybox")
    (root / "bin").mkdir(parents=True)
    shutil.copy(busybox, root / "bin" / "busybox")
    applets = subprocess.run([busybox, "--list"], capture_output=True, text=True, check=True).stdout.split()
    for applet in applets:
        if applet != "busybox":
            (root / "bin" / applet).symlink_to("busybox")
    write(root / "etc/passwd", "root:x:0:0:root:/root:/bin/sh\n")
    write(root / "etc/group", "root:x:0:\n")
    write(root / "etc/motd", "old\n")
    write(root / "etc/remove-me", "bye\n")
    write(root / "srv/dir/old", "old\n")
    write(root / "var/lib/dpkg/status", "Package: base-files\nArchitecture: amd64\nStatus: install ok installed\n")
    for d in ("tmp", "proc", "sys", "dev", "root"):
        (root / d).mkdir(exist_ok=True)
    return root


def project(tmp_path: Path, layers: dict[str, str], scripts: dict[str, str], image: str = "", run: str = "") -> Path:
    root = tmp_path / "project"
    busybox_rootfs(root / "rootfs")
    names = ", ".join(f'"{n}"' for n in ["base", *layers])
    write(root / "ocibuild.toml", f'[image]\nname = "bb"\nlayers = [{names}]\n{image}\n{run}\n')
    write(root / "layers/base/layer.toml", 'kind = "copy"\nfrom = "rootfs"\nto = "/"\n')
    for name, text in layers.items():
        write(root / "layers" / name / "layer.toml", text)
    for rel, text in scripts.items():
        write(root / rel, text)
    return root


def build(root: Path, store: Path, *extra: str) -> dict:
    result = subprocess.run([*OCIBUILD, "build", "--json", "-C", str(root), "--store", str(store), *extra],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def layer_listing(store: Store, image: str, index: int) -> dict[str, str]:
    manifest = store.get_manifest(store.resolve(image).digest)
    blob = manifest.layers[index]
    with store.open_blob(blob.digest) as f:
        return read.list_layer(f, oci.layer_compression(blob.media_type), what="test")


def podman_run(podman: Podman, store: Path, image: str, *command: str) -> str:
    """``command`` in the image of the store, on the session's own podman storage (see conftest)."""
    return podman("run", "--rm", f"oci:{store}:{image}", *command).stdout


CHANGES = """
mkdir -p /opt/app && echo new > /opt/app/new
echo changed > /etc/motd
rm /etc/remove-me
rm -rf /srv/dir && mkdir /srv/dir && echo fresh > /srv/dir/x
echo scratch > /tmp/scratch
mkdir -p /var/log /var/cache/apt && echo log > /var/log/x.log && echo deb > /var/cache/apt/x.deb
mkdir -p /opt/app/__pycache__ && echo pyc > /opt/app/__pycache__/m.pyc
echo skip > /opt/app/skip.me
echo "input: $(cat /ocibuild/inputs/data.txt)"
"""


def test_run_layer_captures_changes_whiteouts_and_drops_volatile_paths(tmp_path: Path, podman: Podman) -> None:
    root = project(tmp_path, {"app": 'kind = "run"\nneeds = ["base"]\nscript = "s.sh"\ninputs = ["data.txt"]\n'
                                      'exclude = ["opt/app/skip.me"]\nnetwork = false\n'},
                   {"layers/app/s.sh": CHANGES, "layers/app/data.txt": "42\n"})
    store_dir = tmp_path / "store"
    result = build(root, store_dir)
    assert [l["status"] for l in result["layers"]] == ["built", "built"]
    store = Store.open(store_dir)
    listing = layer_listing(store, "bb", 1)
    assert listing["opt/app/new"].startswith("file:0644:")
    assert listing["etc/motd"].startswith("file:")
    assert listing["etc/.wh.remove-me"] == "whiteout"
    assert listing["srv/dir/.wh..wh..opq"] == "opaque"  # the directory was removed and made again
    assert listing["srv/dir/x"].startswith("file:")
    for dropped in ("tmp/scratch", "var/log/x.log", "var/cache/apt/x.deb", "opt/app/__pycache__/m.pyc",
                    "opt/app/skip.me", "ocibuild", "ocibuild/script"):
        assert dropped not in listing, dropped
    out = podman_run(podman, store_dir, "bb", "sh", "-c",
                     "cat /opt/app/new /etc/motd; ls /srv/dir; test ! -e /etc/remove-me && echo gone")
    assert out.split() == ["new", "changed", "x", "gone"]
    log = next((store_dir / "ocibuild" / "logs").glob("app-*.log")).read_text()
    assert "input: 42" in log
    assert store.verify() == []
    again = build(root, store_dir)
    assert [l["status"] for l in again["layers"]] == ["cached", "cached"] and again["digest"] == result["digest"]


def test_same_script_twice_gives_the_same_layer(tmp_path: Path) -> None:
    root = project(tmp_path, {"app": 'kind = "run"\nneeds = ["base"]\nscript = "s.sh"\nnetwork = false\n'},
                   {"layers/app/s.sh": "mkdir -p /opt/x && echo same > /opt/x/f && ln -s f /opt/x/l && rm /etc/motd\n"})
    first = build(root, tmp_path / "one")
    second = build(root, tmp_path / "two")
    assert first["digest"] == second["digest"]


def test_side_by_side_package_layers_are_merged_without_warnings(tmp_path: Path, podman: Podman) -> None:
    add = 'printf "\\nPackage: {0}\\nArchitecture: amd64\\nStatus: install ok installed\\n" >> /var/lib/dpkg/status\n'
    root = project(tmp_path,
                   {"a": 'kind = "run"\nneeds = ["base"]\nscript = "s.sh"\nnetwork = false\n',
                    "b": 'kind = "run"\nneeds = ["base"]\nscript = "s.sh"\nnetwork = false\n'},
                   {"layers/a/s.sh": add.format("tool-a"), "layers/b/s.sh": add.format("tool-b")})
    store_dir = tmp_path / "store"
    result = build(root, store_dir, "--strict")
    assert "warnings" not in result
    status = podman_run(podman, store_dir, "bb", "cat", "/var/lib/dpkg/status")
    packages = [line.split(": ")[1] for line in status.splitlines() if line.startswith("Package: ")]
    assert sorted(packages) == ["base-files", "tool-a", "tool-b"]
    store = Store.open(store_dir)
    config = store.get_config(store.get_manifest(store.resolve("bb").digest).config.digest)
    assert "ocibuild-merge" in config.history[-1].created_by
    assert len(config.diff_ids) == 4
    assert build(root, store_dir)["digest"] == result["digest"]  # the merge layer is cached too


def test_ldconfig_merge_runs_over_the_package_layers_and_a_source_edit_leaves_it(tmp_path: Path,
                                                                                podman: Podman) -> None:
    """ldconfig re-runs over the layers that hold bookkeeping files and what they need, not over a copy layer
    that holds none (busybox has no ldconfig: a stand-in lists /usr/lib's libraries as the cache); editing that
    copy layer rebuilds it alone, the merge layer stays."""
    lib = "mkdir -p /usr/lib && echo {0} > /usr/lib/{0}.so && ldconfig\n"
    root = project(tmp_path,
                   {"a": 'kind = "run"\nneeds = ["base"]\nscript = "s.sh"\nnetwork = false\n',
                    "b": 'kind = "run"\nneeds = ["base"]\nscript = "s.sh"\nnetwork = false\n',
                    "src": 'kind = "copy"\nfrom = "src"\nto = "/usr/lib"\n'},
                   {"layers/a/s.sh": lib.format("liba"), "layers/b/s.sh": lib.format("libb"),
                    "rootfs/bin/ldconfig": "#!/bin/sh\nls /usr/lib | grep '[.]so$' > /etc/ld.so.cache\n",
                    "rootfs/usr/lib/libbase.so": "base\n", "src/libsrc.so": "src\n"})
    (root / "rootfs/bin/ldconfig").chmod(0o755)
    store_dir = tmp_path / "store"
    first = build(root, store_dir, "--strict")
    cache = podman_run(podman, store_dir, "bb", "cat", "/etc/ld.so.cache")
    assert cache.split() == ["liba.so", "libb.so", "libbase.so"]
    store = Store.open(store_dir)
    merge_layer = store.get_manifest(store.resolve("bb").digest).layers[-1]
    (root / "src/libsrc.so").write_text("edited\n")
    edited = build(root, store_dir, "--strict")
    assert [l["status"] for l in edited["layers"]] == ["cached", "cached", "cached", "built"]
    assert edited["digest"] != first["digest"]
    assert store.get_manifest(store.resolve("bb").digest).layers[-1] == merge_layer


def test_network_false_has_only_loopback(tmp_path: Path, podman: Podman) -> None:
    root = project(tmp_path, {"app": 'kind = "run"\nneeds = ["base"]\nscript = "s.sh"\nnetwork = false\n'},
                   {"layers/app/s.sh": "mkdir -p /proc-copy && cat /proc/net/dev > /proc-copy/dev\n"})
    store_dir = tmp_path / "store"
    build(root, store_dir)
    devices = podman_run(podman, store_dir, "bb", "cat", "/proc-copy/dev")
    interfaces = [line.split(":")[0].strip() for line in devices.splitlines()[2:]]
    assert interfaces == ["lo"]


def test_failing_script_names_layer_exit_code_and_last_lines(tmp_path: Path, podman: Podman) -> None:
    root = project(tmp_path, {"app": 'kind = "run"\nneeds = ["base"]\nscript = "s.sh"\nnetwork = false\n'},
                   {"layers/app/s.sh": "echo step one\necho about to fail\nexit 3\n"})
    store_dir = tmp_path / "store"
    result = subprocess.run([*OCIBUILD, "build", "-C", str(root), "--store", str(store_dir)], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 1
    assert "error: layer 'app': exited 3" in result.stderr
    assert "about to fail" in result.stderr.split("error:")[1]
    assert "hint:" in result.stderr
    store = Store.open(store_dir)
    assert store.verify() == []
    assert not [d for d in store.index().manifests if (d.ref_name or "").startswith("app-")]
    names = podman("ps", "-a", "--format", "{{.Names}}").stdout  # the storage ocibuild ran it on (see conftest)
    assert "ocibuild-app-" not in names


def test_compile_step_mounts_streams_and_exits_with_the_command_code(tmp_path: Path) -> None:
    root = project(tmp_path, {"src": 'kind = "copy"\nfrom = "src"\nto = "/src"\n'},
                   {"src/make.sh": "mkdir -p /src/bundles/0.1 && echo built > /src/bundles/0.1/binary && echo done\n"},
                   image='workdir = "/src"\n',
                   run='[run]\ncommand = ["sh", "make.sh"]\nmounts = ["bundles:/src/bundles"]\nenv = { MODE = "ci" }\n')
    store_dir = str(tmp_path / "store")
    result = subprocess.run([*OCIBUILD, "run", "-C", str(root), "--store", store_dir], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "done" in result.stdout
    assert (root / "bundles/0.1/binary").read_text() == "built\n"
    code = subprocess.run([*OCIBUILD, "run", "-C", str(root), "--store", store_dir, "--", "sh", "-c",
                           'echo "$MODE"; exit 7'], capture_output=True, text=True, timeout=600)
    assert code.returncode == 7 and code.stdout.strip() == "ci"
    (root / "src/make.sh").write_text("echo live\n")
    live = subprocess.run([*OCIBUILD, "run", "--source-mount", "-C", str(root), "--store", store_dir, "--", "cat",
                           "/src/make.sh"], capture_output=True, text=True, timeout=600)
    assert live.returncode == 0 and live.stdout.strip() == "echo live"


def test_ocibuild_failing_before_the_command_exits_125(tmp_path: Path) -> None:
    root = project(tmp_path, {}, {}, run='[run]\ncommand = ["true"]\n')
    (root / "layers/base/layer.toml").write_text('kind = "copy"\nfrom = "missing"\nto = "/"\n')
    result = subprocess.run([*OCIBUILD, "run", "-C", str(root), "--store", str(tmp_path / "s")], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 125
    assert "error:" in result.stderr and "missing" in result.stderr


def test_run_layer_with_the_store_under_dot_cache(tmp_path: Path) -> None:
    """The default store lives in ~/.cache, a path podman 4.3 cannot name an image after."""
    root = project(tmp_path, {"app": 'kind = "run"\nneeds = ["base"]\nscript = "s.sh"\nnetwork = false\n'},
                   {"layers/app/s.sh": "echo ok > /ok\n"})
    store_dir = tmp_path / "home" / ".cache" / "ocibuild" / "store"
    build(root, store_dir)
    ran = subprocess.run([*OCIBUILD, "run", "-C", str(root), "--store", str(store_dir), "--", "cat", "/ok"],
                         capture_output=True, text=True, timeout=600)
    assert ran.returncode == 0 and ran.stdout.strip() == "ok", ran.stderr


def _two_independent_run_layers(tmp_path: Path, a: str, b: str) -> Path:
    """a and b both need only base (as go and runtime-dev in Docker's project)."""
    layer = 'kind = "run"\nneeds = ["base"]\nscript = "s.sh"\nnetwork = false\n'
    return project(tmp_path, {"a": layer, "b": layer}, {"layers/a/s.sh": a, "layers/b/s.sh": b})


def test_independent_run_layers_build_at_once_with_the_keys_and_digests_of_one_job(tmp_path: Path) -> None:
    root = _two_independent_run_layers(
        tmp_path, "echo from a\nmkdir -p /opt/a && echo a > /opt/a/f && echo changed-by-a > /etc/motd\n",
        "echo from b\nmkdir -p /opt/b && echo b > /opt/b/f && rm /etc/remove-me\n")
    argv = [*OCIBUILD, "build", "--json", "-C", str(root)]
    parallel = subprocess.run([*argv, "--store", str(tmp_path / "parallel"), "--jobs", "2"], capture_output=True,
                              text=True, timeout=600)
    assert parallel.returncode == 0, parallel.stderr
    serial = build(root, tmp_path / "serial", "--jobs", "1")
    doc = json.loads(parallel.stdout)
    assert [(l["name"], l["status"]) for l in doc["layers"]] == [("base", "built"), ("a", "built"), ("b", "built")]
    assert [l["key"] for l in doc["layers"]] == [l["key"] for l in serial["layers"]]
    assert doc["digest"] == serial["digest"]  # the image, and so every layer blob, is the same
    lines = parallel.stderr.splitlines()
    assert any(line.endswith(" a | from a") for line in lines) and any(line.endswith(" b | from b") for line in lines)
    assert not any(line.endswith(" from a") and " a | " not in line for line in lines)
    for store_dir in (tmp_path / "parallel", tmp_path / "serial"):
        assert Store.open(store_dir).verify() == []


def test_a_failing_run_layer_kills_the_running_one_and_names_itself(tmp_path: Path, podman: Podman) -> None:
    """b runs (for ten minutes if nobody stops it) when a fails: b's container is killed and removed, b is not
    recorded, and the error is a's. The subprocess's timeout only keeps a broken stop from hanging the suite."""
    root = _two_independent_run_layers(tmp_path, "sleep 10\necho a fails\nexit 3\n", "echo b started\nsleep 600\n")
    store_dir = tmp_path / "store"
    result = subprocess.run([*OCIBUILD, "build", "--jobs", "2", "-C", str(root), "--store", str(store_dir)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr
    assert "error: layer 'a': exited 3" in result.stderr and "a fails" in result.stderr.split("error:")[1]
    assert "layer 'b' stopped" in result.stderr
    log = next((store_dir / "ocibuild" / "logs").glob("b-*.log")).read_text()
    assert "b started" in log  # b was running when a failed
    store = Store.open(store_dir)
    assert [(d.ref_name or "").split("-")[0] for d in store.index().manifests] == ["base"]
    assert store.verify() == []
    assert "ocibuild-b-" not in podman("ps", "-a", "--format", "{{.Names}}").stdout


CACHED_LAYER = 'kind = "run"\nneeds = ["base"]\nscript = "s.sh"\nnetwork = false\n'
CACHE_SCRIPT = """
# the caches: /srv/dir is in the image; /new/sub/cache is not, so podman makes it (and /new/sub, /new)
mkdir -p /opt
if [ -f /srv/dir/fetched ]; then echo "kept: $(cat /srv/dir/fetched)" > /opt/saw; else echo none > /opt/saw; fi
echo "round {round}" > /srv/dir/fetched
echo data > /new/sub/cache/data
"""


def test_run_layer_caches_persist_between_builds_outside_the_layer_and_its_key(tmp_path: Path) -> None:
    """A run layer's caches: what the first build writes there the second build of a changed recipe reads; the
    layer holds none of it (nor the mount points podman made), the key ignores the list, gc --caches removes it."""
    caches = 'caches = ["/srv/dir", "/new/sub/cache"]\n'
    root = project(tmp_path, {"app": CACHED_LAYER + caches}, {"layers/app/s.sh": CACHE_SCRIPT.format(round=1)})
    store_dir = tmp_path / "store"
    first = build(root, store_dir)
    store = Store.open(store_dir)
    listing = layer_listing(store, "bb", 1)
    assert listing["opt/saw"].startswith("file:") and not any(p.startswith(("srv", "new")) for p in listing)
    [cache_dir] = [c for c in (store_dir / "ocibuild" / "caches").glob("*/podman/layers/app/*") if c.is_dir()
                   and (c / "fetched").exists()]
    assert (cache_dir / "fetched").read_text() == "round 1\n"

    # the key does not depend on the caches: without them, or with others, the layer is cached
    (root / "layers/app/layer.toml").write_text(CACHED_LAYER)
    assert [l["status"] for l in build(root, store_dir)["layers"]] == ["cached", "cached"]
    (root / "layers/app/layer.toml").write_text(CACHED_LAYER + caches)

    (root / "layers/app/s.sh").write_text(CACHE_SCRIPT.format(round=2))  # a changed recipe: the layer rebuilds
    second = build(root, store_dir)
    assert [l["status"] for l in second["layers"]] == ["cached", "built"] and second["digest"] != first["digest"]
    listing = layer_listing(Store.open(store_dir), "bb", 1)
    assert listing["opt/saw"].startswith("file:") and not any(p.startswith(("srv", "new")) for p in listing)
    assert (cache_dir / "fetched").read_text() == "round 2\n"
    out = subprocess.run([*OCIBUILD, "run", "-C", str(root), "--store", str(store_dir), "--", "cat", "/opt/saw"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip() == "kept: round 1", out.stderr

    removed = json.loads(subprocess.run([*OCIBUILD, "gc", "--store", str(store_dir), "--caches", "--json"],
                                        capture_output=True, text=True, timeout=600).stdout)["caches"]
    assert sorted((c["layer"], c["path"]) for c in removed) == [("app", "/new/sub/cache"), ("app", "/srv/dir")]
    assert not cache_dir.exists()
    assert Store.open(store_dir).verify() == []


def explain(root: Path, store: Path, layer: str, *extra: str) -> dict:
    result = subprocess.run([*OCIBUILD, "explain", layer, "--json", "-C", str(root), "--store", str(store), *extra],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def named(doc: dict) -> list[tuple[str, str | None]]:
    return [(d["what"], d["name"]) for d in doc["differences"]]


def test_explain_names_what_changed_in_a_run_layer_against_the_store_and_the_cache(tmp_path: Path,
                                                                                   registry) -> None:
    """One input file, one recipe field, one need changed in turn: explain names each, in the store, and in the
    registry cache for a store that has no entry of the layer; a layer never built says so."""
    layer = 'kind = "run"\nneeds = ["base"]\nscript = "s.sh"\ninputs = ["data.txt", "other.txt"]\nnetwork = false\n'
    root = project(tmp_path, {"app": layer},
                   {"layers/app/s.sh": "mkdir -p /opt && cat /ocibuild/inputs/data.txt > /opt/data\n",
                    "layers/app/data.txt": "1\n", "layers/app/other.txt": "same\n"})
    store, cache = tmp_path / "store", f"{registry.host}/explain/cache"
    build(root, store)
    assert explain(root, store, "app")["status"] == "cached"

    (root / "layers/app/data.txt").write_text("2\n")
    doc = explain(root, store, "app")
    assert doc["status"] == "build" and doc["compared"]["where"] == "store"
    assert named(doc) == [("input", "layers/app/data.txt")]
    (root / "layers/app/data.txt").write_text("1\n")

    (root / "layers/app/layer.toml").write_text(layer + 'workdir = "/opt"\n')
    assert [(d["name"], d["before"], d["now"]) for d in explain(root, store, "app")["differences"]] == [
        ("workdir", "/", "/opt")]
    (root / "layers/app/layer.toml").write_text(layer)

    (root / "rootfs/etc/motd").write_text("a new base\n")
    doc = explain(root, store, "app")
    assert named(doc) == [("need", "base")] and doc["differences"][0]["status"] == "build"
    (root / "rootfs/etc/motd").write_text("old\n")

    # a store without the layer's entries, and the registry cache that has them
    subprocess.run([*OCIBUILD, "push-cache", cache, "-C", str(root), "--store", str(store)], check=True,
                   capture_output=True, timeout=600)
    (root / "layers/app/other.txt").write_text("changed\n")
    fresh = tmp_path / "fresh"
    doc = explain(root, fresh, "app", "--cache", cache)
    assert doc["compared"]["where"] == cache and named(doc) == [("input", "layers/app/other.txt")]
    assert explain(root, fresh, "app", "--offline")["compared"] is None  # the store alone has none

    never = explain(root, fresh, "app", "--cache", f"{registry.host}/explain/empty")
    assert (never["status"], never["compared"]) == ("build", None)


def test_a_merge_redone_for_another_layers_packages_reuses_the_ldconfig_cache(tmp_path: Path,
                                                                              podman: Podman) -> None:
    """a and b each run ldconfig (independent holders of ld.so.cache: ldconfig must run over both); c and d each
    write dpkg's status. Changing c redoes the merge (its status changed) but not ldconfig, whose stack (base, a,
    b) is the same: the stand-in ldconfig writes a fresh random line on each run, and the cache stays the same."""
    lib = "mkdir -p /usr/lib && echo {0} > /usr/lib/{0}.so && ldconfig\n"
    status = "mkdir -p /var/lib/dpkg && printf 'Package: {0}\\nArchitecture: all\\nVersion: {1}\\n\\n' " \
             ">> /var/lib/dpkg/status\n"
    layer = 'kind = "run"\nneeds = ["base"]\nscript = "s.sh"\nnetwork = false\n'
    root = project(tmp_path, {name: layer for name in "abcd"},
                   {"layers/a/s.sh": lib.format("liba"), "layers/b/s.sh": lib.format("libb"),
                    "layers/c/s.sh": status.format("c", 1), "layers/d/s.sh": status.format("d", 1),
                    "rootfs/bin/ldconfig": "#!/bin/sh\n(ls /usr/lib | grep '[.]so$'; cat /proc/sys/kernel/random/uuid)"
                                           " > /etc/ld.so.cache\n",
                    "rootfs/var/lib/dpkg/status": "Package: base\nArchitecture: all\nVersion: 1\n\n"})
    (root / "rootfs/bin/ldconfig").chmod(0o755)
    store_dir = tmp_path / "store"
    build(root, store_dir)
    first = podman_run(podman, store_dir, "bb", "sh", "-c", "cat /etc/ld.so.cache /var/lib/dpkg/status")
    (root / "layers/c/s.sh").write_text(status.format("c", 2))
    edited = build(root, store_dir)
    assert [l["status"] for l in edited["layers"]] == ["cached", "cached", "cached", "built", "cached"]
    second = podman_run(podman, store_dir, "bb", "sh", "-c", "cat /etc/ld.so.cache /var/lib/dpkg/status")
    cache_lines = first.split("Package:")[0].split()
    assert cache_lines[:2] == ["liba.so", "libb.so"] and len(cache_lines) == 3  # the libraries, and the uuid
    assert second.split("Package:")[0].split() == cache_lines  # ldconfig did not run again
    assert "Package: c\nArchitecture: all\nVersion: 2" in second and "Package: d" in second
    assert "Package: base" in second
    assert Store.open(store_dir).verify() == []
