"""ocibuild.build.run.capture over a root filesystem prepared on the host: what a run step made of each changed path
(xattrs, hard links) reaches the layer. The same with a real container: tests/integration/test_layer_fidelity.py."""

from __future__ import annotations

import io
import os
import struct
from pathlib import Path

from ocibuild.build.run import capture
from ocibuild.tar import read, write
from ocibuild.tar.write import Entry

EPOCH = 1_700_000_000
_UNDEFINED = 0xFFFFFFFF


def _acl(*entries: tuple[int, int, int]) -> bytes:
    """A POSIX ACL as the kernel stores it in system.posix_acl_*: version 2, then (tag, permissions, id)."""
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *entry) for entry in entries)


# user::rw- user:1234:r-- group::r-- mask::r-- other::r--, and for a directory's default group:100:r-x
ACCESS = _acl((0x01, 6, _UNDEFINED), (0x02, 4, 1234), (0x04, 4, _UNDEFINED), (0x10, 4, _UNDEFINED),
              (0x20, 4, _UNDEFINED))
DEFAULT = _acl((0x01, 7, _UNDEFINED), (0x04, 5, _UNDEFINED), (0x08, 5, 100), (0x10, 5, _UNDEFINED),
               (0x20, 5, _UNDEFINED))


def _root(tmp_path: Path) -> Path:
    """A container's root after a step: files with user xattrs and ACLs, a directory with a default ACL, one with
    an xattr of the overlay filesystem's own, and a file of three names (one of them excluded)."""
    root = tmp_path / "root"
    for d in ("etc", "srv/shared", "opt", "tmp"):
        (root / d).mkdir(parents=True)
    (root / "etc/motd").write_text("changed\n")
    os.setxattr(root / "etc/motd", "user.note", b"set by the step")
    os.setxattr(root / "etc/motd", "user.binary", b"\x00\xff\x01")
    (root / "etc/acl").write_text("acl\n")
    os.setxattr(root / "etc/acl", "system.posix_acl_access", ACCESS)
    os.setxattr(root / "srv/shared", "system.posix_acl_default", DEFAULT)
    os.setxattr(root / "srv", "user.overlay.origin", b"engine")
    (root / "opt/a").write_text("linked\n")
    os.link(root / "opt/a", root / "opt/z")
    os.link(root / "opt/a", root / "opt/m")
    os.link(root / "opt/a", root / "tmp/excluded")
    (root / "opt/single").write_text("alone\n")
    return root


CHANGES = {"/etc": "C", "/etc/motd": "C", "/etc/acl": "A", "/srv": "C", "/srv/shared": "A", "/opt": "A",
           "/opt/z": "A", "/opt/m": "A", "/opt/a": "A", "/opt/single": "A", "/tmp/excluded": "A"}


def _keep(path: str) -> bool:
    return not path.startswith("tmp/")


def _layer(entries: list[Entry]) -> tuple[bytes, dict[str, read.Member]]:
    out = io.BytesIO()
    write.write_layer(entries, out, "none", epoch=EPOCH)
    members = {m.path: m for m, _ in read.iter_members(io.BytesIO(out.getvalue()), "none", what="layer")}
    return out.getvalue(), members


def test_capture_keeps_user_xattrs_and_posix_acls_but_not_the_engines_own(tmp_path: Path) -> None:
    root = _root(tmp_path)
    entries = {e.path: e for e in capture(root, CHANGES, _keep, what="layer 'x'")}
    assert entries["etc/motd"].xattrs == {"user.binary": "\x00\udcff\x01", "user.note": "set by the step"}
    assert entries["etc/acl"].xattrs == {"system.posix_acl_access": ACCESS.decode("utf-8", "surrogateescape")}
    assert entries["srv/shared"].xattrs == {"system.posix_acl_default": DEFAULT.decode("utf-8", "surrogateescape")}
    assert entries["srv"].xattrs == {} and entries["opt/single"].xattrs == {}
    _, members = _layer(list(entries.values()))
    stored = {path: {k: v.encode("utf-8", "surrogateescape") for k, v in members[path].xattrs.items()}
              for path in ("etc/motd", "etc/acl", "srv/shared", "srv")}
    assert stored == {"etc/motd": {"user.note": b"set by the step", "user.binary": b"\x00\xff\x01"},
                      "etc/acl": {"system.posix_acl_access": ACCESS},
                      "srv/shared": {"system.posix_acl_default": DEFAULT}, "srv": {}}


def test_capture_writes_a_file_of_several_names_once_then_hardlinks(tmp_path: Path) -> None:
    root = _root(tmp_path)
    entries = capture(root, CHANGES, _keep, what="layer 'x'")
    data, members = _layer(entries)
    assert (members["opt/a"].type, members["opt/a"].size) == ("file", 7)
    assert [(members[p].type, members[p].linkname) for p in ("opt/m", "opt/z")] == [("hardlink", "opt/a")] * 2
    assert members["opt/single"].type == "file" and "tmp/excluded" not in members
    # the layer's bytes do not depend on the order the engine listed the changes in
    reordered = dict(reversed(list(CHANGES.items())))
    assert _layer(capture(root, reordered, _keep, what="layer 'x'"))[0] == data
    # a name alone in the change set (the others unchanged or excluded) is a file
    alone = capture(root, {"/opt": "A", "/opt/m": "A", "/tmp/excluded": "A"}, _keep, what="layer 'x'")
    assert [(e.path, e.type) for e in alone] == [("opt", "dir"), ("opt/m", "file")]

