"""A project's recipe may not mount anything outside the project (a cloned repository must not mount ~/.ssh into
a container it controls); the user's own `-v` may mount any host path."""

from __future__ import annotations

from pathlib import Path

import pytest

from ocibuild.cli.dispatch import parser
from ocibuild.errors import RecipeError
from ocibuild.recipe.project import load_project

COPY = 'kind = "copy"\nfrom = "src"\nto = "/app"\n'


@pytest.fixture
def secrets(tmp_path: Path) -> Path:
    """A stand-in for ~/.ssh beside the project."""
    ssh = tmp_path / "home" / ".ssh"
    ssh.mkdir(parents=True)
    (ssh / "id_ed25519").write_text("PRIVATE KEY\n")
    return ssh


@pytest.mark.parametrize("mount", ["{ssh}:/ssh", "../home/.ssh:/ssh", "sub/../../home/.ssh:/ssh:ro",
                                   "link:/ssh", "inner/link:/ssh", "link/id_ed25519:/k", "..:/up", "/:/host"])
def test_recipe_mount_outside_the_project_is_refused(make_project, secrets: Path, mount: str) -> None:
    root = make_project({"a": COPY}, image=f'[run]\nmounts = ["{mount.format(ssh=secrets)}"]\n')
    (root / "sub").mkdir()
    (root / "link").symlink_to(secrets)
    (root / "inner").mkdir()
    (root / "inner" / "link").symlink_to("../../home/.ssh")
    with pytest.raises(RecipeError) as info:
        load_project(root)
    assert "leaves the project directory" in str(info.value)


def test_recipe_mount_inside_the_project_is_kept(make_project, secrets: Path) -> None:
    root = make_project({"a": COPY}, image='[run]\nmounts = ["out:/out", "inside:/i", "./a/../b:/b:ro"]\n')
    (root / "inside").symlink_to("layers")  # a symlink that stays inside is fine
    mounts = load_project(root).run.mounts
    assert [(m.host, m.container, m.read_only) for m in mounts] == [
        ("out", "/out", False), ("layers", "/i", False), ("b", "/b", True)]


def test_the_users_own_volume_may_mount_any_host_path(secrets: Path) -> None:
    args = parser().parse_args(["run", "-v", f"{secrets}:/root/.ssh:ro", "-v", "/:/host"])
    assert args.volume == [(secrets, "/root/.ssh", True), (Path("/"), "/host", False)]
