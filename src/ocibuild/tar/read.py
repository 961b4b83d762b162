"""The one tar parser: headers, PAX and GNU extensions, and the members they describe, checked by a policy.

A streaming parser of our own rather than ``tarfile``: tarfile takes a truncated or corrupt header in the middle
of a stream for the end of the archive and buffers extended headers of any size in memory. Every use states what
it accepts with a :class:`Policy`:

- :data:`LAYER`: an OCI layer (:func:`iter_members`, :func:`list_layer`, and extraction).
- :data:`TARBALL`: a tar file made into a layer (:func:`ocibuild.tar.write.tarball_entries`): a layer's rules, but
  OCI whiteouts are refused; :data:`TARBALL_SKIPPING_DEVICES` leaves device nodes and fifos out instead.
- :data:`LAYOUT`: an oci-archive (:mod:`ocibuild.archive`): only files and directories, no links, no global or
  link-name extensions, no absolute paths, at most 64 KiB of extended headers per entry, two zero blocks at the end.

The rules every policy shares:

- A stream must end with an end-of-archive block, or (layers and tarballs) anywhere after its last member's
  content: where the next header would start, or inside the padding (umoci 0.4's `insert` writes layers without
  padding or end blocks; podman, containerd and umoci read them). A stream ending elsewhere (inside a header or a
  member's content) is truncated or corrupt — this is also what catches a truncated zstd stream, which the zstd
  reader does not report. Header checksums are checked.
- Extended headers are limited in size (1 MiB for layers); global PAX headers supply defaults for uid, gid, mtime
  and xattrs (not for path, linkpath or size).
- Paths are normalised: leading './' is dropped (and a leading '/', when the policy takes an absolute path as
  relative to the root, as GNU tar and containerd do), '.' and empty components are dropped, '..' anywhere is
  refused. Entries naming the root itself are skipped.
- Types the policy does not list are refused (sparse files always). So is any entry beneath a symlink of the same
  archive, and a hardlink whose target is not a regular file earlier in the archive.
- OCI whiteouts (layers): ``.wh.NAME`` is a member of type "whiteout" and ``.wh..wh..opq`` of type "opaque";
  ``linkname`` holds the path they remove (the directory for "opaque", "" for the root). Other ``.wh..wh.`` names
  (aufs metadata) are skipped.
- ``max_size`` (optional, compressed streams) bounds the number of uncompressed bytes read, against decompression
  bombs; memory use is constant whatever the stream claims.
- At most :data:`MAX_ENTRIES` entries (1,000,000) are read from one layer or archive: what a read keeps per path
  (the checks of links, a layer's listing) grows with the entries, and this bounds it (to a few hundred MB), and
  the time a hostile layer of empty files can take. The writer makes no larger layer.

A hostile entry raises :class:`UnsafeArchive` with the policy's ``hint_unsafe``, a truncated or corrupt stream with
its ``hint_corrupt``; every message names the layer or archive (``what``) and the entry.

(At ~720 lines this module is larger than a room should be, on purpose: the header parser and the member checks
apply one policy between them, and the one tar parser is meant to be read, and fixed, in one place.)
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, BinaryIO, Final, Generic, Literal, TypeVar, cast

from ..errors import UnsafeArchive
from . import codecs

log = logging.getLogger(__name__)

V = TypeVar("V")

#: Entries (not counting extended headers) one layer or archive may hold; see the module docstring.
MAX_ENTRIES: Final = 1_000_000
MAX_ENTRIES_HINT: Final = (f"ocibuild reads at most {MAX_ENTRIES:,} entries from one layer or archive: split the "
                           "tree into several layers, or ask the publisher of this one")
MEMBER_TYPES: Final = frozenset({"file", "dir", "symlink", "hardlink", "whiteout", "opaque"})
WHITEOUT_PREFIX: Final = ".wh."
WHITEOUT_OPAQUE: Final = ".wh..wh..opq"

_BLOCK: Final = 512
_READ: Final = 1 << 20
_AFTER_SEEK: Final = 16 << 10  # what a seekable input reads after a seek; doubled by each read, up to _READ
_ZERO_BLOCK: Final = bytes(_BLOCK)
_ENC: Final = "surrogateescape"
_HEADER_ONLY: Final = frozenset({b"1", b"2", b"3", b"4", b"5", b"6"})  # typeflags whose size is not content
_HINT_UNSAFE: Final = "the archive is damaged or hostile; fetch it again or ask its publisher"
# Layers and tarballs are read from blobs and files whose digest is checked: a damaged transfer fails that check
# first, so a stream cut short here was made so.
_HINT_CUT: Final = ("it was written incomplete (a damaged download fails its digest check before this): make it "
                    "again, or ask its publisher for an intact one")
# How an entry of a type a policy refuses is described; the type flags are POSIX's and GNU's.
_DESCRIBED: Final = {
    b"1": "a hardlink", b"2": "a symlink", b"3": "a character device node", b"4": "a block device node",
    b"6": "a fifo", b"S": "a sparse file", b"V": "a volume label", b"D": "a GNU dump directory",
    b"g": "a global PAX header", b"K": "a GNU long link name", b"X": "a Solaris extended header",
}  # fmt: skip


#: The xattrs of the (many) members that have none: one shared, immutable empty mapping.
NO_XATTRS: Final[Mapping[str, str]] = MappingProxyType({})


@dataclass(frozen=True, slots=True)  # slots: a layer may have a million members in memory at once
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
    xattrs: Mapping[str, str] = field(default_factory=lambda: NO_XATTRS)


@dataclass(frozen=True)
class Policy:
    """What one use of the parser accepts (see the module docstring for the three uses)."""

    types: Mapping[bytes, str]  # typeflag -> member type; '0', '\0' and '7' named with a trailing '/' are dirs
    skipped: frozenset[bytes]  # typeflags of entries left out (other typeflags outside ``types`` are refused)
    extensions: frozenset[bytes]  # typeflags of extended headers applied to the entry after them ('g': to all)
    refused_records: frozenset[bytes]  # PAX keys refused wherever they appear
    max_extended: int  # bytes of extended headers of one entry (and, together, of the global ones)
    max_entries: int  # entries in the whole archive (extended headers not counted)
    absolute: bool  # a leading '/' is taken as relative to the root; else the entry is refused
    whiteouts: Literal["member", "refuse", "literal"]  # OCI whiteouts: members, refused, or ordinary names
    end_blocks: int  # zero blocks that end the archive (2, 1, or 0: the stream may also end after a member's content)
    refused_type_note: str  # said after a refused type
    hint_unsafe: str
    hint_corrupt: str


LAYER: Final = Policy(
    types={b"0": "file", b"\0": "file", b"7": "file", b"5": "dir", b"D": "dir", b"2": "symlink", b"1": "hardlink"},
    skipped=frozenset({b"V"}),
    extensions=frozenset({b"x", b"g", b"L", b"K", b"X"}),
    refused_records=frozenset(),
    max_extended=1 << 20,
    max_entries=MAX_ENTRIES,
    absolute=True,
    whiteouts="member",
    end_blocks=0,
    refused_type_note=" (not supported)",
    hint_unsafe=_HINT_UNSAFE,
    hint_corrupt=_HINT_CUT,
)
TARBALL: Final = replace(LAYER, whiteouts="refuse")
TARBALL_SKIPPING_DEVICES: Final = replace(TARBALL, skipped=TARBALL.skipped | {b"3", b"4", b"6"})
LAYOUT: Final = Policy(
    types={b"0": "file", b"\0": "file", b"7": "file", b"5": "dir"},
    skipped=frozenset(),
    extensions=frozenset({b"x", b"L"}),
    refused_records=frozenset({b"linkpath"}),
    max_extended=64 << 10,
    max_entries=MAX_ENTRIES,
    absolute=False,
    whiteouts="literal",
    end_blocks=2,
    refused_type_note=": an OCI layout holds only files and directories",
    hint_unsafe="the archive is damaged or was not written by ocibuild, skopeo or podman; export it again",
    hint_corrupt="export it again on the connected machine (`ocibuild export PATH`)",
)


def quoted(text: str) -> str:
    """A path for an error message: quoted, on one line, not absurdly long."""
    shown = repr(text)
    return shown if len(shown) <= 200 else shown[:197] + "..."


def _normalise(path: str, what: str, hint: str) -> str | None:
    if "\0" in path:
        raise UnsafeArchive(f"{what}: entry {quoted(path)} contains a NUL byte", hint=hint)
    parts = []
    for part in path.split("/"):
        if part == "..":
            raise UnsafeArchive(f"{what}: entry {quoted(path)} has a '..' component", hint=hint)
        if part and part != ".":
            parts.append(part)
    return "/".join(parts) or None


def normalise_path(path: str, *, what: str = "archive") -> str | None:
    """``path`` relative to the root: leading '/' and './' stripped, '//' and '.' collapsed; None for the root.

    Raises :class:`UnsafeArchive` (naming ``what``) for a '..' component or a NUL byte.
    """
    return _normalise(path, what, _HINT_UNSAFE)


# ---------------------------------------------------------------------------------------------------------------
# The stream


class _Input:
    """Buffered reading of the (decompressed) tar stream, tracking the offset.

    A seekable input skips content with seek(); the read after a seek is small (the next header is what is
    wanted), and reads grow again while the stream is read in order (many small members).
    """

    def __init__(self, raw: Any, what: str, hint_corrupt: str, *, seekable: bool = False) -> None:
        self.raw = raw  # has readinto(); seek() too when seekable
        self.what = what
        self.hint_corrupt = hint_corrupt
        self.seekable = seekable
        self.store = memoryview(bytearray(_READ))
        self.buf = self.store[:0]
        self.pos = 0
        self.fill = _AFTER_SEEK if seekable else _READ

    def _fill(self) -> bool:
        n = int(self.raw.readinto(self.store[: self.fill]))
        self.buf = self.store[:n]
        self.fill = min(2 * self.fill, _READ)
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
            self.fill = _AFTER_SEEK
            return
        while n:
            if not self._fill():
                raise UnsafeArchive(f"{self.what} is truncated or corrupt (ends inside an entry)",
                                    hint=self.hint_corrupt)  # fmt: skip
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
    xattrs: Mapping[str, str]
    offset: int  # of the header
    data_offset: int
    data_size: int  # bytes of data that follow the header in the stream


class _Data(io.RawIOBase):
    """The content of one member; valid until the iteration moves on."""

    def __init__(self, inp: _Input, size: int, name: str) -> None:
        super().__init__()
        self.inp = inp
        self.remaining = size
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
            raise UnsafeArchive(f"{self.inp.what} is truncated or corrupt (ends inside {quoted(self.name)})",
                                hint=self.inp.hint_corrupt)  # fmt: skip
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


# ---------------------------------------------------------------------------------------------------------------
# Headers


def _cstr(field: bytes) -> bytes:
    return field.split(b"\0", 1)[0]


class _Parser:
    """Reads the headers of a stream, applying PAX and GNU extensions to the entries they precede.

    Iterating yields each entry's header and a reader of its content; it ends only at an end-of-archive block.
    """

    def __init__(self, inp: _Input, what: str, policy: Policy) -> None:
        self.inp = inp
        self.what = what
        self.policy = policy
        self.global_pax: dict[bytes, bytes] = {}
        self.pax: dict[bytes, bytes] = {}  # of the next entry; an empty value unsets a global one
        self.long_name: bytes | None = None
        self.long_link: bytes | None = None
        self.extended = 0  # bytes of extended headers for the next entry
        self.global_extended = 0  # and of all global ones
        self.entries = 0

    def __iter__(self) -> Iterator[tuple[_Raw, _Data]]:
        inp = self.inp
        while (raw := self._next_entry()) is not None:
            reader = _Data(inp, raw.data_size, raw.name)
            yield raw, reader
            reader.valid = False
            padding = -raw.data_size % _BLOCK
            if self.policy.end_blocks:
                inp.skip(reader.remaining + padding)
            else:
                inp.skip(reader.remaining)
                if len(inp.read(padding)) < padding:  # the stream ends after the content, without its padding
                    return

    def _corrupt(self, problem: str) -> UnsafeArchive:
        return UnsafeArchive(f"{self.what} is truncated or corrupt ({problem})", hint=self.policy.hint_corrupt)

    def _unsafe(self, problem: str) -> UnsafeArchive:
        return UnsafeArchive(f"{self.what}: {problem}", hint=self.policy.hint_unsafe)

    def _next_entry(self) -> _Raw | None:
        """The next entry's header with its extensions applied; None at the end of the archive."""
        while True:
            offset = self.inp.pos
            block = self.inp.read(_BLOCK)
            if len(block) < _BLOCK:
                if not block and offset and not self.policy.end_blocks:  # right after a member: the end
                    self._end()
                    return None
                raise self._corrupt("it is empty" if offset == 0 and not block else "no end-of-archive block")
            if block == _ZERO_BLOCK:
                self._end()
                return None
            stored = self._octal(block[148:156], offset)
            unsigned = sum(block[:148]) + 256 + sum(block[156:])
            if stored != unsigned and stored != unsigned - 256 * sum(b > 127 for b in block[:148] + block[156:]):
                raise self._corrupt(f"bad tar header checksum at offset {offset}")
            typeflag = block[156:157]
            size = self._octal(block[124:136], offset)
            if typeflag not in self.policy.extensions:
                self.entries += 1
                if self.entries > self.policy.max_entries:
                    raise UnsafeArchive(f"{self.what}: more than {self.policy.max_entries:,} entries",
                                        hint=MAX_ENTRIES_HINT)
                return self._entry(block, typeflag, size, offset)
            self._extension(typeflag, size, offset)

    def _end(self) -> None:
        if self.pax or self.long_name is not None or self.long_link is not None:
            raise self._corrupt("extended header without entry")
        if self.policy.end_blocks > 1 and self.inp.read(_BLOCK) != _ZERO_BLOCK:  # a writer's second zero block
            raise self._corrupt("the end-of-archive marker is cut")

    def _octal(self, field: bytes, offset: int) -> int:
        if field[:1] and field[0] & 0x80:
            if field[0] != 0x80:
                raise self._unsafe(f"negative number in the tar header at offset {offset}")
            return int.from_bytes(field[1:], "big")
        digits = field.split(b"\0", 1)[0].strip(b" ")
        if digits.strip(b"01234567"):
            raise self._corrupt(f"bad tar header at offset {offset}")
        return int(digits, 8) if digits else 0

    def _decimal(self, value: bytes, key: bytes, offset: int) -> int:
        text = value.split(b".", 1)[0] if key == b"mtime" else value
        negative = key == b"mtime" and text.startswith(b"-")
        digits = text[1:] if negative else text
        if not digits.isdigit():
            raise self._unsafe(f"bad PAX value for '{key.decode()}' at offset {offset}")
        return 0 if negative else int(digits)

    def _records(self, data: bytes, offset: int) -> dict[bytes, bytes]:
        """The records of a PAX header."""
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
                raise self._unsafe(f"malformed PAX header at offset {offset}")
            key, _, value = record[space - pos + 1 : -1].partition(b"=")
            if key in self.policy.refused_records:
                raise self._unsafe(f"PAX record '{key.decode(errors='replace')}' at offset {offset} is not allowed")
            records[key] = value
            pos += length
        return records

    def _extension(self, typeflag: bytes, size: int, offset: int) -> None:
        """Read an extended header ('x', 'X', 'g', 'L' or 'K') into the state for the entries after it."""
        if typeflag == b"g":
            self.global_extended += size
        else:
            self.extended += size
        limit = self.policy.max_extended
        if max(size, self.extended, self.global_extended) > limit:
            raise self._unsafe(f"extended header at offset {offset} is {size} bytes (the limit is {limit} for all "
                               "those of an entry)")  # fmt: skip
        data = self.inp.read(size)
        if len(data) < size:
            raise self._corrupt("ends inside a header")
        self.inp.skip(-size % _BLOCK)
        if typeflag in (b"x", b"X"):
            self.pax.update(self._records(data, offset))
        elif typeflag == b"g":
            for key, value in self._records(data, offset).items():
                if key in (b"path", b"linkpath", b"size"):
                    continue
                if value:
                    self.global_pax[key] = value
                else:
                    self.global_pax.pop(key, None)
        elif typeflag == b"L":
            self.long_name = _cstr(data)
        else:
            self.long_link = _cstr(data)

    def _entry(self, block: bytes, typeflag: bytes, size: int, offset: int) -> _Raw:
        """The entry of ``block``, with the pending extended headers applied (and then forgotten)."""
        name = _cstr(block[0:100])
        if block[257:263] == b"ustar\x00":
            prefix = _cstr(block[345:500])
            if prefix:
                name = prefix + b"/" + name
        if self.long_name is not None:
            name = self.long_name
        link = self.long_link if self.long_link is not None else _cstr(block[157:257])
        values = dict(self.global_pax)
        for key, value in self.pax.items():
            if value:
                values[key] = value
            else:  # an empty record unsets a global one
                values.pop(key, None)
        name = values.get(b"path", name)
        link = values.get(b"linkpath", link)
        uid = self._octal(block[108:116], offset)
        gid = self._octal(block[116:124], offset)
        mtime = self._octal(block[136:148], offset)
        if b"size" in values:
            size = self._decimal(values[b"size"], b"size", offset)
        if b"uid" in values:
            uid = self._decimal(values[b"uid"], b"uid", offset)
        if b"gid" in values:
            gid = self._decimal(values[b"gid"], b"gid", offset)
        if b"mtime" in values:
            mtime = self._decimal(values[b"mtime"], b"mtime", offset)
        xattrs: dict[str, str] = {}
        for key, value in values.items():
            if key.startswith(b"SCHILY.xattr."):
                xattrs[key[13:].decode("utf-8", _ENC)] = value.decode("utf-8", _ENC)
            elif key.startswith(b"GNU.sparse."):
                typeflag = b"S"
        self.pax, self.long_name, self.long_link, self.extended = {}, None, None, 0
        data_size = 0 if typeflag in _HEADER_ONLY else size
        return _Raw(
            name.decode("utf-8", _ENC), typeflag, self._octal(block[100:108], offset) & 0o7777, uid, gid,
            size, link.decode("utf-8", _ENC), mtime, xattrs or NO_XATTRS, offset, self.inp.pos, data_size,
        )  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# Members


