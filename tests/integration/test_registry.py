"""The layer cache and image push through the real docker-registry on loopback: anonymous, basic auth behind TLS,
the bearer-token flow with scopes; round trips; concurrent pushers; interop with skopeo and podman."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import trustme
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from conftest import RegistryServer, Podman, ocibuild_json, require, run_ocibuild, start_registry, write
from ocibuild import oci
from ocibuild.store import Store

from integration.test_run_layers import busybox_rootfs


def isolated_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """No credentials or config of the host: HOME, XDG dirs and the config file all under tmp_path."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env = {"HOME": str(home), "XDG_RUNTIME_DIR": str(home / "run"), "XDG_CONFIG_HOME": str(home / ".config"),
           "OCIBUILD_CONFIG": str(home / "ocibuild.toml"), "REGISTRY_AUTH_FILE": "", "DOCKER_CONFIG": "",
           "SSL_CERT_FILE": "", "REQUESTS_CA_BUNDLE": ""}
    env.update(extra)
    return env


def small_project(root: Path, layers: tuple[str, ...] = ("tools", "source"), cache: str = "") -> Path:
    """Independent copy layers, each with a 1.5 MB incompressible file, so blobs go through the streaming paths."""
    names = ", ".join(f'"{n}"' for n in layers)
    cache_section = f'[cache]\nref = "{cache}"\n' if cache else ""
    write(root / "ocibuild.toml", f'[image]\nname = "dev"\nlayers = [{names}]\ncompression = "gzip"\n{cache_section}')
    for name in layers:
        write(root / "layers" / name / "layer.toml", f'kind = "copy"\nfrom = "trees/{name}"\nto = "/opt/{name}"\n')
        tree = root / "trees" / name
        tree.mkdir(parents=True, exist_ok=True)
        (tree / "blob.bin").write_bytes(random.Random(name).randbytes(1536 * 1024))
        write(tree / "README", f"layer {name}\n")
    return root


def statuses(doc: dict[str, Any]) -> dict[str, str]:
    return {layer["name"]: layer["status"] for layer in doc["layers"]}


def verify_clean(path: Path) -> None:
    assert Store.open(path, create=False).verify() == []


# ---- anonymous -------------------------------------------------------------------------------------------------


def test_round_trip_push_cache_pull_cache_rebuilds_nothing(registry: RegistryServer, tmp_path: Path) -> None:
    env = isolated_env(tmp_path)
    project = small_project(tmp_path / "project")
    cache = f"{registry.host}/roundtrip/cache"
    one, two, three = (str(tmp_path / name) for name in ("one", "two", "three"))

    built = ocibuild_json("build", "-C", str(project), "--store", one, env=env)
    assert set(statuses(built).values()) == {"built"}
    pushed = ocibuild_json("push-cache", cache, "-C", str(project), "--store", one, env=env)
    assert set(statuses(pushed).values()) == {"pushed"}
    assert pushed["transfer"]["uploaded"] > 3_000_000
    again = ocibuild_json("push-cache", cache, "-C", str(project), "--store", one, env=env)
    assert set(statuses(again).values()) == {"present"}, "pushing an existing entry is a no-op"
    assert again["transfer"]["uploaded"] == 0 and again["transfer"]["blobs_pushed"] == 0

    # an empty store: plan sees the cache, pull-cache --plan moves nothing, pull-cache fetches, build builds nothing
    plan = ocibuild_json("plan", "--cache", cache, "-C", str(project), "--store", two, env=env)
    assert set(statuses(plan).values()) == {"pull"}
    offline = ocibuild_json("plan", "--offline", "--cache", cache, "-C", str(project), "--store", two, env=env)
    assert set(statuses(offline).values()) == {"build"}
    dry = ocibuild_json("pull-cache", "--plan", "--cache", cache, "-C", str(project), "--store", two, env=env)
    assert set(statuses(dry).values()) == {"pull"} and dry["bytes"] > 3_000_000
    assert dry["transfer"]["downloaded"] == 0
    assert Store.open(Path(two)).index().manifests == ()
    pulled = ocibuild_json("pull-cache", "--cache", cache, "-C", str(project), "--store", two, env=env)
    assert set(statuses(pulled).values()) == {"pulled"}
    assert pulled["transfer"]["downloaded"] == dry["bytes"]
    rebuilt = ocibuild_json("build", "-C", str(project), "--store", two, env=env)
    assert set(statuses(rebuilt).values()) == {"cached"}
    assert rebuilt["digest"] == built["digest"]

    # build with [cache] ref pulls by itself: status "pulled", the same image
    with_ref = small_project(tmp_path / "project", cache=cache)
    direct = ocibuild_json("build", "-C", str(with_ref), "--store", three, env=env)
    assert set(statuses(direct).values()) == {"pulled"}
    assert direct["digest"] == built["digest"]
    for store in (one, two, three):
        verify_clean(Path(store))


