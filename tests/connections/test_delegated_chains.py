"""Per-user credentials toward an upstream (docs/identity.md, "Per-user credentials toward
upstream servers") for agents that act through delegated tokens (RFC 8693, docs/delegation.md),
end to end with real parts:

- the upstream: an MCP server written with the official SDK that speaks 2025-11-25 only
  (sessions), accepts only access tokens of a SECOND bastion (a `bastion serve` process of its
  own, its authorization server), and records every request (headers) and each token a tool
  call came with;
- two replicas of the first bastion (two apps, each on its own port, one PostgreSQL schema):
  its gateway serves the upstream with ``auth = "per_user"``; people connect over HTTP, through
  bastion's connect pages and the second bastion's sign-in and consent;
- agents: alice's coding agent (a public client she signs in with), helpers (confidential
  clients, owned by bob) that get delegated tokens by token exchange, one chain deeper than the
  other.

What is asked: a chain acting for alice carries alice's own upstream token and nothing else; a
chain of another user never gets hers, nor her upstream session; a chain whose user is not
connected is sent to connect (never served with the agent's owner's credential, or anyone's);
a revoked connection refuses the chain's next call on either replica; an agent of bob's in
alice's chain gets her credential only through that chain.
"""

from __future__ import annotations

import time
from types import SimpleNamespace
from urllib.parse import parse_qs, urlsplit

import anyio
import httpx
import pytest

from bastion.agents import identity
from bastion.oauth import registration
from bastion.oauth.users import create_user
from bastion.policy.parser import parse_fact
from bastion.server.app import create_app
from bastion.server.config import ServerConfig
from tests.conftest import postgres_schema
from tests.connections.test_upstream_connections import POLICY as CONNECTIONS_POLICY
from tests.connections.test_upstream_connections import (
    JwtVerifier,
    upstream_app,
    upstream_issuer,
)
from tests.delegation.support import claims
from tests.gateway.streams import legacy_session, messages, modern_headers, modern_request
from tests.gateway.support import (
    REDIRECT_URI,
    LegacyOnly,
    Recorder,
    access_token,
    bastion_serve,
    stop,
)
from tests.oauth.support import Servers, free_socket, hidden_fields, log_in_and_consent
from tests.waits import eventually

PASSWORD = "delegated-connections-password"
EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
ACCESS_TOKEN = "urn:ietf:params:oauth:token-type:access_token"
URL_ELICITATION = {"elicitation": {"url": {}}}
# The connection tests' policy, and delegation between agents.
POLICY = (
    CONNECTIONS_POLICY
    + """
may_delegate(from: Agent, to: Agent, server: McpServer) if
  has_role(from, "delegator", server) and
  has_role(to, "helper", server);
delegated_scope(_user: User, _from: Agent, _to: Agent, _server: McpServer, _scope: String);
deny(agent: Agent, "call", _tool: Tool) if has_role(agent, "barred", McpServer{"tracker"});
"""
)


class Agent:
    def __init__(self, client_id: str, secret: str | None = None) -> None:
        self.client_id = client_id
        self.secret = secret

    @property
    def auth(self) -> tuple[str, str] | None:
        return (self.client_id, self.secret) if self.secret else None


class Lab:
    """The two replicas of the first bastion, the second bastion, the upstream and what it saw."""

    def __init__(self, apps, urls, one_url, two_url, checks, seen, upstream) -> None:
        self.apps = apps  # the replicas' apps, [a, b]
        self.urls = urls  # each replica's origin
        self.one_url, self.two_url = one_url, two_url  # the issuers
        self.checks = checks  # how the upstream checks a token
        self.seen: list[dict] = seen  # each tool call the upstream served: its token, subject
        self.upstream: Recorder = upstream  # every request that reached the upstream
        self.http = httpx.Client(timeout=20)
        self.agents: dict[str, Agent] = {}

    @property
    def connections(self):
        return self.apps[0].state.connections

    def mcp_url(self, replica: int = 0) -> str:
        return f"{self.urls[replica]}/mcp/tracker"


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    with postgres_schema() as database:
        yield from _lab(tmp_path_factory.mktemp("chains"), database)


