"""Hostile archives handed to `ocibuild import`, in the spirit of containerd's TestBreakouts.

Each case is a named oci-archive that is a valid layout except for one hostile entry. Import must refuse it before
anything is written: index.json unchanged, no blob of the archive in the store, the store verifying clean, and
nothing beside the store (a sentinel file and its directory) touched.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest
import zstandard

from ocibuild import archive as oci_archive, oci
from ocibuild.archive.export import _header
from ocibuild.errors import OcibuildError
from ocibuild.oci import Digest, ImageConfig, Manifest
from ocibuild.store import Store

LAYER = b"layer content " * 100
LAYER_HEX = hashlib.sha256(LAYER).hexdigest()


def _layout_files() -> dict[str, bytes]:
    """A one-image layout whose only layer is LAYER."""
    config = ImageConfig(diff_ids=(Digest.of(LAYER),)).to_json()
    config_d = oci.Descriptor(oci.OCI_CONFIG, Digest.of(config), len(config))
    manifest = Manifest(config_d, (oci.Descriptor(oci.LAYER_GZIP, Digest.of(LAYER), len(LAYER)),)).to_json()
    index = oci.Index(()).with_tag("evil", oci.Descriptor(oci.OCI_MANIFEST, Digest.of(manifest), len(manifest)))
    return {
        "oci-layout": b'{"imageLayoutVersion":"1.0.0"}',
        "index.json": index.to_json(),
        f"blobs/sha256/{Digest.of(config).hex}": config,
        f"blobs/sha256/{Digest.of(manifest).hex}": manifest,
    }


def _file(name: str, data: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info


def archive(extra: Callable[[tarfile.TarFile], None], *, fmt: int = tarfile.PAX_FORMAT) -> bytes:
    """The layout, then whatever ``extra`` adds in place of the layer blob."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=fmt) as tar:
        for name, data in _layout_files().items():
            tar.addfile(_file(name, data), io.BytesIO(data))
        extra(tar)
    return raw.getvalue()


def entry(name: str, kind: bytes, *, linkname: str = "", data: bytes = b"") -> Callable[[tarfile.TarFile], None]:
    def add(tar: tarfile.TarFile) -> None:
        info = _file(name, data)
        info.type, info.linkname = kind, linkname
        if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
            info.devmajor, info.devminor = 1, 3
        tar.addfile(info, io.BytesIO(data) if data else None)
    return add


def raw_blocks(blocks: bytes) -> Callable[[tarfile.TarFile], None]:
    """Bytes appended to the stream as they are (hand-made headers)."""
    def add(tar: tarfile.TarFile) -> None:
        assert tar.fileobj is not None
        tar.fileobj.write(blocks)
        tar.offset += len(blocks)
    return add


def _padded(data: bytes) -> bytes:
    return data + bytes(-len(data) % 512)


BLOB = f"blobs/sha256/{LAYER_HEX}"


def _typed(name: str, size: int, typeflag: bytes) -> bytes:
    """A header of type ``typeflag`` (an extended header, a sparse file...), as a hostile writer makes it."""
    info = tarfile.TarInfo(name)
    info.size, info.type = size, typeflag
    return info.tobuf(format=tarfile.USTAR_FORMAT)


def _huge_pax() -> bytes:
    body = b" comment=" + b"x" * (2 << 20) + b"\n"
    record = str(len(body) + 7).encode() + body
    return _typed("PaxHeaders/x", len(record), b"x") + _padded(record) + _header(BLOB, 0)


def _pax_record(key: bytes, value: bytes) -> bytes:
    body = b" " + key + b"=" + value + b"\n"
    length = len(body) + 2
    while len(str(length)) + len(body) != length:
        length = len(str(length)) + len(body)
    return str(length).encode() + body


def _compressed(compress: Callable[[bytes], bytes]) -> bytes:
    return compress(archive(entry(BLOB, tarfile.REGTYPE, data=LAYER)) + bytes(100 << 20))


