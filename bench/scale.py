#!/usr/bin/env python3
"""Issue 12, class 7: costs that grow with the work, not faster.

Each case runs in a child process of its own (a fresh interpreter), timed there; its peak RSS is that process's
``resource.getrusage(RUSAGE_SELF).ru_maxrss``. Inputs are generated once under .cache/scale/.

  import N      `ocibuild import` (the CLI, in process) of an oci-archive of N cache entries (one shared layer,
                a config and a manifest each) into a fresh store; N = 1,000 / 4,000 / 16,000 (--tags)
  verify N      `ocibuild verify` of that store
  listing N     the read every layer ocibuild did not write gets once (a pulled, imported or base layer): its
                listing and bookkeeping record (build.listing.layer_listing), of a gzip layer of N entries (a
                directory and N - 1 empty files); N = 100,000 / 300,000 / 1,000,000 (--files). More than 1,000,000
                entries are refused (the documented bound): 3,000,000 shows how soon.
  tarball N     the entries of an `archive` layer's tarball (write.tarball_entries) in which each of N files
                appears twice, the second time with a hardlink beside it: every entry replaces an earlier one;
                N = 10,000 / 40,000 / 160,000 (--replaced)

A cost that grows with the work shows as a constant time per item across N; the report prints it.

Usage: python3 bench/scale.py [--tags 1000,4000,16000] [--files 100000,300000,1000000,3000000]
                              [--replaced 10000,40000,160000]
``BENCH_SRC`` points the cases at another ocibuild source tree (an older commit's ``src``, for a before/after).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
SRC = os.environ.get("BENCH_SRC", str(REPO / "src"))
WORK = BENCH / ".cache" / "scale"
RESULTS = BENCH / ".cache" / "results"
sys.path.insert(0, SRC)


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------------- inputs


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), 0o644
    tar.addfile(info, io.BytesIO(data))


def tags_archive(count: int) -> Path:
    """An oci-archive of ``count`` cache entries sharing one layer (made once)."""
    from ocibuild import oci
    from ocibuild.oci import Descriptor, Digest, ImageConfig, Index, Manifest

    path = WORK / f"tags-{count}.tar"
    if path.exists():
        return path
    _log(f"making an archive of {count} cache entries")
    WORK.mkdir(parents=True, exist_ok=True)
    raw = b"x" * 1024
    layer_data = gzip.compress(raw, mtime=0)
    layer = Descriptor(oci.LAYER_GZIP, Digest.of(layer_data), len(layer_data))
    tmp = path.with_suffix(".part")
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        _add(tar, "oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
        _add(tar, f"blobs/sha256/{layer.digest.hex}", layer_data)
        tagged = []
        for n in range(count):
            key = Digest.of(f"key {n}".encode())
            labels = {"dev.ocibuild.layer.name": f"layer{n % 50}", "dev.ocibuild.layer.key": str(key)}
            config = ImageConfig(diff_ids=(Digest.of(raw),), labels=labels).to_json()
            _add(tar, f"blobs/sha256/{Digest.of(config).hex}", config)
            manifest = Manifest(Descriptor(oci.OCI_CONFIG, Digest.of(config), len(config)), (layer,)).to_json()
            _add(tar, f"blobs/sha256/{Digest.of(manifest).hex}", manifest)
            tag = f"layer{n % 50}-{key.hex}"
            tagged.append(Descriptor(oci.OCI_MANIFEST, Digest.of(manifest), len(manifest),
                                     {oci.ANNOTATION_REF_NAME: tag}))
        _add(tar, "index.json", Index(tuple(tagged)).to_json())
    tmp.rename(path)
    return path


def empty_files_layer(count: int) -> Path:
    """A gzip layer of ``count`` entries, a directory and its empty files (made once): ~7 bytes of gzip each."""
    path = WORK / f"entries-{count}.tar.gz"
    if path.exists():
        return path
    _log(f"making a layer of {count} empty files")
    WORK.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".part")
    with gzip.open(tmp, "wb", compresslevel=6) as out:
        folder = tarfile.TarInfo("d")
        folder.type, folder.mode = tarfile.DIRTYPE, 0o755
        out.write(folder.tobuf(format=tarfile.USTAR_FORMAT))
        info = tarfile.TarInfo("")
        info.mode = 0o644
        chunk = []
        for n in range(count - 1):
            info.name = f"d/{n:08d}"
            chunk.append(info.tobuf(format=tarfile.USTAR_FORMAT))
            if len(chunk) == 10_000:
                out.write(b"".join(chunk))
                chunk = []
        out.write(b"".join(chunk) + bytes(1024))
    tmp.rename(path)
    return path


def replacing_tarball(count: int) -> Path:
    """An uncompressed tarball of ``count`` files, each written twice and then hardlinked (made once)."""
    path = WORK / f"replaced-{count}.tar"
    if path.exists():
        return path
    _log(f"making a tarball of {count} files written twice")
    WORK.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".part")
    with open(tmp, "wb") as out:
        info = tarfile.TarInfo("")
        link = tarfile.TarInfo("")
        link.type = tarfile.LNKTYPE
        for round_ in range(2):
            chunk = []
            for n in range(count):
                info.name = f"f{n:08d}"
                chunk.append(info.tobuf(format=tarfile.USTAR_FORMAT))
                if round_:
                    link.name, link.linkname = f"l{n:08d}", info.name
                    chunk.append(link.tobuf(format=tarfile.USTAR_FORMAT))
            out.write(b"".join(chunk))
        out.write(bytes(1024))
    tmp.rename(path)
    return path


# -------------------------------------------------------------------------------------------- the cases (child)


def child(case: str, count: int) -> dict[str, object]:
    """Run one case in this process: its seconds and outcome."""
    from ocibuild.cli import main

    store = WORK / f"store-{case}-{count}"
    result: dict[str, object] = {}
    if case == "import":
        archive = tags_archive(count)
        shutil.rmtree(store, ignore_errors=True)
        start = time.perf_counter()
        code = main(["--store", str(store), "-q", "import", str(archive), "--json"])
        result["outcome"] = "ok" if code == 0 else f"exit {code}"
    elif case == "verify":
        store = WORK / f"store-import-{count}"
        start = time.perf_counter()
        code = main(["--store", str(store), "-q", "verify"])
        result["outcome"] = "ok" if code == 0 else f"exit {code}"
    elif case == "tarball":
        from ocibuild.tar import write

        tarball = replacing_tarball(count)
        start = time.perf_counter()
        result["outcome"] = f"{len(write.tarball_entries(tarball, what='bench'))} entries"
    else:
        from ocibuild import oci
        from ocibuild.build.listing import layer_listing
        from ocibuild.errors import OcibuildError
        from ocibuild.oci import Digest, LayerBlob
        from ocibuild.store import Store

        layer = empty_files_layer(count)
        shutil.rmtree(store, ignore_errors=True)
        target = Store.open(store)
        descriptor = target.put_file(layer, oci.LAYER_GZIP)
        with gzip.open(layer, "rb") as f:
            diff_id = Digest("sha256", hashlib.file_digest(f, "sha256").hexdigest())  # type: ignore[arg-type]
        start = time.perf_counter()
        try:
            result["outcome"] = f"{len(layer_listing(target, LayerBlob(descriptor, diff_id)))} paths"
        except OcibuildError as err:
            result["outcome"] = f"refused: {err}"
    result["seconds"] = time.perf_counter() - start
    result["rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if case != "import":
        shutil.rmtree(store, ignore_errors=True)
    return result


# ------------------------------------------------------------------------------------------------------ parent


def measure(case: str, count: int) -> dict[str, object]:
    if case == "listing":
        empty_files_layer(count)  # made outside the timed child
    elif case == "import":
        tags_archive(count)
    elif case == "tarball":
        replacing_tarball(count)
    env = dict(os.environ, PYTHONPATH=SRC)
    proc = subprocess.run([sys.executable, __file__, "--child", case, str(count)], env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if proc.returncode != 0:
        sys.exit(f"{case} {count} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    result: dict[str, object] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tags", default="1000,4000,16000")
    parser.add_argument("--files", default="100000,300000,1000000,3000000")
    parser.add_argument("--replaced", default="10000,40000,160000")
    parser.add_argument("--child", nargs=2, metavar=("CASE", "COUNT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]))))
        return
    rows = []
    for case, counts, unit in (("import", args.tags, "tag"), ("verify", args.tags, "tag"),
                               ("listing", args.files, "file"), ("tarball", args.replaced, "file")):
        for count in (int(c) for c in counts.split(",") if c):
            _log(f"{case} {count}")
            result = measure(case, count)
            rows.append({"case": case, "count": count, "unit": unit, **result})
            seconds = float(result["seconds"])  # type: ignore[arg-type]
            print(f"{case:8} {count:>9,}  {seconds:8.2f} s  {seconds / count * 1e6:7.1f} µs/{unit}  "
                  f"peak RSS {float(result['rss_mb']):7.0f} MB  {result['outcome']}", flush=True)  # type: ignore[arg-type]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"scale-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
