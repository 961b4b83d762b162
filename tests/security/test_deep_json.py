"""JSON nested 100,000 deep (json.loads raised RecursionError on it) at every entry point that reads JSON from
outside: an ``oci:`` base's index.json, an ``oci-archive:`` base and ``ocibuild import`` (index.json, or a manifest
inside), an inventory given to ``export --since``, an auth file. Each is one clean error naming the document; the
registry's documents are in test_hostile_registry.py. Then the depth scan itself, held to a reference reader."""

from __future__ import annotations

import io
import json
import random
import tarfile
from pathlib import Path

import pytest

from ocibuild import cli, oci
from ocibuild.errors import FormatError, RegistryError
from ocibuild.net.auth import Credentials, find_credentials, save_credentials
from ocibuild.oci import JSON_DEPTH, Digest, parse_json
from ocibuild.store import Store

DEEP = b"[" * 100_000 + b"]" * 100_000
LAYOUT = b'{"imageLayoutVersion":"1.0.0"}'


def _layout_files(index: bytes, blobs: dict[Digest, bytes] | None = None) -> dict[str, bytes]:
    files = {"oci-layout": LAYOUT, "index.json": index}
    files.update({f"blobs/sha256/{digest.hex}": data for digest, data in (blobs or {}).items()})
    return files


