"""The registry client without a network: challenges, Retry-After, loopback rules, where credentials come from,
the retry loop, and the operations on whole images against a fake registry."""

from __future__ import annotations

import base64
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

import pytest

from ocibuild import oci
from ocibuild.errors import FormatError, RegistryError
from ocibuild.net.auth import Challenge, Credentials, find_credentials, parse_challenges, save_credentials
from ocibuild.net.http import tls_context
from ocibuild.net.retry import Retrier, RetryableFailure, RetryPolicy, parse_retry_after
from ocibuild.net.session import is_loopback, proxy_for
from ocibuild.oci import Descriptor, Digest
from ocibuild.registry import fetch_image, fetch_manifests, find_manifests, missing_bytes, push_manifests, resolve_image
from ocibuild.store import Store


def test_challenges_with_quoted_commas_and_several_schemes() -> None:
    header = ('Bearer realm="https://auth.example.com/token",service="registry.example.com",'
              'scope="repository:team/cache:pull,push",error="insufficient_scope", Basic realm="x"')
    assert parse_challenges(header) == [
        Challenge("bearer", {"realm": "https://auth.example.com/token", "service": "registry.example.com",
                             "scope": "repository:team/cache:pull,push", "error": "insufficient_scope"}),
        Challenge("basic", {"realm": "x"}),
    ]
    assert parse_challenges('basic realm="Registry Realm"') == [Challenge("basic", {"realm": "Registry Realm"})]
    assert parse_challenges('Bearer realm=unquoted,service="a\\"b"')[0].params == {"realm": "unquoted",
                                                                                  "service": 'a"b'}
    assert parse_challenges("") == []


def test_retry_after_seconds_or_date_and_backoff_bounds() -> None:
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:10 GMT", now=1445412480.0) == 10.0
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None
    policy = RetryPolicy(base=0.5, cap=4.0, max_retry_after=30)
    assert all(0 <= policy.delay(n) <= 4.0 for n in range(10) for _ in range(20))
    assert policy.delay(0, retry_after=3) == 3 and policy.delay(0, retry_after=300) == 30


@pytest.mark.parametrize("host, loopback", [
    ("localhost:5000", True), ("127.0.0.1:5000", True), ("127.9.8.7", True), ("[::1]:5000", True),
    ("registry.local:5000", False), ("10.0.0.1:5000", False), ("128.0.0.1", False), ("localhost.evil.com", False),
])
def test_plain_http_only_for_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_proxies_from_the_environment_as_curl_and_go_read_them() -> None:
    env = {"https_proxy": "http://proxy:3128", "HTTP_PROXY": "http://plain:8080",
           "no_proxy": "internal.example.com, .corp, registry.local:5000"}
    assert proxy_for("https", "ghcr.io", env) == "http://proxy:3128"
    assert proxy_for("http", "ghcr.io", env) == "http://plain:8080"
    assert proxy_for("https", "internal.example.com", env) is None
    assert proxy_for("https", "cache.internal.example.com:443", env) is None, "subdomains are covered"
    assert proxy_for("https", "notinternal.example.com", env) == "http://proxy:3128"
    assert proxy_for("https", "a.corp", env) is None
    assert proxy_for("https", "registry.local:5000", env) is None
    assert proxy_for("https", "127.0.0.1:5000", env) is None and proxy_for("https", "localhost:5000", env) is None
    assert proxy_for("https", "ghcr.io", {"ALL_PROXY": "http://all:1"}) == "http://all:1"
    assert proxy_for("https", "ghcr.io", {"HTTPS_PROXY": "squid:3128"}) == "http://squid:3128"
    assert proxy_for("https", "ghcr.io", {**env, "NO_PROXY": "*", "no_proxy": ""}) is None
    assert proxy_for("https", "ghcr.io", {}) is None


