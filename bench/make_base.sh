#!/bin/bash
# Make the base image both tools build on, once: bench/.cache/base.tar, an oci-archive tagged "base".
#
# BENCH_BASE=debian (default): Debian bookworm minbase by mmdebstrap (needs the Debian archive; /dev left out).
# BENCH_BASE=tiny: a tar of a few files, for machines that cannot reach the archive.
# BENCH_BASE_OUT=PATH: write PATH instead (moby.py's base); BENCH_BASE_DEB_SRC=1: also a deb-src line in the
# image's sources list (for `apt-get build-dep`), and no tiny fallback.
# The layer is added with umoci (a peer tool), so neither benchmarked tool made its own base.
set -euo pipefail
cache="$(cd "$(dirname "$0")" && pwd)/.cache"
out="${BENCH_BASE_OUT:-$cache/base.tar}"
[ -s "$out" ] && exit 0
mkdir -p "$cache" "$(dirname "$out")"
work="$out.work"
rm -rf "$work" && mkdir -p "$work"
rootfs="$work/rootfs.tar"
mirror=http://deb.debian.org/debian
sources=("$mirror")
[ -n "${BENCH_BASE_DEB_SRC:-}" ] && sources=("deb $mirror bookworm main" "deb-src $mirror bookworm main")
if [ "${BENCH_BASE:-debian}" = debian ] && \
   mmdebstrap --quiet --variant=minbase --skip=output/dev --mode=root bookworm "$rootfs" "${sources[@]}" >&2; then
  :
elif [ -n "${BENCH_BASE_DEB_SRC:-}" ]; then
  echo "make_base: mmdebstrap failed, and a tiny base cannot build Debian sources" >&2
  exit 1
else
  echo "make_base: using a tiny base (BENCH_BASE=${BENCH_BASE:-debian}, or mmdebstrap failed)" >&2
  mkdir -p "$work/tiny/etc" "$work/tiny/bin" "$work/tiny/tmp"
  echo 'PRETTY_NAME="bench tiny base"' > "$work/tiny/etc/os-release"
  echo 'root:x:0:0:root:/root:/bin/sh' > "$work/tiny/etc/passwd"
  tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -C "$work/tiny" -cf "$rootfs" .
fi
layout="$work/layout"
umoci init --layout "$layout"
umoci new --image "$layout:base"
umoci raw add-layer --image "$layout:base" "$rootfs"
umoci config --image "$layout:base" --config.cmd /bin/sh
umoci gc --layout "$layout"
tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -C "$layout" -cf "$out.tmp" .
mv "$out.tmp" "$out"
rm -rf "$work"
echo "make_base: wrote $out ($(du -h "$out" | cut -f1))" >&2
