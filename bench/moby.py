#!/usr/bin/env python3
"""Issue 10: ocibuild on the real project — Docker 20.10's source from Debian bookworm's docker.io source package —
against an equivalent chained Containerfile for `buildah bud --layers` and `podman run` by hand. Interleaved.

Set up once under bench/.cache/moby/ by _moby_project.py (see bench/README.md): the source package fetched with
apt-get through a private sources list and private state (the host's apt configuration is not touched) and
unpacked with dpkg-source; a Debian bookworm minbase oci-archive with a deb-src line (make_base.sh), the base of
both tools; the project, project/: ocibuild.toml + layers/ and the Containerfile, both written from the scripts
in bench/moby/. ocibuild's layers are independent, as a user should write them:

  base         image  oci-archive base.tar (mmdebstrap minbase, deb-src)   needs -
  go           run    golang-go, gcc, make, pkg-config                      needs base
  runtime-dev  run    libdevmapper-dev, libseccomp-dev, libapparmor-dev …   needs base
  godeps       run    the golang-*-dev packages of apt-get build-dep        needs go (many depend on golang-go)
  tools        run    gotestsum, go-md2man, shfmt                           needs go
  libnetwork   copy   src/libnetwork → /go/src/github.com/docker/libnetwork needs -
  swarmkit     copy   src/swarmkit → /go/src/github.com/docker/swarmkit     needs -
  source       copy   src/engine → /go/src/github.com/docker/docker         needs -

Scenarios (--only NAME, comma-separated), each checked (layer statuses, buildah's cached steps, a fresh
bundles/binary-daemon/dockerd-VERSION that runs):

  cold           ocibuild build vs buildah pull of the base + bud --layers, every store fresh   (--cold-runs, 2)
  noop           rebuild, nothing changed                                                         (--runs, 3)
  edit           one engine .go file edited, rebuild
  tools          the tools recipe gets one more package (jq), rebuild
  compile-edit   edit, then `ocibuild run` vs buildah bud + podman run by hand
  compile-mount  edit, then `ocibuild run --source-mount` vs podman run -v src (no rebuild by hand)
  compile-noop   nothing changed: `ocibuild run` vs podman run of the same image
  startup        `ocibuild run -- true` vs `podman run --rm IMAGE true`, same mounts and environment

The compile step keeps Go's build cache between runs in a bind mount ([run] mounts, `.gocache:/root/.cache/go-build`):
ocibuild has no cache feature yet, and this is how a user gets one today. Each tool has its own Go cache, bundles
folder and container storage (ocibuild's engine through `[engine] args` of its own OCIBUILD_CONFIG), so the host's
storage is not touched and neither tool benefits from the other's work. ocibuild's stderr is kept with timestamps
under .cache/moby/logs/. `--profile` instead runs a cold build, an edit rebuild and the compile step after an edit
of ocibuild alone under py-spy (BENCH_PYSPY, default: py-spy on PATH) and prints where their time went
(_moby_profile.py).

Usage: python3 bench/moby.py [--runs N] [--cold-runs N] [--only SCENARIO[,…]] [--profile] [--clean]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from _harness import CACHE, OCIBUILD, WITH_PYC, Case, fmt, interleave, log, report, run, write_if_changed
from _moby_profile import PYSPY_RATE, summarise_log, summarise_pyspy
from _moby_project import (BASE, COPY_LAYERS, EDIT_FILE, EXTRA_TOOL, MOBY, PROJECT, RUN_LAYERS, SRC, WORKDIR, edit,
                           ensure_base, fetch_source, restore_edit, unpack_source, versions, write_project)

LOGS = MOBY / "logs"
SCENARIOS = ("cold", "noop", "edit", "tools", "compile-edit", "compile-mount", "compile-noop", "startup")


class Storage:
    """One containers/storage root of our own (buildah's, or podman's for ocibuild), never the host's."""

    def __init__(self, name: str) -> None:
        self.root = MOBY / name
        self.runroot = Path(f"/run/ocibuild-bench-moby-{name}")
        self.args = ["--root", str(self.root), "--runroot", str(self.runroot), "--storage-driver", "overlay"]

    def podman(self, *args: str) -> list[str]:
        return ["podman", *self.args, *args]

    def buildah(self, *args: str) -> list[str]:
        """buildah on this storage, its RUN cache mounts (in $TMPDIR/buildah-cache) in the storage's folder too, so
        that wipe() empties them as ocibuild's fresh store empties its layers' caches."""
        return ["env", f"TMPDIR={self.root}", "buildah", *self.args, *args]

    def wipe(self) -> None:
        """Remove every container and image, unmount what is left, delete both folders."""
        if self.root.exists():
            for cmd in (self.buildah("rm", "--all"), self.podman("rm", "--all", "--force"),
                        self.podman("rmi", "--all", "--force")):
                subprocess.run(cmd, capture_output=True, check=False)
        mounts = subprocess.run(["findmnt", "-rn", "-o", "TARGET"], capture_output=True, text=True,
                                check=False).stdout.split()
        for target in sorted((m for m in mounts if m.startswith((f"{self.root}/", f"{self.runroot}/"))
                              or m in (str(self.root), str(self.runroot))), reverse=True):
            subprocess.run(["umount", "-l", target], capture_output=True, check=False)
        for path in (self.root, self.runroot):
            shutil.rmtree(path, ignore_errors=True)


