"""Reproducible tar layers, written fast.

:func:`write_layer` writes a list of :class:`Entry` as a tar stream that is a pure function of the entries and
``epoch`` (compressed by :mod:`ocibuild.tar.codecs`, whose settings are part of the format too):

- Members are sorted like ``tar --sort=name``: by the bytes of each path component, parents before children.
- POSIX ustar headers, ``uname``/``gname`` empty, device numbers zero, ``mtime = min(entry.mtime, epoch)``, no
  atime/ctime, directories named with a trailing '/'. A PAX 'x' header (named ``././@PaxHeader``, all its fields
  zero, records sorted by key) is written only when ustar cannot hold a value: a path that does not fit
  name+prefix, a link target over 100 bytes, a non-ASCII path or link target, size >= 8 GiB, uid/gid > 2097151,
  or xattrs (``SCHILY.xattr.<name>``, as containers/image and umoci write them; values are the xattr bytes decoded
  with UTF-8/surrogateescape, never empty: a PAX record with an empty value unsets rather than sets).
- Hardlinked content is written under the path that sorts first; the other paths become hardlinks to it, with the
  content's metadata (a hardlink header carries no xattrs: they belong to the content's entry).
- The archive ends with two zero blocks and no record padding (like Go's archive/tar, i.e. containerd and
  BuildKit) -- except that one more zero block is added when the stream length would be a multiple of 512 KiB:
  zstd's multi-threaded encoder ends a stream whose length is a multiple of its job size either with or without
  an extra empty block depending on thread timing, and the extra block keeps our output independent of that.
- The stream reaches the compressor in pieces of 4 MiB (``_CHUNK``): ISA-L's gzip output depends on how its
  input is cut, so the piece size is part of the gzip format.

Every file's content is hashed as it is written, so a layer's *listing* (path → fingerprint, exactly what
:func:`ocibuild.tar.read.list_layer` gives for the written blob) comes with it and the blob need not be read back;
the bytes of a few chosen paths (``keep``) are kept too.

:func:`header` is public for writers that place members themselves (the oci-archive export), and
:func:`tarball_entries` turns the members of an uncompressed tar file into entries pointing into it.

Errors: an invalid entry list (duplicate path, dangling hardlink) raises FormatError; a source that is missing or
changed, OcibuildError; an OSError writing the layer, StoreError.
"""

from __future__ import annotations

import hashlib
import os
import stat
import struct
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import BinaryIO, Final

from .. import oci
from ..errors import FormatError, OcibuildError, StoreError
from . import codecs, read
from .read import quoted

ENTRY_TYPES: Final = frozenset({"file", "dir", "symlink", "hardlink"})

_BLOCK: Final = 512
_CHUNK: Final = 4 << 20  # the writer feeds hash and compressor in pieces of this size
_ZSTD_JOB_GUARD: Final = 512 << 10
_ZERO_BLOCK: Final = bytes(_BLOCK)
_SOURCE_FLAGS: Final = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK  # never block on a fifo
_MAX_OCTAL_7: Final = 0o7777777
_MAX_OCTAL_11: Final = 0o77777777777
_TYPEFLAG: Final = {"file": b"0", "dir": b"5", "symlink": b"2", "hardlink": b"1"}
_ENC: Final = "surrogateescape"


@dataclass(frozen=True, slots=True)  # slots: a layer may have a million entries in memory at once
class Entry:
    """One member of a layer to write.

    ``path`` is normalised (see :func:`ocibuild.tar.read.normalise_path`). ``linkname`` is a symlink's target,
    verbatim, or a hardlink's target path (normalised). Content of a "file" is ``size`` bytes of ``source`` from
    ``offset``; ``sha256``, when given (hex), is the digest that content had when it was planned (a copy tree's
    walk): the content is hashed as it is written and a difference is an error, so a file edited between planning
    and writing never lands under the key its old content made.
    """

    path: str
    type: str
    mode: int
    uid: int = 0
    gid: int = 0
    size: int = 0
    linkname: str = ""
    source: str | None = None
    offset: int = 0
    mtime: int = 0
    xattrs: Mapping[str, str] = field(default_factory=lambda: read.NO_XATTRS)
    sha256: str = ""


