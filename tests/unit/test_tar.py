"""ocibuild.tar: reproducible layer writing, reading back (ours, GNU tar, Python tarfile), archives, extraction."""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import lzma
import os
import shutil
import struct
import subprocess
import tarfile
from dataclasses import replace
from pathlib import Path

import pytest
import zstandard

from ocibuild.tar import codecs, extract, read, write
from ocibuild.errors import FormatError, OcibuildError, UnsafeArchive
from ocibuild.tar.write import Entry

EPOCH = 1_700_000_000
LONG_DIR = "usr/share/" + "d" * 120  # > 100 bytes, no ustar split possible
DEEP = "/".join(["segment-" + str(i).zfill(3) for i in range(30)])  # > 255 bytes, splits nowhere


def _file(tmp_path: Path, name: str, data: bytes) -> str:
    path = tmp_path / "src" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return str(path)


def _sample(tmp_path: Path) -> list[Entry]:
    hello = _file(tmp_path, "hello", b"hello\n" * 100)
    binary = _file(tmp_path, "binary", bytes(range(256)) * 41)
    return write.with_parents(
        [
            Entry("usr/bin/hello", "file", 0o755, size=600, source=hello, mtime=EPOCH - 5),
            Entry("usr/bin/hello-again", "hardlink", 0o755, linkname="usr/bin/hello"),
            Entry("usr/bin/sh", "symlink", 0o777, linkname="/bin/bash"),
            Entry("usr/lib/setuid", "file", 0o4755, uid=0, gid=50, size=256 * 41, source=binary),
            Entry("usr/lib/empty", "file", 0o600, uid=1000, gid=1000),
            Entry(f"{LONG_DIR}/file", "file", 0o644, size=600, source=hello),
            Entry(f"{DEEP}/leaf", "file", 0o644, size=600, source=hello),
            Entry("usr/share/ünïcödé", "file", 0o644, size=600, source=hello),
            Entry("usr/share/big-ids", "file", 0o644, uid=5_000_000, gid=4_000_000, size=600, source=hello),
            Entry("usr/bin/ping", "file", 0o755, size=600, source=hello, xattrs={"security.capability": "\x01\x02"}),
            Entry("usr/link-long", "symlink", 0o777, linkname="../" + "t" * 150),
            Entry("etc/app", "dir", 0o750, uid=7, gid=8),
        ],
        mtime=EPOCH,
    )


def _write(
    entries: list[Entry], compression: str = "none", *, epoch: int = EPOCH, threads: int | None = None
) -> tuple[bytes, write.LayerStats]:
    out = io.BytesIO()
    stats = write.write_layer(entries, out, compression, epoch=epoch, threads=threads)
    return out.getvalue(), stats


def _plain(data: bytes, compression: str) -> bytes:
    out = io.BytesIO()
    codecs.decompress_to(io.BytesIO(data), out, compression)
    return out.getvalue()


@pytest.mark.parametrize("compression", ["none", "gzip", "zstd"])
def test_round_trip(tmp_path: Path, compression: str) -> None:
    entries = _sample(tmp_path)
    data, stats = _write(entries, compression)
    assert stats.entries == len(entries)
    plain = _plain(data, compression)
    assert len(plain) == stats.uncompressed_size and len(plain) % 512 == 0
    assert hashlib.sha256(plain).hexdigest() == stats.diff_id.hex
    members = {}
    for member, reader in read.iter_members(io.BytesIO(data), compression, what="layer"):
        members[member.path] = (member, reader.read() if reader else None)
    assert set(members) == {e.path for e in entries}
    hello, content = members["usr/bin/hello"]
    assert (hello.type, hello.mode, hello.mtime, content) == ("file", 0o755, EPOCH - 5, b"hello\n" * 100)
    assert members["usr/bin/hello-again"][0].type == "hardlink"
    assert members["usr/bin/hello-again"][0].linkname == "usr/bin/hello"
    assert members["usr/bin/sh"][0].linkname == "/bin/bash"
    assert members["usr/lib/setuid"][0].mode == 0o4755 and members["usr/lib/setuid"][0].gid == 50
    assert members["usr/lib/setuid"][1] == bytes(range(256)) * 41
    assert members["usr/lib/empty"][1] == b""
    assert members[f"{LONG_DIR}/file"][1] == b"hello\n" * 100
    assert members[f"{DEEP}/leaf"][1] == b"hello\n" * 100 and len(DEEP) > 255
    assert members["usr/share/ünïcödé"][1] == b"hello\n" * 100
    big = members["usr/share/big-ids"][0]
    assert (big.uid, big.gid) == (5_000_000, 4_000_000)
    assert members["usr/bin/ping"][0].xattrs == {"security.capability": "\x01\x02"}
    assert members["usr/link-long"][0].linkname == "../" + "t" * 150
    app = members["etc/app"][0]
    assert (app.type, app.mode, app.uid, app.gid) == ("dir", 0o750, 7, 8)


