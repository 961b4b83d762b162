"""Helper of write.py: time ocibuild's layer writer alone, in process, writing DIR to a null sink.

Prints one JSON line: {"seconds", "uncompressed", "compressed", "entries"}. Only write_layer is timed; the tree
walk before it (building the Entry list the way build.copy.build_copy does, each file with the content digest the
planning walk found, so the writer hashes each file as it streams it and compares, as a copy layer's does) is not.

Usage: python bench/_write_layer.py DIR zstd|gzip|none [--profile FILE]
"""

from __future__ import annotations

import cProfile
import hashlib
import json
import os
import stat
import sys
import time

from ocibuild.tar import write
from ocibuild.tar.write import Entry


class NullSink:
    def __init__(self) -> None:
        self.size = 0

    def write(self, data: bytes) -> int:
        n = len(data)
        self.size += n
        return n


def entries(root: str, to: str = "usr/local/go") -> list[Entry]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        base = to if rel == "." else f"{to}/{rel}"
        out.append(Entry(base, "dir", 0o755))
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                out.append(Entry(f"{base}/{name}", "symlink", 0o777, linkname=os.readlink(path)))
            elif stat.S_ISREG(st.st_mode):
                mode = 0o755 if st.st_mode & 0o111 else 0o644
                with open(path, "rb") as file:
                    sha256 = hashlib.file_digest(file, "sha256").hexdigest()
                out.append(Entry(f"{base}/{name}", "file", mode, size=st.st_size, source=path, sha256=sha256))
    return write.with_parents(out)


def main() -> None:
    root, compression = sys.argv[1], sys.argv[2]
    items = entries(root)
    sink = NullSink()
    profiler = cProfile.Profile() if "--profile" in sys.argv else None
    start = time.perf_counter()
    if profiler:
        profiler.enable()
    stats = write.write_layer(items, sink, compression, epoch=0)  # type: ignore[arg-type]
    if profiler:
        profiler.disable()
        profiler.dump_stats(sys.argv[sys.argv.index("--profile") + 1])
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "uncompressed": stats.uncompressed_size, "compressed": sink.size,
                      "entries": stats.entries}))


if __name__ == "__main__":
    main()