@dataclass(frozen=True)
class LayerStats:
    diff_id: oci.Digest  # sha256 of the uncompressed tar stream
    uncompressed_size: int
    entries: int
    listing: Mapping[str, str] = field(default_factory=dict)  # as read.list_layer gives it for the stream
    kept: Mapping[str, bytes] = field(default_factory=dict)  # content of the files at the paths asked to keep


def _sort_key(path: str) -> bytes:
    """Order by the bytes of each component (``tar --sort=name``): '/' compared as the lowest byte."""
    return path.encode("utf-8", _ENC).replace(b"/", b"\0")


def _is_normalised(path: str) -> bool:
    return not (
        not path
        or path.startswith(("/", "./", "../"))
        or path.endswith(("/", "/.", "/.."))
        or path in (".", "..")
        or "//" in path
        or "/./" in path
        or "/../" in path
        or "\0" in path
    )


def _parent(path: str) -> str:
    return path.rpartition("/")[0]


def with_parents(
    entries: Iterable[Entry], *, uid: int = 0, gid: int = 0, mode: int = 0o755, mtime: int = 0
) -> list[Entry]:
    """``entries`` plus a directory entry for every missing parent, in tar order."""
    result = list(entries)
    present = {e.path for e in result}
    for entry in list(result):
        parent = _parent(entry.path)
        while parent and parent not in present:
            present.add(parent)
            result.append(Entry(parent, "dir", mode, uid, gid, mtime=mtime))
            parent = _parent(parent)
    result.sort(key=lambda e: _sort_key(e.path))
    return result


# ---------------------------------------------------------------------------------------------------------------
# The plan: entries validated and sorted, hardlink groups rewritten


def _check_entry(e: Entry) -> None:
    if e.type not in ENTRY_TYPES:
        raise FormatError(f"layer entry {quoted(e.path)} has unknown type '{e.type}'")
    if not _is_normalised(e.path):
        raise FormatError(f"layer entry {quoted(e.path)} is not a normalised relative path")
    if e.size < 0 or e.uid < 0 or e.gid < 0 or e.offset < 0:
        raise FormatError(f"layer entry {quoted(e.path)} has a negative size, offset, uid or gid")
    if e.size and e.source is None and e.type == "file":
        raise FormatError(f"layer entry {quoted(e.path)} has {e.size} bytes of content but no source")
    if not e.linkname and e.type in ("symlink", "hardlink"):
        raise FormatError(f"layer entry {quoted(e.path)} is a {e.type} without a target")
    if not all(e.xattrs.values()):
        raise FormatError(f"layer entry {quoted(e.path)} has an xattr with an empty value, which a tar header "
                          "cannot hold")


def _by_path(items: list[Entry]) -> dict[str, Entry]:
    """The sorted ``items`` by path; FormatError for a path given twice or an entry beneath a non-directory."""
    by_path: dict[str, Entry] = {}
    for e in items:
        if e.path in by_path:
            raise FormatError(f"layer has two entries for {quoted(e.path)}")
        cut = e.path.rfind("/")
        if cut > 0:
            parent = by_path.get(e.path[:cut])
            if parent is not None and parent.type != "dir":
                raise FormatError(f"layer entry {quoted(e.path)} is beneath {parent.type} {quoted(parent.path)}")
        by_path[e.path] = e
    return by_path


def _hardlink_groups(items: list[Entry], by_path: Mapping[str, Entry]) -> dict[str, list[str]]:
    """Path of the content -> every path of it (the content's first), following chains of hardlinks."""
    groups: dict[str, list[str]] = {}
    content_of: dict[str, Entry | None] = {}  # hardlink path -> what its chain ends at: each chain walked once
    for e in items:
        if e.type != "hardlink":
            continue
        chain = {e.path: None}
        target = by_path.get(e.linkname)
        while target is not None and target.type == "hardlink" and target.path not in chain:
            if target.path in content_of:
                target = content_of[target.path]
                break
            chain[target.path] = None
            target = by_path.get(target.linkname)
        for link in chain:
            content_of[link] = target
        if target is None or target.type != "file":
            what = "is not in the layer" if target is None else f"is a {target.type}"
            raise FormatError(
                f"layer entry {quoted(e.path)}: hardlink target {quoted(e.linkname)} {what}",
                hint="a hardlink must point at a regular file of the same layer",
            )
        groups.setdefault(target.path, [target.path]).append(e.path)
    return groups


