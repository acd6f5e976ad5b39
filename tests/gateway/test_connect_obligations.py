"""Obligations a policy puts on ``connect`` hold on every message, not only refusals: a scope
the token lacks sends the client to step up, a hold refuses (until approvals exist)."""

from __future__ import annotations

import time
from contextlib import contextmanager

import anyio
import pytest

from bastion.policy.parser import parse_fact

from .streams import call_tool, listening_to_tools, messages, modern_headers, modern_request
from .support import start

LIST_TOOLS = "tools/list"


def list_tools(bastion, token: str):
    return bastion.http.post(
        bastion.mcp_url("labhttp"),
        json=modern_request(1, LIST_TOOLS, {}),
        headers=modern_headers(token, LIST_TOOLS),
    )


def test_a_scope_required_to_connect_sends_the_client_to_step_up(bastion):
    token = bastion.token("sam", "labhttp")
    assert list_tools(bastion, token).status_code == 200
    rule = parse_fact('connect_scope(McpServer{"labhttp"}, "customers:write")')
    before = len(bastion.recorder.requests)
    bastion.apply(inserts=[rule])
    try:
        refused = list_tools(bastion, token)
        assert refused.status_code == 403, refused.text
        challenge = refused.headers["www-authenticate"]
        assert 'error="insufficient_scope"' in challenge
        # Every scope the request needs, the token's own too: a token granted for the challenge
        # alone would lose customers:read (MCP authorization, Scope Challenge Handling).
        assert 'scope="customers:read customers:write"' in challenge
        assert len(bastion.recorder.requests) == before  # nothing reached the upstream
    finally:
        bastion.apply(deletes=[rule])
    assert list_tools(bastion, token).status_code == 200


def test_a_hold_on_connect_refuses_every_message(bastion):
    token = bastion.token("sam", "labhttp")
    held = parse_fact('connect_held(McpServer{"labhttp"}, User{"sam"})')
    before = len(bastion.recorder.requests)
    bastion.apply(inserts=[held])
    try:
        refused = list_tools(bastion, token).json()
        assert refused["error"]["data"]["reason"] == "approval_pending"
        assert refused["error"]["data"]["decision_id"]
        assert len(bastion.recorder.requests) == before
    finally:
        bastion.apply(deletes=[held])
    assert "result" in list_tools(bastion, token).json()


def test_a_connect_mask_that_cannot_be_decided_refuses_every_message(bastion):
    """What the full decision of ``connect`` refuses (`Enforcer.decide`), the check on every
    message refuses too, not only a session's first message: here a mask whose rule cannot be
    decided (2 / 0: which path is not known), refused "undecided" rather than let through. The
    check on each message left masks out (a connect has no result to mask), and said yes."""
    token = bastion.token("sam", "labhttp")
    fact = parse_fact('connect_divisor(McpServer{"labhttp"}, 0)')
    before = len(bastion.recorder.requests)
    bastion.apply(inserts=[fact])
    try:
        refused = list_tools(bastion, token).json()
        assert "error" in refused, refused
        assert refused["error"]["data"]["reason"] == "undecided"
        assert refused["error"]["data"]["decision_id"]
        assert len(bastion.recorder.requests) == before  # nothing reached the upstream
    finally:
        bastion.apply(deletes=[fact])
    assert "result" in list_tools(bastion, token).json()


def test_a_hold_on_connect_cuts_a_listen_stream_off_at_its_next_notification(bastion):
    token = bastion.token("sam", "labhttp")
    held = parse_fact('connect_held(McpServer{"labhttp"}, User{"sam"})')
    with listening_to_tools(bastion, token) as frames:
        bastion.apply(inserts=[held])
        try:
            # avery (not held) makes the upstream announce; sam's stream ends instead of hearing it.
            call_tool(
                bastion, bastion.token("avery", "labhttp"), "labhttp", "announce", {"kind": "tools"}
            )
            assert list(frames) == []
        finally:
            bastion.apply(deletes=[held])


def test_the_401_names_the_scope_required_to_connect_with_the_upstream_s(bastion):
    """MCP authorization (2025-11-25, Protected Resource Metadata Discovery): the 401's
    ``scope`` says what the resource needs, and a client asks for exactly that first. A scope
    the policy requires of every message (``requires_scope`` on ``connect``) belongs there: left
    out, the client's first token is refused at once and it must authorize again."""
    url = bastion.mcp_url("deskhttp")
    rule = parse_fact('connect_scope(McpServer{"deskhttp"}, "customers:write")')

    def scope_of_the_401() -> str:
        response = bastion.http.post(url, json=modern_request(1, LIST_TOOLS, {}))
        assert response.status_code == 401, response.text
        challenge = response.headers["www-authenticate"]
        return challenge.split('scope="', 1)[1].split('"', 1)[0]

    assert scope_of_the_401() == "customers:read"
    bastion.apply(inserts=[rule])
    try:
        assert scope_of_the_401() == "customers:read customers:write"
    finally:
        bastion.apply(deletes=[rule])
    assert scope_of_the_401() == "customers:read"  # the policy's answer, not a remembered one


