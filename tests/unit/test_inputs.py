from __future__ import annotations

import os
from pathlib import Path

import pytest

from ocibuild.errors import FetchError
from ocibuild.inputs import IgnoreRules, StatCache, fetch, hash_file, walk_tree


@pytest.mark.parametrize(
    "patterns, path, excluded",
    [
        (["bundles"], "bundles", True),
        (["bundles"], "bundles/x/y", True),
        (["bundles"], "src/bundles", False),
        (["**/*.o"], "a/b/c.o", True),
        (["**/*.o"], "c.o", True),
        (["*.md", "!README.md"], "README.md", False),
        (["*.md", "!README.md"], "NOTES.md", True),
        (["/tmp/"], "tmp/x", True),
        (["a?c"], "abc", True),
        (["a?c"], "a/c", False),
        (["# comment", ""], "x", False),
    ],
)
def test_ignore_rules(patterns: list[str], path: str, excluded: bool) -> None:
    assert IgnoreRules(patterns).excluded(path) is excluded


def _tree(root: Path) -> None:
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("a")
    (root / "sub" / "run.sh").write_text("#!/bin/sh\n")
    (root / "sub" / "run.sh").chmod(0o755)
    (root / "link").symlink_to("a.txt")
    (root / "bundles").mkdir()
    (root / "bundles" / "out").write_text("x")
    (root / ".containerignore").write_text("bundles\n")


def test_walk_honours_containerignore_and_is_path_independent(tmp_path: Path) -> None:
    for name in ("one", "two"):
        _tree(tmp_path / name)
    os.utime(tmp_path / "two" / "a.txt", (1, 1))
    (tmp_path / "two" / "sub" / "run.sh").chmod(0o775)  # another umask, same executable bit
    one = walk_tree(tmp_path / "one", [], StatCache(None), what="t")
    two = walk_tree(tmp_path / "two", [], StatCache(None), what="t")
    assert [e.path for e in one.entries] == ["a.txt", "link", "sub", "sub/run.sh"]
    assert one.digest == two.digest
    (tmp_path / "two" / "sub" / "run.sh").chmod(0o644)
    assert walk_tree(tmp_path / "two", [], StatCache(None), what="t").digest != one.digest


def test_exclude_extends_ignore_file(tmp_path: Path) -> None:
    _tree(tmp_path)
    tree = walk_tree(tmp_path, ["sub"], StatCache(None), what="t")
    assert [e.path for e in tree.entries] == ["a.txt", "link"]


def test_stat_cache_never_serves_a_racy_entry(tmp_path: Path) -> None:
    """A file rewritten within the same timestamp tick, same size: the cache must not return the old digest."""
    f = tmp_path / "f"
    f.write_text("aaaa")
    cache_file = tmp_path / "cache.json"
    cache = StatCache(cache_file)
    first = cache.digest(str(f), f.stat())
    cache.save()
    st = f.stat()
    f.write_text("bbbb")
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size and mtime as when it was hashed
    again = StatCache(cache_file).digest(str(f), f.stat())
    assert again == hash_file(f) != first


def test_stat_cache_reuses_old_entries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("ocibuild.inputs.RACY_NS", 0)  # the file's ctime is fresh; pretend the tick has passed
    f = tmp_path / "f"
    f.write_text("old")
    os.utime(f, (1000, 1000))
    cache_file = tmp_path / "cache.json"
    cache = StatCache(cache_file)
    digest = cache.digest(str(f), f.stat())
    cache.save()
    assert str(f) in cache_file.read_text()
    assert StatCache(cache_file).digest(str(f), f.stat()) == digest


def test_fetch_verifies_local_files(tmp_path: Path) -> None:
    f = tmp_path / "go.tar.gz"
    f.write_bytes(b"tarball")
    good = hash_file(f)
    assert fetch(str(f), good, tmp_path / "dl", what="layer 'go'") == f
    with pytest.raises(FetchError, match="has sha256"):
        fetch(str(f), "0" * 64, tmp_path / "dl", what="layer 'go'")
    with pytest.raises(FetchError, match="not in the download cache"):
        fetch("https://example.invalid/x.tar", "0" * 64, tmp_path / "dl", offline=True, what="layer 'go'")


def test_tree_digest_is_canonical_json_of_each_entry(tmp_path: Path) -> None:
    """walk_tree writes each entry's document by hand for speed; it must stay byte-for-byte canonical_json."""
    import hashlib

    from ocibuild.oci import canonical_json

    for name in ('quote"s', "back\\slash", "ünïcode", "tab\tand\nnewline", "plain.txt"):
        (tmp_path / name).write_text(name)
    (tmp_path / "run.sh").write_text("x")
    (tmp_path / "run.sh").chmod(0o755)
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "link").symlink_to('../quote"s')
    tree = walk_tree(tmp_path, [], StatCache(None), what="t")
    h = hashlib.sha256()
    for e in tree.entries:
        h.update(canonical_json([e.path, e.type, "x" if e.mode & 0o111 else "-", e.linkname, e.sha256]) + b"\n")
    assert tree.digest.hex == h.hexdigest()
