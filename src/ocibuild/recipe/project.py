"""Recipes: ``ocibuild.toml`` and ``layers/<name>/layer.toml`` → :class:`Project`; cache keys; ``ocibuild.lock``.

The recipe format is a contract. Every key of every kind is declared once, in :data:`SCHEMA`, which drives
validation (unknown keys get a did-you-mean), defaults, and the key table in the README.

What enters a layer's cache key (:func:`cache_key`), and nothing else:

- ``format``: :data:`KEY_FORMAT`, bumped whenever the bytes ocibuild writes for the same inputs change;
- ``kind`` and the normalised recipe: every schema key of the kind with defaults filled in, except
  ``description`` and ``needs`` (needs enter through their keys);
- ``epoch``: ``[image] source_date_epoch``, the clamp for every mtime in the layer;
- ``inputs``: ``{"name", "digest"}`` for every input, where name is a project-relative path or a URL and digest
  the sha256 of its content (a copy tree's digest covers each entry's relative path, type, executable bit,
  symlink target and content — never mtime, owner, umask or the absolute path); moving inputs (an ``image``
  ref, a ``bootstrap`` suite's InRelease) enter as the digest recorded in ``ocibuild.lock``;
- ``needs``: the keys of the direct needs, in order (which cover their own needs in turn).

The compression is not part of the key: a layer's identity is its diff_id.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from ..errors import LockError, RecipeError
from ..oci import Digest, canonical_json

KEY_FORMAT = 2  # 2: bootstrap layers carry Acquire::Retries "5" in apt.conf.d/99mmdebstrap
PROJECT_FILE = "ocibuild.toml"
LAYER_FILE = "layer.toml"
LOCK_FILE = "ocibuild.lock"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
_LAYER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Key:
    """One key of the recipe format: its TOML type, whether it is required, its default, what it means."""

    name: str
    type: str  # "string", "integer", "boolean", "list of strings", "table of strings", "list of inputs"
    required: bool = False
    default: Any = None
    doc: str = ""


_COMMON = (
    Key("kind", "string", True, None, "bootstrap, image, archive, copy or run"),
    Key("needs", "list of strings", False, [], "layers that must lie below this one when it is built"),
    Key("description", "string", False, "", "free text, shown by `ocibuild plan`"),
)

SCHEMA: dict[str, tuple[Key, ...]] = {
    "image": (
        Key("name", "string", True, None, "tag of the assembled image in the store"),
        Key("layers", "list of strings", True, None, "stacking order, bottom first"),
        Key("compression", "string", False, "zstd", "zstd or gzip"),
        Key("env", "table of strings", False, {}, "environment of the image"),
        Key("workdir", "string", False, "", "working directory of the image"),
        Key("cmd", "list of strings", False, [], "default command of the image"),
        Key("source_date_epoch", "integer", False, 0, "every mtime in every layer is clamped to this"),
        Key("architecture", "string", False, "amd64", "image architecture (GOARCH name)"),
    ),
    "run": (
        Key("command", "list of strings", False, [], "the compile step run by `ocibuild run`"),
        Key("mounts", "list of strings", False, [], "host:container bind mounts, host relative to the project"),
        Key("env", "table of strings", False, {}, "extra environment of the compile step"),
        Key("engine", "string", False, "auto", "auto, podman or nerdctl"),
        Key("network", "boolean", False, True, "whether the compile step may reach the network"),
    ),
    "cache": (Key("ref", "string", False, "", "registry repository used as the shared layer cache"),),
    "bootstrap": _COMMON
    + (
        Key("suite", "string", True, None, "Debian/Ubuntu suite, e.g. bookworm"),
        Key("mirror", "string", False, DEFAULT_MIRROR, "archive URL"),
        Key("variant", "string", False, "minbase", "mmdebstrap variant"),
        Key("packages", "list of strings", False, [], "extra packages"),
        Key("components", "list of strings", False, ["main"], "archive components"),
        Key("deb_src", "boolean", False, False, "also write deb-src lines to the sources list"),
    ),
    "image_layer": _COMMON
    + (Key("ref", "string", True, None, "oci-archive:PATH, oci:DIR:TAG or a registry reference"),),
    "archive": _COMMON
    + (
        Key("url", "string", True, None, "https, http, file URL or a path relative to the layer folder"),
        Key("sha256", "string", True, None, "64 hex digits of the archive file"),
        Key("dest", "string", False, "/", "where the archive's entries land"),
        Key("strip_components", "integer", False, 0, "leading path components dropped from each entry"),
        Key("owner", "string", False, "0:0", "uid:gid of every entry"),
    ),
    "copy": _COMMON
    + (
        Key("from", "string", True, None, "a path relative to the project root"),
        Key("to", "string", True, None, "absolute destination in the image"),
        Key("exclude", "list of strings", False, [], "glob patterns (.containerignore syntax) left out"),
        Key("owner", "string", False, "0:0", "uid:gid of every entry"),
    ),
    "run_layer": _COMMON
    + (
        Key("script", "string", True, None, "shell script beside layer.toml, run with /bin/sh -eu"),
        Key("inputs", "list of inputs", False, [], "files beside layer.toml or {url, sha256} tables"),
        Key("network", "boolean", False, True, "whether the script may reach the network"),
        Key("env", "table of strings", False, {}, "environment of the script"),
        Key("workdir", "string", False, "/", "working directory of the script"),
        Key("exclude", "list of strings", False, [], "paths dropped from the result, beyond the default list"),
    ),
}
KINDS = ("bootstrap", "image", "archive", "copy", "run")
_SCHEMA_OF_KIND = {"bootstrap": "bootstrap", "image": "image_layer", "archive": "archive", "copy": "copy",
                   "run": "run_layer"}


@dataclass(frozen=True)
class InputRef:
    """A file or URL a layer reads. ``path`` is relative to the layer folder; ``url`` + ``sha256`` a download."""

    path: str | None = None
    url: str | None = None
    sha256: str | None = None
    name: str | None = None  # the file name under /ocibuild/inputs for a download


@dataclass(frozen=True)
class LayerRecipe:
    """A layer's recipe: its kind and its options, with defaults filled in (``options`` excludes common keys)."""

    name: str
    kind: str
    file: Path
    needs: tuple[str, ...]
    description: str
    options: Mapping[str, Any]

    @property
    def dir(self) -> Path:
        return self.file.parent

    def str_(self, key: str) -> str:
        value = self.options[key]
        assert isinstance(value, str)
        return value

    def strings(self, key: str) -> tuple[str, ...]:
        return tuple(self.options[key])

    def int_(self, key: str) -> int:
        value = self.options[key]
        assert isinstance(value, int)
        return value

    def bool_(self, key: str) -> bool:
        return bool(self.options[key])

    def table(self, key: str) -> dict[str, str]:
        return dict(self.options[key])

    @property
    def inputs(self) -> tuple[InputRef, ...]:
        return tuple(self.options.get("inputs", ()))

    def to_key_dict(self) -> dict[str, Any]:
        """The normalised recipe as it enters the cache key (InputRefs as plain dicts)."""
        out: dict[str, Any] = {}
        for key, value in self.options.items():
            if key == "inputs":
                value = [{k: v for k, v in vars(i).items() if v is not None} for i in value]
            out[key] = value
        return out


