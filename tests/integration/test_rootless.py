"""Rootless: an ordinary user with subuid/subgid entries builds a small environment (busybox base, a run layer,
a copy layer) with rootless podman, and runs the compile step; outputs belong to that user."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

from conftest import require
from test_run_layers import busybox_rootfs

pytestmark = [pytest.mark.podman,
              pytest.mark.skipif(os.geteuid() != 0, reason="creating the unprivileged test user needs root")]
USER = "ocibuild-rootless"


@pytest.fixture(scope="module")
def user() -> pwd.struct_passwd:
    require("newuidmap")
    try:
        entry = pwd.getpwnam(USER)
    except KeyError:
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", USER], check=True)
        entry = pwd.getpwnam(USER)
    for file, flag in (("/etc/subuid", "--add-subuids"), ("/etc/subgid", "--add-subgids")):
        if not any(line.startswith(f"{USER}:") for line in Path(file).read_text().splitlines()):
            subprocess.run(["usermod", flag, "200000-265535", USER], check=True)
    runtime = Path(f"/run/user/{entry.pw_uid}")
    runtime.mkdir(parents=True, exist_ok=True)
    os.chown(runtime, entry.pw_uid, entry.pw_gid)
    runtime.chmod(0o700)
    return entry


@pytest.fixture(scope="module")
def python_path(user: pwd.struct_passwd) -> str:
    """ocibuild and its libraries where the user can read them: the checkout (and its venv) may sit in a
    directory only root can enter, as CI's does. The venv is made from /usr/bin/python3, so the copies run
    under it; the copied site-packages is on PYTHONPATH, so its editable-install hook is not loaded."""
    base = Path(f"/tmp/ocibuild-rootless-code-{os.getpid()}")
    shutil.rmtree(base, ignore_errors=True)
    shutil.copytree(Path(__file__).resolve().parents[2] / "src", base / "src")
    shutil.copytree(sysconfig.get_paths()["purelib"], base / "site", symlinks=True)
    subprocess.run(["chmod", "-R", "a+rX", str(base)], check=True)
    yield f"{base / 'src'}:{base / 'site'}"
    shutil.rmtree(base, ignore_errors=True)


def as_user(user: pwd.struct_passwd, cwd: Path, python_path: str, *args: str,
            config: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {"HOME": user.pw_dir, "XDG_RUNTIME_DIR": f"/run/user/{user.pw_uid}", "PATH": os.environ["PATH"],
           "LANG": "C.UTF-8", "PYTHONPATH": python_path}
    if config is not None:
        env["OCIBUILD_CONFIG"] = str(config)
    return subprocess.run(["runuser", "-u", user.pw_name, "--", "/usr/bin/python3", "-m", "ocibuild.cli", *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


def storage_flags(base: Path) -> list[str]:
    """A podman storage of the test's own under ``base`` (the user's own storage is left as it was)."""
    return ["--root", str(base / "podman/root"), "--runroot", str(base / "podman/run"),
            "--tmpdir", str(base / "podman/tmp")]


def own_storage(base: Path) -> Path:
    """An ocibuild config under ``base`` whose engine uses :func:`storage_flags`."""
    config = base / "ocibuild-config.toml"
    config.write_text(f"[engine]\nargs = {json.dumps(storage_flags(base))}\n")
    return config


def remove(user: pwd.struct_passwd, base: Path, store: str) -> None:
    """The test's storage (with its containers and images) and store: files under subordinate ids are removed
    inside the user's namespace."""
    podman = ["runuser", "-u", user.pw_name, "--", "podman", *storage_flags(base)]
    for args in (["rm", "--all", "--force"], ["rmi", "--all", "--force"],
                 ["unshare", "rm", "-rf", store, str(base / "podman")]):
        subprocess.run([*podman, *args], cwd="/tmp", capture_output=True, timeout=300,
                       env={"HOME": user.pw_dir, "XDG_RUNTIME_DIR": f"/run/user/{user.pw_uid}",
                            "PATH": os.environ["PATH"]})
    shutil.rmtree(base, ignore_errors=True)


