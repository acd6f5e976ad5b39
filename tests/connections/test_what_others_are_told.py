"""What an upstream with per-user credentials said to one user's session is not told to another.

The upstream answers ``initialize`` only with some user's token, so a user not connected yet is
told what it declared to another user's session in this process (its capabilities: which
features it has), for their client to know what to list. Its ``instructions`` are free text the
upstream wrote for the user whose token asked (their account, their workspace, what it holds for
them): they were told to the next user not connected as they came, so bob read what the upstream
had said to alice.
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
from tests.connections.fakes import McpUpstream, loopback_base
from tests.oauth.support import Servers, free_socket


def test_a_user_not_connected_is_never_told_what_the_upstream_told_another(database_url):
    sock = free_socket()
    base = loopback_base(sock)
    upstream = McpUpstream(f"{base}/mcp")
    upstream.accepted = {"alices-token"}
    upstream.greeting = "Signed in with {token}: workspace Falcon, 3 private boards."
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
    told: dict[str, dict] = {}

    async def scenario() -> None:
        # The upstream's own (never connected) connection, which keeps what any session heard.
        last_known = HttpUpstream(config)

        def session(user: str) -> UserTokenUpstream:
            return UserTokenUpstream(config, user, connections, last_known, lambda *_: None)

        alices, bobs = session("alice"), session("bob")
        try:
            await alices.ensure_started()
            await bobs.ensure_started()  # bob is not connected: nothing is sent for him
            told["alice"], told["bob"] = alices.init_result, bobs.init_result
        finally:
            await alices.close()
            await bobs.close()

    with Servers() as servers:
        servers.serve(upstream.app(), sock)
        anyio.run(scenario)
    db.close()

    assert "workspace Falcon" in told["alice"].get("instructions", "")  # told to her
    assert "instructions" not in told["bob"], told["bob"]
    assert "alices-token" not in repr(told["bob"])
    # What bob is told is still what the upstream has: its features and its name.
    assert told["bob"]["capabilities"] == told["alice"]["capabilities"]
    assert told["bob"]["serverInfo"] == {"name": "tracker", "version": "1"}
    assert {h for *_, h in upstream.requests} == {"Bearer alices-token"}