@dataclass(frozen=True)
class ImageSpec:
    name: str
    layers: tuple[str, ...]
    compression: str
    env: Mapping[str, str]
    workdir: str
    cmd: tuple[str, ...]
    source_date_epoch: int
    architecture: str


@dataclass(frozen=True)
class Mount:
    host: str  # relative to the project root
    container: str
    read_only: bool = False


@dataclass(frozen=True)
class RunSpec:
    command: tuple[str, ...]
    mounts: tuple[Mount, ...]
    env: Mapping[str, str]
    engine: str
    network: bool = True


@dataclass(frozen=True)
class Project:
    root: Path
    image: ImageSpec
    layers: tuple[LayerRecipe, ...]
    run: RunSpec
    cache_ref: str

    def layer(self, name: str) -> LayerRecipe:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise RecipeError(f"{PROJECT_FILE}: no layer named '{name}'{_did_you_mean(name, self.layer_names)}")

    @property
    def layer_names(self) -> tuple[str, ...]:
        return tuple(layer.name for layer in self.layers)

    def closure(self, name: str) -> tuple[str, ...]:
        """``name``'s needs and what they need in turn, in ``[image] layers`` order (not ``name`` itself)."""
        wanted: set[str] = set()
        stack = list(self.layer(name).needs)
        while stack:
            need = stack.pop()
            if need not in wanted:
                wanted.add(need)
                stack.extend(self.layer(need).needs)
        return tuple(n for n in self.layer_names if n in wanted)

    def independent(self, a: str, b: str) -> bool:
        """Neither layer needs the other, directly or through other layers."""
        return a not in self.closure(b) and b not in self.closure(a)


