"""moby.py's project: Docker 20.10's source from Debian bookworm's docker.io source package, the shared base
image, and the two builds of the same environment — ocibuild's layers and the chained Containerfile — written from
the scripts in bench/moby/."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from _harness import BENCH, CACHE, log, run, write_if_changed

MOBY = CACHE / "moby"
TEMPLATES = BENCH / "moby"
DOWNLOADS = MOBY / "downloads"
APT = MOBY / "apt"
PROJECT = MOBY / "project"
SRC = PROJECT / "src"
BASE = MOBY / "base.tar"
EDIT_SAVE = MOBY / "edit.orig"
EDIT_FILE = "cmd/dockerd/daemon.go"  # package main of dockerd: an edit recompiles one package and relinks
GOPKG = "/go/src/github.com/docker"
WORKDIR = f"{GOPKG}/docker"
RUN_LAYERS = ("go", "runtime-dev", "godeps", "tools")
NEEDS = {"go": "base", "runtime-dev": "base", "godeps": "go", "tools": "go"}  # many golang-*-dev depend on golang-go
#: copy layer → (its tree in the source package, where it goes)
COPY_LAYERS = {"libnetwork": ("libnetwork", f"{GOPKG}/libnetwork"), "swarmkit": ("swarmkit", f"{GOPKG}/swarmkit"),
               "source": ("engine", WORKDIR)}
#: the image's environment, Debian's GOPATH-mode build (debian/rules)
ENV = {"GOPATH": "/go:/usr/share/gocode", "GO111MODULE": "off", "GOPROXY": "off", "GOFLAGS": "-buildvcs=false",
       "DOCKER_BUILDTAGS": "apparmor seccomp",
       "PATH": "/go/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
EXTRA_TOOL = "jq"
#: apt's downloads and lists, kept between builds of each run layer (ocibuild: `caches` in its layer.toml; buildah:
#: `RUN --mount=type=cache`), so a changed recipe fetches only what it adds
APT_CACHES = ("/var/cache/apt", "/var/lib/apt/lists")


def apt_get(*args: str, cwd: Path | None = None) -> None:
    """apt-get with a private sources list and private state: the host's apt configuration stays as it is."""
    for sub in ("lists/partial", "cache/archives/partial"):
        (APT / sub).mkdir(parents=True, exist_ok=True)
    write_if_changed(APT / "sources.list", "deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] "
                                           "http://deb.debian.org/debian bookworm main\n")
    run(["apt-get", "-q", "-o", f"Dir::Etc::SourceList={APT / 'sources.list'}", "-o", "Dir::Etc::SourceParts=/dev/null",
         "-o", f"Dir::State::Lists={APT / 'lists'}", "-o", f"Dir::Cache={APT / 'cache'}", "-o", "Acquire::Retries=5",
         *args], cwd=cwd)


