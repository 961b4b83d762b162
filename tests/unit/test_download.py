"""Inputs by path or file URL (no network): verified in place; a missing download under --offline is an error."""

from __future__ import annotations

from pathlib import Path

import pytest

from ocibuild.errors import FetchError
from ocibuild.inputs import hash_file
from ocibuild.net.download import fetch_file
from ocibuild.oci import Digest
from ocibuild.store import Store


def test_fetch_verifies_local_files(tmp_path: Path, store: Store) -> None:
    f = tmp_path / "go.tar.gz"
    f.write_bytes(b"tarball")
    good = Digest.from_hex(hash_file(f))
    assert fetch_file(str(f), good, store, what="layer 'go'") == f
    with pytest.raises(FetchError, match="has sha256"):
        fetch_file(str(f), Digest.from_hex("0" * 64), store, what="layer 'go'")
    with pytest.raises(FetchError, match="not in the download cache"):
        fetch_file("https://example.invalid/x.tar", Digest.from_hex("0" * 64), store, offline=True, what="layer 'go'")


def test_file_urls_are_verified_in_place_and_the_cache_is_asked_first(tmp_path: Path, store: Store) -> None:
    f = tmp_path / "with space.tar"
    f.write_bytes(b"archive")
    digest = Digest.of(b"archive")
    assert fetch_file(f"file://{str(f).replace(' ', '%20')}", digest, store, what="layer 'x'") == f
    with pytest.raises(FetchError, match="not found"):
        fetch_file(f"file://{tmp_path}/missing.tar", digest, store, what="layer 'x'")
    cached = store.private_dir("downloads") / digest.hex
    cached.write_bytes(b"archive")
    assert fetch_file("https://example.invalid/x.tar", digest, store, offline=True, what="layer 'x'") == cached
