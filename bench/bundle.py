#!/usr/bin/env python3
"""Issue 5: `ocibuild export` / `ocibuild import` against `skopeo copy` of the same ~1.2 GB image.

The image (made once, cached under .cache/bundle/): 8 zstd layers written with the store — 6 of incompressible
data, 2 of text-like data that compresses — about 1.2 GB of blobs. Layers are compressed, so skopeo copies them
as they are (it would gzip uncompressed layers, which measures gzip).

Cases, interleaved round by round (order reversed every other round), each timed with /usr/bin/time -v for the
peak RSS; every run starts after an untimed `sync`, and writes into a fresh target:

  export  ocibuild   ocibuild export --all OUT.tar          (every blob hashed and checked while it is copied)
          skopeo     skopeo copy oci:STORE:bench oci-archive:OUT.tar:bench
  import  ocibuild   ocibuild import ARCHIVE into a fresh store (every blob hashed and checked; each committed
                     blob's writeback started at once, one Store.sync of all blobs before index.json is written)
          skopeo     skopeo copy oci-archive:ARCHIVE:bench oci:FRESH:bench (skopeo fsyncs each blob)

Each import reads the archive the same tool exported in that round. After the last round, the imported stores
are checked: `ocibuild verify` of ocibuild's, and each holds the same manifest digest as the source.

Usage: python3 bench/bundle.py [--runs N]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from _harness import CACHE, OCIBUILD, REPO, WITH_PYC, Case, interleave, log, report, run

WORK = CACHE / "bundle"
SOURCE = WORK / "store"
TAG = "bench"
SKOPEO = shutil.which("skopeo") or "skopeo"


def make_image() -> int:
    """The source store with the bench image (made once); returns the bytes of its blobs."""
    marker = WORK / "store.done"
    if not marker.exists():
        log("making the ~1.2 GB bench image (once)")
        shutil.rmtree(SOURCE, ignore_errors=True)
        sys.path.insert(0, str(REPO / "src"))
        from ocibuild import oci
        from ocibuild.tar import write
        from ocibuild.oci import Descriptor, ImageConfig, Manifest
        from ocibuild.store import Store

        store = Store.open(SOURCE)
        files = WORK / "files"
        files.mkdir(parents=True, exist_ok=True)
        rng = random.Random(5)
        words = [bytes(rng.choice(b"abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 10))) for _ in range(20000)]
        layers, diff_ids = [], []
        for i in range(8):
            entries = []
            text = i in (2, 5)
            for j in range(40 if text else 23):
                path = files / f"{i}-{j}"
                with open(path, "wb") as out:
                    if text:  # ~8 MB of words and numbers: zstd -3 makes about a third of it
                        line = b" ".join(rng.choices(words, k=200_000))
                        out.write(line + b"\n" + str(rng.random()).encode() * 1000)
                    else:
                        out.write(os.urandom(8 << 20))
                entries.append(write.Entry(f"data/{i}/{j}", "file", 0o644, size=path.stat().st_size,
                                              source=str(path)))
            with store.writer() as blob:
                stats = write.write_layer(write.with_parents(entries), blob, "zstd", epoch=0)  # type: ignore[arg-type]
            layers.append(Descriptor(oci.LAYER_ZSTD, blob.digest, blob.size))
            diff_ids.append(stats.diff_id)
        config = store.put(ImageConfig(diff_ids=tuple(diff_ids)).to_json(), oci.OCI_CONFIG)
        store.tag(TAG, store.put_manifest(Manifest(config, tuple(layers))))
        shutil.rmtree(files)
        marker.write_text("ok\n")
    return sum(p.stat().st_size for p in (SOURCE / "blobs" / "sha256").iterdir())


def timed_rss(argv: list[str], env: dict[str, str | None] | None = None) -> tuple[float, int]:
    """(seconds, peak RSS in KB) of one run, after an untimed sync."""
    os.sync()
    start = time.perf_counter()
    proc = run(["/usr/bin/time", "-v", *argv], env=env)
    seconds = time.perf_counter() - start
    match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    assert match, proc.stderr[-2000:]
    return seconds, int(match.group(1))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    size = make_image()
    log(f"bench image: {size / 1e6:.0f} MB of blobs")
    rss: dict[str, list[int]] = {}

    def fresh(path: Path) -> Path:
        shutil.rmtree(path, ignore_errors=True)
        if path.suffix == ".tar":
            path.unlink(missing_ok=True)
        return path

    def case(name: str, argv_of: Callable[[], list[str]], env: dict[str, str | None] | None = None) -> Case:
        def go(i: int) -> float:
            seconds, kb = timed_rss(argv_of(), env)
            rss.setdefault(name, []).append(kb)
            return seconds
        return go

    ours_tar, skopeo_tar = WORK / "ours.tar", WORK / "skopeo.tar"
    ours_store, skopeo_store = WORK / "ours-in", WORK / "skopeo-in"
    store_env: dict[str, str | None] = {**WITH_PYC, "OCIBUILD_STORE": str(SOURCE)}
    import_env: dict[str, str | None] = {**WITH_PYC, "OCIBUILD_STORE": str(ours_store)}
    export_cases = {
        "ocibuild export": case("ocibuild export", lambda: [OCIBUILD, "export", "--all", str(fresh(ours_tar))],
                                store_env),
        "skopeo export": case("skopeo export", lambda: [SKOPEO, "--insecure-policy", "copy", "-q",
                                                        f"oci:{SOURCE}:{TAG}", f"oci-archive:{fresh(skopeo_tar)}:{TAG}"]),
    }
    import_cases = {
        "ocibuild import": case("ocibuild import", lambda: [OCIBUILD, "import", str(ours_tar),
                                                            "--store", str(fresh(ours_store))], import_env),
        "skopeo import": case("skopeo import", lambda: [SKOPEO, "--insecure-policy", "copy", "-q",
                                                        f"oci-archive:{skopeo_tar}:{TAG}", f"oci:{fresh(skopeo_store)}:{TAG}"]),
    }
    times: dict[str, list[float]] = {name: [] for name in [*export_cases, *import_cases]}
    for i in range(args.runs):  # each round: both exports, then both imports of what they wrote
        for group in (export_cases, import_cases):
            got = interleave(group, 1) if i % 2 == 0 else interleave(dict(reversed(group.items())), 1)
            for name, ts in got.items():
                times[name] += ts
    # the last round's imports: both stores hold the image, ocibuild's verifies clean
    run([OCIBUILD, "verify", "--store", str(ours_store)], env=WITH_PYC)
    source_digest = json.loads((SOURCE / "index.json").read_text())["manifests"][0]["digest"]
    for store in (ours_store, skopeo_store):
        digests = [m["digest"] for m in json.loads((store / "index.json").read_text())["manifests"]]
        assert source_digest in digests, (store, digests)
    peak = {name: max(kbs) / 1024 for name, kbs in rss.items()}
    report("bundle: export and import of a ~1.2 GB image, ocibuild vs skopeo", times,
                    ratios=[("export speed-up", "skopeo export", "ocibuild export"),
                            ("import speed-up", "skopeo import", "ocibuild import")],
                    throughput_bytes=size, extra={"peak_rss_mb": peak, "rss_kb": rss})
    for name, mb in peak.items():
        print(f"  peak RSS {name}: {mb:.0f} MB")
    subprocess.run(["sync"])


if __name__ == "__main__":
    main()
