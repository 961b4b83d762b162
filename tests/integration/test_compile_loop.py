"""Docker's own compile loop with real podman: host variables passed by name (`[run] pass_env`, `-e`), the user's
own `-v` of any host path (and a recipe's refused outside the project), `--privileged`, `ocibuild shell` with
stdin not a terminal, and `[run] caches` kept between compile steps until `gc --caches`.

Containers run on a podman storage of the test's own (test_golden's ``own_podman``): the host's podman storage
is left as it was. Rootless (privileged refused, caches written by a container's other users removed) is in
test_rootless.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import run_ocibuild
from test_golden import own_podman  # noqa: F401 (a fixture)
from test_run_layers import project as busybox_project

pytestmark = pytest.mark.podman

RUN = """[run]
command = ["sh", "-c", "echo compiled"]
mounts = ["out:/out"]
env = { MODE = "recipe" }
pass_env = ["BUILDFLAGS", "UNSET_ONE"]
caches = ["/root/.cache/go-build"]
network = false
"""


@pytest.fixture
def loop(tmp_path: Path, own_podman: dict[str, str]) -> tuple[Path, list[str], dict[str, str]]:  # noqa: F811
    """A busybox project with a source tree; the ocibuild arguments that name it and the store; the environment."""
    root = busybox_project(tmp_path, {"src": 'kind = "copy"\nfrom = "src"\nto = "/src"\n'},
                           {"src/main.go": "package main\n"}, image='workdir = "/src"\n', run=RUN)
    env = {**own_podman, "BUILDFLAGS": "-tags netgo", "HOSTVAR": "from-host"}
    return root, ["-C", str(root), "--store", str(tmp_path / "store")], env


def test_variables_by_name_and_the_users_own_volume(tmp_path: Path, loop: tuple[Path, list[str], dict[str, str]]
                                                    ) -> None:
    root, where, env = loop
    outside = tmp_path / "outside"  # not in the project: only the command line may mount it
    outside.mkdir()
    ran = run_ocibuild("run", *where, "-e", "HOSTVAR", "-e", "MODE=flag", "-e", "ALSO_UNSET",
                       "-v", f"{outside}:/outside", "--", "sh", "-c",
                       'echo "$BUILDFLAGS|${UNSET_ONE-unset}|$HOSTVAR|$MODE|${ALSO_UNSET-unset}" | tee /outside/r',
                       env=env)
    assert ran.stdout.strip() == "-tags netgo|unset|from-host|flag|unset"
    assert (outside / "r").read_text().strip() == ran.stdout.strip()
    readonly = run_ocibuild("run", *where, "-v", f"{outside}:/outside:ro", "--", "sh", "-c", "echo x > /outside/r",
                            env=env, ok=False)
    assert readonly.returncode != 0 and (outside / "r").read_text().startswith("-tags")

    (root / "ocibuild.toml").write_text((root / "ocibuild.toml").read_text().replace(
        '"out:/out"', '"../outside:/outside"'))
    refused = run_ocibuild("run", *where, env=env, ok=False)
    assert refused.returncode == 125 and "leaves the project directory" in refused.stderr


def test_privileged_gets_every_capability(loop: tuple[Path, list[str], dict[str, str]]) -> None:
    _, where, env = loop
    caps = "grep CapEff /proc/self/status"
    plain = int(run_ocibuild("run", *where, "--", "sh", "-c", caps, env=env).stdout.split()[1], 16)
    privileged = int(run_ocibuild("run", *where, "--privileged", "--", "sh", "-c", caps, env=env).stdout.split()[1], 16)
    assert privileged & plain == plain and privileged > plain


def test_shell_reads_commands_from_stdin(loop: tuple[Path, list[str], dict[str, str]]) -> None:
    _, where, env = loop
    ran = run_ocibuild("shell", *where, env=env, stdin='echo hi; echo "$MODE $BUILDFLAGS"; pwd\n'
                       'grep -q " /out " /proc/mounts && grep -q " /root/.cache/go-build " /proc/mounts && echo mounted\n')
    assert ran.stdout.splitlines() == ["hi", "recipe -tags netgo", "/src", "mounted"]
    failed = run_ocibuild("shell", *where, stdin="exit 3\n", env=env, ok=False)
    assert failed.returncode == 3


def test_caches_persist_between_compile_steps_until_gc(loop: tuple[Path, list[str], dict[str, str]]) -> None:
    root, where, env = loop
    step = ("sh", "-c", "cat /root/.cache/go-build/stamp 2>/dev/null || echo cold; "
                        "echo warm > /root/.cache/go-build/stamp")
    assert run_ocibuild("run", *where, "--", *step, env=env).stdout.strip() == "cold"
    assert run_ocibuild("run", *where, "--", *step, env=env).stdout.strip() == "warm"
    caches = [p for p in (Path(where[3]) / "ocibuild" / "caches").rglob("stamp")]
    assert len(caches) == 1 and caches[0].parent.parent.name == "podman"
    store = where[2:]
    removed = json.loads(run_ocibuild("gc", *store, "--caches", "--json", env=env).stdout)
    assert [(c["project"], c["engine"], c["path"]) for c in removed["caches"]] == \
        [(str(root), "podman", "/root/.cache/go-build")]
    assert run_ocibuild("run", *where, "--", *step, env=env).stdout.strip() == "cold"
    run_ocibuild("verify", *store, env=env)