def _plan(entries: Iterable[Entry]) -> list[Entry]:
    """Validate, sort, and rewrite hardlink groups so content comes under the first path."""
    items = list(entries)
    for e in items:
        _check_entry(e)
    items.sort(key=lambda e: _sort_key(e.path))
    by_path = _by_path(items)
    for content_path, paths in _hardlink_groups(items, by_path).items():
        content = by_path[content_path]
        paths.sort(key=_sort_key)
        first = paths[0]
        by_path[first] = replace(content, path=first)
        for other in paths[1:]:
            by_path[other] = Entry(
                other, "hardlink", content.mode, content.uid, content.gid, 0, first, mtime=content.mtime
            )
    return [by_path[e.path] for e in items]


# ---------------------------------------------------------------------------------------------------------------
# Headers


def _pax_record(key: bytes, value: bytes) -> bytes:
    body = b" " + key + b"=" + value + b"\n"
    length = len(body) + len(str(len(body)))
    length = len(body) + len(str(length))
    return b"%d" % length + body


# name | mode uid gid size mtime | chksum | typeflag | linkname | magic+version | uname gname | devmajor devminor
# | prefix | padding
_USTAR: Final = struct.Struct("100s48s8s1s100s8s64x16s155s12x")
_MAGIC: Final = b"ustar\x0000"
_DEVICES: Final = b"0000000\x000000000\x00"
_FIXED_SUM: Final = sum(b" " * 8) + sum(_MAGIC) + sum(_DEVICES)  # the checksum field counts as spaces


def _ustar(name: bytes, numbers: bytes, typeflag: bytes, link: bytes, prefix: bytes) -> bytes:
    checksum = _FIXED_SUM + sum(name) + sum(numbers) + typeflag[0] + sum(link) + sum(prefix)
    return _USTAR.pack(name, numbers, b"%06o\0 " % checksum, typeflag, link, _MAGIC, _DEVICES, prefix)


def _ascii_field(value: bytes) -> bytes:
    """The ustar fallback for a value carried by PAX: ASCII (others as '?'), truncated to the field."""
    return bytes(b if b < 128 else 0x3F for b in value[:100])


def header(e: Entry, epoch: int) -> bytes:
    """The ustar header of ``e``, preceded by a PAX header when ustar cannot hold everything (the content, padded
    to 512 bytes, follows it). Public for writers that place members themselves, like the export archive."""
    path = e.path.encode("utf-8", _ENC)
    kind = e.type
    if kind == "dir":
        path += b"/"
    link = e.linkname.encode("utf-8", _ENC) if e.linkname else b""
    size = e.size if kind == "file" else 0
    uid, gid = e.uid, e.gid
    mtime = e.mtime if 0 <= e.mtime <= epoch else max(0, min(e.mtime, epoch, _MAX_OCTAL_11))
    if (
        len(path) <= 100
        and len(link) <= 100
        and path.isascii()
        and link.isascii()
        and uid <= _MAX_OCTAL_7
        and gid <= _MAX_OCTAL_7
        and size <= _MAX_OCTAL_11
        and not e.xattrs
    ):
        numbers = b"%07o\0%07o\0%07o\0%011o\0%011o\0" % (e.mode & 0o7777, uid, gid, size, mtime)
        return _ustar(path, numbers, _TYPEFLAG[kind], link, b"")
    return _pax_and_ustar(e, path, link, size, mtime)