class Ocibuild:
    """ocibuild with its own store and its own podman storage (through [engine] args of its own config file)."""

    def __init__(self, name: str) -> None:
        self.store = MOBY / f"store-{name}"
        self.engine = Storage(f"podman-{name}")
        self.config = MOBY / f"config-{name}.toml"
        write_if_changed(self.config, f"[engine]\nargs = {json.dumps(self.engine.args)}\n")
        self.env: dict[str, str | None] = {**WITH_PYC, "OCIBUILD_CONFIG": str(self.config)}

    def cmd(self, *args: str) -> list[str]:
        return [OCIBUILD, args[0], "-C", str(PROJECT), "--store", str(self.store), *args[1:]]

    def wipe(self) -> None:
        shutil.rmtree(self.store, ignore_errors=True)
        self.engine.wipe()


# ---- running and checking ---------------------------------------------------------------------------------------


def timed_logged(cmd: Sequence[str], log_name: str, *, env: dict[str, str | None] | None = None,
                 cwd: Path | None = None) -> tuple[float, str, str]:
    """Like _harness.timed, with stderr also written as it arrives, each line with its time since the start, to
    .cache/moby/logs/<log_name>.log (where ocibuild's time went)."""
    full = dict(os.environ)
    for key, value in (env or {}).items():
        if value is None:
            full.pop(key, None)
        else:
            full[key] = value
    LOGS.mkdir(parents=True, exist_ok=True)
    os.sync()
    start = time.perf_counter()
    proc = subprocess.Popen(list(cmd), cwd=cwd, env=full, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, errors="replace")
    err_lines: list[str] = []
    out_parts: list[str] = []
    assert proc.stdout is not None and proc.stderr is not None
    reader = threading.Thread(target=lambda: out_parts.append(proc.stdout.read()))  # type: ignore[union-attr]
    reader.start()
    with open(LOGS / f"{log_name}.log", "w") as log_file:
        log_file.write(f"# {' '.join(cmd)}\n")
        for line in proc.stderr:
            err_lines.append(line)
            log_file.write(f"{time.perf_counter() - start:9.3f} {line}")
        proc.wait()
        seconds = time.perf_counter() - start
        reader.join()
        out, err = "".join(out_parts), "".join(err_lines)
        log_file.write(f"{seconds:9.3f} # exit {proc.returncode}; stdout follows\n{out}")
    if proc.returncode != 0:
        sys.exit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{out[-3000:]}\n{err[-3000:]}")
    return seconds, out, err


def statuses(out: str) -> dict[str, str]:
    return {layer["name"]: layer["status"] for layer in json.loads(out)["layers"]}


def expect_statuses(out: str, built: Sequence[str], what: str) -> None:
    got = statuses(out)
    want = {name: "built" if name in built else "cached" for name in got}
    if got != want:
        raise SystemExit(f"{what}: expected layer statuses {want}, got {got}")