def test_rootless_build_and_run(user: pwd.struct_passwd, python_path: str) -> None:
    base = Path(f"/tmp/ocibuild-rootless-{os.getpid()}")
    shutil.rmtree(base, ignore_errors=True)
    project = base / "project"
    busybox_rootfs(project / "rootfs")
    (project / "layers/base").mkdir(parents=True)
    (project / "layers/base/layer.toml").write_text('kind = "copy"\nfrom = "rootfs"\nto = "/"\n')
    (project / "layers/app").mkdir()
    (project / "layers/app/layer.toml").write_text('kind = "run"\nneeds = ["base"]\nscript = "s.sh"\nnetwork = false\n')
    (project / "layers/app/s.sh").write_text("mkdir -p /opt/app && echo rootless > /opt/app/f && chmod 600 /opt/app/f"
                                            " && chown 1000:1000 /opt/app && rm /etc/motd\n")
    (project / "layers/src").mkdir()
    (project / "layers/src/layer.toml").write_text('kind = "copy"\nfrom = "src"\nto = "/src"\n')
    (project / "src").mkdir()
    (project / "src/x").write_text("source\n")
    (project / "ocibuild.toml").write_text(
        '[image]\nname = "rl"\nlayers = ["base", "app", "src"]\n'
        '[run]\ncommand = ["sh", "-c", "cat /opt/app/f /src/x; test ! -e /etc/motd; echo made > /out/result"]\n'
        'mounts = ["out:/out"]\nnetwork = false\n')
    config = own_storage(base)
    base.chmod(0o755)
    subprocess.run(["chown", "-R", f"{user.pw_uid}:{user.pw_gid}", str(base)], check=True)
    store = str(base / "store")
    try:
        built = as_user(user, project, python_path, "build", "--store", store, config=config)
        assert built.returncode == 0, built.stderr
        ran = as_user(user, project, python_path, "run", "--store", store, config=config)
        assert ran.returncode == 0, ran.stderr
        assert ran.stdout.split() == ["rootless", "source"]
        result = project / "out/result"
        assert result.read_text() == "made\n"
        assert result.stat().st_uid == user.pw_uid, "output files belong to the invoking user"
        again = as_user(user, project, python_path, "build", "--json", "--store", store, config=config)
        assert again.returncode == 0 and again.stdout.count('"cached"') == 3
        verify = as_user(user, project, python_path, "verify", "--store", store, config=config)
        assert verify.returncode == 0, verify.stdout + verify.stderr
        # the captured layer keeps the container's owners and modes, as seen inside the namespace
        listing = as_user(user, project, python_path, "run", "--store", store, "--", "stat", "-c", "%u %a",
                          "/opt/app", "/opt/app/f", config=config)
        assert listing.stdout.split("\n")[:2] == ["1000 755", "0 600"]
    finally:
        remove(user, base, store)


def test_rootless_privileged_is_refused_and_caches_are_writable_and_removable(user: pwd.struct_passwd,
                                                                               python_path: str) -> None:
    """The container's root is the user: a cache directory of the store is writable for it; what the container
    writes there as another user (a subordinate id) is removed by `gc --caches` through podman unshare."""
    base = Path(f"/tmp/ocibuild-rootless-caches-{os.getpid()}")
    shutil.rmtree(base, ignore_errors=True)
    project = base / "project"
    busybox_rootfs(project / "rootfs")
    (project / "layers/base").mkdir(parents=True)
    (project / "layers/base/layer.toml").write_text('kind = "copy"\nfrom = "rootfs"\nto = "/"\n')
    (project / "ocibuild.toml").write_text(
        '[image]\nname = "rlc"\nlayers = ["base"]\n'
        '[run]\ncommand = ["sh", "-c", "cat /cache/stamp 2>/dev/null || echo cold; echo warm > /cache/stamp; '
        'mkdir -p /cache/other && echo x > /cache/other/f && chown -R 1000:1000 /cache/other && chmod 700 /cache/other"]\n'
        'caches = ["/cache"]\nnetwork = false\n')
    config = own_storage(base)
    base.chmod(0o755)
    subprocess.run(["chown", "-R", f"{user.pw_uid}:{user.pw_gid}", str(base)], check=True)
    store = str(base / "store")
    try:
        refused = as_user(user, project, python_path, "run", "--store", store, "--privileged", "--", "true",
                          config=config)
        assert refused.returncode == 125
        assert "error: --privileged cannot work with rootless podman" in refused.stderr and "hint:" in refused.stderr
        first = as_user(user, project, python_path, "run", "--store", store, config=config)
        assert first.returncode == 0 and first.stdout.strip() == "cold", first.stderr
        second = as_user(user, project, python_path, "run", "--store", store, config=config)
        assert second.returncode == 0 and second.stdout.strip() == "warm", second.stderr
        [cache] = (base / "store/ocibuild/caches").glob("*/podman/*/")
        assert cache.stat().st_uid == user.pw_uid and (cache / "other").stat().st_uid != user.pw_uid
        removed = as_user(user, project, python_path, "gc", "--store", store, "--caches", config=config)
        assert removed.returncode == 0, removed.stderr
        assert f"removed the cache /cache of {project} (podman)" in removed.stdout
        assert not any((base / "store/ocibuild/caches").iterdir())
    finally:
        remove(user, base, store)