def _lab(tmp, database: str):
    policy = tmp / "policy.polar"
    policy.write_text(POLICY)
    one_sock, two_sock, up_sock = free_socket(), free_socket(), free_socket()
    # Both on 127.0.0.1: each issuer has a path of its own, so that their cookies do not mix.
    one_url = f"http://127.0.0.1:{one_sock.getsockname()[1]}/one"
    two_url = f"http://127.0.0.1:{two_sock.getsockname()[1]}/two"
    upstream_url = f"http://127.0.0.1:{up_sock.getsockname()[1]}/mcp"
    users = ("alice", "bob", "carol")
    upstream_issuer(tmp, policy, two_sock, two_url, upstream_url, users, PASSWORD)
    origin = one_url.removesuffix("/one")
    config = ServerConfig(
        database=database,
        policy_file=str(policy),
        oauth={
            "issuer": one_url,
            "key_dir": str(tmp / "one-keys"),
            "resources": [{"uri": f"{origin}/mcp/tracker", "scopes": ["tracker"]}],
            "open_registration": {"max_per_address": 1000},
            "max_delegation_depth": 2,
        },
        gateway={
            "upstreams": [
                {
                    "name": "tracker",
                    "url": upstream_url,
                    "auth": "per_user",
                    "oauth": {"scopes": ["issues:read"]},
                }
            ]
        },
    )
    seen: list[dict] = []
    checks = JwtVerifier(two_url, upstream_url)
    upstream = Recorder(LegacyOnly(upstream_app(checks, seen)))
    two, _ = bastion_serve(tmp / "two.toml", two_url.removesuffix("/two"))
    try:
        with Servers() as servers:
            servers.serve(upstream, up_sock)
            a = create_app(config)
            for name in ("alice", "bob", "carol"):
                create_user(a.state.oauth.store, name, PASSWORD, time.time(), actor="test")
            servers.serve(a, one_sock)
            b = create_app(config)  # a second replica: the same database and settings
            b_origin = servers.serve(b, free_socket())
            lab = Lab([a, b], [origin, b_origin], one_url, two_url, checks, seen, upstream)
            _cast(lab)
            try:
                yield lab
            finally:
                lab.http.close()
    finally:
        stop(two)


def _register(lab: Lab, name: str, metadata: dict, owner: str | None = None) -> Agent:
    """A client registered by an administrator (as `bastion clients create` does it)."""
    app = lab.apps[0]
    values = registration.validate_client_metadata(
        {"client_name": name, "scope": "tracker", **metadata}, app.state.oauth.settings
    )
    registered = registration.new_client(values, source="admin", now=time.time())
    app.state.oauth.store.register_client(registered.client, actor="test")
    if owner is not None:
        identity.set_owner(app.state.store, registered.client.client_id, owner, "test")
    body = registered.response()
    return Agent(body["client_id"], body.get("client_secret"))


def _cast(lab: Lab) -> None:
    """The agents: a coding agent of alice's that anyone may sign in with (public), and bob's helpers
    (confidential): ``helper`` may be delegated to by the coder, and may delegate to
    ``deeper``."""
    lab.agents["coder"] = _register(
        lab,
        "coding agent",
        {
            "redirect_uris": [REDIRECT_URI],
            "token_endpoint_auth_method": "none",
            "grant_types": ["authorization_code", "refresh_token", EXCHANGE],
        },
        owner="alice",
    )
    for name in ("helper", "deeper"):
        lab.agents[name] = _register(
            lab,
            f"bob's {name}",
            {
                "token_endpoint_auth_method": "client_secret_basic",
                "grant_types": ["client_credentials", EXCHANGE],
            },
            owner="bob",
        )
    coder, helper, deeper = (lab.agents[n].client_id for n in ("coder", "helper", "deeper"))
    facts(
        lab,
        f'has_role(Agent{{"{coder}"}}, "delegator", McpServer{{"tracker"}})',
        f'has_role(Agent{{"{helper}"}}, "helper", McpServer{{"tracker"}})',
        f'has_role(Agent{{"{helper}"}}, "delegator", McpServer{{"tracker"}})',
        f'has_role(Agent{{"{deeper}"}}, "helper", McpServer{{"tracker"}})',
    )


def facts(lab: Lab, *lines: str, delete: bool = False) -> None:
    """Write facts, and wait until both replicas have them."""
    parsed = [parse_fact(line) for line in lines]
    store = lab.apps[0].state.store
    seq = (store.apply([], parsed) if delete else store.apply(parsed)).seq
    caught_up = eventually(
        lambda: all(a.state.replica.applied >= seq for a in lab.apps), every=0.01
    )
    assert caught_up, "a replica did not catch up"


