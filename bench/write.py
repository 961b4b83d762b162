#!/usr/bin/env python3
"""Target 3: writing the ~466 MB, 12,000-file toolchain tree as one compressed layer, ocibuild vs tar + zstd/pigz.

Cases, interleaved round by round (each case once per round, order reversed every other round):

  zstd  ocibuild-writer    tarlayer.write_layer alone, in process, to a null sink (only the write is timed)
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
import shutil
import time
from pathlib import Path

from _harness import (CACHE, OCIBUILD, PYTHON, WITH_PYC, Case, interleave, log, prepare_inputs, report, run,
                      timed, write_if_changed)

BENCH = Path(__file__).resolve().parent
TREE = CACHE / "rebuild" / "toolchain"
TAR = "tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -C {root} -cf - {name}"


def project(compression: str) -> Path:
    """A project whose only layer copies (hardlinks of) the toolchain tree; its stat cache, seeded once."""
    import gen_trees

    root = CACHE / f"write-{compression}"
    gen_trees.hardlink_tree(TREE, root / "toolchain")
    write_if_changed(root / "ocibuild.toml",
                     f'[image]\nname = "bench-write"\nlayers = ["toolchain"]\ncompression = "{compression}"\n')
    write_if_changed(root / "layers/toolchain/layer.toml", 'kind = "copy"\nfrom = "toolchain"\nto = "/usr/local/go"\n')
    seed = CACHE / f"store-write-seed-{compression}"
    if not (seed / "ocibuild/statcache/files.json").exists():
        log(f"seeding the stat cache of {root.name} (one full build)")
        run([OCIBUILD, "build", "-C", str(root), "--store", str(seed)], env=WITH_PYC)
    return root


def writer_case(compression: str, info: dict[str, int]) -> Case:
    def case(_: int) -> float:
        _, proc = timed([PYTHON, str(BENCH / "_write_layer.py"), str(TREE), compression], env=WITH_PYC)
        result = json.loads(proc.stdout)
        info.update(uncompressed=result["uncompressed"], compressed=result["compressed"])
        return float(result["seconds"])
    return case


def build_case(compression: str, root: Path, stores: list[Path]) -> Case:
    seed = CACHE / f"store-write-seed-{compression}" / "ocibuild/statcache/files.json"

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
