"""Per-user credentials toward an upstream MCP server (docs/identity.md, "Per-user credentials
toward upstream servers"), end to end with real parts:

- the upstream: an MCP server written with the official SDK (Streamable HTTP) that accepts only
  access tokens of a SECOND bastion, a `bastion serve` process of its own (its authorization
  server: signature by its JWKS, issuer, audience = the upstream's URL, expiry), and records
  every token it is sent;
- the first bastion: its gateway serves the upstream with ``auth = "per_user"``;
- the official SDK client calls through the first bastion and gets MCP's URL elicitation; Debian's
  chromium (Playwright) signs in at the first bastion and connects at the second;
- the same upstream at a second address that speaks 2025-11-25 only (sessions, a standing
  stream), behind capped and quickly idled upstream sessions: each user's own token rides on
  upstream sessions like any others.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import socket
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import anyio
import httpx
import httpx2
import pytest
from cryptography.fernet import Fernet
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet
from mcp import types
from mcp.client.client import Client as McpClient
from mcp.client.streamable_http import streamable_http_client
from mcp.server.auth.middleware.auth_context import get_access_token
from mcp.server.auth.provider import AccessToken
from mcp.server.auth.settings import AuthSettings
from mcp.server.mcpserver import Context, MCPServer
from mcp.shared.exceptions import MCPError, UrlElicitationRequiredError

from bastion.audit.actor import cli_actor
from bastion.connections.sealing import Sealer, Unsealable
from bastion.connections.store import StoredConnection
from bastion.connections.upstream_oauth import UpstreamOAuthClient, well_known
from bastion.db import Database
from bastion.gateway.upstream_sessions import SessionOwner
from bastion.oauth.store import OAuthStore
from bastion.oauth.users import create_user
from bastion.server.app import create_app
from bastion.server.config import ServerConfig
from tests import clients
from tests.browser import browser_fixture, tab_fixture  # noqa: F401 (fixtures)
from tests.clock import ManualClock
from tests.gateway.support import LegacyOnly, Recorder, bastion_serve, stop
from tests.oauth.support import MemoryStorage, free_socket, log_in_and_consent, sdk_auth, serve
from tests.waits import PATIENCE, eventually

PASSWORD = "connections-test-password"
REDIRECT_URI = "http://127.0.0.1:9/callback"
POLICY = """
actor User {}
actor Agent {}
resource McpServer {}
resource Tool {}
allow(_user: User, _action: String, _server: McpServer);
allow(_agent: Agent, _action: String, _server: McpServer);
allow(_user: User, _action: String, _tool: Tool);
allow(_agent: Agent, _action: String, _tool: Tool);
"""
# The upstream at its 2025-11-25 address, as three upstreams of the first bastion: with the
# default session settings, with max_sessions = 1, with session_idle_seconds = 1.
LEDGERS = ("ledger", "capped", "brief")


class Lab:
    """Both bastions, the upstream and what it saw."""

    # The 2025-11-25 address of the upstream, and what reached it there (`LEDGERS`).
    ledger_url = ""
    ledger_requests: list[dict]

    def __init__(self, one, upstream_checks, one_url, two_url, upstream_url, seen) -> None:
        self.one = one  # the first bastion's app
        self.upstream_checks = upstream_checks  # how the upstream checks a token
        self.one_url, self.two_url = one_url, two_url  # the issuers (each under a path of its own)
        self.upstream_url = upstream_url
        self.seen: list[dict] = seen  # each call the upstream served: its token and subject
        self.storages: dict[str, MemoryStorage] = {}  # each user's SDK client registration
        self.mcp_url = f"{urlsplit(one_url).scheme}://{urlsplit(one_url).netloc}/mcp/tracker"

    @property
    def connections(self):
        return self.one.state.connections


class JwtVerifier:
    """The SDK's TokenVerifier protocol, as an upstream of its own checks an authorization
    server's JWT access tokens: signature by the server's published keys, ``iss``, ``aud`` = this
    server's URL, ``exp`` (joserfc)."""

    def __init__(self, issuer: str, resource: str) -> None:
        self.issuer = issuer
        self.resource = resource
        self._keys: KeySet | None = None
        self.refused: set[str] = set()  # users whose tokens it refuses anyway (as if revoked)

    async def verify_token(self, token: str) -> AccessToken | None:
        if self._keys is None:
            async with httpx.AsyncClient(timeout=10) as http:
                meta = await http.get(well_known(self.issuer, "oauth-authorization-server"))
                jwks = await http.get(meta.json()["jwks_uri"])
            self._keys = KeySet.import_key_set(jwks.json())
        try:
            claims = jwt.decode(token, self._keys).claims
            jwt.JWTClaimsRegistry(
                iss={"essential": True, "value": self.issuer},
                aud={"essential": True, "value": self.resource},
                exp={"essential": True},
                sub={"essential": True},
            ).validate(claims)
        except JoseError:
            return None
        if claims["sub"] in self.refused:
            return None
        return AccessToken(
            token=token,
            client_id=str(claims.get("client_id", "")),
            scopes=str(claims.get("scope", "")).split(),
            expires_at=int(claims["exp"]),
            resource=self.resource,
            subject=claims["sub"],
        )