@pytest.mark.parametrize("mode", ["legacy", "auto"])
def test_an_sdk_client_authorizes_once_for_a_server_whose_policy_requires_a_scope_to_connect(
    bastion, mode
):
    """The official SDK client, as it comes: one sign-in and consent, then calls. Before, the
    401 named only the upstream's ``scopes``: the client authorized for them, was sent to step
    up by its very first message (the ``connect`` scope), and authorized a second time."""
    rule = parse_fact('connect_scope(McpServer{"deskhttp"}, "customers:write")')

    async def script(client, seen):
        result = await client.call_tool("search_customers", {"query": "ada"})
        seen["search"] = result.content[0].text

    bastion.apply(inserts=[rule])
    try:
        seen = bastion.sdk("avery", "deskhttp", mode, script)
    finally:
        bastion.apply(deletes=[rule])
    assert "ada@example.com" in seen["search"]
    assert len(seen["redirects"]) == 1, seen["redirects"]  # one authorization, not two
    assert set(seen["tokens"].scope.split()) == {"customers:read", "customers:write"}


# A server whose policy comes to require a scope of every message (``desk:access``) while its
# clients hold tokens without it, and whose messages need scopes of their own too.
ACCESS = "desk:access"
OWN_SCOPES = (
    'requires_scope("read", _r: McpResource, "customers:write") if\n'
    '  context.uri = "customers://plans";\n'
    'requires_scope("get", _p: Prompt, "customers:write") if context.prompt = "apology";\n'
    # A scope no resource offers: no token can carry it.
    'requires_scope("call", _t: Tool, "mail:send") if context.tool = "send_email";\n'
    # A recent sign-in asked of every message, switched on by a fact.
    "declare connect_fresh(McpServer);\n"
    'requires_recent_auth(_user: User, "connect", server: McpServer, 120) if\n'
    "  connect_fresh(server);\n"
)


@pytest.fixture(scope="module")
def scoped(tmp_path_factory):
    with start(
        tmp_path_factory.mktemp("scoped"),
        policy_extra=OWN_SCOPES,
        resource_scopes=("customers:read", "customers:write", ACCESS),
    ) as running:
        yield running


def post(bastion, token: str, method: str, params: dict, name: str | None = None):
    return bastion.http.post(
        bastion.mcp_url("deskhttp"),
        json=modern_request(1, method, params),
        headers=modern_headers(token, method, name),
    )


def scope_of(response) -> set[str]:
    challenge = response.headers["www-authenticate"]
    assert 'error="insufficient_scope"' in challenge, challenge
    return set(challenge.split('scope="', 1)[1].split('"', 1)[0].split())


@contextmanager
def access_required(bastion):
    rule = parse_fact(f'connect_scope(McpServer{{"deskhttp"}}, "{ACCESS}")')
    bastion.apply(inserts=[rule])
    try:
        yield
    finally:
        bastion.apply(deletes=[rule])


MESSAGES = [
    ("tools/call", {"name": "delete_customer", "arguments": {"customer_id": "c-100"}}),
    ("resources/read", {"uri": "customers://plans"}),
    ("prompts/get", {"name": "apology", "arguments": {"customer_name": "Ada"}}),
]


@pytest.mark.parametrize(("method", "params"), MESSAGES, ids=[m for m, _ in MESSAGES])
def test_a_message_lacking_the_connect_scope_and_its_own_is_sent_to_step_up_for_both(
    scoped, method, params
):
    """MCP authorization, Scope Challenge Handling: the 403 names "the scopes needed to satisfy
    the current request". Refused at ``connect`` first, the message's own scope was left out,
    so a client authorized for the challenge was refused again at once, and authorized twice."""
    name = params.get("name") or params.get("uri")
    token = scoped.token("avery", "deskhttp")
    assert post(scoped, token, "tools/list", {}).status_code == 200  # as clients list first
    before = len(scoped.recorder.requests)
    with access_required(scoped):
        refused = post(scoped, token, method, params, name)
        assert refused.status_code == 403, refused.text
        assert scope_of(refused) == {"customers:read", "customers:write", ACCESS}
        assert len(scoped.recorder.requests) == before  # refused: nothing reached the upstream
        # One authorization for what the challenge names, and the message goes through.
        enough = scoped.token("avery", "deskhttp", " ".join(sorted(scope_of(refused))))
        answered = post(scoped, enough, method, params, name)
        assert answered.status_code == 200 and "result" in messages(answered)[-1], answered.text


