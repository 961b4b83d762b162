"""The OCI model: digests, descriptors, manifests, indexes, image configs and references.

Pure data, no I/O. Every JSON document is serialised exactly once, canonically (sorted keys, no spaces), by
``to_json``; the bytes we hash are the bytes we store and push. ``parse``/``from_dict`` build objects from text
and raise :class:`FormatError` on anything malformed. Every JSON document ocibuild reads, OCI or not, is parsed
by :func:`parse_json`, with a depth and a size bound; it lives here, past STYLE.md's ~500 lines, because every
module that reads JSON already imports this one, which does no I/O.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from .errors import FormatError

# Media types (OCI image spec v1.1, plus the Docker v2 types other tools still write).
OCI_LAYOUT_VERSION = "1.0.0"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_EMPTY = "application/vnd.oci.empty.v1+json"
LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_LAYER_TAR = "application/vnd.docker.image.rootfs.diff.tar"

MANIFEST_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})
CONFIG_TYPES = frozenset({OCI_CONFIG, DOCKER_CONFIG})
LAYER_TYPES = frozenset({LAYER_TAR, LAYER_GZIP, LAYER_ZSTD, DOCKER_LAYER_GZIP, DOCKER_LAYER_TAR})

ANNOTATION_REF_NAME = "org.opencontainers.image.ref.name"
ANNOTATION_CREATED = "org.opencontainers.image.created"

_HEX64 = re.compile(r"[0-9a-f]{64}")
_DIGEST = re.compile(r"([a-z0-9]+(?:[.+_-][a-z0-9]+)*):([a-zA-Z0-9=_-]+)")


_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)  # immutable; one for all


def canonical_json(value: Any) -> bytes:
    """The one serialisation of every JSON document ocibuild hashes: sorted keys, no insignificant spaces.

    (The same bytes as ``json.dumps`` with those options, without building an encoder per call: a copy tree
    hashes one small document per file.)"""
    return _CANONICAL.encode(value).encode()


def _refuse_ambiguous(value: Mapping[str, Any], what: str, kind: str, foreign: tuple[str, ...]) -> None:
    """A document that carries the fields of both a manifest and an index could be read as either (the confusion
    behind CVE-2021-41190): refused, as containerd does since that advisory."""
    present = [key for key in foreign if key in value]
    if present:
        fields = " and ".join(f"'{key}'" for key in present)
        raise FormatError(f"{what}: an {kind} that also carries {fields} is ambiguous (manifest or index?); refused",
                          "the document was made by a broken or hostile tool: ask its publisher to fix it "
                          "(see CVE-2021-41190)")


# Every JSON document ocibuild reads (registries' answers, oci: layouts, archives, auth files, inventories, its own
# records) goes through parse_json, with these bounds. An OCI index nests 5 deep, an auth file 3: 100 is far above
# any real document and far below Python's recursion limit (1000), which json.loads would hit as a RecursionError,
# and which anything walking the value (canonical_json) must not meet either. The size bound caps what parsing may
# cost (the objects json.loads builds take ~10 times the text): 64 MiB is an index of ~250,000 tags.
JSON_DEPTH = 100
JSON_MAX = 64 << 20
_NOT_REAL = "no tool writes such a document: check where it came from (a damaged copy, or a hostile source)"
_NOT_STRUCTURE = bytes(range(256)).translate(None, b'[]{}"')  # translate() deletes these: all but brackets, quotes
_STEP = tuple(1 if byte in b"[{" else -1 if byte in b"]}" else 0 for byte in range(256))  # per byte: depth change


def parse_json(data: bytes | str, what: str, *, limit: int = JSON_MAX, hint: str | None = None) -> Any:
    """The value of the JSON document ``data`` (``what`` names it in errors). FormatError when it is longer than
    ``limit`` bytes, nested deeper than :data:`JSON_DEPTH`, or not JSON.

    The depth is measured before json.loads, which recurses once per level: a scan of the brackets outside
    strings, in C-speed passes over the bytes (catching RecursionError instead would accept a document nested
    just below the limit, which the next recursive walk of the value, at a deeper stack, fails on)."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    if len(raw) > limit:
        raise FormatError(f"{what} is {len(raw)} bytes, more than the {limit} a JSON document may have here",
                          hint or _NOT_REAL)
    if _too_deep(raw):
        raise FormatError(f"{what} is nested more than {JSON_DEPTH} levels deep; refused", hint or _NOT_REAL)
    try:
        return json.loads(data)
    except json.JSONDecodeError as err:
        raise FormatError(f"{what} is not valid JSON: {err.msg} (line {err.lineno}, column {err.colno})", hint) \
            from None
    except UnicodeDecodeError as err:
        raise FormatError(f"{what} is not valid JSON: not UTF-8 ({err.reason} at byte {err.start})", hint) from None