def test_push_cache_and_pull_cache_take_the_reference_alike(registry: RegistryServer, tmp_path: Path) -> None:
    """REF as an argument of both; `--cache REF` still works (a contract); `[cache] ref` is the default of both."""
    env = isolated_env(tmp_path)
    project = small_project(tmp_path / "project")
    cache = f"{registry.host}/positional/cache"
    one, two, three, four = (str(tmp_path / name) for name in ("one", "two", "three", "four"))
    ocibuild_json("build", "-C", str(project), "--store", one, env=env)
    pushed = ocibuild_json("push-cache", cache, "-C", str(project), "--store", one, env=env)
    assert pushed["cache"] == cache and set(statuses(pushed).values()) == {"pushed"}

    dry = ocibuild_json("pull-cache", cache, "--plan", "-C", str(project), "--store", two, env=env)
    assert dry["cache"] == cache and set(statuses(dry).values()) == {"pull"}
    assert Store.open(Path(two)).index().manifests == ()
    # the argument wins over --cache, which is never asked (nothing listens on port 1)
    pulled = ocibuild_json("pull-cache", cache, "--cache", "127.0.0.1:1/nowhere", "-C", str(project), "--store",
                           two, env=env)
    assert pulled["cache"] == cache and set(statuses(pulled).values()) == {"pulled"}
    by_option = ocibuild_json("pull-cache", "--cache", cache, "-C", str(project), "--store", three, env=env)
    assert by_option["cache"] == cache and set(statuses(by_option).values()) == {"pulled"}

    other = f"{registry.host}/positional/from-toml"
    with_ref = small_project(tmp_path / "project", cache=other)  # the same trees: the same keys
    by_default = ocibuild_json("push-cache", "-C", str(with_ref), "--store", one, env=env)
    assert by_default["cache"] == other and set(statuses(by_default).values()) == {"pushed"}
    from_toml = ocibuild_json("pull-cache", "-C", str(with_ref), "--store", four, env=env)
    assert from_toml["cache"] == other and set(statuses(from_toml).values()) == {"pulled"}
    for store in (one, two, three, four):
        verify_clean(Path(store))


def test_second_repository_push_uses_mounts_and_moves_no_layer_bytes(registry: RegistryServer,
                                                                      tmp_path: Path) -> None:
    env = isolated_env(tmp_path)
    project = small_project(tmp_path / "project")
    store = str(tmp_path / "store")
    ocibuild_json("build", "-C", str(project), "--store", store, env=env)
    first = ocibuild_json("push-cache", f"{registry.host}/mounts/a", "-C", str(project), "--store", store, env=env)
    assert first["transfer"]["blobs_mounted"] == 0
    second = ocibuild_json("push-cache", f"{registry.host}/mounts/b", "-C", str(project), "--store", store, env=env)
    assert set(statuses(second).values()) == {"pushed"}
    assert second["transfer"]["uploaded"] == 0
    assert second["transfer"]["blobs_mounted"] == first["transfer"]["blobs_pushed"]
    verify_clean(Path(store))


