"""`ocibuild run` and `ocibuild shell` end to end against a recording stand-in of the engine: the options
(-e, -v, --privileged), the `[run]` section (env, pass_env, mounts, caches, privileged) and the command line the
engine gets, for podman and nerdctl. nerdctl cannot be installed here (it is not packaged in Debian): its
command lines are only checked this way; podman's also for real in tests/integration/test_compile_loop.py."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from ocibuild.cli import main
from ocibuild.cli.dispatch import parser
from ocibuild.cli.run import SHELL, compile_env
from ocibuild.engine import Engine
from ocibuild.recipe.project import RunSpec
from ocibuild.store import Store
from test_engine import stand_in

COPY = 'kind = "copy"\nfrom = "src"\nto = "/src"\n'
RUN = """
[run]
command = ["make"]
mounts = ["out:/out"]
env = { A = "1", B = "from-recipe" }
pass_env = ["BUILDFLAGS", "UNSET_ONE"]
caches = ["/root/.cache/go-build"]
"""


@pytest.fixture
def project(make_project, tmp_path: Path) -> Path:
    return make_project({"src": COPY}, image='workdir = "/src"\n' + RUN, files={"src/main.c": "int main;\n"})


class HandedOver(BaseException):
    """The engine took over the process: here it ran as a child, and its exit code ends `main` (a BaseException,
    as SystemExit: an exec ends the program, it is no failure `main` reports)."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def ocibuild(argv: list[str]) -> int:
    """`main(argv)`, whose process the engine takes over (exec) in `run` and `shell`: its exit code."""
    try:
        return main(argv)
    except HandedOver as handed:
        return handed.code


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The stand-ins first on PATH; a private runtime directory; the host variables the tests pass; the exec that
    hands the process over to the engine runs it as a child instead (see :func:`ocibuild`)."""

    def execvp(file: str, argv: list[str]) -> None:
        try:
            raise HandedOver(subprocess.run(argv, env=os.environ, timeout=60).returncode)
        finally:  # a real exec leaves no process behind; this one goes on running tests, SIGPIPE ignored again
            for sig in (signal.SIGPIPE, signal.SIGXFSZ):
                signal.signal(sig, signal.SIG_IGN)

    monkeypatch.setattr(os, "execvp", execvp)
    for name in ("podman", "nerdctl"):
        stand_in(tmp_path, name)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    monkeypatch.setenv("OCIBUILD_CONFIG", str(tmp_path / "no-config.toml"))
    monkeypatch.setenv("BUILDFLAGS", "-tags secret")
    monkeypatch.setenv("HOSTVAR", "h")
    monkeypatch.delenv("UNSET_ONE", raising=False)
    monkeypatch.delenv("ALSO_UNSET", raising=False)
    return tmp_path


def engine_lines(tmp_path: Path, name: str) -> list[str]:
    log = tmp_path / f"{name}.log"
    return log.read_text().splitlines() if log.exists() else []


def cache_dir(store: Store, root: Path, engine: str, path: str) -> Path:
    short = lambda text: hashlib.sha256(text.encode()).hexdigest()[:16]  # noqa: E731
    return store.root / "ocibuild" / "caches" / short(str(root)) / engine / short(path)


def image_id(store: Store) -> str:
    return store.get_manifest(store.resolve("dev").digest).config.digest.hex


@pytest.mark.parametrize("name", ["podman", "nerdctl"])
def test_shell_command_line(env: Path, project: Path, store: Store, name: str) -> None:
    outside = env / "elsewhere"
    outside.mkdir()
    code = ocibuild(["shell", "-C", str(project), "--store", str(store.root), "--engine", name, "-e", "B=2",
                 "-e", "HOSTVAR", "-e", "ALSO_UNSET", "-v", f"{outside}:/data:ro"])
    assert code == 0
    cache = cache_dir(store, project, name, "/root/.cache/go-build")
    assert cache.is_dir() and (project / "out").is_dir()
    assert engine_lines(env, name)[-1] == (
        f"run --rm --pull=never -i -v {project}/out:/out -v {cache}:/root/.cache/go-build -v {outside}:/data:ro "
        f"-e A=1 -e B=2 -e BUILDFLAGS -e HOSTVAR -w /src {image_id(store)} {' '.join(SHELL)}")


def test_shell_on_a_terminal_gets_one(env: Path, project: Path, store: Store,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stdin.isatty", lambda: True)
    assert ocibuild(["shell", "-C", str(project), "--store", str(store.root), "--engine", "podman"]) == 0
    assert " --pull=never -i -t -v " in engine_lines(env, "podman")[-1]


@pytest.mark.parametrize("name", ["podman", "nerdctl"])
def test_run_command_line_with_privileged_and_command(env: Path, project: Path, store: Store, name: str) -> None:
    code = ocibuild(["run", "-C", str(project), "--store", str(store.root), "--engine", name, "--privileged",
                 "--", "sh", "-c", "x", "--", "y"])
    assert code == 0
    line = engine_lines(env, name)[-1]
    assert line.startswith("run --rm --pull=never --privileged -v ")
    assert line.endswith(f"-w /src {image_id(store)} sh -c x -- y")  # only the first "--" is ocibuild's
    assert " -i " not in line  # stdin is not a terminal


def test_user_volume_replaces_a_recipe_mount_and_must_exist(env: Path, project: Path, store: Store,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    mine = env / "mine"
    mine.mkdir()
    assert ocibuild(["run", "-C", str(project), "--store", str(store.root), "--engine", "podman",
                 "-v", f"{mine}:/out/"]) == 0
    line = engine_lines(env, "podman")[-1]
    assert f"-v {mine}:/out/ " in line and f"{project}/out:/out" not in line
    before = len(engine_lines(env, "podman"))
    code = ocibuild(["run", "-C", str(project), "--store", str(store.root), "--engine", "podman",
                 "-v", f"{env / 'missing'}:/x"])
    assert code == 125
    err = capsys.readouterr().err
    assert f"error: -v {env / 'missing'}:/x: {env / 'missing'} does not exist" in err and "hint: " in err
    assert len(engine_lines(env, "podman")) == before  # nothing ran the second time


@pytest.mark.parametrize("where", ["flag", "recipe"])
def test_privileged_is_refused_when_rootless(env: Path, project: Path, store: Store, where: str,
                                             monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(Engine, "rootless", property(lambda self: True))
    if where == "recipe":
        with (project / "ocibuild.toml").open("a") as f:
            f.write("privileged = true\n")
    code = ocibuild(["run", "-C", str(project), "--store", str(store.root), "--engine", "podman",
                 *(["--privileged"] if where == "flag" else [])])
    assert code == 125
    err = capsys.readouterr().err.splitlines()
    assert err[-2] == ("error: --privileged cannot work with rootless podman: the container gets no more rights "
                       "than your own user")
    assert err[-1].startswith("hint: run this step as root")
    assert not any(" run " in f" {line}" for line in engine_lines(env, "podman"))


def test_gc_caches_removes_and_names_them(env: Path, project: Path, store: Store,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert ocibuild(["shell", "-C", str(project), "--store", str(store.root), "--engine", "podman"]) == 0
    cache = cache_dir(store, project, "podman", "/root/.cache/go-build")
    (cache / "objects").mkdir()
    (cache / "objects" / "a.o").write_bytes(b"x" * 1000)
    capsys.readouterr()
    assert main(["gc", "--store", str(store.root), "--json"]) == 0
    assert "caches" not in json.loads(capsys.readouterr().out) and cache.is_dir()
    assert main(["gc", "--store", str(store.root), "--caches", "--json"]) == 0
    [entry] = json.loads(capsys.readouterr().out)["caches"]
    assert entry["project"] == str(project) and entry["engine"] == "podman"
    assert entry["path"] == "/root/.cache/go-build" and entry["bytes"] >= 1000
    assert not cache.exists() and not any((store.root / "ocibuild" / "caches").iterdir())
    assert main(["gc", "--store", str(store.root), "--caches"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "no caches to remove"


def test_gc_caches_prints_what_it_removed(env: Path, project: Path, store: Store,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert ocibuild(["shell", "-C", str(project), "--store", str(store.root), "--engine", "nerdctl"]) == 0
    capsys.readouterr()
    assert main(["gc", "--store", str(store.root), "--caches"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith(
        f"removed the cache /root/.cache/go-build of {project} (nerdctl), ")


def test_environment_precedence() -> None:
    run = RunSpec(("make",), (), {"A": "recipe", "B": "recipe", "C": "recipe"}, "auto",
                  pass_env=("B", "C", "GONE"))
    host = {"B": "host", "PATH": "/bin", "D": "host"}
    env = compile_env(run, [("C", "flag"), ("D", None), ("E", None), ("A", "")], host)
    # recipe env, then pass_env by name (C and GONE unset on the host: kept / skipped), then -e
    assert env == {"A": "", "B": None, "C": "flag", "D": None}


@pytest.mark.parametrize("argv", [["run", "-e", "1X"], ["run", "-e", "=v"], ["run", "-v", "/a"],
                                  ["run", "-v", "/a:rel"], ["shell", "-v", "/a:/b:rw:x"], ["shell", "-v", "/a:/b:z"],
                                  ["shell", "--", "true"]])
def test_bad_options_are_usage_errors(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        parser().parse_args(argv)
    assert info.value.code == 2


def test_options_parse(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    args = parser().parse_args(["run", "-e", "A", "--env", "B=x=y", "-v", "rel:/r", "--volume", "~/k:/k:ro",
                                "--privileged", "make"])
    assert args.env == [("A", None), ("B", "x=y")]
    assert args.volume == [(tmp_path / "rel", "/r", False), (Path.home() / "k", "/k", True)]
    assert args.privileged and args.cmd == ["make"]


@pytest.mark.parametrize("name", ["podman", "nerdctl"])
def test_the_image_is_loaded_under_its_name_once_then_asked_about_only(env: Path, project: Path, store: Store,
                                                                       name: str) -> None:
    """The first run loads the image and names it after [image] name and the store; a no-op run asks the engine
    one question (does it hold that id?) and runs. nerdctl's command lines are checked as argv only."""
    argv = ["run", "-C", str(project), "--store", str(store.root), "--engine", name, "--", "true"]
    assert ocibuild(argv) == 0
    image, tag = image_id(store), hashlib.sha256(str(store.root).encode()).hexdigest()[:12]
    lines = engine_lines(env, name)
    if name == "podman":
        assert lines[:5] == [f"image exists {image}", f"pull --quiet oci:{store.root}:dev",
                             f"image inspect --format {{{{json .RepoTags}}}} {image}",
                             f"tag {image} localhost/dev:{tag}", "ps --all --format json --filter name=^ocibuild\\-"]
    else:
        archive = lines[1].split()[-1]
        assert lines[:2] == [f"image inspect {image}", f"load --input {archive}"]
        assert Path(archive).parent.parent == store.root / "ocibuild" / "tmp" and not Path(archive).parent.exists()
    assert lines[-1].startswith("run --rm --pull=never ") and lines[-1].endswith(f" {image} true")
    assert ocibuild(argv) == 0
    question = "image exists" if name == "podman" else "image inspect"
    assert engine_lines(env, name)[len(lines):] == [f"{question} {image}", lines[-1]]


