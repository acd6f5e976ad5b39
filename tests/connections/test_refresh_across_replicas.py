"""Two replicas (two `Connections`, each on its own `Database` over one SQLite file or
PostgreSQL schema) refreshing one user's connection at the same moment, against an
authorization server that rotates refresh tokens and, as RFC 9700 §4.14.2 recommends (and
bastion's own server does), revokes the whole grant when a used refresh token comes back.

Each replica refreshed on its own: both sent the same refresh token, the server revoked the
grant, and the user lost the connection (and had to connect again). Now one replica claims the
refresh in the database, and the other waits for what it brings back and uses it."""

from __future__ import annotations

import asyncio
import threading

import anyio
import pytest
from cryptography.fernet import Fernet
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from bastion.connections.sealing import Sealer
from bastion.connections.service import Connections, ConnectionUnavailable
from bastion.connections.settings import UpstreamOAuth
from bastion.connections.store import ConnectionStore, StoredConnection
from bastion.db import Database
from tests.oauth.support import free_socket, serve

NOW = 1000.0


class RotatingServer:
    """Rotates the refresh token at each refresh; a used one revokes the grant. The first
    refresh is held until ``release`` (or until a second refresh arrives)."""

    def __init__(self) -> None:
        self.live = {"refresh-1"}
        self.used: set[str] = set()
        self.revoked_grant = False
        self.refreshes = 0
        self.arrived = threading.Event()
        self.release = threading.Event()
        self.base = ""

    def app(self) -> Starlette:
        async def metadata(request: Request) -> JSONResponse:
            return JSONResponse(
                {
                    "issuer": self.base,
                    "authorization_endpoint": f"{self.base}/authorize",
                    "token_endpoint": f"{self.base}/token",
                    "code_challenge_methods_supported": ["S256"],
                }
            )

        async def token(request: Request) -> JSONResponse:
            presented = str((await request.form())["refresh_token"])
            self.refreshes += 1
            if self.refreshes == 1:
                self.arrived.set()
                await anyio.to_thread.run_sync(self.release.wait, 30)
            else:
                self.release.set()  # a second refresh at once: the race is on
            if presented in self.used or self.revoked_grant:
                self.revoked_grant = True  # reuse: the whole grant is revoked
                self.live.clear()
                return JSONResponse({"error": "invalid_grant"}, status_code=400)
            if presented not in self.live:
                return JSONResponse({"error": "invalid_grant"}, status_code=400)
            self.live.discard(presented)
            self.used.add(presented)
            n = len(self.used)
            self.live.add(f"refresh-{n + 1}")
            return JSONResponse(
                {
                    "access_token": f"access-{n + 1}",
                    "refresh_token": f"refresh-{n + 1}",
                    "token_type": "Bearer",
                    "expires_in": 3600,
                }
            )

        return Starlette(
            routes=[
                Route("/.well-known/oauth-authorization-server", metadata),
                Route("/token", token, methods=["POST"]),
            ]
        )


@pytest.fixture
def server():
    rotating = RotatingServer()
    sock = free_socket()
    rotating.base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    with serve(rotating.app(), sock):
        yield rotating
        rotating.release.set()


def _replica(url: str, server: RotatingServer, key: bytes) -> Connections:
    oauth = UpstreamOAuth(issuer=server.base, client_id="bastion")
    return Connections(
        ConnectionStore(Database(url)),
        Sealer([key]),
        {"tracker": (f"{server.base}/mcp", oauth)},
        "https://b",
        lambda: NOW,
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
        assert await anyio.to_thread.run_sync(server.arrived.wait, 30)
        second = asyncio.create_task(two.access_token("alice", "tracker"))
        while not server.release.is_set() and len(statements) < 5 and not second.done():
            await asyncio.sleep(0.01)
        server.release.set()
        return await asyncio.gather(first, second)

    try:
        tokens = anyio.run(both)
        assert not server.revoked_grant
        assert tokens == ["access-2", "access-2"]
        assert server.refreshes == 1
        row = one.store.get("alice", "tracker")
        assert row is not None
        assert one.sealer.open("alice", "tracker", row.sealed)["refresh_token"] == "refresh-2"
    finally:
        one.store.db.close()
        two.store.db.close()


def test_a_claim_left_by_a_process_that_died_holds_calls_until_it_expires(database_url, server):
    server.release.set()
    now = [NOW]
    oauth = UpstreamOAuth(issuer=server.base, client_id="bastion", timeout_seconds=0.1)
    replica = Connections(
        ConnectionStore(Database(database_url)),
        Sealer([Fernet.generate_key()]),
        {"tracker": (f"{server.base}/mcp", oauth)},
        "https://b",
        lambda: now[0],
    )
    sealed = replica.sealer.seal(
        "alice", "tracker", {"access_token": "access-1", "refresh_token": "refresh-1"}
    )
    row = StoredConnection("alice", "tracker", sealed, "", NOW, 0.0, 0.0)
    replica.store.put(row)
    try:
        # A replica claimed the refresh for 30 s, then died.
        assert replica.store.claim_refresh(row, NOW, NOW + 30)
        assert not replica.store.claim_refresh(row, NOW + 1, NOW + 31)
        now[0] = NOW + 1
        with pytest.raises(ConnectionUnavailable, match="being refreshed by another process"):
            anyio.run(replica.access_token, "alice", "tracker")
        assert server.refreshes == 0
        now[0] = NOW + 30  # the claim has expired: this replica refreshes
        assert anyio.run(replica.access_token, "alice", "tracker") == "access-2"
        assert server.refreshes == 1 and not server.revoked_grant
    finally:
        replica.store.db.close()