def fetch_source() -> Path:
    """The docker.io source package (its .dsc), downloaded once; BENCH_MOBY_DOWNLOADS names a folder that
    already holds its files (they are copied; dpkg-source checks them against the .dsc)."""
    dscs = list(DOWNLOADS.glob("docker.io_*.dsc"))
    if dscs:
        return max(dscs)
    tmp = DOWNLOADS.with_name("downloads.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    given = os.environ.get("BENCH_MOBY_DOWNLOADS")
    if given and list(Path(given).glob("docker.io_*.dsc")):
        log(f"copying the docker.io source package from {given}")
        for path in Path(given).glob("docker.io_*"):
            shutil.copy2(path, tmp)
    else:
        log("fetching the docker.io source package from Debian bookworm (private apt state under .cache/moby/apt)")
        apt_get("update")
        apt_get("source", "--download-only", "docker.io", cwd=tmp)
    tmp.rename(DOWNLOADS)
    return max(DOWNLOADS.glob("docker.io_*.dsc"))


def unpack_source(dsc: Path) -> None:
    stamp = PROJECT / ".unpacked"
    if stamp.exists() and stamp.read_text() == dsc.name:
        return
    log(f"unpacking {dsc.name} with dpkg-source -x")
    shutil.rmtree(SRC, ignore_errors=True)
    SRC.parent.mkdir(parents=True, exist_ok=True)
    run(["dpkg-source", "--no-copy", "-x", str(dsc), str(SRC)])
    for part, _ in COPY_LAYERS.values():
        if not (SRC / part).is_dir():
            sys.exit(f"{dsc.name}: no {part}/ component after unpacking")
    stamp.write_text(dsc.name)


def versions() -> tuple[str, str]:
    """The upstream version (20.10.24) and the engine's git commit, as debian/rules finds them."""
    changelog = (SRC / "debian" / "changelog").read_text().split("\n", 1)[0]
    match = re.match(r"docker\.io \(([^)+~-]+)", changelog)
    if not match:
        sys.exit(f"cannot read the version from debian/changelog: {changelog!r}")
    version = match.group(1)
    for line in (SRC / "debian" / "helpers" / "engine-gitcommits").read_text().splitlines():
        if line.startswith(f"{version}: "):
            return version, line.split(": ", 1)[1].strip()
    sys.exit(f"debian/helpers/engine-gitcommits has no commit for {version}")


def ensure_base() -> None:
    if not BASE.exists():
        log("making the base image (once): mmdebstrap bookworm minbase with deb-src, by make_base.sh")
        subprocess.run([str(BENCH / "make_base.sh")], check=True,
                       env={**os.environ, "BENCH_BASE_OUT": str(BASE), "BENCH_BASE_DEB_SRC": "1"})


def script(name: str, round_mark: str = "") -> str:
    """A run layer's script from bench/moby/; the tools scenario adds one package and a round mark."""
    text = (TEMPLATES / f"{name}.sh").read_text()
    if name == "tools":
        text = text.replace("@EXTRA@", f" {EXTRA_TOOL}" if round_mark else "")
        if round_mark:
            text += f": recipe changed, {round_mark}\n"
    return text


def containerfile(scripts: dict[str, str]) -> str:
    """The chained Containerfile of the same steps: each script as one RUN (comment lines dropped) with apt's lists
    and downloads in cache mounts, as ocibuild's run layers have them (`caches`), then the COPYs. The mounts are
    shared (buildah's default): buildah runs one step at a time, and buildah 1.28 hung for 15 minutes on a
    `sharing=locked` lock file of its own in a cold build here."""
    lines = ["FROM localhost/moby-base:latest", "ENV " + " ".join(f'{k}="{v}"' for k, v in ENV.items())]
    mounts = " ".join(f"--mount=type=cache,target={path}" for path in APT_CACHES)
    for name in RUN_LAYERS:
        body = [line for line in scripts[name].splitlines() if line.strip() and not line.lstrip().startswith("#")]
        lines.append(f"RUN {mounts} set -eu; \\\n    " + "; \\\n    ".join(body))
    for part, target in COPY_LAYERS.values():
        lines.append(f"COPY src/{part} {target}")
    lines.append(f"WORKDIR {WORKDIR}")
    return "\n".join(lines) + "\n"


def write_project(round_mark: str = "") -> None:
    """ocibuild.toml, layers/ and the Containerfile; ``round_mark`` changes the tools recipe (one more package)."""
    version, commit = versions()
    env = ", ".join(f'{k} = "{v}"' for k, v in ENV.items())
    write_if_changed(PROJECT / "ocibuild.toml", (
        "# Docker 20.10 from Debian's docker.io source package: independent layers, each needing only what it needs.\n"
        f'[image]\nname = "moby-dev"\nlayers = ["base", {", ".join(json.dumps(n) for n in RUN_LAYERS)}, '
        f'{", ".join(json.dumps(n) for n in COPY_LAYERS)}]\ncompression = "zstd"\nenv = {{ {env} }}\n'
        f'workdir = "{WORKDIR}"\n\n'
        "# `make binary`; Go's build cache kept in a bind mount (ocibuild has no cache feature yet)\n"
        f'[run]\ncommand = ["hack/make.sh", "binary"]\n'
        f'mounts = ["bundles:{WORKDIR}/bundles", ".gocache:/root/.cache/go-build"]\n'
        f'env = {{ VERSION = "{version}", DOCKER_GITCOMMIT = "{commit}" }}\nnetwork = false\n'))
    write_if_changed(PROJECT / "layers/base/layer.toml", f'kind = "image"\nref = "oci-archive:{BASE}:base"\n')
    scripts = {name: script(name, round_mark) for name in RUN_LAYERS}
    caches = ", ".join(json.dumps(path) for path in APT_CACHES)
    for name in RUN_LAYERS:
        write_if_changed(PROJECT / f"layers/{name}/layer.toml",
                         f'kind = "run"\nneeds = ["{NEEDS[name]}"]\nscript = "install.sh"\ncaches = [{caches}]\n')
        write_if_changed(PROJECT / f"layers/{name}/install.sh", scripts[name])
    for name, (part, target) in COPY_LAYERS.items():
        write_if_changed(PROJECT / f"layers/{name}/layer.toml",
                         f'kind = "copy"\nfrom = "src/{part}"\nto = "{target}"\n')
    write_if_changed(PROJECT / "Containerfile", containerfile(scripts))
    # buildah's context is the project: only the three trees, less what engine/.dockerignore leaves out for ocibuild
    write_if_changed(PROJECT / ".containerignore", "\n".join([
        "*", "!src/libnetwork", "!src/swarmkit", "!src/engine", "src/engine/.git", "src/engine/.go-pkg-cache",
        "src/engine/.gopath", "src/engine/bundles", "src/engine/vendor/pkg"]) + "\n")
    (PROJECT / "bundles").mkdir(exist_ok=True)
    (PROJECT / ".gocache").mkdir(exist_ok=True)


def edit_target() -> Path:
    return SRC / "engine" / EDIT_FILE


def restore_edit() -> None:
    if EDIT_SAVE.exists():
        edit_target().write_bytes(EDIT_SAVE.read_bytes())
        EDIT_SAVE.unlink()


def edit(i: int) -> None:
    """New content for the edited file (unique per round, the same for every tool in the round)."""
    target = edit_target()
    if not EDIT_SAVE.exists():
        EDIT_SAVE.write_bytes(target.read_bytes())
    target.write_bytes(EDIT_SAVE.read_bytes() + f"\n// bench edit {i} {time.time_ns()}\n".encode())