class PathTree(Generic[V]):
    """Normalised paths with a value each, by component: the ancestors of a path are found in time linear in its
    length (slicing out each prefix of a deep path would cost its length squared: a 1 MiB path of 500,000
    components, hours)."""

    def __init__(self) -> None:
        self._root: dict[str, Any] = {}  # component -> subtree; the key "" (never a component) holds the value
        self._size = 0

    def __bool__(self) -> bool:
        return self._size > 0

    def set(self, path: str, value: V) -> None:
        node = self._root
        for part in path.split("/"):
            node = node.setdefault(part, {})
        if "" not in node:
            self._size += 1
        node[""] = value

    def discard(self, path: str) -> None:
        node: dict[str, Any] | None = self._root
        for part in path.split("/"):
            node = node.get(part) if node is not None else None
        if node is not None and node.pop("", _ABSENT) is not _ABSENT:
            self._size -= 1

    def ancestor(self, path: str, accept: Callable[[V], bool] = lambda value: True) -> str | None:
        """The first (outermost) proper ancestor of ``path`` in the tree whose value ``accept``s."""
        if not self._size:
            return None
        node: dict[str, Any] | None = self._root
        parts = path.split("/")
        for depth, part in enumerate(parts[:-1]):
            node = node.get(part) if node is not None else None
            if node is None:
                return None
            if "" in node and accept(node[""]):
                return "/".join(parts[: depth + 1])
        return None


