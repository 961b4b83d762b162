"""Reproducible tar layers, written fast, and tar streams read and extracted safely.

This is the only module that touches tar, zstd and gzip; their exceptions become ours here::

    zstandard.ZstdError, isal / zlib / lzma errors, EOFError   ->  UnsafeArchive ("... is truncated or corrupt")
    a hostile entry ('..', device node, write through a symlink) ->  UnsafeArchive
    OSError reading the blob being decoded or writing a layer     ->  StoreError
    a layer entry whose source is missing or changed              ->  OcibuildError
    an invalid Entry list (duplicate path, dangling hardlink)     ->  FormatError

Every message names the layer or archive (``what``) and the entry.

Writing (:func:`write_layer`). The tar stream is a pure function of the entries and ``epoch``:

- Members are sorted like ``tar --sort=name``: by the bytes of each path component, parents before children.
- POSIX ustar headers, ``uname``/``gname`` empty, device numbers zero, ``mtime = min(entry.mtime, epoch)``, no
  atime/ctime, directories named with a trailing '/'. A PAX 'x' header (named ``././@PaxHeader``, all its fields
  zero, records sorted by key) is written only when ustar cannot hold a value: a path that does not fit
  name+prefix, a link target over 100 bytes, a non-ASCII path or link target, size >= 8 GiB, uid/gid > 2097151,
  or xattrs (``SCHILY.xattr.<name>``; values are the xattr bytes decoded with UTF-8/surrogateescape).
- Hardlinked content is written under the path that sorts first; the other paths become hardlinks to it, with the
  content's metadata.
- The archive ends with two zero blocks and no record padding (like Go's archive/tar, i.e. containerd and
  BuildKit) -- except that one more zero block is added when the stream length would be a multiple of 512 KiB:
  zstd's multi-threaded encoder ends a stream whose length is a multiple of its job size either with or without
  an extra empty block depending on thread timing, and the extra block keeps our output independent of that.
- zstd: level 3, multi-threaded mode always (its output does not depend on the number of workers, while the
  single-threaded mode writes different bytes), no checksum, no content size.
- gzip: ISA-L level 1, on one helper thread, in 4 MiB pieces (ISA-L's output depends on how its input is cut, so
  ``_CHUNK`` is part of the gzip format). The gzip header has no name and mtime 0. Level 1 deflates at 300-450
  MB/s on one core and is within 0.3% of level 2's size at the same speed; ``tar | pigz`` (level 6, 2 cores)
  manages about 40 MB/s for a 5% smaller blob.

Reading (:func:`iter_members`, :func:`extract_layer`, :func:`list_layer`, :func:`read_archive_members`) uses a
streaming tar parser of our own rather than ``tarfile``: tarfile takes a truncated or corrupt header in the
middle of a stream for the end of the archive and buffers extended headers of any size in memory. Here:

- A stream must end with an end-of-archive block; otherwise it is truncated or corrupt (this is also what catches
  a truncated zstd stream, which the zstd reader does not report).
- PAX ('x', 'g') and GNU long-name ('L', 'K') headers are limited to 1 MiB; global PAX headers supply defaults
  for uid, gid, mtime and xattrs (not for path, linkpath or size).
- Paths are normalised: leading '/' and './' are dropped (an absolute path is taken as relative to the root, as
  GNU tar and containerd do), '.' and empty components are dropped, '..' anywhere is refused. Entries naming the
  root itself are skipped.
- Character and block devices, fifos, sparse files and unknown types are refused. So is any entry beneath a
  symlink of the same archive, and a hardlink whose target is not a regular file earlier in the archive.
- OCI whiteouts: ``.wh.NAME`` is a member of type "whiteout" and ``.wh..wh..opq`` of type "opaque"; ``linkname``
  holds the path they remove (the directory for "opaque", "" for the root). Other ``.wh..wh.`` names (aufs
  metadata) are skipped.
- ``max_size`` (optional) bounds the number of uncompressed bytes read, against decompression bombs; memory use is
  constant whatever the stream claims.

Extraction (:func:`extract_layer`) opens every directory relative to its parent with O_NOFOLLOW, so an entry whose
parent is a symlink (from this layer or one below) is refused, never followed; what an entry replaces is removed
first (a directory recursively, a symlink itself). Whiteouts remove only what lower layers left: a path this layer
wrote survives a whiteout of it, whatever the order of the two in the stream. Directory modes and mtimes are set
last, so that a read-only directory can still be filled. Owners and xattrs are set only with ``chown`` (as root),
and of the xattrs only ``security.capability`` and ``user.*``.
"""

from __future__ import annotations

import bz2
import errno
import gzip
import hashlib
import io
import logging
import lzma
import os
import shutil
import stat
import struct
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, BinaryIO, Final, cast

from .. import oci
from ..errors import FormatError, OcibuildError, StoreError, UnsafeArchive

# zstandard and isal are imported where a stream is (de)compressed: commands that import this module only to
# read an uncompressed archive or to build nothing need neither (start-up time; zstandard imports `platform`).

log = logging.getLogger(__name__)

ENTRY_TYPES: Final = frozenset({"file", "dir", "symlink", "hardlink"})
MEMBER_TYPES: Final = frozenset({"file", "dir", "symlink", "hardlink", "whiteout", "opaque"})
COMPRESSIONS: Final = ("zstd", "gzip", "none")

WHITEOUT_PREFIX: Final = ".wh."
WHITEOUT_OPAQUE: Final = ".wh..wh..opq"

ZSTD_LEVEL: Final = 3
GZIP_LEVEL: Final = 1
MAX_EXTENDED_HEADER: Final = 1 << 20  # bytes of the PAX / GNU long-name headers of one entry (and of global ones)

_BLOCK: Final = 512
_CHUNK: Final = 4 << 20  # the writer feeds hash and compressor in pieces of this size
_READ: Final = 1 << 20
_ZSTD_JOB_GUARD: Final = 512 << 10
_ZERO_BLOCK: Final = bytes(_BLOCK)
_SOURCE_FLAGS: Final = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK  # never block on a fifo
_MAX_OCTAL_7: Final = 0o7777777
_MAX_OCTAL_11: Final = 0o77777777777
_TYPEFLAG: Final = {"file": b"0", "dir": b"5", "symlink": b"2", "hardlink": b"1"}
_HINT_UNSAFE: Final = "the archive is damaged or hostile; fetch it again or ask its publisher"
_HINT_CORRUPT: Final = "the blob is damaged: fetch it again (a complete download has a valid end-of-archive)"
_ENC: Final = "surrogateescape"


