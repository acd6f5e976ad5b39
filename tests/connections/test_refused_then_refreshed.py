"""An upstream that answers 401 to a user's access token: bastion refreshes it once, then sends
the call once more.

A 401 is a refusal before acting (RFC 6750 §3.1, ``invalid_token``): the upstream did nothing
with the request, so sending it again with a fresh token runs it once, whatever it does. Before,
bastion asked the user to connect again at the first 401, without trying the refresh token it
held. Now: one refresh (one at a time per connection, across replicas, as a refresh before
expiry), one more try; the user is asked to connect again only if the refresh fails or the
fresh token is refused too. A 401 that comes after the upstream took the call (on a resumed
stream) is not a refusal before acting: the call is not sent again.

Real parts: an upstream served by uvicorn that takes only the tokens it is told to, and the
authorization server of `test_refresh_races` (its token endpoint holds each refresh until the
test lets it go), over SQLite or PostgreSQL.
"""

from __future__ import annotations

import asyncio

import anyio
import pytest
from cryptography.fernet import Fernet

from bastion.audit.log import AuditLog
from bastion.connections.sealing import Sealer
from bastion.connections.service import Connections
from bastion.connections.settings import UpstreamOAuth
from bastion.connections.store import ConnectionStore, StoredConnection
from bastion.db import Database
from bastion.gateway.config import UpstreamConfig
from bastion.gateway.jsonrpc import UPSTREAM_UNAVAILABLE, RpcError
from bastion.gateway.upstream import HttpUpstream
from bastion.gateway.upstream_credentials import CONNECTION_REQUIRED, UserTokenUpstream
from tests.connections.fakes import McpUpstream, loopback_base
from tests.connections.test_refresh_races import held  # noqa: F401 (the fixture)
from tests.oauth.support import free_socket, serve
from tests.waits import PATIENCE, eventually_async

NOW = 1000.0
CALL = {"name": "file_issue", "arguments": {"title": "once"}}


@pytest.fixture
def upstream():
    """A 2025-11-25 MCP server that takes only the access tokens it is told to, and whose tool
    ``slow`` answers on a resumed stream (`tests.connections.fakes.McpUpstream`)."""
    sock = free_socket()
    server = McpUpstream(f"{loopback_base(sock)}/mcp")
    with serve(server.app(), sock):
        yield server


@pytest.fixture
def replicas(database_url, held, upstream):  # noqa: F811 (the fixture)
    """A function making a replica (`Connections`) over one database and key, whose upstream
    ``tracker`` is `upstream` and whose authorization server is `held`; alice is connected with
    an access token that has not expired (``old-access``) and a refresh token."""
    db = Database(database_url)
    store = ConnectionStore(db)
    key = Fernet.generate_key()

    def replica() -> Connections:
        oauth = UpstreamOAuth(issuer=held.base, client_id="bastion", timeout_seconds=10)
        upstreams = {"tracker": (upstream.url, oauth)}
        return Connections(store, Sealer([key]), upstreams, "https://b", lambda: NOW)

    first = replica()
    tokens = {"access_token": "old-access", "refresh_token": "old-refresh", "issuer": held.base}
    sealed = first.sealer.seal("alice", "tracker", tokens)
    store.put(StoredConnection("alice", "tracker", sealed, "", NOW + 3600, NOW, NOW))
    yield replica
    db.close()


def _session(connections: Connections, url: str, ended: list[str]) -> UserTokenUpstream:
    config = UpstreamConfig(name="tracker", url=url, auth="per_user", timeout=10)
    return UserTokenUpstream(
        config, "alice", connections, HttpUpstream(config), lambda _, why: ended.append(why)
    )


async def _started(
    connections: Connections, upstream: McpUpstream, ended: list[str]
) -> UserTokenUpstream:
    """A session of alice's, started (initialized) with her token while the upstream took it;
    from then on it takes only ``access-of-held-1``."""
    session = _session(connections, upstream.url, ended)
    upstream.accepted.add("old-access")
    await session.ensure_started()
    upstream.accepted = {"access-of-held-1"}
    return session


async def _call(session: UserTokenUpstream, call: dict = CALL) -> dict:
    try:
        return await session.request("tools/call", call)
    finally:
        await session.close()