_ABSENT: Final = object()


class _TreeChecker:
    """Turns raw headers into Members as the policy says, refusing what could escape the root: '..', links
    through symlinks of the same archive, hardlinks to anything but a regular file read before."""

    def __init__(self, what: str, policy: Policy) -> None:
        self.what = what
        self.policy = policy
        self.files: set[str] = set()
        self.symlinks: PathTree[bool] = PathTree()

    def _refuse(self, raw: _Raw, problem: str) -> UnsafeArchive:
        return UnsafeArchive(f"{self.what}: entry {quoted(raw.name)} {problem}", hint=self.policy.hint_unsafe)

    def _symlink_above(self, path: str) -> str | None:
        """The first ancestor of ``path`` that is a symlink of this archive, if any."""
        return self.symlinks.ancestor(path)

    def member(self, raw: _Raw) -> Member | None:
        """The member of ``raw``; None for what is left out (the root, a skipped type, aufs metadata)."""
        kind = self._kind(raw)
        if kind is None:
            return None
        if not self.policy.absolute and raw.name.startswith("/"):
            raise self._refuse(raw, "is an absolute path")
        path = _normalise(raw.name, self.what, self.policy.hint_unsafe)
        if path is None:
            if kind == "dir":
                return None  # the root itself
            raise self._refuse(raw, f"would replace the root with a {kind}")
        link = self._symlink_above(path)
        if link is not None:
            raise self._refuse(raw, f"is beneath symlink {quoted(link)} of the same archive")
        parent, _, base = path.rpartition("/")
        if base.startswith(WHITEOUT_PREFIX) and self.policy.whiteouts != "literal":
            return self._whiteout(raw, path, parent, base)
        linkname = self._linkname(raw, kind)
        if kind in ("file", "hardlink"):
            self.files.add(path)
            self.symlinks.discard(path)
        elif kind == "symlink":
            self.symlinks.set(path, True)
            self.files.discard(path)
        else:
            self.files.discard(path)
            self.symlinks.discard(path)
        size = raw.size if kind == "file" else 0
        return Member(path, kind, raw.mode, raw.uid, raw.gid, size, linkname, raw.mtime, raw.xattrs)

    def _kind(self, raw: _Raw) -> str | None:
        flag = raw.typeflag
        kind = self.policy.types.get(flag)
        if kind == "file" and raw.name.endswith("/"):
            return "dir"
        if kind is not None:
            return kind
        described = _DESCRIBED.get(flag)
        if flag in self.policy.skipped:
            log.debug("%s: skipping %r, %s", self.what, raw.name, described)
            return None
        if described is None:
            raise self._refuse(raw, f"has unsupported type {flag!r}")
        raise self._refuse(raw, f"is {described}{self.policy.refused_type_note}")

    def _whiteout(self, raw: _Raw, path: str, parent: str, base: str) -> Member | None:
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
        if self.policy.whiteouts == "refuse":
            raise self._refuse(raw, "is an OCI whiteout, which an archive may not contain")
        return Member(path, kind, raw.mode, raw.uid, raw.gid, 0, linkname, raw.mtime)

    def _linkname(self, raw: _Raw, kind: str) -> str:
        """A hardlink's normalised target (a regular file read before), a symlink's target as it is, else ''."""
        linkname = raw.linkname
        if kind == "hardlink":
            target_path = _normalise(linkname, self.what, self.policy.hint_unsafe)
            if target_path is None or target_path not in self.files or self._symlink_above(target_path):
                raise self._refuse(
                    raw, f"is a hardlink to {quoted(linkname)}, not to a regular file earlier in the archive"
                )
            return target_path
        if kind == "symlink":
            if not linkname or "\0" in linkname:
                raise self._refuse(raw, "is a symlink with an empty or invalid target")
            return linkname
        return ""