# -- the parties -----------------------------------------------------------------------------


def connect(lab: Lab, username: str) -> None:
    """``username`` connects their account at the upstream, as a person does in a browser: signs
    in at the first bastion, presses Connect, signs in and allows at the second, comes back."""
    with (
        httpx.Client(follow_redirects=False, timeout=20) as one,
        httpx.Client(follow_redirects=False, timeout=20) as two,
    ):
        page = one.get(f"{lab.one_url}/sign-in", params={"next": "/one/connections"})
        fields = {**hidden_fields(page.text), "username": username, "password": PASSWORD}
        assert one.post(f"{lab.one_url}/sign-in", data=fields).status_code == 303
        form = hidden_fields(one.get(f"{lab.one_url}/connections/tracker/connect").text)
        started = one.post(f"{lab.one_url}/connections/tracker/connect", data=form)
        assert started.is_redirect, started.text
        back = log_in_and_consent(lab.two_url, started.headers["location"], username, PASSWORD, two)
        assert back.is_redirect, back.text
        done = one.get(back.headers["location"])
        assert done.status_code == 200 and "<title>Connected</title>" in done.text, done.text
    assert [c.upstream for c in lab.connections.listed(username)] == ["tracker"]


def upstream_token(lab: Lab, username: str) -> str:
    """The access token at the upstream that ``username``'s connection holds now."""
    row = lab.connections.store.get(username, "tracker")
    assert row is not None, f"{username} is not connected"
    return lab.connections.sealer.open(username, "tracker", row.sealed)["access_token"]


def user_token(lab: Lab, username: str) -> str:
    """``username`` signs in with the coding agent and consents: its token for the tracker."""
    coder = lab.agents["coder"].client_id
    return access_token(lab.http, lab.one_url, lab.mcp_url(), username, PASSWORD, "tracker", coder)


def own_token(lab: Lab, agent: str) -> str:
    """A helper's token for itself (client_credentials): its actor_token."""
    answer = lab.http.post(
        f"{lab.one_url}/token",
        data={"grant_type": "client_credentials", "resource": lab.mcp_url()},
        auth=lab.agents[agent].auth,
    )
    assert answer.status_code == 200, answer.text
    return answer.json()["access_token"]


def exchange(lab: Lab, agent: str, subject_token: str, actor: str) -> httpx.Response:
    """``agent`` (the subject token's) asks for a token for ``actor`` (RFC 8693)."""
    client = lab.agents[agent]
    data = {
        "grant_type": EXCHANGE,
        "subject_token": subject_token,
        "subject_token_type": ACCESS_TOKEN,
        "actor_token": own_token(lab, actor),
        "actor_token_type": ACCESS_TOKEN,
    }
    if client.secret is None:
        data["client_id"] = client.client_id
    return lab.http.post(f"{lab.one_url}/token", data=data, auth=client.auth)


def delegated(lab: Lab, username: str, *agents: str) -> str:
    """A token of ``username``'s, exchanged down the chain coder -> ``agents``."""
    token, holder = user_token(lab, username), "coder"
    for agent in agents:
        answer = exchange(lab, holder, token, agent)
        assert answer.status_code == 200, answer.text
        token, holder = answer.json()["access_token"], agent
    return token


def call(lab: Lab, token: str, replica: int = 0, url_elicitation: bool = True) -> dict:
    """tools/call of ``whoami`` over raw Streamable HTTP (2026-07-28) at one replica: the
    JSON-RPC answer, or the HTTP status and body when refused before JSON-RPC."""
    response = lab.http.post(
        lab.mcp_url(replica),
        json=modern_request(
            1,
            "tools/call",
            {"name": "whoami", "arguments": {}},
            URL_ELICITATION if url_elicitation else None,
        ),
        headers=modern_headers(token, "tools/call", "whoami"),
    )
    if response.status_code != 200:
        return {"http": response.status_code, "body": response.text}
    return messages(response)[-1]


def served_as(answer: dict) -> str:
    """The user the upstream says the call came with (its ``whoami``)."""
    assert "result" in answer, answer
    assert not answer["result"].get("isError"), answer
    return answer["result"]["content"][0]["text"]


def connect_link(answer: dict) -> str:
    """The connect page an answer sends its user to (MCP's URL elicitation), checked whole."""
    error = answer.get("error")
    assert error is not None, answer
    assert error["code"] == -32042, error
    (question,) = error["data"]["elicitations"]
    assert question["mode"] == "url"
    return question["url"]