def test_machines_build_a_layer_each_push_at_once_and_another_assembles_without_building(
        registry: RegistryServer, tmp_path: Path) -> None:
    """The README's CI recipe: each runner `build LAYER` of the same project, then `push-cache`; the last one
    pulls everything."""
    env = isolated_env(tmp_path)
    cache = f"{registry.host}/parallel/cache"
    names = ("tools", "source", "docs")
    full = small_project(tmp_path / "full", names)
    machines = []
    for name in names:
        store = tmp_path / f"store-{name}"
        built = ocibuild_json("build", name, "-C", str(full), "--store", str(store), env=env)
        assert statuses(built) == {name: "built"} and built["digest"] is None
        machines.append((name, store))
    processes = [subprocess.Popen([sys.executable, "-m", "ocibuild.cli", "push-cache", cache, "--json",
                                   "-C", str(full), "--store", str(store)], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env={**os.environ, **env})
                 for _, store in machines]
    for process, (name, _) in zip(processes, machines):
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0, err
        assert statuses(json.loads(out)) == {n: "pushed" if n == name else "missing" for n in names}
    # `build LAYER` pulls from the team cache like a whole build
    one = ocibuild_json("build", "source", "--cache", cache, "-C", str(full), "--store", str(tmp_path / "one"),
                        env=env)
    assert statuses(one) == {"source": "pulled"}
    result = ocibuild_json("build", "--cache", cache, "-C", str(full), "--store", str(tmp_path / "last"), env=env)
    assert set(statuses(result).values()) == {"pulled"}
    for _, store in machines:
        verify_clean(store)
    verify_clean(tmp_path / "one")
    verify_clean(tmp_path / "last")


# ---- interop: skopeo and podman --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def busybox_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bb") / "project"
    busybox_rootfs(root / "rootfs")
    write(root / "ocibuild.toml", '[image]\nname = "bb"\nlayers = ["base", "motd"]\ncmd = ["/bin/cat", "/etc/motd"]\n')
    write(root / "layers/base/layer.toml", 'kind = "copy"\nfrom = "rootfs"\nto = "/"\n')
    write(root / "layers/motd/layer.toml", 'kind = "copy"\nfrom = "motd"\nto = "/etc/motd.d"\n')
    write(root / "motd/hello", "hello from the registry\n")
    return root