def _too_deep(data: bytes) -> bool:
    """Whether the arrays and objects of ``data`` nest deeper than :data:`JSON_DEPTH`: exact for a JSON text, and
    for an invalid one up to where json.loads stops reading it. Escaped backslashes and quotes go first (a run of
    backslashes pairs from its left, as a JSON reader reads it), then everything but brackets and quotes; two
    adjacent quotes go too (an empty string, or two strings with nothing between them), then the contents of the
    strings that remain. The depth is the highest running sum of +1 per opening and -1 per closing bracket."""
    if data.count(b"[") + data.count(b"{") <= JSON_DEPTH:
        return False  # the common case, at once: too few brackets to nest that deep
    marks = data.replace(b"\\\\", b"").replace(b'\\"', b"").translate(None, _NOT_STRUCTURE).replace(b'""', b"")
    if b'"' in marks:
        marks = b"".join(marks.split(b'"')[::2])
    return max(itertools.accumulate(map(_STEP.__getitem__, marks)), default=0) > JSON_DEPTH


def _load_json(data: bytes, what: str) -> dict[str, Any]:
    value = parse_json(data, what)
    if not isinstance(value, dict):
        raise FormatError(f"{what} is not a JSON object")
    return value


@dataclass(frozen=True, order=True)
class Digest:
    """A content address, ``algorithm:hex``. Only sha256 is produced; sha512 is accepted when reading."""

    algorithm: str
    hex: str

    @classmethod
    def parse(cls, text: str) -> Digest:
        match = _DIGEST.fullmatch(text) if isinstance(text, str) else None
        if match is None:
            raise FormatError(f"'{text}' is not a digest (expected sha256:<64 hex digits>)")
        algorithm, hexpart = match.groups()
        expected = {"sha256": 64, "sha512": 128}.get(algorithm)
        if expected is None or len(hexpart) != expected or not re.fullmatch(r"[0-9a-f]+", hexpart):
            raise FormatError(f"'{text}' is not a digest (expected sha256:<64 lowercase hex digits>)")
        return cls(algorithm, hexpart)

    @classmethod
    def from_hex(cls, hexpart: str) -> Digest:
        return cls.parse(f"sha256:{hexpart}")

    @classmethod
    def of(cls, data: bytes) -> Digest:
        return cls("sha256", hashlib.sha256(data).hexdigest())

    @property
    def short(self) -> str:
        return f"{self.algorithm}:{self.hex[:12]}"

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"


@dataclass(frozen=True)
class Platform:
    os: str = "linux"
    architecture: str = "amd64"
    variant: str | None = None

    def to_dict(self) -> dict[str, str]:
        out = {"os": self.os, "architecture": self.architecture}
        if self.variant:
            out["variant"] = self.variant
        return out

    @classmethod
    def from_dict(cls, value: Any) -> Platform:
        if not isinstance(value, dict) or not isinstance(value.get("os"), str):
            raise FormatError("platform must be an object with 'os' and 'architecture'")
        arch = value.get("architecture")
        if not isinstance(arch, str):
            raise FormatError("platform must be an object with 'os' and 'architecture'")
        variant = value.get("variant")
        return cls(value["os"], arch, variant if isinstance(variant, str) else None)

    @classmethod
    def parse(cls, text: str) -> Platform:
        """``os/architecture[/variant]``, as :meth:`__str__` writes it."""
        parts = text.split("/")
        if not 2 <= len(parts) <= 3 or not all(parts):
            raise FormatError(f"platform {text!r} is not os/architecture[/variant]")
        return cls(parts[0], parts[1], parts[2] if len(parts) == 3 else None)

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


