#!/usr/bin/env python3
"""Generate the benchmark trees once, deterministically, under bench/.cache (reused by every benchmark).

  .cache/rebuild/toolchain   ~466 MB, ~12,000 files: a Go-toolchain-like tree (Go source text, .a archives,
                             large tool binaries, a little random data; some executables, a few symlinks)
  .cache/rebuild/src         ~138 MB, ~10,000 files: a source tree (mostly Go text under vendor/ and
                             friends, some binary test data)
  .cache/write/toolchain     hardlinks to rebuild/toolchain (a second project root for the write benchmark:
                             ocibuild copies only from inside its project directory)

Content is a mix of compressible text (~4x with zstd), half-compressible "binary" and random bytes, so the
compressors do realistic work. Nothing is ever deleted: a re-run rewrites the same bytes in place (on this disk
creating files is much slower for a while after a mass delete). A marker file records a finished generation.

Usage: python3 bench/gen_trees.py [--force]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
CACHE = BENCH / ".cache"
VERSION = "trees-v1"

TOOLCHAIN_BYTES = 466_000_000
SOURCE_BYTES = 138_000_000

_WORDS = (
    "func return if else for range var const type struct interface map chan go defer select case switch default "
    "package import nil err error string int int64 uint32 byte bool true false len cap make new append copy "
    "ctx context fmt Errorf Sprintf buf bytes io Reader Writer sync Mutex Lock Unlock os path filepath strings "
    "Builder HasPrefix TrimSpace Split Join value key name size offset index result config options client "
    "server request response handler status layer image digest manifest store container mount volume network "
    "0 1 2 16 32 64 1024 0xff := = == != <= >= && || ! + - * / { } ( ) [ ] , ; . // /* */ \"\" `json:\"name\"`"
).split()
_NAMES = (
    "api archive build cache client cmd config container context daemon digest distribution engine errors "
    "events exec graph health image internal io layer libnetwork logger manifest mount network oci opts pkg "
    "plugin progress reference registry runtime server store stream sys term testutil types unix util volume "
    "walk zfs aufs btrfs devmapper overlay fuse cgroup seccomp apparmor selinux netlink ipvs bridge proxy dns "
    "crypto tls x509 http json xml yaml proto grpc trace metrics runtime reflect sort strconv sync atomic time"
).split()
_LICENSE = (
    "// Copyright 2024 The Benchmark Authors. All rights reserved.\n"
    "// Use of this source code is governed by a BSD-style license that can be found in the LICENSE file.\n\n"
)


def _text(rng: random.Random, size: int) -> bytes:
    """Go-source-like text of exactly ``size`` bytes (compresses ~4x with zstd -3)."""
    out = bytearray(_LICENSE.encode()[:size])
    while len(out) < size:
        line = " ".join(rng.choices(_WORDS, k=rng.randint(2, 12)))
        out += b"\t" * rng.randint(0, 3) + line.encode() + b"\n"
    return bytes(out[:size])


def _binary(rng: random.Random, size: int) -> bytes:
    """Executable-like bytes: 4 KiB pieces of random data, sparse zeros and text (compresses ~2x)."""
    out = bytearray()
    while len(out) < size:
        roll = rng.random()
        if roll < 0.4:
            out += rng.randbytes(4096)
        elif roll < 0.7:
            piece = bytearray(4096)
            for _ in range(64):
                piece[rng.randrange(4096)] = rng.randrange(256)
            out += piece
        else:
            out += _text(rng, 4096)
    return bytes(out[:size])


def _content(rng: random.Random, kind: str, size: int) -> bytes:
    if kind == "text":
        return _text(rng, size)
    if kind == "bin":
        return _binary(rng, size)
    return rng.randbytes(size)


def _scaled(rng: random.Random, count: int, total: int, median: float, sigma: float) -> list[int]:
    """``count`` lognormal sizes scaled to sum to exactly ``total``."""
    raw = [rng.lognormvariate(0, sigma) * median for _ in range(count)]
    factor = total / sum(raw)
    sizes = [max(0, int(r * factor)) for r in raw]
    sizes[sizes.index(max(sizes))] += total - sum(sizes)
    return sizes


def _package_dirs(rng: random.Random, top: str, count: int) -> list[str]:
    dirs: list[str] = []
    seen: set[str] = set()
    while len(dirs) < count:
        depth = rng.choice((1, 2, 2, 3, 3, 4))
        path = "/".join([top, *rng.sample(_NAMES, depth)])
        if path not in seen:
            seen.add(path)
            dirs.append(path)
    return dirs


Plan = list[tuple[str, str, int, int]]  # (relative path, kind, size, mode)


def _spread(rng: random.Random, plan: Plan, dirs: list[str], kind: str, sizes: list[int], ext: str,
            mode: int = 0o644) -> None:
    for i, size in enumerate(sizes):
        d = rng.choice(dirs)
        plan.append((f"{d}/{rng.choice(_NAMES)}_{i}{ext}", kind, size, mode))


def toolchain_plan() -> tuple[Plan, list[tuple[str, str]]]:
    rng = random.Random(466)
    plan: Plan = []
    total = TOOLCHAIN_BYTES
    _spread(rng, plan, _package_dirs(rng, "src", 700), "text", _scaled(rng, 11_000, int(total * 0.26), 6000, 1.1), ".go")
    _spread(rng, plan, _package_dirs(rng, "test", 40), "text", _scaled(rng, 300, int(total * 0.02), 3000, 1.0), ".go")
    _spread(rng, plan, _package_dirs(rng, "pkg/linux_amd64", 120), "bin", _scaled(rng, 560, int(total * 0.40), 300_000, 1.2), ".a")
    _spread(rng, plan, ["pkg/tool/linux_amd64"], "bin", _scaled(rng, 24, int(total * 0.17), 3_000_000, 0.6), "", 0o755)
    _spread(rng, plan, ["bin"], "bin", _scaled(rng, 3, int(total * 0.08), 12_000_000, 0.2), "", 0o755)
    _spread(rng, plan, _package_dirs(rng, "src/testdata", 30), "rand", _scaled(rng, 100, int(total * 0.04), 100_000, 1.5), ".bin")
    _spread(rng, plan, ["misc", "lib/time", "api", "doc"], "text", _scaled(rng, 13, total - sum(p[2] for p in plan), 80_000, 1.0), ".txt")
    links = [("bin/go-latest", plan[-120][0].split("/")[-1]), ("misc/src", "../src"), ("doc/api", "../api")]
    return plan, links


def source_plan() -> tuple[Plan, list[tuple[str, str]]]:
    rng = random.Random(138)
    plan: Plan = []
    total = SOURCE_BYTES
    _spread(rng, plan, _package_dirs(rng, "vendor", 450), "text", _scaled(rng, 7_000, int(total * 0.50), 5000, 1.1), ".go")
    _spread(rng, plan, _package_dirs(rng, "daemon", 150), "text", _scaled(rng, 2_500, int(total * 0.25), 6000, 1.0), ".go")
    _spread(rng, plan, _package_dirs(rng, "docs", 20), "text", _scaled(rng, 300, int(total * 0.05), 4000, 1.0), ".md")
    _spread(rng, plan, _package_dirs(rng, "hack", 5), "text", _scaled(rng, 50, int(total * 0.01), 3000, 0.8), ".sh", 0o755)
    _spread(rng, plan, _package_dirs(rng, "integration/testdata", 20), "bin", _scaled(rng, 120, int(total * 0.12), 50_000, 1.5), ".bin")
    _spread(rng, plan, _package_dirs(rng, "vendor/testdata", 10), "rand", _scaled(rng, 30, total - sum(p[2] for p in plan), 50_000, 1.5), ".dat")
    links = [("hack/make", "make.sh"), ("docs/vendor", "../vendor")]
    return plan, links


def write_tree(root: Path, plan: Plan, links: list[tuple[str, str]], seed: int) -> None:
    rng = random.Random(seed)
    made: set[str] = set()
    for rel, kind, size, mode in plan:
        path = root / rel
        parent = str(path.parent)
        if parent not in made:
            path.parent.mkdir(parents=True, exist_ok=True)
            made.add(parent)
        data = _content(rng, kind, size)
        with open(path, "wb") as f:
            f.write(data)
        os.chmod(path, mode)
    for rel, target in links:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.is_symlink():
            os.symlink(target, path)


def hardlink_tree(source: Path, dest: Path) -> None:
    for dirpath, dirnames, filenames in os.walk(source):
        rel = os.path.relpath(dirpath, source)
        target_dir = dest / rel
        target_dir.mkdir(parents=True, exist_ok=True)
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            src, dst = os.path.join(dirpath, name), target_dir / name
            if os.path.lexists(dst):
                continue
            if os.path.islink(src):
                os.symlink(os.readlink(src), dst)
            else:
                os.link(src, dst)


def ensure_trees(force: bool = False) -> None:
    marker = CACHE / f"{VERSION}.done"
    if marker.exists() and not force:
        return
    for name, (plan, links), seed in (("toolchain", toolchain_plan(), 1), ("src", source_plan(), 2)):
        root = CACHE / "rebuild" / name
        print(f"gen_trees: writing {root} ({len(plan)} files, {sum(p[2] for p in plan) / 1e6:.0f} MB)",
              file=sys.stderr, flush=True)
        write_tree(root, plan, links, seed)
    print("gen_trees: hardlinking write/toolchain", file=sys.stderr, flush=True)
    hardlink_tree(CACHE / "rebuild" / "toolchain", CACHE / "write" / "toolchain")
    marker.write_text("done\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="rewrite the trees even when the marker exists")
    args = parser.parse_args()
    CACHE.mkdir(parents=True, exist_ok=True)
    ensure_trees(args.force)


if __name__ == "__main__":
    main()
