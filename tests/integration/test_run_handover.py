"""`ocibuild run` with real podman: the process handed over to the engine (its exit code and output), a no-op
run without python-on-whales, `--source-mount` building no copy layer and leaving nothing in the host tree, the
image named after `[image] name` replacing the one before it, and `gc` removing what ocibuild left in podman.

Everything runs on the session's own podman storage (conftest's ``podman_storage``, named by OCIBUILD_CONFIG)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import Podman, PodmanStorage, run_ocibuild
from test_run_layers import project as busybox_project

pytestmark = pytest.mark.podman

WORKDIR = "/go/src/x"
SOURCE = f'kind = "copy"\nfrom = "src"\nto = "{WORKDIR}"\nneeds = ["base"]\n'
RUN = '[run]\ncommand = ["true"]\nmounts = ["bundles:/go/src/x/bundles"]\nnetwork = false\n'


@pytest.fixture
def where(tmp_path: Path) -> list[str]:
    """A busybox project whose source (src/, no bundles/ in it) is copied to the workdir, as Docker's is, and
    whose [run] mounts bundles/ inside it; the arguments that name it and its store. Its source names the test, so
    its image is the test's own (the session's podman storage is shared)."""
    root = busybox_project(tmp_path, {"src": SOURCE}, {"src/main.go": f"package main // {tmp_path.name}\n"},
                           image=f'workdir = "{WORKDIR}"\n', run=RUN)
    return ["-C", str(root), "--store", str(tmp_path / "store")]


def engine_name(where: list[str], name: str = "bb") -> str:
    return f"localhost/{name}:{hashlib.sha256(where[3].encode()).hexdigest()[:12]}"


def edit(where: list[str]) -> None:
    with open(Path(where[1]) / "src" / "main.go", "a") as f:
        f.write("// edited\n")


def images_named(podman: Podman, name: str) -> dict[str, list[str]]:
    """The images with the name ``name`` (repository and tag): id → all its names."""
    listed = json.loads(podman("images", "--format", "json").stdout)
    return {image["Id"]: image["Names"] for image in listed if name in (image.get("Names") or ())}


def image_exists(podman: Podman, image_id: str) -> bool:
    return podman("images", "--quiet", "--no-trunc", "--filter", f"id={image_id}").stdout.strip() != ""


def test_run_hands_over_the_process_exit_code_and_output(where: list[str]) -> None:
    """While the command runs, the process `ocibuild run` started is podman itself (exec), and its exit code
    and output are the command's."""
    run_ocibuild("run", *where)  # loads the image: the next run is a no-op
    argv = [sys.executable, "-m", "ocibuild.cli", "run", *where, "--", "sh", "-c",
            "echo out; read line; echo err >&2; exit 7"]
    process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    assert process.stdout is not None and process.stdin is not None
    assert process.stdout.readline() == "out\n"  # the container runs, waiting for a line
    running = Path(f"/proc/{process.pid}/cmdline").read_bytes().split(b"\0")
    out, err = process.communicate("go\n", timeout=120)
    assert Path(running[0].decode()).name == "podman" and b"run" in running
    assert process.returncode == 7 and out == "" and err.splitlines()[-1] == "err"


def test_a_no_op_run_imports_no_python_on_whales(where: list[str]) -> None:
    def run() -> str:
        argv = [sys.executable, "-X", "importtime", "-m", "ocibuild.cli", "run", *where, "--", "true"]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr
        return result.stderr

    assert "python_on_whales" in run()  # the first run loads the image: a management call
    again = run()
    assert "| ocibuild.cli" in again and "python_on_whales" not in again


def test_source_mount_builds_no_copy_layer_and_sees_the_live_tree(where: list[str]) -> None:
    root = Path(where[1])
    run_ocibuild("build", *where)
    (root / "src" / "main.go").write_text("package main // edited\n")
    tags = json.loads((Path(where[3]) / "index.json").read_text())["manifests"]
    ran = run_ocibuild("run", *where, "--source-mount", "--", "cat", f"{WORKDIR}/main.go")
    assert ran.stdout == "package main // edited\n" and "building layer" not in ran.stderr
    plan = json.loads(run_ocibuild("plan", *where, "--json").stdout)
    assert {layer["name"]: layer["status"] for layer in plan["layers"]} == {"base": "cached", "src": "build"}
    after = json.loads((Path(where[3]) / "index.json").read_text())["manifests"]
    new = [m["annotations"]["org.opencontainers.image.ref.name"] for m in after if m not in tags]
    assert new == ["bb-source-mount"]  # the image without the source layer; no cache entry of 'src'


def test_source_mount_leaves_no_mount_point_in_the_host_tree(where: list[str]) -> None:
    root = Path(where[1])
    ran = run_ocibuild("run", *where, "--source-mount", "--", "sh", "-c",
                       "test -d bundles && echo built > bundles/out && echo ok; exit 3", ok=False)
    assert ran.returncode == 3 and ran.stdout.splitlines() == ["ok"]
    assert (root / "bundles" / "out").read_text() == "built\n"
    assert sorted(p.name for p in (root / "src").iterdir()) == ["main.go"]


def test_a_rebuilt_image_replaces_the_previous_one(where: list[str], podman: Podman) -> None:
    name = engine_name(where)
    run_ocibuild("run", *where)
    [first] = images_named(podman, name)
    edit(where)
    run_ocibuild("run", *where)
    named = images_named(podman, name)
    assert list(named.values()) == [[name]] and first not in named and not image_exists(podman, first)


