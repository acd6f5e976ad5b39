"""A refresh of a user's upstream connection racing a revocation, a new connection, another
refresh or a rekey, on SQLite and PostgreSQL: the refresh is held at a real token endpoint (an
authorization server served by uvicorn whose token endpoint waits for the test) while the other
change is made, then let go. A revoked connection stays revoked; what the refresh brings back
replaces only the very row it refreshed."""

from __future__ import annotations

import asyncio
import dataclasses
import threading

import anyio
import pytest
from cryptography.fernet import Fernet

from bastion.connections.sealing import Sealer
from bastion.connections.service import Connections
from bastion.connections.settings import UpstreamOAuth
from bastion.connections.store import ConnectionStore, StoredConnection
from bastion.db import Database
from tests.connections.fakes import AuthorizationServer, loopback_base
from tests.oauth.support import free_socket, serve
from tests.waits import PATIENCE

NOW = 1000.0


@pytest.fixture
def held():
    """An upstream's authorization server whose token endpoint holds each refresh until the
    test lets it go (``release``), then answers with fresh tokens (or its refusal); it records
    revocations."""
    sock = free_socket()
    server = AuthorizationServer(
        "held", loopback_base(sock), registration=False, grant_types=["refresh_token"], holds="each"
    )
    with serve(server.app(), sock):
        yield server
        server.release.set()


@pytest.fixture
def service(database_url, held):
    db = Database(database_url)  # a fresh file, or a fresh PostgreSQL schema
    oauth = UpstreamOAuth(issuer=held.base, client_id="bastion")
    upstreams = {"tracker": (f"{held.base}/mcp", oauth)}
    connections = Connections(
        ConnectionStore(db), Sealer([Fernet.generate_key()]), upstreams, "https://b", lambda: NOW
    )
    yield connections
    db.close()


def _connect(
    service: Connections, access: str, refresh: str, created_at: float = 0.0, expires_at=NOW
) -> None:
    """A connection (by default one whose access token has expired: the next call refreshes
    it), stored as `Connections.finish` stores one."""
    sealed = service.sealer.seal(
        "alice", "tracker", {"access_token": access, "refresh_token": refresh}
    )
    row = StoredConnection("alice", "tracker", sealed, "", expires_at, created_at, created_at)
    service.store.put(row)


def _tokens(service: Connections) -> dict | None:
    row = service.store.get("alice", "tracker")
    return None if row is None else service.sealer.open("alice", "tracker", row.sealed)


async def _while_refreshing(service: Connections, held: AuthorizationServer, meanwhile):
    """Start a call whose token needs a refresh, run ``meanwhile`` once the refresh is at the
    token endpoint, then let the endpoint answer; the call's outcome."""
    call = asyncio.create_task(service.access_token("alice", "tracker"))
    arrived = await anyio.to_thread.run_sync(held.arrived.wait, PATIENCE)
    assert arrived, "the refresh never reached the token endpoint"
    await meanwhile()
    held.release.set()
    return await call


def test_a_revocation_during_a_refresh_is_not_undone_by_the_refresh(service, held):
    _connect(service, "old-access", "old-refresh")

    async def scenario():
        async def revoke():
            assert await service.revoke("alice", "tracker", actor="test")

        outcome = await _while_refreshing(service, held, revoke)
        return outcome, await service.access_token("alice", "tracker")

    outcome, later = anyio.run(scenario)
    assert (outcome, later) == (None, None)
    assert service.store.get("alice", "tracker") is None
    assert service.listed("alice") == []
    # The tokens the refresh brought back are revoked at the upstream too, not only forgotten.
    assert {"access-of-held-1", "refresh-of-held-1"} <= set(held.revoked)


def test_a_refused_refresh_does_not_delete_a_connection_made_meanwhile(service, held):
    _connect(service, "old-access", "old-refresh")
    held.refuse("invalid_grant")

    async def scenario():
        async def reconnect():  # revoked and connected again, as `Connections.finish` stores it
            assert await service.revoke("alice", "tracker", actor="test")
            _connect(service, "new-access", "new-refresh", NOW, NOW + 3600)

        return await _while_refreshing(service, held, reconnect)

    assert anyio.run(scenario) is None  # this call's grant was refused
    assert _tokens(service) == {"access_token": "new-access", "refresh_token": "new-refresh"}


def test_a_refresh_that_returns_after_a_new_connection_keeps_the_new_one(service, held):
    _connect(service, "old-access", "old-refresh")

    async def scenario():
        async def reconnect():
            assert await service.revoke("alice", "tracker", actor="test")
            _connect(service, "new-access", "new-refresh", NOW, NOW + 3600)

        return await _while_refreshing(service, held, reconnect)

    assert anyio.run(scenario) == "new-access"
    assert _tokens(service) == {"access_token": "new-access", "refresh_token": "new-refresh"}
    # What the old grant's refresh brought back is nobody's now: revoked there.
    assert {"access-of-held-1", "refresh-of-held-1"} <= set(held.revoked)


def test_a_refresh_that_returns_after_another_process_refreshed_uses_that_refresh(service, held):
    _connect(service, "old-access", "old-refresh")

    async def scenario():
        async def refreshed_elsewhere():  # same connection (its creation time), newer tokens
            _connect(service, "their-access", "their-refresh", 0.0, NOW + 3600)

        return await _while_refreshing(service, held, refreshed_elsewhere)

    assert anyio.run(scenario) == "their-access"
    assert _tokens(service) == {"access_token": "their-access", "refresh_token": "their-refresh"}
    # The same grant: revoking what this refresh got could end the other's tokens as well.
    assert held.revoked == []


def test_a_refresh_during_a_rekey_keeps_its_fresh_tokens(service, held):
    _connect(service, "old-access", "old-refresh")

    async def scenario():
        async def rekey():
            assert await anyio.to_thread.run_sync(service.rekey) == 1

        return await _while_refreshing(service, held, rekey)

    assert anyio.run(scenario) == "access-of-held-1"
    assert _tokens(service) == {
        "access_token": "access-of-held-1",
        "refresh_token": "refresh-of-held-1",
        "issuer": held.base,  # the server that issued them, the only one they go back to
    }
    assert held.revoked == []


def test_a_read_in_flight_at_a_revocation_leaves_nothing_cached(service):
    """With ``cache_seconds``, a call that read the connection just before it was revoked in
    this process may use that token once; it is not kept for the calls after the revocation."""
    service.settings["tracker"] = dataclasses.replace(service.settings["tracker"], cache_seconds=60)
    _connect(service, "old-access", "old-refresh", 0.0, NOW + 3600)
    read, arrived, release = service.store.get, threading.Event(), threading.Event()

    def held_read(subject: str, upstream: str):
        row = read(subject, upstream)
        arrived.set()
        release.wait(PATIENCE)
        return row

    async def scenario():
        service.store.get = held_read
        call = asyncio.create_task(service.access_token("alice", "tracker"))
        assert await anyio.to_thread.run_sync(arrived.wait, PATIENCE)
        service.store.get = read
        assert await service.revoke("alice", "tracker", actor="test")
        release.set()
        return await call, await service.access_token("alice", "tracker")

    first, later = anyio.run(scenario)
    assert first == "old-access"  # read before the revocation
    assert later is None