def upstream_app(checks: JwtVerifier, seen: list[dict]):
    issuer, resource = checks.issuer, checks.resource
    server = MCPServer(
        "tracker",
        token_verifier=checks,
        auth=AuthSettings(
            issuer_url=issuer,
            resource_server_url=resource,
            required_scopes=["issues:read"],
            validate_token_resource=False,  # JwtVerifier checks aud itself
        ),
    )

    @server.tool()
    def whoami() -> str:
        """The user whose token this call came with."""
        token = get_access_token()
        seen.append({"token": token.token, "subject": token.subject})
        return token.subject or ""

    @server.tool()
    async def ask(ctx: Context) -> str:
        """Ask the client who it is, on the session's standing stream (2025-11-25)."""
        token = get_access_token()
        seen.append({"token": token.token, "subject": token.subject})
        form = {"type": "object", "properties": {"name": {"type": "string"}}}
        with anyio.fail_after(20):
            answer = await ctx.session.elicit_form("Who are you?", form)
        return "answer: " + json.dumps(answer.content, sort_keys=True)

    return server.streamable_http_app(streamable_http_path="/mcp")


def upstream_issuer(
    tmp: Path,
    policy: Path,
    sock: socket.socket,
    issuer: str,
    upstream_url: str,
    users: tuple[str, ...],
    password: str = PASSWORD,
) -> None:
    """The configuration (``two.toml``) of the upstream's authorization server, a `bastion serve`
    of its own on ``sock``'s port (let go of here, for that process to take), and its ``users``
    with ``password``."""
    port = sock.getsockname()[1]
    sock.close()
    (tmp / "two.toml").write_text(
        f"""[server]
host = "127.0.0.1"
port = {port}
database = "{tmp / "two.db"}"
policy_file = "{policy}"

[oauth]
issuer = "{issuer}"
key_dir = "{tmp / "two-keys"}"
resources = [{{ uri = "{upstream_url}", scopes = ["issues:read"] }}]
open_registration = {{ max_per_address = 1000 }}
"""
    )
    db = Database(str(tmp / "two.db"))
    for name in users:
        create_user(OAuthStore(db), name, password, time.time(), actor="test")
    db.close()


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    yield from _lab(tmp_path_factory)


