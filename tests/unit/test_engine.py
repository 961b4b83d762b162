"""Engine command lines. nerdctl cannot be installed here (it is not packaged in Debian), so its command lines
are checked against a recording stand-in on PATH; podman's are checked the same way and, for real, in
tests/integration."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import write
from ocibuild.engine import BindMount, Engine, created_mount_points, remove_mount_points
from ocibuild.errors import EngineError, StepFailed

RECORDER = """#!/bin/sh
printf '%s\\n' "$*" >> "{log}"
case "$*" in
  *"image inspect --format"*) echo '{names}' ;;
  *"image exists"*|*"image inspect"*) test -e "{log}.loaded"; exit $? ;;
  *" pull "*|pull\\ *|*" load "*|load\\ *) touch "{log}.loaded" ;;
  *" run "*|run\\ *) echo "line from the container"; exit {code} ;;
esac
exit 0
"""


def stand_in(tmp_path: Path, name: str, code: int = 0, names: str = "[]") -> tuple[Path, Path]:
    """A recording stand-in of the engine: each command line appended to the log; it holds an image once
    something was pulled or loaded; ``image inspect --format`` prints ``names``."""
    log = tmp_path / f"{name}.log"
    tool = write(tmp_path / "bin" / name, RECORDER.format(log=log, code=code, names=names), mode=0o755)
    return tool, log


@pytest.mark.parametrize("name", ["nerdctl", "podman"])
def test_compile_step_command_line(tmp_path: Path, name: str) -> None:
    """Only built, not run: nerdctl is not installed here, so its command line is checked as argv only."""
    engine = Engine(name, ["--namespace", "ci"] if name == "nerdctl" else ["--runtime", "runc"],
                    executable=f"/usr/bin/{name}")
    argv = engine.run_command_line("img", ["hack/make.sh", "binary"],
                                   mounts=[BindMount(Path("/p/bundles"), "/go/src/x/bundles")],
                                   env={"CGO_ENABLED": "1"}, workdir="/go/src/x", interactive=False)
    flags = ["--namespace", "ci"] if name == "nerdctl" else ["--runtime", "runc"]
    assert argv == [f"/usr/bin/{name}", *flags, "run", "--rm", "--pull=never", "-v", "/p/bundles:/go/src/x/bundles",
                    "-e", "CGO_ENABLED=1", "-w", "/go/src/x", "img", "hack/make.sh", "binary"]
    offline = engine.run_command_line("img", ["true"], mounts=[], env={}, workdir=None, interactive=False,
                                      network=False)
    assert offline[len(flags) + 1:] == ["run", "--rm", "--pull=never", "--network=none", "img", "true"]


@pytest.mark.parametrize("name", ["nerdctl", "podman"])
def test_compile_step_privileged_terminal_and_variables_by_name(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A variable passed by name is on the command line as -e NAME only: the engine reads it from its environment
    (a secret stays off the command line)."""
    monkeypatch.setattr(Engine, "rootless", property(lambda self: False))
    engine = Engine(name, executable=name)
    argv = engine.run_command_line("img", ["bash"], mounts=[], env={"A": "1", "TOKEN": None}, workdir=None,
                                   interactive=True, tty=True, privileged=True)
    assert argv == [name, "run", "--rm", "--pull=never", "--privileged", "-i", "-t", "-e", "A=1", "-e", "TOKEN",
                    "img", "bash"]
    monkeypatch.setattr(Engine, "rootless", property(lambda self: True))
    with pytest.raises(EngineError, match="cannot work with rootless"):
        engine.run_command_line("img", ["bash"], mounts=[], env={}, workdir=None, interactive=True, privileged=True)


HANDED = """
import os, sys
from ocibuild.engine import Engine
print(os.getpid(), flush=True)
print("buffered, flushed before the exec", end="\\n")
Engine("podman", executable=sys.argv[1]).hand_over([sys.argv[1], "run", "x"])
"""