def _big_index() -> bytes:
    """index.json of 17 MB (whitespace: valid JSON once the object ends), more than a document may have."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for name, data in _layout_files().items():
            if name == "index.json":
                data = data + b" " * (17 << 20)
            tar.addfile(_file(name, data), io.BytesIO(data))
    return raw.getvalue()


def _ambiguous(kind: str) -> bytes:
    """A layout whose image is reached through a document that is both a manifest and an index (CVE-2021-41190):
    no mediaType inside, the fields of both. ``kind`` says what the descriptor that points at it claims."""
    files = _layout_files()
    index = json.loads(files["index.json"])
    manifest_d = index["manifests"][0]
    manifest = json.loads(files[f"blobs/sha256/{manifest_d['digest'].split(':')[1]}"])
    both = {k: v for k, v in manifest.items() if k != "mediaType"}
    both["manifests"] = [{k: v for k, v in manifest_d.items() if k != "annotations"}]
    data = oci.canonical_json(both)
    media_type = oci.OCI_MANIFEST if kind == "manifest" else oci.OCI_INDEX
    index["manifests"][0].update(mediaType=media_type, digest=str(Digest.of(data)), size=len(data))
    files["index.json"] = oci.canonical_json(index)
    files[f"blobs/sha256/{Digest.of(data).hex}"] = data
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for name, content in files.items():
            tar.addfile(_file(name, content), io.BytesIO(content))
        entry(BLOB, tarfile.REGTYPE, data=LAYER)(tar)
    return raw.getvalue()


_REFUSAL = "archive .*: entry 'blobs/sha256/" + LAYER_HEX + "' "

#: name -> (the archive, the refusal it must meet: a regular expression of the error's message). Each hostile
#: entry is built with the header kind the case is named after (a PAX 'x' or 'g' header, a GNU 'K' header, a
#: sparse file's 'S'), and the refusal asserted is the one that kind meets, not another one on the way.
CASES: dict[str, tuple[Callable[[], bytes], str]] = {
    "dotdot": (lambda: archive(entry("blobs/sha256/../../../escape", tarfile.REGTYPE, data=b"pwned")),
               r"entry 'blobs/sha256/\.\./\.\./\.\./escape' has a '\.\.' component"),
    "dotdot-in-pax-path": (lambda: archive(raw_blocks(
        _typed("PaxHeaders/p", len(r := _pax_record(b"path", b"../../escape")), b"x") + _padded(r)
        + _header("blobs/sha256/" + LAYER_HEX, 5) + _padded(b"pwned"))),
        r"entry '\.\./\.\./escape' has a '\.\.' component"),
    "absolute-path": (lambda: archive(entry("/tmp/ocibuild-escape", tarfile.REGTYPE, data=b"pwned")),
                      r"entry '/tmp/ocibuild-escape' is an absolute path"),
    "absolute-blob-path": (lambda: archive(entry("/" + BLOB, tarfile.REGTYPE, data=LAYER)),
                           rf"entry '/{BLOB}' is an absolute path"),
    "outside-layout": (lambda: archive(entry("etc/passwd", tarfile.REGTYPE, data=b"root::0:0::/:/bin/sh\n")),
                       r"entry 'etc/passwd' is not part of an OCI image layout"),
    "symlink-blob": (lambda: archive(entry(BLOB, tarfile.SYMTYPE, linkname="/etc/passwd")),
                     _REFUSAL + "is a symlink: an OCI layout holds only files and directories"),
    "symlink-blobs-dir": (lambda: archive(entry("blobs/sha256", tarfile.SYMTYPE, linkname="../../outside")),
                          r"entry 'blobs/sha256' is a symlink: an OCI layout holds only files and directories"),
    "hardlink-blob": (lambda: archive(entry(BLOB, tarfile.LNKTYPE, linkname="oci-layout")),
                      _REFUSAL + "is a hardlink: an OCI layout holds only files and directories"),
    "char-device": (lambda: archive(entry(BLOB, tarfile.CHRTYPE)), _REFUSAL + "is a character device node"),
    "block-device": (lambda: archive(entry(BLOB, tarfile.BLKTYPE)), _REFUSAL + "is a block device node"),
    "fifo": (lambda: archive(entry(BLOB, tarfile.FIFOTYPE)), _REFUSAL + "is a fifo"),
    "oversize-pax-header": (lambda: archive(raw_blocks(_huge_pax())),
                            r"extended header at offset \d+ is 2097169 bytes \(the limit is 65536"),
    "global-pax-header": (lambda: archive(raw_blocks(
        _typed("pax_global_header", len(r := _pax_record(b"path", b"etc/passwd")), b"g") + _padded(r))),
        r"entry 'pax_global_header' is a global PAX header: an OCI layout holds only files and directories"),
    "gnu-long-link": (lambda: archive(raw_blocks(
        _typed("././@LongLink", 12, b"K") + _padded(b"/etc/shadow\0") + _header(BLOB, 0))),
        r"entry '\./\./@LongLink' is a GNU long link name: an OCI layout holds only files and directories"),
    "pax-linkpath": (lambda: archive(raw_blocks(
        _typed("PaxHeaders/p", len(r := _pax_record(b"linkpath", b"/etc/shadow")), b"x") + _padded(r)
        + _header(BLOB, 0))),
        r"PAX record 'linkpath' at offset \d+ is not allowed"),
    "sparse-file": (lambda: archive(raw_blocks(_typed(BLOB, 0, tarfile.GNUTYPE_SPARSE))),
                    _REFUSAL + "is a sparse file: an OCI layout holds only files and directories"),
    "size-beyond-the-end": (lambda: archive(raw_blocks(_header(BLOB, 8 << 30))),
                            rf"is truncated or corrupt \(ends inside '{BLOB}'\)"),
    "duplicate-entry": (lambda: archive(lambda tar: [tar.addfile(_file(BLOB, d), io.BytesIO(d))
                                                     for d in (LAYER, b"x" * len(LAYER))] and None),
                        _REFUSAL + "appears twice"),
    "gzip-bomb": (lambda: _compressed(lambda data: gzip.compress(data, compresslevel=1)),
                  r"is gzip-compressed; only a plain tar \(oci-archive\) is imported"),
    "zstd-bomb": (lambda: _compressed(lambda data: zstandard.ZstdCompressor().compress(data)),
                  r"is zstd-compressed; only a plain tar \(oci-archive\) is imported"),
    "index-json-too-large": (lambda: _big_index(), r"index\.json is 17826091 bytes \(the limit is 16777216\)"),
    "manifest-that-is-also-an-index": (lambda: _ambiguous("manifest"),
                                       r"an image manifest that also carries 'manifests' is ambiguous"),
    "index-that-is-also-a-manifest": (lambda: _ambiguous("index"),
                                      r"an image index that also carries 'layers' and 'config' is ambiguous"),
}


def test_there_are_at_least_ten_cases() -> None:
    assert len(CASES) >= 10


@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_archive_is_refused(name: str, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    sentinel = outside / "sentinel"
    sentinel.write_text("keep\n")
    store = Store.open(tmp_path / "store")
    before_index = (store.root / "index.json").read_bytes()
    before_tree = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if "store" not in p.parts)
    path = tmp_path / f"{name}.tar"
    make, refusal = CASES[name]
    path.write_bytes(make())
    with pytest.raises(OcibuildError, match=refusal) as caught:
        oci_archive.import_archive(store, path)
    assert caught.value.hint
    assert (store.root / "index.json").read_bytes() == before_index
    assert list(store.blobs()) == []  # refused before anything was written
    assert store.verify() == []
    assert sentinel.read_text() == "keep\n" and os.stat(sentinel).st_nlink == 1
    after_tree = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")
                        if "store" not in p.parts and p != path)
    assert after_tree == before_tree
    assert not Path("/tmp/ocibuild-escape").exists()


def test_the_same_layout_without_the_hostile_entry_imports(tmp_path: Path) -> None:
    """The control: the cases fail for their hostile entry, not for the layout around it."""
    store = Store.open(tmp_path / "store")
    path = tmp_path / "good.tar"
    path.write_bytes(archive(entry(BLOB, tarfile.REGTYPE, data=LAYER)))
    assert oci_archive.import_archive(store, path).tags == ("evil",)
    assert store.verify() == []
    assert json.loads((store.root / "index.json").read_bytes())["manifests"][0]["annotations"]
