"""Obligations a policy puts on ``connect`` hold on every message, not only refusals: a scope
the token lacks sends the client to step up, a hold refuses (until approvals exist)."""

from __future__ import annotations

from bastion.policy.parser import parse_fact

from .streams import modern_headers, modern_request

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
    held = parse_fact('connect_held(McpServer{"labhttp"})')
    before = len(bastion.recorder.requests)
    bastion.apply(inserts=[held])
    try:
        refused = list_tools(bastion, token).json()
        assert refused["error"]["data"]["reason"] == "requires_approval"
        assert refused["error"]["data"]["decision_id"]
        assert len(bastion.recorder.requests) == before
    finally:
        bastion.apply(deletes=[held])
    assert "result" in list_tools(bastion, token).json()