def test_source_mount_runs_the_stack_without_the_copy_layers_it_mounts(make_project) -> None:
    from ocibuild.cli.run import _without_mounted
    from ocibuild.recipe.project import load_project

    root = make_project({"base": 'kind = "copy"\nfrom = "rootfs"\nto = "/"\n', "src": COPY,
                         "docs": 'kind = "copy"\nfrom = "docs"\nto = "/docs"\n',
                         "gen": 'kind = "run"\nscript = "gen.sh"\nneeds = ["base", "docs"]\n'},
                        image='workdir = "/src"\nenv = { A = "1" }\n', files={"layers/gen/gen.sh": "true\n"})
    project = load_project(root)
    mounted = _without_mounted(project)
    assert mounted.layer_names == ("base", "docs", "gen")  # docs is mounted too, but gen needs it
    assert mounted.image.layers == mounted.layer_names and mounted.image.name == "dev-source-mount"
    assert (mounted.image.workdir, mounted.image.env) == (project.image.workdir, project.image.env)


def test_gc_leaves_an_engine_storage_that_is_gone_alone(env: Path, store: Store, capsys: pytest.CaptureFixture[str]
                                                        ) -> None:
    """gc asks each engine a record names, except one whose storage (--root) was removed: asking podman would make
    it again, and nothing of ours can be left there."""
    for root in (env / "gone", env):
        args = ["--root", str(root)]
        record = hashlib.sha256(json.dumps(["podman", *args]).encode()).hexdigest()[:16]
        (store.private_dir("engine") / f"{record}.json").write_text(json.dumps(
            {"engine": "podman", "args": args, "images": {}, "stale": ["ab" * 32]}))
    assert main(["gc", "--store", str(store.root), "--json"]) == 0
    asked = engine_lines(env, "podman")
    assert f"--root {env} rmi {'ab' * 32}" in asked and not (env / "gone").exists()
    assert all(line.startswith(f"--root {env} ") for line in asked)
    assert json.loads(capsys.readouterr().out)["engine"] == [
        {"engine": "podman", "kind": "image", "id": "ab" * 32, "names": []}]