def skopeo(*args: str) -> str:
    result = subprocess.run([require("skopeo"), *args], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.podman
def test_skopeo_and_podman_read_what_ocibuild_pushed(registry: RegistryServer, busybox_project: Path,
                                                     tmp_path: Path, podman: Podman) -> None:
    env = isolated_env(tmp_path)
    store = tmp_path / "store"
    built = ocibuild_json("build", "-C", str(busybox_project), "--store", str(store), env=env)
    cache = f"{registry.host}/interop/cache"
    ocibuild_json("push-cache", cache, "-C", str(busybox_project), "--store", str(store), env=env)
    pushed = ocibuild_json("push", f"{registry.host}/interop/bb:v1", "-C", str(busybox_project), "--store",
                           str(store), env=env)
    assert pushed["digest"] == built["digest"] and pushed["status"] == "pushed"

    # skopeo inspects a cache entry: one layer, the labels of the contract
    motd = next(layer for layer in built["layers"] if layer["name"] == "motd")
    tag = f"motd-{motd['key'][7:]}"
    inspected = json.loads(skopeo("inspect", "--tls-verify=false", f"docker://{cache}:{tag}"))
    assert inspected["Labels"]["dev.ocibuild.layer.key"] == motd["key"]
    assert inspected["Labels"]["dev.ocibuild.layer.name"] == "motd"
    assert len(inspected["Layers"]) == 1
    raw = json.loads(skopeo("inspect", "--raw", "--tls-verify=false", f"docker://{cache}:{tag}"))
    assert raw["mediaType"] == oci.OCI_MANIFEST
    # the registry holds our exact manifest bytes
    assert skopeo("inspect", "--tls-verify=false", "--format", "{{.Digest}}",
                  f"docker://{registry.host}/interop/bb:v1").strip() == built["digest"]

    # skopeo copies the image out; it verifies every blob on the way
    skopeo("copy", "--src-tls-verify=false", f"docker://{registry.host}/interop/bb:v1", f"oci:{tmp_path / 'copy'}:bb")
    assert (tmp_path / "copy" / "index.json").exists()

    # podman pulls and runs it
    podman("pull", "--tls-verify=false", f"{registry.host}/interop/bb:v1")
    out = podman("run", "--rm", f"{registry.host}/interop/bb:v1", "/bin/cat", "/etc/motd.d/hello").stdout
    assert out == "hello from the registry\n"
    verify_clean(store)


def test_an_image_skopeo_pushed_is_an_image_base_resolved_through_its_index(
        registry: RegistryServer, busybox_project: Path, tmp_path: Path) -> None:
    env = isolated_env(tmp_path)
    store = tmp_path / "store"
    ocibuild_json("build", "-C", str(busybox_project), "--store", str(store), env=env)
    base = f"{registry.host}/bases/busybox"
    skopeo("copy", "--dest-tls-verify=false", f"oci:{store}:bb", f"docker://{base}:single")
    manifest_digest = skopeo("inspect", "--tls-verify=false", "--format", "{{.Digest}}",
                             f"docker://{base}:single").strip()
    raw = skopeo("inspect", "--raw", "--tls-verify=false", f"docker://{base}:single").encode()
    # a multi-arch index: amd64 is the busybox image, arm64 something else (the same bytes under another platform)
    entry = {"mediaType": json.loads(raw)["mediaType"], "digest": manifest_digest, "size": len(raw)}
    index = {"schemaVersion": 2, "mediaType": oci.OCI_INDEX,
             "manifests": [{**entry, "platform": {"os": "linux", "architecture": "arm64"}},
                           {**entry, "platform": {"os": "linux", "architecture": "amd64"}}]}
    (tmp_path / "index.json").write_text(json.dumps(index))
    from ocibuild import registry as registry_module

    with registry_module.Registries() as registries:
        registries.client(registry.host).push_manifest("bases/busybox", "multi", json.dumps(index).encode(),
                                                       oci.OCI_INDEX)

    project = tmp_path / "derived"
    write(project / "ocibuild.toml", '[image]\nname = "derived"\nlayers = ["base", "extra"]\n')
    write(project / "layers/base/layer.toml", f'kind = "image"\nref = "{base}:multi"\n')
    write(project / "layers/extra/layer.toml", 'kind = "copy"\nfrom = "extra"\nto = "/extra"\n')
    write(project / "extra/file", "x\n")
    result = ocibuild_json("build", "-C", str(project), "--store", str(tmp_path / "store2"), env=env)
    assert statuses(result) == {"base": "built", "extra": "built"}
    lock = (project / "ocibuild.lock").read_text()
    assert manifest_digest in lock, "the index is pinned to the platform's manifest digest in ocibuild.lock"
    again = ocibuild_json("build", "--offline", "-C", str(project), "--store", str(tmp_path / "store2"), env=env)
    assert set(statuses(again).values()) == {"cached"}
    verify_clean(tmp_path / "store2")


# ---- basic auth behind TLS ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    base = tmp_path_factory.mktemp("tls-registry")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert.private_key_and_cert_chain_pem.write_to_path(str(base / "server.pem"))
    cert.private_key_pem.write_to_path(str(base / "server.key"))
    with open(base / "server.crt", "wb") as f:
        for blob in cert.cert_chain_pems:
            f.write(blob.bytes())
    ca.cert_pem.write_to_path(str(base / "ca.pem"))
    htpasswd = subprocess.run([require("htpasswd"), "-Bbn", "ci", "s3cret-pa55"], capture_output=True, text=True,
                              check=True).stdout
    (base / "htpasswd").write_text(htpasswd)
    server = start_registry(base / "server", tls=(base / "server.crt", base / "server.key"), ca=base / "ca.pem",
                            auth={"htpasswd": {"realm": "test", "path": str(base / "htpasswd")}})
    yield server
    server.stop()


def test_basic_auth_behind_tls(tls_registry: RegistryServer, tmp_path: Path) -> None:
    assert tls_registry.ca is not None
    env = isolated_env(tmp_path, SSL_CERT_FILE=str(tls_registry.ca),
                       REGISTRY_AUTH_FILE=str(tmp_path / "auth.json"))
    project = small_project(tmp_path / "project")
    store = str(tmp_path / "store")
    cache = f"{tls_registry.host}/secure/cache"
    ocibuild_json("build", "-C", str(project), "--store", store, env=env)

    anonymous = run_ocibuild("push-cache", cache, "-C", str(project), "--store", store, env=env, ok=False)
    assert anonymous.returncode == 1
    assert "401" in anonymous.stderr and "hint: run `ocibuild login" in anonymous.stderr

    untrusted = run_ocibuild("push-cache", cache, "-C", str(project), "--store", store, ok=False,
                             env={**env, "SSL_CERT_FILE": ""})
    assert untrusted.returncode == 1 and "TLS" in untrusted.stderr, "no silent downgrade to plain HTTP"

    wrong = run_ocibuild("login", tls_registry.host, "-u", "ci", "--password-stdin", stdin="wrong\n", env=env,
                         ok=False)
    assert wrong.returncode == 1 and "wrong" not in wrong.stderr + wrong.stdout
    assert not (tmp_path / "auth.json").exists()
    login = run_ocibuild("login", tls_registry.host, "-u", "ci", "--password-stdin", stdin="s3cret-pa55\n", env=env)
    assert "s3cret" not in login.stdout + login.stderr
    assert (tmp_path / "auth.json").stat().st_mode & 0o077 == 0

    pushed = run_ocibuild("push-cache", cache, "--json", "-C", str(project), "--store", store, "--debug", env=env)
    assert set(statuses(json.loads(pushed.stdout)).values()) == {"pushed"}
    assert "s3cret" not in pushed.stderr and base64.b64encode(b"ci:s3cret-pa55").decode() not in pushed.stderr
    pulled = ocibuild_json("build", "--cache", cache, "-C", str(project), "--store", str(tmp_path / "two"), env=env)
    assert set(statuses(pulled).values()) == {"pulled"}
    for path in (store, str(tmp_path / "two")):
        verify_clean(Path(path))
        assert b"s3cret" not in b"".join(p.read_bytes() for p in Path(path).rglob("*") if p.is_file())


# ---- the bearer-token flow with scopes ---------------------------------------------------------------------------


def _kid(public_key: rsa.RSAPublicKey) -> str:
    """libtrust's key id, which the registry matches against its rootcertbundle."""
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    encoded = base64.b32encode(hashlib.sha256(der).digest()[:30]).decode().rstrip("=")
    return ":".join(encoded[i:i + 4] for i in range(0, len(encoded), 4))


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


class TokenIssuer:
    """A minimal token server: user ``ci`` may pull and push everywhere; anonymous users may only pull. Records
    every scope it is asked for."""

    def __init__(self, base: Path) -> None:
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        ca = trustme.CA()
        signer = ca.issue_cert("token-signer")
        # the registry trusts the public key of this certificate: make the certificate's key ours
        from cryptography import x509
        from cryptography.x509.oid import NameOID
        import datetime

        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "token-signer")])
        now = datetime.datetime.now(datetime.timezone.utc)
        certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                       .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                       .not_valid_before(now - datetime.timedelta(days=1))
                       .not_valid_after(now + datetime.timedelta(days=1)).sign(self.key, hashes.SHA256()))
        del signer
        self.bundle = base / "token-signer.pem"
        self.bundle.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        self.requests: list[tuple[str | None, list[str]]] = []
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                query = parse_qs(urlsplit(self.path).query)
                user = None
                header = self.headers.get("Authorization", "")
                if header.startswith("Basic "):
                    name, _, password = base64.b64decode(header[6:]).decode().partition(":")
                    if (name, password) != ("ci", "t0ken-pass"):
                        self.send_response(401)
                        self.end_headers()
                        return
                    user = name
                scopes = query.get("scope", [])
                issuer.requests.append((user, scopes))
                access = []
                for scope in scopes:
                    kind, repo, actions = scope.split(":")
                    allowed = [a for a in actions.split(",") if user == "ci" or a == "pull"]
                    access.append({"type": kind, "name": repo, "actions": allowed})
                body = json.dumps({"token": issuer.token(user or "", access), "expires_in": 300}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.realm = f"http://127.0.0.1:{self.server.server_address[1]}/token"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def token(self, subject: str, access: list[dict[str, Any]]) -> str:
        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256", "kid": _kid(self.key.public_key())}
        claims = {"iss": "test-issuer", "sub": subject, "aud": "test-registry", "exp": now + 300, "nbf": now - 10,
                  "iat": now, "jti": os.urandom(8).hex(), "access": access}
        signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
        signature = self.key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{signing_input}.{_b64(signature)}"


@pytest.fixture(scope="module")
def token_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RegistryServer, TokenIssuer]]:
    base = tmp_path_factory.mktemp("token-registry")
    issuer = TokenIssuer(base)
    server = start_registry(base / "server", auth={"token": {
        "realm": issuer.realm, "service": "test-registry", "issuer": "test-issuer",
        "rootcertbundle": str(issuer.bundle)}})
    yield server, issuer
    server.stop()
    issuer.server.shutdown()
    issuer.server.server_close()


