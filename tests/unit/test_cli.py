"""The command line's conventions, through ``ocibuild.cli.main``: global options on either side of the command,
the cache reference of push-cache and pull-cache, help written for users, and `build LAYER…`."""

from __future__ import annotations

import errno
import json
import logging
from pathlib import Path

import pytest

from conftest import ProjectFactory
from ocibuild import cli
from ocibuild.cli.dispatch import COMMANDS, parser
from ocibuild.store import Store


def _copy_project(make_project: ProjectFactory) -> Path:
    return make_project({"base": 'kind = "copy"\nfrom = "base"\nto = "/"\n',
                         "app": 'kind = "copy"\nfrom = "app"\nto = "/app"\nneeds = ["base"]\n'},
                        files={"base/etc/motd": "hello\n", "app/main.c": "int main(void) { return 0; }\n"})


# ---- global options: before the command (as `git -C`, `podman --root`) and after it, with the same meaning -------


def _argv(position: str, options: list[str], command: list[str]) -> list[str]:
    return [*options, *command] if position == "before" else [*command, *options]


@pytest.mark.parametrize("position", ["before", "after"])
def test_project_directory_option_on_either_side(position: str, make_project: ProjectFactory, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    root = _copy_project(make_project)
    monkeypatch.chdir(tmp_path)  # `.` is no project: only -C finds it
    store = str(tmp_path / "store")
    assert cli.main(_argv(position, ["-C", str(root)], ["plan", "--json", "--store", store])) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["image"] == "dev" and [l["name"] for l in plan["layers"]] == ["base", "app"]


@pytest.mark.parametrize("position", ["before", "after"])
def test_store_option_on_either_side(position: str, make_project: ProjectFactory, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    root = _copy_project(make_project)
    monkeypatch.setenv("OCIBUILD_STORE", str(tmp_path / "not-this-one"))
    store = tmp_path / "store"
    assert cli.main(_argv(position, ["--store", str(store)], ["build", "-C", str(root)])) == 0
    assert Store.open(store).resolve("dev") is not None
    assert not (tmp_path / "not-this-one").exists()


@pytest.mark.parametrize("position", ["before", "after", None])
def test_debug_option_on_either_side(position: str | None, tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    """--debug shows the traceback of an error (logged before the error: and hint: lines)."""
    command = ["plan", "-C", str(tmp_path / "no-project"), "--store", str(tmp_path / "s")]
    argv = command if position is None else _argv(position, ["--debug"], command)
    with caplog.at_level(logging.DEBUG):
        assert cli.main(argv) == 1
    tracebacks = [r for r in caplog.records if r.exc_info is not None]
    assert len(tracebacks) == (0 if position is None else 1)
    assert capsys.readouterr().err.startswith("error: ")


def test_all_global_options_before_the_command(make_project: ProjectFactory, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """`ocibuild -C DIR --store S build` was a usage error."""
    root = _copy_project(make_project)
    store = tmp_path / "store"
    assert cli.main(["-C", str(root), "--store", str(store), "--debug", "build", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["digest"] == str(Store.open(store).resolve("dev").digest)


def test_global_option_after_the_command_wins_over_one_before() -> None:
    args = parser().parse_args(["-C", "first", "--store", "s1", "build", "-C", "second"])
    assert (args.project, args.store, args.debug) == ("second", "s1", False)
    args = parser().parse_args(["build"])
    assert (args.project, args.store, args.debug) == (".", None, False)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_takes_the_global_options_on_either_side(command: str) -> None:
    needs = {"push": ["R"], "login": ["R"], "export": ["P"], "import": ["P"], "explain": ["L"]}.get(command, [])
    for argv in (["-C", "d", "--store", "s", "--debug", command, *needs],
                 [command, *needs, "-C", "d", "--store", "s", "--debug"]):
        args = parser().parse_args(argv)
        assert (args.command, args.project, args.store, args.debug) == (command, "d", "s", True)


# ---- push-cache REF and pull-cache REF --------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["push-cache", "pull-cache"])
def test_cache_commands_take_the_reference_as_an_argument(command: str) -> None:
    assert parser().parse_args([command, "registry.example/team/cache"]).ref == "registry.example/team/cache"
    args = parser().parse_args([command, "--cache", "registry.example/other"])  # --cache stays: a contract
    assert args.ref is None and "registry.example/other" in (getattr(args, "cache", None),
                                                            getattr(args, "cache_option", None))


@pytest.mark.parametrize("command", ["push-cache", "pull-cache"])
def test_cache_commands_without_a_reference_say_how_to_give_one(command: str, make_project: ProjectFactory,
                                                                tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    root = _copy_project(make_project)
    assert cli.main([command, "-C", str(root), "--store", str(tmp_path / "s")]) == 1
    err = capsys.readouterr().err
    assert f"error: {command}: no cache repository given" in err
    assert f"hint: run `ocibuild {command} REGISTRY/REPOSITORY`, or set [cache] ref" in err


# ---- help -------------------------------------------------------------------------------------------------------


def test_help_describes_the_tool_and_its_common_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "only module that prints" not in out and "The command line:" not in out
    assert "ocibuild builds a project's development environment as explicit OCI layers" in out
    for common in ("ocibuild plan", "ocibuild build", "ocibuild run", "ocibuild push-cache REF",
                   "ocibuild pull-cache REF"):
        assert common in out
    assert "before or after the command" in out


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_help_says_what_it_does(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    out = capsys.readouterr().out
    assert f"\nocibuild {command}: " in out, out


# ---- build LAYER…: those layers and what they need, no image ---------------------------------------------------


def _chain_project(make_project: ProjectFactory) -> Path:
    """base ← go ← tools (each needs the one before), and src on its own."""
    return make_project({"base": 'kind = "copy"\nfrom = "base"\nto = "/"\n',
                         "go": 'kind = "copy"\nfrom = "go"\nto = "/usr/local/go"\nneeds = ["base"]\n',
                         "tools": 'kind = "copy"\nfrom = "tools"\nto = "/usr/local/bin"\nneeds = ["go"]\n',
                         "src": 'kind = "copy"\nfrom = "src"\nto = "/src"\n'},
                        files={"base/etc/motd": "hello\n", "go/VERSION": "go1.19\n", "tools/lint": "#!/bin/sh\n",
                               "src/main.go": "package main\n"})


def test_build_layers_builds_them_and_what_they_need_transitively_and_no_image(
        make_project: ProjectFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _chain_project(make_project)
    store_dir = tmp_path / "store"
    assert cli.main(["build", "tools", "--json", "-C", str(root), "--store", str(store_dir)]) == 0
    doc = json.loads(capsys.readouterr().out)
    # the shape of `build --json`: only the selected layers (and their needs) are listed, and no image was made
    assert sorted(doc) == ["digest", "image", "layers"] and doc["image"] == "dev" and doc["digest"] is None
    assert [(l["name"], l["status"]) for l in doc["layers"]] == [("base", "built"), ("go", "built"),
                                                                 ("tools", "built")]
    assert [sorted(l) for l in doc["layers"]] == [["inputs", "key", "kind", "name", "needs", "status"]] * 3
    store = Store.open(store_dir)
    assert store.resolve("dev") is None
    tags = sorted((d.ref_name or "").split("-")[0] for d in store.index().manifests)
    assert tags == ["base", "go", "tools"]

    # the whole build then finds them cached and builds only the rest
    assert cli.main(["build", "--json", "-C", str(root), "--store", str(store_dir)]) == 0
    full = json.loads(capsys.readouterr().out)
    assert [(l["name"], l["status"]) for l in full["layers"]] == [("base", "cached"), ("go", "cached"),
                                                                  ("tools", "cached"), ("src", "built")]
    assert [l["key"] for l in full["layers"][:3]] == [l["key"] for l in doc["layers"]]
    assert full["digest"] == str(store.resolve("dev").digest)
    assert store.verify() == []


def test_build_layers_lists_them_on_stdout(make_project: ProjectFactory, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    root = _chain_project(make_project)
    assert cli.main(["-C", str(root), "--store", str(tmp_path / "s"), "build", "src", "go"]) == 0
    out = capsys.readouterr().out
    assert [line.split()[0] for line in out.splitlines()] == ["base", "go", "src"]
    assert all(line.split()[3] == "built" for line in out.splitlines())


def test_build_unknown_layers_is_a_usage_error_naming_them(make_project: ProjectFactory, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    root = _chain_project(make_project)
    store_dir = tmp_path / "store"
    assert cli.main(["build", "tools", "nope", "lvm", "-C", str(root), "--store", str(store_dir)]) == 2
    err = capsys.readouterr().err
    assert "error: build: no layer 'nope', 'lvm' in ocibuild.toml" in err
    assert "hint: the layers are: base, go, tools, src" in err
    assert Store.open(store_dir).index().manifests == ()  # nothing was built


@pytest.mark.parametrize("option", [["--output", "oci-archive:out.tar"], ["--strict"]])
def test_build_layers_refuses_the_options_of_the_image(option: list[str], make_project: ProjectFactory,
                                                       tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _chain_project(make_project)
    assert cli.main(["build", "go", *option, "-C", str(root), "--store", str(tmp_path / "s")]) == 2
    assert f"{option[0]} concerns the image" in capsys.readouterr().err


@pytest.mark.parametrize("error, line, hint", [
    (OSError(errno.ENOSPC, "No space left on device", "/s/blobs/x"), "error: No space left on device: /s/blobs/x",
     "free disk space and inodes"),
    (OSError(errno.EACCES, "Permission denied", "/s"), "error: Permission denied: /s", "check the permissions"),
    (OSError(errno.EIO, "Input/output error"), "error: Input/output error", "again with --debug"),
    (MemoryError(), "error: out of memory", "(--jobs)"),
    (RecursionError("maximum recursion depth exceeded"), "error: an input is nested too deeply to be read",
     "again with --debug"),
    (KeyError("layers"), "error: internal error: KeyError: 'layers'", "this is a bug in ocibuild"),
])
def test_an_exception_no_module_translated_is_one_error_line_and_a_hint(
        error: Exception, line: str, hint: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        caplog: pytest.LogCaptureFixture) -> None:
    """A full disk met where no module translated the OSError, memory, a recursion: exit 1 with an error line and
    a hint, as for our own errors; the traceback only with --debug."""
    def fail(args: object) -> int:
        raise error

    monkeypatch.setitem(COMMANDS, "plan", fail)
    assert cli.main(["plan"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and err[0] == line and err[1].startswith("hint: ") and hint in err[1], err
    with caplog.at_level(logging.DEBUG):
        assert cli.main(["plan", "--debug"]) == 1
    assert [record.exc_info[1] for record in caplog.records if record.exc_info] == [error]
