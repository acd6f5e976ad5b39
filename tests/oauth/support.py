"""Helpers for the authorization server tests: a real database, real HTTP servers on loopback
(uvicorn in a thread), a clock the test can move forward, and helpers that act as a browser."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from urllib.parse import parse_qs, urlencode, urlsplit

import anyio
import httpx
import uvicorn
from joserfc.jws import JWSRegistry
from joserfc.registry import HeaderParameter
from mcp.client.auth import OAuthClientProvider
from mcp.shared.auth import (
    AuthorizationCodeResult,
    OAuthClientInformationFull,
    OAuthClientMetadata,
    OAuthToken,
)
from starlette.applications import Starlette

from bastion.db import Database
from bastion.oauth import AuthorizationServer, OAuthSettings, registration
from bastion.oauth.users import create_user
from tests import clients
from tests.ports import free_socket  # noqa: F401 (re-exported: many tests import it here)
from tests.waits import PATIENCE, eventually

PASSWORD = "correct horse battery staple"
# joserfc writes only a string kid; with this registry a test writes any, as an attacker would.
ANY_KID = JWSRegistry(header_registry={"kid": HeaderParameter("Key ID", lambda value: None)})


def signed_text(key, header: str, claims: str, alg: str = "ES256") -> str:
    """A compact JWS of the JSON text ``claims`` under the JSON text ``header``, both as they
    are (a member named twice, say, which no JSON encoder writes), signed with ``key``."""

    def b64(text: str) -> bytes:
        return base64.urlsafe_b64encode(text.encode()).rstrip(b"=")

    signing_input = b64(header) + b"." + b64(claims)
    signature = JWSRegistry.algorithms[alg].sign(signing_input, key)
    return (signing_input + b"." + base64.urlsafe_b64encode(signature).rstrip(b"=")).decode()


class Clock:
    """Real time plus an offset the test can advance (tokens expire without sleeping)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


class Servers:
    """ASGI apps run with uvicorn, each in a thread on an already bound loopback socket, and
    stopped together: uvicorn sees a stop only at its next tick (0.1 s) and then shuts down, so
    servers stopped one after another wait that long each."""

    def __init__(self) -> None:
        self._running: list[tuple[uvicorn.Server, threading.Thread]] = []

    def serve(self, app, sock: socket.socket, **options) -> str:
        """Start ``app`` on ``sock``, with uvicorn's ``options`` (``ssl_certfile``...); its base
        URL once it listens."""
        config = uvicorn.Config(app, **{"log_level": "warning", "lifespan": "on", **options})
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        self._running.append((server, thread))
        if not eventually(lambda: server.started or not thread.is_alive(), every=0.01):
            raise RuntimeError("uvicorn did not start")
        if not server.started:
            raise RuntimeError("uvicorn ended before it started")
        scheme = "https" if "ssl_certfile" in options else "http"
        return f"{scheme}://127.0.0.1:{sock.getsockname()[1]}"

    def __enter__(self) -> Servers:
        return self

    def __exit__(self, *exc) -> None:
        for server, _thread in self._running:
            server.should_exit = True
        for _server, thread in self._running:
            thread.join(10)


@contextmanager
def serve(app, sock: socket.socket, **options) -> Iterator[str]:
    """Run an ASGI app with uvicorn on an already bound loopback socket; yield its base URL."""
    with Servers() as servers:
        yield servers.serve(app, sock, **options)


def pkce_pair() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    digest = hashlib.sha256(verifier.encode()).digest()
    return verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def log_in_and_consent(
    issuer: str, url: str, username: str, password: str, browser: httpx.Client | None = None
) -> httpx.Response:
    """Act as the person: open the authorization URL, sign in if asked, allow. Returns the
    response that sends the browser back to the client."""
    browser = browser or clients.client(follow_redirects=False, timeout=10)
    page = browser.get(url)
    if page.is_redirect:
        return page
    assert page.status_code == 200, page.text
    if 'name="password"' in page.text or "name=password" in page.text:
        page = browser.post(
            f"{issuer}/authorize/login",
            data={**hidden_fields(page.text), "username": username, "password": password},
        )
        if page.is_redirect:
            return page
        assert page.status_code == 200, page.text
    return browser.post(
        f"{issuer}/authorize/consent", data={**hidden_fields(page.text), "decision": "allow"}
    )


class MemoryStorage:
    """Where the SDK's OAuthClientProvider keeps its client registration and tokens."""

    def __init__(self) -> None:
        self.tokens: OAuthToken | None = None
        self.client_info: OAuthClientInformationFull | None = None

    async def get_tokens(self) -> OAuthToken | None:
        return self.tokens

    async def set_tokens(self, tokens: OAuthToken) -> None:
        self.tokens = tokens

    async def get_client_info(self) -> OAuthClientInformationFull | None:
        return self.client_info

    async def set_client_info(self, client_info: OAuthClientInformationFull) -> None:
        self.client_info = client_info