def _did_you_mean(word: str, choices: Sequence[str]) -> str:
    import difflib  # only when a recipe is wrong: its import is start-up time of every command

    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _rel(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def _check_type(where: str, key: Key, value: Any) -> Any:
    def bad() -> RecipeError:
        return RecipeError(
            f"{where}: '{key.name}' must be a {key.type}, not {type(value).__name__} {value!r}"[:300],
            f"fix '{key.name}' in {where.split(':')[0]}",
        )

    if key.type == "string":
        if not isinstance(value, str):
            raise bad()
    elif key.type == "integer":
        if not isinstance(value, int) or isinstance(value, bool):
            raise bad()
    elif key.type == "boolean":
        if not isinstance(value, bool):
            raise bad()
    elif key.type == "list of strings":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise bad()
        value = tuple(value)
    elif key.type == "table of strings":
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise bad()
        value = dict(sorted(value.items()))
    elif key.type == "list of inputs":
        if not isinstance(value, list):
            raise bad()
        value = tuple(_input_ref(where, item) for item in value)
    return value


def _input_ref(where: str, item: Any) -> InputRef:
    if isinstance(item, str):
        return InputRef(path=_relative_path(where, "inputs", item))
    if isinstance(item, dict):
        unknown = set(item) - {"url", "sha256", "name"}
        if unknown:
            raise RecipeError(f"{where}: unknown key '{sorted(unknown)[0]}' in an input (use url, sha256, name)")
        url, sha, name = item.get("url"), item.get("sha256"), item.get("name")
        if not isinstance(url, str) or not isinstance(sha, str):
            raise RecipeError(f"{where}: an input table needs 'url' and 'sha256' strings")
        _check_sha256(where, sha)
        if name is None:
            name = url.rstrip("/").rsplit("/", 1)[-1]
        if not isinstance(name, str) or not name or "/" in name or name in (".", ".."):
            raise RecipeError(f"{where}: input name {name!r} must be a plain file name")
        return InputRef(url=url, sha256=sha, name=name)
    raise RecipeError(f"{where}: each input is a file name or a {{url, sha256}} table, not {item!r}")


def _check_sha256(where: str, value: str) -> None:
    if not _HEX64.fullmatch(value):
        raise RecipeError(
            f"{where}: sha256 {value!r} is not 64 lowercase hex digits",
            "put the output of `sha256sum FILE` in 'sha256'",
        )


def _relative_path(where: str, key: str, value: str) -> str:
    pure = PurePosixPath(value)
    if pure.is_absolute() or ".." in pure.parts or not value:
        raise RecipeError(
            f"{where}: '{key}' path {value!r} must be relative and stay inside its folder",
            "use a path without '..' or a leading '/'",
        )
    return str(pure)


def _table(where: str, data: Mapping[str, Any], keys: Sequence[Key]) -> dict[str, Any]:
    """Validate ``data`` against ``keys``: unknown keys (with a suggestion), missing required ones, types."""
    names = [k.name for k in keys]
    for name in data:
        if name not in names:
            raise RecipeError(
                f"{where}: unknown key '{name}'{_did_you_mean(name, names)}",
                "see the key table in the README",
            )
    out: dict[str, Any] = {}
    for key in keys:
        if key.name in data:
            out[key.name] = _check_type(where, key, data[key.name])
        elif key.required:
            raise RecipeError(f"{where}: missing required key '{key.name}'", f"add {key.name} = … ({key.doc})")
        else:
            default = key.default
            out[key.name] = tuple(default) if isinstance(default, list) else default
    return out


def _load_toml(path: Path, root: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise RecipeError(f"{_rel(path, root)}: file not found", "create it, or run ocibuild in the project root") from None
    except tomllib.TOMLDecodeError as err:
        raise RecipeError(f"{_rel(path, root)}: malformed TOML: {err}", "fix the TOML syntax") from None
    except (OSError, UnicodeDecodeError) as err:
        raise RecipeError(f"{_rel(path, root)}: cannot read: {err}", "check the file's permissions") from None


def load_project(root: Path) -> Project:
    """Read ``root/ocibuild.toml`` and every layer it lists; raise :class:`RecipeError` on anything wrong."""
    root = root.resolve()
    data = _load_toml(root / PROJECT_FILE, root)
    for section in data:
        if section not in ("image", "run", "cache"):
            raise RecipeError(
                f"{PROJECT_FILE}: unknown section [{section}]{_did_you_mean(section, ['image', 'run', 'cache'])}",
                "the sections are [image], [run] and [cache]",
            )
    if not isinstance(data.get("image"), dict):
        raise RecipeError(f"{PROJECT_FILE}: missing section [image]", "add [image] with name and layers")
    image_data = _table(f"{PROJECT_FILE}: [image]", data["image"], SCHEMA["image"])
    if image_data["compression"] not in ("zstd", "gzip"):
        raise RecipeError(f"{PROJECT_FILE}: [image] compression must be \"zstd\" or \"gzip\"")
    if image_data["source_date_epoch"] < 0:
        raise RecipeError(f"{PROJECT_FILE}: [image] source_date_epoch must not be negative")
    image = ImageSpec(**image_data)
    if not image.layers:
        raise RecipeError(f"{PROJECT_FILE}: [image] layers is empty", "list the layers, bottom first")
    seen: set[str] = set()
    layers = []
    for position, name in enumerate(image.layers):
        if not _LAYER_NAME.fullmatch(name):
            raise RecipeError(f"{PROJECT_FILE}: layer name {name!r} must be letters, digits, '.', '_' or '-'")
        if name in seen:
            raise RecipeError(f"{PROJECT_FILE}: layer '{name}' is listed twice in [image] layers")
        layer = _load_layer(root, name)
        for need in layer.needs:
            if need not in image.layers:
                raise RecipeError(
                    f"{_rel(layer.file, root)}: needs unknown layer '{need}'{_did_you_mean(need, image.layers)}",
                    f"add it to [image] layers in {PROJECT_FILE} or fix the name",
                )
            if need not in seen:
                raise RecipeError(
                    f"{_rel(layer.file, root)}: needs '{need}', which must come before '{name}' in [image] layers",
                    f"reorder [image] layers in {PROJECT_FILE} (needs may not form a cycle)",
                )
        if layer.kind == "image" and position != 0:
            raise RecipeError(
                f"{_rel(layer.file, root)}: an image layer supplies the bottom layers and must come first",
                f"move '{name}' to the front of [image] layers",
            )
        seen.add(name)
        layers.append(layer)

    run_data = _table(f"{PROJECT_FILE}: [run]", data.get("run", {}), SCHEMA["run"])
    if run_data["engine"] not in ("auto", "podman", "nerdctl"):
        raise RecipeError(f"{PROJECT_FILE}: [run] engine must be auto, podman or nerdctl")
    mounts = tuple(_mount(root, m) for m in run_data["mounts"])
    run = RunSpec(run_data["command"], mounts, run_data["env"], run_data["engine"], run_data["network"])
    cache = _table(f"{PROJECT_FILE}: [cache]", data.get("cache", {}), SCHEMA["cache"])
    return Project(root, image, tuple(layers), run, cache["ref"])


def _mount(root: Path, text: str) -> Mount:
    parts = text.split(":")
    if len(parts) not in (2, 3) or not parts[0] or not parts[1].startswith("/"):
        raise RecipeError(
            f"{PROJECT_FILE}: [run] mount {text!r} is not HOST:CONTAINER[:ro]",
            "write e.g. \"bundles:/go/src/example/bundles\" (host path relative to the project)",
        )
    read_only = len(parts) == 3 and parts[2] == "ro"
    if len(parts) == 3 and not read_only:
        raise RecipeError(f"{PROJECT_FILE}: [run] mount {text!r}: the only option is 'ro'")
    host = (root / parts[0]).resolve()
    if host != root and root not in host.parents:
        raise RecipeError(
            f"{PROJECT_FILE}: [run] mount {text!r} leaves the project directory",
            "mount a path inside the project (relative, without '..')",
        )
    return Mount(str(host.relative_to(root)) if host != root else ".", parts[1], read_only)


def _load_layer(root: Path, name: str) -> LayerRecipe:
    file = root / "layers" / name / LAYER_FILE
    where = _rel(file, root)
    data = _load_toml(file, root)
    kind = data.get("kind")
    if not isinstance(kind, str):
        raise RecipeError(f"{where}: missing required key 'kind'", f"add kind = one of {', '.join(KINDS)}")
    if kind not in KINDS:
        raise RecipeError(f"{where}: unknown kind '{kind}'{_did_you_mean(kind, KINDS)}", f"use one of {', '.join(KINDS)}")
    values = _table(where, data, SCHEMA[_SCHEMA_OF_KIND[kind]])
    needs = values.pop("needs")
    description = values.pop("description")
    values.pop("kind")
    if name in needs:
        raise RecipeError(f"{where}: a layer cannot need itself")
    if len(set(needs)) != len(needs):
        raise RecipeError(f"{where}: 'needs' lists a layer twice")
    _check_layer(where, kind, values)
    return LayerRecipe(name, kind, file, tuple(needs), description, values)


def _check_layer(where: str, kind: str, values: dict[str, Any]) -> None:
    if "owner" in values and not re.fullmatch(r"\d+:\d+", values["owner"]):
        raise RecipeError(f"{where}: owner {values['owner']!r} must be \"uid:gid\" (numbers)")
    if kind == "archive":
        _check_sha256(where, values["sha256"])
        if values["strip_components"] < 0:
            raise RecipeError(f"{where}: strip_components must not be negative")
        if not values["dest"].startswith("/"):
            raise RecipeError(f"{where}: dest {values['dest']!r} must be an absolute path in the image")
        url = values["url"]
        if "://" not in url:
            values["url"] = _relative_path(where, "url", url)
        elif not url.startswith(("http://", "https://", "file://")):
            raise RecipeError(f"{where}: url {url!r}: only https, http, file URLs or relative paths are supported")
    elif kind == "copy":
        values["from"] = _relative_path(where, "from", values["from"])
        if not values["to"].startswith("/"):
            raise RecipeError(f"{where}: to {values['to']!r} must be an absolute path in the image")
    elif kind == "run":
        values["script"] = _relative_path(where, "script", values["script"])
        if not values["workdir"].startswith("/"):
            raise RecipeError(f"{where}: workdir {values['workdir']!r} must be an absolute path")
    elif kind == "bootstrap":
        if not re.fullmatch(r"[a-z0-9][a-z0-9.-]*", values["suite"]):
            raise RecipeError(f"{where}: suite {values['suite']!r} is not a suite name like 'bookworm'")
        if not values["mirror"].startswith(("http://", "https://", "file://")):
            raise RecipeError(f"{where}: mirror {values['mirror']!r} must be an http(s) or file URL")


@dataclass(frozen=True)
class Input:
    """A resolved input of a layer: a project-relative path or a URL, and the digest of its content."""

    name: str
    digest: Digest

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "digest": str(self.digest)}


def cache_key(layer: LayerRecipe, epoch: int, inputs: Sequence[Input], need_keys: Sequence[Digest]) -> Digest:
    """The input-addressed key of ``layer`` (see the module docstring for exactly what enters it)."""
    document = {
        "format": KEY_FORMAT,
        "kind": layer.kind,
        "recipe": layer.to_key_dict(),
        "epoch": epoch,
        "inputs": [i.to_dict() for i in inputs],
        "needs": [str(k) for k in need_keys],
    }
    return Digest.of(canonical_json(document))


# ---- ocibuild.lock -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LockEntry:
    """A moving input resolved to a digest: the layer it belongs to, what was resolved (``source``), the digest."""

    layer: str
    source: str
    digest: Digest


@dataclass(frozen=True)
class Lock:
    entries: Mapping[str, LockEntry] = field(default_factory=dict)

    def get(self, layer: str, source: str) -> LockEntry | None:
        """The entry of ``layer`` if it was resolved from the same ``source`` (a changed recipe needs a new one)."""
        entry = self.entries.get(layer)
        return entry if entry is not None and entry.source == source else None

    def with_entry(self, entry: LockEntry) -> Lock:
        return Lock({**self.entries, entry.layer: entry})

    def only(self, layers: Sequence[str]) -> Lock:
        return Lock({k: v for k, v in self.entries.items() if k in layers})

    def to_toml(self) -> str:
        lines = [
            "# ocibuild.lock: moving inputs of this project resolved to digests. Commit it.",
            "# Cache keys use these digests; refresh them with `ocibuild lock`.",
            "version = 1",
        ]
        for name in sorted(self.entries):
            entry = self.entries[name]
            lines += ["", f"[layers.{json.dumps(name)}]", f"source = {json.dumps(entry.source)}",
                      f"digest = {json.dumps(str(entry.digest))}"]
        return "\n".join(lines) + "\n"


def load_lock(root: Path) -> Lock:
    path = root / LOCK_FILE
    if not path.exists():
        return Lock()
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise LockError(f"{LOCK_FILE}: cannot read: {err}", f"fix it, or delete it and run `ocibuild lock`") from None
    if data.get("version") != 1 or not isinstance(data.get("layers", {}), dict):
        raise LockError(f"{LOCK_FILE}: unknown lock format", "delete it and run `ocibuild lock`")
    entries = {}
    for name, value in data.get("layers", {}).items():
        try:
            entries[name] = LockEntry(name, str(value["source"]), Digest.parse(value["digest"]))
        except (KeyError, TypeError, ValueError) as err:
            raise LockError(f"{LOCK_FILE}: entry for layer '{name}' is malformed ({err})",
                            "delete it and run `ocibuild lock`") from None
    return Lock(entries)


def reference_table() -> str:
    """The README's table of every key of every kind, generated from :data:`SCHEMA`."""
    rows = ["| where | key | type | required | default | meaning |", "|---|---|---|---|---|---|"]
    titles: list[tuple[str, Callable[[str], str]]] = [
        ("image", lambda k: "`ocibuild.toml` [image]"),
        ("run", lambda k: "`ocibuild.toml` [run]"),
        ("cache", lambda k: "`ocibuild.toml` [cache]"),
    ] + [(_SCHEMA_OF_KIND[kind], lambda k, kind=kind: f"layer.toml, kind `{kind}`")  # type: ignore[misc]
         for kind in KINDS]
    for schema_name, title in titles:
        for key in SCHEMA[schema_name]:
            default = "—" if key.required else f"`{json.dumps(key.default)}`"
            rows.append(
                f"| {title(schema_name)} | `{key.name}` | {key.type} | {'yes' if key.required else 'no'} "
                f"| {default} | {key.doc} |"
            )
    return "\n".join(rows)
