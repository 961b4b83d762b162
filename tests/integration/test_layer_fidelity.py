"""Layers keep what the step made: file capabilities and hard links, checked by running the built image with
podman (``getcap`` and ``stat`` in the container), on the busybox base of test_run_layers.py.

busybox has no getcap or setcap: the host's (Debian's libcap2-bin, see scripts/setup-host) are copied into the base
with the shared libraries they load, at the same paths."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import Podman, require
from test_run_layers import build, layer_listing, podman_run, project
from ocibuild.store import Store

pytestmark = pytest.mark.podman
RUN = 'kind = "run"\nneeds = ["base"]\nscript = "s.sh"\nnetwork = false\n'


def with_tool(rootfs: Path, tool: str) -> None:
    """The host's ``tool`` in ``rootfs`` at the same path, with the shared libraries ``ldd`` names."""
    exe = Path(require(tool)).resolve()
    listed = subprocess.run(["ldd", str(exe)], capture_output=True, text=True, check=True).stdout
    for path in [str(exe), *re.findall(r"(/\S+) \(0x", listed)]:
        target = rootfs / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(Path(path).resolve(), target)


def test_copy_and_run_layers_keep_file_capabilities(tmp_path: Path, podman: Podman) -> None:
    """The base (a copy layer) has a file with a capability; the run layer sets one on a new file and only changes
    the mode of the base's file: `getcap` in the image sees all three, as after `podman build`."""
    root = project(tmp_path, {"app": RUN}, {"layers/app/s.sh": (
        "echo new > /usr/bin/new-tool && chmod 755 /usr/bin/new-tool\n"
        "setcap cap_net_raw+ep /usr/bin/new-tool\n"
        "chmod 700 /usr/bin/lower-tool\n")})
    rootfs = root / "rootfs"
    for tool in ("setcap", "getcap"):
        with_tool(rootfs, tool)
    (rootfs / "usr/bin").mkdir(parents=True, exist_ok=True)
    for name in ("lower-tool", "base-tool"):
        (rootfs / "usr/bin" / name).write_text(f"{name}\n")
        subprocess.run([require("setcap"), "cap_net_bind_service+ep", str(rootfs / "usr/bin" / name)], check=True)
    store_dir = tmp_path / "store"
    build(root, store_dir)
    listing = layer_listing(Store.open(store_dir), "bb", 1)
    assert ":xattrs:" in listing["usr/bin/lower-tool"] and "usr/bin/base-tool" not in listing  # the base's
    out = podman_run(podman, store_dir, "bb", "sh", "-c",
                     "getcap /usr/bin/base-tool /usr/bin/new-tool /usr/bin/lower-tool; stat -c %a /usr/bin/lower-tool")
    assert out.splitlines() == ["/usr/bin/base-tool cap_net_bind_service=ep", "/usr/bin/new-tool cap_net_raw=ep",
                                "/usr/bin/lower-tool cap_net_bind_service=ep", "700"]


def test_run_and_copy_layers_keep_hard_links(tmp_path: Path, podman: Podman) -> None:
    """Names of one file made by the step (run layer) and found in the project's tree (copy layer) are one inode
    in the container; the content is stored once, under the first name."""
    root = project(tmp_path, {"app": RUN}, {"layers/app/s.sh": (
        "mkdir -p /opt/app && echo made > /opt/app/m\nln /opt/app/m /opt/app/a\nln /opt/app/m /opt/app/z\n")})
    (root / "rootfs/srv/dir/same").write_text("copied\n")
    (root / "rootfs/srv/dir/old").unlink()
    (root / "rootfs/srv/dir/old").hardlink_to(root / "rootfs/srv/dir/same")
    store_dir = tmp_path / "store"
    build(root, store_dir)
    store = Store.open(store_dir)
    assert layer_listing(store, "bb", 0)["srv/dir/same"] == "hardlink:srv/dir/old"
    listing = layer_listing(store, "bb", 1)
    assert listing["opt/app/a"].startswith("file:") and listing["opt/app/m"] == listing["opt/app/z"] == \
        "hardlink:opt/app/a"
    out = podman_run(podman, store_dir, "bb", "stat", "-c", "%i %h %n", "/opt/app/a", "/opt/app/m", "/opt/app/z",
                     "/srv/dir/old", "/srv/dir/same")
    rows = [line.split() for line in out.splitlines()]
    assert [(links, name) for _, links, name in rows] == [
        ("3", "/opt/app/a"), ("3", "/opt/app/m"), ("3", "/opt/app/z"), ("2", "/srv/dir/old"), ("2", "/srv/dir/same")]
    assert len({inode for inode, _, _ in rows[:3]}) == 1 and len({inode for inode, _, _ in rows[3:]}) == 1