def link_user(url: str) -> list[str]:
    return parse_qs(urlsplit(url).query)["user"]


def bearers(lab: Lab, since: int) -> set[bytes]:
    """Each Authorization the upstream was sent since its request ``since``."""
    return {r["headers"].get(b"authorization") for r in lab.upstream.requests[since:]}


def sessions_with(lab: Lab, token: str) -> set[bytes]:
    """The upstream session ids of the requests that carried ``token``."""
    bearer = f"Bearer {token}".encode()
    return {
        r["headers"][b"mcp-session-id"]
        for r in lab.upstream.requests
        if r["headers"].get(b"authorization") == bearer and b"mcp-session-id" in r["headers"]
    }


@pytest.fixture
def alice(lab):
    """alice connected (once per module): her access token at the upstream."""
    if not lab.connections.listed("alice"):
        connect(lab, "alice")
    return upstream_token(lab, "alice")


@pytest.fixture
def bob(lab, alice):
    """bob connected too: his access token at the upstream."""
    if not lab.connections.listed("bob"):
        connect(lab, "bob")
    return upstream_token(lab, "bob")


def own_sessions(lab: Lab, replica: int, username: str):
    """``username``'s upstream session at a replica (the gateway's), or None."""
    from bastion.gateway.upstream_sessions import SessionOwner

    pool = lab.apps[replica].state.gateway.upstreams["tracker"].sessions
    return pool.find(SessionOwner(username))


# -- the tests -------------------------------------------------------------------------------


def test_alices_delegated_agents_carry_her_own_upstream_token_and_nothing_else(lab, alice):
    served, requests = len(lab.seen), len(lab.upstream.requests)
    subject = user_token(lab, "alice")
    helper = delegated(lab, "alice", "helper")
    deeper = delegated(lab, "alice", "helper", "deeper")

    ids = {n: a.client_id for n, a in lab.agents.items()}
    assert claims(deeper)["sub"] == "alice"
    assert claims(deeper)["act"] == {
        "sub": ids["deeper"],
        "act": {"sub": ids["helper"], "act": {"sub": ids["coder"]}},
    }
    for token in (subject, helper, deeper):
        for replica in (0, 1):
            assert served_as(call(lab, token, replica)) == "alice"
    # Every call reached the upstream with alice's token from the second bastion...
    assert [s["token"] for s in lab.seen[served:]] == [alice] * 6
    assert anyio.run(lab.checks.verify_token, alice).subject == "alice"
    # ...and every request sent upstream since (initialize, the standing stream) with it alone:
    # never a token of the first bastion's, the agent's, the helper's own, or a delegated one.
    assert bearers(lab, requests) == {f"Bearer {alice}".encode()}


def test_another_users_chain_never_gets_alices_token_nor_her_upstream_session(lab, alice):
    ids = {n: a.client_id for n, a in lab.agents.items()}
    # bob's chain goes through the very helpers alice's went through.
    bobs = delegated(lab, "bob", "helper", "deeper")
    assert claims(bobs)["sub"] == "bob"
    assert claims(bobs)["act"] == {
        "sub": ids["deeper"],
        "act": {"sub": ids["helper"], "act": {"sub": ids["coder"]}},
    }
    alices = delegated(lab, "alice", "helper", "deeper")
    if lab.connections.listed("bob"):  # connected by a test before: not connected, first
        key, _ = lab.apps[0].state.keys.create("admin", ["connections"], created_by="test")
        revoked = lab.http.delete(
            f"{lab.urls[0]}/v1/connections/bob/tracker", headers={"Authorization": f"Bearer {key}"}
        )
        assert revoked.status_code == 200, revoked.text
    served, requests = len(lab.seen), len(lab.upstream.requests)
    for replica in (0, 1):
        assert served_as(call(lab, alices, replica)) == "alice"
        assert link_user(connect_link(call(lab, bobs, replica))) == ["bob"]
    # bob's chain was not served with alice's token, nor with anyone's.
    assert [s["token"] for s in lab.seen[served:]] == [alice, alice]
    assert bearers(lab, requests) <= {f"Bearer {alice}".encode()}
    connect(lab, "bob")
    bob = upstream_token(lab, "bob")
    assert bob != alice
    served = len(lab.seen)
    for replica in (0, 1, 0, 1):  # the same helper for one user and the other, in turn
        assert served_as(call(lab, bobs, replica)) == "bob"
        assert served_as(call(lab, alices, replica)) == "alice"
    assert [s["token"] for s in lab.seen[served:]] == [bob, alice] * 4
    # Each user's chain rides on an upstream session of its own, on each replica.
    assert sessions_with(lab, bob) and sessions_with(lab, alice)
    assert not sessions_with(lab, bob) & sessions_with(lab, alice)
    for replica in (0, 1):
        mine, theirs = own_sessions(lab, replica, "alice"), own_sessions(lab, replica, "bob")
        assert mine is not None and theirs is not None
        assert mine.upstream is not theirs.upstream
        assert (mine.upstream.user, theirs.upstream.user) == ("alice", "bob")