def test_rootless_run_layer_caches_are_writable_kept_and_removable(user: pwd.struct_passwd,
                                                                   python_path: str) -> None:
    """A run layer's cache is writable for the container's root (the user), what the script writes there as
    another user (as apt writes partial/ as _apt) is there for the next build of a changed recipe, and `gc
    --caches` removes it through podman unshare."""
    base = Path(f"/tmp/ocibuild-rlc-{os.getpid()}")  # short: podman refuses a runroot over 50 characters
    shutil.rmtree(base, ignore_errors=True)
    project = base / "project"
    busybox_rootfs(project / "rootfs")
    (project / "layers/base").mkdir(parents=True)
    (project / "layers/base/layer.toml").write_text('kind = "copy"\nfrom = "rootfs"\nto = "/"\n')
    (project / "layers/app").mkdir()
    (project / "layers/app/layer.toml").write_text('kind = "run"\nneeds = ["base"]\nscript = "s.sh"\n'
                                                   'network = false\ncaches = ["/var/cache/pkgs"]\n')
    script = ("mkdir -p /opt && (cat /var/cache/pkgs/partial/f 2>/dev/null || echo cold) > /opt/saw\n"
              "mkdir -p /var/cache/pkgs/partial && echo warm > /var/cache/pkgs/partial/f\n"
              "chown -R 42:0 /var/cache/pkgs/partial && chmod 700 /var/cache/pkgs/partial\n")
    (project / "layers/app/s.sh").write_text(script)
    (project / "ocibuild.toml").write_text('[image]\nname = "rllc"\nlayers = ["base", "app"]\n[run]\nnetwork = false\n')
    config = own_storage(base)
    base.chmod(0o755)
    subprocess.run(["chown", "-R", f"{user.pw_uid}:{user.pw_gid}", str(base)], check=True)
    store = str(base / "store")
    try:
        first = as_user(user, project, python_path, "build", "--store", store, config=config)
        assert first.returncode == 0, first.stderr
        (project / "layers/app/s.sh").write_text(script + "# changed\n")
        second = as_user(user, project, python_path, "build", "--store", store, config=config)
        assert second.returncode == 0, second.stderr
        saw = as_user(user, project, python_path, "run", "--store", store, "--", "cat", "/opt/saw", config=config)
        assert saw.returncode == 0 and saw.stdout.strip() == "warm", saw.stderr
        [cache] = (base / "store/ocibuild/caches").glob("*/podman/layers/app/*/")
        assert cache.stat().st_uid == user.pw_uid and (cache / "partial").stat().st_uid != user.pw_uid
        removed = as_user(user, project, python_path, "gc", "--store", store, "--caches", config=config)
        assert removed.returncode == 0, removed.stderr
        assert f"removed the cache /var/cache/pkgs of layer 'app' of {project} (podman)" in removed.stdout
        assert not any((base / "store/ocibuild/caches").iterdir())
    finally:
        remove(user, base, store)