def _annotations(value: Any, what: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise FormatError(f"{what}: annotations must map strings to strings")
    return dict(value)


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: Digest
    size: int
    annotations: Mapping[str, str] = field(default_factory=dict)
    platform: Platform | None = None
    artifact_type: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mediaType": self.media_type, "digest": str(self.digest), "size": self.size}
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        if self.platform is not None:
            out["platform"] = self.platform.to_dict()
        if self.artifact_type:
            out["artifactType"] = self.artifact_type
        return out

    @classmethod
    def from_dict(cls, value: Any, what: str = "descriptor") -> Descriptor:
        if not isinstance(value, dict):
            raise FormatError(f"{what} is not a JSON object")
        media_type, digest, size = value.get("mediaType"), value.get("digest"), value.get("size")
        if not isinstance(media_type, str) or not media_type:
            raise FormatError(f"{what} has no mediaType")
        if not isinstance(digest, str):
            raise FormatError(f"{what} has no digest")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise FormatError(f"{what} has no valid size")
        try:
            parsed = Digest.parse(digest)
            platform = Platform.from_dict(value["platform"]) if "platform" in value else None
        except FormatError as err:
            raise FormatError(f"{what}: {err}") from None
        artifact_type = value.get("artifactType")
        return cls(
            media_type,
            parsed,
            size,
            _annotations(value.get("annotations"), what),
            platform,
            artifact_type if isinstance(artifact_type, str) else None,
        )

    @property
    def ref_name(self) -> str | None:
        return self.annotations.get(ANNOTATION_REF_NAME)

    def with_annotations(self, annotations: Mapping[str, str]) -> Descriptor:
        return Descriptor(self.media_type, self.digest, self.size, dict(annotations), self.platform, self.artifact_type)


@dataclass(frozen=True)
class LayerBlob:
    """A layer as an image config and manifest list it: its blob's descriptor and its diff_id (the digest of the
    uncompressed tar). What a builder returns and a cache entry records (one recipe layer may make several)."""

    descriptor: Descriptor
    diff_id: Digest


@dataclass(frozen=True)
class Manifest:
    """An image manifest (OCI, or Docker v2 schema 2 when read from elsewhere)."""

    config: Descriptor
    layers: tuple[Descriptor, ...]
    annotations: Mapping[str, str] = field(default_factory=dict)
    artifact_type: str | None = None
    media_type: str = OCI_MANIFEST

    def to_json(self) -> bytes:
        out: dict[str, Any] = {
            "schemaVersion": 2,
            "mediaType": self.media_type,
            "config": self.config.to_dict(),
            "layers": [layer.to_dict() for layer in self.layers],
        }
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        if self.artifact_type:
            out["artifactType"] = self.artifact_type
        return canonical_json(out)

    @classmethod
    def parse(cls, data: bytes, what: str = "manifest") -> Manifest:
        value = _load_json(data, what)
        if value.get("schemaVersion") != 2:
            raise FormatError(f"{what}: schemaVersion must be 2")
        media_type = value.get("mediaType", OCI_MANIFEST)
        if media_type not in MANIFEST_TYPES:
            raise FormatError(f"{what}: mediaType '{media_type}' is not an image manifest")
        _refuse_ambiguous(value, what, "image manifest", ("manifests",))
        layers = value.get("layers")
        if not isinstance(layers, list):
            raise FormatError(f"{what}: 'layers' must be a list")
        artifact_type = value.get("artifactType")
        return cls(
            Descriptor.from_dict(value.get("config"), f"{what}: config"),
            tuple(Descriptor.from_dict(item, f"{what}: layer {i}") for i, item in enumerate(layers)),
            _annotations(value.get("annotations"), what),
            artifact_type if isinstance(artifact_type, str) else None,
            media_type,
        )


@dataclass(frozen=True)
class Index:
    """An image index; the top of an OCI layout (``index.json``) is one too."""

    manifests: tuple[Descriptor, ...]
    annotations: Mapping[str, str] = field(default_factory=dict)
    media_type: str = OCI_INDEX

    def to_json(self) -> bytes:
        out: dict[str, Any] = {
            "schemaVersion": 2,
            "mediaType": self.media_type,
            "manifests": [m.to_dict() for m in self.manifests],
        }
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        return canonical_json(out)

    @classmethod
    def parse(cls, data: bytes, what: str = "index") -> Index:
        value = _load_json(data, what)
        if value.get("schemaVersion") != 2:
            raise FormatError(f"{what}: schemaVersion must be 2")
        media_type = value.get("mediaType", OCI_INDEX)
        if media_type not in INDEX_TYPES:
            raise FormatError(f"{what}: mediaType '{media_type}' is not an image index")
        _refuse_ambiguous(value, what, "image index", ("layers", "config"))
        manifests = value.get("manifests")
        if not isinstance(manifests, list):
            raise FormatError(f"{what}: 'manifests' must be a list")
        return cls(
            tuple(Descriptor.from_dict(m, f"{what}: manifest {i}") for i, m in enumerate(manifests)),
            _annotations(value.get("annotations"), what),
            media_type,
        )

    def find(self, ref_name: str) -> Descriptor | None:
        """The last descriptor tagged ``ref_name`` (later entries win, as in skopeo), or None."""
        found = None
        for descriptor in self.manifests:
            if descriptor.ref_name == ref_name:
                found = descriptor
        return found

    def for_platform(self, platform: Platform) -> Descriptor | None:
        """The first image manifest for ``platform`` (os and architecture equal; the variant too when it names
        one), or None."""
        return next((d for d in self.manifests if d.media_type in MANIFEST_TYPES and d.platform is not None and
                     d.platform.os == platform.os and d.platform.architecture == platform.architecture and
                     (platform.variant is None or d.platform.variant == platform.variant)), None)

    def platforms(self) -> list[str]:
        """The platforms the index offers, sorted (for messages)."""
        return sorted(str(d.platform) for d in self.manifests if d.platform is not None)

    def with_tag(self, ref_name: str, descriptor: Descriptor) -> Index:
        """This index with ``ref_name`` pointing at ``descriptor`` (any older entry of that name dropped)."""
        return self.with_tags({ref_name: descriptor})

    def with_tags(self, tags: Mapping[str, Descriptor]) -> Index:
        """This index with each name of ``tags`` pointing at its descriptor, appended in order (older entries of
        those names dropped): what :meth:`with_tag` for each would give, in one pass."""
        tagged = tuple(d.with_annotations({**d.annotations, ANNOTATION_REF_NAME: name}) for name, d in tags.items())
        kept = tuple(d for d in self.manifests if d.ref_name not in tags)
        return Index(kept + tagged, self.annotations, self.media_type)

    def tags(self) -> dict[str, Descriptor]:
        """Each ref name with the descriptor it names (the last entry of a name, as :meth:`find` gives)."""
        return {name: d for d in self.manifests if (name := d.ref_name) is not None}

    def without_tag(self, ref_name: str) -> Index:
        return Index(tuple(d for d in self.manifests if d.ref_name != ref_name), self.annotations, self.media_type)


@dataclass(frozen=True)
class History:
    created_by: str
    created: str | None = None
    comment: str | None = None
    empty_layer: bool = False

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"created_by": self.created_by}
        if self.created:
            out["created"] = self.created
        if self.comment:
            out["comment"] = self.comment
        if self.empty_layer:
            out["empty_layer"] = True
        return out


