"""An upstream's authorization metadata for per-user credentials (its protected-resource
metadata, RFC 9728, and its authorization server's, RFC 8414) is read again when its lifetime
ends (their headers, within ``timeout_seconds`` and ``metadata_cache_seconds``), in the
background while the kept one still answers (each step waits for that read: `run_settled`), not
once per process: a server that moves its token endpoint, or an upstream that names another server, is
followed without a restart. A read that fails, or brings a document failing the checks the first
one passed (the server's metadata naming another issuer), keeps the last good metadata in use
for ``metadata_stale_seconds`` past its lifetime; after that the calls that need it fail with the
reason until a good one is read. Real authorization servers and protected-resource metadata,
served by uvicorn (tests/connections/fakes.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from cryptography.fernet import Fernet

from bastion.connections.sealing import Sealer
from bastion.connections.service import Connections, ConnectionUnavailable, FlowRefused
from bastion.connections.settings import UpstreamOAuth
from bastion.connections.store import ConnectionStore
from bastion.db import Database
from tests.clock import ManualClock
from tests.connections.fakes import AuthorizationServer, ResourceMetadata, loopback_base
from tests.oauth.support import Servers, free_socket
from tests.waits import run_settled

# An authorization server's base URL -> bastion's client there (`connect` checks it).
CLIENT_AT: dict[str, str] = {}


@dataclass
class Upstream:
    first: AuthorizationServer
    second: AuthorizationServer
    resource: ResourceMetadata
    named: list[str]  # the authorization servers the upstream's metadata names
    clock: ManualClock
    connections: Connections


@pytest.fixture
def upstream(tmp_path, request) -> Iterator[Upstream]:
    """An upstream naming the ``first`` of two authorization servers, and one process's
    `Connections` to it with the test's ``oauth`` settings (``request.param``) on its clock."""
    sockets = [free_socket() for _ in range(3)]
    first_base, second_base, upstream_base = (loopback_base(s) for s in sockets)
    first = AuthorizationServer("first", first_base, client_id="bastion-at-first")
    second = AuthorizationServer("second", second_base, client_id="bastion-at-second")
    named = [first_base]
    for server in (first, second):
        CLIENT_AT[server.base] = f"bastion-at-{server.name}"
    resource = ResourceMetadata(upstream_base, named)
    db = Database(str(tmp_path / "b.db"))
    clock = ManualClock()
    settings = UpstreamOAuth(timeout_seconds=10, **getattr(request, "param", {}))
    connections = Connections(
        ConnectionStore(db),
        Sealer([Fernet.generate_key()]),
        {"tracker": (f"{upstream_base}/mcp", settings)},
        "https://bastion.example",
        clock,
    )
    with Servers() as servers:
        for app, sock in zip((first.app(), second.app(), resource.app()), sockets, strict=True):
            servers.serve(app, sock)
        try:
            yield Upstream(first, second, resource, named, clock, connections)
        finally:
            db.close()


def connect(connections: Connections, subject: str) -> str:
    """``subject`` connects to the upstream (the server authorizes at once); the server's base
    URL their browser was sent to."""
    link = run_settled(lambda: connections.start(subject, "tracker", browser="b"))
    parts = urlsplit(link)
    base = f"{parts.scheme}://{parts.netloc}"
    # The client the browser is sent with is bastion's at the server it is sent to.
    assert parse_qs(parts.query)["client_id"] == [CLIENT_AT[base]], link
    with httpx.Client(timeout=10) as browser:
        location = browser.get(link).headers["location"]
    query = parse_qs(urlsplit(location).query)
    run_settled(
        lambda: connections.finish(
            subject, "tracker", query["state"][0], query["code"][0], browser="b"
        )
    )
    return base


def refreshed(connections: Connections, subject: str = "alice") -> str | None:
    """The upstream refused ``subject``'s token (401): bastion refreshes it; the new token."""
    token = run_settled(connections.access_token, subject, "tracker")
    return run_settled(connections.access_token_refused, subject, "tracker", token)


LIFETIME = {"metadata_cache_seconds": 60, "metadata_stale_seconds": 120}


def read_again_first(connections: Connections, monkeypatch) -> None:
    """bastion's client at the server is looked up only once the metadata's read in the
    background has ended (a store slow to answer): what a step that began on the kept metadata
    does next must not depend on when that read ends."""
    found = connections._client
    metadata = connections.clients["tracker"]._metadata

    async def client_once_read(*args):
        while metadata.reading:
            await asyncio.sleep(0.01)
        return await found(*args)

    monkeypatch.setattr(connections, "_client", client_once_read)


