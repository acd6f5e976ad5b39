"""An upstream that refuses a user's token (401) on the standing stream of their upstream session.

The stream is opened again a second after it fails; a refusal there was taken as any failure, so
the session sent the refused token again every second for as long as it lived (until idle), and
its user was never sent to connect again. A 401 to the user's token is now one refusal wherever
it comes (a request, the standing stream, its resumption): the token is forgotten, the session
ends, nothing is sent again on it, and no URL the refusal names (``resource_metadata``, RFC 9728
§5.1) is fetched.
"""

from __future__ import annotations

import asyncio
import json
import time

import anyio
from cryptography.fernet import Fernet
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from bastion.connections.sealing import Sealer
from bastion.connections.service import Connections
from bastion.connections.settings import UpstreamOAuth
from bastion.connections.store import ConnectionStore, StoredConnection
from bastion.db import Database
from bastion.gateway.config import UpstreamConfig
from bastion.gateway.upstream import HttpUpstream
from bastion.gateway.upstream_credentials import UserTokenUpstream
from tests.oauth.support import Servers, free_socket


def _upstream(seen: list[tuple[str, str]], elsewhere: str) -> Starlette:
    """A 2025-11-25 upstream that answers alice's token on POST, and refuses it (401) on the
    GET of the standing stream, naming ``elsewhere`` as its resource metadata."""

    async def post(request: Request) -> Response:
        message = json.loads(await request.body())
        seen.append(("POST", request.headers.get("authorization", "")))
        if "id" not in message:
            return Response(status_code=202)
        if message["method"] == "initialize":
            result = {
                "protocolVersion": "2025-11-25",
                "capabilities": {"tools": {}},
                "serverInfo": {"name": "tracker", "version": "1"},
            }
            answer = {"jsonrpc": "2.0", "id": message["id"], "result": result}
            return JSONResponse(answer, headers={"mcp-session-id": "s-1"})
        error = {"code": -32601, "message": "no such method"}
        return JSONResponse({"jsonrpc": "2.0", "id": message["id"], "error": error})

    async def get(request: Request) -> Response:
        seen.append(("GET", request.headers.get("authorization", "")))
        challenge = f'Bearer error="invalid_token", resource_metadata="{elsewhere}"'
        return Response(status_code=401, headers={"www-authenticate": challenge})

    return Starlette(
        routes=[Route("/mcp", post, methods=["POST"]), Route("/mcp", get, methods=["GET"])]
    )


def _recorder(reached: list[str]) -> Starlette:
    async def anything(request: Request) -> Response:
        reached.append(request.url.path)
        return JSONResponse({})

    return Starlette(routes=[Route("/{path:path}", anything, methods=["GET", "POST"])])


def test_a_token_refused_on_the_standing_stream_ends_the_session_and_is_not_sent_again(
    database_url,
):
    seen: list[tuple[str, str]] = []
    reached: list[str] = []
    sockets = free_socket(), free_socket()
    base, other = (f"http://127.0.0.1:{s.getsockname()[1]}" for s in sockets)
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
            with anyio.move_on_after(10):
                while not ended:
                    await asyncio.sleep(0.02)
            await asyncio.sleep(1.5)  # past the second after which a failed stream is reopened
        finally:
            await session.close()

    with Servers() as servers:
        servers.serve(_upstream(seen, f"{other}/.well-known/oauth-protected-resource"), sockets[0])
        servers.serve(_recorder(reached), sockets[1])
        anyio.run(scenario)
    db.close()

    assert ended == ["(the upstream refused the user's token)"]
    assert [m for m, _ in seen].count("GET") == 1  # the refused token was not sent again
    assert {token for _, token in seen} == {"Bearer alices-token"}
    assert reached == []  # the URL the refusal named was not fetched
