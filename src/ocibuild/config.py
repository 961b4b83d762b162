"""The user's host-specific settings: ``$XDG_CONFIG_HOME/ocibuild/config.toml`` and the environment.

Project files never hold host settings; this file does::

    store = "/var/cache/ocibuild"          # default: $XDG_CACHE_HOME/ocibuild/store
    [engine]
    args = ["--runtime", "runc"]           # global flags for every engine call
    [registry]
    insecure = ["registry.lan:5000"]       # plain HTTP allowed for these host:port
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import RecipeError
from .files import read_toml


@dataclass(frozen=True)
class Config:
    store: Path
    engine_args: tuple[str, ...] = ()
    insecure_registries: tuple[str, ...] = ()
    path: Path | None = None


def config_path(env: dict[str, str] | None = None) -> Path:
    env = dict(os.environ) if env is None else env
    base = env.get("XDG_CONFIG_HOME") or str(Path(env.get("HOME", "~")).expanduser() / ".config")
    return Path(env.get("OCIBUILD_CONFIG") or Path(base) / "ocibuild" / "config.toml")


def default_store(env: dict[str, str]) -> Path:
    base = env.get("XDG_CACHE_HOME") or str(Path(env.get("HOME", "~")).expanduser() / ".cache")
    return Path(base) / "ocibuild" / "store"


def load_config(store_flag: str | None = None, env: dict[str, str] | None = None) -> Config:
    """Settings from the config file, overridden by the environment (OCIBUILD_STORE), then by flags."""
    env = dict(os.environ) if env is None else env
    path = config_path(env)
    data: dict[str, Any] = {}
    if path.exists():
        try:
            data = read_toml(path)
        except OSError as err:
            raise RecipeError(f"{path}: cannot read: {err.strerror}", "fix the config file or remove it") from None
        except ValueError as err:
            raise RecipeError(f"{path}: malformed TOML: {err}", "fix the config file or remove it") from None
    unknown = set(data) - {"store", "engine", "registry"}
    if unknown:
        raise RecipeError(f"{path}: unknown key '{sorted(unknown)[0]}'", "the keys are store, [engine], [registry]")
    engine = data.get("engine", {})
    registry = data.get("registry", {})
    args = engine.get("args", []) if isinstance(engine, dict) else None
    insecure = registry.get("insecure", []) if isinstance(registry, dict) else None
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise RecipeError(f"{path}: [engine] args must be a list of strings")
    if not isinstance(insecure, list) or not all(isinstance(a, str) for a in insecure):
        raise RecipeError(f"{path}: [registry] insecure must be a list of strings")
    store = store_flag or env.get("OCIBUILD_STORE") or data.get("store")
    if store is not None and not isinstance(store, str):
        raise RecipeError(f"{path}: store must be a string")
    return Config(Path(store).expanduser() if store else default_store(env), tuple(args), tuple(insecure),
                  path if path.exists() else None)