@dataclass(frozen=True)
class Entry:
    """One member of a layer to write.

    ``path`` is normalised (see :func:`normalise_path`). ``linkname`` is a symlink's target, verbatim, or a
    hardlink's target path (normalised). Content of a "file" is ``size`` bytes of ``source`` from ``offset``.
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
    xattrs: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Member:
    """One member of a tar stream being read; ``path`` is normalised.

    For "whiteout" and "opaque" members ``path`` is the marker's own path and ``linkname`` the path removed.
    """

    path: str
    type: str
    mode: int
    uid: int
    gid: int
    size: int
    linkname: str
    mtime: int
    xattrs: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class LayerStats:
    diff_id: oci.Digest  # sha256 of the uncompressed tar stream
    uncompressed_size: int
    entries: int


def _show(text: str) -> str:
    """A path for an error message: quoted, on one line, not absurdly long."""
    shown = repr(text)
    return shown if len(shown) <= 200 else shown[:197] + "..."


def _normalise(path: str, what: str) -> str | None:
    if "\0" in path:
        raise UnsafeArchive(f"{what}: entry {_show(path)} contains a NUL byte", hint=_HINT_UNSAFE)
    parts = []
    for part in path.split("/"):
        if part == "..":
            raise UnsafeArchive(f"{what}: entry {_show(path)} has a '..' component", hint=_HINT_UNSAFE)
        if part and part != ".":
            parts.append(part)
    return "/".join(parts) or None


def normalise_path(path: str, *, what: str = "archive") -> str | None:
    """``path`` relative to the root: leading '/' and './' stripped, '//' and '.' collapsed; None for the root.

    Raises :class:`UnsafeArchive` (naming ``what``) for a '..' component or a NUL byte.
    """
    return _normalise(path, what)


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
# Writing


def _plan(entries: Iterable[Entry]) -> list[Entry]:
    """Validate, sort, and rewrite hardlink groups so content comes under the first path."""
    items = list(entries)
    for e in items:
        if e.type not in ENTRY_TYPES:
            raise FormatError(f"layer entry {_show(e.path)} has unknown type '{e.type}'")
        if not _is_normalised(e.path):
            raise FormatError(f"layer entry {_show(e.path)} is not a normalised relative path")
        if e.size < 0 or e.uid < 0 or e.gid < 0 or e.offset < 0:
            raise FormatError(f"layer entry {_show(e.path)} has a negative size, offset, uid or gid")
        if e.size and e.source is None and e.type == "file":
            raise FormatError(f"layer entry {_show(e.path)} has {e.size} bytes of content but no source")
        if not e.linkname and e.type in ("symlink", "hardlink"):
            raise FormatError(f"layer entry {_show(e.path)} is a {e.type} without a target")
    items.sort(key=lambda e: _sort_key(e.path))
    by_path: dict[str, Entry] = {}
    for e in items:
        if e.path in by_path:
            raise FormatError(f"layer has two entries for {_show(e.path)}")
        cut = e.path.rfind("/")
        if cut > 0:
            parent = by_path.get(e.path[:cut])
            if parent is not None and parent.type != "dir":
                raise FormatError(f"layer entry {_show(e.path)} is beneath {parent.type} {_show(parent.path)}")
        by_path[e.path] = e
    groups: dict[str, list[str]] = {}
    for e in items:
        if e.type != "hardlink":
            continue
        seen = {e.path}
        target = by_path.get(e.linkname)
        while target is not None and target.type == "hardlink" and target.path not in seen:
            seen.add(target.path)
            target = by_path.get(target.linkname)
        if target is None or target.type != "file":
            what = "is not in the layer" if target is None else f"is a {target.type}"
            raise FormatError(
                f"layer entry {_show(e.path)}: hardlink target {_show(e.linkname)} {what}",
                hint="a hardlink must point at a regular file of the same layer",
            )
        groups.setdefault(target.path, [target.path]).append(e.path)
    for content_path, paths in groups.items():
        content = by_path[content_path]
        paths.sort(key=_sort_key)
        first = paths[0]
        by_path[first] = replace(content, path=first)
        for other in paths[1:]:
            by_path[other] = Entry(
                other, "hardlink", content.mode, content.uid, content.gid, 0, first, mtime=content.mtime
            )
    return [by_path[e.path] for e in items]


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
    name, prefix = path, b""
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
    pax: dict[bytes, bytes] = {}
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
    header = _ustar(name, numbers, _TYPEFLAG[kind], link, prefix)
    if not pax:
        return header
    for field_name in (b"path", b"linkpath"):
        if field_name in pax:
            try:
                pax[field_name].decode("utf-8")
            except UnicodeDecodeError:
                pax[b"hdrcharset"] = b"BINARY"
    records = b"".join(_pax_record(k, v) for k, v in sorted(pax.items()))
    pax_numbers = b"0000000\0" * 3 + b"%011o\0" % len(records) + b"00000000000\0"
    pax_header = _ustar(b"././@PaxHeader", pax_numbers, b"x", b"", b"")
    return pax_header + records + bytes(-len(records) % _BLOCK) + header


class _Sink:
    """Takes the tar stream in pieces and writes it, compressed, to ``out``."""

    def __init__(self, out: BinaryIO) -> None:
        self.out = out

    def feed(self, chunk: memoryview) -> None:
        self.out.write(bytes(chunk))

    def finish(self) -> None:
        pass

    def close(self) -> None:
        pass


class _ZstdSink(_Sink):
    """zstd in multi-threaded mode: compress() hands the piece to zstd's workers and returns what they finished."""

    def __init__(self, out: BinaryIO, threads: int) -> None:
        super().__init__(out)
        import zstandard

        compressor = zstandard.ZstdCompressor(
            level=ZSTD_LEVEL, threads=threads, write_checksum=False, write_content_size=False
        )
        self.cobj = compressor.compressobj()

    def feed(self, chunk: memoryview) -> None:
        data = self.cobj.compress(chunk)
        if data:
            self.out.write(data)

    def finish(self) -> None:
        self.out.write(self.cobj.flush())