def _lab(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("connections")
    policy = tmp / "policy.polar"
    policy.write_text(POLICY)
    one_sock, two_sock, up_sock = free_socket(), free_socket(), free_socket()
    ledger_sock = free_socket()
    ledger_url = f"http://127.0.0.1:{ledger_sock.getsockname()[1]}/mcp"
    # Both on 127.0.0.1: each issuer has a path of its own, so that their cookies do not mix.
    one_url = f"http://127.0.0.1:{one_sock.getsockname()[1]}/one"
    two_url = f"http://127.0.0.1:{two_sock.getsockname()[1]}/two"
    upstream_url = f"http://127.0.0.1:{up_sock.getsockname()[1]}/mcp"
    # The upstream's authorization server: `bastion serve`, a process of its own.
    upstream_issuer(tmp, policy, two_sock, two_url, upstream_url, ("alice", "bob"))
    origin = one_url.removesuffix("/one")
    one = create_app(
        ServerConfig(
            database=str(tmp / "one.db"),
            policy_file=str(policy),
            oauth={
                "issuer": one_url,
                "key_dir": str(tmp / "one-keys"),
                "resources": [
                    {"uri": f"{origin}/mcp/{name}", "scopes": ["tracker"]}
                    for name in ("tracker", *LEDGERS)
                ],
                "open_registration": {"max_per_address": 1000},
            },
            gateway={
                "upstreams": [
                    {
                        "name": "tracker",
                        "url": upstream_url,
                        "auth": "per_user",
                        "oauth": {"scopes": ["issues:read"]},
                    },
                    {"name": "ledger", "url": ledger_url, "auth": "per_user"},
                    {"name": "capped", "url": ledger_url, "auth": "per_user", "max_sessions": 1},
                    {
                        "name": "brief",
                        "url": ledger_url,
                        "auth": "per_user",
                        "session_idle_seconds": 1,
                    },
                ]
            },
        )
    )
    for name in ("alice", "bob", "carol"):
        create_user(one.state.oauth.store, name, PASSWORD, time.time(), actor="test")
    seen: list[dict] = []
    checks = JwtVerifier(two_url, upstream_url)
    upstream = upstream_app(checks, seen)
    # The same upstream (the same checks of a token: aud = upstream_url) at a second address.
    ledger = Recorder(LegacyOnly(upstream_app(checks, seen)))
    # The same deployment as bastion.toml, for the CLI.
    (tmp / "bastion.toml").write_text(
        f"""[server]
database = "{tmp / "one.db"}"
policy_file = "{policy}"

[oauth]
issuer = "{one_url}"
key_dir = "{tmp / "one-keys"}"
resources = [{{ uri = "{origin}/mcp/tracker", scopes = ["tracker"] }}]

[[gateway.upstreams]]
name = "tracker"
url = "{upstream_url}"
auth = "per_user"
oauth = {{ scopes = ["issues:read"] }}
"""
    )
    two, _ = bastion_serve(tmp / "two.toml", two_url.removesuffix("/two"))
    try:
        with serve(upstream, up_sock), serve(ledger, ledger_sock), serve(one, one_sock):
            lab = Lab(one, checks, one_url, two_url, upstream_url, seen)
            lab.config = tmp / "bastion.toml"
            lab.ledger_url, lab.ledger_requests = ledger_url, ledger.requests
            yield lab
    finally:
        stop(two)


# -- the SDK client and the browser --------------------------------------------------------------


def run(func, *args):
    """``anyio.run(func, *args)`` in a thread of its own: Playwright's sync API keeps an event
    loop in the test's thread."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(anyio.run, func, *args).result()


def call(
    lab: Lab,
    username: str,
    tool: str = "whoami",
    storage: MemoryStorage | None = None,
    url_elicitation: bool = True,
    mode: str = "auto",
):
    """``username``'s SDK client (declaring URL elicitation) calls ``tool`` through the first
    bastion; returns the text result, or the MCPError it got, and the client's tokens. ``mode``
    "auto" speaks 2026-07-28 to bastion, "legacy" 2025-11-25 (sessions)."""
    storage = storage or lab.storages.setdefault(username, MemoryStorage())
    provider = sdk_auth(
        lab.mcp_url,
        lambda url: log_in_and_consent(lab.one_url, url, username, PASSWORD),
        storage,
        [],
        client_name="connections test agent",
        redirect_uri=REDIRECT_URI,
    )
    outcome: dict = {}

    async def never(context, params):  # the test opens the link itself, in the browser
        raise AssertionError("bastion asks through the error, not elicitation/create")

    async def main() -> None:
        async with (
            httpx2.AsyncClient(auth=provider, timeout=20, verify=clients.TRUST) as http,
            McpClient(
                streamable_http_client(lab.mcp_url, http_client=http),
                mode=mode,
                **({"elicitation_callback": never} if url_elicitation else {}),
            ) as client,
        ):
            try:
                result = await client.call_tool(tool, {})
                outcome["text"] = result.content[0].text
            except MCPError as e:
                outcome["error"] = e

    run(main)
    outcome["tokens"] = storage.tokens
    return outcome


def elicited_url(outcome: dict) -> str:
    error = outcome.get("error")
    assert error is not None, outcome
    assert error.error.code == -32042, error.error
    (question,) = UrlElicitationRequiredError.from_error(error.error).elicitations
    assert question.mode == "url"
    return str(question.url)


def sign_in(page, username: str) -> None:
    page.fill("#username", username)
    page.fill("#password", PASSWORD)
    page.click("button[type=submit]")


def connect_in_browser(page, lab: Lab, url: str, username: str) -> None:
    """Open the elicitation's link, sign in at the first bastion, connect, sign in and allow at
    the second, and arrive back at the first."""
    page.goto(url)
    assert "/one/sign-in" in page.url
    sign_in(page, username)
    page.wait_for_url("**/one/connections/tracker/connect**")
    page.click("button:has-text('Connect')")
    page.wait_for_url(f"{lab.two_url}/**")
    if page.locator("#password").count():
        sign_in(page, username)
        page.wait_for_load_state()
    # The second bastion asks for consent once per client and user; then it sends them back.
    if "/one/connections/tracker/callback" not in page.url:
        page.click("button[value=allow]")
    page.wait_for_url("**/one/connections/tracker/callback**")
    assert page.title() == "Connected", page.content()


# -- the flow ------------------------------------------------------------------------------------


def offered(lab: Lab, username: str) -> set[str]:
    """What ``username``'s client is told at initialize that the server offers (2025-11-25)."""
    storage = MemoryStorage()
    provider = sdk_auth(
        lab.mcp_url,
        lambda url: log_in_and_consent(lab.one_url, url, username, PASSWORD),
        storage,
        [],
        client_name="connections test agent",
        redirect_uri=REDIRECT_URI,
    )
    outcome: dict = {}

    async def main() -> None:
        async with (
            httpx2.AsyncClient(auth=provider, timeout=20) as http,
            McpClient(
                streamable_http_client(lab.mcp_url, http_client=http), mode="legacy"
            ) as client,
        ):
            capabilities = client.server_capabilities.model_dump(exclude_none=True)
            outcome["offered"] = {k for k, v in capabilities.items() if v or v == {}}

    run(main)
    return outcome["offered"]


def test_a_user_not_connected_is_told_what_the_upstream_declared_last_not_when_first_seen(lab, tab):
    # First in the module: carol's upstream session at bastion opens (empty: she never
    # connects) before anyone has connected, when bastion knows of the upstream only `tools`.
    offered(lab, "carol")
    ensure_connected(lab, tab, "alice")  # alice's session hears the upstream's initialize
    declared = offered(lab, "alice")
    assert {"tools", "prompts", "resources"} <= declared, declared
    assert offered(lab, "carol") == declared  # her session, still open, tells the same now
    from bastion.cli import main

    revoke = ["connections", "revoke", "alice", "tracker", "--config", str(lab.config)]
    with ThreadPoolExecutor(1) as pool:  # as the module found it: nobody connected
        assert pool.submit(main, revoke).result() == 0
    lab.seen.clear()  # and nothing seen upstream


def test_a_user_connects_once_and_the_upstream_sees_only_their_own_token(lab, tab):
    first = call(lab, "alice")
    url = elicited_url(first)
    assert url.startswith(f"{lab.one_url}/connections/tracker/connect")
    assert lab.seen == []  # nothing reached the upstream without alice's own token

    connect_in_browser(tab.page, lab, url, "alice")
    again = call(lab, "alice")
    assert again.get("text") == "alice", again
    sent = lab.seen[-1]["token"]
    # The upstream got alice's token from the second bastion, for its own URL...
    verified = run(lab.upstream_checks.verify_token, sent)
    assert verified is not None and verified.subject == "alice"
    # ...never the token the client holds for the first bastion.
    assert sent != again["tokens"].access_token
    assert all(s["token"] != again["tokens"].access_token for s in lab.seen)
    (shown,) = lab.connections.listed("alice")
    assert shown.upstream == "tracker" and shown.scope == "issues:read"


def test_another_user_is_not_connected_and_gets_an_elicitation_of_their_own(lab, tab):
    ensure_connected(lab, tab, "alice")
    served = len(lab.seen)
    outcome = call(lab, "bob")
    url = elicited_url(outcome)
    assert parse_qs(urlsplit(url).query)["user"] == ["bob"]
    assert len(lab.seen) == served  # alice's connection did not serve bob


def test_a_2025_11_25_client_gets_the_elicitation_and_then_its_users_token_upstream(lab, tab):
    ensure_connected(lab, tab, "alice")
    outcome = call(lab, "alice", mode="legacy", storage=MemoryStorage())
    assert outcome.get("text") == "alice", outcome
    assert run(lab.upstream_checks.verify_token, lab.seen[-1]["token"]).subject == "alice"
    url = elicited_url(call(lab, "bob", mode="legacy", storage=MemoryStorage()))
    assert parse_qs(urlsplit(url).query)["user"] == ["bob"]


def test_a_client_without_url_elicitation_gets_the_link_in_an_error_it_can_show(lab):
    served = len(lab.seen)
    outcome = call(lab, "bob", url_elicitation=False, storage=MemoryStorage())
    error = outcome["error"].error
    assert error.code == -32009  # never -32042 to a client that did not declare URL mode
    assert error.data["url"].startswith(f"{lab.one_url}/connections/tracker/connect?user=bob")
    assert error.data["url"] in error.message
    assert len(lab.seen) == served


def test_the_link_of_one_user_is_refused_to_another(lab, tab):
    bobs = elicited_url(call(lab, "bob"))
    page = tab.page
    page.goto(bobs)
    sign_in(page, "alice")
    page.wait_for_url("**/connections/tracker/connect**")
    assert page.title() == "Not your link"
    assert page.locator("form").count() == 0
    assert lab.connections.listed("bob") == []


def test_a_connection_is_finished_only_by_the_person_who_started_it(lab):
    location = run(lambda: lab.connections.start("bob", "tracker", browser="b"))
    state = parse_qs(urlsplit(location).query)["state"][0]
    from bastion.connections.service import FlowRefused

    with pytest.raises(FlowRefused) as refused:
        run(lambda: lab.connections.finish("alice", "tracker", state, "any-code", browser="b"))
    assert refused.value.status == 403
    # Spent: bob cannot finish it either, after alice tried.
    with pytest.raises(FlowRefused):
        run(lambda: lab.connections.finish("bob", "tracker", state, "any-code", browser="b"))
    assert lab.connections.listed("bob") == []


def test_a_connection_older_than_flow_seconds_is_refused_at_its_end(lab):
    from bastion.connections.service import FlowRefused

    clock = ManualClock(time.time())
    saved, lab.connections.clock = lab.connections.clock, clock
    try:
        location = run(lambda: lab.connections.start("bob", "tracker", browser="b"))
        state = parse_qs(urlsplit(location).query)["state"][0]
        clock.now += lab.connections.settings["tracker"].flow_seconds + 1
        with pytest.raises(FlowRefused) as refused:
            run(lambda: lab.connections.finish("bob", "tracker", state, "any-code", browser="b"))
    finally:
        lab.connections.clock = saved
    assert refused.value.status == 400
    assert refused.value.message == "This connection took too long; start again."
    # Spent: the same link is refused now, as unknown.
    with pytest.raises(FlowRefused, match="unknown or was already used"):
        run(lambda: lab.connections.finish("bob", "tracker", state, "any-code", browser="b"))
    assert lab.connections.listed("bob") == []


def test_a_connection_whose_authorization_server_is_gone_at_its_end_is_refused_not_a_500(lab):
    """Between the start of a connection and its end, bastion forgot the upstream's metadata (a
    restart) and the authorization server cannot be reached: the end is refused (502, with the
    reason), where reading bastion's registration there was an error no page caught (a 500)."""
    from bastion.connections.service import FlowRefused

    location = run(lambda: lab.connections.start("bob", "tracker", browser="b"))
    state = parse_qs(urlsplit(location).query)["state"][0]
    oauth = lab.connections.clients["tracker"]
    dead = free_socket()  # bound, never listening: nothing answers there
    # The client of a process started since, whose upstream's server cannot be reached.
    lab.connections.clients["tracker"] = UpstreamOAuthClient(
        f"http://127.0.0.1:{dead.getsockname()[1]}/mcp",
        dataclasses.replace(oauth.settings, issuer=""),
        "tracker",
    )
    try:
        with pytest.raises(FlowRefused) as refused:
            run(lambda: lab.connections.finish("bob", "tracker", state, "any-code", browser="b"))
    finally:
        lab.connections.clients["tracker"] = oauth
        dead.close()
    assert refused.value.status == 502 and "tracker" in refused.value.message
    assert lab.connections.listed("bob") == []


def ensure_connected(lab: Lab, tab, username: str) -> None:
    if not lab.connections.listed(username):
        outcome = call(lab, username)
        connect_in_browser(tab.page, lab, elicited_url(outcome), username)
    assert call(lab, username).get("text") == username


def stored_tokens(lab: Lab, username: str) -> dict:
    row = lab.connections.store.get(username, "tracker")
    return lab.connections.sealer.open(username, "tracker", row.sealed)


def test_an_expired_access_token_is_refreshed_once_before_it_is_sent(lab, tab):
    ensure_connected(lab, tab, "alice")
    before = stored_tokens(lab, "alice")
    lab.connections.store.db.execute(
        "UPDATE upstream_connections SET expires_at = ? WHERE subject = 'alice'", (time.time(),)
    )

    async def many():
        return await asyncio.gather(
            *(lab.connections.access_token("alice", "tracker") for _ in range(5))
        )

    # Five calls at once: one refresh (the second bastion rotates refresh tokens and revokes
    # the grant on reuse, so a second refresh with the same token would lose it).
    tokens = run(many)
    assert len(set(tokens)) == 1 and tokens[0] != before["access_token"]
    after = stored_tokens(lab, "alice")
    assert after["refresh_token"] != before["refresh_token"]
    outcome = call(lab, "alice")
    assert outcome.get("text") == "alice", outcome
    assert lab.seen[-1]["token"] == tokens[0]


def test_a_token_the_upstream_refuses_sends_the_user_to_connect_again(lab, tab):
    ensure_connected(lab, tab, "alice")
    served = len(lab.seen)
    lab.upstream_checks.refused.add("alice")
    try:
        elicited_url(call(lab, "alice"))  # 401 upstream: connect again
    finally:
        lab.upstream_checks.refused.discard("alice")
    assert len(lab.seen) == served
    assert call(lab, "alice").get("text") == "alice"


def test_a_tampered_ciphertext_fails_closed(lab, tab):
    ensure_connected(lab, tab, "alice")
    row = lab.connections.store.get("alice", "tracker")
    served = len(lab.seen)
    tampered = row.sealed[:-8] + ("A" if row.sealed[-8] != "A" else "B") + row.sealed[-7:]
    lab.connections.store.db.execute(
        "UPDATE upstream_connections SET sealed = ? WHERE subject = 'alice'", (tampered,)
    )
    try:
        outcome = call(lab, "alice")
        elicited_url(outcome)  # treated as no connection: connect again
        assert len(lab.seen) == served  # nothing was sent upstream
    finally:
        lab.connections.store.db.execute(
            "UPDATE upstream_connections SET sealed = ? WHERE subject = 'alice'", (row.sealed,)
        )


def test_a_ciphertext_moved_to_another_user_is_refused(lab, tab):
    ensure_connected(lab, tab, "alice")
    row = lab.connections.store.get("alice", "tracker")
    with pytest.raises(Unsealable):
        lab.connections.sealer.open("bob", "tracker", row.sealed)


def connection_events(lab: Lab, capsys) -> list[tuple[str, str, str, str, str]]:
    """The connections' audit events, oldest first, as ``bastion audit events`` shows them:
    (kind, user, upstream, actor, outcome at the upstream)."""
    from bastion.cli import main

    capsys.readouterr()
    kind = ["--kind", "connection.", "--json"]
    assert main(["audit", "events", *kind, "--config", str(lab.config)]) == 0
    shown = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    return [
        (
            e["kind"],
            e["subject"],
            e["detail"]["upstream"],
            e["detail"]["actor"],
            e["detail"].get("outcome", ""),
        )
        for e in shown
    ]


def test_revocation_stops_the_connection_here_and_at_the_upstream_server(lab, tab, capsys):
    ensure_connected(lab, tab, "alice")
    tokens = stored_tokens(lab, "alice")
    key, _ = lab.one.state.keys.create("admin", ["connections"], created_by="test")
    with httpx.Client(base_url=lab.one_url.removesuffix("/one"), timeout=10) as http:
        auth = {"Authorization": f"Bearer {key}"}
        listed = http.get("/v1/connections", params={"subject": "alice"}, headers=auth)
        assert listed.status_code == 200
        (shown,) = listed.json()["connections"]
        assert shown["upstream"] == "tracker" and "token" not in str(shown).replace(
            "access_token_expires_at", ""
        )
        # A key without the scope may not.
        other, _ = lab.one.state.keys.create("reader", ["facts:read"], created_by="test")
        refused = http.delete(
            "/v1/connections/alice/tracker", headers={"Authorization": f"Bearer {other}"}
        )
        assert refused.status_code == 403
        assert lab.connections.listed("alice") != []
        revoked = http.delete("/v1/connections/alice/tracker", headers=auth)
        assert revoked.status_code == 200, revoked.text
        assert http.delete("/v1/connections/alice/tracker", headers=auth).status_code == 404
    # Recorded with the key that revoked it, and the upstream's revocation after; the 403 and
    # the 404 recorded nothing.
    before = connection_events(lab, capsys)
    actor = f"key:{lab.one.state.keys.verify(key).id}"
    assert [e for e in before if e[3] == actor] == [
        ("connection.revoked", "alice", "tracker", actor, ""),
        ("connection.upstream_revocation", "alice", "tracker", actor, "revoked"),
    ]
    elicited_url(call(lab, "alice"))  # connect again
    # Revoked at the second bastion too (RFC 7009): the refresh token no longer works.
    client_id = lab.connections.sealer.open(
        "", f"tracker {lab.two_url}", lab.connections.store.client("tracker", lab.two_url)
    )["client_id"]
    with httpx.Client(timeout=10) as http:
        refresh = http.post(
            f"{lab.two_url}/token",
            data={
                "grant_type": "refresh_token",
                "refresh_token": tokens["refresh_token"],
                "client_id": client_id,
            },
        )
    assert refresh.status_code == 400 and refresh.json()["error"] == "invalid_grant"


def test_people_see_and_revoke_their_own_connections_on_their_page(lab, tab, capsys):
    ensure_connected(lab, tab, "alice")
    before = len(connection_events(lab, capsys))
    page = tab.page
    page.goto(f"{lab.one_url}/connections")
    if "/sign-in" in page.url:
        sign_in(page, "alice")
        page.wait_for_url("**/one/connections")
    assert "connected since" in page.content()
    page.click("button:has-text('Revoke')")
    page.wait_for_url("**/one/connections")
    assert "not connected" in page.content()
    assert lab.connections.listed("alice") == []
    assert connection_events(lab, capsys)[before:] == [
        ("connection.revoked", "alice", "tracker", "user:alice", ""),
        ("connection.upstream_revocation", "alice", "tracker", "user:alice", "revoked"),
    ]


def test_forms_without_their_csrf_token_and_unknown_states_change_nothing(lab, tab):
    ensure_connected(lab, tab, "alice")
    page = tab.page
    page.goto(f"{lab.one_url}/connections")
    if "/sign-in" in page.url:
        sign_in(page, "alice")
        page.wait_for_url("**/one/connections")
    before = lab.connections.listed("alice")
    for path in ("tracker/revoke", "tracker/connect"):
        for form in ({}, {"csrf_token": "1.forged"}):
            answer = page.request.post(f"{lab.one_url}/connections/{path}", form=form)
            assert answer.status == 403, (path, form)
    answer = page.goto(f"{lab.one_url}/connections/tracker/callback?state=made-up&code=any")
    assert answer.status == 400 and page.title() == "Not connected"
    assert lab.connections.listed("alice") == before


@pytest.mark.parametrize(
    ("error", "said"),
    [
        ("access_denied", "The authorization was declined there."),
        ("temporarily_unavailable", "The server cannot authorize now; try again later."),
        ("invalid_target", "The server refused the address bastion asked a token for."),
        ("Your+account+is+locked.+Call+the+spoofer", "The server answered with an unknown error."),
        ("<h1>Call+the+spoofer</h1>", "The server answered with an unknown error."),
        ("", "The server sent no authorization code."),
    ],
)
def test_the_callback_says_only_errors_oauth_defines_in_bastions_words(lab, error, said):
    """Anyone can send a signed-in person to the callback with any ``error``: text bastion
    shows must not be theirs (content spoofing under bastion's name). The codes of RFC 6749
    §4.1.2.1 (and RFC 8707's invalid_target) get bastion's wording; anything else is an unknown
    error; ``error_description`` is never shown."""
    session = lab.one.state.oauth.store.create_session("alice", time.time(), 600)
    query = f"error={error}&error_description=Call+the+spoofer+now" if error else ""
    location = run(lambda: lab.connections.start("alice", "tracker", browser="b"))
    state = parse_qs(urlsplit(location).query)["state"][0]
    with httpx.Client(cookies={"bastion_session": session}, timeout=10) as http:
        answer = http.get(f"{lab.one_url}/connections/tracker/callback?state={state}&{query}")
    assert answer.status_code == 400
    assert said in answer.text
    assert "spoofer" not in answer.text and "locked" not in answer.text.lower()
    from bastion.connections.service import FlowRefused

    with pytest.raises(FlowRefused):  # the flow is spent
        run(lambda: lab.connections.finish("alice", "tracker", state, "any-code", browser="b"))


def test_administrators_list_and_revoke_connections_with_the_cli(lab, tab, capsys):
    from bastion.cli import main

    ensure_connected(lab, tab, "alice")
    before = len(connection_events(lab, capsys))
    assert main(["connections", "list", "--config", str(lab.config), "--json"]) == 0
    listed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(c["subject"], c["upstream"]) for c in listed] == [("alice", "tracker")]
    assert "token" not in json.dumps(listed).replace("access_token_expires_at", "")
    revoke = ["connections", "revoke", "alice", "tracker", "--config", str(lab.config)]
    with ThreadPoolExecutor(1) as pool:  # away from Playwright's event loop
        assert pool.submit(main, revoke).result() == 0
        assert lab.connections.listed("alice") == []
        assert pool.submit(main, revoke).result() == 2
    # The OS user who ran it is named; the second, with nothing to revoke, recorded nothing.
    assert connection_events(lab, capsys)[before:] == [
        ("connection.revoked", "alice", "tracker", cli_actor(), ""),
        ("connection.upstream_revocation", "alice", "tracker", cli_actor(), "revoked"),
    ]
    elicited_url(call(lab, "alice"))