def iter_members(
    fileobj: BinaryIO, compression: str, *, what: str, max_size: int | None = None
) -> Iterator[tuple[Member, BinaryIO | None]]:
    """The members of a layer (:data:`LAYER`), in stream order, each with a reader of its content ("file" members
    only).

    A reader is valid until the next member is taken. Unsafe or corrupt input raises :class:`UnsafeArchive`
    naming ``what`` and the entry. The rest of the stream is read after the end-of-archive block.
    """
    reader = codecs.open_decompressed(fileobj, compression, what=what, max_size=max_size)
    try:
        inp = _Input(reader, what, LAYER.hint_corrupt)
        checker = _TreeChecker(what, LAYER)
        for raw, data in _Parser(inp, what, LAYER):
            member = checker.member(raw)
            if member is not None:
                yield member, cast(BinaryIO, data) if member.type == "file" else None
        inp.drain()
    finally:
        reader.close()


def iter_file_members(f: BinaryIO, *, what: str, policy: Policy) -> Iterator[tuple[Member, int]]:
    """The members of the uncompressed tar file ``f`` (from its start), each with the offset of its content.

    Only headers are read: content is skipped with ``seek``. A member whose content would end beyond the end of
    the file makes the archive truncated.
    """
    length = os.fstat(f.fileno()).st_size
    f.seek(0)
    inp = _Input(f, what, policy.hint_corrupt, seekable=True)
    checker = _TreeChecker(what, policy)
    for raw, _data in _Parser(inp, what, policy):
        member = checker.member(raw)
        if member is None:
            continue
        if raw.data_offset + raw.data_size > length:
            raise UnsafeArchive(f"{what} is truncated or corrupt (ends inside {quoted(raw.name)})",
                                hint=policy.hint_corrupt)  # fmt: skip
        yield member, raw.data_offset


