"""A user's grant goes back only to the authorization server that issued it.

Without ``oauth.issuer`` the upstream's own protected-resource metadata (RFC 9728) names its
authorization server, read once per process: another replica, or the same one restarted, may
read another name there (the upstream moved, or a hostile or compromised upstream names a
server of its own). A code, a PKCE verifier, a refresh token or a token to revoke is sent only
to the server that issued it (or that the flow was started with): a grant of one server posted
to another's token endpoint is that server's to redeem at the first one (bastion's client there
is public, dynamic registration), the mix-up of RFC 9700 §4.4 across time instead of across
upstreams. Each scenario runs on two `Connections` over one database and one key, as two
replicas are, against real authorization servers served by uvicorn.
"""

from __future__ import annotations

import secrets
from urllib.parse import parse_qs, urlencode, urlsplit

import anyio
import httpx
import pytest
from cryptography.fernet import Fernet
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from bastion.audit.log import AuditLog
from bastion.connections.sealing import Sealer
from bastion.connections.service import Connections, FlowRefused
from bastion.connections.settings import UpstreamOAuth
from bastion.connections.store import ConnectionStore
from bastion.db import Database
from tests.oauth.support import Servers, free_socket


class AuthorizationServer:
    """An authorization server that authorizes at once, and records every form posted to its
    token and revocation endpoints."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.base = ""
        self.posted: list[dict[str, str]] = []  # every form, token and revocation endpoints

    def app(self) -> Starlette:
        async def metadata(request: Request) -> JSONResponse:
            return JSONResponse(
                {
                    "issuer": self.base,
                    "authorization_endpoint": f"{self.base}/authorize",
                    "token_endpoint": f"{self.base}/token",
                    "registration_endpoint": f"{self.base}/register",
                    "revocation_endpoint": f"{self.base}/revoke",
                    "code_challenge_methods_supported": ["S256"],
                }
            )

        async def register(request: Request) -> JSONResponse:
            return JSONResponse({"client_id": f"bastion-at-{self.name}"}, status_code=201)

        async def authorize(request: Request) -> Response:
            q = request.query_params
            answer = {
                "code": f"code-of-{self.name}-{secrets.token_urlsafe(8)}",
                "state": q["state"],
            }
            return RedirectResponse(f"{q['redirect_uri']}?{urlencode(answer)}", status_code=302)

        async def token(request: Request) -> JSONResponse:
            self.posted.append(dict(await request.form()))
            return JSONResponse(
                {
                    "access_token": f"access-of-{self.name}-{secrets.token_urlsafe(8)}",
                    "refresh_token": f"refresh-of-{self.name}-{secrets.token_urlsafe(8)}",
                    "token_type": "Bearer",
                    "expires_in": 3600,
                }
            )

        async def revoke(request: Request) -> Response:
            self.posted.append(dict(await request.form()))
            return Response(status_code=200)

        return Starlette(
            routes=[
                Route("/.well-known/oauth-authorization-server", metadata),
                Route("/register", register, methods=["POST"]),
                Route("/authorize", authorize),
                Route("/token", token, methods=["POST"]),
                Route("/revoke", revoke, methods=["POST"]),
            ]
        )


@pytest.fixture
def moved(database_url):
    """``first`` and ``second`` authorization servers, an upstream whose protected-resource
    metadata names ``named[0]``, the clock, and a function making a replica (`Connections`) over
    one database and key."""
    first, second = AuthorizationServer("first"), AuthorizationServer("second")
    named: list[str] = [""]
    sockets = [free_socket() for _ in range(3)]
    first.base, second.base, upstream = (f"http://127.0.0.1:{s.getsockname()[1]}" for s in sockets)

    async def resource_metadata(request: Request) -> JSONResponse:
        return JSONResponse({"resource": f"{upstream}/mcp", "authorization_servers": named})

    prm = Starlette(routes=[Route("/.well-known/oauth-protected-resource/mcp", resource_metadata)])
    db = Database(database_url)
    store = ConnectionStore(db)
    key = Fernet.generate_key()
    now = [1000.0]

    def replica() -> Connections:
        return Connections(
            store,
            Sealer([key]),
            {"tracker": (f"{upstream}/mcp", UpstreamOAuth())},
            "https://bastion.example",
            lambda: now[0],
        )

    with Servers() as servers:
        for app, sock in ((first.app(), sockets[0]), (second.app(), sockets[1]), (prm, sockets[2])):
            servers.serve(app, sock)
        named[0] = first.base
        yield first, second, named, now, replica
    db.close()


def _authorized(link: str) -> tuple[str, str]:
    """The state and code the authorization server sends the browser back with."""
    with httpx.Client(timeout=10) as browser:
        location = browser.get(link).headers["location"]
    query = parse_qs(urlsplit(location).query)
    return query["state"][0], query["code"][0]


def _connected(connections: Connections) -> None:
    state, code = _authorized(anyio.run(lambda: connections.start("alice", "tracker", browser="b")))
    anyio.run(lambda: connections.finish("alice", "tracker", state, code, browser="b"))


def test_a_code_goes_only_to_the_server_its_flow_was_started_with(moved):
    first, second, named, _, replica = moved
    one = replica()
    link = anyio.run(lambda: one.start("alice", "tracker", browser="b"))
    named[0] = second.base  # the upstream now names another server; replica two reads that
    state, code = _authorized(link)

    with pytest.raises(FlowRefused, match="started with .* authorization server") as refused:
        anyio.run(lambda: replica().finish("alice", "tracker", state, code, browser="b"))

    assert refused.value.status == 400
    assert second.posted == []  # neither the code nor the PKCE verifier reached it
    assert first.posted == []
    assert one.listed("alice") == []


def test_a_refresh_token_goes_only_to_the_server_that_issued_it(moved):
    first, second, named, now, replica = moved
    one = replica()
    _connected(one)
    [issued] = [f for f in first.posted if f["grant_type"] == "authorization_code"]
    named[0] = second.base
    two = replica()
    now[0] += 7200  # the access token has expired: the next call refreshes it

    assert anyio.run(two.access_token, "alice", "tracker") is None  # connect again

    assert second.posted == []  # the refresh token issued by the first server stayed here
    assert [f["grant_type"] for f in first.posted] == ["authorization_code"]
    assert issued["code"].startswith("code-of-first-")
    # Connecting again, at the server the upstream names now, replaces the connection.
    _connected(two)
    assert anyio.run(two.access_token, "alice", "tracker").startswith("access-of-second-")


def test_a_token_is_revoked_only_at_the_server_that_issued_it(moved):
    first, second, named, _, replica = moved
    _connected(replica())
    named[0] = second.base
    two = replica()

    assert anyio.run(lambda: two.revoke("alice", "tracker", actor="test"))

    assert second.posted == []
    assert two.store.get("alice", "tracker") is None  # gone from bastion either way
    [event] = AuditLog(two.store.db).events("connection.upstream_revocation")
    assert event.detail["outcome"].startswith("failed: issued by ")


@pytest.mark.parametrize("why", ["expired", "refused"])
def test_a_connection_whose_server_changed_is_dropped_and_recorded(moved, why):
    """Its refresh token can go nowhere now: the connection is deleted (not kept to fail each
    refresh again), the user is asked to connect anew, and the drop is audited; whether the
    refresh was due to the token's expiry or to the upstream's 401."""
    first, second, named, now, replica = moved
    one = replica()
    _connected(one)
    token = anyio.run(one.access_token, "alice", "tracker")
    named[0] = second.base
    two = replica()
    if why == "expired":
        now[0] += 7200
        assert anyio.run(two.access_token, "alice", "tracker") is None
    else:
        assert anyio.run(two.access_token_refused, "alice", "tracker", token) is None

    assert two.store.get("alice", "tracker") is None
    assert anyio.run(one.access_token, "alice", "tracker") is None  # on every replica
    assert second.posted == []
    [event] = AuditLog(two.store.db).events("connection.dropped")
    assert (event.subject, event.detail["upstream"]) == ("alice", "tracker")
    assert f"issued by {first.base}" in event.detail["reason"]
    assert second.base in event.detail["reason"]