def buildah_steps() -> int:
    """Steps after FROM in the Containerfile (each prints "Using cache" when buildah reuses it)."""
    return len([l for l in (PROJECT / "Containerfile").read_text().splitlines() if l and l[0].isupper()]) - 1


def expect_cached(text: str, cached: int, what: str) -> None:
    hits = text.count("Using cache")
    if hits != cached:
        raise SystemExit(f"{what}: expected {cached} cached steps, got {hits}:\n{text[-2000:]}")


def check_binary(bundles: Path, since: float, what: str) -> None:
    """The compile produced bundles/binary-daemon/dockerd-VERSION in this run, and it runs."""
    version, _ = versions()
    binary = bundles / "binary-daemon" / f"dockerd-{version}"
    if not binary.exists() or binary.stat().st_mtime < since:
        raise SystemExit(f"{what}: {binary} was not written by this run")
    out = run([str(binary), "--version"]).stdout
    if f"Docker version {version}" not in out:
        raise SystemExit(f"{what}: {binary} --version printed {out!r}")


BUILDAH = Storage("buildah")
BUILDAH_IMAGE = "localhost/moby-buildah:latest"
BUNDLES_PODMAN = MOBY / "bundles-podman"
GOCACHE_PODMAN = MOBY / "gocache-podman"


def buildah_bud(storage: Storage = BUILDAH) -> list[str]:
    return storage.buildah("bud", "--layers", "--pull=never", "-t", BUILDAH_IMAGE, "-f", "Containerfile", ".")


def import_base(storage: Storage) -> list[list[str]]:
    """The commands that put the base archive into a buildah storage as localhost/moby-base."""
    return [storage.buildah("pull", "-q", f"oci-archive:{BASE}:base"),
            storage.buildah("tag", "@ID", "localhost/moby-base")]


def ensure_base_in(storage: Storage) -> None:
    if subprocess.run(storage.buildah("inspect", "--type", "image", "localhost/moby-base"),
                      capture_output=True, check=False).returncode != 0:
        pull, tag = import_base(storage)
        image_id = run(pull).stdout.strip().splitlines()[-1]
        run([image_id if part == "@ID" else part for part in tag])


def podman_run_args(bundles: Path, gocache: Path, *, source_mount: bool = False) -> list[str]:
    """`podman run` arguments equal to what `ocibuild run` passes (mounts, environment, workdir, no network)."""
    version, commit = versions()
    bundles.mkdir(parents=True, exist_ok=True)
    gocache.mkdir(parents=True, exist_ok=True)
    args = ["run", "--rm", "--pull=never", "--network=none", "-v", f"{bundles}:{WORKDIR}/bundles",
            "-v", f"{gocache}:/root/.cache/go-build"]
    if source_mount:
        for part, target in COPY_LAYERS.values():
            args += ["-v", f"{SRC / part}:{target}"]
    return args + ["-e", f"VERSION={version}", "-e", f"DOCKER_GITCOMMIT={commit}", "-w", WORKDIR]


def ocibuild_image_id(oci: Ocibuild) -> str:
    """The podman image id of ocibuild's current image (its config digest), as `ocibuild run` loads it."""
    manifest = json.loads(run(["skopeo", "inspect", "--raw", f"oci:{oci.store}:moby-dev"]).stdout)
    return str(manifest["config"]["digest"]).split(":")[1]


# ---- scenarios ----------------------------------------------------------------------------------------------------


def ocibuild_build_case(oci: Ocibuild, built: Sequence[str], tag: str) -> Case:
    def case(i: int) -> float:
        t, out, _ = timed_logged(oci.cmd("build", "--json"), f"{tag}-ocibuild-{i + 1}", env=oci.env)
        expect_statuses(out, built, f"{tag}: ocibuild")
        return t
    return case


def buildah_case(cached: int, tag: str) -> Case:
    def case(i: int) -> float:
        t, out, err = timed_logged(buildah_bud(), f"{tag}-buildah-{i + 1}", cwd=PROJECT)
        expect_cached(out + err, cached, f"{tag}: buildah")
        return t
    return case