# -- keys ----------------------------------------------------------------------------------------


def test_rotation_old_key_opens_new_key_seals_and_a_removed_key_opens_nothing(tmp_path):
    old, new = Fernet.generate_key(), Fernet.generate_key()
    sealed = Sealer([old]).seal("alice", "tracker", {"access_token": "a"})
    rotated = Sealer([new, old])
    assert rotated.open("alice", "tracker", sealed) == {"access_token": "a"}
    resealed = rotated.rotate(sealed)
    assert Sealer([new]).open("alice", "tracker", resealed) == {"access_token": "a"}
    with pytest.raises(Unsealable):
        Sealer([old]).open("alice", "tracker", resealed)
    with pytest.raises(Unsealable):  # a wrong key fails closed
        Sealer([Fernet.generate_key()]).open("alice", "tracker", sealed)


def test_rekey_reseals_every_stored_connection_under_the_first_key(lab, tab):
    ensure_connected(lab, tab, "alice")
    service = lab.connections
    old = service.sealer
    keys = [Fernet.generate_key()]
    row = service.store.get("alice", "tracker")
    from bastion.connections.sealing import load_keys

    current = load_keys(lab.one.state.oauth.settings.key_dir)
    service.sealer = Sealer([*keys, *current])
    try:
        assert service.rekey() >= 1
        moved = service.store.get("alice", "tracker")
        assert moved.sealed != row.sealed
        assert Sealer(keys).open("alice", "tracker", moved.sealed)["access_token"]
        with pytest.raises(Unsealable):
            old.open("alice", "tracker", moved.sealed)
        assert call(lab, "alice").get("text") == "alice"
    finally:
        service.sealer = Sealer([*current, *keys])
        service.rekey()
        service.sealer = old
    assert sqlite3.sqlite_version_info >= (3, 35)  # UPDATE ... RETURNING


