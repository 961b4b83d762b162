from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import run_ocibuild
from ocibuild.errors import LockError, RecipeError
from ocibuild.oci import Digest, Platform
from ocibuild.recipe.key import Input, cache_key, key_document
from ocibuild.recipe.lock import Lock, LockEntry, load_lock
from ocibuild.recipe.project import load_project
from ocibuild.recipe.schema import reference_table

COPY = 'kind = "copy"\nfrom = "src"\nto = "/app"\n'
RUN = 'kind = "run"\nscript = "s.sh"\n'


def test_loads_defaults_and_order(make_project) -> None:
    root = make_project({"base": 'kind = "bootstrap"\nsuite = "bookworm"\n', "src": COPY + 'needs = ["base"]\n'},
                        image='env = { B = "2", A = "1" }\nworkdir = "/app"\n')
    project = load_project(root)
    assert project.image.compression == "zstd"
    assert project.image.source_date_epoch == 0
    assert list(project.image.env) == ["A", "B"]
    base = project.layer("base")
    assert base.str_("mirror") == "http://deb.debian.org/debian"
    assert base.strings("components") == ("main",)
    assert project.layer("src").needs == ("base",)
    assert project.closure("src") == ("base",)
    assert not project.independent("base", "src")


@pytest.mark.parametrize(
    "layers, image, message",
    [
        ({"a": 'kind = "copy"\nfrom = "src"\nto = "/x"\nouptut = 1\n'}, "", "unknown key 'ouptut'"),
        ({"a": 'kind = "copy"\nfrom = "src"\nto = "/x"\nexlude = []\n'}, "", "did you mean 'exclude'"),
        ({"a": 'kind = "cpy"\n'}, "", "unknown kind 'cpy' (did you mean 'copy'?)"),
        ({"a": 'kind = "copy"\nto = "/x"\n'}, "", "missing required key 'from'"),
        ({"a": 'kind = "copy"\nfrom = "../etc"\nto = "/x"\n'}, "", "must be relative and stay inside"),
        ({"a": 'kind = "archive"\nurl = "x.tar"\nsha256 = "abc"\n'}, "", "is not 64 lowercase hex digits"),
        ({"a": COPY + 'needs = ["b"]\n', "b": COPY}, "", "needs 'b', which must come before 'a'"),
        ({"a": COPY + 'needs = ["zz"]\n'}, "", "needs unknown layer 'zz'"),
        ({"a": COPY + 'needs = ["a"]\n'}, "", "cannot need itself"),
        ({"a": COPY + "needs = 3\n"}, "", "'needs' must be a list of strings"),
        ({"a": "kind = \n"}, "", "malformed TOML"),
        ({"a": COPY}, 'compression = "lz4"\n', "compression must be"),
        ({"a": COPY}, "source_date_epoch = -1\n", "source_date_epoch must be between 0 and 8589934591"),
        ({"a": COPY}, "source_date_epoch = 253402300800\n", "source_date_epoch must be between 0 and 8589934591"),
        ({"a": COPY}, "source_date_epoch = 8589934592\n", "source_date_epoch must be between 0 and 8589934591"),
        ({"a": COPY + "x = " + "[" * 5000 + "]" * 5000 + "\n"}, "",
         "layers/a/layer.toml: malformed TOML: arrays or inline tables are nested too deeply"),
        ({"a": COPY}, "[run]\nmounts = [\"../out:/out\"]\n", "leaves the project directory"),
        ({"a": COPY, "b": 'kind = "image"\nref = "oci:x"\n'}, "", "must come first"),
        ({"a": COPY}, "[run]\npass_envs = [\"X\"]\n", "unknown key 'pass_envs' (did you mean 'pass_env'?)"),
        ({"a": COPY}, "[run]\npass_env = \"BUILDFLAGS\"\n", "'pass_env' must be a list of strings"),
        ({"a": COPY}, "[run]\npass_env = [\"A=1\"]\n", "pass_env 'A=1' is not a variable name"),
        ({"a": COPY}, "[run]\nprivileged = \"yes\"\n", "'privileged' must be a boolean"),
        ({"a": COPY}, "[run]\ncaches = [\"go-build\"]\n", "must be an absolute path in the container"),
        ({"a": COPY}, "[run]\ncaches = [\"/\"]\n", "must be an absolute path in the container, not /"),
        ({"a": COPY}, "[run]\ncaches = [\"/c/../etc\"]\n", "must be an absolute path"),
        ({"a": COPY}, "[run]\ncaches = [\"/c\", \"/c/\"]\n", "cache '/c' is also a mount or listed twice"),
        ({"a": COPY}, "[run]\nmounts = [\"out:/c\"]\ncaches = [\"/c\"]\n", "cache '/c' is also a mount"),
        ({"a": RUN + 'caches = ["var/cache/apt"]\n'}, "",
         "layers/a/layer.toml: cache 'var/cache/apt' must be an absolute path in the container, not /"),
        ({"a": RUN + 'caches = ["/"]\n'}, "", "layers/a/layer.toml: cache '/' must be an absolute path"),
        ({"a": RUN + 'caches = ["/var/cache/../../etc"]\n'}, "", "layers/a/layer.toml: cache '/var/cache/../../etc' "
                                                                   "must be an absolute path"),
        ({"a": RUN + 'caches = "/var/cache/apt"\n'}, "", "layers/a/layer.toml: 'caches' must be a list of strings"),
        ({"a": RUN + 'caches = ["/var/cache/apt", "/var/cache/apt/archives"]\n'}, "",
         "layers/a/layer.toml: caches '/var/cache/apt' and '/var/cache/apt/archives' overlap"),
        ({"a": RUN + 'caches = ["/var/cache/apt", "/var/cache/apt/"]\n'}, "",
         "layers/a/layer.toml: caches '/var/cache/apt' and '/var/cache/apt' overlap"),
        ({"a": RUN + 'caches = ["/ocibuild/inputs"]\n'}, "", "layers/a/layer.toml: cache '/ocibuild/inputs' is under "
                                                               "/ocibuild"),
        ({"a": COPY + 'caches = ["/var/cache/apt"]\n'}, "", "layers/a/layer.toml: unknown key 'caches'"),
    ],
)
def test_bad_recipes_name_the_file(make_project, layers, image, message) -> None:
    root = make_project(layers, image=image)
    with pytest.raises(RecipeError) as info:
        load_project(root)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_run_section_defaults_and_values(make_project) -> None:
    root = make_project({"a": COPY})
    run = load_project(root).run
    assert (run.pass_env, run.privileged, run.caches) == ((), False, ())
    root = make_project({"a": COPY}, image='[run]\npass_env = ["BUILDFLAGS", "TESTFLAGS"]\nprivileged = true\n'
                                          'caches = ["/root/.cache/go-build/", "/go/pkg"]\n')
    run = load_project(root).run
    assert run.pass_env == ("BUILDFLAGS", "TESTFLAGS") and run.privileged
    assert run.caches == ("/root/.cache/go-build", "/go/pkg")