def test_bearer_tokens_are_asked_per_scope(token_registry: tuple[RegistryServer, TokenIssuer],
                                           tmp_path: Path) -> None:
    server, issuer = token_registry
    auth = tmp_path / "config.json"
    auth.write_text(json.dumps({"auths": {server.host: {"auth": base64.b64encode(b"ci:t0ken-pass").decode()}}}))
    env = isolated_env(tmp_path)
    authed = {**env, "DOCKER_CONFIG": str(tmp_path)}
    project = small_project(tmp_path / "project")
    store = str(tmp_path / "store")
    ocibuild_json("build", "-C", str(project), "--store", store, env=env)

    anonymous = run_ocibuild("push-cache", f"{server.host}/team/cache", "-C", str(project), "--store", store,
                             env=env, ok=False)
    assert anonymous.returncode == 1 and "hint: run `ocibuild login" in anonymous.stderr

    issuer.requests.clear()
    ocibuild_json("push-cache", f"{server.host}/team/cache", "-C", str(project), "--store", store, env=authed)
    second = ocibuild_json("push-cache", f"{server.host}/team/other", "-C", str(project), "--store", store,
                           env=authed)
    assert second["transfer"]["uploaded"] == 0 and second["transfer"]["blobs_mounted"] > 0
    asked = [scopes for user, scopes in issuer.requests]
    assert all(user == "ci" for user, _ in issuer.requests)
    assert ["repository:team/cache:pull,push"] in asked
    assert ["repository:team/other:pull,push", "repository:team/cache:pull"] in asked, \
        "a mount asks for push on the target and pull on the source"

    # anonymous users may pull (a pull-only token); what comes is verified and builds nothing
    pulled = ocibuild_json("build", "--cache", f"{server.host}/team/cache", "-C", str(project), "--store",
                           str(tmp_path / "two"), env=env)
    assert set(statuses(pulled).values()) == {"pulled"}
    verify_clean(Path(store))
    verify_clean(tmp_path / "two")


