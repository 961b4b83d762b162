"""``ocibuild.toml`` and ``layers/<name>/layer.toml`` → :class:`Project`, validated against the schema.

Anything wrong raises :class:`RecipeError` naming the file (and the key), with a did-you-mean where one helps.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from ..errors import RecipeError
from ..files import NotRegularFile, TooLarge, read_toml
from ..oci import Platform
from .schema import KINDS, SCHEMA, SCHEMA_OF_KIND, InputRef, check_sha256, did_you_mean, relative_path, validate

PROJECT_FILE = "ocibuild.toml"
LAYER_FILE = "layer.toml"
_SECTIONS = ("image", "run", "cache")
_LAYER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
MAX_EPOCH = 0o77777777777  # the largest mtime of a ustar header's 11 octal digits (source_date_epoch clamps mtimes)


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

    @property
    def platform(self) -> Platform:
        """The image's platform: linux on ``architecture`` (no variant: the recipe format has none)."""
        return Platform("linux", self.architecture)


@dataclass(frozen=True)
class Mount:
    host: str  # relative to the project root
    container: str
    read_only: bool = False


@dataclass(frozen=True)
class RunSpec:
    """The ``[run]`` section: the compile step (and ``ocibuild shell``)."""

    command: tuple[str, ...]
    mounts: tuple[Mount, ...]
    env: Mapping[str, str]
    engine: str
    network: bool = True
    pass_env: tuple[str, ...] = ()  # host variables passed by name
    privileged: bool = False
    caches: tuple[str, ...] = ()  # absolute container paths, normalised


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
        raise RecipeError(f"{PROJECT_FILE}: no layer named '{name}'{did_you_mean(name, self.layer_names)}")

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


def load_project(root: Path) -> Project:
    """Read ``root/ocibuild.toml`` and every layer it lists; raise :class:`RecipeError` on anything wrong."""
    root = root.resolve()
    data = _load_toml(root / PROJECT_FILE, root)
    for section in data:
        if section not in _SECTIONS:
            raise RecipeError(
                f"{PROJECT_FILE}: unknown section [{section}]{did_you_mean(section, _SECTIONS)}",
                "the sections are [image], [run] and [cache]",
            )
        if not isinstance(data[section], dict):
            raise RecipeError(f"{PROJECT_FILE}: '{section}' must be a section ([{section}] on a line of its own, its "
                              f"keys below it), not {type(data[section]).__name__} {data[section]!r}"[:300],
                              f"replace '{section} = …' with a [{section}] header; see the key table in the README")
    image = _image(data)
    layers = _layers(root, image)
    run = _run(root, data.get("run", {}))
    cache = validate(f"{PROJECT_FILE}: [cache]", data.get("cache", {}), SCHEMA["cache"])
    return Project(root, image, layers, run, cache["ref"])