def warm(oci: Ocibuild, *, buildah: bool = True) -> None:
    """Both tools' caches hold the project as it is now (on a first invocation: two cold builds, untimed)."""
    tools: list[tuple[str, list[str], dict[str, str | None] | None, Path | None]] = [
        ("ocibuild", oci.cmd("build"), oci.env, None)]
    if buildah:
        ensure_base_in(BUILDAH)
        tools.append(("buildah", buildah_bud(), None, PROJECT))
    for name, cmd, env, cwd in tools:
        t, _, _ = timed_logged(cmd, f"warm-{name}", env=env, cwd=cwd)
        log(f"warm-up {name}: {t:.1f} s")


def scenario_cold(runs: int) -> dict[str, object]:
    cold_oci = Ocibuild("cold")
    cold_buildah = Storage("buildah-cold")

    def before(_: int) -> None:
        cold_oci.wipe()
        cold_buildah.wipe()

    def ocibuild_cold(i: int) -> float:
        t, out, _ = timed_logged(cold_oci.cmd("build", "--json"), f"cold-ocibuild-{i + 1}", env=cold_oci.env)
        expect_statuses(out, ["base", *RUN_LAYERS, *COPY_LAYERS], "cold: ocibuild")
        return t

    def buildah_cold(i: int) -> float:
        pull, tag = import_base(cold_buildah)
        t1, out, _ = timed_logged(pull, f"cold-buildah-pull-{i + 1}")
        t2, _, _ = timed_logged([out.strip().splitlines()[-1] if p == "@ID" else p for p in tag],
                                f"cold-buildah-tag-{i + 1}")
        t3, out, err = timed_logged(buildah_bud(cold_buildah), f"cold-buildah-{i + 1}", cwd=PROJECT)
        expect_cached(out + err, 0, "cold: buildah")
        return t1 + t2 + t3

    try:
        times = interleave({"ocibuild": ocibuild_cold, "buildah": buildah_cold}, runs, before_run=before)
    finally:
        before(0)
    return report("moby cold: build of the environment, every store fresh (buildah: pull of the base + bud --layers)",
                  times, [("buildah / ocibuild", "buildah", "ocibuild")], extra={"load": os.getloadavg()})


def scenario_noop(oci: Ocibuild, runs: int) -> dict[str, object]:
    times = interleave({"ocibuild": ocibuild_build_case(oci, [], "noop"),
                        "buildah": buildah_case(buildah_steps(), "noop")}, runs)
    return report("moby no-op rebuild", times, [("buildah / ocibuild", "buildah", "ocibuild")],
                  extra={"load": os.getloadavg()})


def scenario_edit(oci: Ocibuild, runs: int) -> dict[str, object]:
    try:
        times = interleave({"ocibuild": ocibuild_build_case(oci, ["source"], "edit"),
                            "buildah": buildah_case(buildah_steps() - 2, "edit")}, runs, before_run=edit)
    finally:
        restore_edit()
    return report(f"moby rebuild after editing one engine .go file ({EDIT_FILE})", times,
                  [("buildah / ocibuild", "buildah", "ocibuild")], extra={"load": os.getloadavg()})


def scenario_tools(oci: Ocibuild, runs: int) -> dict[str, object]:
    def change(i: int) -> None:
        write_project(round_mark=f"round {i} {time.time_ns()}")

    # buildah reuses FROM's successors up to the tools RUN: ENV, go, runtime-dev, godeps
    try:
        times = interleave({"ocibuild": ocibuild_build_case(oci, ["tools"], "tools"),
                            "buildah": buildah_case(4, "tools")}, runs, before_run=change)
    finally:
        write_project()
    return report(f"moby rebuild after the tools recipe gets one more package ({EXTRA_TOOL})", times,
                  [("buildah / ocibuild", "buildah", "ocibuild")], extra={"load": os.getloadavg()})


def ocibuild_run_case(oci: Ocibuild, tag: str, *, rebuilds: bool, extra: Sequence[str] = (),
                      command: Sequence[str] = ()) -> Case:
    def case(i: int) -> float:
        start = time.time()
        t, _, err = timed_logged(oci.cmd("run", *extra, *(["--", *command] if command else [])),
                                 f"{tag}-ocibuild-{i + 1}", env=oci.env)
        if ("building layer 'source'" in err) != rebuilds:
            raise SystemExit(f"{tag}: ocibuild run {'did not rebuild' if rebuilds else 'rebuilt'} the source layer")
        if not command:
            check_binary(PROJECT / "bundles", start, f"{tag}: ocibuild")
        return t
    return case