def test_list_layer_fingerprints(tmp_path: Path) -> None:
    data, _ = _write(_sample(tmp_path), "zstd")
    listing = read.list_layer(io.BytesIO(data), "zstd", what="layer")
    assert listing["usr/bin/hello"] == "file:0755:" + hashlib.sha256(b"hello\n" * 100).hexdigest()
    assert listing["usr/bin/hello-again"] == "hardlink:usr/bin/hello"
    assert listing["usr/bin/sh"] == "symlink:/bin/bash"
    assert listing["etc/app"] == "dir:0750"


def test_listing_tells_apart_files_and_directories_that_differ_only_in_xattrs(tmp_path: Path) -> None:
    """Two independent layers that put the same bytes at a path, one with a capability, disagree about it; the
    fingerprint does not depend on the order the xattrs were given in, nor do the layer's bytes."""
    source = _file(tmp_path, "x", b"x")

    def layer(xattrs: dict[str, str]) -> tuple[bytes, dict[str, str]]:
        data, stats = _write([Entry("bin", "dir", 0o755, xattrs=xattrs),
                              Entry("bin/ping", "file", 0o755, size=1, source=source, xattrs=xattrs)])
        listing = read.list_layer(io.BytesIO(data), "none", what="layer")
        assert stats.listing == listing
        return data, listing

    _, plain = layer({})
    _, capable = layer({"security.capability": "\x01\x00\x00\x02"})
    data, both = layer({"user.b": "2", "security.capability": "\x01\x00\x00\x02"})
    again, same = layer({"security.capability": "\x01\x00\x00\x02", "user.b": "2"})
    assert plain["bin/ping"] == "file:0755:" + hashlib.sha256(b"x").hexdigest() and plain["bin"] == "dir:0755"
    for path in ("bin", "bin/ping"):
        assert len({plain[path], capable[path], both[path]}) == 3
        assert capable[path].startswith(plain[path] + ":xattrs:")
    assert (data, both) == (again, same)


def test_gnu_tar_reads_our_layer(tmp_path: Path) -> None:
    data, _ = _write(_sample(tmp_path), "zstd")
    plain = _plain(data, "zstd")
    listing = subprocess.run(
        ["tar", "--numeric-owner", "-tvf", "-"], input=plain, capture_output=True, check=True
    ).stdout.decode()
    rows = listing.splitlines()
    assert any(row.startswith("-rwsr-xr-x 0/50 ") and row.endswith(" usr/lib/setuid") for row in rows)
    assert any(row.startswith("drwxr-x--- 7/8 ") and row.endswith(" etc/app/") for row in rows)
    assert any(row.startswith("-rw-r--r-- 5000000/4000000 ") for row in rows)
    assert any(row.endswith(" usr/bin/hello-again link to usr/bin/hello") for row in rows)
    assert any(row.endswith(" usr/bin/sh -> /bin/bash") for row in rows)
    names = {row.split()[-1] for row in rows}
    assert f"{DEEP}/leaf" in names and "usr/share/ünïcödé" in names
    out = tmp_path / "gnu"
    out.mkdir()
    subprocess.run(["tar", "-xf", "-", "-C", str(out)], input=plain, check=True)
    assert (out / DEEP / "leaf").read_bytes() == b"hello\n" * 100
    assert os.stat(out / "usr/bin/hello").st_ino == os.stat(out / "usr/bin/hello-again").st_ino