def test_oras_reads_a_cache_entry(registry: RegistryServer, tmp_path: Path) -> None:
    """oras-py as one more peer: it finds the entry's manifest and the layer; the layer is checked here, since
    oras-py's download_blob does not verify digests."""
    import oras.provider

    env = isolated_env(tmp_path)
    project = small_project(tmp_path / "project", ("tools",))
    store = tmp_path / "store"
    built = ocibuild_json("build", "-C", str(project), "--store", str(store), env=env)
    ocibuild_json("push-cache", f"{registry.host}/oras/cache", "-C", str(project), "--store", str(store), env=env)
    tag = f"tools-{built['layers'][0]['key'][7:]}"
    client = oras.provider.Registry(registry.host, insecure=True)
    manifest = client.get_manifest(f"{registry.host}/oras/cache:{tag}")
    assert manifest["config"]["mediaType"] == oci.OCI_CONFIG and len(manifest["layers"]) == 1
    layer = manifest["layers"][0]
    out = client.download_blob(f"{registry.host}/oras/cache:{tag}", layer["digest"], str(tmp_path / "layer"))
    assert "sha256:" + hashlib.sha256(Path(out).read_bytes()).hexdigest() == layer["digest"]
    client.session.close()


# ---- redirects to blob storage ---------------------------------------------------------------------------------


