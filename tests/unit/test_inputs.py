from __future__ import annotations

import json
import os
import struct
import time
from pathlib import Path

import pytest

from conftest import run_ocibuild, without_hanging
from ocibuild.errors import RecipeError
from ocibuild.inputs import IgnoreRules, StatCache, TreeEntry, hash_file, tree_digest, walk_tree
from ocibuild.oci import Digest


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


def test_a_file_of_several_names_is_a_file_then_hardlinks_whatever_its_inode(tmp_path: Path) -> None:
    """The first name in path order is the file (the only one hashed), the others hardlinks to it; the digest says
    so, not which inode the file has; a name whose other names are not in the tree is a file."""
    for name in ("one", "two", "copies"):
        _tree(tmp_path / name)
        os.link(tmp_path / name / "a.txt", tmp_path / name / "bundles" / "a-excluded")
    for name in ("one", "two"):
        os.link(tmp_path / name / "sub" / "run.sh", tmp_path / name / "run-again.sh")
    (tmp_path / "copies" / "run-again.sh").write_text("#!/bin/sh\n")
    (tmp_path / "copies" / "run-again.sh").chmod(0o755)
    one, two, copies = (walk_tree(tmp_path / name, [], StatCache(None), what="t") for name in ("one", "two", "copies"))
    entries = {e.path: e for e in one.entries}
    first = entries["run-again.sh"]
    assert (first.type, first.sha256) == ("file", hash_file(tmp_path / "one/run-again.sh"))
    assert entries["sub/run.sh"] == TreeEntry("sub/run.sh", "hardlink", 0o755, 0, "run-again.sh")
    assert entries["a.txt"].type == "file"
    assert one.digest == two.digest != copies.digest


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


CAP_NET_RAW = struct.pack("<5I", 0x02000001, 1 << 13, 0, 0, 0)  # security.capability of cap_net_raw+ep


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
    (tmp_path / "dir" / "hard").hardlink_to(tmp_path / "run.sh")
    os.setxattr(tmp_path / "run.sh", "security.capability", CAP_NET_RAW)
    tree = walk_tree(tmp_path, [], StatCache(None), what="t")
    assert {e.type for e in tree.entries} == {"file", "dir", "symlink", "hardlink"}
    h = hashlib.sha256()
    for e in tree.entries:
        document = [e.path, e.type, "x" if e.mode & 0o111 else "-", e.linkname, e.sha256]
        h.update(canonical_json(document + ([e.capability.hex()] if e.capability else [])) + b"\n")
    assert tree.digest.hex == h.hexdigest()


# ---- the tree cache -------------------------------------------------------------------------------------------


@pytest.fixture
def short_racy_window(monkeypatch: pytest.MonkeyPatch) -> None:
    """A racy window of 20 ms instead of 2 s, so that a test waits (:func:`_settle`) rather than backdating: a
    file's ctime cannot be set, and the point of these tests is that ctime catches what mtime does not."""
    monkeypatch.setattr("ocibuild.inputs.RACY_NS", 20_000_000)


def _settle() -> None:
    time.sleep(0.05)  # past the short racy window, and past any timestamp tick (so the next change moves ctime)


def _cache_file(tmp_path: Path) -> Path:
    (tmp_path / "statcache").mkdir(exist_ok=True)
    return tmp_path / "statcache" / "files.json"


def _recorded(root: Path, exclude: list[str], cache_file: Path) -> Digest:
    """The tree's digest, walked in full and recorded in the tree cache at ``cache_file``."""
    cache = StatCache(cache_file)
    digest, tree = tree_digest(root, exclude, cache, what="t")
    assert tree is not None and tree.digest == digest
    cache.save()
    assert json.loads(cache_file.with_name("trees.json").read_text()), "the tree was not recorded"
    return digest


