"""What a refused refresh does to a user's connection, against a real token endpoint.

Only ``invalid_grant`` (RFC 6749 §5.2: the refresh token is invalid, expired or revoked) says the
user's grant is gone: the connection is deleted and the next call sends the user to connect
again. Every other refusal is about bastion's client or the server's state (its client secret
changed, a rate limit, a request it does not take): the connection is kept, the call fails with
a clear error, and once the server is fixed the same connection refreshes again. Deleting on
those made one misconfiguration or a 429 cost every user their connection.
"""

from __future__ import annotations

import logging

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
from bastion.names import SHOWN_CHARS
from tests.connections.hostile_text import HOSTILE, assert_escaped_and_cut
from tests.oauth.support import free_socket, serve

NOW = 1000.0


@pytest.fixture
def server():
    """An authorization server whose token endpoint answers ``answer[0]`` (status, body), or
    fresh tokens when it is None."""
    answer: list = [None]
    sock = free_socket()
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"

    async def metadata(request: Request) -> JSONResponse:
        return JSONResponse(
            {
                "issuer": base,
                "authorization_endpoint": f"{base}/authorize",
                "token_endpoint": f"{base}/token",
                "code_challenge_methods_supported": ["S256"],
            }
        )

    async def token(request: Request) -> JSONResponse:
        if answer[0] is not None:
            status, body = answer[0]
            return JSONResponse(body, status_code=status)
        return JSONResponse({"access_token": "fresh", "token_type": "Bearer", "expires_in": 3600})

    app = Starlette(
        routes=[
            Route("/.well-known/oauth-authorization-server", metadata),
            Route("/token", token, methods=["POST"]),
        ]
    )
    with serve(app, sock):
        yield base, answer


@pytest.fixture
def service(database_url, server):
    base, _ = server
    db = Database(database_url)
    oauth = UpstreamOAuth(issuer=base, client_id="bastion", client_secret="s3cret")
    connections = Connections(
        ConnectionStore(db),
        Sealer([Fernet.generate_key()]),
        {"tracker": (f"{base}/mcp", oauth)},
        "https://b",
        lambda: NOW,
    )
    sealed = connections.sealer.seal(
        "alice", "tracker", {"access_token": "old", "refresh_token": "refresh-1"}
    )
    connections.store.put(StoredConnection("alice", "tracker", sealed, "", NOW, 0.0, 0.0))
    yield connections
    db.close()


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (401, {"error": "invalid_client"}),  # bastion's client secret changed there
        (400, {"error": "unauthorized_client"}),
        (400, {"error": "invalid_request", "error_description": "try later"}),
        (400, {"error": "invalid_scope"}),
        (429, {"error": "rate_limited"}),
        (403, {"error": "access_denied"}),
    ],
)
def test_a_refusal_that_is_not_invalid_grant_keeps_the_connection(service, server, status, body):
    _, answer = server
    answer[0] = (status, body)
    with pytest.raises(ConnectionUnavailable, match=f"tracker.*{body['error']}") as refused:
        anyio.run(service.access_token, "alice", "tracker")
    assert "refresh-1" not in str(refused.value) and "s3cret" not in str(refused.value)
    assert service.store.get("alice", "tracker") is not None
    answer[0] = None  # the server is fixed: the same connection refreshes
    assert anyio.run(service.access_token, "alice", "tracker") == "fresh"


def test_invalid_grant_deletes_the_connection_and_the_user_connects_again(service, server):
    _, answer = server
    answer[0] = (400, {"error": "invalid_grant"})
    assert anyio.run(service.access_token, "alice", "tracker") is None
    assert service.store.get("alice", "tracker") is None
    answer[0] = None
    assert anyio.run(service.access_token, "alice", "tracker") is None  # no refresh, no loop


def test_a_refusals_error_and_description_are_logged_and_told_escaped_and_cut(
    service, server, caplog
):
    """The server writes its ``error`` and ``error_description``: the log line and the call's
    error hold them escaped and cut (`bastion.names.readable`)."""
    _, answer = server
    answer[0] = (400, {"error": "invalid_grant", "error_description": HOSTILE})
    with caplog.at_level(logging.INFO, logger="bastion.connections"):
        assert anyio.run(service.access_token, "alice", "tracker") is None
    [line] = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert_escaped_and_cut(line)
    assert len(line) < 2 * SHOWN_CHARS + 200

    sealed = service.sealer.seal("alice", "tracker", {"refresh_token": "refresh-1"})
    service.store.put(StoredConnection("alice", "tracker", sealed, "", NOW, 0.0, 0.0))
    answer[0] = (400, {"error": "slow_down\n\x1b[2J" + "y" * 500, "error_description": HOSTILE})
    with pytest.raises(ConnectionUnavailable) as refused:
        anyio.run(service.access_token, "alice", "tracker")
    said = str(refused.value)
    assert_escaped_and_cut(said)
    assert "slow_down\\u000a\\u001b[2Jy" in said and "y" * 200 not in said
