#!/usr/bin/env python3
"""Target 3: writing the ~466 MB, 12,000-file toolchain tree as one compressed layer, ocibuild vs tar + zstd/pigz.

Cases, interleaved round by round (each case once per round, order reversed every other round):

  zstd  ocibuild-writer    write.write_layer alone, in process, to a null sink (only the write is timed)
        ocibuild-build     `ocibuild build` of a project holding only that copy layer, into a fresh store each
                           run whose stat cache is pre-seeded (inputs are walked and stat'ed but not re-hashed);
                           includes startup, the fsynced blob write, the cache entry and the image
        tar|zstd           tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -cf - DIR
                           | zstd -3 -T0 > /dev/null                                       target: >= 75%
  gzip  the same three with ocibuild's gzip (ISA-L level 1) against `| pigz` (level 6, the issue's comparison)
        and `| pigz -1` (the same level as ocibuild, for reference)

Throughput is the tar stream size (as GNU tar writes it) over the median time; the ratios are throughputs,
ocibuild / baseline (= baseline time / ocibuild time). All input is in the page cache (every case reads it
each round). Fresh stores are removed only after the last round.

Usage: python3 bench/write.py [--runs N] [--only zstd|gzip]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

from _harness import (CACHE, OCIBUILD, PYTHON, WITH_PYC, Case, interleave, log, prepare_inputs, report, run,
                      timed, write_if_changed)

BENCH = Path(__file__).resolve().parent
TREE = CACHE / "rebuild" / "toolchain"  # the same inodes as write/toolchain
TAR = "tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -C {root} -cf - {name}"


PROJECT = CACHE / "write"  # toolchain/ holds hardlinks to the tree (made once by gen_trees.py)
SEED = CACHE / "store-write-seed"


def project(compression: str) -> Path:
    """The project whose only layer copies the toolchain tree, set to ``compression``; its stat cache seeded.

    One project for both compressions (compression is not part of a cache key and every run uses a fresh
    store): a second tree of hardlinks would change the inodes' ctime and so invalidate every stat cache.
    """
    write_if_changed(PROJECT / "ocibuild.toml",
                     f'[image]\nname = "bench-write"\nlayers = ["toolchain"]\ncompression = "{compression}"\n')
    write_if_changed(PROJECT / "layers/toolchain/layer.toml", 'kind = "copy"\nfrom = "toolchain"\nto = "/usr/local/go"\n')
    files = sum(not os.path.islink(os.path.join(d, f)) for d, _, fs in os.walk(PROJECT / "toolchain") for f in fs)
    for _ in range(3):  # a file changed within 2 s of being hashed is not recorded (the racy rule): try again
        cache = SEED / "ocibuild/statcache/files.json"
        if cache.exists() and len(json.loads(cache.read_bytes())) >= files:
            return PROJECT
        log("seeding the stat cache of the write project")
        run([OCIBUILD, "build", "-C", str(PROJECT), "--store", str(SEED)], env=WITH_PYC)
        time.sleep(2)
    raise SystemExit(f"the stat cache in {SEED} does not cover the {files} files of the tree")


def writer_case(compression: str, info: dict[str, int]) -> Case:
    def case(_: int) -> float:
        proc = timed([PYTHON, str(BENCH / "_write_layer.py"), str(TREE), compression], env=WITH_PYC)[1]
        result = json.loads(proc.stdout)
        info.update(uncompressed=result["uncompressed"], compressed=result["compressed"])
        return float(result["seconds"])
    return case


def build_case(compression: str, root: Path, stores: list[Path]) -> Case:
    seed = SEED / "ocibuild/statcache/files.json"

    def case(i: int) -> float:
        store = CACHE / "store-write-runs" / f"{compression}-{time.time_ns()}"
        (store / "ocibuild/statcache").mkdir(parents=True)
        shutil.copyfile(seed, store / "ocibuild/statcache/files.json")
        stores.append(store)
        t, proc = timed([OCIBUILD, "build", "--json", "-C", str(root), "--store", str(store)], env=WITH_PYC)
        status = json.loads(proc.stdout)["layers"][0]["status"]
        if status != "built":
            raise SystemExit(f"ocibuild build: the layer was {status}, not built")
        return t
    return case


def shell_case(cmd: str) -> Case:
    def case(_: int) -> float:
        return timed(["bash", "-o", "pipefail", "-c", cmd])[0]
    return case


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="rounds (default 5)")
    parser.add_argument("--only", choices=("zstd", "gzip"))
    args = parser.parse_args()
    prepare_inputs()
    tar = TAR.format(root=TREE.parent, name=TREE.name)
    tar_bytes = int(run(f"{tar} | wc -c", shell=True).stdout)
    log(f"tar stream of {TREE}: {tar_bytes / 1e6:.1f} MB")
    stores: list[Path] = []
    try:
        for compression, baselines in (("zstd", {"tar|zstd": f"{tar} | zstd -q -3 -T0 > /dev/null"}),
                                       ("gzip", {"tar|pigz": f"{tar} | pigz > /dev/null",
                                                 "tar|pigz-1": f"{tar} | pigz -1 > /dev/null"})):
            if args.only not in (None, compression):
                continue
            root = project(compression)
            info: dict[str, int] = {}
            cases = {"ocibuild-writer": writer_case(compression, info),
                     "ocibuild-build": build_case(compression, root, stores),
                     **{name: shell_case(cmd) for name, cmd in baselines.items()}}
            log(f"writing the layer with {compression}")
            times = interleave(cases, args.runs)
            base = next(iter(baselines))
            ratios = [(f"throughput ocibuild-writer / {base} (target >= 0.75)", base, "ocibuild-writer"),
                      (f"throughput ocibuild-build / {base}", base, "ocibuild-build")]
            if compression == "gzip":
                ratios += [("throughput ocibuild-writer / tar|pigz-1 (same level)", "tar|pigz-1", "ocibuild-writer")]
            report(f"3. write the {tar_bytes / 1e6:.0f} MB toolchain tree as a {compression} layer", times, ratios,
                   throughput_bytes=tar_bytes, extra=info)
            print(f"  ocibuild's layer: {info['uncompressed'] / 1e6:.1f} MB tar -> {info['compressed'] / 1e6:.1f} MB "
                  f"{compression}")
    finally:
        shutil.rmtree(CACHE / "store-write-runs", ignore_errors=True)  # after timing: deletes slow later writes


if __name__ == "__main__":
    main()
