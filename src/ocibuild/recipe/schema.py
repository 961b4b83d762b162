"""The recipe format, declared once: every key of every kind with its TOML type, whether it is required, its
default and what it means.

:data:`SCHEMA` drives validation (:func:`validate`: unknown keys get a did-you-mean, types are checked, defaults
filled in) and the key table in the README (:func:`reference_table`). The recipe format is a contract.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from ..errors import RecipeError

DEFAULT_MIRROR = "http://deb.debian.org/debian"
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
        Key("source_date_epoch", "integer", False, 0, "every mtime in every layer is clamped to this (at most "
            "8589934591, 2242-03-16: the latest a tar header holds)"),
        Key("architecture", "string", False, "amd64", "image architecture (GOARCH name)"),
    ),
    "run": (
        Key("command", "list of strings", False, [], "the compile step run by `ocibuild run`"),
        Key("mounts", "list of strings", False, [], "host:container bind mounts, host relative to the project"),
        Key("env", "table of strings", False, {}, "extra environment of the compile step"),
        Key("engine", "string", False, "auto", "auto, podman or nerdctl"),
        Key("network", "boolean", False, True, "whether the compile step may reach the network"),
        Key("pass_env", "list of strings", False, [],
            "host variables passed to the compile step by name (unset ones skipped)"),
        Key("privileged", "boolean", False, False,
            "run the compile step with the engine's --privileged (refused when rootless)"),
        Key("caches", "list of strings", False, [],
            "absolute paths in the container kept between runs, under the store per project and engine"),
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
        Key("caches", "list of strings", False, [],
            "absolute paths in the container (e.g. /var/cache/apt) kept between builds of this layer, under the "
            "store per project, engine and layer; never in the layer, never in its key"),
    ),
}
KINDS = ("bootstrap", "image", "archive", "copy", "run")
SCHEMA_OF_KIND = {"bootstrap": "bootstrap", "image": "image_layer", "archive": "archive", "copy": "copy",
                  "run": "run_layer"}


@dataclass(frozen=True)
class InputRef:
    """A file or URL a layer reads. ``path`` is relative to the layer folder; ``url`` + ``sha256`` a download."""

    path: str | None = None
    url: str | None = None
    sha256: str | None = None
    name: str | None = None  # the file name under /ocibuild/inputs for a download


def did_you_mean(word: str, choices: Sequence[str]) -> str:
    """`` (did you mean 'x'?)`` for the choice closest to ``word``, or "" when none is close."""
    import difflib  # only when a recipe is wrong: its import is start-up time of every command

    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def validate(where: str, data: Mapping[str, Any], keys: Sequence[Key]) -> dict[str, Any]:
    """Validate ``data`` against ``keys``: unknown keys (with a suggestion), missing required ones, types.

    Returns every key of ``keys``, defaults filled in: lists as tuples, tables sorted, inputs as InputRefs."""
    names = [k.name for k in keys]
    for name in data:
        if name not in names:
            raise RecipeError(
                f"{where}: unknown key '{name}'{did_you_mean(name, names)}",
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
        return InputRef(path=relative_path(where, "inputs", item))
    if isinstance(item, dict):
        unknown = set(item) - {"url", "sha256", "name"}
        if unknown:
            raise RecipeError(f"{where}: unknown key '{sorted(unknown)[0]}' in an input (use url, sha256, name)")
        url, sha, name = item.get("url"), item.get("sha256"), item.get("name")
        if not isinstance(url, str) or not isinstance(sha, str):
            raise RecipeError(f"{where}: an input table needs 'url' and 'sha256' strings")
        check_sha256(where, sha)
        if name is None:
            name = url.rstrip("/").rsplit("/", 1)[-1]
        if not isinstance(name, str) or not name or "/" in name or name in (".", ".."):
            raise RecipeError(f"{where}: input name {name!r} must be a plain file name")
        return InputRef(url=url, sha256=sha, name=name)
    raise RecipeError(f"{where}: each input is a file name or a {{url, sha256}} table, not {item!r}")


def check_sha256(where: str, value: str) -> None:
    if not _HEX64.fullmatch(value):
        raise RecipeError(
            f"{where}: sha256 {value!r} is not 64 lowercase hex digits",
            "put the output of `sha256sum FILE` in 'sha256'",
        )


def relative_path(where: str, key: str, value: str) -> str:
    """``value`` normalised, when it is a relative path that stays inside its folder; else RecipeError."""
    pure = PurePosixPath(value)
    if pure.is_absolute() or ".." in pure.parts or not value:
        raise RecipeError(
            f"{where}: '{key}' path {value!r} must be relative and stay inside its folder",
            "use a path without '..' or a leading '/'",
        )
    return str(pure)


def reference_table() -> str:
    """The README's table of every key of every kind, generated from :data:`SCHEMA`."""
    rows = ["| where | key | type | required | default | meaning |", "|---|---|---|---|---|---|"]
    titles: list[tuple[str, Callable[[str], str]]] = [
        ("image", lambda k: "`ocibuild.toml` [image]"),
        ("run", lambda k: "`ocibuild.toml` [run]"),
        ("cache", lambda k: "`ocibuild.toml` [cache]"),
    ] + [(SCHEMA_OF_KIND[kind], lambda k, kind=kind: f"layer.toml, kind `{kind}`")  # type: ignore[misc]
         for kind in KINDS]
    for schema_name, title in titles:
        for key in SCHEMA[schema_name]:
            default = "—" if key.required else f"`{json.dumps(key.default)}`"
            rows.append(
                f"| {title(schema_name)} | `{key.name}` | {key.type} | {'yes' if key.required else 'no'} "
                f"| {default} | {key.doc} |"
            )
    return "\n".join(rows)