def _pax_and_ustar(e: Entry, path: bytes, link: bytes, size: int, mtime: int) -> bytes:
    """The headers of an entry that ustar alone cannot hold: the PAX records, then the ustar fallback."""
    pax: dict[bytes, bytes] = {}
    uid, gid = e.uid, e.gid
    name, prefix = path, b""
    if not path.isascii():
        pax[b"path"] = path
        name = _ascii_field(path)
    elif len(path) > 100:
        split = path.find(b"/", len(path) - 101)  # the shortest prefix that leaves a name of <= 100 bytes
        if 0 < split <= 155 and split < len(path) - 1:
            prefix, name = path[:split], path[split + 1 :]
        else:
            pax[b"path"] = path
            name = path[:100]
    if len(link) > 100 or not link.isascii():
        pax[b"linkpath"] = link
        link = _ascii_field(link)
    if uid > _MAX_OCTAL_7:
        pax[b"uid"] = b"%d" % uid
        uid = 0
    if gid > _MAX_OCTAL_7:
        pax[b"gid"] = b"%d" % gid
        gid = 0
    if size > _MAX_OCTAL_11:
        pax[b"size"] = b"%d" % size
        size = 0
    for key, value in e.xattrs.items():
        pax[b"SCHILY.xattr." + key.encode("utf-8", _ENC)] = value.encode("utf-8", _ENC)
    numbers = b"%07o\0%07o\0%07o\0%011o\0%011o\0" % (e.mode & 0o7777, uid, gid, size, mtime)
    ustar = _ustar(name, numbers, _TYPEFLAG[e.type], link, prefix)
    if not pax:
        return ustar
    for field_name in (b"path", b"linkpath"):
        if field_name in pax:
            try:
                pax[field_name].decode("utf-8")
            except UnicodeDecodeError:
                pax[b"hdrcharset"] = b"BINARY"
    records = b"".join(_pax_record(k, v) for k, v in sorted(pax.items()))
    pax_numbers = b"0000000\0" * 3 + b"%011o\0" % len(records) + b"00000000000\0"
    pax_header = _ustar(b"././@PaxHeader", pax_numbers, b"x", b"", b"")
    return pax_header + records + bytes(-len(records) % _BLOCK) + ustar


# ---------------------------------------------------------------------------------------------------------------
# The stream


class _TarWriter:
    """Assembles the tar stream in a fixed buffer; every full ``_CHUNK`` is hashed and handed to the sink."""

    def __init__(self, sink: codecs.Sink) -> None:
        self.sink = sink
        self.buf = bytearray(_CHUNK)
        self.view = memoryview(self.buf)
        self.pos = 0
        self.size = 0
        self.sha = hashlib.sha256()

    def _flush(self) -> None:
        chunk = self.view[: self.pos]
        self.sha.update(chunk)
        self.sink.feed(chunk)
        self.size += self.pos
        self.pos = 0

    def write(self, data: bytes) -> None:
        pos, n = self.pos, len(data)
        if pos + n < _CHUNK:
            self.buf[pos : pos + n] = data
            self.pos = pos + n
            return
        view, done = memoryview(data), 0
        while done < n:
            take = min(n - done, _CHUNK - self.pos)
            self.buf[self.pos : self.pos + take] = view[done : done + take]
            self.pos += take
            done += take
            if self.pos == _CHUNK:
                self._flush()

    def copy(self, e: Entry, kept: list[bytes] | None = None) -> str:
        """Append the content of ``e`` (read from its source) and the padding to a block boundary; return the
        content's sha256 (hex), hashed as it passed, which must be ``e.sha256`` when that is given. With ``kept``,
        the content is appended to it too."""
        source = e.source or ""
        try:
            fd = os.open(source, _SOURCE_FLAGS)
        except OSError as err:
            raise self._source_error(e, err.strerror or str(err)) from err
        content = hashlib.sha256()
        try:
            st = os.fstat(fd)
            offset, size = e.offset, e.size
            if st.st_size != offset + size and (offset == 0 or st.st_size < offset + size):
                raise self._source_error(e, f"it is {st.st_size} bytes, expected {size} from offset {offset}")
            if not stat.S_ISREG(st.st_mode):
                raise self._source_error(e, "it is not a regular file")
            pos = self.pos
            if pos + size <= _CHUNK:  # the common case: one read
                got = os.preadv(fd, [self.view[pos : pos + size]], offset)
                content.update(self.view[pos : pos + got])
                if kept is not None:
                    kept.append(bytes(self.view[pos : pos + got]))
                self.pos = pos + got
                if got == size:
                    if self.pos == _CHUNK:
                        self._flush()
                else:
                    self._read_rest(fd, e, offset + got, size - got, content, kept)
            else:
                self._read_rest(fd, e, offset, size, content, kept)
        except OSError as err:
            raise self._source_error(e, err.strerror or str(err)) from err
        finally:
            os.close(fd)
        digest = content.hexdigest()
        if e.sha256 and digest != e.sha256:
            raise OcibuildError(
                f"{quoted(source)} changed during the build: it was sha256:{e.sha256[:12]} when planned, "
                f"sha256:{digest[:12]} when written to layer entry {quoted(e.path)}",
                hint="run again: the layer's key must be made from the content it holds",
            )
        pad = -e.size % _BLOCK
        if pad:  # never crosses the end of the buffer: _CHUNK is a multiple of the block size
            pos = self.pos
            self.buf[pos : pos + pad] = _ZERO_BLOCK[:pad]
            self.pos = pos + pad
            if self.pos == _CHUNK:
                self._flush()
        return digest

    def _read_rest(self, fd: int, e: Entry, offset: int, remaining: int, content: hashlib._Hash,
                   kept: list[bytes] | None) -> None:
        while remaining:
            take = min(remaining, _CHUNK - self.pos)
            got = os.preadv(fd, [self.view[self.pos : self.pos + take]], offset)
            if got == 0:
                raise self._source_error(e, f"it shrank while being read ({e.size - remaining} of {e.size} bytes)")
            content.update(self.view[self.pos : self.pos + got])
            if kept is not None:
                kept.append(bytes(self.view[self.pos : self.pos + got]))
            self.pos += got
            offset += got
            remaining -= got
            if self.pos == _CHUNK:
                self._flush()

    @staticmethod
    def _source_error(e: Entry, problem: str) -> OcibuildError:
        return OcibuildError(
            f"cannot read {quoted(e.source or '')} for layer entry {quoted(e.path)}: {problem}",
            hint="the tree changed while the layer was written; build the layer again",
        )

    def finish(self) -> None:
        end = 2 * _BLOCK
        if (self.size + self.pos + end) % _ZSTD_JOB_GUARD == 0:
            end += _BLOCK
        self.write(bytes(end))
        if self.pos:
            self._flush()
        self.sink.finish()


