"""Two replicas (two `Connections`, each on its own `Database` over one SQLite file or
PostgreSQL schema) refreshing one user's connection at the same moment, against an
authorization server that rotates refresh tokens and, as RFC 9700 §4.14.2 recommends (and
bastion's own server does), revokes the whole grant when a used refresh token comes back.

Each replica refreshed on its own: both sent the same refresh token, the server revoked the
grant, and the user lost the connection (and had to connect again). Now one replica claims the
refresh in the database, and the other waits for what it brings back and uses it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import anyio
import pytest
from cryptography.fernet import Fernet

from bastion.connections.sealing import Sealer
from bastion.connections.service import Connections, ConnectionUnavailable
from bastion.connections.settings import UpstreamOAuth
from bastion.connections.store import ConnectionStore, StoredConnection
from bastion.db import Database
from tests.connections.fakes import AuthorizationServer, loopback_base
from tests.oauth.support import free_socket, serve
from tests.waits import PATIENCE

NOW = 1000.0


@pytest.fixture
def server():
    """Rotates the refresh token at each refresh; a used one revokes the grant. The first
    refresh is held until ``release`` (or until a second refresh arrives)."""
    sock = free_socket()
    rotating = AuthorizationServer(
        "rotating",
        loopback_base(sock),
        registration=False,
        revocation=False,
        grant_types=["refresh_token"],
        rotates=True,
        holds="first",
    )
    rotating.live.add("refresh-1")  # the refresh token alice's connection holds
    with serve(rotating.app(), sock):
        yield rotating
        rotating.release.set()


def _replica(
    url: str,
    server: AuthorizationServer,
    key: bytes,
    clock: Callable[[], float] = lambda: NOW,
    timeout_seconds: float = UpstreamOAuth.timeout_seconds,
) -> Connections:
    oauth = UpstreamOAuth(issuer=server.base, client_id="bastion", timeout_seconds=timeout_seconds)
    return Connections(
        ConnectionStore(Database(url)),
        Sealer([key]),
        {"tracker": (f"{server.base}/mcp", oauth)},
        "https://b",
        clock,
    )


def test_two_replicas_refreshing_at_once_keep_the_connection(database_url, server):
    key = Fernet.generate_key()
    one, two = _replica(database_url, server, key), _replica(database_url, server, key)
    sealed = one.sealer.seal(
        "alice", "tracker", {"access_token": "access-1", "refresh_token": "refresh-1"}
    )
    one.store.put(StoredConnection("alice", "tracker", sealed, "", NOW, 0.0, 0.0))
    # The second replica's statements on the connections: once it has looked at the row a few
    # times while the first one's refresh is held, that refresh is let go.
    statements: list[str] = []
    send = two.store.db.execute

    def execute(sql, *args, **kwargs):
        if "upstream_connections" in sql:
            statements.append(sql)
        return send(sql, *args, **kwargs)

    two.store.db.execute = execute

    async def both():
        first = asyncio.create_task(one.access_token("alice", "tracker"))
        assert await anyio.to_thread.run_sync(server.arrived.wait, PATIENCE)
        second = asyncio.create_task(two.access_token("alice", "tracker"))
        while not server.release.is_set() and len(statements) < 5 and not second.done():
            await asyncio.sleep(0.01)
        server.release.set()
        return await asyncio.gather(first, second)

    try:
        tokens = anyio.run(both)
        assert not server.revoked_grant
        assert tokens == ["access-of-rotating-1"] * 2
        assert server.token_requests == 1
        row = one.store.get("alice", "tracker")
        assert row is not None
        assert (
            one.sealer.open("alice", "tracker", row.sealed)["refresh_token"]
            == "refresh-of-rotating-1"
        )
    finally:
        one.store.db.close()
        two.store.db.close()


def test_a_claim_left_by_a_process_that_died_holds_calls_until_it_expires(database_url, server):
    server.release.set()
    now = [NOW]
    key = Fernet.generate_key()
    # One replica gives up waiting for another's refresh soon (after four times its
    # timeout_seconds of 0.1 s); the other refreshes with the default timeout_seconds, which a
    # busy machine's refresh (the server's metadata and token endpoint, over HTTP) cannot
    # overrun as it could 0.1 s.
    waiting = _replica(database_url, server, key, lambda: now[0], timeout_seconds=0.1)
    refreshing = _replica(database_url, server, key, lambda: now[0])
    sealed = waiting.sealer.seal(
        "alice", "tracker", {"access_token": "access-1", "refresh_token": "refresh-1"}
    )
    row = StoredConnection("alice", "tracker", sealed, "", NOW, 0.0, 0.0)
    waiting.store.put(row)
    try:
        # A replica claimed the refresh for 30 s, then died.
        assert waiting.store.claim_refresh(row, NOW, NOW + 30)
        assert not waiting.store.claim_refresh(row, NOW + 1, NOW + 31)
        now[0] = NOW + 1
        with pytest.raises(ConnectionUnavailable, match="being refreshed by another process"):
            anyio.run(waiting.access_token, "alice", "tracker")
        assert server.token_requests == 0
        now[0] = NOW + 30  # the claim has expired: a replica refreshes
        assert anyio.run(refreshing.access_token, "alice", "tracker") == "access-of-rotating-1"
        assert server.token_requests == 1 and not server.revoked_grant
    finally:
        waiting.store.db.close()
        refreshing.store.db.close()
