"""Obligations a policy puts on ``connect`` hold on every message, not only refusals: a scope
the token lacks sends the client to step up, a hold refuses (until approvals exist)."""

from __future__ import annotations

import pytest

from bastion.policy.parser import parse_fact

from .streams import call_tool, events, modern_headers, modern_request

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


def test_a_hold_on_connect_cuts_a_listen_stream_off_at_its_next_notification(bastion):
    token = bastion.token("sam", "labhttp")
    held = parse_fact('connect_held(McpServer{"labhttp"}, User{"sam"})')
    with bastion.http.stream(
        "POST",
        bastion.mcp_url("labhttp"),
        json=modern_request(
            "w", "subscriptions/listen", {"notifications": {"toolsListChanged": True}}
        ),
        headers=modern_headers(token, "subscriptions/listen"),
    ) as response:
        frames = events(response)
        assert next(frames)["method"] == "notifications/subscriptions/acknowledged"
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