@pytest.mark.parametrize("upstream", [{"metadata_cache_seconds": 60}], indirect=True)
@pytest.mark.parametrize("slow_store", [False, True])
def test_a_server_that_moves_its_token_endpoint_is_followed_once_its_metadata_expires(
    upstream, slow_store, monkeypatch
):
    if slow_store:
        read_again_first(upstream.connections, monkeypatch)
    connect(upstream.connections, "alice")
    upstream.first.metadata_overrides = {"token_endpoint": f"{upstream.first.base}/moved/token"}
    upstream.clock.now += 30  # still in its lifetime: the endpoint read is used
    assert refreshed(upstream.connections).startswith("access-of-first-")
    upstream.clock.now += 31
    # Past its lifetime: this refresh goes where the kept metadata says, while it is read again
    # in the background; the next, where the metadata read says.
    assert refreshed(upstream.connections).startswith("access-of-first-")
    assert refreshed(upstream.connections).startswith("access-of-first-")
    assert upstream.first.token_paths == ["/token", "/token", "/token", "/moved/token"]


@pytest.mark.parametrize("upstream", [{"metadata_cache_seconds": 60}], indirect=True)
@pytest.mark.parametrize("slow_store", [False, True])
def test_an_upstream_naming_another_server_is_followed_by_new_connections(
    upstream, slow_store, monkeypatch
):
    """No grant names the second server: only the metadata's lifetime makes it read again."""
    if slow_store:
        read_again_first(upstream.connections, monkeypatch)
    assert connect(upstream.connections, "alice") == upstream.first.base
    upstream.named[0] = upstream.second.base
    upstream.clock.now += 30
    assert connect(upstream.connections, "bob") == upstream.first.base
    upstream.clock.now += 31
    # Past its lifetime: dave is sent to the server the kept metadata names, while it is read
    # again; by the time he comes back the upstream names another, so nothing is connected.
    with pytest.raises(FlowRefused, match="now names another"):
        connect(upstream.connections, "dave")
    assert connect(upstream.connections, "carol") == upstream.second.base
    # alice's grant is the first server's: it goes back there only, and she connects again.
    assert refreshed(upstream.connections) is None
    assert upstream.second.token_paths == ["/token"]  # carol's code, nothing of alice's


@pytest.mark.parametrize("upstream", [LIFETIME], indirect=True)
def test_metadata_that_cannot_be_read_again_is_used_for_a_bounded_time(upstream):
    connect(upstream.connections, "alice")
    upstream.resource.down = True  # the upstream cannot say who its server is
    reads = upstream.resource.reads
    upstream.clock.now += 61
    # A short outage: the last good metadata is used, and it was asked.
    assert refreshed(upstream.connections).startswith("access-of-first-")
    assert upstream.resource.reads == reads + 1
    upstream.clock.now += 120  # 181 s: past its lifetime and the 120 s after it
    with pytest.raises(ConnectionUnavailable) as refused:
        refreshed(upstream.connections)
    assert "answered HTTP 503" in str(refused.value), refused.value
    assert "metadata_stale_seconds" in str(refused.value), refused.value
    assert upstream.connections.store.get("alice", "tracker") is not None  # kept, not dropped
    upstream.resource.down = False
    upstream.clock.now += 11  # past timeout_seconds since the failed read
    assert refreshed(upstream.connections).startswith("access-of-first-")


@pytest.mark.parametrize("upstream", [LIFETIME], indirect=True)
def test_a_server_metadata_naming_another_issuer_never_replaces_the_good_one(upstream):
    connect(upstream.connections, "alice")
    upstream.first.issuer = "https://evil.example"
    upstream.first.metadata_overrides = {"token_endpoint": f"{upstream.first.base}/moved/token"}
    upstream.clock.now += 61
    assert refreshed(upstream.connections).startswith("access-of-first-")
    upstream.clock.now += 120
    with pytest.raises(ConnectionUnavailable, match="does not name it as its issuer"):
        refreshed(upstream.connections)
    assert "/moved/token" not in upstream.first.token_paths
    assert upstream.connections.store.get("alice", "tracker") is not None