def test_python_tarfile_reads_our_layer(tmp_path: Path) -> None:
    data, _ = _write(_sample(tmp_path), "gzip")
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        members = {m.name: m for m in tar}
        assert tar.extractfile(members["usr/share/ünïcödé"]).read() == b"hello\n" * 100  # type: ignore[union-attr]
    assert members["usr/lib/setuid"].mode == 0o4755
    assert members["usr/bin/hello-again"].islnk() and members["usr/bin/hello-again"].linkname == "usr/bin/hello"
    assert members["usr/share/big-ids"].uid == 5_000_000
    assert members["usr/bin/ping"].pax_headers["SCHILY.xattr.security.capability"] == "\x01\x02"
    assert members["etc/app"].isdir() and members["usr/bin/hello"].mtime == EPOCH - 5


def test_output_is_reproducible(tmp_path: Path) -> None:
    entries = _sample(tmp_path)
    newer = [e if e.mtime < EPOCH else replace(e, mtime=EPOCH + 999) for e in entries]
    for compression in ("none", "gzip", "zstd"):
        first, stats = _write(entries, compression)
        again, _ = _write(list(reversed(entries)), compression)
        clamped, _ = _write(newer, compression)
        assert first == again == clamped, compression
    assert stats.diff_id == _write(entries, "none")[1].diff_id  # the same tar whatever the compression


def test_zstd_output_does_not_depend_on_thread_count(tmp_path: Path) -> None:
    rng = hashlib.sha256(b"seed")
    noise = b"".join(rng.digest() + (rng := hashlib.sha256(rng.digest())).digest() for _ in range(40_000))
    text = b"".join(b"line %d of some compressible text\n" % i for i in range(200_000))
    entries = [
        Entry("noise", "file", 0o644, size=len(noise), source=_file(tmp_path, "noise", noise)),
        Entry("text", "file", 0o644, size=len(text), source=_file(tmp_path, "text", text)),
        Entry("text2", "file", 0o644, size=len(text), source=str(tmp_path / "src/text")),
    ]
    one, stats = _write(entries, "zstd", threads=1)
    four, _ = _write(entries, "zstd", threads=4)
    assert stats.uncompressed_size > 10 << 20
    assert one == four
    assert zstandard.ZstdDecompressor().stream_reader(io.BytesIO(one)).read() == _write(entries, "none")[0]
    subprocess.run(["zstd", "-t", "-q"], input=one, check=True)


def test_stream_length_is_never_a_multiple_of_the_zstd_job_size(tmp_path: Path) -> None:
    size = (1 << 20) - 3 * 512  # header + content + end blocks would be exactly 1 MiB
    entry = Entry("f", "file", 0o644, size=size, source=_file(tmp_path, "f", b"x" * size))
    data, stats = _write([entry])
    assert stats.uncompressed_size == (1 << 20) + 512 and data.endswith(bytes(1536))
    assert read.list_layer(io.BytesIO(data), "none", what="layer")["f"].startswith("file:0644:")


def test_gzip_is_deterministic_and_valid(tmp_path: Path) -> None:
    data, stats = _write(_sample(tmp_path), "gzip")
    assert data[:10] == b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"  # no name, mtime 0
    assert data == _write(_sample(tmp_path), "gzip")[0]
    subprocess.run(["gzip", "-t"], input=data, check=True)
    assert hashlib.sha256(gzip.decompress(data)).hexdigest() == stats.diff_id.hex


def test_with_parents() -> None:
    entries = write.with_parents(
        [Entry("a/b/c", "file", 0o644), Entry("a", "dir", 0o700), Entry("x/y", "symlink", 0o777, linkname="z")],
        uid=5, gid=6, mode=0o750, mtime=9,
    )  # fmt: skip
    assert [e.path for e in entries] == ["a", "a/b", "a/b/c", "x", "x/y"]
    assert entries[0].mode == 0o700
    added = entries[1]
    assert (added.type, added.mode, added.uid, added.gid, added.mtime) == ("dir", 0o750, 5, 6, 9)


