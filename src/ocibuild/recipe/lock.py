"""``ocibuild.lock``: the project's moving inputs (an ``image`` layer's ref, a ``bootstrap`` suite's InRelease)
resolved to digests, which the cache keys use.

Reading (:func:`load_lock`) and serialising (:meth:`Lock.to_toml`) only: resolving a source to a digest, which
may reach the network, is :mod:`ocibuild.resolve`'s, and so is writing the file.

The file, one table per layer with a moving input, sorted by layer name::

    version = 1

    [layers."base"]
    source = "docker.io/library/debian:bookworm"
    platform = "linux/arm64"
    digest = "sha256:…"

``platform`` (os/architecture[/variant]) is the platform the source was resolved for: an ``image`` ref may name
an index, whose manifest for each platform differs. A ``bootstrap`` suite's entry has none (its InRelease covers
every architecture). An entry holds for a layer only when both its source and its platform are the ones asked
for, so an image entry written before entries carried a platform is resolved again once, like an entry for
another source.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import FormatError, LockError
from ..files import read_toml
from ..oci import Digest, Platform

LOCK_FILE = "ocibuild.lock"


@dataclass(frozen=True)
class LockEntry:
    """A moving input resolved to a digest: the layer it belongs to, what was resolved (``source``) and for which
    platform (None: the source means the same on every platform), the digest."""

    layer: str
    source: str
    digest: Digest
    platform: Platform | None = None


@dataclass(frozen=True)
class Lock:
    entries: Mapping[str, LockEntry] = field(default_factory=dict)

    def get(self, layer: str, source: str, platform: Platform | None) -> LockEntry | None:
        """The entry of ``layer`` if it was resolved from the same ``source`` for the same ``platform`` (a changed
        recipe, or another ``[image] architecture``, needs a new one)."""
        entry = self.entries.get(layer)
        return entry if entry is not None and (entry.source, entry.platform) == (source, platform) else None

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
            lines += ["", f"[layers.{json.dumps(name)}]", f"source = {json.dumps(entry.source)}"]
            if entry.platform is not None:
                lines.append(f"platform = {json.dumps(str(entry.platform))}")
            lines.append(f"digest = {json.dumps(str(entry.digest))}")
        return "\n".join(lines) + "\n"


def load_lock(root: Path) -> Lock:
    """``root/ocibuild.lock``, or an empty Lock when there is none; LockError when it cannot be read."""
    path = root / LOCK_FILE
    if not path.exists():
        return Lock()
    try:
        data = read_toml(path)
    except OSError as err:
        raise LockError(f"{LOCK_FILE}: cannot read: {err.strerror}", "fix it, or delete it and run `ocibuild lock`"
                        ) from None
    except ValueError as err:
        raise LockError(f"{LOCK_FILE}: malformed TOML: {err}", "fix it, or delete it and run `ocibuild lock`") from None
    if data.get("version") != 1 or not isinstance(data.get("layers", {}), dict):
        raise LockError(f"{LOCK_FILE}: unknown lock format", "delete it and run `ocibuild lock`")
    entries = {}
    for name, value in data.get("layers", {}).items():
        try:
            platform = Platform.parse(str(value["platform"])) if "platform" in value else None
            entries[name] = LockEntry(name, str(value["source"]), Digest.parse(value["digest"]), platform)
        except (KeyError, TypeError, ValueError, FormatError) as err:
            raise LockError(f"{LOCK_FILE}: entry for layer '{name}' is malformed ({err})",
                            "delete it and run `ocibuild lock`") from None
    return Lock(entries)