def test_missing_layer_file(make_project, tmp_path: Path) -> None:
    root = make_project({"a": COPY})
    (root / "layers" / "a" / "layer.toml").unlink()
    with pytest.raises(RecipeError, match=r"layers/a/layer.toml: file not found"):
        load_project(root)


def test_key_ignores_description_and_compression(make_project) -> None:
    root = make_project({"a": COPY})
    one = load_project(root).layer("a")
    (root / "layers/a/layer.toml").write_text(COPY + 'description = "changed"\n')
    (root / "ocibuild.toml").write_text('[image]\nname = "dev"\nlayers = ["a"]\ncompression = "gzip"\n')
    two = load_project(root).layer("a")
    inputs = [Input("src", Digest.of(b"x"))]
    amd64 = Platform("linux", "amd64")
    assert cache_key(one, 0, inputs, [], amd64) == cache_key(two, 0, inputs, [], amd64)
    assert cache_key(one, 0, inputs, [], amd64) != cache_key(one, 1, inputs, [], amd64)
    assert cache_key(one, 0, inputs, [], amd64) != cache_key(one, 0, [Input("src", Digest.of(b"y"))], [], amd64)
    assert cache_key(one, 0, inputs, [], amd64) != cache_key(one, 0, inputs, [Digest.of(b"need")], amd64)


def test_run_layer_caches_are_normalised_and_outside_the_key(make_project) -> None:
    """A run layer's caches are kept outside the layer, so (as BuildKit's cache mounts) they are not in its key:
    adding, changing or removing them reuses the layer."""
    root = make_project({"a": RUN})
    plain = load_project(root).layer("a")
    assert plain.strings("caches") == ()
    (root / "layers/a/layer.toml").write_text(RUN + 'caches = ["/var/cache/apt/", "//var/lib/apt/lists"]\n')
    cached = load_project(root).layer("a")
    assert cached.strings("caches") == ("/var/cache/apt", "/var/lib/apt/lists")
    inputs, amd64 = [Input("layers/a/s.sh", Digest.of(b"x"))], Platform("linux", "amd64")
    assert cache_key(plain, 0, inputs, [], amd64) == cache_key(cached, 0, inputs, [], amd64)
    assert "caches" not in json.dumps(key_document(cached, 0, inputs, [], amd64))