def podman_case(storage: Storage, image: Callable[[], str], tag: str, *, source_mount: bool = False,
                command: Sequence[str] = ("hack/make.sh", "binary")) -> Case:
    def case(i: int) -> float:
        start = time.time()
        args = podman_run_args(BUNDLES_PODMAN, GOCACHE_PODMAN, source_mount=source_mount)
        t, _, _ = timed_logged(storage.podman(*args, image(), *command), f"{tag}-podman-{i + 1}")
        if command[0] == "hack/make.sh":
            check_binary(BUNDLES_PODMAN, start, f"{tag}: podman")
        return t
    return case


def warm_compile(oci: Ocibuild) -> None:
    """Each tool's image in its podman storage, and each Go build cache filled (the first time: a full compile of
    dockerd, untimed; podman's cache then starts as a copy of ocibuild's, whose entries are the same)."""
    t, _, _ = timed_logged(oci.cmd("run"), "warm-compile-ocibuild", env=oci.env)
    log(f"warm-up ocibuild run: {t:.1f} s")
    if not GOCACHE_PODMAN.exists():
        run(["cp", "-a", str(PROJECT / ".gocache"), str(GOCACHE_PODMAN)])
    run(buildah_bud(), cwd=PROJECT)
    t, _, _ = timed_logged(BUILDAH.podman(*podman_run_args(BUNDLES_PODMAN, GOCACHE_PODMAN), BUILDAH_IMAGE,
                                          "hack/make.sh", "binary"), "warm-compile-podman")
    log(f"warm-up podman run: {t:.1f} s")


def scenario_compile_edit(oci: Ocibuild, runs: int) -> dict[str, object]:
    parts: dict[str, list[float]] = {"buildah bud": [], "podman run": []}
    run_case = podman_case(BUILDAH, lambda: BUILDAH_IMAGE, "compile-edit")

    def by_hand(i: int) -> float:
        t1 = buildah_case(buildah_steps() - 2, "compile-edit-bud")(i)
        t2 = run_case(i)
        parts["buildah bud"].append(t1)
        parts["podman run"].append(t2)
        return t1 + t2

    try:
        times = interleave({"ocibuild run": ocibuild_run_case(oci, "compile-edit", rebuilds=True),
                            "buildah bud + podman run": by_hand}, runs, before_run=edit)
    finally:
        restore_edit()
    medians = {k: statistics.median(v) for k, v in parts.items()}
    log("by hand: " + ", ".join(f"{k} {fmt(v)}" for k, v in medians.items()))
    return report("moby compile step after an edit: ocibuild run vs rebuild + podman run by hand", times,
                  [("by hand / ocibuild run", "buildah bud + podman run", "ocibuild run")],
                  extra={"load": os.getloadavg(), "by hand parts": parts, "by hand part medians": medians})


def settle(oci: Ocibuild) -> str:
    """ocibuild's image of the project as it is now, assembled and in its podman storage (untimed: an earlier
    scenario may have left an edited one); returns its podman image id."""
    run(oci.cmd("run", "--", "true"), env=oci.env)
    return ocibuild_image_id(oci)


def scenario_compile_mount(oci: Ocibuild, runs: int) -> dict[str, object]:
    image = settle(oci)  # the image before the edits: podman's side needs no rebuild
    run(oci.cmd("run", "--source-mount", "--", "true"), env=oci.env)  # untimed: its image (no source) assembled once
    try:
        times = interleave({"ocibuild run --source-mount": ocibuild_run_case(oci, "compile-mount", rebuilds=False,
                                                                             extra=["--source-mount"]),
                            "podman run -v src": podman_case(oci.engine, lambda: image, "compile-mount",
                                                             source_mount=True)}, runs, before_run=edit)
    finally:
        restore_edit()
    return report("moby compile step with the source mounted, after an edit (the mounted source layer is left "
                  "out of the image: nothing rebuilds)", times, [("podman / ocibuild", "podman run -v src", "ocibuild run --source-mount")],
                  extra={"load": os.getloadavg()})