def test_sort_order_is_tar_sort_name(tmp_path: Path) -> None:
    names = ["lib-x", "lib/a", "lib", "lib.d", "Z", "a b"]
    entries = write.with_parents([Entry(n, "file", 0o644) for n in names if n != "lib"])
    data, _ = _write(entries)
    order = [m.path for m, _ in read.iter_members(io.BytesIO(data), "none", what="layer")]
    assert order == ["Z", "a b", "lib", "lib/a", "lib-x", "lib.d"]
    tree = tmp_path / "tree"
    for name in order:
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        if name != "lib":
            (tree / name).write_bytes(b"")
    gnu = subprocess.run(["tar", "--sort=name", "-cf", "-", "-C", str(tree), *sorted(os.listdir(tree))],
                         capture_output=True, check=True).stdout  # fmt: skip
    assert [m.path for m, _ in read.iter_members(io.BytesIO(gnu), "none", what="gnu")] == order


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_writer_lists_the_layer_as_reading_it_back_does(tmp_path: Path, compression: str) -> None:
    """The listing and kept content the writer returns are what reading its blob gives, for every kind of
    member: hard links (a chain, rewritten to the first path), symlinks, directories, whiteouts, opaque and aufs
    markers, empty and multi-chunk files, long and non-ASCII paths."""
    big = _file(tmp_path, "big", os.urandom(9 << 20))  # spans several of the writer's buffer chunks
    shared = _file(tmp_path, "shared", b"shared")
    status = _file(tmp_path, "status", b"Package: a\n")
    entries = write.with_parents([*_sample(tmp_path),
        Entry("opt/big", "file", 0o640, size=9 << 20, source=big),
        Entry("z/content", "file", 0o700, size=6, source=shared),
        Entry("m/link", "hardlink", 0o644, linkname="z/content"),
        Entry("a/link", "hardlink", 0o644, linkname="m/link"),
        Entry("etc/.wh.gone", "file", 0o644),
        Entry("srv/.wh..wh..opq", "file", 0o644),
        Entry("srv/.wh..wh.plnk", "file", 0o644),
        Entry("var/lib/dpkg/status", "file", 0o644, size=11, source=status),
        Entry("var/lib/apt/extended_states", "file", 0o644),
        Entry("opt/typed", "file", 0o100755),  # a mode with the file type's bits, which the header leaves out
    ])
    keep = {"var/lib/dpkg/status", "var/lib/apt/extended_states", "usr/bin/hello-again", "a/link", "absent"}
    out = io.BytesIO()
    stats = write.write_layer(entries, out, compression, epoch=EPOCH, keep=keep)
    listing, kept = read.scan_layer(io.BytesIO(out.getvalue()), compression, what="layer", keep=keep)
    assert stats.listing == listing
    # a hard link keeps no content; the first path of a hard-linked group holds it
    assert stats.kept == kept == {"var/lib/dpkg/status": b"Package: a\n", "var/lib/apt/extended_states": b"",
                                  "a/link": b"shared"}
    assert listing["etc/.wh.gone"] == "whiteout" and listing["srv/.wh..wh..opq"] == "opaque"
    assert "srv/.wh..wh.plnk" not in listing and listing["m/link"] == "hardlink:a/link"
    assert listing["opt/big"] == "file:0640:" + hashlib.sha256(Path(big).read_bytes()).hexdigest()