def test_tls_verifies_with_the_system_store_or_only_the_given_ca(tmp_path: Path) -> None:
    import ssl

    import trustme

    system = tls_context(None)
    assert system.verify_mode == ssl.CERT_REQUIRED and system.check_hostname
    assert system.cert_store_stats()["x509_ca"] > 0 or ssl.get_default_verify_paths().capath, \
        "the system's certificates are there (loaded, or looked up in the hashed directory)"
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    own = tls_context(str(tmp_path / "ca.pem"))
    assert own.verify_mode == ssl.CERT_REQUIRED and own.check_hostname
    assert own.cert_store_stats()["x509_ca"] == 1, "a given CA file replaces the system store"


def test_credentials_never_show_the_password() -> None:
    assert "hunter2" not in repr(Credentials("me", "hunter2"))


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {"HOME": str(tmp_path / "home"), "PATH": str(tmp_path / "bin") + ":/usr/bin:/bin", **extra}


def test_credentials_from_auth_files_in_order(tmp_path: Path) -> None:
    docker = tmp_path / "home/.docker/config.json"
    docker.parent.mkdir(parents=True)
    docker.write_text(json.dumps({"auths": {
        "https://index.docker.io/v1/": {"auth": base64.b64encode(b"hubuser:hubpass").decode()},
        "reg.example.com:5000": {"auth": base64.b64encode(b"docker:pw:with:colons").decode()},
        "tok.example.com": {"identitytoken": "refresh-me"}}}))
    env = _env(tmp_path)
    assert find_credentials("docker.io", env) == Credentials("hubuser", "hubpass")
    assert find_credentials("reg.example.com:5000", env) == Credentials("docker", "pw:with:colons")
    assert find_credentials("tok.example.com", env) == Credentials("", "refresh-me", identity_token=True)
    assert find_credentials("other.example.com", env) is None

    containers = tmp_path / "run/containers/auth.json"
    containers.parent.mkdir(parents=True)
    containers.write_text(json.dumps({"auths": {"reg.example.com:5000": {"auth": base64.b64encode(b"podman:x").decode()}}}))
    env = _env(tmp_path, XDG_RUNTIME_DIR=str(tmp_path / "run"))
    assert find_credentials("reg.example.com:5000", env) == Credentials("podman", "x")
    explicit = tmp_path / "explicit.json"
    explicit.write_text(json.dumps({"auths": {"https://reg.example.com:5000/v2/": {"username": "u", "password": "p"}}}))
    env = _env(tmp_path, XDG_RUNTIME_DIR=str(tmp_path / "run"), REGISTRY_AUTH_FILE=str(explicit))
    assert find_credentials("reg.example.com:5000", env) == Credentials("u", "p")