def list_layer(fileobj: BinaryIO, compression: str, *, what: str, max_size: int | None = None) -> dict[str, str]:
    """path -> fingerprint of every member, to find independent layers that disagree about a path.

    Fingerprints: "file:<mode, 4 octal digits>:<sha256 hex>", "dir:<mode>", "symlink:<target>",
    "hardlink:<target>", "whiteout", "opaque"; a file or directory with extended attributes has
    :func:`xattrs_fingerprint` appended. A later member of the same path wins.
    """
    return scan_layer(fileobj, compression, what=what, max_size=max_size)[0]


def scan_layer(fileobj: BinaryIO, compression: str, *, what: str, keep: Collection[str] = (),
               max_size: int | None = None) -> tuple[dict[str, str], dict[str, bytes]]:
    """:func:`list_layer`'s listing, and the content of the files at the paths of ``keep`` (few and small: they
    are held in memory), in one read of the layer."""
    result: dict[str, str] = {}
    kept: dict[str, bytes] = {}
    shared: dict[str, str] = {}  # one string for the fingerprints many paths have (directories, empty files)
    buf = bytearray(_READ)
    view = memoryview(buf)
    for member, data in iter_members(fileobj, compression, what=what, max_size=max_size):
        kept.pop(member.path, None)
        if member.type == "file":
            sha = hashlib.sha256()
            assert data is not None
            parts: list[bytes] | None = [] if member.path in keep else None
            while n := cast(io.RawIOBase, data).readinto(view):
                sha.update(view[:n])
                if parts is not None:
                    parts.append(bytes(view[:n]))
            if parts is not None:
                kept[member.path] = b"".join(parts)
            fingerprint = f"file:{member.mode:04o}:{sha.hexdigest()}{xattrs_fingerprint(member.xattrs)}"
            result[member.path] = fingerprint if member.size else shared.setdefault(fingerprint, fingerprint)
        elif member.type == "dir":
            fingerprint = f"dir:{member.mode:04o}{xattrs_fingerprint(member.xattrs)}"
            result[member.path] = shared.setdefault(fingerprint, fingerprint)
        elif member.type in ("symlink", "hardlink"):
            result[member.path] = f"{member.type}:{member.linkname}"
        else:
            result[member.path] = member.type
    return result, kept


def xattrs_fingerprint(xattrs: Mapping[str, str]) -> str:
    """What the extended attributes of a file or directory add to its listing fingerprint: nothing when it has
    none, else ":xattrs:" and the sha256 (hex) of their names and values, sorted (so two layers that differ only
    in a file's capability disagree about it)."""
    if not xattrs:
        return ""
    return ":xattrs:" + hashlib.sha256(json.dumps(sorted(xattrs.items())).encode()).hexdigest()