def test_hardlinked_content_goes_under_the_first_path(tmp_path: Path) -> None:
    source = _file(tmp_path, "content", b"shared")
    entries = [
        Entry("z/content", "file", 0o700, size=6, source=source, mtime=3),
        Entry("m/link", "hardlink", 0o644, linkname="z/content"),
        Entry("a/link", "hardlink", 0o644, linkname="m/link"),  # a chain
    ]
    data, _ = _write(write.with_parents(entries))
    stream = read.iter_members(io.BytesIO(data), "none", what="layer")
    members = {m.path: (m, r.read() if r else None) for m, r in stream}
    assert members["a/link"][0].type == "file" and members["a/link"][1] == b"shared"
    assert members["a/link"][0].mode == 0o700 and members["a/link"][0].mtime == 3
    assert members["m/link"][0].linkname == "a/link" and members["z/content"][0].linkname == "a/link"


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([Entry("a", "file", 0o644), Entry("a", "dir", 0o755)], "two entries"),
        ([Entry("./a", "file", 0o644)], "not a normalised"),
        ([Entry("a/", "dir", 0o755)], "not a normalised"),
        ([Entry("a//b", "file", 0o644)], "not a normalised"),
        ([Entry("a/../b", "file", 0o644)], "not a normalised"),
        ([Entry("h", "hardlink", 0o644, linkname="missing")], "not in the layer"),
        ([Entry("d", "dir", 0o755), Entry("h", "hardlink", 0o644, linkname="d")], "is a dir"),
        ([Entry("f", "file", 0o644), Entry("f/g", "file", 0o644)], "beneath file"),
        ([Entry("f", "fifo", 0o644)], "unknown type"),
        ([Entry("f", "file", 0o644, size=3)], "no source"),
        ([Entry("f", "file", 0o644, xattrs={"user.empty": ""})], "xattr with an empty value"),
    ],
)
def test_invalid_entries(entries: list[Entry], message: str) -> None:
    with pytest.raises(FormatError, match=message):
        _write(entries)


def test_source_that_is_too_short(tmp_path: Path) -> None:
    source = _file(tmp_path, "short", b"abc")
    with pytest.raises(OcibuildError, match=r"short.*layer entry 'f'.*3 bytes, expected 10"):
        _write([Entry("f", "file", 0o644, size=10, source=source)])


def test_source_that_shrinks_while_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = _file(tmp_path, "shrinks", b"x" * 100)
    real_fstat = os.fstat

    def fstat_before_truncation(fd: int) -> os.stat_result:  # size checked, then the file loses its tail
        st = real_fstat(fd)
        os.truncate(source, 40)
        return st

    monkeypatch.setattr(os, "fstat", fstat_before_truncation)
    with pytest.raises(OcibuildError, match=r"shrinks.*layer entry 'f'.*shrank while being read \(40 of 100"):
        _write([Entry("f", "file", 0o644, size=100, source=source)])


@pytest.mark.parametrize("size", [100, 9 << 20])  # one read, and a file that spans several buffer chunks
def test_content_is_hashed_as_it_is_written(tmp_path: Path, size: int) -> None:
    """A file edited (same size) after its digest was taken is refused, naming it: never written under the key
    its old content made."""
    old = bytes(size)
    source = _file(tmp_path, "edited", old)
    planned = hashlib.sha256(old).hexdigest()
    _write([Entry("f", "file", 0o644, size=size, source=source, sha256=planned)])  # unchanged: fine
    Path(source).write_bytes(b"y" + old[1:])
    with pytest.raises(OcibuildError, match=r"edited' changed during the build: .*layer entry 'f'") as info:
        _write([Entry("f", "file", 0o644, size=size, source=source, sha256=planned)])
    assert "run again" in (info.value.hint or "")


def test_source_that_is_a_symlink_is_refused(tmp_path: Path) -> None:
    (tmp_path / "link").symlink_to("/etc/hostname")
    with pytest.raises(OcibuildError, match="cannot read"):
        _write([Entry("f", "file", 0o644, size=1, source=str(tmp_path / "link"))])


def _tar(path: Path, members: list[tuple[str, str, bytes]], fmt: int = tarfile.PAX_FORMAT) -> None:
    with tarfile.open(path, "w", format=fmt) as tar:
        for name, kind, data in members:
            info = tarfile.TarInfo(name)
            if kind == "dir":
                info.type, info.mode = tarfile.DIRTYPE, 0o755
            elif kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, data.decode()
            elif kind == "hardlink":
                info.type, info.linkname = tarfile.LNKTYPE, data.decode()
            elif kind == "chr":
                info.type = tarfile.CHRTYPE
            else:
                info.size, info.mode = len(data), 0o755
            tar.addfile(info, io.BytesIO(data) if kind == "file" else None)