class _AsyncSink(_Sink):
    """Deflates on one helper thread while the caller reads and hashes (ISA-L releases the GIL).

    Up to three pieces wait, so a slow moment on either side does not stall the other; the compressor sees the
    same calls in the same order, so the bytes do not depend on the timing. (zstd needs no such thread: its
    workers already run beside the caller, and measured slower with one.)
    """

    def __init__(self, out: BinaryIO, compress: Callable[[bytes], bytes], flush: Callable[[], bytes]) -> None:
        super().__init__(out)
        self.compress = compress
        self.flush = flush
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ocibuild-compress")
        self.pending: deque[Future[bytes]] = deque()

    def _write_done(self, keep: int) -> None:
        while len(self.pending) > keep:
            data = self.pending.popleft().result()
            if data:
                self.out.write(data)

    def feed(self, chunk: memoryview) -> None:
        self.pending.append(self.pool.submit(self.compress, bytes(chunk)))
        self._write_done(2)

    def finish(self) -> None:
        self.pending.append(self.pool.submit(self.flush))
        self._write_done(0)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class _TarWriter:
    """Assembles the tar stream in a fixed buffer; every full ``_CHUNK`` is hashed and handed to the sink."""

    def __init__(self, sink: _Sink) -> None:
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

    def copy(self, e: Entry) -> None:
        """Append the content of ``e`` (read from its source) and the padding to a block boundary."""
        source = e.source or ""
        try:
            fd = os.open(source, _SOURCE_FLAGS)
        except OSError as err:
            raise self._source_error(e, err.strerror or str(err)) from err
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
                self.pos = pos + got
                if got == size:
                    if self.pos == _CHUNK:
                        self._flush()
                else:
                    self._read_rest(fd, e, offset + got, size - got)
            else:
                self._read_rest(fd, e, offset, size)
        except OSError as err:
            raise self._source_error(e, err.strerror or str(err)) from err
        finally:
            os.close(fd)
        pad = -e.size % _BLOCK
        if pad:  # never crosses the end of the buffer: _CHUNK is a multiple of the block size
            pos = self.pos
            self.buf[pos : pos + pad] = _ZERO_BLOCK[:pad]
            self.pos = pos + pad
            if self.pos == _CHUNK:
                self._flush()

    def _read_rest(self, fd: int, e: Entry, offset: int, remaining: int) -> None:
        while remaining:
            take = min(remaining, _CHUNK - self.pos)
            got = os.preadv(fd, [self.view[self.pos : self.pos + take]], offset)
            if got == 0:
                raise self._source_error(e, f"it shrank while being read ({e.size - remaining} of {e.size} bytes)")
            self.pos += got
            offset += got
            remaining -= got
            if self.pos == _CHUNK:
                self._flush()

    @staticmethod
    def _source_error(e: Entry, problem: str) -> OcibuildError:
        return OcibuildError(
            f"cannot read {_show(e.source or '')} for layer entry {_show(e.path)}: {problem}",
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


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def write_layer(
    entries: Iterable[Entry], out: BinaryIO, compression: str, *, epoch: int, threads: int | None = None
) -> LayerStats:
    """Write ``entries`` as a reproducible tar, compressed with 'zstd', 'gzip' or 'none', to ``out.write``.

    ``threads`` is the number of zstd workers (default: the CPUs this process may use; at least 1, and the
    bytes do not depend on it). Returns the diff_id and size of the uncompressed stream.
    """
    if compression not in COMPRESSIONS:
        raise FormatError(f"unknown layer compression '{compression}' (use zstd, gzip or none)")
    plan = _plan(entries)
    sink: _Sink
    try:
        if compression == "zstd":
            sink = _ZstdSink(out, max(1, threads if threads is not None else _cpu_count()))
        elif compression == "gzip":
            from isal import isal_zlib

            deflate = isal_zlib.compressobj(GZIP_LEVEL, isal_zlib.DEFLATED, 31)
            sink = _AsyncSink(out, deflate.compress, deflate.flush)
        else:
            sink = _Sink(out)
    except _codec_errors() as err:
        raise OcibuildError(f"cannot start the zstd compressor: {err}") from err
    writer = _TarWriter(sink)
    try:
        for e in plan:
            writer.write(header(e, epoch))
            if e.type == "file" and e.size:
                writer.copy(e)
        writer.finish()
    except OcibuildError:
        raise
    except _codec_errors() as err:
        raise OcibuildError(f"compressing the layer ({compression}) failed: {err}") from err
    except OSError as err:
        raise StoreError(f"writing the layer blob failed: {err}") from err
    finally:
        sink.close()
    return LayerStats(oci.Digest("sha256", writer.sha.hexdigest()), writer.size, len(plan))


# ---------------------------------------------------------------------------------------------------------------
# Decompression

def _codec_errors() -> tuple[type[Exception], ...]:
    """The exceptions of zstandard and isal (evaluated in ``except`` clauses, i.e. only once one is raised)."""
    import zstandard
    from isal import isal_zlib

    return zstandard.ZstdError, cast("type[Exception]", isal_zlib.error)  # (isal's stubs say an instance)


def _decode_errors() -> tuple[type[Exception], ...]:
    return (*_codec_errors(), zlib.error, lzma.LZMAError, EOFError, gzip.BadGzipFile)


def sniff_compression(head: bytes) -> str:
    """'gzip', 'xz', 'zstd', 'bzip2' or 'none', from the first bytes of a file."""
    if head.startswith(b"\x1f\x8b"):
        return "gzip"
    if head.startswith(b"\xfd7zXZ\x00"):
        return "xz"
    if head.startswith(b"\x28\xb5\x2f\xfd"):
        return "zstd"
    if head.startswith(b"BZh") and head[3:4].isdigit():
        return "bzip2"
    return "none"


class _Borrowed:
    """The caller's file, read through readinto, that our close() leaves open."""

    def __init__(self, fileobj: BinaryIO) -> None:
        self.fileobj = fileobj

    def readinto(self, view: memoryview) -> int:
        readinto = getattr(self.fileobj, "readinto", None)
        if readinto is not None:
            return cast(int, readinto(view))
        data = self.fileobj.read(len(view))
        view[: len(data)] = data
        return len(data)

    def close(self) -> None:
        pass


class _Decoded(io.RawIOBase):
    """A decompressing reader that translates library errors and enforces ``max_size``."""

    def __init__(self, inner: Any, what: str, max_size: int | None) -> None:
        super().__init__()
        self.inner = inner
        self.what = what
        self.max_size = max_size
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        try:
            n = self.inner.readinto(view)
        except OcibuildError:
            raise
        except _decode_errors() as err:
            raise UnsafeArchive(f"{self.what} is truncated or corrupt ({err})", hint=_HINT_CORRUPT) from err
        except OSError as err:
            raise StoreError(f"{self.what}: read failed: {err}") from err
        self.count += n or 0
        if self.max_size is not None and self.count > self.max_size:
            raise UnsafeArchive(
                f"{self.what} expands to more than {self.max_size} bytes",
                hint="raise the size limit if the layer is really that large",
            )
        return n or 0

    def close(self) -> None:
        if not self.closed:
            try:
                self.inner.close()
            except OSError:
                pass
            except _decode_errors():
                pass
        super().close()


def open_layer(
    fileobj: BinaryIO, compression: str, *, what: str = "layer", max_size: int | None = None
) -> BinaryIO:
    """A reader of the decompressed ``fileobj`` ('zstd', 'gzip', 'xz', 'bzip2' or 'none').

    Closing it does not close ``fileobj``. Corrupt input raises :class:`UnsafeArchive` naming ``what``.
    """
    try:
        inner: Any
        if compression == "zstd":
            import zstandard

            inner = zstandard.ZstdDecompressor().stream_reader(
                fileobj, read_size=_READ, read_across_frames=True, closefd=False
            )
        elif compression == "gzip":
            from isal import igzip

            gzip_file: Any = igzip.IGzipFile  # (igzip is untyped)
            inner = gzip_file(fileobj=fileobj, mode="rb")
        elif compression == "xz":
            inner = lzma.LZMAFile(fileobj, "rb")
        elif compression == "bzip2":
            inner = bz2.BZ2File(fileobj, "rb")
        elif compression == "none":
            inner = _Borrowed(fileobj)
        else:
            raise FormatError(f"{what}: unknown compression '{compression}'")
    except _decode_errors() as err:
        raise UnsafeArchive(f"{what} is truncated or corrupt ({err})", hint=_HINT_CORRUPT) from err
    return io.BufferedReader(_Decoded(inner, what, max_size), _READ)


def decompress_to(
    src: BinaryIO, dst: BinaryIO, compression: str, *, what: str = "archive", max_size: int | None = None
) -> None:
    """Stream ``src`` decompressed ('gzip', 'xz', 'zstd', 'bzip2' or 'none') into ``dst``, in constant memory.

    A zstd stream cut short is not detected here (the zstd reader does not report it); the tar reader's
    end-of-archive check catches it when the result is read as a tar.
    """
    reader = open_layer(src, compression, what=what, max_size=max_size)
    try:
        buf = bytearray(_READ)
        view = memoryview(buf)
        while n := cast(io.RawIOBase, reader).readinto(view):
            try:
                dst.write(view[:n])
            except OSError as err:
                raise StoreError(f"{what}: cannot write the decompressed data: {err}") from err
    finally:
        reader.close()


# ---------------------------------------------------------------------------------------------------------------
# Tar parsing


class _Input:
    """Buffered reading of the (decompressed) tar stream, tracking the offset."""

    def __init__(self, raw: Any, what: str, *, seekable: bool = False) -> None:
        self.raw = raw  # has readinto(); seek() too when seekable
        self.what = what
        self.seekable = seekable
        self.store = memoryview(bytearray(_READ))
        self.buf = self.store[:0]
        self.pos = 0

    def _fill(self) -> bool:
        n = int(self.raw.readinto(self.store))
        self.buf = self.store[:n]
        return n > 0

    def read(self, n: int) -> bytes:
        """``n`` bytes, or fewer only at the end of the stream."""
        buf = self.buf
        if len(buf) >= n:
            self.buf = buf[n:]
            self.pos += n
            return bytes(buf[:n])
        parts, got = [bytes(buf)], len(buf)
        self.buf = buf[:0]
        while got < n and self._fill():
            take = min(n - got, len(self.buf))
            parts.append(bytes(self.buf[:take]))
            self.buf = self.buf[take:]
            got += take
        self.pos += got
        return b"".join(parts)

    def readinto(self, view: memoryview) -> int:
        """Up to ``len(view)`` bytes; 0 only at the end of the stream."""
        while True:
            if self.buf:
                n = min(len(view), len(self.buf))
                view[:n] = self.buf[:n]
                self.buf = self.buf[n:]
                self.pos += n
                return n
            if len(view) >= _READ:
                n = cast(int, self.raw.readinto(view))
                self.pos += n
                return n
            if not self._fill():
                return 0

    def skip(self, n: int) -> None:
        take = min(n, len(self.buf))
        self.buf = self.buf[take:]
        self.pos += take
        n -= take
        if n and self.seekable:
            self.raw.seek(n, io.SEEK_CUR)
            self.pos += n
            return
        while n:
            if not self._fill():
                raise UnsafeArchive(f"{self.what} is truncated or corrupt (ends inside an entry)", hint=_HINT_CORRUPT)
            take = min(n, len(self.buf))
            self.buf = self.buf[take:]
            self.pos += take
            n -= take

    def drain(self) -> None:
        """Read the rest of the stream (after the end of the archive), so that all of it is decoded."""
        while self._fill():
            pass


@dataclass
class _Raw:
    """One tar header with its extensions applied; paths not yet checked."""

    name: str
    typeflag: bytes
    mode: int
    uid: int
    gid: int
    size: int
    linkname: str
    mtime: int
    xattrs: dict[str, str]
    offset: int  # of the header
    data_offset: int
    data_size: int  # bytes of data that follow the header in the stream


class _Data(io.RawIOBase):
    """The content of one member; valid until the iteration moves on."""

    def __init__(self, inp: _Input, size: int, what: str, name: str) -> None:
        super().__init__()
        self.inp = inp
        self.remaining = size
        self.what = what
        self.name = name
        self.valid = True

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if not self.valid:
            raise ValueError(f"the reader of {self.name!r} is no longer valid (the iteration moved on)")
        view = memoryview(buffer).cast("B")
        n = min(len(view), self.remaining)
        if n == 0:
            return 0
        got = self.inp.readinto(view[:n])
        if got == 0:
            raise UnsafeArchive(
                f"{self.what} is truncated or corrupt (ends inside {_show(self.name)})", hint=_HINT_CORRUPT
            )
        self.remaining -= got
        return got

    def read(self, size: int | None = -1) -> bytes:
        """Like a buffered file: ``size`` bytes unless the member ends first (everything left for -1)."""
        want = self.remaining if size is None or size < 0 else min(size, self.remaining)
        out = bytearray(want)
        view, got = memoryview(out), 0
        while got < want:
            got += self.readinto(view[got:])
        return bytes(out)

    def readall(self) -> bytes:
        return self.read(-1)


def _octal(field: bytes, what: str, offset: int) -> int:
    if field[:1] and field[0] & 0x80:
        if field[0] != 0x80:
            raise UnsafeArchive(f"{what}: negative number in the tar header at offset {offset}", hint=_HINT_UNSAFE)
        return int.from_bytes(field[1:], "big")
    digits = field.split(b"\0", 1)[0].strip(b" ")
    if digits.strip(b"01234567"):
        raise UnsafeArchive(f"{what} is truncated or corrupt (bad tar header at offset {offset})", hint=_HINT_CORRUPT)
    return int(digits, 8) if digits else 0


def _cstr(field: bytes) -> bytes:
    return field.split(b"\0", 1)[0]


def _decimal(value: bytes, key: bytes, what: str, offset: int) -> int:
    text = value.split(b".", 1)[0] if key == b"mtime" else value
    negative = key == b"mtime" and text.startswith(b"-")
    digits = text[1:] if negative else text
    if not digits.isdigit():
        raise UnsafeArchive(f"{what}: bad PAX value for '{key.decode()}' at offset {offset}", hint=_HINT_UNSAFE)
    return 0 if negative else int(digits)


def _parse_pax(data: bytes, what: str, offset: int) -> dict[bytes, bytes]:
    records: dict[bytes, bytes] = {}
    pos = 0
    while pos < len(data):
        if data[pos] == 0:  # some writers pad the records with NULs
            break
        space = data.find(b" ", pos, pos + 20)
        length_text = data[pos:space] if space > 0 else b""
        length = int(length_text) if length_text.isdigit() else 0
        record = data[pos : pos + length]
        if length <= space - pos + 1 or len(record) != length or not record.endswith(b"\n") or b"=" not in record:
            raise UnsafeArchive(f"{what}: malformed PAX header at offset {offset}", hint=_HINT_UNSAFE)
        key, _, value = record[space - pos + 1 : -1].partition(b"=")
        records[key] = value
        pos += length
    return records


_HEADER_ONLY: Final = frozenset({b"1", b"2", b"3", b"4", b"5", b"6"})


def _parse(inp: _Input, what: str) -> Iterator[tuple[_Raw, _Data]]:
    """The members of a tar stream, with PAX and GNU extensions applied. Ends only at an end-of-archive block."""
    global_pax: dict[bytes, bytes] = {}
    pax: dict[bytes, bytes] = {}
    long_name: bytes | None = None
    long_link: bytes | None = None
    extended = 0  # bytes of extended headers for the next entry (and, cumulated, of global ones)
    global_extended = 0
    while True:
        offset = inp.pos
        block = inp.read(_BLOCK)
        if len(block) < _BLOCK:
            problem = "it is empty" if offset == 0 and not block else "no end-of-archive block"
            raise UnsafeArchive(f"{what} is truncated or corrupt ({problem})", hint=_HINT_CORRUPT)
        if block == _ZERO_BLOCK:
            if pax or long_name is not None or long_link is not None:
                raise UnsafeArchive(
                    f"{what} is truncated or corrupt (extended header without entry)", hint=_HINT_CORRUPT
                )
            return
        stored = _octal(block[148:156], what, offset)
        unsigned = sum(block[:148]) + 256 + sum(block[156:])
        if stored != unsigned and stored != unsigned - 256 * sum(b > 127 for b in block[:148] + block[156:]):
            raise UnsafeArchive(
                f"{what} is truncated or corrupt (bad tar header checksum at offset {offset})", hint=_HINT_CORRUPT
            )
        typeflag = block[156:157]
        size = _octal(block[124:136], what, offset)
        if typeflag in (b"x", b"g", b"L", b"K", b"X"):
            if typeflag == b"g":
                global_extended += size
            else:
                extended += size
            if max(size, extended, global_extended) > MAX_EXTENDED_HEADER:
                raise UnsafeArchive(
                    f"{what}: extended header at offset {offset} is {size} bytes (the limit is "
                    f"{MAX_EXTENDED_HEADER} for all those of an entry)",
                    hint=_HINT_UNSAFE,
                )
            data = inp.read(size)
            if len(data) < size:
                raise UnsafeArchive(f"{what} is truncated or corrupt (ends inside a header)", hint=_HINT_CORRUPT)
            inp.skip(-size % _BLOCK)
            if typeflag in (b"x", b"X"):
                pax.update(_parse_pax(data, what, offset))
            elif typeflag == b"g":
                for key, value in _parse_pax(data, what, offset).items():
                    if key in (b"path", b"linkpath", b"size"):
                        continue
                    if value:
                        global_pax[key] = value
                    else:
                        global_pax.pop(key, None)
            elif typeflag == b"L":
                long_name = _cstr(data)
            else:
                long_link = _cstr(data)
            continue
        name = _cstr(block[0:100])
        if block[257:263] == b"ustar\x00":
            prefix = _cstr(block[345:500])
            if prefix:
                name = prefix + b"/" + name
        if long_name is not None:
            name = long_name
        link = long_link if long_link is not None else _cstr(block[157:257])
        values = dict(global_pax)
        for key, value in pax.items():
            if value:
                values[key] = value
            else:  # an empty record unsets a global one
                values.pop(key, None)
        name = values.get(b"path", name)
        link = values.get(b"linkpath", link)
        uid = _octal(block[108:116], what, offset)
        gid = _octal(block[116:124], what, offset)
        mtime = _octal(block[136:148], what, offset)
        if b"size" in values:
            size = _decimal(values[b"size"], b"size", what, offset)
        if b"uid" in values:
            uid = _decimal(values[b"uid"], b"uid", what, offset)
        if b"gid" in values:
            gid = _decimal(values[b"gid"], b"gid", what, offset)
        if b"mtime" in values:
            mtime = _decimal(values[b"mtime"], b"mtime", what, offset)
        xattrs = {}
        for key, value in values.items():
            if key.startswith(b"SCHILY.xattr."):
                xattrs[key[13:].decode("utf-8", _ENC)] = value.decode("utf-8", _ENC)
            elif key.startswith(b"GNU.sparse."):
                typeflag = b"S"
        pax, long_name, long_link, extended = {}, None, None, 0
        data_size = 0 if typeflag in _HEADER_ONLY else size
        raw = _Raw(
            name.decode("utf-8", _ENC), typeflag, _octal(block[100:108], what, offset) & 0o7777, uid, gid,
            size, link.decode("utf-8", _ENC), mtime, xattrs, offset, inp.pos, data_size,
        )  # fmt: skip
        reader = _Data(inp, data_size, what, raw.name)
        yield raw, reader
        reader.valid = False
        inp.skip(reader.remaining + (-data_size % _BLOCK))


class _Checker:
    """Turns raw headers into Members, refusing what could escape the root or is not a plain tree."""

    def __init__(self, what: str, *, skip_devices: bool = False) -> None:
        self.what = what
        self.skip_devices = skip_devices
        self.files: set[str] = set()
        self.symlinks: set[str] = set()

    def _refuse(self, raw: _Raw, problem: str) -> UnsafeArchive:
        return UnsafeArchive(f"{self.what}: entry {_show(raw.name)} {problem}", hint=_HINT_UNSAFE)

    def _symlink_above(self, path: str) -> str | None:
        """The first ancestor of ``path`` that is a symlink of this archive, if any."""
        if self.symlinks:
            cut = path.find("/")
            while cut > 0:
                if path[:cut] in self.symlinks:
                    return path[:cut]
                cut = path.find("/", cut + 1)
        return None

    def member(self, raw: _Raw) -> Member | None:
        flag = raw.typeflag
        if flag in (b"0", b"\0", b"7"):
            kind = "dir" if raw.name.endswith("/") else "file"
        elif flag in (b"5", b"D"):
            kind = "dir"
        elif flag == b"2":
            kind = "symlink"
        elif flag == b"1":
            kind = "hardlink"
        elif flag in (b"3", b"4", b"6"):
            if self.skip_devices:
                log.debug("%s: skipping device or fifo %r", self.what, raw.name)
                return None
            raise self._refuse(raw, "is a device node" if flag != b"6" else "is a fifo")
        elif flag == b"V":
            return None  # a volume label
        elif flag == b"S":
            raise self._refuse(raw, "is a sparse file (not supported)")
        else:
            raise self._refuse(raw, f"has unsupported type {flag!r}")
        path = _normalise(raw.name, self.what)
        if path is None:
            if kind == "dir":
                return None  # the root itself
            raise self._refuse(raw, f"would replace the root with a {kind}")
        link = self._symlink_above(path)
        if link is not None:
            raise self._refuse(raw, f"is beneath symlink {_show(link)} of the same archive")
        parent, _, base = path.rpartition("/")
        linkname = raw.linkname
        if base.startswith(WHITEOUT_PREFIX):
            if base == WHITEOUT_OPAQUE:
                kind, linkname = "opaque", parent
            elif base.startswith(WHITEOUT_PREFIX + WHITEOUT_PREFIX):
                return None  # aufs metadata
            else:
                target = base[len(WHITEOUT_PREFIX) :]
                if target in ("", ".", ".."):
                    raise self._refuse(raw, "is a whiteout of an invalid name")
                kind, linkname = "whiteout", f"{parent}/{target}" if parent else target
                self.files.discard(linkname)
                self.symlinks.discard(linkname)
            return Member(path, kind, raw.mode, raw.uid, raw.gid, 0, linkname, raw.mtime)
        if kind == "hardlink":
            target_path = _normalise(linkname, self.what)
            if target_path is None or target_path not in self.files or self._symlink_above(target_path):
                raise self._refuse(
                    raw, f"is a hardlink to {_show(linkname)}, not to a regular file earlier in the archive"
                )
            linkname = target_path
        elif kind == "symlink":
            if not linkname or "\0" in linkname:
                raise self._refuse(raw, "is a symlink with an empty or invalid target")
        else:
            linkname = ""
        if kind in ("file", "hardlink"):
            self.files.add(path)
            self.symlinks.discard(path)
        elif kind == "symlink":
            self.symlinks.add(path)
            self.files.discard(path)
        else:
            self.files.discard(path)
            self.symlinks.discard(path)
        size = raw.size if kind == "file" else 0
        return Member(path, kind, raw.mode, raw.uid, raw.gid, size, linkname, raw.mtime, raw.xattrs)


def iter_members(
    fileobj: BinaryIO, compression: str, *, what: str, max_size: int | None = None
) -> Iterator[tuple[Member, BinaryIO | None]]:
    """The members of a layer, in stream order, each with a reader of its content ("file" members only).

    A reader is valid until the next member is taken. Unsafe or corrupt input raises :class:`UnsafeArchive`
    naming ``what`` and the entry. The rest of the stream is read after the end-of-archive block.
    """
    reader = open_layer(fileobj, compression, what=what, max_size=max_size)
    try:
        inp = _Input(reader, what)
        checker = _Checker(what)
        for raw, data in _parse(inp, what):
            member = checker.member(raw)
            if member is not None:
                yield member, cast(BinaryIO, data) if member.type == "file" else None
        inp.drain()
    finally:
        reader.close()


def list_layer(fileobj: BinaryIO, compression: str, *, what: str, max_size: int | None = None) -> dict[str, str]:
    """path -> fingerprint of every member, to find independent layers that disagree about a path.

    Fingerprints: "file:<mode, 4 octal digits>:<sha256 hex>", "dir:<mode>", "symlink:<target>",
    "hardlink:<target>", "whiteout", "opaque". A later member of the same path wins.
    """
    result: dict[str, str] = {}
    buf = bytearray(_READ)
    view = memoryview(buf)
    for member, data in iter_members(fileobj, compression, what=what, max_size=max_size):
        if member.type == "file":
            sha = hashlib.sha256()
            assert data is not None
            while n := cast(io.RawIOBase, data).readinto(view):
                sha.update(view[:n])
            result[member.path] = f"file:{member.mode:04o}:{sha.hexdigest()}"
        elif member.type == "dir":
            result[member.path] = f"dir:{member.mode:04o}"
        elif member.type in ("symlink", "hardlink"):
            result[member.path] = f"{member.type}:{member.linkname}"
        else:
            result[member.path] = member.type
    return result


def read_archive_members(path: Path, *, what: str, skip_devices: bool = False) -> list[Entry]:
    """The entries of an uncompressed, seekable tar file, pointing into it (``source``, ``offset``).

    The same checks as :func:`iter_members`, except that device nodes and fifos are left out instead of refused
    when ``skip_devices`` (a root filesystem made by mmdebstrap has /dev entries). OCI whiteouts are refused
    (they would delete files of lower layers). When a path occurs twice the later entry wins, as when extracting.
    """
    try:
        f = open(path, "rb")
    except OSError as err:
        raise StoreError(f"{what}: cannot open {path}: {err.strerror}") from err
    source = str(path)
    result: dict[str, Entry] = {}
    try:
        with f:
            _read_archive(f, source, what, result, skip_devices)
    except OSError as err:
        raise StoreError(f"{what}: cannot read {path}: {err.strerror or err}") from err
    return list(result.values())


def _read_archive(f: BinaryIO, source: str, what: str, result: dict[str, Entry], skip_devices: bool) -> None:
    file_size = os.fstat(f.fileno()).st_size
    inp = _Input(f, what, seekable=True)
    checker = _Checker(what, skip_devices=skip_devices)
    for raw, _data in _parse(inp, what):
        member = checker.member(raw)
        if member is None:
            continue
        if member.type in ("whiteout", "opaque"):
            raise UnsafeArchive(
                f"{what}: entry {_show(raw.name)} is an OCI whiteout, which an archive may not contain",
                hint=_HINT_UNSAFE,
            )
        if raw.data_offset + raw.data_size > file_size:
            raise UnsafeArchive(f"{what} is truncated or corrupt (ends inside {_show(raw.name)})", hint=_HINT_CORRUPT)
        entry = Entry(
            member.path, member.type, member.mode, member.uid, member.gid, member.size, member.linkname,
            source if member.type == "file" else None, raw.data_offset if member.type == "file" else 0,
            member.mtime, member.xattrs,
        )  # fmt: skip
        old = result.pop(member.path, None)
        if old is not None:
            _forget(result, old, keep_children=entry.type == "dir")
        result[member.path] = entry


def _forget(result: dict[str, Entry], old: Entry, *, keep_children: bool) -> None:
    """Drop ``old`` (replaced by a later entry of its path), keeping what referred to it consistent."""
    links = [k for k, v in result.items() if v.type == "hardlink" and v.linkname == old.path]
    if links and old.type == "file":
        result[links[0]] = replace(old, path=links[0])
        for k in links[1:]:
            result[k] = replace(result[k], linkname=links[0])
    elif links:
        for k in links:
            result[k] = replace(result[k], linkname=old.linkname)
    if old.type == "dir" and not keep_children:
        prefix = old.path + "/"
        for k in [k for k in result if k.startswith(prefix)]:
            del result[k]


# ---------------------------------------------------------------------------------------------------------------
# Extraction

# Only these (and user.*) are set when extracting: trusted.overlay.* and the like could steer the filesystem.
_EXTRACTED_XATTRS: Final = frozenset({"security.capability"})
_NEW_FILE_FLAGS: Final = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_DIR_FLAGS: Final = os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC | getattr(os, "O_PATH", os.O_RDONLY)


class _Extractor:
    """Applies members below a root through directory fds, never following a symlink."""

    def __init__(self, root: Path, what: str, chown: bool) -> None:
        self.what = what
        self.chown = chown
        self.root_fd = os.open(root, os.O_DIRECTORY | os.O_CLOEXEC | getattr(os, "O_PATH", os.O_RDONLY))
        self.stack: list[tuple[str, int]] = []  # the open directories leading to the last parent
        self.written: set[str] = set()  # paths this layer created
        self.touched: set[str] = set()  # ancestors of those
        self.dirs: dict[str, Member] = {}  # directory metadata, applied at the end
        self.buf = bytearray(_READ)
        self.entry = ""

    def close(self) -> None:
        for _, fd in self.stack:
            os.close(fd)
        self.stack = []
        os.close(self.root_fd)

    def _unsafe(self, problem: str) -> UnsafeArchive:
        return UnsafeArchive(f"{self.what}: entry {_show(self.entry)} {problem}", hint=_HINT_UNSAFE)

    def _mark(self, path: str) -> None:
        self.written.add(path)
        parent = _parent(path)
        while parent and parent not in self.touched:
            self.touched.add(parent)
            parent = _parent(parent)

    def _open_dir(self, parent_fd: int, name: str, rel: str, *, create: bool, strict: bool) -> int | None:
        try:
            return os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
        except FileNotFoundError:
            if not create:
                return None
            os.mkdir(name, 0o755, dir_fd=parent_fd)
            self._mark(rel)
            return os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
        except OSError as err:
            if err.errno not in (errno.ENOTDIR, errno.ELOOP):
                raise
            if not strict:
                return None
            if stat.S_ISLNK(os.stat(name, dir_fd=parent_fd, follow_symlinks=False).st_mode):
                raise self._unsafe(f"would be written through the symlink {_show(rel)}") from None
            raise self._unsafe(f"is beneath {_show(rel)}, which is not a directory") from None

    def _dir(self, parts: list[str], *, create: bool = True, strict: bool = True) -> int | None:
        """An fd of the directory ``parts`` below the root (cached along the current path), or None."""
        stack = self.stack
        keep = 0
        while keep < len(stack) and keep < len(parts) and stack[keep][0] == parts[keep]:
            keep += 1
        for _, fd in stack[keep:]:
            os.close(fd)
        del stack[keep:]
        cur = stack[-1][1] if stack else self.root_fd
        for i in range(keep, len(parts)):
            opened = self._open_dir(cur, parts[i], "/".join(parts[: i + 1]), create=create, strict=strict)
            if opened is None:
                return None
            stack.append((parts[i], opened))
            cur = opened
        return cur

    def _remove(self, dir_fd: int, name: str) -> None:
        """Remove ``name`` (recursively for a directory), never following a symlink."""
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(name, dir_fd=dir_fd)
        else:
            os.unlink(name, dir_fd=dir_fd)

    def _whiteout(self, dir_fd: int, name: str, rel: str) -> None:
        """Remove what lower layers have at ``rel``, keeping what this layer wrote."""
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return
        if rel not in self.written and rel not in self.touched:
            self._remove(dir_fd, name)
        elif stat.S_ISDIR(st.st_mode):
            fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
            try:
                self._prune(fd, rel)
            finally:
                os.close(fd)

    def _prune(self, fd: int, rel: str) -> None:
        list_fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fd)
        try:
            names = sorted(os.listdir(list_fd))
        finally:
            os.close(list_fd)
        for child in names:
            self._whiteout(fd, child, f"{rel}/{child}" if rel else child)

    def _metadata(self, fd: int, m: Member) -> None:
        if self.chown:
            os.fchown(fd, m.uid, m.gid)
            for key, value in m.xattrs.items():
                if key not in _EXTRACTED_XATTRS and not key.startswith("user."):
                    log.warning("%s: not setting xattr %s on %r", self.what, key, m.path)
                    continue
                try:
                    os.setxattr(fd, key, value.encode("utf-8", _ENC))
                except OSError as err:
                    log.warning("%s: cannot set xattr %s on %r: %s", self.what, key, m.path, err.strerror)
        os.fchmod(fd, m.mode)
        ns = m.mtime * 1_000_000_000
        os.utime(fd, ns=(ns, ns))

    def apply(self, m: Member, data: BinaryIO | None) -> None:
        self.entry = m.path
        if m.type in ("whiteout", "opaque"):
            target = m.linkname
            parts = target.split("/") if target else []
            if m.type == "opaque":
                fd = self._dir(parts, create=False)
                if fd is not None:
                    self._prune(fd, target)
            else:
                fd = self._dir(parts[:-1], create=False)
                if fd is not None:
                    self._whiteout(fd, parts[-1], target)
            return
        parts = m.path.split("/")
        name = parts[-1]
        parent_fd = self._dir(parts[:-1])
        assert parent_fd is not None
        self._mark(m.path)
        if m.type == "dir":
            try:
                st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
                if not stat.S_ISDIR(st.st_mode):
                    os.unlink(name, dir_fd=parent_fd)
                    os.mkdir(name, 0o700, dir_fd=parent_fd)
            except FileNotFoundError:
                os.mkdir(name, 0o700, dir_fd=parent_fd)
            self.dirs[m.path] = m
        elif m.type == "file":
            self._remove(parent_fd, name)
            fd = os.open(name, _NEW_FILE_FLAGS, 0o600, dir_fd=parent_fd)
            try:
                assert data is not None
                view = memoryview(self.buf)
                while n := cast(io.RawIOBase, data).readinto(view):
                    chunk = view[:n]
                    while chunk:
                        chunk = chunk[os.write(fd, chunk) :]
                self._metadata(fd, m)
            finally:
                os.close(fd)
        elif m.type == "symlink":
            self._remove(parent_fd, name)
            os.symlink(m.linkname, name, dir_fd=parent_fd)
            if self.chown:
                os.chown(name, m.uid, m.gid, dir_fd=parent_fd, follow_symlinks=False)
            ns = m.mtime * 1_000_000_000
            os.utime(name, ns=(ns, ns), dir_fd=parent_fd, follow_symlinks=False)
        elif m.type == "hardlink":
            self._link(m, parent_fd, name)

    def _link(self, m: Member, parent_fd: int, name: str) -> None:
        if m.linkname == m.path:
            return
        tparts = m.linkname.split("/")
        fds: list[int] = []
        try:
            cur = self.root_fd
            for i, part in enumerate(tparts[:-1]):
                fd = self._open_dir(cur, part, "/".join(tparts[: i + 1]), create=False, strict=True)
                if fd is None:
                    raise self._unsafe(f"is a hardlink to {_show(m.linkname)}, which does not exist")
                fds.append(fd)
                cur = fd
            try:
                st = os.stat(tparts[-1], dir_fd=cur, follow_symlinks=False)
            except FileNotFoundError:
                raise self._unsafe(f"is a hardlink to {_show(m.linkname)}, which does not exist") from None
            if not stat.S_ISREG(st.st_mode):
                raise self._unsafe(f"is a hardlink to {_show(m.linkname)}, which is not a regular file")
            self._remove(parent_fd, name)
            try:
                os.link(tparts[-1], name, src_dir_fd=cur, dst_dir_fd=parent_fd, follow_symlinks=False)
            except FileNotFoundError:
                raise self._unsafe(f"is a hardlink to {_show(m.linkname)}, which it replaced") from None
        finally:
            for fd in fds:
                os.close(fd)

    def finish(self) -> None:
        """Directory modes, owners and mtimes, deepest first, once nothing more is written into them."""
        for path in sorted(self.dirs, reverse=True):
            self.entry = path
            parts = path.split("/")
            parent_fd = self._dir(parts[:-1], create=False, strict=False)
            if parent_fd is None:
                continue
            try:
                fd = os.open(parts[-1], os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent_fd)
            except OSError as err:
                if err.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                    continue  # replaced later in the layer
                raise
            try:
                self._metadata(fd, self.dirs[path])
            finally:
                os.close(fd)


