"""`ocibuild explain LAYER`: the key document of a layer compared with the one its last entry recorded, on copy
layers built into a store (run layers, and the registry cache, are in tests/integration)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from ocibuild import cli, oci
from ocibuild.recipe.key import Difference, differences
from ocibuild.store import Store
from ocibuild.store.entries import LABEL_PREFIX, entries_of

SRC = 'kind = "copy"\nfrom = "src"\nto = "/src"\n'
TOOLS = 'kind = "copy"\nfrom = "tools"\nto = "/tools"\nneeds = ["src"]\n'


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert cli.main(list(argv)) == 0
    return capsys.readouterr().out


def _explain(capsys: pytest.CaptureFixture[str], root: Path, store: Store, layer: str) -> dict[str, Any]:
    return json.loads(_run(capsys, "explain", layer, "-C", str(root), "--store", str(store.root), "--json",
                           "--offline"))


@pytest.fixture
def built(make_project, store: Store, capsys: pytest.CaptureFixture[str]) -> Path:
    root = make_project({"src": SRC, "tools": TOOLS}, files={"src/main.go": "package main\n", "tools/lint": "x\n"})
    _run(capsys, "build", "-C", str(root), "--store", str(store.root))
    return root


def test_a_cached_layer_says_so(built: Path, store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    doc = _explain(capsys, built, store, "tools")
    assert (doc["status"], doc["compared"], doc["differences"]) == ("cached", None, [])
    text = _run(capsys, "explain", "tools", "-C", str(built), "--store", str(store.root))
    assert text.startswith("layer 'tools' is cached (key sha256:") and "nothing to explain" in text


def test_a_changed_input_is_named(built: Path, store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    [(tag, _)] = entries_of(store, "tools")
    (built / "tools/lint").write_text("changed\n")
    doc = _explain(capsys, built, store, "tools")
    assert doc["status"] == "build" and doc["compared"]["where"] == "store" and doc["compared"]["recorded"]
    [diff] = doc["differences"]
    assert (diff["what"], diff["name"]) == ("input", "tools") and diff["before"] != diff["now"]
    assert doc["compared"]["tag"] == tag and tag.endswith(doc["compared"]["key"][7:])
    text = _run(capsys, "explain", "tools", "-C", str(built), "--store", str(store.root), "--offline")
    assert "compared with its entry in the store" in text and "the last one added" in text
    assert [line.split()[:2] for line in text.splitlines()[1:]] == [["input", "tools"]]


def test_a_changed_recipe_field_is_named(built: Path, store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    (built / "layers/tools/layer.toml").write_text(TOOLS + 'owner = "1000:1000"\nexclude = ["*.log"]\n')
    doc = _explain(capsys, built, store, "tools")
    assert [(d["what"], d["name"], d["before"], d["now"]) for d in doc["differences"]] == [
        ("recipe", "exclude", [], ["*.log"]), ("recipe", "owner", "0:0", "1000:1000")]


def test_a_changed_need_is_named_with_its_status(built: Path, store: Store,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    (built / "src/main.go").write_text("package main // changed\n")
    doc = _explain(capsys, built, store, "tools")
    [diff] = doc["differences"]
    assert (diff["what"], diff["name"], diff["status"]) == ("need", "src", "build")
    text = _run(capsys, "explain", "tools", "-C", str(built), "--store", str(store.root), "--offline")
    assert "need     src" in text and "(not cached either: `ocibuild explain src`)" in text
    # and the need itself names its changed input
    assert [(d["what"], d["name"]) for d in _explain(capsys, built, store, "src")["differences"]] == [
        ("input", "src")]


def test_the_last_entry_added_is_the_one_compared(built: Path, store: Store,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    (built / "tools/lint").write_text("second\n")
    _run(capsys, "build", "-C", str(built), "--store", str(store.root))
    (built / "tools/lint").write_text("third\n")
    doc = _explain(capsys, built, store, "tools")
    assert doc["compared"]["tag"] == entries_of(store, "tools")[-1][0]
    (built / "tools/lint").write_text("x\n")  # the first version again: cached
    assert _explain(capsys, built, store, "tools")["status"] == "cached"


def test_a_layer_never_built_says_so(built: Path, store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    (built / "ocibuild.toml").write_text('[image]\nname = "dev"\nlayers = ["src", "tools", "docs"]\n')
    (built / "layers/docs").mkdir()
    (built / "layers/docs/layer.toml").write_text('kind = "copy"\nfrom = "docs"\nto = "/docs"\n')
    (built / "docs").mkdir()
    doc = _explain(capsys, built, store, "docs")
    assert (doc["status"], doc["compared"], doc["differences"]) == ("build", None, [])
    text = _run(capsys, "explain", "docs", "-C", str(built), "--store", str(store.root), "--offline")
    assert "has no entry of that name to compare with: it was never built here" in text


def test_an_unknown_layer_is_a_usage_error(built: Path, store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["explain", "tool", "-C", str(built), "--store", str(store.root)]) == 2
    assert "no layer 'tool'" in capsys.readouterr().err


def test_an_entry_made_before_documents_were_recorded_is_compared_by_its_inputs(
        built: Path, store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    [(tag, config)] = entries_of(store, "tools")
    labels = {k: v for k, v in config.labels.items() if k not in (LABEL_PREFIX + "document", LABEL_PREFIX + "needs")}
    old = oci.ImageConfig(diff_ids=config.diff_ids, architecture=config.architecture, labels=labels)
    manifest = store.get_manifest(store.resolve(tag).digest)
    config_descriptor = store.put(old.to_json(), oci.OCI_CONFIG)
    store.tag(tag, store.put_manifest(oci.Manifest(config_descriptor, manifest.layers)))
    (built / "tools/lint").write_text("changed\n")
    doc = _explain(capsys, built, store, "tools")
    assert doc["compared"]["recorded"] is False
    assert [(d["what"], d["name"]) for d in doc["differences"]] == [("input", "tools")]
    assert store.verify() == []


def test_differences_of_two_documents() -> None:
    before = {"format": 3, "kind": "run", "epoch": 0, "platform": {"os": "linux", "architecture": "amd64"},
              "recipe": {"script": "s.sh", "env": {}, "network": True},
              "inputs": [{"name": "layers/a/s.sh", "digest": "sha256:1"}, {"name": "layers/a/old", "digest": "x"}],
              "needs": ["sha256:base1", "sha256:go1"]}
    now = {"format": 4, "kind": "run", "epoch": 0, "platform": {"os": "linux", "architecture": "arm64"},
           "recipe": {"script": "s.sh", "env": {"A": "1"}, "network": True, "new": 1},
           "inputs": [{"name": "layers/a/s.sh", "digest": "sha256:2"}, {"name": "layers/a/new", "digest": "y"}],
           "needs": ["sha256:base1", "sha256:go2"]}
    assert differences(before, ["base", "go"], now, ["base", "go"]) == [
        Difference("format", None, 3, 4),
        Difference("recipe", "env", {}, {"A": "1"}), Difference("recipe", "new", None, 1),
        Difference("input", "layers/a/s.sh", "sha256:1", "sha256:2"), Difference("input", "layers/a/old", "x", None),
        Difference("input", "layers/a/new", None, "y"),
        Difference("need", "go", "sha256:go1", "sha256:go2"),
        Difference("platform", None, "linux/amd64", "linux/arm64"),
    ]
    # needs renamed or reordered: compared by name; without names (or with names that do not fit), by position
    assert differences({"needs": ["k1", "k2"]}, ["a", "b"], {"needs": ["k2", "k1"]}, ["b", "a"]) == []
    assert differences({"needs": ["k1"]}, [], {"needs": ["k2"]}, ["a"]) == [Difference("need", "#1", "k1", None),
                                                                         Difference("need", "a", None, "k2")]
    assert differences({"merge": ["k1"]}, [], {"merge": ["k2"]}, []) == [Difference("merge", None, ["k1"], ["k2"])]