# -- per-user credentials on upstream sessions ---------------------------------------------------


@pytest.fixture
def ledgers(lab, tab):
    """alice and bob connected to the ledgers: their tracker tokens, sealed for each (the ledgers
    are the tracker's upstream at another address, which takes the same tokens); removed after."""
    service = lab.connections
    for username in ("alice", "bob"):
        tab.page.context.clear_cookies()  # signed in at either bastion as nobody
        ensure_connected(lab, tab, username)
        row = service.store.get(username, "tracker")
        tokens = service.sealer.open(username, "tracker", row.sealed)
        for name in LEDGERS:
            sealed = service.sealer.seal(username, name, tokens)
            service.store.put(
                StoredConnection(
                    username,
                    name,
                    sealed,
                    row.scope,
                    row.expires_at,
                    row.created_at,
                    row.created_at,
                )
            )
    yield
    for username in ("alice", "bob"):
        for name in LEDGERS:
            service.store.delete(username, name)


async def ledger_client(lab: Lab, stack: AsyncExitStack, username: str, server: str, asked: list):
    """``username``'s SDK client (2025-11-25, with its GET stream) on ``server``; each elicitation
    it is asked is noted in ``asked`` and answered with its user's name."""
    url = lab.mcp_url.removesuffix("/tracker") + f"/{server}"
    provider = sdk_auth(
        url,
        lambda link: log_in_and_consent(lab.one_url, link, username, PASSWORD),
        MemoryStorage(),
        [],
        client_name="connections test agent",
        redirect_uri=REDIRECT_URI,
    )

    async def elicit(context, params):
        asked.append(params.message)
        return types.ElicitResult(action="accept", content={"name": username})

    http = await stack.enter_async_context(httpx2.AsyncClient(auth=provider, timeout=20))
    return await stack.enter_async_context(
        McpClient(
            streamable_http_client(url, http_client=http),
            mode="legacy",
            elicitation_callback=elicit,
        )
    )