def test_a_chain_whose_user_is_not_connected_is_sent_to_connect_never_served_otherwise(
    lab, alice, bob
):
    """carol signs in with alice's coding agent, which delegates to bob's helpers: alice (the
    agent's owner) and bob (the helpers' owner) are connected, carol is not. Her chain is sent
    to connect as carol, and nothing reaches the upstream: no fallback to the owner's
    credential or anyone else's. Nor does a helper acting as itself get its owner's."""
    ids = {n: a.client_id for n, a in lab.agents.items()}
    assert lab.connections.listed("carol") == []
    carols = [user_token(lab, "carol")]
    carols.append(delegated(lab, "carol", "helper"))
    carols.append(delegated(lab, "carol", "helper", "deeper"))
    as_itself = own_token(lab, "helper")
    answer = exchange(lab, "helper", as_itself, "deeper")  # a chain with no person in it
    assert answer.status_code == 200, answer.text
    itself_delegated = answer.json()["access_token"]
    assert claims(itself_delegated)["sub"] == ids["helper"]
    served, requests = len(lab.seen), len(lab.upstream.requests)
    for replica in (0, 1):
        for token in carols:
            assert link_user(connect_link(call(lab, token, replica))) == ["carol"]
            plain = call(lab, token, replica, url_elicitation=False)["error"]
            assert plain["code"] == -32009, plain  # a client without URL elicitation
            assert link_user(plain["data"]["url"]) == ["carol"]
        for token in (as_itself, itself_delegated):
            assert link_user(connect_link(call(lab, token, replica))) == [ids["helper"]]
    assert len(lab.seen) == served
    # (What alice's and bob's own upstream sessions do meanwhile, their standing streams, is
    # theirs; no other credential was sent.)
    assert bearers(lab, requests) <= {f"Bearer {alice}".encode(), f"Bearer {bob}".encode()}
    assert lab.connections.listed("carol") == []


def test_a_revoked_connection_refuses_the_chains_next_call_on_either_replica(lab, alice):
    chain = delegated(lab, "alice", "helper", "deeper")
    for replica in (0, 1):  # each replica holds an upstream session of alice's now
        assert served_as(call(lab, chain, replica)) == "alice"
        assert own_sessions(lab, replica, "alice") is not None
    for revoking in (0, 1):
        old = upstream_token(lab, "alice")
        app = lab.apps[revoking]
        key, _ = app.state.keys.create("admin", ["connections"], created_by="test")
        revoked = lab.http.delete(
            f"{lab.urls[revoking]}/v1/connections/alice/tracker",
            headers={"Authorization": f"Bearer {key}"},
        )
        assert revoked.status_code == 200, revoked.text
        served, requests = len(lab.seen), len(lab.upstream.requests)
        # The replica that revoked closed her session at once; the other finds no connection
        # at the next call. Both send the chain to connect, and the old token goes nowhere.
        assert own_sessions(lab, revoking, "alice") is None
        for replica in (revoking, 1 - revoking):
            assert link_user(connect_link(call(lab, chain, replica))) == ["alice"]
        assert len(lab.seen) == served
        assert f"Bearer {old}".encode() not in bearers(lab, requests)
        connect(lab, "alice")
        new = upstream_token(lab, "alice")
        assert new != old
        for replica in (0, 1):
            assert served_as(call(lab, chain, replica)) == "alice"
            assert lab.seen[-1]["token"] == new


