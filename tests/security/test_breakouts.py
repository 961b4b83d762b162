"""Malicious layers, in the spirit of containerd's TestBreakouts.

Each case is a named archive (or a stack of layers) built here with tarfile. Whatever happens, nothing outside the
extraction root may change: a sentinel file and its directory next to the root are snapshotted before and compared
after (content, mode, link count -- a hardlink to the sentinel would raise it).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import shutil
import stat
import tarfile
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import zstandard

from ocibuild.tar import extract, read
from ocibuild.errors import UnsafeArchive

Member = tuple[tarfile.TarInfo, bytes | None]


def f(name: str, data: bytes = b"pwned", mode: int = 0o644) -> Member:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), mode
    return info, data


def d(name: str, mode: int = 0o755) -> Member:
    info = tarfile.TarInfo(name)
    info.type, info.mode = tarfile.DIRTYPE, mode
    return info, None


def sym(name: str, target: str) -> Member:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.SYMTYPE, target
    return info, None


def link(name: str, target: str) -> Member:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.LNKTYPE, target
    return info, None


def special(name: str, kind: bytes) -> Member:
    info = tarfile.TarInfo(name)
    info.type, info.devmajor, info.devminor = kind, 1, 3
    return info, None


def pax(name: str, path: str) -> Member:
    info = tarfile.TarInfo(name)
    info.pax_headers = {"path": path}
    info.size = 5
    return info, b"pwned"


def layer(*members: Member, fmt: int = tarfile.PAX_FORMAT, compression: str = "none") -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    plain = out.getvalue()
    if compression == "gzip":
        return gzip.compress(plain)
    if compression == "zstd":
        return zstandard.ZstdCompressor().compress(plain)
    return plain


@dataclass
class Jail:
    base: Path
    root: Path
    outside: Path
    sentinel: Path

    def snapshot(self) -> dict[str, tuple[object, ...]]:
        state: dict[str, tuple[object, ...]] = {}
        for dirpath, dirnames, filenames in os.walk(self.base):
            if Path(dirpath) == self.base:
                dirnames.remove("root")
            for name in dirnames + filenames:
                path = Path(dirpath, name)
                st = path.lstat()
                if stat.S_ISLNK(st.st_mode):
                    detail: object = os.readlink(path)
                elif stat.S_ISREG(st.st_mode):
                    detail = hashlib.sha256(path.read_bytes()).hexdigest()
                else:
                    detail = None
                state[str(path)] = (stat.S_IFMT(st.st_mode), st.st_mode & 0o7777, st.st_nlink, st.st_uid, detail)
        return state

    def extract(self, *layers: bytes, compression: str = "none", max_size: int | None = None) -> None:
        for i, data in enumerate(layers):
            extract.extract_layer(
                io.BytesIO(data), compression, self.root, what=f"layer {i}", chown=False, max_size=max_size
            )


@pytest.fixture
def jail(tmp_path: Path) -> Jail:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    sentinel = outside / "sentinel"
    sentinel.write_bytes(b"do not touch")
    sentinel.chmod(0o600)
    return Jail(tmp_path, root, outside, sentinel)


# name -> (layers, expected error text or None when the layers are safe to apply)
CASES: dict[str, tuple[Callable[[Jail], list[bytes]], str | None]] = {
    "dotdot_file": (lambda j: [layer(f("../outside/sentinel"))], "has a '..' component"),
    "dotdot_nested": (lambda j: [layer(d("a"), f("a/b/../../../outside/sentinel"))], "has a '..' component"),
    "dotdot_in_pax_path": (lambda j: [layer(pax("harmless", "../outside/sentinel"))], "has a '..' component"),
    "dotdot_in_gnu_longname": (
        lambda j: [layer(f("../outside/" + "x" * 120), fmt=tarfile.GNU_FORMAT)],
        "has a '..' component",
    ),
    "nul_in_pax_path": (lambda j: [layer(pax("harmless", "ok\x00/../../outside/sentinel"))], "NUL byte"),
    "absolute_path_stays_inside": (lambda j: [layer(f(str(j.sentinel)))], None),
    "symlink_to_root_then_file": (
        lambda j: [layer(sym("l", "/"), f("l" + str(j.sentinel)))],
        "beneath symlink 'l'",
    ),
    "symlink_dotdot_then_file": (lambda j: [layer(sym("l", "../outside"), f("l/sentinel"))], "beneath symlink 'l'"),
    "symlink_chain": (
        lambda j: [layer(sym("a", "b"), sym("b", "c"), sym("c", "../outside"), f("a/sentinel"))],
        "beneath symlink 'a'",
    ),
    "symlink_from_earlier_layer": (
        lambda j: [layer(sym("l", str(j.outside))), layer(f("l/sentinel"))],
        "written through the symlink 'l'",
    ),
    "relative_symlink_chain_from_earlier_layer": (
        lambda j: [layer(d("a"), sym("a/up", ".."), sym("a/out", "up/../outside")), layer(f("a/out/sentinel"))],
        "written through the symlink 'a/out'",
    ),
    "dir_through_symlink_from_earlier_layer": (
        lambda j: [layer(sym("l", str(j.outside))), layer(d("l/new"))],
        "written through the symlink 'l'",
    ),
    "file_replaces_symlink_to_outside_file": (
        lambda j: [layer(sym("f", str(j.sentinel))), layer(f("f", b"replaced"))],
        None,
    ),
    "dir_replaces_symlink_to_outside_dir": (
        lambda j: [layer(sym("d", str(j.outside))), layer(d("d"), f("d/sentinel"))],
        None,
    ),
    "hardlink_dotdot": (lambda j: [layer(link("h", "../outside/sentinel"))], "has a '..' component"),
    "hardlink_absolute_outside": (lambda j: [layer(link("h", str(j.sentinel)))], "not to a regular file earlier"),
    "hardlink_through_symlink_same_layer": (
        lambda j: [layer(sym("l", str(j.outside)), link("h", "l/sentinel"))],
        "not to a regular file earlier",
    ),
    "hardlink_to_file_under_replaced_dir": (
        lambda j: [layer(d("d"), f("d/f"), sym("d", str(j.outside)), link("h", "d/f"))],
        "not to a regular file earlier",
    ),
    "hardlink_through_symlink_from_earlier_layer": (
        lambda j: [layer(sym("l", str(j.outside))), layer(link("h", "l/sentinel"))],
        "not to a regular file earlier",
    ),
    "hardlink_to_symlink_to_outside": (
        lambda j: [layer(sym("s", str(j.sentinel)), link("h", "s"))],
        "not to a regular file earlier",
    ),
    "hardlink_to_directory": (lambda j: [layer(d("d"), link("h", "d"))], "not to a regular file earlier"),
    "char_device": (lambda j: [layer(special("null", tarfile.CHRTYPE))], "is a character device node"),
    "block_device": (lambda j: [layer(special("sda", tarfile.BLKTYPE))], "is a block device node"),
    "fifo": (lambda j: [layer(special("pipe", tarfile.FIFOTYPE))], "is a fifo"),
    "root_replaced_by_symlink": (lambda j: [layer(sym(".", "/"))], "would replace the root"),
    "whiteout_of_dotdot": (lambda j: [layer(d("a"), f("a/.wh..."))], "whiteout of an invalid name"),
    "whiteout_with_dotdot_path": (lambda j: [layer(f("../outside/.wh.sentinel"))], "has a '..' component"),
    "whiteout_through_symlink_from_earlier_layer": (
        lambda j: [layer(sym("l", str(j.outside))), layer(f("l/.wh.sentinel"))],
        "written through the symlink 'l'",
    ),
    "whiteout_of_symlink_to_outside_dir": (
        lambda j: [layer(sym("l", str(j.outside))), layer(f(".wh.l"))],
        None,
    ),
    "opaque_through_symlink_from_earlier_layer": (
        lambda j: [layer(sym("l", str(j.outside))), layer(f("l/.wh..wh..opq"))],
        "written through the symlink 'l'",
    ),
    "opaque_at_root": (
        lambda j: [layer(f("a"), d("b"), f("b/c"), sym("l", str(j.outside))), layer(f(".wh..wh..opq"), f("new"))],
        None,
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_breakout(jail: Jail, name: str) -> None:
    make, error = CASES[name]
    layers = make(jail)
    before = jail.snapshot()
    if error is None:
        jail.extract(*layers)
    else:
        with pytest.raises(UnsafeArchive, match=error) as caught:
            jail.extract(*layers)
        assert str(caught.value).startswith("layer ") and "\n" not in str(caught.value)
        assert caught.value.hint
    assert jail.snapshot() == before


def test_safe_cases_leave_the_expected_tree(jail: Jail) -> None:
    jail.extract(*CASES["absolute_path_stays_inside"][0](jail))
    assert (jail.root / str(jail.sentinel).lstrip("/")).read_bytes() == b"pwned"
    jail.extract(*CASES["file_replaces_symlink_to_outside_file"][0](jail))
    assert not (jail.root / "f").is_symlink() and (jail.root / "f").read_bytes() == b"replaced"
    jail.extract(*CASES["dir_replaces_symlink_to_outside_dir"][0](jail))
    assert (jail.root / "d").is_dir() and not (jail.root / "d").is_symlink()
    jail.extract(*CASES["whiteout_of_symlink_to_outside_dir"][0](jail))
    assert not os.path.lexists(jail.root / "l")
    assert jail.sentinel.read_bytes() == b"do not touch"


def test_opaque_at_root_empties_the_lower_root(jail: Jail) -> None:
    jail.extract(*CASES["opaque_at_root"][0](jail))
    assert sorted(os.listdir(jail.root)) == ["new"]
    assert jail.sentinel.read_bytes() == b"do not touch"


def _huge_pax_header() -> bytes:
    info = tarfile.TarInfo("././@PaxHeader")
    info.type, info.size = tarfile.XHDTYPE, 4 << 30  # claims 4 GiB
    return info.tobuf(format=tarfile.USTAR_FORMAT) + b"30 path=aaaaaaaaaaaaaaaaaaaaa\n" + bytes(1000)


def test_oversize_pax_header_is_refused_without_reading_it(jail: Jail) -> None:
    before = jail.snapshot()
    with pytest.raises(UnsafeArchive, match=r"extended header at offset 0 is 4294967296 bytes"):
        jail.extract(_huge_pax_header())
    big = layer(pax("a", "b" * (2 << 20)))
    with pytest.raises(UnsafeArchive, match="extended header"):
        jail.extract(big)
    assert jail.snapshot() == before


def test_stacked_pax_headers_are_limited_together(jail: Jail) -> None:
    stack = b""
    for i in range(3):  # each under the limit, together over it
        record = b"%d SCHILY.xattr.user.k%d=" % (600_000, i)
        record += b"v" * (600_000 - len(record) - 1) + b"\n"
        info = tarfile.TarInfo("././@PaxHeader")
        info.type, info.size = tarfile.XHDTYPE, len(record)
        stack += info.tobuf(format=tarfile.USTAR_FORMAT) + record + bytes(-len(record) % 512)
    with pytest.raises(UnsafeArchive, match=r"extended header at offset 600576 is 600000 bytes \(the limit is 1048576 for all"):
        jail.extract(stack + layer(f("a")))


def test_oversize_gnu_longname_is_refused(jail: Jail) -> None:
    info = tarfile.TarInfo("././@LongLink")
    info.type, info.size = tarfile.GNUTYPE_LONGNAME, 8 << 20
    with pytest.raises(UnsafeArchive, match="extended header"):
        jail.extract(info.tobuf(format=tarfile.USTAR_FORMAT) + bytes(8 << 20))


def test_truncated_plain_stream(jail: Jail) -> None:
    whole = layer(d("dir"), f("dir/a", os.urandom(20000)), f("dir/b", b"b" * 5000))
    before = jail.snapshot()
    # inside a header, inside dir/a, inside dir/b's header, inside dir/b
    for cut in (700, 512 * 2 + 10000, 512 * 2 + 20480 + 100, 512 * 3 + 20480 + 100, 0):
        with pytest.raises(UnsafeArchive, match="is truncated or corrupt"):
            jail.extract(whole[:cut])
    assert jail.snapshot() == before
    # right after dir/a's data, where dir/b's header would start: a whole layer without end-of-archive blocks (as
    # umoci writes them), holding dir and dir/a
    shutil.rmtree(jail.root / "dir", ignore_errors=True)
    jail.extract(whole[:512 * 2 + 20480])
    assert sorted(p.name for p in (jail.root / "dir").iterdir()) == ["a"] and jail.snapshot() == before


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_truncated_compressed_stream(jail: Jail, compression: str) -> None:
    whole = layer(d("dir"), f("dir/a", os.urandom(20000)), f("dir/b", b"b" * 5000), compression=compression)
    before = jail.snapshot()
    for cut in (len(whole) // 2, len(whole) // 4, 100, 2):
        with pytest.raises(UnsafeArchive, match="is truncated or corrupt"):
            jail.extract(whole[:cut], compression=compression)
    assert jail.snapshot() == before


def test_corrupt_header_checksum(jail: Jail) -> None:
    data = bytearray(layer(f("a", b"x"), f("b", b"y")))
    data[1024 + 10] ^= 0xFF  # the second header's name
    with pytest.raises(UnsafeArchive, match="bad tar header checksum at offset 1024"):
        jail.extract(bytes(data))


def test_empty_stream(jail: Jail) -> None:
    with pytest.raises(UnsafeArchive, match=r"layer 0 is truncated or corrupt \(it is empty\)"):
        jail.extract(b"")


class _Zeros(io.RawIOBase):
    def __init__(self, size: int) -> None:
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        n = min(len(buffer), self.left)
        buffer[:n] = bytes(n)
        self.left -= n
        return n


def _bomb(size: int) -> bytes:
    """A gzip layer of one file of ``size`` zero bytes: about a thousandth of its expanded size."""
    plain = io.BytesIO()
    with tarfile.open(fileobj=plain, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("zeros")
        info.size = size
        tar.addfile(info, _Zeros(size))
    return gzip.compress(plain.getvalue(), compresslevel=1)


def test_decompression_bomb_is_refused_beyond_max_size(jail: Jail) -> None:
    bomb = _bomb(64 << 20)
    assert len(bomb) < (1 << 20)
    before = jail.snapshot()
    tracemalloc.start()
    try:
        with pytest.raises(UnsafeArchive, match="layer 0 expands to more than 8388608 bytes"):
            jail.extract(bomb, compression="gzip", max_size=8 << 20)
        listing = read.list_layer(io.BytesIO(bomb), "gzip", what="bomb")  # no limit: streams in constant memory
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert listing["zeros"] == "file:0644:" + hashlib.sha256(bytes(64 << 20)).hexdigest()
    assert peak < 16 << 20
    assert jail.snapshot() == before