def sdk_auth(
    mcp_url: str,
    log_in: Callable[[str], httpx.Response],
    storage: MemoryStorage,
    redirects: list[str],
    *,
    client_name: str,
    redirect_uri: str,
    client_metadata_url: str | None = None,
) -> OAuthClientProvider:
    """The SDK's OAuthClientProvider for a public client, with a person at the browser: each
    authorization URL (noted in ``redirects``) goes to ``log_in`` (run in a thread), whose
    response sends the browser back with the code the SDK then redeems."""
    callback: dict = {}

    async def redirect_handler(url: str) -> None:
        redirects.append(url)
        response = await anyio.to_thread.run_sync(log_in, url)
        query = parse_qs(urlsplit(response.headers["location"]).query)
        callback.clear()
        callback.update({k: v[0] for k, v in query.items()})
        assert "code" in callback, callback

    async def callback_handler() -> AuthorizationCodeResult:
        return AuthorizationCodeResult(
            code=callback["code"], state=callback.get("state"), iss=callback.get("iss")
        )

    return OAuthClientProvider(
        server_url=mcp_url,
        client_metadata=OAuthClientMetadata(
            client_name=client_name,
            redirect_uris=[redirect_uri],
            token_endpoint_auth_method="none",
            grant_types=["authorization_code", "refresh_token"],
        ),
        storage=storage,
        redirect_handler=redirect_handler,
        callback_handler=callback_handler,
        client_metadata_url=client_metadata_url,
    )


@dataclass
class Bastion:
    """A running authorization server and what a test needs to drive it."""

    server: AuthorizationServer
    url: str
    resource: str
    other_resource: str
    clock: Clock
    http: httpx.Client
    # What trusts the server's certificate when the issuer is https (`running_bastion(https=True)`).
    trust: ssl.SSLContext | None = None

    @property
    def db(self) -> Database:
        return self.server.db

    def register(self, **metadata) -> dict:
        body = {
            "client_name": "Test agent",
            "redirect_uris": ["http://127.0.0.1:9/callback"],
            "token_endpoint_auth_method": "none",
            "grant_types": ["authorization_code", "refresh_token"],
            **metadata,
        }
        response = self.http.post(f"{self.url}/register", json=body)
        assert response.status_code == 201, response.text
        return response.json()

    def register_as_admin(self, **metadata) -> dict:
        """A client as `bastion clients create` makes one: the deployment vouches for it."""
        body = {
            "client_name": "Admin agent",
            "redirect_uris": ["http://127.0.0.1:9/callback"],
            "token_endpoint_auth_method": "none",
            "grant_types": ["authorization_code", "refresh_token"],
            **metadata,
        }
        values = registration.validate_client_metadata(body, self.server.settings)
        made = registration.new_client(values, source="admin", now=self.clock())
        self.server.store.save_client(made.client)
        return made.response()

    def authorize_params(self, client: dict, challenge: str, **overrides) -> dict:
        params = {
            "response_type": "code",
            "client_id": client["client_id"],
            "redirect_uri": client["redirect_uris"][0],
            "state": "xyz-state",
            "code_challenge": challenge,
            "code_challenge_method": "S256",
            "resource": self.resource,
            "scope": "tools:read",
            **overrides,
        }
        return {k: v for k, v in params.items() if v is not None}

    def log_in_and_consent(self, url: str, browser: httpx.Client | None = None) -> httpx.Response:
        """Act as alice: open the authorization URL, sign in, allow. Returns the redirect."""
        return log_in_and_consent(self.url, url, "alice", PASSWORD, browser)

    def code_for(self, client: dict, **overrides) -> tuple[str, str]:
        """Run the browser part of the flow; return (code, verifier)."""
        verifier, challenge = pkce_pair()
        params = self.authorize_params(client, challenge, **overrides)
        response = self.log_in_and_consent(f"{self.url}/authorize?{urlencode(params)}")
        assert response.status_code in (302, 303), response.text
        query = parse_qs(urlsplit(response.headers["location"]).query)
        assert "code" in query, query
        return query["code"][0], verifier

    def tokens_for(self, client: dict) -> dict:
        code, verifier = self.code_for(client)
        response = self.token(
            grant_type="authorization_code",
            code=code,
            redirect_uri=client["redirect_uris"][0],
            code_verifier=verifier,
            client_id=client["client_id"],
        )
        assert response.status_code == 200, response.text
        return response.json()

    def token(self, **form) -> httpx.Response:
        return self.http.post(f"{self.url}/token", data=form)

    def rows(self) -> dict[str, list]:
        """Every row of every OAuth table except the audit log: to show bad input changed nothing."""
        tables = [
            "oauth_clients",
            "oauth_users",
            "oauth_consents",
            "oauth_pending_authorizations",
            "oauth_sessions",
            "oauth_grants",
            "oauth_codes",
            "oauth_refresh_tokens",
            "oauth_access_tokens",
            "oauth_signing_keys",
            "oauth_login_failures",
            "oauth_open_registrations",
        ]
        return {t: sorted(map(repr, self.db.execute(f"SELECT * FROM {t}"))) for t in tables}


def hidden_fields(html: str) -> dict[str, str]:
    return dict(re.findall(r"<input type=hidden name=(\w+) value='([^']*)'>", html))