@dataclass(frozen=True)
class ImageConfig:
    """The parts of an image configuration ocibuild writes and reads."""

    diff_ids: tuple[Digest, ...]
    architecture: str = "amd64"
    os: str = "linux"
    variant: str | None = None
    env: tuple[str, ...] = ()
    workdir: str | None = None
    cmd: tuple[str, ...] | None = None
    entrypoint: tuple[str, ...] | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    history: tuple[History, ...] = ()
    created: str | None = None

    def to_json(self) -> bytes:
        config: dict[str, Any] = {}
        if self.env:
            config["Env"] = list(self.env)
        if self.workdir:
            config["WorkingDir"] = self.workdir
        if self.cmd is not None:
            config["Cmd"] = list(self.cmd)
        if self.entrypoint is not None:
            config["Entrypoint"] = list(self.entrypoint)
        if self.labels:
            config["Labels"] = dict(self.labels)
        out: dict[str, Any] = {
            "architecture": self.architecture,
            "os": self.os,
            "config": config,
            "rootfs": {"type": "layers", "diff_ids": [str(d) for d in self.diff_ids]},
        }
        if self.variant:
            out["variant"] = self.variant
        if self.history:
            out["history"] = [h.to_dict() for h in self.history]
        if self.created:
            out["created"] = self.created
        return canonical_json(out)

    @classmethod
    def parse(cls, data: bytes, what: str = "image config") -> ImageConfig:
        value = _load_json(data, what)
        rootfs = value.get("rootfs")
        if not isinstance(rootfs, dict) or not isinstance(rootfs.get("diff_ids"), list):
            raise FormatError(f"{what}: rootfs.diff_ids is missing")
        config = value.get("config") or {}
        if not isinstance(config, dict):
            raise FormatError(f"{what}: 'config' must be an object")

        def strings(key: str) -> tuple[str, ...] | None:
            item = config.get(key)
            if item is None:
                return None
            if not isinstance(item, list) or not all(isinstance(s, str) for s in item):
                raise FormatError(f"{what}: config.{key} must be a list of strings")
            return tuple(item)

        history = []
        for entry in value.get("history") or []:
            if isinstance(entry, dict):
                history.append(
                    History(
                        str(entry.get("created_by", "")),
                        entry.get("created") if isinstance(entry.get("created"), str) else None,
                        entry.get("comment") if isinstance(entry.get("comment"), str) else None,
                        bool(entry.get("empty_layer", False)),
                    )
                )
        workdir = config.get("WorkingDir")
        variant = value.get("variant")
        return cls(
            diff_ids=tuple(Digest.parse(d) for d in rootfs["diff_ids"]),
            architecture=str(value.get("architecture", "")),
            os=str(value.get("os", "")),
            variant=variant if isinstance(variant, str) and variant else None,
            env=strings("Env") or (),
            workdir=workdir if isinstance(workdir, str) and workdir else None,
            cmd=strings("Cmd"),
            entrypoint=strings("Entrypoint"),
            labels=_annotations(config.get("Labels"), f"{what}: config.Labels"),
            history=tuple(history),
            created=value.get("created") if isinstance(value.get("created"), str) else None,
        )

    @property
    def platform(self) -> Platform | None:
        """The platform the image is for, None when the config names no os or architecture (an artifact's)."""
        return Platform(self.os, self.architecture, self.variant) if self.os and self.architecture else None