def _rel(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def _load_toml(path: Path, root: Path) -> dict[str, Any]:
    try:
        return read_toml(path)
    except FileNotFoundError:
        raise RecipeError(f"{_rel(path, root)}: file not found", "create it, or run ocibuild in the project root") from None
    except (NotRegularFile, TooLarge) as err:
        raise RecipeError(f"{_rel(path, root)}: {err.strerror}", "make it a regular TOML file") from None
    except OSError as err:
        raise RecipeError(f"{_rel(path, root)}: cannot read: {err.strerror}", "check the file's permissions") from None
    except ValueError as err:
        raise RecipeError(f"{_rel(path, root)}: malformed TOML: {err}", "fix the TOML syntax") from None


def _image(data: Mapping[str, Any]) -> ImageSpec:
    """The ``[image]`` section."""
    if not isinstance(data.get("image"), dict):
        raise RecipeError(f"{PROJECT_FILE}: missing section [image]", "add [image] with name and layers")
    image_data = validate(f"{PROJECT_FILE}: [image]", data["image"], SCHEMA["image"])
    if image_data["compression"] not in ("zstd", "gzip"):
        raise RecipeError(f"{PROJECT_FILE}: [image] compression must be \"zstd\" or \"gzip\"")
    if not 0 <= image_data["source_date_epoch"] <= MAX_EPOCH:
        raise RecipeError(f"{PROJECT_FILE}: [image] source_date_epoch must be between 0 and {MAX_EPOCH}",
                          f"{MAX_EPOCH} (2242-03-16) is the latest time a tar header holds")
    image = ImageSpec(**image_data)
    if not image.layers:
        raise RecipeError(f"{PROJECT_FILE}: [image] layers is empty", "list the layers, bottom first")
    return image


def _layers(root: Path, image: ImageSpec) -> tuple[LayerRecipe, ...]:
    """Every layer ``[image] layers`` lists, in its order, each needing only layers listed before it."""
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
                    f"{_rel(layer.file, root)}: needs unknown layer '{need}'{did_you_mean(need, image.layers)}",
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
    return tuple(layers)


def _run(root: Path, data: Mapping[str, Any]) -> RunSpec:
    """The ``[run]`` section."""
    run_data = validate(f"{PROJECT_FILE}: [run]", data, SCHEMA["run"])
    if run_data["engine"] not in ("auto", "podman", "nerdctl"):
        raise RecipeError(f"{PROJECT_FILE}: [run] engine must be auto, podman or nerdctl")
    mounts = tuple(_mount(root, m) for m in run_data["mounts"])
    for name in run_data["pass_env"]:
        if not ENV_NAME.fullmatch(name):
            raise RecipeError(f"{PROJECT_FILE}: [run] pass_env {name!r} is not a variable name",
                              "list names only (letters, digits, '_'); set values in [run] env")
    caches = tuple(cache_path(f"{PROJECT_FILE}: [run]", c, "/root/.cache/go-build") for c in run_data["caches"])
    taken = [m.container.rstrip("/") or "/" for m in mounts]
    for path in caches:
        if path in taken:
            raise RecipeError(f"{PROJECT_FILE}: [run] cache {path!r} is also a mount or listed twice",
                              "give each container path one mount or one cache")
        taken.append(path)
    return RunSpec(run_data["command"], mounts, run_data["env"], run_data["engine"], run_data["network"],
                   run_data["pass_env"], run_data["privileged"], caches)


def cache_path(where: str, text: str, example: str) -> str:
    """A ``caches`` entry (``[run]``, or a run layer's), normalised: an absolute container path, not ``/``."""
    pure = PurePosixPath(text)
    if not pure.is_absolute() or ".." in pure.parts or str(pure) in ("/", "//"):
        raise RecipeError(f"{where} cache {text!r} must be an absolute path in the container, not /",
                          f"write e.g. caches = [\"{example}\"] in {where.split(':')[0]}")
    return "/" + str(pure).lstrip("/")


def _layer_caches(where: str, paths: tuple[str, ...]) -> tuple[str, ...]:
    """A run layer's ``caches``: absolute, not ``/``, each once, none below another nor at ocibuild's own mount
    points under ``/ocibuild``."""
    caches = tuple(cache_path(f"{where}:", text, "/var/cache/apt") for text in paths)
    for i, path in enumerate(caches):
        if path == "/ocibuild" or path.startswith("/ocibuild/"):
            raise RecipeError(f"{where}: cache {path!r} is under /ocibuild, where ocibuild mounts the script and "
                              "inputs", f"choose another path in {where}")
        for other in caches[:i]:
            if path == other or path.startswith(other + "/") or other.startswith(path + "/"):
                raise RecipeError(f"{where}: caches {other!r} and {path!r} overlap",
                                  f"list each directory once in {where}, none inside another")
    return caches


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
        raise RecipeError(f"{where}: unknown kind '{kind}'{did_you_mean(kind, KINDS)}", f"use one of {', '.join(KINDS)}")
    values = validate(where, data, SCHEMA[SCHEMA_OF_KIND[kind]])
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
    """Checks beyond the types, per kind; normalises the relative paths in ``values``."""
    if "owner" in values and not re.fullmatch(r"\d+:\d+", values["owner"]):
        raise RecipeError(f"{where}: owner {values['owner']!r} must be \"uid:gid\" (numbers)")
    if kind == "archive":
        check_sha256(where, values["sha256"])
        if values["strip_components"] < 0:
            raise RecipeError(f"{where}: strip_components must not be negative")
        if not values["dest"].startswith("/"):
            raise RecipeError(f"{where}: dest {values['dest']!r} must be an absolute path in the image")
        url = values["url"]
        if "://" not in url:
            values["url"] = relative_path(where, "url", url)
        elif not url.startswith(("http://", "https://", "file://")):
            raise RecipeError(f"{where}: url {url!r}: only https, http, file URLs or relative paths are supported")
    elif kind == "copy":
        values["from"] = relative_path(where, "from", values["from"])
        if not values["to"].startswith("/"):
            raise RecipeError(f"{where}: to {values['to']!r} must be an absolute path in the image")
    elif kind == "run":
        values["script"] = relative_path(where, "script", values["script"])
        if not values["workdir"].startswith("/"):
            raise RecipeError(f"{where}: workdir {values['workdir']!r} must be an absolute path")
        values["caches"] = _layer_caches(where, values["caches"])
    elif kind == "bootstrap":
        if not re.fullmatch(r"[a-z0-9][a-z0-9.-]*", values["suite"]):
            raise RecipeError(f"{where}: suite {values['suite']!r} is not a suite name like 'bookworm'")
        if not values["mirror"].startswith(("http://", "https://", "file://")):
            raise RecipeError(f"{where}: mirror {values['mirror']!r} must be an http(s) or file URL")