def scenario_compile_noop(oci: Ocibuild, runs: int) -> dict[str, object]:
    image = settle(oci)
    times = interleave({"ocibuild run": ocibuild_run_case(oci, "compile-noop", rebuilds=False),
                        "podman run": podman_case(oci.engine, lambda: image, "compile-noop")}, runs)
    return report("moby compile step, nothing changed, Go build cache mounted (by [run] mounts: no cache feature "
                  "yet)", times, [("podman / ocibuild", "podman run", "ocibuild run")], extra={"load": os.getloadavg()})


def scenario_startup(oci: Ocibuild, runs: int) -> dict[str, object]:
    image = settle(oci)
    times = interleave({"ocibuild run -- true": ocibuild_run_case(oci, "startup", rebuilds=False, command=["true"]),
                        "podman run --rm IMAGE true": podman_case(oci.engine, lambda: image, "startup",
                                                                  command=["true"])}, runs * 2)
    return report("moby `ocibuild run -- true` vs `podman run --rm IMAGE true` (same image, mounts, environment)",
                  times, [("podman / ocibuild", "podman run --rm IMAGE true", "ocibuild run -- true")],
                  extra={"load": os.getloadavg()})


# ---- the summary, profiling, main ---------------------------------------------------------------------------------


def summary(results: dict[str, dict[str, object]]) -> None:
    print("\n== moby: summary (medians; ratio = peer time / ocibuild time, > 1 means ocibuild is faster)")
    print("| scenario | ocibuild | peer | ratio | rounds | load average (1 min) before → after |")
    print("|---|---|---|---|---|---|")
    for name, result in results.items():
        medians: dict[str, float] = result["medians"]  # type: ignore[assignment]
        times: dict[str, list[float]] = result["times"]  # type: ignore[assignment]
        ours, peer = list(medians)
        ratio = medians[peer] / medians[ours]
        extra: dict[str, Sequence[float]] = result["extra"]  # type: ignore[assignment]
        load = f"{extra['load before'][0]:.1f} → {extra['load'][0]:.1f}"
        text = f"{ratio:.2f}x faster" if ratio >= 1 else f"{1 / ratio:.2f}x slower"
        parts: dict[str, float] = extra.get("by hand part medians", {})  # type: ignore[assignment]
        detail = f" ({' + '.join(f'{k} {fmt(v)}' for k, v in parts.items())})" if parts else ""
        print(f"| {name} | {fmt(medians[ours])} | {peer}: {fmt(medians[peer])}{detail} | {text} | {len(times[ours])} "
              f"| {load} |")
    out = CACHE / "results" / f"{time.strftime('%Y%m%d-%H%M%S')}-moby-summary.json"
    out.write_text(json.dumps(results, indent=2))
    print(f"(saved {out})")


