"""Where bastion's requests to an upstream's authorization server may go.

The upstream MCP server's own metadata (RFC 9728) names its authorization server, whose metadata
(RFC 8414) names the token, registration and revocation endpoints: a hostile or compromised
upstream chooses every URL bastion then sends its client_secret and users' refresh tokens to.
An upstream on a public address may lead bastion to public addresses only (each name resolved
once and the connection made to the address checked), unless the upstream's
``oauth.allow_private_addresses`` says otherwise; an upstream the operator put on a private or
loopback address may use private ones too (its authorization server usually lives beside it).

Here 127.0.0.2 stands for the internet: ``tracker.test`` (the upstream and its authorization
server, over TLS) resolves to it and is treated as public; ``internal.test`` resolves to the
loopback, where an internal service records whatever reaches it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
from functools import partial
from urllib.parse import parse_qs, urlsplit

import anyio
import pytest
from cryptography.fernet import Fernet
from starlette.applications import Starlette

from bastion import egress, tls
from bastion.audit.log import AuditLog
from bastion.connections.sealing import Sealer
from bastion.connections.service import Connections, ConnectionUnavailable, FlowRefused
from bastion.connections.settings import UpstreamOAuth
from bastion.connections.store import ConnectionStore, StoredConnection
from bastion.connections.upstream_oauth import UpstreamOAuthClient, UpstreamOAuthError
from bastion.db import Database
from tests.connections.fakes import AuthorizationServer, Bystander, ResourceMetadata
from tests.connections.test_issuer_binding import answered_then, revocations_recorded
from tests.oauth.support import free_socket, self_signed_certificate, serve

PUBLIC = ipaddress.ip_address("127.0.0.2")  # the internet, in these tests


def _public_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((str(PUBLIC), 0))
    return sock


class Internal(Bystander):
    """A service on the loopback that records every request it gets (path and body)."""

    def __init__(self) -> None:
        super().__init__()
        self.sock = free_socket()
        self.port = self.sock.getsockname()[1]


class Tracker:
    """The upstream (tracker.test, "public") and its own authorization server on one host: its
    protected-resource metadata (``resource``) names the server (by default itself), whose
    metadata (``server``) names its endpoints."""

    def __init__(self) -> None:
        self.sock = _public_socket()
        self.base = f"https://tracker.test:{self.sock.getsockname()[1]}"
        self.server = AuthorizationServer("tracker", self.base, client_id="registered")
        self.resource = ResourceMetadata(self.base, [self.base])
        self.app = Starlette(routes=[*self.resource.routes(), *self.server.routes()])


def pretend_internet(tmp_path, monkeypatch, public_name: str) -> tuple[str, str]:
    """``public_name`` resolves to 127.0.0.2, taken for the only public address, whose TLS
    certificate (returned with its key) bastion trusts; ``internal.test`` resolves to the
    loopback."""
    cert, key = self_signed_certificate(tmp_path, dns_name=public_name)
    real = socket.getaddrinfo

    def resolving(host, port, *args, **kwargs):
        name = host.decode() if isinstance(host, bytes) else host
        if name == public_name:
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (str(PUBLIC), port))]
        if name == "internal.test":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", resolving)
    monkeypatch.setattr(egress, "is_public_address", lambda address: address == PUBLIC)
    monkeypatch.setattr(tls, "trust", lambda: tls.file_context(cert))
    return cert, key


@pytest.fixture
def internet(tmp_path, monkeypatch):
    """tracker.test on 127.0.0.2 (public, TLS) and the internal service on the loopback."""
    cert, key = pretend_internet(tmp_path, monkeypatch, "tracker.test")
    tracker, internal = Tracker(), Internal()
    with (
        serve(tracker.app, tracker.sock, ssl_certfile=cert, ssl_keyfile=key),
        serve(internal.app(), internal.sock),
    ):
        yield tracker, internal


def _internal_urls(internal: Internal, path: str = "") -> list[str]:
    return [
        f"http://127.0.0.1:{internal.port}{path}",
        f"http://localhost:{internal.port}{path}",
        f"https://internal.test:{internal.port}{path}",
        f"http://internal.test:{internal.port}{path}",
    ]


def test_an_upstream_on_a_public_address_cannot_name_an_authorization_server_on_a_private_one(
    internet,
):
    tracker, internal = internet
    for named in [*_internal_urls(internal), "https://169.254.169.254", "https://10.0.0.1"]:
        tracker.resource.authorization_servers = [named]
        client = UpstreamOAuthClient(f"{tracker.base}/mcp", UpstreamOAuth(), "tracker")
        # (http to any other host than the loopback is refused wherever it leads)
        refusal = "allow_private_addresses|http://internal.test.* must be an https URL"
        with pytest.raises(UpstreamOAuthError, match=refusal) as refused:
            asyncio.run(client.metadata())
        assert refused.value.error == "unavailable"
    assert internal.got == []
    assert tracker.resource.reads  # the upstream itself, public, was asked


def _connections(tmp_path, tracker: Tracker, oauth: UpstreamOAuth) -> Connections:
    store = ConnectionStore(Database(str(tmp_path / f"egress-{len(list(tmp_path.iterdir()))}.db")))
    upstreams = {"tracker": (f"{tracker.base}/mcp", oauth)}
    return Connections(store, Sealer([Fernet.generate_key()]), upstreams, "https://bastion.test")


async def _connect_refresh_and_revoke(service: Connections) -> None:
    """What a person and their agent make bastion send to the authorization server: connect
    (registration, token endpoint), a refresh, a revocation."""
    with contextlib.suppress(UpstreamOAuthError, FlowRefused, ConnectionUnavailable):
        location = await service.start("alice", "tracker", browser="b")
        state = parse_qs(urlsplit(location).query)["state"][0]
        await service.finish("alice", "tracker", state, "the-code", browser="b")
    sealed = service.sealer.seal(
        "alice", "tracker", {"access_token": "old", "refresh_token": "refresh-secret"}
    )
    row = StoredConnection("alice", "tracker", sealed, "", 0.0, 0.0, 0.0)
    await anyio.to_thread.run_sync(service.store.put, row)
    with contextlib.suppress(ConnectionUnavailable):
        await service.access_token("alice", "tracker")
    await anyio.to_thread.run_sync(service.store.put, row)
    await service.revoke("alice", "tracker", actor="test")


@pytest.mark.parametrize(
    ("endpoint", "client_id"),
    [
        ("token_endpoint", ""),
        ("token_endpoint", "bastion"),  # with its client_secret
        ("registration_endpoint", ""),
        ("revocation_endpoint", ""),
        ("revocation_endpoint", "bastion"),
    ],
)
def test_a_public_authorization_server_cannot_send_secrets_and_refresh_tokens_inside(
    internet, tmp_path, endpoint, client_id
):
    tracker, internal = internet
    oauth = UpstreamOAuth(client_id=client_id, client_secret="s3cret" if client_id else "")
    for url in _internal_urls(internal, "/steal"):
        tracker.server.metadata_overrides = {endpoint: url}
        service = _connections(tmp_path, tracker, oauth)
        try:
            anyio.run(_connect_refresh_and_revoke, service)
        finally:
            service.store.db.close()
    assert internal.got == []


def test_allow_private_addresses_lets_a_public_upstream_lead_bastion_inside(internet, tmp_path):
    # The setting is the operator's word that this upstream's server lives inside: the same
    # requests then reach the internal service (which is what the tests above refuse).
    tracker, internal = internet
    tracker.server.metadata_overrides = {
        "token_endpoint": f"http://127.0.0.1:{internal.port}/steal"
    }
    oauth = UpstreamOAuth(client_id="bastion", client_secret="s3cret", allow_private_addresses=True)
    service = _connections(tmp_path, tracker, oauth)
    try:
        anyio.run(_connect_refresh_and_revoke, service)
    finally:
        service.store.db.close()
    assert any("client_secret=s3cret" in body for _, body in internal.got)
    assert any("refresh-secret" in body for _, body in internal.got)


def test_an_upstream_on_the_loopback_may_use_the_loopback_unless_told_not_to(internet):
    _, internal = internet
    upstream = f"http://127.0.0.1:{internal.port}/mcp"
    # By default an upstream the operator put on the loopback may lead bastion there (its
    # server answers 404 here: the metadata is unavailable, but it was asked).
    with pytest.raises(UpstreamOAuthError, match="404"):
        asyncio.run(UpstreamOAuthClient(upstream, UpstreamOAuth(), "tracker").metadata())
    assert len(internal.got) == 1
    refusing = UpstreamOAuth(allow_private_addresses=False)
    with pytest.raises(UpstreamOAuthError, match="allow_private_addresses"):
        asyncio.run(UpstreamOAuthClient(upstream, refusing, "tracker").metadata())
    assert len(internal.got) == 1


def test_tokens_of_a_former_server_inside_are_not_revoked_there(internet, tmp_path):
    """A connection whose recorded authorization server is no longer the upstream's is dropped
    and its tokens revoked at that server, found from its own metadata: under the same rules as
    the current one's, so a public upstream cannot lead bastion inside that way either (even
    with a client bastion registered there)."""
    tracker, internal = internet
    for former in _internal_urls(internal):
        service = _connections(tmp_path, tracker, UpstreamOAuth())
        try:
            registration = service.sealer.seal("", f"tracker {former}", {"client_id": "old"})
            service.store.add_client("tracker", former, registration)
            tokens = {"access_token": "old", "refresh_token": "refresh-secret", "issuer": former}
            sealed = service.sealer.seal("alice", "tracker", tokens)
            service.store.put(StoredConnection("alice", "tracker", sealed, "", 0.0, 0.0, 0.0))

            call = partial(service.access_token, "alice", "tracker")
            assert answered_then(call, revocations_recorded(service)) is None  # dropped

            [event] = AuditLog(service.store.db).events("connection.upstream_revocation")
            assert event.detail["outcome"].startswith("failed: ")
        finally:
            service.store.db.close()
    assert internal.got == []
