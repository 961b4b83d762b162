"""The registry client without a network: challenges, Retry-After, loopback rules, where credentials come from."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pytest

from ocibuild.errors import RegistryError
from ocibuild.net.auth import Challenge, Credentials, find_credentials, parse_challenges, save_credentials
from ocibuild.net.http import tls_context
from ocibuild.net.retry import RetryPolicy, parse_retry_after
from ocibuild.net.session import is_loopback, proxy_for


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
