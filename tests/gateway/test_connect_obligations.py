"""Obligations a policy puts on ``connect`` hold on every message, not only refusals: a scope
the token lacks sends the client to step up, a hold refuses (until approvals exist)."""

from __future__ import annotations

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
        assert 'error="insufficient_scope"' in challenge and "customers:write" in challenge
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