async def text(client, tool: str) -> str:
    return (await client.call_tool(tool, {})).content[0].text


def bearer(lab: Lab, username: str) -> bytes:
    return f"Bearer {stored_tokens(lab, username)['access_token']}".encode()


def ledger_session(lab: Lab, username: str) -> bytes:
    """The upstream session id of the last request to the ledger with ``username``'s token."""
    for request in reversed(lab.ledger_requests):
        headers = request["headers"]
        if headers.get(b"authorization") == bearer(lab, username) and b"mcp-session-id" in headers:
            return headers[b"mcp-session-id"]
    raise AssertionError(f"no upstream session of {username} at the ledger")


def alice_calls(lab: Lab, server: str) -> bytes:
    """alice's client calls ``whoami`` on ``server`` (served with her token); returns the id of
    the upstream session it went on."""

    async def main():
        async with AsyncExitStack() as stack:
            client = await ledger_client(lab, stack, "alice", server, [])
            return await text(client, "whoami"), ledger_session(lab, "alice")

    answer, session = run(main)
    assert answer == "alice"
    return session


def wait_deleted(lab: Lab, session_id: bytes) -> dict:
    """The DELETE that closed ``session_id`` at the ledger (waited for: sessions close in the
    background)."""

    def deleted() -> list[dict]:
        return [
            request
            for request in lab.ledger_requests
            if request["method"] == "DELETE"
            and request["headers"].get(b"mcp-session-id") == session_id
        ]

    assert eventually(deleted, every=0.02), "the upstream session was never closed"
    return deleted()[0]