def test_tarball_entries_re_emit_an_archive(tmp_path: Path) -> None:
    archive = tmp_path / "go.tar"
    _tar(
        archive,
        [
            ("./", "dir", b""),
            ("./go/", "dir", b""),
            ("./go/bin/", "dir", b""),
            ("./go/bin/go", "file", b"\x7fELF go binary"),
            ("./go/bin/gofmt", "hardlink", b"./go/bin/go"),
            ("./go/VERSION", "file", b"go1.22"),
            ("./go/VERSION", "file", b"go1.23"),  # a later entry of the same path wins
            ("./go/lib", "symlink", b"../lib"),
            ("go/" + "x" * 150, "file", b"long"),
        ],
    )
    entries = write.tarball_entries(archive, what=str(archive))
    by_path = {e.path: e for e in entries}
    assert set(by_path) == {"go", "go/bin", "go/bin/go", "go/bin/gofmt", "go/VERSION", "go/lib", "go/" + "x" * 150}
    go = by_path["go/bin/go"]
    assert (go.source, go.size) == (str(archive), 14)
    assert archive.read_bytes()[go.offset : go.offset + 14] == b"\x7fELF go binary"
    assert by_path["go/bin/gofmt"].linkname == "go/bin/go"

    def strip(e: Entry) -> Entry:  # what the archive builder does with strip_components = 1
        target = e.linkname.removeprefix("go/") if e.type == "hardlink" else e.linkname
        return replace(e, path=e.path.removeprefix("go/"), linkname=target)

    stripped = [strip(e) for e in entries if e.path != "go"]
    data, _ = _write(stripped)
    listing = read.list_layer(io.BytesIO(data), "none", what="layer")
    assert listing["VERSION"] == "file:0755:" + hashlib.sha256(b"go1.23").hexdigest()
    assert listing["bin/gofmt"] == "hardlink:bin/go" and listing["lib"] == "symlink:../lib"


def test_tarball_entries_devices(tmp_path: Path) -> None:
    archive = tmp_path / "rootfs.tar"
    _tar(archive, [("dev/", "dir", b""), ("dev/null", "chr", b""), ("etc/", "dir", b"")])
    with pytest.raises(UnsafeArchive, match=r"rootfs.tar: entry 'dev/null' is a character device node"):
        write.tarball_entries(archive, what=str(archive))
    assert [e.path for e in write.tarball_entries(archive, what="x", skip_devices=True)] == ["dev", "etc"]


def test_tarball_entries_refuse_whiteouts_and_truncation(tmp_path: Path) -> None:
    archive = tmp_path / "a.tar"
    _tar(archive, [("etc/.wh.passwd", "file", b"")])
    with pytest.raises(UnsafeArchive, match="whiteout"):
        write.tarball_entries(archive, what="a.tar")
    _tar(archive, [("big", "file", b"x" * 5000)])
    archive.write_bytes(archive.read_bytes()[:3000])
    with pytest.raises(UnsafeArchive, match="a.tar is truncated or corrupt"):
        write.tarball_entries(archive, what="a.tar")


def _file_members(path: Path, policy: read.Policy) -> list[str]:
    with open(path, "rb") as f:
        return [f"{m.type}:{m.path}@{offset}" for m, offset in read.iter_file_members(f, what="a.tar", policy=policy)]


def test_one_parser_a_policy_per_use(tmp_path: Path) -> None:
    """The same stream, read for a tarball layer and for an oci-archive: the policy decides what passes."""
    archive = tmp_path / "a.tar"
    _tar(archive, [("blobs/", "dir", b""), ("blobs/f", "file", b"data"), ("blobs/l", "symlink", b"f")])
    assert _file_members(archive, read.TARBALL) == ["dir:blobs@512", "file:blobs/f@1024", "symlink:blobs/l@2048"]
    with pytest.raises(UnsafeArchive, match="'blobs/l' is a symlink: an OCI layout holds only files and dir"):
        _file_members(archive, read.LAYOUT)
    _tar(archive, [("/abs", "file", b"x")])
    assert _file_members(archive, read.TARBALL) == ["file:abs@512"]
    with pytest.raises(UnsafeArchive, match="'/abs' is an absolute path"):
        _file_members(archive, read.LAYOUT)
    one_zero_block = write.header(Entry("f", "file", 0o644), 0) + bytes(512)
    archive.write_bytes(one_zero_block)
    assert _file_members(archive, read.TARBALL) == ["file:f@512"]
    with pytest.raises(UnsafeArchive, match="the end-of-archive marker is cut"):
        _file_members(archive, read.LAYOUT)