def extract_layer(
    fileobj: BinaryIO,
    compression: str,
    root: Path,
    *,
    what: str,
    chown: bool | None = None,
    max_size: int | None = None,
) -> None:
    """Apply a layer to the directory ``root`` (which holds the layers below it), OCI whiteouts included.

    Never writes outside ``root``: every parent is opened relative to its own parent with O_NOFOLLOW, and an
    entry to be written through a symlink is refused. An existing path is removed (not followed) before being
    replaced. Hardlinks may only point at regular files inside ``root``. Sets modes and mtimes, and owners and
    xattrs when ``chown`` (default: when running as root). Missing parents are created with mode 0755.
    """
    if chown is None:
        chown = os.geteuid() == 0
    try:
        extractor = _Extractor(root, what, chown)
    except OSError as err:
        raise StoreError(f"{what}: cannot open the extraction root {root}: {err.strerror}") from err
    try:
        for member, data in iter_members(fileobj, compression, what=what, max_size=max_size):
            extractor.apply(member, data)
        extractor.finish()
    except OcibuildError:
        raise
    except OSError as err:
        raise StoreError(
            f"{what}: cannot extract entry {_show(extractor.entry)} into {root}: {err.strerror or err}",
            hint="check free space and permissions below the root",
        ) from err
    finally:
        extractor.close()