def test_lock_round_trip(tmp_path: Path) -> None:
    """Written, read back equal; the text is fixed (sorted tables, fixed key order), an image entry names the
    platform it was resolved for and a suite's none; an entry holds only for its source and platform."""
    arm64 = Platform("linux", "arm64", "v8")
    lock = Lock().with_entry(LockEntry("img", "docker.io/library/debian:bookworm", Digest.of(b"m"), arm64)) \
        .with_entry(LockEntry("base", "http://m/dists/bookworm/InRelease", Digest.of(b"r")))
    (tmp_path / "ocibuild.lock").write_text(lock.to_toml())
    assert load_lock(tmp_path) == lock
    assert lock.to_toml().splitlines()[3:] == [
        "", '[layers."base"]', 'source = "http://m/dists/bookworm/InRelease"', f'digest = "{Digest.of(b"r")}"',
        "", '[layers."img"]', 'source = "docker.io/library/debian:bookworm"', 'platform = "linux/arm64/v8"',
        f'digest = "{Digest.of(b"m")}"']
    loaded = load_lock(tmp_path)
    assert loaded.get("base", "other", None) is None
    assert loaded.get("base", "http://m/dists/bookworm/InRelease", None) == lock.entries["base"]
    assert loaded.get("img", "docker.io/library/debian:bookworm", arm64) == lock.entries["img"]
    assert loaded.get("img", "docker.io/library/debian:bookworm", Platform("linux", "amd64")) is None
    assert loaded.get("img", "docker.io/library/debian:bookworm", None) is None
    (tmp_path / "ocibuild.lock").write_text(lock.to_toml().replace("linux/arm64/v8", "arm64"))
    with pytest.raises(LockError, match="entry for layer 'img' is malformed"):
        load_lock(tmp_path)
    (tmp_path / "ocibuild.lock").write_text("version = 7\n")
    with pytest.raises(LockError, match="unknown lock format"):
        load_lock(tmp_path)


def test_readme_carries_the_key_table() -> None:
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    assert reference_table() in readme, "regenerate the README key table from recipe.schema.reference_table()"


@pytest.mark.parametrize("line, shown", [("run = 1", "int 1"), ('cache = "x"', "str 'x'"), ("image = []", "list []")])
def test_a_section_written_as_a_key_is_a_one_line_error_not_a_traceback(make_project, tmp_path: Path, line: str,
                                                                        shown: str) -> None:
    """`run = 1` in ocibuild.toml raised TypeError out of the schema check: now the CLI names the file and says what
    to write instead."""
    root = make_project({"src": 'kind = "copy"\nfrom = "src"\nto = "/src"\n'}, files={"src/a": "a\n"})
    project_file = root / "ocibuild.toml"
    text = project_file.read_text()
    project_file.write_text(f"{line}\n{text}" if not line.startswith("image") else f"{line}\n")
    section = line.split(" ")[0]
    result = run_ocibuild("plan", "-C", str(root), "--store", str(tmp_path / "store"), ok=False)
    assert result.returncode == 1 and "Traceback" not in result.stdout + result.stderr
    assert result.stderr.splitlines() == [
        f"error: ocibuild.toml: '{section}' must be a section ([{section}] on a line of its own, its keys below it), "
        f"not {shown}",
        f"hint: replace '{section} = …' with a [{section}] header; see the key table in the README",
    ]


def test_plan_keys_cover_the_platform_where_the_bytes_depend_on_it(make_project, tmp_path: Path) -> None:
    """`architecture = "amd64"` and `"arm64"` gave the same bootstrap and run keys: a cache shared by amd64 and
    arm64 runners served the wrong architecture. Bootstrap, run and image keys now differ; copy and archive bytes
    do not depend on the platform, so their keys stay the same (one entry serves both)."""
    sha = "0" * 64
    layers = {
        "img": 'kind = "image"\nref = "docker.io/library/debian:bookworm"\n',
        "base": 'kind = "bootstrap"\nsuite = "bookworm"\n',
        "tree": 'kind = "copy"\nfrom = "src"\nto = "/src"\n',
        "tarball": f'kind = "archive"\nurl = "https://example.com/a.tar.gz"\nsha256 = "{sha}"\ndest = "/opt"\n',
        "step": 'kind = "run"\nscript = "build.sh"\nneeds = ["base", "tree"]\n',
    }
    keys = {}
    for architecture in ("amd64", "arm64"):
        root = make_project(layers, image=f'architecture = "{architecture}"\n', root=tmp_path / architecture,
                            files={"src/a": "a\n", "layers/step/build.sh": "true\n"})
        lock = Lock({"base": LockEntry("base", "http://deb.debian.org/debian/dists/bookworm/InRelease",
                                       Digest.of(b"InRelease")),
                     "img": LockEntry("img", "docker.io/library/debian:bookworm", Digest.of(b"manifest"),
                                      Platform("linux", architecture))})
        (root / "ocibuild.lock").write_text(lock.to_toml())
        result = run_ocibuild("plan", "--json", "-C", str(root), "--store", str(tmp_path / "store"))
        keys[architecture] = {layer["name"]: layer["key"] for layer in json.loads(result.stdout)["layers"]}
    assert set(keys["amd64"]) == set(layers)
    for name in ("base", "img", "step"):
        assert keys["amd64"][name] != keys["arm64"][name], name
    for name in ("tree", "tarball"):
        assert keys["amd64"][name] == keys["arm64"][name], name