_EMPTY_SHA256: Final = hashlib.sha256().hexdigest()


def write_layer(
    entries: Iterable[Entry], out: BinaryIO, compression: str, *, epoch: int, threads: int | None = None,
    keep: Collection[str] = (),
) -> LayerStats:
    """Write ``entries`` as a reproducible tar, compressed with 'zstd', 'gzip' or 'none', to ``out.write``.

    ``threads`` is the number of zstd workers (default: the CPUs this process may use; at least 1, and the
    bytes do not depend on it). Returns the diff_id and size of the uncompressed stream, its listing, and the
    content of the files at the paths of ``keep`` (few and small: they are held in memory).
    """
    sink = codecs.open_sink(out, compression, threads=threads)
    listing: dict[str, str] = {}
    kept: dict[str, bytes] = {}
    try:
        plan = _plan(entries)
        if len(plan) > read.MAX_ENTRIES:
            raise FormatError(f"a layer of {len(plan):,} entries: more than a layer may hold", read.MAX_ENTRIES_HINT)
        writer = _TarWriter(sink)
        for e in plan:
            writer.write(header(e, epoch))
            if e.type == "file":
                parts: list[bytes] | None = [] if e.path in keep else None
                digest = writer.copy(e, parts) if e.size else _EMPTY_SHA256
                if parts is not None:
                    kept[e.path] = b"".join(parts)
                _list(listing, e, digest)
            else:
                _list(listing, e, "")
        writer.finish()
    except OcibuildError:
        raise
    except OSError as err:
        raise StoreError(f"writing the layer blob failed: {err}") from err
    finally:
        sink.close()
    return LayerStats(oci.Digest("sha256", writer.sha.hexdigest()), writer.size, len(plan), listing, kept)


def _list(listing: dict[str, str], e: Entry, digest: str) -> None:
    """Add ``e`` to ``listing`` as the reader lists the member it becomes: a ``.wh.`` name is an OCI whiteout
    (or opaque marker, or aufs metadata, left out) whatever its type."""
    base = e.path.rpartition("/")[2]
    if base.startswith(read.WHITEOUT_PREFIX):
        if base == read.WHITEOUT_OPAQUE:
            listing[e.path] = "opaque"
        elif not base.startswith(read.WHITEOUT_PREFIX + read.WHITEOUT_PREFIX):
            listing[e.path] = "whiteout"
    elif e.type == "file":
        listing[e.path] = f"file:{e.mode & 0o7777:04o}:{digest}{read.xattrs_fingerprint(e.xattrs)}"
    elif e.type == "dir":
        listing[e.path] = f"dir:{e.mode & 0o7777:04o}{read.xattrs_fingerprint(e.xattrs)}"
    else:
        listing[e.path] = f"{e.type}:{e.linkname}"