def profile(oci: Ocibuild) -> None:
    """ocibuild alone, under py-spy (wall clock, idle included) and with its timestamped stderr: a cold build (fresh
    store and podman storage), an edit rebuild and the compile step after an edit (`ocibuild run`, podman holding
    the image before the edit, as in the benchmark). Prints per layer the time before, during and after its script
    (from the log) and per phase and operation where the main thread spent its time (from py-spy)."""
    pyspy = os.environ.get("BENCH_PYSPY") or shutil.which("py-spy")
    if not pyspy:
        sys.exit("--profile needs py-spy (pip install py-spy), on PATH or named by BENCH_PYSPY")
    cold = Ocibuild("profile")

    def after_edit() -> None:
        settle(oci)  # podman holds the image before the edit, as in the benchmark's rounds
        edit(0)

    for tag, who, prepare, command in (("cold build", cold, cold.wipe, ("build", "--json")),
                                       ("edit rebuild", oci, after_edit, ("build", "--json")),
                                       ("compile step after an edit", oci, lambda: edit(1), ("run",))):
        prepare()
        slug = tag.replace(" ", "-")
        raw = LOGS / f"profile-{slug}.pyspy"
        cmd = [pyspy, "record", "--idle", "--subprocesses", "--rate", str(PYSPY_RATE), "--format", "raw", "-o",
               str(raw), "--", *who.cmd(*command)]
        try:
            t, _, err = timed_logged(cmd, f"profile-{slug}", env=who.env)
        finally:
            restore_edit()
        built = re.findall(r"building layer '([^']+)'", err)
        print(f"\n== moby profile: ocibuild {tag}, {t:.1f} s (built: {', '.join(built)}); "
              f"load average {os.getloadavg()[0]:.1f}")
        print("  per layer (from the log): before the script's first line / script / after its last line "
              "(the last row of `ocibuild run` includes the compile step, whose output goes to stdout)")
        for name, before, during, after in summarise_log(LOGS / f"profile-{slug}.log"):
            print(f"    {name:<16} {before:7.1f} s {during:7.1f} s {after:7.1f} s")
        print("  main thread (py-spy): phase / operation / seconds")
        for phase, op, seconds in summarise_pyspy(raw):
            if seconds >= 0.1:
                print(f"    {phase:<34} {op:<46} {seconds:7.1f} s")
    cold.wipe()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="rounds of every scenario but cold (default 3)")
    parser.add_argument("--cold-runs", type=int, default=2, help="rounds of the cold build (default 2)")
    parser.add_argument("--only", help=f"comma-separated scenarios: {', '.join(SCENARIOS)}")
    parser.add_argument("--profile", action="store_true",
                        help="profile ocibuild's cold build, edit rebuild and compile step instead")
    parser.add_argument("--clean", action="store_true",
                        help="remove every store and container storage this script made, then exit")
    args = parser.parse_args()
    only = args.only.split(",") if args.only else list(SCENARIOS)
    unknown = set(only) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenario {min(unknown)!r}; choose from {', '.join(SCENARIOS)}")

    oci = Ocibuild("warm")
    if args.clean:
        for thing in (oci, Ocibuild("cold"), Ocibuild("profile"), BUILDAH, Storage("buildah-cold")):
            thing.wipe()
        return
    ensure_base()
    unpack_source(fetch_source())
    restore_edit()
    write_project()
    if args.profile:
        warm(oci, buildah=False)
        profile(oci)
        oci.engine.wipe()
        return

    results: dict[str, dict[str, object]] = {}
    try:
        if "cold" in only:
            log("cold build")
            load_before = os.getloadavg()
            results["cold build of the environment"] = scenario_cold(args.cold_runs)
            results["cold build of the environment"]["extra"]["load before"] = load_before  # type: ignore[index]
        warm_scenarios = [s for s in only if s != "cold"]
        if warm_scenarios:
            warm(oci)
        steps: list[tuple[str, str, Callable[[Ocibuild, int], dict[str, object]]]] = [
            ("noop", "no-op rebuild", scenario_noop),
            ("edit", "edit one engine .go file, rebuild", scenario_edit),
            ("tools", "change the tools recipe (one more package), rebuild", scenario_tools),
            ("compile-edit", "compile step after an edit (ocibuild run vs rebuild + podman run)",
             scenario_compile_edit),
            ("compile-mount", "compile step with --source-mount after an edit (vs podman run -v src)",
             scenario_compile_mount),
            ("compile-noop", "compile step, nothing changed, Go build cache mounted", scenario_compile_noop),
            ("startup", "ocibuild run -- true vs podman run --rm IMAGE true", scenario_startup),
        ]
        if any(s.startswith(("compile", "startup")) for s in warm_scenarios):
            warm_compile(oci)
        for key, title, function in steps:
            if key in only:
                log(title)
                load_before = os.getloadavg()
                results[title] = function(oci, args.runs)
                results[title]["extra"]["load before"] = load_before  # type: ignore[index]
    finally:
        restore_edit()
        write_project()
        # the images ocibuild loaded into podman (its own storage), and buildah's images of earlier rounds; buildah's
        # cache of the project as it is stays, so the next invocation starts warm (--clean removes it too)
        oci.engine.wipe()
        run(BUILDAH.buildah("rmi", "--prune"))
    summary(results)


if __name__ == "__main__":
    main()