def test_the_upstream_asks_alice_on_her_standing_stream_and_only_her_token_carries_it(lab, ledgers):
    asked: dict[str, list] = {"alice": [], "bob": []}
    served = len(lab.seen)

    async def main():
        async with AsyncExitStack() as stack:
            alice = await ledger_client(lab, stack, "alice", "ledger", asked["alice"])
            bob = await ledger_client(lab, stack, "bob", "ledger", asked["bob"])
            table = lab.one.state.gateway.sessions
            with anyio.fail_after(PATIENCE):  # both clients' GET streams open at bastion
                while sum(1 for s in table.sessions_of("ledger", "alice") if s.listener) < 1 or (
                    sum(1 for s in table.sessions_of("ledger", "bob") if s.listener) < 1
                ):
                    await anyio.sleep(0.02)
            return await text(alice, "ask"), await text(bob, "whoami")

    answer, bobs = run(main)
    assert json.loads(answer.removeprefix("answer: ")) == {"name": "alice"}
    assert bobs == "bob"
    assert asked == {"alice": ["Who are you?"], "bob": []}
    tokens = {u: stored_tokens(lab, u)["access_token"] for u in ("alice", "bob")}
    assert [(s["subject"], s["token"]) for s in lab.seen[served:]] == [
        ("alice", tokens["alice"]),
        ("bob", tokens["bob"]),
    ]
    # Every request on alice's upstream session (its standing stream's GET included) carried
    # her own upstream token: never bob's, never a token of the first bastion.
    session = ledger_session(lab, "alice")
    on_it = [r for r in lab.ledger_requests if r["headers"].get(b"mcp-session-id") == session]
    assert {r["method"] for r in on_it} >= {"GET", "POST"}
    assert {r["headers"].get(b"authorization") for r in on_it} == {bearer(lab, "alice")}


