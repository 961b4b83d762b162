"""Push and pull through the real docker-registry on loopback: ocibuild side by side with skopeo.

    .venv/bin/python bench/registry.py [--reps 3] [--scale 1.0] [--workdir DIR]

One image of three layers — a ~470 MB toolchain-like layer (half compressible text, half random), a ~140 MB
source-like layer and a 1 GiB incompressible layer — is written once into an OCI layout that is both ocibuild's
store and skopeo's ``oci:`` source. Then, each repeated ``--reps`` times on fresh repositories: push (ocibuild
``push`` vs ``skopeo copy oci: docker://``), pull into an empty layout (ocibuild's fetch, the code path of
``pull-cache`` and image layers, vs ``skopeo copy docker:// oci:``), re-push and re-pull with everything present,
and a push of the same image to a second repository (cross-repository mounts). Every run is under
``/usr/bin/time -v`` for its peak RSS. Prints medians and ocibuild/skopeo time ratios; ``--json`` for a document.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from ocibuild import oci  # noqa: E402
from ocibuild.store import Store  # noqa: E402

MB = 1_000_000


def start_registry(base: Path) -> tuple[subprocess.Popen[bytes], str]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = {"version": 0.1, "log": {"level": "error", "accesslog": {"disabled": True}},
              "storage": {"filesystem": {"rootdirectory": str(base / "storage")}},
              "http": {"addr": f"127.0.0.1:{port}", "secret": os.urandom(8).hex()}}
    base.mkdir(parents=True, exist_ok=True)
    (base / "config.yml").write_text(json.dumps(config))
    process = subprocess.Popen(["/usr/bin/docker-registry", "serve", str(base / "config.yml")],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(300):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=1).close()
            return process, f"127.0.0.1:{port}"
        except OSError:
            time.sleep(0.05)
    raise SystemExit("docker-registry did not start")


def write_blob(store: Store, size: int, seed: int, compressible: float) -> oci.Descriptor:
    """``size`` bytes: the ``compressible`` fraction is repetitive text, the rest random (like gzip output)."""
    rng = random.Random(seed)
    text = b"".join(f"/usr/local/go/src/pkg{i}/file{i}.go: func F{i}() {{ return }}\n".encode() for i in range(4000))
    with store.writer(sync=False) as blob:
        written = 0
        while written < size:
            n = min(1 << 20, size - written)
            piece = text[:n] if rng.random() < compressible else rng.randbytes(n)
            blob.write(piece)
            written += n
    store.sync()
    return oci.Descriptor(oci.LAYER_GZIP, blob.digest, blob.size)


def make_image(store: Store, scale: float) -> oci.Descriptor:
    layers = [write_blob(store, int(470 * MB * scale), 1, 0.5), write_blob(store, int(140 * MB * scale), 2, 0.3),
              write_blob(store, int((1 << 30) * scale), 3, 0.0)]
    config = store.put(oci.ImageConfig(diff_ids=tuple(l.digest for l in layers)).to_json(), oci.OCI_CONFIG)
    manifest = store.put_manifest(oci.Manifest(config, tuple(layers)))
    store.tag("bench", manifest)
    return manifest


def timed(argv: list[str], env: dict[str, str] | None = None) -> tuple[float, float, str]:
    """(seconds, peak RSS MB, stdout) of a command under /usr/bin/time -v."""
    start = time.monotonic()
    result = subprocess.run(["/usr/bin/time", "-v", *argv], capture_output=True, text=True,
                            env={**os.environ, **(env or {})})
    seconds = time.monotonic() - start
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{result.stderr[-3000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr).group(1)) / 1000  # type: ignore[union-attr]
    return seconds, rss, result.stdout


def fetch_argv(host: str, repository: str, digest: str, target: Path) -> list[str]:
    code = ("import sys; from pathlib import Path; from ocibuild import registry, oci; from ocibuild.store import Store;"
            "r = registry.Registries(); s = Store.open(Path(sys.argv[4]));"
            "registry.fetch_image(r.client(sys.argv[1]), s, sys.argv[2], oci.Digest.parse(sys.argv[3]));"
            "print(r.stats.to_dict())")
    return [sys.executable, "-c", code, host, repository, digest, str(target)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--scale", type=float, default=1.0, help="layer sizes relative to the defaults")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ocibuild-bench-", dir=args.workdir))
    process, host = start_registry(work)
    results: dict[str, list[tuple[float, float]]] = {}
    extra: dict[str, object] = {}

    def record(name: str, seconds: float, rss: float) -> None:
        results.setdefault(name, []).append((seconds, rss))

    try:
        store = Store.open(work / "store")
        manifest = make_image(store, args.scale)
        total = sum(l.size for l in store.get_manifest(manifest.digest).layers)
        project = work / "project"
        (project / "layers/x").mkdir(parents=True)
        (project / "ocibuild.toml").write_text('[image]\nname = "bench"\nlayers = ["x"]\n')
        (project / "layers/x/layer.toml").write_text('kind = "copy"\nfrom = "layers/x"\nto = "/x"\n')
        script = Path(sys.executable).with_name("ocibuild")  # the console script, as users start it
        ocibuild = [str(script)] if script.exists() else [sys.executable, "-m", "ocibuild.cli"]
        env = {"PYTHONPATH": str(ROOT / "src"), "OCIBUILD_CONFIG": str(work / "none.toml")}
        skopeo = ["skopeo", "--insecure-policy"]
        for rep in range(args.reps):
            # a fresh registry per tool and repetition: neither finds blobs the other (or an earlier run) left
            reg_o, host_o = start_registry(work / f"reg-ocibuild-{rep}")
            reg_s, host_s = start_registry(work / f"reg-skopeo-{rep}")
            try:
                ocb_repo, sko_repo = f"bench/ocibuild-{rep}", f"bench/skopeo-{rep}"
                # push
                s, rss, out = timed([*ocibuild, "push", f"{host_o}/{ocb_repo}:v1", "--json", "-C", str(project),
                                     "--store", str(store.root)], env)
                record("push ocibuild", s, rss)
                s, rss, _ = timed([*skopeo, "copy", "-q", "--dest-tls-verify=false", f"oci:{store.root}:bench",
                                   f"docker://{host_s}/{sko_repo}:v1"])
                record("push skopeo", s, rss)
                # re-push, everything present
                s, rss, out = timed([*ocibuild, "push", f"{host_o}/{ocb_repo}:v1", "--json", "-C", str(project),
                                     "--store", str(store.root)], env)
                record("re-push ocibuild", s, rss)
                record("re-push ocibuild (in-process)", json.loads(out)["seconds"], rss)
                s, rss, _ = timed([*skopeo, "copy", "-q", "--dest-tls-verify=false", f"oci:{store.root}:bench",
                                   f"docker://{host_s}/{sko_repo}:v1"])
                record("re-push skopeo", s, rss)
                # a second repository of the same registry: mounts
                s, rss, out = timed([*ocibuild, "push", f"{host_o}/{ocb_repo}-second:v1", "--json", "-C", str(project),
                                     "--store", str(store.root)], env)
                record("second-repo push ocibuild", s, rss)
                extra[f"second-repo transfer {rep}"] = json.loads(out)["transfer"]
                s, rss, _ = timed([*skopeo, "copy", "-q", "--dest-tls-verify=false", f"oci:{store.root}:bench",
                                   f"docker://{host_s}/{sko_repo}-second:v1"])
                record("second-repo push skopeo", s, rss)
                # pull into empty layouts
                target = work / f"pull-ocibuild-{rep}"
                s, rss, _ = timed(fetch_argv(host_o, ocb_repo, str(manifest.digest), target), env)
                record("pull ocibuild", s, rss)
                s, rss, _ = timed(fetch_argv(host_o, ocb_repo, str(manifest.digest), target), env)
                record("re-pull ocibuild", s, rss)
                assert Store.open(target).verify() == []
                shutil.rmtree(target)
                sko_target = work / f"pull-skopeo-{rep}"
                s, rss, _ = timed([*skopeo, "copy", "-q", "--src-tls-verify=false", f"docker://{host_s}/{sko_repo}:v1",
                                   f"oci:{sko_target}:bench"])
                record("pull skopeo", s, rss)
                s, rss, _ = timed([*skopeo, "copy", "-q", "--src-tls-verify=false", f"docker://{host_s}/{sko_repo}:v1",
                                   f"oci:{sko_target}:bench"])
                record("re-pull skopeo", s, rss)
                shutil.rmtree(sko_target)

            finally:
                for reg in (reg_o, reg_s):
                    reg.terminate()
                    reg.wait()
                shutil.rmtree(work / f"reg-ocibuild-{rep}", ignore_errors=True)
                shutil.rmtree(work / f"reg-skopeo-{rep}", ignore_errors=True)
    finally:
        process.terminate()
        process.wait()
        shutil.rmtree(work, ignore_errors=True)

    summary = {name: {"median_s": round(statistics.median(s for s, _ in runs), 3),
                      "peak_rss_mb": round(max(r for _, r in runs), 1)} for name, runs in results.items()}
    ratios = {}
    for op in ("push", "pull", "re-push", "re-pull", "second-repo push"):
        ours, theirs = summary[f"{op} ocibuild"]["median_s"], summary[f"{op} skopeo"]["median_s"]
        ratios[op] = round(ours / theirs, 3)
    doc = {"bytes": total, "reps": args.reps, "results": summary, "ratio_ocibuild_over_skopeo": ratios, **extra}
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print(f"image: {total / MB:.0f} MB in 3 layers, {args.reps} repetitions, medians")
        for name, value in summary.items():
            mbps = f"  {total / MB / value['median_s']:7.0f} MB/s" if name.split()[0] in ("push", "pull") else ""
            print(f"{name:<32} {value['median_s']:8.3f} s{mbps}  peak RSS {value['peak_rss_mb']:6.1f} MB")
        for op, ratio in ratios.items():
            print(f"ratio {op:<18} ocibuild/skopeo = {ratio}")
        for key, value in extra.items():
            print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