def test_tree_cache_hit_gives_the_full_walks_digest_without_hashing(tmp_path: Path, short_racy_window: None,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "t"
    _tree(root)
    _settle()
    cache_file = _cache_file(tmp_path)
    digest = _recorded(root, [], cache_file)
    assert digest == walk_tree(root, [], StatCache(None), what="t").digest
    cache_file.unlink()
    monkeypatch.setattr("ocibuild.inputs.hash_file", lambda path: pytest.fail(f"{path} was hashed"))
    cache = StatCache(cache_file)
    assert tree_digest(root, [], cache, what="t") == (digest, None)
    cache.save()
    assert not cache_file.exists(), "a tree cache hit must leave the file cache alone"


def _edit_in_place(root: Path) -> None:
    """New content of the same size, mtime put back: only ctime (and the content) differ."""
    f = root / "a.txt"
    st = f.stat()
    f.write_text("b")
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert f.stat().st_mtime_ns == st.st_mtime_ns and f.stat().st_size == st.st_size


def _swap_link(root: Path) -> None:
    (root / "link").unlink()
    (root / "link").symlink_to("sub/run.sh")


CHANGES = {
    "content, same size and mtime": _edit_in_place,
    "file added": lambda root: (root / "sub" / "new").write_text("new"),
    "file removed": lambda root: (root / "sub" / "run.sh").unlink(),
    "file renamed": lambda root: (root / "a.txt").rename(root / "b.txt"),
    "chmod +x": lambda root: (root / "a.txt").chmod(0o755),
    "directory added": lambda root: (root / "empty").mkdir(),
    "symlink target": _swap_link,
    ".containerignore": lambda root: (root / ".containerignore").write_text("bundles\na.txt\n"),
    "excluded entry re-included": lambda root: (root / ".containerignore").unlink(),
}


@pytest.mark.parametrize("change", CHANGES.values(), ids=CHANGES.keys())
def test_tree_cache_never_serves_a_changed_tree(tmp_path: Path, short_racy_window: None, change) -> None:
    root = tmp_path / "t"
    _tree(root)
    _settle()
    cache_file = _cache_file(tmp_path)
    before = _recorded(root, [], cache_file)
    change(root)
    digest, tree = tree_digest(root, [], StatCache(cache_file), what="t")
    assert tree is not None, "the changed tree was served from the tree cache"
    assert digest == walk_tree(root, [], StatCache(None), what="t").digest != before


def test_a_file_capability_is_in_the_tree_digest_and_the_file_cache(tmp_path: Path, short_racy_window: None,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A copy layer keeps a file's capability, so the key does: setting one changes the tree's digest (the tree
    cache does not serve the old one), and the file cache keeps it with the content digest."""
    root = tmp_path / "t"
    _tree(root)
    _settle()
    cache_file = _cache_file(tmp_path)
    before = _recorded(root, [], cache_file)
    os.setxattr(root / "sub" / "run.sh", "security.capability", CAP_NET_RAW)  # (as root: CAP_SETFCAP)
    _settle()
    after = _recorded(root, [], cache_file)
    assert after != before
    monkeypatch.setattr("ocibuild.inputs.hash_file", lambda path: pytest.fail(f"{path} was hashed"))
    monkeypatch.setattr("ocibuild.inputs._capability", lambda path: pytest.fail(f"{path} was read"))
    tree = walk_tree(root, [], StatCache(cache_file), what="t")
    assert tree.digest == after
    assert {e.path: e.capability for e in tree.entries if e.type == "file"} == {"a.txt": b"", "sub/run.sh": CAP_NET_RAW}


def test_tree_cache_keys_on_the_exclude_list(tmp_path: Path, short_racy_window: None) -> None:
    root = tmp_path / "t"
    _tree(root)
    _settle()
    cache_file = _cache_file(tmp_path)
    everything = _recorded(root, [], cache_file)
    without_sub = _recorded(root, ["sub"], cache_file)
    assert without_sub == walk_tree(root, ["sub"], StatCache(None), what="t").digest != everything
    for exclude, digest in (([], everything), (["sub"], without_sub)):  # each list keeps its own entry
        assert tree_digest(root, exclude, StatCache(cache_file), what="t") == (digest, None)


def test_tree_cache_of_a_single_file(tmp_path: Path, short_racy_window: None) -> None:
    f = tmp_path / "go.mod"
    f.write_text("module x\n")
    _settle()
    cache_file = _cache_file(tmp_path)
    digest = _recorded(f, [], cache_file)
    assert digest == walk_tree(f, [], StatCache(None), what="t").digest
    assert tree_digest(f, [], StatCache(cache_file), what="t") == (digest, None)
    _edit_in_place_file(f)
    digest2, tree = tree_digest(f, [], StatCache(cache_file), what="t")
    assert tree is not None and digest2 == walk_tree(f, [], StatCache(None), what="t").digest != digest


def _edit_in_place_file(f: Path) -> None:
    st = f.stat()
    f.write_text("module y\n")
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_tree_cache_does_not_record_a_racy_tree(tmp_path: Path) -> None:
    """Files written just now (within RACY_NS) could change again without moving their timestamps."""
    root = tmp_path / "t"
    _tree(root)
    cache_file = _cache_file(tmp_path)
    cache = StatCache(cache_file)
    digest, tree = tree_digest(root, [], cache, what="t")
    assert tree is not None
    cache.save()
    trees = cache_file.with_name("trees.json")
    assert not trees.exists() or json.loads(trees.read_text()) == {}
    assert tree_digest(root, [], StatCache(cache_file), what="t")[1] is not None


@pytest.mark.parametrize("damage", [b"{not json", b"[1, 2]", b'{"x": 1}', None])
def test_damaged_caches_are_only_slower(tmp_path: Path, short_racy_window: None, damage: bytes | None) -> None:
    root = tmp_path / "t"
    _tree(root)
    _settle()
    cache_file = _cache_file(tmp_path)
    digest = _recorded(root, [], cache_file)
    trees = cache_file.with_name("trees.json")
    if damage is None:  # the right shape, a wrong value
        damage = json.dumps({slot: [fingerprint, "sha256:bad"] for slot, (fingerprint, _) in
                             json.loads(trees.read_text()).items()}).encode()
    trees.write_bytes(damage)
    cache_file.write_bytes(damage)
    cache = StatCache(cache_file)
    again, tree = tree_digest(root, [], cache, what="t")
    assert tree is not None and again == digest
    cache.save()  # rewritten whole
    assert tree_digest(root, [], StatCache(cache_file), what="t") == (digest, None)


def test_an_unchanged_tree_rewrites_neither_cache(tmp_path: Path, short_racy_window: None) -> None:
    """A no-op build must not pay for writing (and fsyncing) caches that did not change."""
    root = tmp_path / "t"
    _tree(root)
    _settle()
    cache_file = _cache_file(tmp_path)
    _recorded(root, [], cache_file)
    trees = cache_file.with_name("trees.json")
    before = [(p.stat().st_ino, p.stat().st_mtime_ns) for p in (cache_file, trees)]
    cache = StatCache(cache_file)
    assert tree_digest(root, [], cache, what="t")[1] is None
    walk_tree(root, [], cache, what="t")  # every file known, the same fingerprint recorded again
    cache.save()
    assert [(p.stat().st_ino, p.stat().st_mtime_ns) for p in (cache_file, trees)] == before


def test_a_cache_that_cannot_be_saved_is_no_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("ocibuild.inputs.RACY_NS", 0)
    f = tmp_path / "f"
    f.write_text("x")
    cache = StatCache(tmp_path / "gone" / "files.json")  # its directory does not exist
    assert cache.digest(str(f), f.stat()) == hash_file(f)
    cache.save()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def test_walk_refuses_special_files_and_does_not_follow_symlinked_directories(tmp_path: Path) -> None:
    root = tmp_path / "t"
    _tree(root)
    (root / "dirlink").symlink_to("sub")
    tree = walk_tree(root, [], StatCache(None), what="layers/x/layer.toml")
    assert [(e.path, e.type) for e in tree.entries if e.path.startswith("dirlink")] == [("dirlink", "symlink")]
    os.mkfifo(root / "sub" / "pipe")
    with pytest.raises(RecipeError, match=r"^layers/x/layer.toml: .*/t/sub/pipe is a device, socket or fifo"):
        tree_digest(root, [], StatCache(None), what="layers/x/layer.toml")
    assert tree_digest(root, ["sub/pipe"], StatCache(None), what="t")[0] == tree.digest


@pytest.mark.parametrize("pattern, reason", [("[]", "unterminated character set"),
                                             ("[z-a]", "bad character range z-a")])
def test_a_bad_pattern_in_an_ignore_file_is_a_one_line_error_naming_file_and_line(make_project, tmp_path: Path,
                                                                                 pattern: str, reason: str) -> None:
    """`[]` or `[z-a]` in a .containerignore raised re.error out of the glob compiler: now the CLI names the file,
    the line and the pattern (Docker refuses a bad pattern too)."""
    root = make_project({"src": 'kind = "copy"\nfrom = "src"\nto = "/src"\n'},
                        files={"src/a": "a\n", "src/.containerignore": f"# comment\n*.o\n{pattern}\n"})
    result = run_ocibuild("plan", "-C", str(root), "--store", str(tmp_path / "store"), ok=False)
    assert result.returncode == 1 and "Traceback" not in result.stdout + result.stderr
    assert result.stderr.splitlines() == [
        f"error: {root / 'src/.containerignore'}, line 3: '{pattern}' is not a valid pattern ({reason})",
        "hint: fix or remove it: a [...] class must list at least one character and a range must go upwards (a-z)",
    ]
    with pytest.raises(RecipeError, match=r"^layers/src/layer.toml: exclude: '\[z-a\]' is not a valid pattern"):
        IgnoreRules(["ok", "[z-a]"], "layers/src/layer.toml: exclude")


def test_an_ignore_file_pattern_with_many_stars_against_a_long_name_does_not_backtrack(tmp_path: Path) -> None:
    """`*a*a*a…*b` in a .containerignore, against a long name of `a`s, made `re` try every way of splitting the
    name between the stars."""
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / ".containerignore").write_text("*a" * 20 + "*b\n")
    (tmp_path / "src" / ("a" * 250)).write_text("kept")
    (tmp_path / "src" / ("a" * 250 + "b")).write_text("excluded")
    assert without_hanging(_walked, tmp_path / "src") == ["a" * 250]


def _walked(root: Path) -> list[str]:
    return [e.path for e in walk_tree(root, [], StatCache(None), what="t").entries]


@pytest.mark.timeout(30)  # reading a fifo would wait for a writer forever
@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_an_ignore_file_that_is_a_fifo_or_device_is_refused_not_read_or_skipped(tmp_path: Path, kind: str) -> None:
    """A .containerignore that is not a regular file was skipped without a word (its patterns not applied); read,
    a fifo would block and /dev/zero never end."""
    (tmp_path / "src").mkdir()
    ignore = tmp_path / "src" / ".containerignore"
    if kind == "fifo":
        os.mkfifo(ignore)
    else:
        ignore.symlink_to("/dev/zero")
    with pytest.raises(RecipeError, match=r"\.containerignore: cannot read: not a regular file"):
        walk_tree(tmp_path / "src", [], StatCache(None), what="t")


def test_a_name_that_is_not_utf8_is_kept_as_its_bytes(tmp_path: Path) -> None:
    """os.listdir gives such a name with surrogate escapes, which the tree digest could not encode (a traceback):
    the name is hashed as its bytes, and an ignore pattern holding those bytes matches it."""
    root = tmp_path / "src"
    root.mkdir()
    (root / os.fsdecode(b"caf\xe9.txt")).write_text("latin-1 name")
    (root / os.fsdecode(b"skip\xff")).write_text("excluded")
    (root / ".containerignore").write_bytes(b"skip\xff\n")
    tree = walk_tree(root, [], StatCache(None), what="t")
    assert [os.fsencode(e.path) for e in tree.entries] == [b"caf\xe9.txt"]
    assert tree_digest(root, [], StatCache(None), what="t")[0] == tree.digest
    (root / os.fsdecode(b"caf\xe9.txt")).rename(root / os.fsdecode(b"caf\xe8.txt"))
    assert walk_tree(root, [], StatCache(None), what="t").digest != tree.digest
