#!/usr/bin/env python3
"""Targets 1 and 2: `ocibuild build` vs `buildah bud --layers` on the same project, warm caches, interleaved.

The project (bench/.cache/rebuild/) stacks, on a Debian bookworm minbase image (an oci-archive made once by
make_base.sh), a ~466 MB / 12,000-file toolchain-like tree at /usr/local/go and a ~138 MB / 10,000-file source
tree at /go/src/example:

  ocibuild:  layers base (kind image, ref oci-archive:…/base.tar:base), toolchain (copy), source (copy)
  buildah:   FROM localhost/bench-base (the same archive, pulled once) + COPY toolchain + COPY src

ocibuild runs with its bytecode cached (as a pip install has it); the no-op rounds also run it with no bytecode
cache at all ("ocibuild-compiling": every module compiled at every start), for reference.

1. no-op:  nothing changed; both find every step cached.                         target: ocibuild >= 30x faster
2. edit:   one source file changed (unique content each round, the same for both tools); only the source
           layer is rebuilt by either.                                            target: ocibuild >= 5x faster

buildah uses its own storage (bench/.cache/buildah), so other users of /var/lib/containers are not disturbed;
ocibuild its own store (bench/.cache/store-rebuild). Each run's output is checked (ocibuild's --json statuses,
buildah's "Using cache" lines), so a benchmark that silently stopped caching would fail rather than mislead.

Usage: python3 bench/rebuild.py [--runs N] [--edit-runs N] [--only noop|edit]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

from _harness import (CACHE, NO_PYC, OCIBUILD, WITH_PYC, Case, interleave, log, prepare_inputs, report, run, timed,
                      write_if_changed)

PROJECT = CACHE / "rebuild"
STORE = CACHE / "store-rebuild"
BUILDAH = ["buildah", "--root", str(CACHE / "buildah" / "root"), "--runroot", "/run/ocibuild-bench-buildah",
           "--storage-driver", "overlay"]
BASE_NAME = "localhost/bench-base:latest"
EDIT_SAVE = CACHE / "rebuild-edit.orig"


def setup_project(base: Path) -> None:
    write_if_changed(PROJECT / "ocibuild.toml", (
        '[image]\nname = "bench"\nlayers = ["base", "toolchain", "source"]\ncompression = "zstd"\n'
        'env = { PATH = "/usr/local/go/bin:/usr/local/bin:/usr/bin:/bin" }\nworkdir = "/go/src/example"\n'))
    write_if_changed(PROJECT / "layers/base/layer.toml", f'kind = "image"\nref = "oci-archive:{base}:base"\n')
    write_if_changed(PROJECT / "layers/toolchain/layer.toml",
                     'kind = "copy"\nfrom = "toolchain"\nto = "/usr/local/go"\n')
    write_if_changed(PROJECT / "layers/source/layer.toml", 'kind = "copy"\nfrom = "src"\nto = "/go/src/example"\n')
    write_if_changed(PROJECT / "Containerfile", (
        f"FROM {BASE_NAME}\nENV PATH=/usr/local/go/bin:/usr/local/bin:/usr/bin:/bin\n"
        "COPY toolchain /usr/local/go\nCOPY src /go/src/example\nWORKDIR /go/src/example\n"))
    # buildah: only the two trees are the context's business
    write_if_changed(PROJECT / ".containerignore", "layers\nocibuild.toml\nocibuild.lock\nContainerfile\n")
    if subprocess.run([*BUILDAH, "inspect", "--type", "image", BASE_NAME], capture_output=True).returncode != 0:
        log("importing the base image into buildah's storage (once)")
        image_id = run([*BUILDAH, "pull", "-q", f"oci-archive:{base}:base"]).stdout.strip().splitlines()[-1]
        run([*BUILDAH, "tag", image_id, BASE_NAME])


def edit_file() -> Path:
    return sorted((PROJECT / "src" / "daemon").rglob("*.go"))[0]


def restore_edit() -> None:
    if EDIT_SAVE.exists():
        edit_file().write_bytes(EDIT_SAVE.read_bytes())
        EDIT_SAVE.unlink()


def ocibuild_case(expect: dict[str, str], env: dict[str, str | None] = WITH_PYC) -> Case:
    def case(_: int) -> float:
        t, proc = timed([OCIBUILD, "build", "--json", "-C", str(PROJECT), "--store", str(STORE)], env=env)
        got = {layer["name"]: layer["status"] for layer in json.loads(proc.stdout)["layers"]}
        if got != expect:
            raise SystemExit(f"ocibuild: expected layer statuses {expect}, got {got}")
        return t
    return case


def buildah_case(cached_steps: int) -> Case:
    def case(_: int) -> float:
        t, proc = timed([*BUILDAH, "bud", "--layers", "--pull=never", "-t", "localhost/bench-rebuild",
                         "-f", "Containerfile", "."], cwd=PROJECT)
        hits = (proc.stdout + proc.stderr).count("Using cache")
        if hits != cached_steps:
            raise SystemExit(f"buildah: expected {cached_steps} cached steps, got {hits}:\n{proc.stdout[-2000:]}")
        return t
    return case


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="no-op rounds (default 7)")
    parser.add_argument("--edit-runs", type=int, default=5, help="edit rounds (default 5)")
    parser.add_argument("--only", choices=("noop", "edit"))
    args = parser.parse_args()

    base = prepare_inputs()
    restore_edit()
    setup_project(base)

    all_cached = {"base": "cached", "toolchain": "cached", "source": "cached"}
    # Warm-up, untimed by the report: fills both caches on a first invocation, checks nothing is left to build.
    for name, cmd in (("ocibuild", [OCIBUILD, "build", "-C", str(PROJECT), "--store", str(STORE)]),
                      ("buildah", [*BUILDAH, "bud", "--layers", "--pull=never", "-t", "localhost/bench-rebuild",
                                   "-f", "Containerfile", "."])):
        t, _ = timed(cmd, cwd=PROJECT, env=WITH_PYC)
        log(f"warm-up {name}: {t:.2f} s (a cold build on the first invocation)")
    interleave({"ocibuild": ocibuild_case(all_cached), "buildah": buildah_case(4)}, 1)  # both must be warm now

    if args.only in (None, "noop"):
        log("no-op rebuild")
        times = interleave({"ocibuild": ocibuild_case(all_cached), "buildah": buildah_case(4),
                            "ocibuild-compiling": ocibuild_case(all_cached, NO_PYC)}, args.runs)
        report("1. no-op rebuild (466 MB toolchain + 138 MB source on Debian minbase), warm caches", times,
               [("buildah / ocibuild (target >= 30x)", "buildah", "ocibuild"),
                ("buildah / ocibuild-compiling (no bytecode cache)", "buildah", "ocibuild-compiling")])

    if args.only in (None, "edit"):
        log("rebuild after editing one source file")
        target = edit_file()
        original = target.read_bytes()
        EDIT_SAVE.write_bytes(original)

        def edit(i: int) -> None:
            target.write_bytes(original + f"\n// bench edit {i} {time.time_ns()}\n".encode())

        built = {"base": "cached", "toolchain": "cached", "source": "built"}
        try:
            times = interleave({"ocibuild": ocibuild_case(built), "buildah": buildah_case(2)}, args.edit_runs,
                               before_run=edit)
        finally:
            restore_edit()
        report("2. rebuild after editing one source file (only the source layer rebuilt)", times,
               [("buildah / ocibuild (target >= 5x)", "buildah", "ocibuild")])
        # Leave both caches at the original tree, so the next invocation starts warm.
        run([OCIBUILD, "build", "-C", str(PROJECT), "--store", str(STORE)], env=WITH_PYC)
        run([*BUILDAH, "bud", "--layers", "--pull=never", "-t", "localhost/bench-rebuild", "-f", "Containerfile",
             "."], cwd=PROJECT)


if __name__ == "__main__":
    main()
