"""`ocibuild doctor`: checks of the host that builds and runs containers, each with the fix for a problem."""

from __future__ import annotations

import os
import pwd
import re
import resource
import shutil
from dataclasses import dataclass
from pathlib import Path

from .config import Config
from .engine import Engine
from .errors import EngineError
from .files import read_toml

CONTAINERS_CONF = Path("/etc/containers/containers.conf")


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""


def run_checks(config: Config, choice: str = "auto") -> list[Check]:
    checks = [_engine(config, choice)]
    conf = _containers_conf()
    checks += [_runtime(conf), _cgroups(conf), _ulimits(conf), _subids(), _tool("mmdebstrap", "mmdebstrap")]
    return checks


def _engine(config: Config, choice: str) -> Check:
    try:
        engine = Engine.detect(choice, config.engine_args)
        version = engine.version()
        engine.info()
    except EngineError as err:
        return Check("engine", False, str(err), err.hint or "apt-get install podman runc uidmap")
    return Check("engine", True, version)


def _containers_conf() -> dict[str, object]:
    paths = [CONTAINERS_CONF]
    home = os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config")
    paths.append(Path(home) / "containers" / "containers.conf")
    merged: dict[str, object] = {}
    for path in paths:
        try:
            data = read_toml(path)
        except (OSError, ValueError):
            continue
        for section, values in data.items():
            if isinstance(values, dict):
                merged.update({f"{section}.{k}": v for k, v in values.items()})
    return merged


def _cgroup_version() -> str:
    if Path("/sys/fs/cgroup/cgroup.controllers").exists():
        return "v2"
    if Path("/sys/fs/cgroup/unified").exists():
        return "hybrid"
    return "v1"


def _runtime(conf: dict[str, object]) -> Check:
    runtime = str(conf.get("engine.runtime", "") or "")
    present = [r for r in ("crun", "runc") if shutil.which(r)]
    if not present:
        return Check("runtime", False, "neither crun nor runc is installed", "apt-get install runc")
    if _cgroup_version() != "v2" and runtime != "runc" and "runc" in present:
        return Check("runtime", False, f"cgroups {_cgroup_version()}: crun fails on such hosts; runtime is "
                     f"'{runtime or 'default'}'",
                     f'set [engine] runtime = "runc" in {CONTAINERS_CONF} (scripts/setup-host does)')
    return Check("runtime", True, f"{runtime or 'default'} (installed: {', '.join(present)})")


def _cgroups(conf: dict[str, object]) -> Check:
    version = _cgroup_version()
    return Check("cgroups", True, f"{version}" + ("" if version == "v2" else " (runc is the runtime to use)"))


def _ulimits(conf: dict[str, object]) -> Check:
    hard_nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    hard_nproc = resource.getrlimit(resource.RLIMIT_NPROC)[1]
    wanted = {"nofile": 1048576, "nproc": 4194304}  # podman's defaults when containers.conf sets none
    configured = conf.get("containers.default_ulimits")
    for item in configured if isinstance(configured, list) else []:
        match = re.fullmatch(r"(\w+)=(\d+):(\d+)", str(item))
        if match:
            wanted[match.group(1)] = int(match.group(3))
    problems = []
    for name, hard in (("nofile", hard_nofile), ("nproc", hard_nproc)):
        if hard != resource.RLIM_INFINITY and wanted.get(name, 0) > hard:
            problems.append(f"{name} {wanted[name]} > host hard limit {hard}")
    if problems:
        return Check("ulimits", False, "; ".join(problems),
                     f'set [containers] default_ulimits = ["nofile={min(hard_nofile, 20000)}:{min(hard_nofile, 20000)}", '
                     f'"nproc={min(hard_nproc, 1024)}:{min(hard_nproc, 1024)}"] in {CONTAINERS_CONF}')
    return Check("ulimits", True, f"host hard limits nofile={hard_nofile} nproc={hard_nproc}")


def _subids() -> Check:
    if os.geteuid() == 0:
        return Check("subuid/subgid", True, "running as root (rootless needs none)")
    user = pwd.getpwuid(os.geteuid()).pw_name
    missing = []
    for file in ("/etc/subuid", "/etc/subgid"):
        try:
            lines = Path(file).read_text().splitlines()
        except OSError:
            lines = []
        if not any(line.split(":")[0] in (user, str(os.geteuid())) for line in lines):
            missing.append(file)
    if missing:
        return Check("subuid/subgid", False, f"no entry for {user} in {' and '.join(missing)}",
                     f"as root: usermod --add-subuids 100000-165535 --add-subgids 100000-165535 {user}")
    if not shutil.which("newuidmap"):
        return Check("subuid/subgid", False, "newuidmap is missing", "apt-get install uidmap")
    return Check("subuid/subgid", True, f"entries for {user}")


def _tool(name: str, package: str) -> Check:
    path = shutil.which(name)
    if path is None:
        return Check(name, False, "not installed (bootstrap layers need it)", f"apt-get install {package}")
    return Check(name, True, path)