def timestamp(epoch: int) -> str:
    """``epoch`` (seconds) as the RFC 3339 UTC time image configs and their history carry."""
    import datetime

    return datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def layer_media_type(compression: str) -> str:
    """The OCI layer media type for a compression name: 'zstd', 'gzip' or 'none'."""
    try:
        return {"zstd": LAYER_ZSTD, "gzip": LAYER_GZIP, "none": LAYER_TAR}[compression]
    except KeyError:
        raise FormatError(f"unknown compression '{compression}' (use zstd or gzip)") from None


_OCI_LAYER_TYPES = {DOCKER_LAYER_GZIP: LAYER_GZIP, DOCKER_LAYER_TAR: LAYER_TAR}


def oci_layer(descriptor: Descriptor) -> Descriptor:
    """A layer's descriptor as an OCI manifest lists it: a Docker schema 2 type becomes the OCI type of the same
    bytes (``…rootfs.diff.tar.gzip`` is ``…layer.v1.tar+gzip``); buildah refuses an OCI manifest listing Docker
    types, and skopeo cannot convert one to a Docker archive."""
    media_type = _OCI_LAYER_TYPES.get(descriptor.media_type)
    return descriptor if media_type is None else replace(descriptor, media_type=media_type)


def layer_compression(media_type: str) -> str:
    """'zstd', 'gzip' or 'none' for a layer media type."""
    if media_type.endswith("+zstd") or media_type.endswith(".zstd"):
        return "zstd"
    if media_type.endswith("gzip"):
        return "gzip"
    if media_type in (LAYER_TAR, DOCKER_LAYER_TAR):
        return "none"
    raise FormatError(f"'{media_type}' is not a layer media type this tool can read")


DEFAULT_REGISTRY = "docker.io"
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
_REPO_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")


@dataclass(frozen=True)
class Reference:
    """A registry reference: ``registry/repository[:tag][@digest]``."""

    registry: str
    repository: str
    tag: str | None = None
    digest: Digest | None = None

    @classmethod
    def parse(cls, text: str) -> Reference:
        rest = text
        digest = None
        if "@" in rest:
            rest, digest_text = rest.split("@", 1)
            digest = Digest.parse(digest_text)
        tag = None
        slash = rest.rfind("/")
        colon = rest.rfind(":")
        if colon > slash:
            rest, tag = rest[:colon], rest[colon + 1 :]
            if not _TAG.fullmatch(tag):
                raise FormatError(f"'{text}': '{tag}' is not a valid tag")
        parts = rest.split("/")
        if len(parts) > 1 and ("." in parts[0] or ":" in parts[0] or parts[0] == "localhost"):
            registry, path = parts[0], parts[1:]
        else:
            registry, path = DEFAULT_REGISTRY, parts
        if registry == DEFAULT_REGISTRY and len(path) == 1:
            path = ["library", *path]
        if not path or not all(_REPO_COMPONENT.fullmatch(p) for p in path):
            raise FormatError(f"'{text}' is not a valid image reference (expected registry/repository[:tag])")
        if tag is None and digest is None:
            tag = "latest"
        return cls(registry, "/".join(path), tag, digest)

    def with_tag(self, tag: str) -> Reference:
        return Reference(self.registry, self.repository, tag, None)

    def __str__(self) -> str:
        out = f"{self.registry}/{self.repository}"
        if self.tag:
            out += f":{self.tag}"
        if self.digest:
            out += f"@{self.digest}"
        return out