def _tar(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _index_of(data: bytes, media_type: str = oci.OCI_MANIFEST) -> bytes:
    descriptor = oci.Descriptor(media_type, Digest.of(data), len(data), annotations={oci.ANNOTATION_REF_NAME: "v1"})
    return oci.Index((descriptor,)).to_json()


def _refused(argv: list[str], capsys: pytest.CaptureFixture[str], names: str) -> None:
    """The command fails with one error line naming ``names`` and the depth, and no traceback."""
    capsys.readouterr()
    assert cli.main(argv) == 1
    out = capsys.readouterr()
    errors = [line for line in out.err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and names in errors[0] and "nested more than 100 levels deep" in errors[0], out.err
    assert "Traceback" not in out.err + out.out


def test_an_oci_base_whose_index_json_is_nested_100000_deep(make_project, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    root = make_project({"base": 'kind = "image"\nref = "oci:layout:v1"\n'})
    for name, data in _layout_files(DEEP).items():
        (root / "layers/base/layout" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "layers/base/layout" / name).write_bytes(data)
    _refused(["build", "-C", str(root), "--store", str(tmp_path / "store")], capsys, "layout/index.json")


@pytest.mark.parametrize("inside", ["index.json", "manifest"])
def test_an_oci_archive_base_nested_100000_deep(make_project, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                capsys: pytest.CaptureFixture[str], inside: str) -> None:
    root = make_project({"base": 'kind = "image"\nref = "oci-archive:base.tar:v1"\n'})
    files = _layout_files(DEEP) if inside == "index.json" else _layout_files(_index_of(DEEP), {Digest.of(DEEP): DEEP})
    _tar(root / "layers/base/base.tar", files)
    _refused(["build", "-C", str(root), "--store", str(tmp_path / "store")], capsys, "base.tar")
    assert list(Store.open(tmp_path / "store").blobs()) == []


@pytest.mark.parametrize("inside", ["index.json", "manifest", "index"])
def test_an_import_nested_100000_deep(tmp_path: Path, capsys: pytest.CaptureFixture[str], inside: str) -> None:
    if inside == "index.json":
        files = _layout_files(DEEP)
    else:
        kind = oci.OCI_MANIFEST if inside == "manifest" else oci.OCI_INDEX
        files = _layout_files(_index_of(DEEP, kind), {Digest.of(DEEP): DEEP})
    archive = _tar(tmp_path / "deep.tar", files)
    store = tmp_path / "store"
    _refused(["import", "--store", str(store), str(archive)], capsys, "deep.tar")
    assert list(Store.open(store).blobs()) == [] and Store.open(store).verify() == []


def test_an_inventory_nested_100000_deep(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inventory = tmp_path / "inventory.json"
    inventory.write_bytes(DEEP)
    _refused(["export", "--store", str(tmp_path / "store"), "--since", str(inventory), str(tmp_path / "out.tar")],
             capsys, str(inventory))
    assert not (tmp_path / "out.tar").exists()


def test_an_auth_file_nested_100000_deep_is_neither_read_nor_rewritten(tmp_path: Path) -> None:
    config = tmp_path / "docker/config.json"
    config.parent.mkdir()
    config.write_bytes(b'{"auths": ' + DEEP + b"}")
    env = {"HOME": str(tmp_path), "DOCKER_CONFIG": str(config.parent)}
    for call in (lambda: find_credentials("registry.example.com", env),
                 lambda: save_credentials("registry.example.com", Credentials("me", "secret"), env)):
        with pytest.raises(RegistryError, match=rf"^{config}: the auth file is nested more than 100 levels deep"):
            call()
    assert config.read_bytes() == b'{"auths": ' + DEEP + b"}"


# ---- the depth scan ---------------------------------------------------------------------------------------------

def _reference_depth(data: bytes) -> int:
    """How deep brackets outside strings nest, read byte by byte as a JSON reader does."""
    depth = deepest = 0
    in_string = escaped = False
    for byte in data:
        if in_string:
            if escaped:
                escaped = False
            elif byte == ord("\\"):
                escaped = True
            elif byte == ord('"'):
                in_string = False
        elif byte == ord('"'):
            in_string = True
        elif byte in b"[{":
            depth += 1
            deepest = max(deepest, depth)
        elif byte in b"]}":
            depth -= 1
    return deepest


def test_the_depth_limit_counts_only_brackets_outside_strings() -> None:
    at_limit = b'{"a":' * (JSON_DEPTH - 1) + b"[]" + b"}" * (JSON_DEPTH - 1)
    assert parse_json(at_limit, "doc") is not None
    strings = json.dumps({"a": ["[[[[" * 100, "\\\"{{{{" * 100, "]]]]" * 100], "b": [[1]]}).encode()
    assert parse_json(strings, "doc")["b"] == [[1]], "brackets in strings, escaped quotes and backslashes"
    with pytest.raises(FormatError, match=r"^doc is nested more than 100 levels deep; refused$") as caught:
        parse_json(b"[" + at_limit + b"]", "doc")
    assert "hostile" in (caught.value.hint or "")
    hidden = b'["' + b"]" * 200 + b'", ' + b"[" * 150 + b"]" * 150 + b"]"
    with pytest.raises(FormatError, match="nested more than 100"):
        parse_json(hidden, "doc")  # closing brackets inside a string do not hide the depth after it


def test_the_depth_scan_agrees_with_a_reference_reader() -> None:
    """Random texts of brackets and strings (holding brackets, escaped quotes and backslashes), around the limit:
    refused exactly when a reader going byte by byte finds them deeper than the limit."""
    rng = random.Random(12)
    contents = [b"[", b"]", b"{", b"}", b"a", b'\\"', b"\\\\", b"\\n"]

    def token() -> bytes:
        if rng.random() < 0.6:
            return rng.choice([b"[", b"]", b"{", b"}", b"1", b","])
        return b'"' + b"".join(rng.choice(contents) for _ in range(rng.randint(0, 5))) + b'"'

    for _ in range(3000):
        text = b"[" * rng.randint(70, 110) + b"".join(token() for _ in range(rng.randint(0, 60)))
        try:
            parse_json(text, "doc")
            refused = False
        except FormatError as err:
            refused = "nested more than" in str(err)
        assert refused == (_reference_depth(text) > JSON_DEPTH), text


def test_a_document_larger_than_its_bound_is_refused() -> None:
    with pytest.raises(FormatError, match=r"^doc is 13 bytes, more than the 12 a JSON document may have here$"):
        parse_json(b'{"a": "1234"}', "doc", limit=12)
