"""An upstream that refuses a user's token (401) on the standing stream of their upstream session.

The stream is opened again a second after it fails; a refusal there was taken as any failure, so
the session sent the refused token again every second for as long as it lived (until idle), and
its user was never sent to connect again. A 401 to the user's token is now one refusal wherever
it comes (a request, the standing stream, its resumption): the token is forgotten, the session
ends, nothing is sent again on it, and no URL the refusal names (``resource_metadata``, RFC 9728
§5.1) is fetched.
"""

from __future__ import annotations

import time

import anyio
from cryptography.fernet import Fernet

from bastion.connections.sealing import Sealer
from bastion.connections.service import Connections
from bastion.connections.settings import UpstreamOAuth
from bastion.connections.store import ConnectionStore, StoredConnection
from bastion.db import Database
from bastion.gateway.config import UpstreamConfig
from bastion.gateway.upstream import HttpUpstream
from bastion.gateway.upstream_credentials import UserTokenUpstream
from tests.connections.fakes import Bystander, McpUpstream, loopback_base
from tests.oauth.support import Servers, free_socket
from tests.waits import eventually_async


def test_a_token_refused_on_the_standing_stream_ends_the_session_and_is_not_sent_again(
    database_url,
):
    sockets = free_socket(), free_socket()
    base, other = (loopback_base(s) for s in sockets)
    # A 2025-11-25 upstream that answers alice's token on POST, and refuses it (401) on the GET
    # of the standing stream, naming ``other`` (a bystander) as its resource metadata.
    upstream = McpUpstream(f"{base}/mcp", refuses_streams=True)
    upstream.accepted = {"alices-token"}
    upstream.resource_metadata = f"{other}/.well-known/oauth-protected-resource"
    bystander = Bystander()
    db = Database(database_url)
    connections = Connections(
        ConnectionStore(db),
        Sealer([Fernet.generate_key()]),
        {"tracker": (f"{base}/mcp", UpstreamOAuth())},
        "https://bastion.example",
    )
    sealed = connections.sealer.seal("alice", "tracker", {"access_token": "alices-token"})
    now = time.time()
    connections.store.put(StoredConnection("alice", "tracker", sealed, "", now + 3600, now, now))
    config = UpstreamConfig(name="tracker", url=f"{base}/mcp", auth="per_user", timeout=10)
    ended: list[str] = []

    async def scenario() -> None:
        session = UserTokenUpstream(
            config, "alice", connections, HttpUpstream(config), lambda _, why: ended.append(why)
        )

        async def ask(message):  # the user's client: what the upstream asks reaches it
            return {"result": {}}

        session.on_request = ask
        try:
            await session.ensure_started()  # initialize, then the standing stream's GET
            await eventually_async(lambda: ended, every=0.02)
            # Nothing opens the stream again: the task that would, a second after it failed, has
            # ended (not 1.5 s, in which a busy machine may not have sent the GET of one that
            # went on).
            assert await eventually_async(lambda: session._watcher.done()), "the stream is kept"
        finally:
            await session.close()

    with Servers() as servers:
        servers.serve(upstream.app(), sockets[0])
        servers.serve(bystander.app(), sockets[1])
        anyio.run(scenario)
    db.close()

    assert ended == ["(the upstream refused the user's token)"]
    verbs = [verb for verb, _, _ in upstream.requests]
    assert verbs.count("GET") == 1  # the refused token was not sent again
    assert {header for *_, header in upstream.requests} == {"Bearer alices-token"}
    assert bystander.got == []  # the URL the refusal named was not fetched