def make_settings(url: str, resource: str, other: str, key_dir: str, **extra) -> OAuthSettings:
    return OAuthSettings.from_mapping(
        {
            "issuer": url,
            "key_dir": key_dir,
            "resources": [
                {
                    "uri": resource,
                    "scopes": ["tools:read", "tools:call"],
                    "name": "Test tools",
                    # tools:call has none: the consent page shows it by its name.
                    "scope_descriptions": {"tools:read": "See the test tools and their results"},
                },
                {"uri": other, "scopes": ["tools:read"]},
            ],
            "initial_access_tokens": ["initial-access-token-for-tests"],
            "client_metadata": {"allow_private_addresses": True},
            **extra,
        }
    )


@contextmanager
def running_bastion(
    database_url: str, tmp_path, resource: str | None = None, *, https: bool = False, **extra
):
    """An authorization server on loopback; ``https``: its issuer is https, served with a
    self-signed certificate (`Bastion.trust`)."""
    sock = free_socket()
    scheme = "https" if https else "http"
    url = f"{scheme}://127.0.0.1:{sock.getsockname()[1]}"
    tls: dict[str, str] = {}
    if https:
        (tmp_path / "tls").mkdir(exist_ok=True)
        cert, key = self_signed_certificate(tmp_path / "tls")
        tls = {"ssl_certfile": cert, "ssl_keyfile": key}
    resource = resource or "http://127.0.0.1:9/mcp"
    settings = make_settings(
        url, resource, "http://127.0.0.1:9/other-mcp", str(tmp_path / "keys"), **extra
    )
    clock = Clock()
    db = Database(database_url)
    server = AuthorizationServer(settings, db, clock=clock)
    create_user(server.store, "alice", PASSWORD, clock(), actor="test")
    app = Starlette(routes=server.routes())
    trust = ssl.create_default_context(cafile=tls["ssl_certfile"]) if tls else None
    with (
        serve(app, sock, **tls) as base,
        clients.client(timeout=10, verify=trust or clients.TRUST) as http,
    ):
        assert base == url
        yield Bastion(
            server,
            url,
            resource,
            "http://127.0.0.1:9/other-mcp",
            clock,
            http,
            trust,
        )
    db.close()


class TricklingHost:
    """An https server on a real socket that answers each request with a status line, then the
    bytes of a header one at a time (``pad`` of them, ``interval`` seconds apart), then a valid
    document: every read gets a byte well within any per-read timeout. ``pad`` None: bytes for
    PATIENCE, so the document is held back until the client gives up (or the host is closed),
    however slow the machine."""

    def __init__(self, directory, pad: int | None, interval: float, redirect_uri: str) -> None:
        cert, key = self_signed_certificate(directory)
        self.ca_file = cert
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(cert, key)
        self.pad = int(PATIENCE / interval) if pad is None else pad
        self.interval, self.redirect_uri = interval, redirect_uri
        self.accepted = 0
        self.stopped = threading.Event()
        self.listener = free_socket()
        self.listener.listen(16)
        self.listener.settimeout(0.1)
        self.base = f"https://127.0.0.1:{self.listener.getsockname()[1]}"
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"{self.base}{path}"

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                connection, _ = self.listener.accept()
            except TimeoutError:
                continue
            self.accepted += 1
            threading.Thread(target=self._answer, args=(connection,), daemon=True).start()

    def _answer(self, connection: socket.socket) -> None:
        try:
            with self.context.wrap_socket(connection, server_side=True) as tls:
                request = b""
                while b"\r\n\r\n" not in request:
                    request += tls.recv(4096)
                path = request.split(b" ")[1].decode()
                body = json.dumps(
                    {"client_id": self.url(path), "redirect_uris": [self.redirect_uri]}
                ).encode()
                tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Pad: ")
                for _ in range(self.pad):
                    if self.stopped.wait(self.interval):
                        return
                    tls.sendall(b"a")
                tls.sendall(b"\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body))
                tls.sendall(body)
        except OSError:
            pass  # the client gave up

    def close(self) -> None:
        self.stopped.set()
        self.thread.join(5)
        self.listener.close()


def self_signed_certificate(
    directory, dns_name: str | None = None, addresses: tuple[str, ...] = ("127.0.0.1",)
) -> tuple[str, str]:
    """A certificate for ``addresses`` (127.0.0.1; or for the name ``dns_name`` alone) and its
    key, as PEM files: for https servers on loopback."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns_name or "127.0.0.1")])
    alternatives: list[x509.GeneralName] = (
        [x509.DNSName(dns_name)]
        if dns_name
        else [x509.IPAddress(ipaddress.ip_address(a)) for a in addresses]
    )
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName(alternatives),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path = f"{directory}/cert.pem"
    key_path = f"{directory}/key.pem"
    with open(cert_path, "wb") as out:
        out.write(certificate.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as out:
        out.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return cert_path, key_path


def allow_introspection(bastion: Bastion, client_id: str, *resources: str) -> None:
    """Let ``client_id`` introspect the tokens of ``resources`` (default: every resource's), as
    `bastion clients update --introspection` does."""
    assert bastion.server.store.bind_introspection(client_id, resources or ("*",), actor="test")