def test_bobs_agent_in_alices_chain_gets_her_credential_only_through_that_chain(lab, alice, bob):
    ids = {n: a.client_id for n, a in lab.agents.items()}
    subject = user_token(lab, "alice")
    answer = exchange(lab, "coder", subject, "helper")
    assert answer.status_code == 200, answer.text
    for_alice = answer.json()["access_token"]
    for_bob = delegated(lab, "bob", "helper")
    as_itself = own_token(lab, "helper")
    served = len(lab.seen)
    for replica in (0, 1):
        assert served_as(call(lab, for_alice, replica)) == "alice"
        assert served_as(call(lab, for_bob, replica)) == "bob"
        # As itself it is neither alice nor bob (its owner): it is sent to connect as itself.
        assert link_user(connect_link(call(lab, as_itself, replica))) == [ids["helper"]]
    assert [s["token"] for s in lab.seen[served:]] == [alice, bob] * 2
    # It cannot take alice's token for itself: only the agent a token was issued to exchanges it.
    taken = exchange(lab, "helper", subject, "deeper")
    assert taken.status_code == 400 and taken.json()["error"] == "invalid_request", taken.text
    assert "issued to another client" in taken.json()["error_description"]
    # Once the policy no longer lets the coder delegate to it, no new chain is made...
    helper = f'has_role(Agent{{"{ids["helper"]}"}}, "helper", McpServer{{"tracker"}})'
    facts(lab, helper, delete=True)
    try:
        refused = exchange(lab, "coder", subject, "helper")
        assert refused.status_code == 400 and "may_delegate" in refused.text, refused.text
    finally:
        facts(lab, helper)
    # An agent of the chain that the policy does not allow refuses the chain's call: nothing
    # is sent with alice's token for it (her own agent is still served).
    barred = f'has_role(Agent{{"{ids["helper"]}"}}, "barred", McpServer{{"tracker"}})'
    facts(lab, barred)
    try:
        served, requests = len(lab.seen), len(lab.upstream.requests)
        for replica in (0, 1):
            refused = call(lab, for_alice, replica)  # the helper's call, through her coder
            assert refused["error"]["code"] == -32003, refused
            assert refused["error"]["data"]["reason"] == "not_permitted"
            assert served_as(call(lab, subject, replica)) == "alice"
        assert [s["token"] for s in lab.seen[served:]] == [alice, alice]
        calls = [r for r in lab.upstream.requests[requests:] if b'"tools/call"' in r["body"]]
        assert len(calls) == 2  # alice's agent's own two
    finally:
        facts(lab, barred, delete=True)
    # ...and once alice's agent's token is revoked, the chain made from it is refused on either
    # replica before anything reaches the upstream; bob's chain through the same helper is not.
    coder = lab.agents["coder"].client_id
    gone = lab.http.post(f"{lab.one_url}/revoke", data={"token": subject, "client_id": coder})
    assert gone.status_code == 200, gone.text
    served = len(lab.seen)
    for replica in (0, 1):
        assert eventually(lambda r=replica: call(lab, for_alice, r).get("http") == 401)
        assert served_as(call(lab, for_bob, replica)) == "bob"
    assert [s["token"] for s in lab.seen[served:]] == [bob, bob]


def test_a_client_session_of_alices_chain_is_not_bobs_chains_through_the_same_helper(
    lab, alice, bob
):
    """The helper opens a 2025-11-25 session at bastion working for alice; working for bob, it
    presents that session's id: refused as unknown, and nothing is served with alice's token."""
    for_alice = delegated(lab, "alice", "helper")
    for_bob = delegated(lab, "bob", "helper")
    at = SimpleNamespace(http=lab.http, mcp_url=lambda server: f"{lab.urls[1]}/mcp/{server}")
    opened = legacy_session(at, for_alice, "tracker")
    body = {"jsonrpc": "2.0", "id": 7, "method": "tools/call"}
    body["params"] = {"name": "whoami", "arguments": {}}
    served = len(lab.seen)
    answer = lab.http.post(at.mcp_url("tracker"), json=body, headers=opened)
    assert served_as(messages(answer)[-1]) == "alice"
    borrowed = {**opened, "authorization": f"Bearer {for_bob}"}
    refused = lab.http.post(at.mcp_url("tracker"), json=body, headers=borrowed)
    assert refused.status_code == 404, refused.text
    assert [s["token"] for s in lab.seen[served:]] == [alice]
    # bob's chain, in a session of its own, is served with bob's token.
    own = legacy_session(at, for_bob, "tracker")
    answer = lab.http.post(at.mcp_url("tracker"), json=body, headers=own)
    assert served_as(messages(answer)[-1]) == "bob"
    assert [s["token"] for s in lab.seen[served:]] == [alice, bob]