def test_per_user_credential_sessions_are_capped_like_any_upstream_session(lab, ledgers):
    pool = lab.one.state.gateway.upstreams["capped"].sessions

    async def main():
        async with AsyncExitStack() as stack:
            first = await text(await ledger_client(lab, stack, "alice", "capped", []), "whoami")
            alices = ledger_session(lab, "alice")
            bobs = await text(await ledger_client(lab, stack, "bob", "capped", []), "whoami")
            return first, alices, bobs

    first, alices, bobs = run(main)
    assert (first, bobs) == ("alice", "bob")
    # bob's session took the only place: alice's, idle, was closed upstream, with her token.
    assert wait_deleted(lab, alices)["headers"][b"authorization"] == bearer(lab, "alice")
    assert pool.find(SessionOwner("alice")) is None and len(pool) == 1


def test_per_user_credential_sessions_are_closed_when_idle(lab, ledgers):
    pool = lab.one.state.gateway.upstreams["brief"].sessions
    session = alice_calls(lab, "brief")
    assert wait_deleted(lab, session)["headers"][b"authorization"] == bearer(lab, "alice")
    assert pool.find(SessionOwner("alice")) is None


def test_a_connection_gone_through_another_process_ends_the_session_at_its_next_message(
    lab, ledgers
):
    """A connection deleted where this process's callbacks do not run (another replica, the
    CLI on the same database): what the upstream then sends on the standing stream it opened with
    that user's token is not relayed, and the session ends."""
    from bastion.gateway.upstream_credentials import UserTokenUpstream

    state = lab.one.state.gateway.upstreams["ledger"]
    ended, heard = [], []
    session = UserTokenUpstream(
        state.upstream.config, "alice", lab.connections, state.upstream,
        lambda upstream, reason: ended.append(reason),
    )  # fmt: skip
    session.on_notification = lambda *message: heard.append(message)
    note = {"jsonrpc": "2.0", "method": "notifications/resources/list_changed"}
    run(session._from_server, note)  # connected: relayed
    assert len(heard) == 1 and ended == []
    lab.connections.store.delete("alice", "ledger")  # not through this process's service
    run(session._from_server, note)
    assert len(heard) == 1 and ended == ["(its user's connection is gone)"]


def test_revoking_a_connection_closes_its_users_upstream_sessions_at_once(lab, ledgers):
    session = alice_calls(lab, "ledger")
    key, _ = lab.one.state.keys.create("admin", ["connections"], created_by="test")
    with httpx.Client(base_url=lab.one_url.removesuffix("/one"), timeout=10) as http:
        revoked = http.delete(
            "/v1/connections/alice/ledger", headers={"Authorization": f"Bearer {key}"}
        )
    assert revoked.status_code == 200, revoked.text
    # Closed now, not when it next idles (the session's default idle time is 15 minutes).
    wait_deleted(lab, session)
    assert lab.one.state.gateway.upstreams["ledger"].sessions.find(SessionOwner("alice")) is None
    assert lab.connections.listed("bob", "ledger") != []  # bob's connection is his own


def test_a_suspended_person_connects_nothing_and_finishes_no_connection(lab):
    """Connecting an upstream account is consenting: an account the kill switch holds does
    neither, from a session made before (revoking stays open to it: it only takes away)."""
    from bastion.signals.suspensions import resume, suspend, suspension
    from tests.oauth.support import hidden_fields

    create_user(lab.one.state.oauth.store, "held", PASSWORD, time.time(), actor="test")
    location = run(lambda: lab.connections.start("held", "tracker", browser="b"))
    state = parse_qs(urlsplit(location).query)["state"][0]

    def kill_switch(change) -> None:
        seq = change(lab.one.state.store, suspension("user", "held"), "test").seq
        applied = eventually(lambda: lab.one.state.replica.applied >= seq, every=0.01)
        assert applied, "the replica did not apply the suspension"

    with httpx.Client(follow_redirects=False, timeout=10) as browser:
        page = browser.get(f"{lab.one_url}/sign-in", params={"next": "/one/connections"})
        fields = {**hidden_fields(page.text), "username": "held", "password": PASSWORD}
        assert browser.post(f"{lab.one_url}/sign-in", data=fields).status_code == 303
        form = hidden_fields(browser.get(f"{lab.one_url}/connections/tracker/connect").text)
        kill_switch(suspend)
        try:
            shown = browser.get(f"{lab.one_url}/connections/tracker/connect")
            connected = browser.post(f"{lab.one_url}/connections/tracker/connect", data=form)
            finished = browser.get(
                f"{lab.one_url}/connections/tracker/callback",
                params={"state": state, "code": "any"},
            )
        finally:
            kill_switch(resume)
    for answer in (shown, connected, finished):
        assert answer.status_code == 403, answer.text
        assert "suspended" in answer.text
    assert "name=csrf_token" not in shown.text
    assert lab.connections.listed("held") == []
