#!/bin/sh
# Like Docker's hack/make.sh: `hack/make.sh binary` builds bundles/<version>/binary/ with checksums.
set -eu
cd "$(dirname "$0")/.."
version=$(cat VERSION)
for target in "$@"; do
  case "$target" in
    binary)
      out="bundles/$version/binary"
      mkdir -p "$out"
      go build -buildvcs=false -o "$out/devmapper-version-$version" .
      ln -sf "devmapper-version-$version" "$out/devmapper-version"
      (cd "$out" && sha256sum "devmapper-version-$version" > "devmapper-version-$version.sha256" \
                 && md5sum "devmapper-version-$version" > "devmapper-version-$version.md5")
      echo "Created binary: $out/devmapper-version-$version"
      ;;
    *) echo "hack/make.sh: unknown target '$target' (known: binary)" >&2; exit 2 ;;
  esac
done
