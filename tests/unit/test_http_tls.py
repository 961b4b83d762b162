"""Whom a registry's certificate may come from (containers-certs.d(5)): every ``*.crt`` in certs.d/<host>/ is
trusted besides the system's roots (or $SSL_CERT_FILE), as containers/image does. Handshakes run over a
socketpair against certificates made by trustme; the "system" store is one of ours, named by $SSL_CERT_DIR or
$SSL_CERT_FILE the way OpenSSL reads them."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import threading
from pathlib import Path

import pytest
import trustme

from ocibuild.errors import RegistryError
from ocibuild.net.http import tls_context
from ocibuild.net.session import _ca_files
from ocibuild.registry import Client

HOST = "registry.test"
NETLOC = f"{HOST}:5000"


def _trusts(context: ssl.SSLContext, ca: trustme.CA) -> bool:
    """Whether a TLS client with ``context`` accepts a server whose certificate for HOST ``ca`` issued."""
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert(HOST).configure_cert(server_context)
    ours, theirs = socket.socketpair()
    ours.settimeout(5)
    theirs.settimeout(5)

    def serve() -> None:
        try:
            with server_context.wrap_socket(theirs, server_side=True) as tls:
                tls.recv(1)
        except OSError:
            pass  # the client refused the certificate, or hung up
        finally:
            theirs.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with context.wrap_socket(ours, server_hostname=HOST):
            return True
    except ssl.SSLCertVerificationError:
        return False
    finally:
        ours.close()
        thread.join(10)


def _write(ca: trustme.CA, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ca.cert_pem.write_to_path(str(path))
    return path


@pytest.fixture
def cas(tmp_path: Path) -> dict[str, trustme.CA]:
    """A "system" CA, two CAs of the registry's certs.d directory (a.crt, b.crt) and one nobody trusts."""
    made = {name: trustme.CA() for name in ("system", "a", "b", "stranger")}
    certs = tmp_path / "config/containers/certs.d" / NETLOC
    _write(made["a"], certs / "a.crt")
    _write(made["b"], certs / "b.crt")
    (certs / "client.cert").write_text("not a CA: a client certificate, which ocibuild does not send\n")
    (certs / "client.key").write_text("not a CA either\n")
    return made


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {"HOME": str(tmp_path / "home"), "XDG_CONFIG_HOME": str(tmp_path / "config"), **extra}


def test_the_crt_files_of_the_first_certs_d_directory_that_has_any(tmp_path: Path, cas: dict[str, trustme.CA]) -> None:
    certs = tmp_path / "config/containers/certs.d" / NETLOC
    assert _ca_files(NETLOC, _env(tmp_path)) == (None, [str(certs / "a.crt"), str(certs / "b.crt")])
    assert _ca_files(NETLOC, _env(tmp_path, SSL_CERT_FILE="/x/bundle.pem"))[0] == "/x/bundle.pem"
    assert _ca_files(HOST, _env(tmp_path)) == (None, []), "the port is part of the directory's name"
    home = _env(tmp_path)
    del home["XDG_CONFIG_HOME"]
    _write(cas["a"], tmp_path / "home/.config/containers/certs.d" / NETLOC / "ca.crt")
    assert _ca_files(NETLOC, home)[1] == [str(tmp_path / "home/.config/containers/certs.d" / NETLOC / "ca.crt")]


def test_certs_d_adds_to_the_system_roots_read_from_a_bundle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             cas: dict[str, trustme.CA]) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(_write(cas["system"], tmp_path / "system/bundle.pem")))
    monkeypatch.setenv("SSL_CERT_DIR", str(tmp_path / "no-hashed-directory"))
    context = tls_context(*_ca_files(NETLOC, _env(tmp_path)))
    assert _trusts(context, cas["a"]) and _trusts(context, cas["b"]), "every *.crt, not only the first"
    assert _trusts(context, cas["system"]), "the system's roots are kept"
    assert not _trusts(context, cas["stranger"])


@pytest.mark.skipif(shutil.which("openssl") is None, reason="`openssl rehash` makes the hashed directory")
def test_certs_d_adds_to_the_system_roots_read_from_a_hashed_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cas: dict[str, trustme.CA]) -> None:
    hashed = tmp_path / "system-hashed"
    _write(cas["system"], hashed / "system.pem")
    subprocess.run(["openssl", "rehash", str(hashed)], check=True, capture_output=True)
    monkeypatch.setenv("SSL_CERT_DIR", str(hashed))
    context = tls_context(*_ca_files(NETLOC, _env(tmp_path)))
    assert _trusts(context, cas["a"]) and _trusts(context, cas["b"]) and _trusts(context, cas["system"])
    assert not _trusts(context, cas["stranger"])


def test_certs_d_adds_to_ssl_cert_file(tmp_path: Path, cas: dict[str, trustme.CA]) -> None:
    bundle = _write(cas["system"], tmp_path / "bundle.pem")
    context = tls_context(*_ca_files(NETLOC, _env(tmp_path, SSL_CERT_FILE=str(bundle))))
    assert _trusts(context, cas["a"]) and _trusts(context, cas["b"]) and _trusts(context, cas["system"])


def test_the_registry_client_trusts_certs_d(tmp_path: Path, cas: dict[str, trustme.CA]) -> None:
    with Client(NETLOC, env=_env(tmp_path)) as client:
        assert _trusts(client._session._tls_context(NETLOC), cas["b"])


def test_a_crt_that_is_no_certificate_is_an_error_naming_it(tmp_path: Path, cas: dict[str, trustme.CA]) -> None:
    broken = tmp_path / "config/containers/certs.d" / NETLOC / "c.crt"
    broken.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    with Client(NETLOC, env=_env(tmp_path)) as client:
        with pytest.raises(RegistryError, match=rf"^TLS settings for {NETLOC}: cannot use the CA certificates in "
                                                rf"{broken}: SSLError") as caught:
            client.check_login()  # refused before any connection is opened
    assert caught.value.hint
