"""Registry credentials and the Authorization header: auth files, credential helpers, challenges, bearer tokens.

Credentials come from the auth files podman, skopeo and Docker read (:func:`auth_files`; first match wins) or
the docker-credential-* helper one of them names, and are saved the way ``docker login`` saves them. What to send
is learned from the registry's challenge (WWW-Authenticate on a 401): basic credentials as they are, or a bearer
token fetched from the realm the challenge names, one per set of scopes, cached until shortly before it expires.
Credentials only ever go to the registry's own host and its token server, which may be another host (Docker Hub's
is), as Docker and containers/image send them; never over plain HTTP when the registry is reached over https. No
message, log line or file written here holds a password or token (the auth file itself aside), and a token that
could not be sent as it came (a control character, a space, beyond ASCII) is refused where it arrives.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode, urlsplit

from ..errors import FormatError, RegistryError
from ..files import atomic_write, read_bounded
from ..oci import parse_json
from .retry import RETRY_STATUS, Retrier, RetryableFailure, parse_retry_after
from .session import is_loopback, one_line, printable_url

if TYPE_CHECKING:
    from .http import Response

log = logging.getLogger(__name__)

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"
_DOCKER_HUB_AUTH_KEY = "https://index.docker.io/v1/"
_HELPER_HINT = "check the helper works: echo HOST | docker-credential-HELPER get"

# one HTTP exchange (method, url, headers, body), its failures already translated for the registry
Send = Callable[[str, str, Mapping[str, str], bytes | None], "Response"]


@dataclass(frozen=True)
class Credentials:
    """A username and secret for one registry. ``identity_token``: the secret is an OAuth2 refresh token."""

    username: str
    password: str = field(repr=False)
    identity_token: bool = False


def basic(username: str, password: str) -> str:
    """``user:password`` in base64: the credentials of a Basic Authorization header and of an auth file entry."""
    return base64.b64encode(f"{username}:{password}".encode()).decode()


# ---- auth files and credential helpers ----------------------------------------------------------------------------


def _auth_key(registry: str) -> str:
    """How a registry is named in auth files: docker.io as Docker names it, others as host[:port]."""
    return _DOCKER_HUB_AUTH_KEY if registry == DOCKER_HUB else registry


def _normalise_auth_key(key: str) -> str:
    host = re.sub(r"^[a-z]+://", "", key).split("/", 1)[0]
    return DOCKER_HUB if host in ("index.docker.io", DOCKER_HUB_API, DOCKER_HUB) else host


def auth_files(env: Mapping[str, str] | None = None) -> list[Path]:
    """Where credentials are looked for, first match wins: $REGISTRY_AUTH_FILE, containers' auth.json
    (${XDG_RUNTIME_DIR}/containers, then ~/.config/containers), then Docker's config.json ($DOCKER_CONFIG or
    ~/.docker)."""
    env = os.environ if env is None else env
    home = Path(env.get("HOME") or Path.home())
    files = []
    if env.get("REGISTRY_AUTH_FILE"):
        files.append(Path(env["REGISTRY_AUTH_FILE"]))
    if env.get("XDG_RUNTIME_DIR"):
        files.append(Path(env["XDG_RUNTIME_DIR"]) / "containers" / "auth.json")
    files.append(Path(env.get("XDG_CONFIG_HOME") or home / ".config") / "containers" / "auth.json")
    files.append(Path(env.get("DOCKER_CONFIG") or home / ".docker") / "config.json")
    return files


AUTH_FILE_LIMIT = 16 << 20  # an auth file is read whole; far more than thousands of registries need
_BROKEN_HINT = ("fix the file by hand (ocibuild never rewrites an auth file it cannot read: that would lose its "
                "other entries), or move it away and log in again")


def _read_auth_file(path: Path) -> dict[str, Any]:
    """An auth file's JSON object; {} when the file does not exist. A file that exists but cannot be read or
    parsed is an error, as in podman and skopeo: read as empty, a typo would make pulls anonymous (failing far
    from the cause) and let ``login`` overwrite every other entry."""
    try:
        text = read_bounded(path, AUTH_FILE_LIMIT).decode()
    except FileNotFoundError:
        return {}
    except OSError as err:
        raise RegistryError(f"cannot read the auth file {path}: {err.strerror}", "check its permissions") from None
    except UnicodeDecodeError:
        raise RegistryError(f"{path}: the auth file is not UTF-8 text", _BROKEN_HINT) from None
    try:
        value = parse_json(text, f"{path}: the auth file") if text.strip() else {}
    except FormatError as err:
        raise RegistryError(str(err), _BROKEN_HINT) from None
    if not isinstance(value, dict):
        raise RegistryError(f"{path}: the auth file is not a JSON object", _BROKEN_HINT)
    for section in ("auths", "credHelpers"):
        if value.get(section) is not None and not isinstance(value[section], dict):
            raise RegistryError(f"{path}: '{section}' is not a JSON object", _BROKEN_HINT)
    return value


def _names(data: Mapping[str, Any], registry: str) -> bool:
    """Whether an auth file has an entry (``auths`` or ``credHelpers``) for ``registry``."""
    return any(_normalise_auth_key(key) == registry for section in ("auths", "credHelpers")
               for key in (data.get(section) or {}))


def _credential_helper(helper: str, registry: str, env: Mapping[str, str]) -> Credentials | None:
    import shutil
    import subprocess  # (here, not at the top: start-up time of every registry command)

    exe = shutil.which(f"docker-credential-{helper}", path=env.get("PATH"))
    if exe is None:
        raise RegistryError(f"credential helper docker-credential-{helper} (configured for {registry}) is not installed",
                            "install it, or remove it from credHelpers/credsStore in the auth file")
    for key in dict.fromkeys((_auth_key(registry), registry)):
        try:
            result = subprocess.run([exe, "get"], input=key, capture_output=True, text=True, timeout=60,
                                    env=dict(env))
        except (OSError, subprocess.TimeoutExpired) as err:
            raise RegistryError(f"credential helper docker-credential-{helper} failed: {type(err).__name__}",
                                _HELPER_HINT) from None
        if result.returncode != 0:
            continue  # "credentials not found in native keychain": try the next name, then anonymous
        try:
            value = parse_json(result.stdout, f"the output of docker-credential-{helper}", limit=1 << 20)
            username, secret = value["Username"], value["Secret"]
        except (FormatError, KeyError, TypeError):
            raise RegistryError(f"credential helper docker-credential-{helper} returned malformed output",
                                _HELPER_HINT) from None
        if isinstance(username, str) and isinstance(secret, str) and secret:
            return Credentials(username, secret, identity_token=username == "<token>")
    return None


def find_credentials(registry: str, env: Mapping[str, str] | None = None) -> Credentials | None:
    """The credentials recorded for ``registry`` (host[:port]) in the first auth file that knows it, asking a
    docker-credential-* helper where one is configured; None for anonymous access."""
    env = os.environ if env is None else env
    for path in auth_files(env):
        data = _read_auth_file(path)
        helpers = data.get("credHelpers") or {}
        if isinstance(helpers, dict):
            for key, helper in helpers.items():
                if _normalise_auth_key(key) == registry and isinstance(helper, str):
                    return _credential_helper(helper, registry, env)
        auths = data.get("auths") or {}
        if isinstance(auths, dict):
            for key, entry in auths.items():
                if _normalise_auth_key(key) != registry or not isinstance(entry, dict):
                    continue
                found = _decode_auth_entry(entry, path, registry)
                if found is not None:
                    return found
        store = data.get("credsStore")
        if isinstance(store, str) and store:
            found = _credential_helper(store, registry, env)
            if found is not None:
                return found
    return None


def _decode_auth_entry(entry: Mapping[str, Any], path: Path, registry: str) -> Credentials | None:
    token = entry.get("identitytoken")
    username, password = entry.get("username"), entry.get("password")
    if isinstance(entry.get("auth"), str) and entry["auth"]:
        try:
            username, _, password = base64.b64decode(entry["auth"], validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            raise RegistryError(f"{path}: the 'auth' entry for {registry} is not valid base64 of user:password",
                                f"run `ocibuild login {registry}` again") from None
    if isinstance(token, str) and token:
        return Credentials(username if isinstance(username, str) else "", token, identity_token=True)
    if isinstance(username, str) and isinstance(password, str) and username:
        return Credentials(username, password)
    return None


def login_file(registry: str, env: Mapping[str, str]) -> Path:
    """The auth file ``login`` records ``registry``'s credentials in: the one lookup will read them from first.

    $REGISTRY_AUTH_FILE when set (lookup reads it first); else the first auth file in lookup order that already
    has an entry for the registry (so a new password replaces the one lookup would find, say podman's in
    containers' auth.json, rather than landing behind it); else Docker's config.json, as ``docker login``."""
    files = auth_files(env)
    if env.get("REGISTRY_AUTH_FILE"):
        return files[0]
    return next((path for path in files if _names(_read_auth_file(path), registry)), files[-1])


def save_credentials(registry: str, credentials: Credentials, env: Mapping[str, str] | None = None) -> Path:
    """Record credentials as ``docker login`` does, in :func:`login_file`: through the helper it configures, else
    base64 in its ``auths`` (every other key and entry kept), written atomically with mode 0600. Returns the
    file. A file that cannot be parsed is never written (an error naming it and the line)."""
    env = os.environ if env is None else env
    path = login_file(registry, env)
    data = _read_auth_file(path)
    helper = next((h for key, h in (data.get("credHelpers") or {}).items() if _normalise_auth_key(key) == registry),
                  None) or data.get("credsStore")
    if isinstance(helper, str) and helper:
        _store_with_helper(helper, registry, credentials, path, env)
        return path
    auths: dict[str, Any] = data.get("auths") or {}
    for key in [key for key in auths if _normalise_auth_key(key) == registry]:
        del auths[key]  # another spelling of the same registry (https://host/v2/) would otherwise stay first
    auths[_auth_key(registry)] = {"auth": basic(credentials.username, credentials.password)}
    data["auths"] = auths
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        atomic_write(path, (json.dumps(data, indent="\t") + "\n").encode(), mode=0o600)
    except OSError as err:
        raise RegistryError(f"cannot write {path}: {err.strerror}", "check the permissions of its directory") from None
    return path


def _store_with_helper(helper: str, registry: str, credentials: Credentials, path: Path,
                       env: Mapping[str, str]) -> None:
    import shutil
    import subprocess

    exe = shutil.which(f"docker-credential-{helper}", path=env.get("PATH"))
    if exe is None:
        raise RegistryError(f"credential helper docker-credential-{helper} is not installed",
                            "install it, or remove credsStore/credHelpers from " + str(path))
    payload = json.dumps({"ServerURL": _auth_key(registry), "Username": credentials.username,
                          "Secret": credentials.password})
    result = subprocess.run([exe, "store"], input=payload, capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise RegistryError(f"credential helper docker-credential-{helper} could not store the credentials",
                            "check the helper works, or remove it from " + str(path))


# ---- challenges and tokens ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Challenge:
    scheme: str  # lower case: "basic" or "bearer"
    params: Mapping[str, str]


_TOKEN68 = r"[A-Za-z0-9._~+/-]+=*"
_SENDABLE = re.compile(r"[!-~]+")  # a bearer token goes into a header as it is: visible ASCII only
_PARAM = re.compile(r'\s*([A-Za-z0-9!#$%&\'*+.^_`|~-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^\s,]*)\s*(?:,|$)')


def parse_challenges(header: str) -> list[Challenge]:
    """The challenges of a WWW-Authenticate header (RFC 7235): scheme and parameters, quoted or not."""
    challenges: list[Challenge] = []
    rest = header.strip()
    while rest:
        match = re.match(r"([A-Za-z][A-Za-z0-9!#$%&'*+.^_`|~-]*)\s*", rest)
        if match is None:
            break
        scheme = match.group(1).lower()
        rest = rest[match.end():]
        params: dict[str, str] = {}
        while rest:
            param = _PARAM.match(rest)
            if param is None:
                token = re.match(rf"\s*{_TOKEN68}\s*(?:,|$)", rest)
                if token is not None and not params:
                    rest = rest[token.end():]
                break
            value = param.group(2)
            if value.startswith('"'):
                value = re.sub(r"\\(.)", r"\1", value[1:-1])
            params[param.group(1).lower()] = value
            rest = rest[param.end():].lstrip()
        challenges.append(Challenge(scheme, params))
        rest = rest.lstrip(", ")
    return challenges


class Authenticator:
    """The Authorization header for one registry, from the challenge it sent (:meth:`learn`); thread-safe.

    ``send`` makes one HTTP exchange (its failures already translated: retryable ones as RetryableFailure),
    ``retrier`` retries the token requests; ``plain_http_allowed``: the registry may be reached over plain HTTP,
    and so may its token server, unless the registry is reached over https."""

    def __init__(self, registry: str, credentials: Credentials | None, *, plain_http_allowed: bool, send: Send,
                 retrier: Retrier) -> None:
        self.registry = registry
        self.credentials = credentials
        self._plain_http_allowed = plain_http_allowed
        self._send = send
        self._retrier = retrier
        self._lock = threading.Lock()
        self._challenge: Challenge | None = None
        self._over_https = False  # the challenge came over https
        self._tokens: dict[tuple[str, ...], tuple[str, float]] = {}

    @property
    def challenge(self) -> Challenge | None:
        return self._challenge

    def reset(self) -> None:
        """Forget the challenge (a login check learns it again)."""
        with self._lock:
            self._challenge = None

    def learn(self, www_authenticate: str, url: str) -> None:
        """Take the first basic or bearer challenge of a 401's WWW-Authenticate header, the answer to ``url``."""
        for challenge in parse_challenges(www_authenticate):
            if challenge.scheme in ("bearer", "basic"):
                with self._lock:
                    self._challenge = challenge
                    self._over_https = urlsplit(url).scheme == "https"
                return

    def forget(self, scopes: tuple[str, ...]) -> None:
        """Drop the token for ``scopes`` (the registry refused it)."""
        with self._lock:
            self._tokens.pop(scopes, None)

    def can_answer(self) -> bool:
        """Whether another try after a 401 may succeed: a token to fetch, or credentials to send."""
        challenge = self._challenge
        return challenge is not None and (challenge.scheme == "bearer" or self.credentials is not None)

    def header(self, scopes: tuple[str, ...]) -> str | None:
        """The Authorization header for a request needing ``scopes``, or None (anonymous)."""
        challenge = self._challenge
        if challenge is None:
            return None
        if challenge.scheme == "basic":
            return None if self.credentials is None else \
                "Basic " + basic(self.credentials.username, self.credentials.password)
        with self._lock:
            cached = self._tokens.get(scopes)
        if cached is not None and cached[1] > time.monotonic():
            return f"Bearer {cached[0]}"
        token, lifetime = self.fetch_token(scopes)
        with self._lock:
            self._tokens[scopes] = (token, time.monotonic() + max(lifetime - 10, 5))
        return f"Bearer {token}"

    def fetch_token(self, scopes: tuple[str, ...]) -> tuple[str, float]:
        """A bearer token for ``scopes`` from the challenge's realm, and its lifetime in seconds."""
        challenge = self._challenge
        assert challenge is not None and challenge.scheme == "bearer"
        realm = challenge.params.get("realm", "")
        parts = urlsplit(realm)
        if parts.scheme not in ("https", "http") or not parts.hostname:
            raise RegistryError(f"{self.registry} asks for a token from {realm!r}, which is not a URL",
                                code="UNAUTHORIZED", status=401)
        if parts.scheme == "http" and (self._over_https or not (is_loopback(parts.netloc) or self._plain_http_allowed)):
            why = "the registry itself is reached over https" if self._over_https else \
                "plain HTTP is only for loopback hosts and those listed in [registry] insecure"
            raise RegistryError(f"{self.registry} asks for a token over plain HTTP ({printable_url(realm)}), which "
                                f"would carry the credentials in the clear; refused: {why}",
                                "a token server must use https: ask the registry's operator to fix its realm",
                                code="UNAUTHORIZED", status=401)
        query: list[tuple[str, str]] = []
        if challenge.params.get("service"):
            query.append(("service", challenge.params["service"]))
        query += [("scope", scope) for scope in scopes]
        headers: dict[str, str] = {}
        body: bytes | None = None
        method = "GET"
        creds = self.credentials
        if creds is not None and creds.identity_token:
            method = "POST"
            headers["Content-Type"] = "application/x-www-form-urlencoded"
            body = urlencode([("grant_type", "refresh_token"), ("refresh_token", creds.password),
                              ("client_id", "ocibuild"), *query]).encode()
        elif creds is not None:
            headers["Authorization"] = "Basic " + basic(creds.username, creds.password)
        url = realm + ("&" if "?" in realm else "?") + urlencode(query) if method == "GET" and query else realm
        return self._retrier.run(lambda: self._token_from(method, url, headers, body, realm, scopes))

    def _token_from(self, method: str, url: str, headers: Mapping[str, str], body: bytes | None, realm: str,
                    scopes: tuple[str, ...]) -> tuple[str, float]:
        """One token request: the token and its lifetime; RetryableFailure for a status worth another try."""
        with self._send(method, url, headers, body) as response:
            status = response.status_code
            if status != 200:
                who = f"as '{self.credentials.username}'" if self.credentials is not None else "anonymously"
                error = RegistryError(
                    f"{self.registry}: the token server {printable_url(realm)} refused "
                    f"{' '.join(scopes) or 'access'} {who} (HTTP {status})",
                    f"run `ocibuild login {self.registry}` with an account allowed to do this",
                    status=status, code="UNAUTHORIZED")
                if status in RETRY_STATUS:
                    raise RetryableFailure(error, delay=parse_retry_after(response.headers.get("Retry-After")))
                raise error
            try:
                value = parse_json(response.read(1 << 20), "the token response")
                token = value.get("token") or value.get("access_token")
                lifetime = float(value.get("expires_in") or 60)
            except OSError as err:  # the body was cut or malformed: worth another try, like any connection error
                raise RetryableFailure(RegistryError(
                    f"{self.registry}: reading a token from {printable_url(realm)}: {one_line(err)}",
                    "re-run the same command", retryable=True)) from None
            except (FormatError, ValueError, AttributeError, TypeError):  # float() of a string: ValueError
                token = None
        if not isinstance(token, str) or not token:
            raise RegistryError(f"{self.registry}: the token server {printable_url(realm)} returned no token",
                                status=200, code="UNAUTHORIZED")
        if not _SENDABLE.fullmatch(token):
            raise RegistryError(f"{self.registry}: the token server {printable_url(realm)} returned a token holding a "
                                "control character, a space or a character beyond ASCII, which cannot go into a "
                                "header; refused", "the token server is broken or hostile: report it to the "
                                "registry's operator", status=200, code="UNAUTHORIZED")
        return token, lifetime