@pytest.mark.parametrize("fmt", ["gnu", "oldgnu", "posix", "ustar", "v7"])
def test_reads_gnu_tar_formats(tmp_path: Path, fmt: str) -> None:
    tree = tmp_path / "tree"
    long = "l" * 90 if fmt in ("ustar", "v7") else "l" * 150
    (tree / "dir" / long).mkdir(parents=True)
    (tree / "dir" / long / "file").write_bytes(b"content")
    (tree / "dir" / "sym").symlink_to("target")
    os.link(tree / "dir" / long / "file", tree / "dir" / "z-hard")
    plain = subprocess.run(["tar", f"--format={fmt}", "--sort=name", "-cf", "-", "-C", str(tree), "dir"],
                           capture_output=True, check=True).stdout  # fmt: skip
    listing = read.list_layer(io.BytesIO(plain), "none", what=fmt)
    digest = hashlib.sha256(b"content").hexdigest()
    assert listing[f"dir/{long}/file"].endswith(digest)
    assert listing["dir/sym"] == "symlink:target"
    assert listing["dir/z-hard"] == f"hardlink:dir/{long}/file"


def test_sniff_and_decompress_to() -> None:
    payload = b"some tar bytes " * 1000
    compressed = {
        "gzip": gzip.compress(payload),
        "xz": lzma.compress(payload),
        "zstd": zstandard.ZstdCompressor().compress(payload),
        "bzip2": bz2.compress(payload),
        "none": payload,
    }
    for compression, data in compressed.items():
        assert codecs.sniff_compression(data[:8]) == compression
        out = io.BytesIO()
        codecs.decompress_to(io.BytesIO(data), out, compression)
        assert out.getvalue() == payload
    with pytest.raises(UnsafeArchive, match="archive x is truncated or corrupt"):
        codecs.decompress_to(io.BytesIO(compressed["xz"][:-20]), io.BytesIO(), "xz", what="archive x")
    with pytest.raises(UnsafeArchive, match="truncated or corrupt"):
        codecs.decompress_to(io.BytesIO(b"not gzip at all"), io.BytesIO(), "gzip")


def test_open_decompressed_is_a_buffered_reader(tmp_path: Path) -> None:
    data, _ = _write(_sample(tmp_path), "zstd")
    with codecs.open_decompressed(io.BytesIO(data), "zstd") as reader:
        assert len(reader.read(1000)) == 1000


@pytest.mark.parametrize(
    ("path", "expected"),
    [("./a/b", "a/b"), ("/abs//x/./y/", "abs/x/y"), ("./", None), ("/", None), ("a", "a"), ("..x/y..", "..x/y..")],
)
def test_normalise_path(path: str, expected: str | None) -> None:
    assert read.normalise_path(path) == expected


def test_normalise_path_refuses_dotdot() -> None:
    with pytest.raises(UnsafeArchive, match="'a/../b' has a '..' component"):
        read.normalise_path("a/../b")


def _layer(tmp_path: Path, name: str, members: list[tuple[str, str, bytes]]) -> bytes:
    path = tmp_path / f"{name}.tar"
    _tar(path, members)
    return path.read_bytes()