# ---------------------------------------------------------------------------------------------------------------
# Entries from a tarball


def tarball_entries(path: Path, *, what: str, skip_devices: bool = False) -> list[Entry]:
    """The entries of an uncompressed, seekable tar file, pointing into it (``source``, ``offset``).

    Read with the :data:`~ocibuild.tar.read.TARBALL` policy: the checks of a layer, except that OCI whiteouts are
    refused (they would delete files of lower layers) and, with ``skip_devices``, device nodes and fifos are left
    out instead of refused (a root filesystem made by mmdebstrap has /dev entries). When a path occurs twice the
    later entry wins, as when extracting: a directory replaced by another type takes what was beneath it along,
    and the paths hardlinked to a replaced file keep its content (under the first of them).

    Time is linear in the entries, whatever they replace: hardlinked paths share one :class:`_Links` (a replaced
    file's links are not searched for), and what replaced directories took along is settled once, at the end.
    """
    policy = read.TARBALL_SKIPPING_DEVICES if skip_devices else read.TARBALL
    try:
        f = open(path, "rb")
    except OSError as err:
        raise StoreError(f"{what}: cannot open {path}: {err.strerror}") from err
    source = str(path)
    latest: dict[str, tuple[int, Entry]] = {}  # path -> (the number of its entry in the archive, the entry)
    links: dict[str, _Links] = {}  # path of a hardlinked file, or of a hardlink -> the paths sharing its content
    replaced: read.PathTree[int] = read.PathTree()  # directory replaced by another type -> the number then
    try:
        with f:
            for number, (member, offset) in enumerate(read.iter_file_members(f, what=what, policy=policy)):
                is_file = member.type == "file"
                entry = Entry(
                    member.path, member.type, member.mode, member.uid, member.gid, member.size, member.linkname,
                    source if is_file else None, offset if is_file else 0, member.mtime, member.xattrs,
                )  # fmt: skip
                old = latest.pop(member.path, None)
                if old is not None:
                    group = links.pop(member.path, None)
                    if group is not None:
                        del group.paths[member.path]
                    if old[1].type == "dir" and entry.type != "dir":
                        replaced.set(member.path, number)
                if entry.type == "hardlink":
                    _join(links, latest, entry)
                latest[member.path] = (number, entry)
    except OSError as err:
        raise StoreError(f"{what}: cannot read {path}: {err.strerror or err}") from err
    kept = {p: e for p, (n, e) in latest.items() if replaced.ancestor(p, lambda then: then > n) is None}
    return [_linked(p, e, links.get(p), kept) for p, e in kept.items()]


@dataclass
class _Links:
    """Paths that share one content (a file and its hardlinks), in the order they were read; mutable while the
    tarball is read."""

    content: Entry  # the file entry whose content and metadata they share
    paths: dict[str, None]
    holder: str | None = None  # the first path kept, which holds the content: settled at the end


def _join(links: dict[str, _Links], latest: Mapping[str, tuple[int, Entry]], link: Entry) -> None:
    """Add the hardlink ``link`` to the group of its target (made when the target's first link comes)."""
    group = links.get(link.linkname)
    if group is None:
        target = latest.get(link.linkname)
        if target is None or target[1].type != "file":
            return  # the reader lets no such hardlink through; left for the writer to refuse
        group = links[link.linkname] = _Links(target[1], {link.linkname: None})
    group.paths[link.path] = None
    links[link.path] = group


def _linked(path: str, entry: Entry, group: _Links | None, kept: Mapping[str, Entry]) -> Entry:
    """The entry of ``path`` once what it was hardlinked to is settled: the first path of its group that is
    kept holds the content, the others are hardlinks to it."""
    if group is None:
        return entry
    if group.holder is None:
        group.holder = next(p for p in group.paths if p in kept)
    if path == group.holder:
        return group.content if group.content.path == path else replace(group.content, path=path)
    return replace(entry, type="hardlink", linkname=group.holder)