def test_credential_helpers(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    helper = bin_dir / "docker-credential-fake"
    helper.write_text('#!/bin/sh\nread host\n[ "$1" = get ] || exit 3\n'
                      'case "$host" in reg.example.com) echo \'{"Username":"hu","Secret":"hs"}\';; '
                      '*) echo "credentials not found in native keychain"; exit 1;; esac\n')
    helper.chmod(0o755)
    docker = tmp_path / "home/.docker/config.json"
    docker.parent.mkdir(parents=True)
    docker.write_text(json.dumps({"credHelpers": {"reg.example.com": "fake"}, "credsStore": "fake"}))
    env = _env(tmp_path)
    assert find_credentials("reg.example.com", env) == Credentials("hu", "hs")
    assert find_credentials("elsewhere.example.com", env) is None
    docker.write_text(json.dumps({"credsStore": "missing"}))
    with pytest.raises(RegistryError, match="docker-credential-missing"):
        find_credentials("reg.example.com", env)


def test_save_credentials_keeps_other_entries_and_is_private(tmp_path: Path) -> None:
    path = tmp_path / "auth.json"
    path.write_text(json.dumps({"auths": {"a.example.com": {"auth": "eDp5"}}, "other": 1}))
    env = _env(tmp_path, REGISTRY_AUTH_FILE=str(path))
    assert save_credentials("b.example.com:5000", Credentials("me", "secret"), env) == path
    data = json.loads(path.read_text())
    assert data["other"] == 1 and data["auths"]["a.example.com"] == {"auth": "eDp5"}
    assert base64.b64decode(data["auths"]["b.example.com:5000"]["auth"]) == b"me:secret"
    assert os.stat(path).st_mode & 0o077 == 0
    assert find_credentials("b.example.com:5000", env) == Credentials("me", "secret")


def test_an_auth_file_that_cannot_be_parsed_is_never_written_and_never_read_as_empty(tmp_path: Path) -> None:
    """One syntax error in Docker's config.json: `login` refuses to write it (that lost every other entry and the
    proxies), naming the file and line, and a pull refuses to read it as empty, as podman and skopeo do."""
    docker = tmp_path / "home/.docker/config.json"
    docker.parent.mkdir(parents=True)
    broken = ('{\n\t"auths": {\n\t\t"a.example.com": {"auth": "eDp5"},\n\t},\n'
              '\t"proxies": {"default": {"httpProxy": "http://proxy:3128"}}\n}\n')
    docker.write_text(broken)
    env = _env(tmp_path)
    for call in (lambda: save_credentials("b.example.com", Credentials("me", "secret"), env),
                 lambda: find_credentials("a.example.com", env)):
        with pytest.raises(RegistryError, match=rf"^{docker}: the auth file is not valid JSON: .* \(line 4, ") as caught:
            call()
        assert "fix the file" in (caught.value.hint or "")
    assert docker.read_text() == broken
    docker.write_text("[]")
    with pytest.raises(RegistryError, match="not a JSON object"):
        save_credentials("b.example.com", Credentials("me", "secret"), env)
    assert docker.read_text() == "[]"


def test_login_stores_the_password_where_lookup_finds_it_first(tmp_path: Path) -> None:
    """podman's auth.json (read first) holds an old password: the new one replaces it there, so lookup returns
    it; the other entries of both files and Docker's proxies section stay as they were."""
    old = base64.b64encode(b"me:old").decode()
    podman = tmp_path / "run/containers/auth.json"
    podman.parent.mkdir(parents=True)
    podman.write_text(json.dumps({"auths": {"https://reg.example.com/v2/": {"auth": old},
                                            "p.example.com": {"auth": "eDp5"}}}))
    docker = tmp_path / "home/.docker/config.json"
    docker.parent.mkdir(parents=True)
    docker_doc = {"auths": {"reg.example.com": {"auth": old}, "d.example.com": {"auth": "eDp6"}},
                  "proxies": {"default": {"httpProxy": "http://proxy:3128", "noProxy": "*.local"}}}
    docker.write_text(json.dumps(docker_doc))
    env = _env(tmp_path, XDG_RUNTIME_DIR=str(tmp_path / "run"))
    assert find_credentials("reg.example.com", env) == Credentials("me", "old")
    assert save_credentials("reg.example.com", Credentials("me", "new"), env) == podman
    assert find_credentials("reg.example.com", env) == Credentials("me", "new")
    assert json.loads(podman.read_text())["auths"] == {
        "reg.example.com": {"auth": base64.b64encode(b"me:new").decode()}, "p.example.com": {"auth": "eDp5"}}
    assert json.loads(docker.read_text()) == docker_doc

    # a registry no file knows yet goes to Docker's config.json, as `docker login`; its proxies are kept
    assert save_credentials("n.example.com", Credentials("you", "pw"), env) == docker
    assert find_credentials("n.example.com", env) == Credentials("you", "pw")
    written = json.loads(docker.read_text())
    assert written["proxies"] == docker_doc["proxies"]
    assert {k: v for k, v in written["auths"].items() if k != "n.example.com"} == docker_doc["auths"]
    assert os.stat(docker).st_mode & 0o077 == 0


# ---- the one retry loop -------------------------------------------------------------------------------------------


def test_the_retry_loop_backs_off_resumes_and_gives_up() -> None:
    sleeps: list[float] = []
    resumed: list[str] = []
    retries: list[None] = []
    retrier = Retrier(RetryPolicy(attempts=3, base=0.01, cap=0.01), sleeps.append, lambda: retries.append(None))
    tries: list[int] = []

    def flaky() -> str:
        tries.append(1)
        if len(tries) < 3:
            raise RetryableFailure(RegistryError(f"try {len(tries)}"), delay=7.0 if len(tries) == 1 else None)
        return "done"

    assert retrier.run(flaky, resume=lambda failure: resumed.append(str(failure))) == "done"
    assert sleeps[0] == 7.0 and 0 <= sleeps[1] <= 0.01, "Retry-After, then jittered backoff"
    assert resumed == ["try 1", "try 2"] and len(retries) == 2

    def failing() -> None:
        raise RetryableFailure(RegistryError("still down", status=503))

    with pytest.raises(RegistryError, match="still down") as caught:
        retrier.run(failing)
    assert type(caught.value) is RegistryError and caught.value.status == 503, "the failure's own error is raised"

    progress = iter([True, True, True, True, False, False])

    def slow() -> None:
        raise RetryableFailure(RegistryError("cut"), progressed=next(progress))

    with pytest.raises(RegistryError, match="cut"):
        retrier.run(slow)
    assert next(progress, None) is None, "tries that progressed do not count against the transfer"

    def broken() -> None:
        tries.append(1)
        raise RegistryError("not retryable")

    tries.clear()
    with pytest.raises(RegistryError, match="not retryable"):
        retrier.run(broken)
    assert tries == [1]


# ---- the whole-image operations on a fake registry ---------------------------------------------------------------


class FakeRegistry:
    """An in-memory Distribution: manifests by (repository, reference), blobs per repository in one store."""

    registry = "fake.example"

    def __init__(self, blobs: Store) -> None:
        self.blobs = blobs
        self.present: set[tuple[str, Digest]] = set()
        self.manifests: dict[tuple[str, str], tuple[bytes, str]] = {}
        self.calls: list[str] = []

    def _find(self, repository: str, reference: str) -> tuple[bytes, str] | None:
        """By tag, or by digest."""
        return self.manifests.get((repository, reference)) or next(
            (found for (repo, _), found in self.manifests.items()
             if repo == repository and str(Digest.of(found[0])) == reference), None)

    def resolve(self, repository: str, reference: str) -> Descriptor | None:
        found = self._find(repository, reference)
        return None if found is None else Descriptor(found[1], Digest.of(found[0]), len(found[0]))

    def fetch_manifest(self, repository: str, reference: str) -> tuple[bytes, str, Digest]:
        found = self._find(repository, reference)
        assert found is not None
        return found[0], found[1], Digest.of(found[0])

    def push_manifest(self, repository: str, reference: str, data: bytes, media_type: str) -> Digest:
        self.manifests[(repository, reference)] = (data, media_type)
        return Digest.of(data)

    def fetch_blob(self, repository: str, descriptor: Descriptor, store: Store) -> str:
        assert (repository, descriptor.digest) in self.present
        if store.has(descriptor.digest):
            return "present"
        store.put_file(self.blobs.blob_path(descriptor.digest), descriptor.media_type, expected=descriptor.digest)
        return "fetched"

    def push_blob(self, repository: str, descriptor: Descriptor, store: Store, mount_from: Sequence[str] = ()) -> str:
        self.calls.append(f"{repository} {descriptor.digest.short} from {','.join(mount_from)}")
        if (repository, descriptor.digest) in self.present:
            return "present"
        how = "mounted" if any((source, descriptor.digest) in self.present for source in mount_from) else "pushed"
        if how == "pushed":
            self.blobs.put_file(store.blob_path(descriptor.digest), descriptor.media_type, expected=descriptor.digest)
        self.present.add((repository, descriptor.digest))
        return how


def test_push_find_and_fetch_manifests_through_the_distribution_protocol(tmp_path: Path) -> None:
    source = Store.open(tmp_path / "source")
    layer = source.put(b"layer bytes" * 1000, oci.LAYER_GZIP)
    config = source.put(oci.ImageConfig(diff_ids=(layer.digest,)).to_json(), oci.OCI_CONFIG)
    manifest = source.put_manifest(oci.Manifest(config, (layer,)))
    fake = FakeRegistry(Store.open(tmp_path / "fake"))
    assert push_manifests(fake, source, "team/cache", [("entry", manifest)], jobs=2) == {"entry": "pushed"}
    assert push_manifests(fake, source, "team/cache", [("entry", manifest)]) == {"entry": "present"}
    fake.calls.clear()
    assert push_manifests(fake, source, "team/other", [("entry", manifest)]) == {"entry": "pushed"}
    assert all(call.endswith("from team/cache") for call in fake.calls), "blobs seen there are mounted from there"

    found = find_manifests(fake, "team/cache", ["entry", "absent"], jobs=2)
    assert found["absent"] is None and found["entry"] is not None
    assert found["entry"].descriptor.digest == manifest.digest
    target = Store.open(tmp_path / "target")
    assert missing_bytes(target, [found["entry"]]) == layer.size + config.size
    stored = fetch_manifests(fake, target, "team/cache", {"entry": found["entry"]})
    assert stored["entry"].digest == manifest.digest == target.resolve("entry").digest  # type: ignore[union-attr]
    assert missing_bytes(target, [found["entry"]]) == 0
    assert fetch_image(fake, Store.open(tmp_path / "image"), "team/cache", manifest.digest).layers == (layer,)
    for store in (source, target, fake.blobs):
        assert store.verify() == []


def test_a_document_that_is_both_manifest_and_index_is_refused_on_every_registry_read(tmp_path: Path) -> None:
    """CVE-2021-41190: a document with no mediaType inside and the fields of both kinds means one image to a reader
    that takes it as a manifest and another to one that takes it as an index. Refused whichever the registry's
    Content-Type claims: by cache lookup, image bases (through an index or directly) and whole-image fetches."""
    source = Store.open(tmp_path / "source")
    layer = source.put(b"layer bytes" * 1000, oci.LAYER_GZIP)
    config = source.put(oci.ImageConfig(diff_ids=(layer.digest,)).to_json(), oci.OCI_CONFIG)
    manifest = source.put_manifest(oci.Manifest(config, (layer,)))
    other = dict(manifest.to_dict(), platform={"os": "linux", "architecture": "amd64"})
    both = json.loads(source.read_blob(manifest.digest))
    del both["mediaType"]
    data = oci.canonical_json(dict(both, manifests=[other]))
    fake = FakeRegistry(Store.open(tmp_path / "fake"))
    fake.push_manifest("team/cache", "as-manifest", data, oci.OCI_MANIFEST)
    fake.push_manifest("team/base", "as-index", data, oci.OCI_INDEX)
    target = Store.open(tmp_path / "target")
    platform = oci.Platform("linux", "amd64")
    refusals = [
        lambda: find_manifests(fake, "team/cache", ["as-manifest"]),
        lambda: fetch_image(fake, target, "team/cache", Digest.of(data)),
        lambda: resolve_image(fake, "team/base", "as-index", platform),
    ]
    for refused in refusals:
        with pytest.raises(FormatError, match="ambiguous") as caught:
            refused()
        assert "CVE-2021-41190" in (caught.value.hint or "")
    assert list(target.blobs()) == [] and target.verify() == []


def test_a_request_that_cannot_be_sent_fails_at_once_without_retries() -> None:
    """A target with a line break (say, from a hostile token realm) is refused before any connection, and no
    retry loop spins on it: the error is final, not retryable."""
    from ocibuild.registry import Client

    with Client("127.0.0.1:9", env={}) as client:
        with pytest.raises(RegistryError, match=r"^GET http://127.0.0.1:9/v2/x.*the URL holds '.r'") as caught:
            client._exchange("GET", "http://127.0.0.1:9/v2/x\r\nHost: evil", {})
    assert not caught.value.retryable
    assert "stray characters" in (caught.value.hint or "")


def test_a_cache_entry_present_in_the_registry_is_never_re_pointed(tmp_path: Path) -> None:
    """push-cache (immutable=True): a tag the registry holds for a key is "present" whatever manifest it names (a
    zstd entry stays when a gzip store pushes, and a runner that lost a race keeps the winner's); an image push
    (the default) moves its tag as before."""
    source = Store.open(tmp_path / "source")
    manifests = []
    for media_type in (oci.LAYER_ZSTD, oci.LAYER_GZIP):  # one layer, two compressions: two manifests
        layer = source.put(b"layer bytes " + media_type.encode(), media_type)
        config = source.put(oci.ImageConfig(diff_ids=(Digest.of(b"layer bytes"),)).to_json(), oci.OCI_CONFIG)
        manifests.append(source.put_manifest(oci.Manifest(config, (layer,))))
    zstd, gzip = manifests
    tag = "go-" + "1" * 64
    fake = FakeRegistry(Store.open(tmp_path / "fake"))
    assert push_manifests(fake, source, "team/cache", [(tag, zstd)], immutable=True) == {tag: "pushed"}
    assert push_manifests(fake, source, "team/cache", [(tag, gzip)], immutable=True) == {tag: "present"}
    assert fake.resolve("team/cache", tag).digest == zstd.digest  # type: ignore[union-attr]

    class LateRunner(FakeRegistry):  # another runner's entry lands between our HEAD and our manifest PUT
        heads = 0

        def resolve(self, repository: str, reference: str) -> Descriptor | None:
            self.heads += 1
            if self.heads == 2:
                super().push_manifest(repository, reference, source.read_blob(zstd.digest), zstd.media_type)
            return super().resolve(repository, reference)

    racing = LateRunner(Store.open(tmp_path / "racing"))
    assert push_manifests(racing, source, "team/cache", [(tag, gzip)], immutable=True) == {tag: "present"}
    assert racing.resolve("team/cache", tag).digest == zstd.digest  # type: ignore[union-attr]
    assert push_manifests(fake, source, "team/cache", [(tag, gzip)]) == {tag: "pushed"}, "images move their tags"


@pytest.mark.parametrize("forgery", ["key label", "layer media type"])
def test_pull_cache_adds_entries_only_through_the_checks(forgery: str, make_project, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A registry entry that `ocibuild verify` would reject (its key label names another key; a layer descriptor
    with a manifest's media type, as one pull-cache once stored) is refused by pull-cache and tags nothing."""
    from ocibuild.errors import StoreError
    from ocibuild.inputs import StatCache
    from ocibuild.planner import build, make_plan
    from ocibuild.recipe.lock import Lock
    from ocibuild.recipe.project import load_project
    from ocibuild.store.entries import cache_tag
    from ocibuild.teamcache import pull_layers, push_layers, remote_status

    root = make_project({"source": 'kind = "copy"\nfrom = "src"\nto = "/src"\n'}, files={"src/main.go": "package main\n"})
    project = load_project(root)
    built = Store.open(tmp_path / "built")
    plan = build(make_plan(project, built, Lock(), StatCache(None)), built).plan
    fake = FakeRegistry(Store.open(tmp_path / "fake"))
    assert push_layers(plan, built, fake, "team/cache") == {"source": "pushed"}  # type: ignore[arg-type]
    tag = cache_tag("source", plan.layer("source").key)
    entry = built.get_manifest(built.resolve(tag).digest)  # type: ignore[union-attr]
    config = built.get_config(entry.config.digest)
    if forgery == "key label":
        forged = oci.ImageConfig(diff_ids=config.diff_ids, architecture=config.architecture,
                                 labels={**config.labels, "dev.ocibuild.layer.key": "sha256:" + "e" * 64})
        forged_entry = oci.Manifest(built.put(forged.to_json(), oci.OCI_CONFIG), entry.layers)
        refusal = rf"cache entry '{tag}': its key label is 'sha256:e{{64}}', its tag names the key"
    else:
        layer = entry.layers[0]
        forged_entry = oci.Manifest(entry.config, (Descriptor(oci.OCI_MANIFEST, layer.digest, layer.size),))
        refusal = rf"tag '{tag}' > layer 0 has media type '{re.escape(oci.OCI_MANIFEST)}', not a layer"
    push_manifests(fake, built, "team/cache", [(tag, built.put_manifest(forged_entry))])

    store = Store.open(tmp_path / "store")
    wanted, remotes = remote_status(make_plan(project, store, Lock(), StatCache(None)), fake, "team/cache")  # type: ignore[arg-type]
    assert wanted.layer("source").status == "pull"
    with pytest.raises(StoreError, match=refusal):
        pull_layers(wanted, store, fake, "team/cache", remotes)  # type: ignore[arg-type]
    assert store.resolve(tag) is None and store.verify() == []