def test_a_refused_token_is_refreshed_once_and_the_call_sent_again(held, upstream, replicas):  # noqa: F811
    held.release.set()
    connections, ended = replicas(), []

    async def scenario():
        return await _call(await _started(connections, upstream, ended))

    answer = anyio.run(scenario)

    assert answer["result"]["content"][0]["text"] == "done with access-of-held-1"
    assert upstream.calls() == ["old-access", "access-of-held-1"]  # refused, then sent once more
    assert held.tokens_issued == 1
    assert held.revoked == []
    assert ended == []  # the session goes on, with the fresh token
    assert anyio.run(connections.access_token, "alice", "tracker") == "access-of-held-1"


def test_a_fresh_token_refused_too_asks_to_connect_without_a_second_refresh(
    held,  # noqa: F811
    upstream,
    replicas,
):
    held.release.set()
    connections, ended = replicas(), []

    async def scenario():
        session = await _started(connections, upstream, ended)
        upstream.accepted = set()  # it takes no token of alice's now
        return await _call(session)

    with pytest.raises(RpcError) as refused:
        anyio.run(scenario)

    assert refused.value.code == CONNECTION_REQUIRED
    assert "connect your account to tracker" in refused.value.message
    assert held.tokens_issued == 1  # one refresh, never a loop
    assert upstream.calls() == ["old-access", "access-of-held-1"]
    assert ended == ["(the upstream refused the user's token)"]


def test_a_refused_refresh_asks_to_connect_and_sends_the_call_once(held, upstream, replicas):  # noqa: F811
    held.refuse("invalid_grant")
    held.release.set()
    connections, ended = replicas(), []

    async def scenario():
        return await _call(await _started(connections, upstream, ended))

    with pytest.raises(RpcError) as refused:
        anyio.run(scenario)

    assert refused.value.code == CONNECTION_REQUIRED
    assert upstream.calls() == ["old-access"]
    assert connections.store.get("alice", "tracker") is None  # the grant is gone: connect again
    [event] = AuditLog(connections.store.db).events("connection.dropped")
    assert event.subject == "alice"
    assert event.detail["upstream"] == "tracker"
    assert "invalid_grant" in event.detail["reason"]


def test_replicas_refused_at_once_refresh_once_and_both_send_again(held, upstream, replicas):  # noqa: F811
    one, two = replicas(), replicas()
    ended: list[str] = []
    # The claims of the connection's refresh each replica made (the two share the store): one
    # refused is a replica waiting on the refresh the other claimed.
    claimed, claim = [], one.store.claim_refresh

    def noted_claim(*args):
        claimed.append(claim(*args))
        return claimed[-1]

    one.store.claim_refresh = noted_claim

    async def scenario():
        sessions = [await _started(one, upstream, ended), await _started(two, upstream, ended)]
        calls = [asyncio.create_task(_call(session)) for session in sessions]
        # Both replicas' first tries refused, and one refresh held at the token endpoint.
        assert await anyio.to_thread.run_sync(held.arrived.wait, PATIENCE)
        with anyio.fail_after(PATIENCE):
            while upstream.calls().count("old-access") < 2:
                await asyncio.sleep(0.02)
        # The other replica waits on the claimed refresh (not 0.2 s, after which a busy machine
        # may have had it ask for none: it would then find the refreshed token, untested).
        assert await eventually_async(lambda: False in claimed), "no replica waited"
        held.release.set()
        return await asyncio.gather(*calls)

    answers = anyio.run(scenario)

    assert [a["result"]["content"][0]["text"] for a in answers] == [
        "done with access-of-held-1"
    ] * 2
    assert held.tokens_issued == 1  # the refresh token went to the server once
    assert sorted(upstream.calls()) == ["access-of-held-1", "access-of-held-1"] + ["old-access"] * 2
    assert ended == []


def test_a_call_refused_after_the_upstream_took_it_is_not_sent_again(held, upstream, replicas):  # noqa: F811
    held.release.set()
    connections, ended = replicas(), []

    async def scenario():
        session = await _started(connections, upstream, ended)
        upstream.accepted.add("old-access")  # taken by the call, which then revokes it
        return await _call(session, {"name": "slow"})

    with pytest.raises(RpcError) as failed:
        anyio.run(scenario)

    # The 401 came on the resumed stream of a call the upstream had taken: it may have acted,
    # so the call is not sent again; the token is refreshed for the next call.
    assert failed.value.code == UPSTREAM_UNAVAILABLE
    assert "not sent again" in failed.value.message
    assert upstream.calls() == ["old-access"]
    assert held.tokens_issued == 1
    assert anyio.run(connections.access_token, "alice", "tracker") == "access-of-held-1"