def test_gc_removes_stale_engine_images_and_stopped_containers(where: list[str], podman: Podman,
                                                              podman_storage: PodmanStorage) -> None:
    """An image a container still uses stays when a new one replaces it; gc removes it once only the stopped
    container of an ocibuild process that is gone uses it (that container first), and nothing else."""
    name = engine_name(where)
    run_ocibuild("run", *where)
    [first] = images_named(podman, name)
    dead = subprocess.Popen(["true"])
    dead.wait()
    leftover = f"ocibuild-x-{'a' * 12}-{dead.pid}"
    try:
        podman("create", "--name", "holder", first, "true")
        edit(where)
        run_ocibuild("run", *where)
        [second] = images_named(podman, name)
        assert image_exists(podman, first)  # the holder uses it
        podman("rm", "holder")
        podman("create", "--name", leftover, first, "true")
        podman("create", "--name", "ocibuild-not-ours", second, "true")
        removed = json.loads(run_ocibuild("gc", "--store", where[3], "--json").stdout)["engine"]
        assert [(r["kind"], r["id"]) for r in removed] == [("container", leftover), ("image", first)]
        assert not image_exists(podman, first) and image_exists(podman, second)
        assert "ocibuild-not-ours" in podman("ps", "--all", "--format", "{{.Names}}").stdout.split()
        assert json.loads(run_ocibuild("gc", "--store", where[3], "--json").stdout)["engine"] == []
    finally:
        for container in ("holder", leftover, "ocibuild-not-ours"):
            subprocess.run(["podman", *podman_storage.flags, "rm", "--force", container], capture_output=True,
                           timeout=120)


def test_stages_go_when_the_image_is_loaded_and_gc_removes_a_leftover(tmp_path: Path, podman: Podman) -> None:
    """A run layer's stage stays after the build (a rebuild of the layer reuses it), goes when `run` loads the
    image, and a stage a killed build never retired is removed by gc, by its name."""
    tool = 'kind = "run"\nscript = "tool.sh"\nneeds = ["base"]\n'
    root = busybox_project(tmp_path, {"tool": tool}, {"layers/tool/tool.sh": "echo 1 > /opt-tool\n",
                                                      "rootfs/etc/test": f"{tmp_path.name}\n"})  # the test's own base
    where = ["-C", str(root), "--store", str(tmp_path / "store")]
    stage_prefix = f"localhost/ocibuild-stage:{hashlib.sha256(where[3].encode()).hexdigest()[:12]}-"

    def stages() -> list[str]:
        listed = json.loads(podman("images", "--format", "json").stdout)
        return [image["Id"] for image in listed if any(n.startswith(stage_prefix) for n in image.get("Names") or ())]

    run_ocibuild("build", *where)
    [stage] = stages()
    run_ocibuild("run", *where, "--", "true")
    assert stages() == [] and not image_exists(podman, stage)

    (root / "layers/tool/tool.sh").write_text("echo 2 > /opt-tool\n")
    run_ocibuild("build", *where)
    [record] = (tmp_path / "store" / "ocibuild" / "engine").glob("*.json")
    doc = json.loads(record.read_text())
    record.write_text(json.dumps({**doc, "stale": []}))  # as if the build was killed before it retired the stage
    removed = json.loads(run_ocibuild("gc", "--store", where[3], "--json").stdout)["engine"]
    assert [(r["kind"], r["id"]) for r in removed] == [("image", stage)] and stages() == []


def test_an_image_two_stores_share_goes_only_when_neither_names_it(tmp_path: Path, podman: Podman) -> None:
    """Two checkouts of one project build the same images: each names the run image and the stage of its run
    layer; loading a new image in one only takes that one's names off, and an image goes when neither names it."""
    tool = 'kind = "run"\nscript = "tool.sh"\nneeds = ["base"]\n'
    roots = [busybox_project(tmp_path / side, {"tool": tool, "src": SOURCE},
                             {"src/main.go": "package main\n", "layers/tool/tool.sh": "echo 1 > /opt-tool\n",
                              "rootfs/etc/test": f"{tmp_path.name}\n"}, image=f'workdir = "{WORKDIR}"\n', run=RUN)
             for side in ("a", "b")]
    wheres = [["-C", str(root), "--store", str(root.parent / "store")] for root in roots]
    stage_names = [f"localhost/ocibuild-stage:{engine_name(w).split(':')[1]}-" for w in wheres]

    def named(*prefixes: str) -> dict[str, list[str]]:
        """The images with a name of these stores starting so (the session's storage is shared): id → those names."""
        listed = json.loads(podman("images", "--format", "json").stdout)
        return {i["Id"]: sorted(n for n in i.get("Names") or () if n.startswith(prefixes)) for i in listed
                if any(n.startswith(prefixes) for n in i.get("Names") or ())}

    for where in wheres:
        run_ocibuild("build", *where)
    [(stage, both)] = named(*stage_names).items()
    assert len(both) == 2
    run_ocibuild("run", *wheres[0])  # a's stage is stale: only its name goes
    assert named(*stage_names) == {stage: [n for n in both if n.startswith(stage_names[1])]}
    run_ocibuild("run", *wheres[1])
    [shared] = images_named(podman, engine_name(wheres[0]))
    assert not image_exists(podman, stage) and named(*map(engine_name, wheres)) == {
        shared: sorted(map(engine_name, wheres))}
    for where in wheres:
        edit(where)
        run_ocibuild("run", *where)
    assert not image_exists(podman, shared)