def test_hand_over_becomes_the_engine_with_default_signals(tmp_path: Path) -> None:
    """exec: the same process, the engine's own output and exit code, SIGPIPE not ignored (Python ignores it)."""
    tool = write(tmp_path / "podman", "#!/bin/sh\necho $$\ngrep SigIgn /proc/$$/status\nexit 7\n", mode=0o755)
    ran = subprocess.run([sys.executable, "-c", HANDED, str(tool)], capture_output=True, text=True, timeout=60)
    ours, flushed, engine_pid, ignored = ran.stdout.splitlines()
    assert ran.returncode == 7 and ours == engine_pid and flushed.startswith("buffered")
    assert not int(ignored.split()[1], 16) & (1 << (signal.SIGPIPE - 1))


SUPERVISED = """
import sys
from ocibuild.engine import Engine
code = Engine("podman", executable=sys.argv[1]).supervise([sys.argv[1]], after=lambda: print("after", flush=True))
print("code", code, flush=True)
"""


def test_supervise_forwards_a_signal_sent_to_ocibuild_and_cleans_up_after(tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    tool = write(tmp_path / "podman", f"#!/bin/sh\ntrap 'echo got TERM; exit 5' TERM\ntouch {ready}\n"
                                      "while :; do sleep 0.05; done\n", mode=0o755)
    process = subprocess.Popen([sys.executable, "-c", SUPERVISED, str(tool)], stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)  # to ocibuild alone, as `kill PID` does
    out, _ = process.communicate(timeout=60)
    assert out.splitlines() == ["got TERM", "after", "code 5"] and process.returncode == 0


def test_supervise_reports_a_signal_death_as_128_plus_n(tmp_path: Path) -> None:
    tool = write(tmp_path / "podman", "#!/bin/sh\nkill -KILL $$\n", mode=0o755)
    ran = subprocess.run([sys.executable, "-c", SUPERVISED, str(tool)], capture_output=True, text=True, timeout=60)
    assert ran.stdout.splitlines() == ["after", "code 137"]


def test_mount_points_made_inside_a_mounted_host_tree_are_found_and_removed(tmp_path: Path) -> None:
    src, bundles, deep = tmp_path / "src", tmp_path / "bundles", tmp_path / "deep"
    for d in (src, bundles, deep, src / "present"):
        d.mkdir()
    mounts = [BindMount(bundles, "/go/src/x/bundles"), BindMount(src, "/go/src/x/"), BindMount(deep, "/go/src/x/a/b"),
              BindMount(tmp_path / "cache", "/root/.cache"), BindMount(deep, "/go/src/x/present"),
              BindMount(tmp_path / "f", "/go/src/x/bundles/file")]  # inside bundles, the innermost mount around it
    created = created_mount_points(mounts)
    assert created == [src / "bundles", src / "a", bundles / "file", src / "a" / "b"]
    (src / "a" / "b").mkdir(parents=True)
    (src / "bundles").mkdir()
    (bundles / "file").touch()
    (src / "bundles" / "written").touch()  # something wrote there meanwhile: it stays
    remove_mount_points(created)
    assert sorted(p.name for p in src.iterdir()) == ["bundles", "present"] and not (bundles / "file").exists()
def test_rootless_is_an_ordinary_user_or_podman_unshare(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    tool, _ = stand_in(tmp_path, "podman")
    engine = Engine("podman", executable=str(tool))
    monkeypatch.delenv("_CONTAINERS_USERNS_CONFIGURED", raising=False)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert not engine.rootless
    engine.check_privileged()
    monkeypatch.setenv("_CONTAINERS_USERNS_CONFIGURED", "1")
    assert engine.rootless
    monkeypatch.delenv("_CONTAINERS_USERNS_CONFIGURED")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert engine.rootless


def test_nerdctl_loads_an_archive_and_podman_copies_from_the_layout(tmp_path: Path) -> None:
    """podman names an image pulled from a layout after the layout's path: that name goes, the name asked for
    comes, and another name the image has stays. nerdctl's command lines are checked as argv only."""
    made = []

    def archive() -> Path:
        made.append(tmp_path / "image.tar")
        return made[-1]

    tool, log = stand_in(tmp_path, "nerdctl")
    engine = Engine("nerdctl", executable=str(tool))
    assert engine.load_from_layout(tmp_path / "store", "docker-dev", "ab" * 32, "localhost/docker-dev:1", archive) \
        == "ab" * 32
    assert log.read_text().splitlines() == [f"image inspect {'ab' * 32}", f"load --input {tmp_path / 'image.tar'}"]
    assert made
    by_path = f"localhost{tmp_path / 'store'}:latest"
    ptool, plog = stand_in(tmp_path, "podman", names=f'["{by_path}", "mine:1"]')
    podman = Engine("podman", executable=str(ptool))
    podman.load_from_layout(tmp_path / "store", "docker-dev", "cd" * 32, "localhost/docker-dev:1", archive)
    assert plog.read_text().splitlines() == [
        f"image exists {'cd' * 32}", f"pull --quiet oci:{tmp_path / 'store'}:docker-dev",
        f"image inspect --format {{{{json .RepoTags}}}} {'cd' * 32}", f"untag {'cd' * 32} {by_path}",
        f"tag {'cd' * 32} localhost/docker-dev:1"]
    podman.load_from_layout(tmp_path / "store", "docker-dev", "cd" * 32, "localhost/docker-dev:2", archive)
    assert plog.read_text().splitlines()[-2:] == [f"image exists {'cd' * 32}",
                                                  f"tag {'cd' * 32} localhost/docker-dev:2"]


def test_run_step_command_line_and_failure(tmp_path: Path) -> None:
    tool, log = stand_in(tmp_path, "nerdctl", code=3)
    engine = Engine("nerdctl", executable=str(tool))
    lines: list[str] = []
    with pytest.raises(StepFailed) as info:
        engine.run("img", ["/bin/sh", "-eu", "/ocibuild/script"], name="ocibuild-go-1",
                   mounts=[BindMount(Path("/l/go/install.sh"), "/ocibuild/script", True)], env={"A": "1"},
                   workdir="/", network=False, output=lines.append, what="layer 'go'")
    assert info.value.exit_code == 3 and "layer 'go': exited 3" in str(info.value)
    assert lines == ["line from the container"]
    argv = log.read_text().splitlines()[-1]
    assert argv.startswith("container run ") or argv.startswith("run ")
    for part in ("--name ocibuild-go-1", "--network none", "--pull never", "--volume /l/go/install.sh:/ocibuild/script:ro",
                 "--env A=1", "--workdir /", "img /bin/sh -eu /ocibuild/script"):
        assert part in argv, (part, argv)
    with pytest.raises(EngineError, match="run layers need podman"):
        engine.diff("ocibuild-go-1")


def test_no_engine_installed_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(EngineError) as info:
        Engine.detect("auto")
    assert "no container engine found" in str(info.value) and "apt-get install podman" in (info.value.hint or "")


def test_engine_that_fails_to_start_is_a_clear_error(tmp_path: Path) -> None:
    tool = write(tmp_path / "bin/podman", "#!/bin/sh\necho 'Error: cannot set up namespace' >&2\nexit 125\n", mode=0o755)
    with pytest.raises(EngineError) as info:
        Engine("podman", executable=str(tool)).run("img", ["true"], output=lambda line: None, what="layer 'x'")
    assert "could not start the container" in str(info.value) and "cannot set up namespace" in str(info.value)


def test_podman_gets_a_nameable_path_for_a_store_under_dot_cache(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """podman 4.3 names an image pulled from oci:PATH after PATH, and refuses '.cache' or capitals in it."""
    from ocibuild.engine import podman_layout_path

    plain = tmp_path / "store"
    assert podman_layout_path(plain) == plain
    runtime = tmp_path / "run"
    runtime.mkdir()
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    store = tmp_path / ".cache" / "ocibuild" / "Store"
    alias = podman_layout_path(store)
    assert alias.parent == runtime / f"ocibuild-{os.getuid()}" and os.readlink(alias) == str(store)
    assert podman_layout_path(store) == alias  # the same alias again
    (runtime / f"ocibuild-{os.getuid()}").chmod(0o777)
    with pytest.raises(EngineError, match="not a private directory"):
        podman_layout_path(store)


def test_layers_staging_at_once_make_the_alias_of_a_store_together(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Two run layers of one build stage at the same moment, the first time the store needs an alias: each
    thread makes its own temporary link (both reach the rename before either renames)."""
    import threading

    from ocibuild import engine

    runtime = tmp_path / "run"
    runtime.mkdir()
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    store = tmp_path / ".cache" / "ocibuild" / "store"
    both = threading.Barrier(2, timeout=30)
    replace = os.replace

    def meeting(src: str, dst: str) -> None:
        both.wait()
        replace(src, dst)

    monkeypatch.setattr(engine.os, "replace", meeting)
    found: list[Path | Exception] = []

    def stage() -> None:
        try:
            found.append(engine.podman_layout_path(store))
        except EngineError as err:
            found.append(err)

    threads = [threading.Thread(target=stage) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(found) == 2 and found[0] == found[1] and os.readlink(found[0]) == str(store), found


def test_a_stopping_build_kills_its_container_at_once_and_tolerates_it_gone(tmp_path: Path) -> None:
    """SIGKILL (podman kill's default), not rm --force, which waits ten seconds for a shell that ignores SIGTERM."""
    tool, log = stand_in(tmp_path, "podman")
    Engine("podman", executable=str(tool)).kill_container("ocibuild-go-1")
    assert log.read_text().splitlines()[-1].endswith("kill ocibuild-go-1")
    failing = write(tmp_path / "bin" / "failing", "#!/bin/sh\necho 'no such container' >&2\nexit 125\n", mode=0o755)
    Engine("podman", executable=str(failing)).kill_container("ocibuild-go-1")  # already gone: nothing to do


def test_untag_of_a_name_another_staging_already_dropped_is_no_error(tmp_path: Path) -> None:
    """Two layers staged at once pull the same stack: both see podman's name for the layout, and the second
    untag finds it gone ("tag not known"). That is no error; any other failure of untag is."""
    tool = write(tmp_path / "bin" / "podman", "#!/bin/sh\necho \"Error: $3: tag not known\" >&2\nexit 125\n",
                 mode=0o755)
    Engine("podman", executable=str(tool)).untag("ab" * 32, ["localhost/tmp/store:latest"])
    broken = write(tmp_path / "bin2" / "podman", "#!/bin/sh\necho 'Error: storage is read-only' >&2\nexit 125\n",
                   mode=0o755)
    with pytest.raises(EngineError, match="untag abababababab localhost/tmp/store:latest failed: .*read-only"):
        Engine("podman", executable=str(broken)).untag("ab" * 32, ["localhost/tmp/store:latest"])


def test_containers_removed_in_the_background_are_gone_once_waited_for(tmp_path: Path) -> None:
    """A finished run layer's container is removed on a thread while the build goes on; wait_removals (which
    every build calls before it returns) returns only once the engine has removed each."""
    log = tmp_path / "removed"
    tool = write(tmp_path / "bin" / "podman", f"#!/bin/sh\nsleep 0.5\necho \"$*\" >> {log}\n", mode=0o755)
    engine = Engine("podman", executable=str(tool))
    engine.remove_container_later("ocibuild-a-1")
    engine.remove_container_later("ocibuild-b-1")
    engine.wait_removals()
    assert sorted(log.read_text().splitlines()) == ["container rm --force ocibuild-a-1",
                                                    "container rm --force ocibuild-b-1"]