def test_extract_layers_with_whiteouts(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    lower = _layer(tmp_path, "lower", [
        ("etc/", "dir", b""), ("etc/keep", "file", b"k"), ("etc/gone", "file", b"g"),
        ("opt/", "dir", b""), ("opt/old/", "dir", b""), ("opt/old/x", "file", b"x"), ("opt/-x", "file", b"lower"),
        ("var/", "dir", b""), ("var/cache/", "dir", b""), ("var/cache/a", "file", b"a"),
    ])  # fmt: skip
    upper = _layer(tmp_path, "upper", [
        ("etc/.wh.gone", "file", b""),
        ("opt/-x", "file", b"upper"),  # sorts before its whiteout: whiteouts only remove lower content
        ("opt/.wh.-x", "file", b""),
        ("var/cache/", "dir", b""), ("var/cache/.wh..wh..opq", "file", b""), ("var/cache/b", "file", b"b"),
        ("etc/link", "symlink", b"keep"), ("etc/hard", "hardlink", b"var/cache/b"),
    ])  # fmt: skip
    extract.extract_layer(io.BytesIO(lower), "none", root, what="lower", chown=False)
    extract.extract_layer(io.BytesIO(upper), "none", root, what="upper", chown=False)
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*")) == [
        "etc", "etc/hard", "etc/keep", "etc/link", "opt", "opt/-x", "opt/old", "opt/old/x", "var", "var/cache",
        "var/cache/b",
    ]  # fmt: skip
    assert (root / "opt/-x").read_bytes() == b"upper"
    assert os.readlink(root / "etc/link") == "keep"
    assert os.stat(root / "etc/hard").st_ino == os.stat(root / "var/cache/b").st_ino
    assert (root / "etc").stat().st_mode & 0o7777 == 0o755


def test_extract_replaces_and_sets_metadata(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "d").mkdir()
    (root / "d" / "inner").write_bytes(b"lower")
    (root / "f").mkdir()
    entries = [
        Entry("d", "file", 0o640, size=3, source=_file(tmp_path, "c", b"new"), mtime=1000),
        Entry("f", "symlink", 0o777, linkname="d", mtime=1000),
        Entry("ro", "dir", 0o555, mtime=1000),
        Entry("ro/file", "file", 0o444, size=3, source=str(tmp_path / "src/c"), mtime=1000),
    ]
    data, _ = _write(entries, "gzip", epoch=5000)
    extract.extract_layer(io.BytesIO(data), "gzip", root, what="layer", chown=False)
    assert (root / "d").read_bytes() == b"new" and (root / "d").stat().st_mode & 0o7777 == 0o640
    assert os.readlink(root / "f") == "d" and os.lstat(root / "f").st_mtime == 1000
    assert (root / "ro").stat().st_mode & 0o7777 == 0o555 and (root / "ro").stat().st_mtime == 1000
    assert (root / "ro/file").read_bytes() == b"new"


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_extract_sets_owners_as_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    data, _ = _write([Entry("f", "file", 0o4755, uid=123, gid=456), Entry("d", "dir", 0o700, uid=7, gid=8)])
    extract.extract_layer(io.BytesIO(data), "none", root, what="layer", chown=True)
    st = (root / "f").stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (123, 456, 0o4755)
    assert ((root / "d").stat().st_uid, (root / "d").stat().st_gid) == (7, 8)


@pytest.mark.skipif(os.geteuid() != 0, reason="xattrs are set only as root")
def test_extract_sets_only_capability_and_user_xattrs(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    cap_net_raw = struct.pack("<5I", 0x02000001, 1 << 13, 0, 0, 0)
    xattrs = {
        "security.capability": cap_net_raw.decode("utf-8", "surrogateescape"),
        "user.note": "hello",
        "trusted.overlay.opaque": "y",
    }
    data, _ = _write([Entry("ping", "file", 0o755, xattrs=xattrs)])
    extract.extract_layer(io.BytesIO(data), "none", root, what="layer", chown=True)
    assert os.getxattr(root / "ping", "security.capability") == cap_net_raw
    assert os.getxattr(root / "ping", "user.note") == b"hello"
    assert "trusted.overlay.opaque" not in os.listxattr(root / "ping")


def test_reader_read_returns_whole_member(tmp_path: Path) -> None:
    payload = os.urandom(3 << 20)
    data, _ = _write([Entry("big", "file", 0o644, size=len(payload), source=_file(tmp_path, "big", payload))], "zstd")
    for member, reader in read.iter_members(io.BytesIO(data), "zstd", what="layer"):
        assert reader is not None and reader.read(len(payload) + 5) == payload
    shutil.rmtree(tmp_path / "src")