class _Recorder(ThreadingHTTPServer):
    """A loopback HTTP server that relays to the real registry; ``seen`` holds (method, path, Authorization)."""

    daemon_threads = True

    def __init__(self, upstream: str, handler: type[BaseHTTPRequestHandler]) -> None:
        super().__init__(("127.0.0.1", 0), handler)
        self.upstream = upstream
        self.seen: list[tuple[str, str, str | None]] = []
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def port(self) -> int:
        return int(self.server_address[1])


class _Relay(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Recorder

    def log_message(self, *args: Any) -> None:
        pass

    def relay(self, path: str) -> None:
        import http.client

        headers = {k: v for k, v in self.headers.items() if k.lower() in ("accept", "range", "content-type")}
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        conn = http.client.HTTPConnection(self.server.upstream, timeout=30)
        conn.request(self.command, path, body=body, headers=headers)
        response = conn.getresponse()
        data = response.read()
        self.send_response(response.status)
        for name, value in response.getheaders():
            if name.lower() not in ("connection", "transfer-encoding", "content-length", "location"):
                self.send_header(name, value)
        if response.getheader("Location"):
            self.send_header("Location", response.getheader("Location", ""))
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        conn.close()


class _BlobStorage(_Relay):
    """Where the front registry sends blob downloads: another host, as S3 or a CDN would be."""

    def do_GET(self) -> None:  # noqa: N802
        self.server.seen.append((self.command, self.path, self.headers.get("Authorization")))
        repository, digest = parse_qs(urlsplit(self.path).query)["blob"][0].rsplit("@", 1)
        self.relay(f"/v2/{repository}/blobs/{digest}")

    do_HEAD = do_GET


class _Front(_Relay):
    """A registry that wants basic auth and redirects blob reads to ``storage`` (set on the class)."""

    storage = ""

    def handle_any(self) -> None:
        authorization = self.headers.get("Authorization")
        self.server.seen.append((self.command, self.path, authorization))
        if authorization != "Basic " + base64.b64encode(b"ci:pa55word").decode():
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="front"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        parts = urlsplit(self.path)
        if self.command in ("GET", "HEAD") and "/blobs/sha256:" in parts.path:
            repository, digest = parts.path[len("/v2/"):].split("/blobs/")
            self.send_response(307)
            self.send_header("Location", f"http://{self.storage}/storage?blob={repository}@{digest}&sig=x")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.relay(self.path)

    do_GET = do_HEAD = do_PUT = do_POST = do_PATCH = handle_any


def test_credentials_never_follow_a_redirect_to_another_host(registry: RegistryServer, tmp_path: Path) -> None:
    """The front registry redirects blob reads to storage on another host (localhost vs 127.0.0.1): the blobs
    arrive, verified, and the storage never sees the Authorization header the registry itself gets."""
    project = small_project(tmp_path / "project")
    env = isolated_env(tmp_path)
    store = str(tmp_path / "store")
    ocibuild_json("build", "-C", str(project), "--store", store, env=env)
    ocibuild_json("push-cache", f"{registry.host}/redirect/cache", "-C", str(project), "--store", store, env=env)

    storage = _Recorder(registry.host, _BlobStorage)
    _Front.storage = f"localhost:{storage.port}"
    front = _Recorder(registry.host, _Front)
    try:
        auth = tmp_path / "auth.json"
        auth.write_text(json.dumps({"auths": {f"127.0.0.1:{front.port}": {
            "auth": base64.b64encode(b"ci:pa55word").decode()}}}))
        pulled = ocibuild_json("pull-cache", "--cache", f"127.0.0.1:{front.port}/redirect/cache", "-C", str(project),
                               "--store", str(tmp_path / "two"), env={**env, "REGISTRY_AUTH_FILE": str(auth)})
    finally:
        for server in (front, storage):
            server.shutdown()
            server.server_close()
    assert {layer["status"] for layer in pulled["layers"]} == {"pulled"}
    assert pulled["transfer"]["blobs_fetched"] >= 2
    assert any(path.startswith("/v2/redirect/cache/manifests/") and authorization for _, path, authorization in
               front.seen), "the registry itself gets the credentials"
    assert storage.seen and all(authorization is None for _, _, authorization in storage.seen)
    verify_clean(tmp_path / "two")