def test_a_message_its_own_decision_refuses_is_sent_for_the_connect_scope_alone(scoped):
    """Deny stays deny: sam may not delete customers, so the scope deleting needs is not named
    (it would buy nothing), and a token holding it is refused all the same."""
    params = {"name": "delete_customer", "arguments": {"customer_id": "c-100"}}
    token = scoped.token("sam", "deskhttp")
    assert post(scoped, token, "tools/list", {}).status_code == 200
    deleted = scoped.recorder.count("tools/call", name="delete_customer")
    with access_required(scoped):
        refused = post(scoped, token, "tools/call", params, "delete_customer")
        assert refused.status_code == 403, refused.text
        assert scope_of(refused) == {"customers:read", ACCESS}
        wider = scoped.token("sam", "deskhttp", f"customers:read customers:write {ACCESS}")
        answer = messages(post(scoped, wider, "tools/call", params, "delete_customer"))[-1]
        assert answer["error"]["data"]["reason"] == "not_permitted", answer
    assert scoped.recorder.count("tools/call", name="delete_customer") == deleted


def test_a_scope_the_resource_does_not_offer_is_never_named(scoped):
    """``send_email`` requires ``mail:send``, which the resource does not offer: a client asking
    for it would be refused at /authorize (invalid_scope), the connect scope with it."""
    params = {
        "name": "send_email",
        "arguments": {"to": "a@example.com", "subject": "s", "body": "b"},
    }
    token = scoped.token("avery", "deskhttp")
    assert post(scoped, token, "tools/list", {}).status_code == 200
    with access_required(scoped):
        refused = post(scoped, token, "tools/call", params, "send_email")
        assert refused.status_code == 403, refused.text
        assert scope_of(refused) == {"customers:read", ACCESS}


def test_a_sign_in_asked_at_connect_names_the_scope_the_call_needs_too(scoped):
    """RFC 9470: a sign-in older than ``connect`` accepts is a 401, which MCP clients answer
    by authorizing anew, for its ``scope``: the scope the call needs is named there too."""
    oauth = scoped.app.state.oauth
    oauth.clock = lambda: time.time() - 200  # signed in 200 s ago; connect accepts 120
    try:
        token = scoped.token("avery", "deskhttp")
    finally:
        oauth.clock = time.time
    assert post(scoped, token, "tools/list", {}).status_code == 200
    fresh = parse_fact('connect_fresh(McpServer{"deskhttp"})')
    params = {"name": "delete_customer", "arguments": {"customer_id": "c-100"}}
    scoped.apply(inserts=[fresh])
    try:
        refused = post(scoped, token, "tools/call", params, "delete_customer")
    finally:
        scoped.apply(deletes=[fresh])
    assert refused.status_code == 401, refused.text
    challenge = refused.headers["www-authenticate"]
    assert 'error="insufficient_user_authentication"' in challenge, challenge
    assert 'scope="customers:read customers:write"' in challenge, challenge


@pytest.mark.parametrize("mode", ["legacy", "auto"])
def test_an_sdk_client_steps_up_once_for_a_call_lacking_the_connect_scope_and_the_tool_s(
    scoped, mode
):
    """The official SDK client, as it comes: it signs in for ``customers:read``, lists the
    tools; the policy then requires ``desk:access`` of every message, and the client deletes a
    customer, which needs ``customers:write`` too. One step-up covers both: the SDK retries a
    request once after a step-up, so a second 403 would fail the call."""

    async def script(client, seen):
        await client.list_tools()
        await anyio.to_thread.run_sync(scoped.apply, [rule])
        result = await client.call_tool("delete_customer", {"customer_id": "c-100"})
        seen["delete"] = result.content[0].text

    rule = parse_fact(f'connect_scope(McpServer{{"deskhttp"}}, "{ACCESS}")')
    try:
        seen = scoped.sdk("avery", "deskhttp", mode, script)
    finally:
        scoped.apply(deletes=[rule])
    assert seen["delete"] == "deleted c-100"
    assert len(seen["redirects"]) == 2, seen["redirects"]  # the sign-in, then one step-up
    assert set(seen["tokens"].scope.split()) == {"customers:read", "customers:write", ACCESS}
