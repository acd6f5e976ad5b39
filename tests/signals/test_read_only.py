"""The read-only downgrade (``read_only(actor, McpServer)``) through the gateway, with the
official MCP SDK client in both protocol eras: while it holds, a tool not annotated
``readOnlyHint: true`` is refused with reason ``read_only`` (recorded) and left out of
``tools/list``; read-only tools, resources and prompts go on; lifted, writes come back on the
same token and session."""

from __future__ import annotations

import contextlib

import pytest
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import ToolAnnotations

from bastion.facts.model import Entity
from bastion.gateway.config import DEFAULT_PASS_METHODS
from tests.gateway.streams import (
    call_tool,
    legacy_session,
    messages,
    modern_headers,
    modern_request,
)
from tests.gateway.support import Recorder
from tests.oauth.support import free_socket, serve
from tests.signals.support import ERAS, attempt, latest_agent, running

RULES = """
declare downgraded(User, McpServer);
declare downgraded(Agent, McpServer);
read_only(principal, server: McpServer) if downgraded(principal, server);
"""
EMAIL = {"to": "ada@example.com", "subject": "hello", "body": "hi"}
# A vendor method an operator lets through: bastion cannot tell what it changes upstream.
VENDOR = "acme/reindex"


# An upstream whose tool changes what it says of itself, and tells no one (no list_changed).
SHIFTY = MCPServer("shifty")
TIDIED: list[str] = []  # each call of tidy that reached the upstream


def tidy() -> str:
    TIDIED.append("tidy")
    return "tidied"


def describe_tidy(read_only: bool) -> None:
    """What shifty says of tidy from now on (a tool removed and added again: no notification
    without a session to send it on)."""
    with contextlib.suppress(ToolError):
        SHIFTY.remove_tool("tidy")
    SHIFTY.add_tool(tidy, annotations=ToolAnnotations(readOnlyHint=read_only))


@pytest.fixture(scope="module")
def bastion(tmp_path_factory):
    describe_tidy(read_only=True)
    recorder = Recorder(SHIFTY.streamable_http_app(streamable_http_path="/mcp"))
    with serve(recorder, free_socket()) as shifty_url:
        running_bastion = running(
            tmp_path_factory,
            "read-only",
            RULES,
            gateway={"pass_methods": [*DEFAULT_PASS_METHODS, VENDOR]},
            more_upstreams=({"name": "shifty", "url": f"{shifty_url}/mcp"},),
        )
        bastion = next(running_bastion)
        # sam administers shifty: every tool of it, unless downgraded (purge_everything is
        # one it does not list).
        shifty = Entity("McpServer", "shifty")
        bastion.apply(
            [
                ("has_relation", shifty, "team", Entity("Team", "support")),
                ("has_role", Entity("User", "sam"), "admin", shifty),
                ("has_relation", Entity("Tool", "shifty/tidy"), "server", shifty),
                ("has_relation", Entity("Tool", "shifty/purge_everything"), "server", shifty),
            ]
        )
        bastion.shifty = recorder
        yield bastion
        next(running_bastion, None)


def downgrade(principal: Entity, server: str = "deskhttp") -> tuple:
    return ("downgraded", principal, Entity("McpServer", server))


def sent_emails(bastion) -> int:
    return sum(
        1
        for m in bastion.recorder.messages()
        if m.get("method") == "tools/call" and m.get("params", {}).get("name") == "send_email"
    )


@pytest.mark.parametrize("mode", ERAS)
def test_a_downgraded_user_may_read_but_not_write(bastion, mode):
    sam = downgrade(Entity("User", "sam"))
    bastion.apply([sam])
    before = sent_emails(bastion)
    try:

        async def script(client, seen):
            seen["tools"] = sorted(t.name for t in (await client.list_tools()).tools)
            await attempt(client, seen, "calls", "send_email", EMAIL)
            await attempt(client, seen, "calls", "search_customers", {"query": "a"})
            plans = await client.read_resource("customers://plans")
            seen["plans"] = plans.contents[0].text
            prompt = await client.get_prompt("apology", {"customer_name": "Ada"})
            seen["prompt"] = prompt.messages[0].content.text

        seen = bastion.sdk("sam", "deskhttp", mode, script)
    finally:
        bastion.apply(deletes=[sam])
    # Only what it may call is offered (delete_customer and send_email are not read-only).
    assert seen["tools"] == ["search_customers"]
    (_, code, data), (ok, _text) = seen["calls"]
    assert (code, data["reason"]) == (-32003, "read_only")
    assert ok == "ok"
    assert seen["plans"] and "Ada" in seen["prompt"]
    assert sent_emails(bastion) == before  # the write never reached the upstream
    bastion.flush()
    record = bastion.records.get(data["decision_id"])
    assert (record.result, record.reason) == ("deny", "read_only")
    assert record.obligations["read_only"] is True


def test_lifting_the_downgrade_brings_writes_back_on_the_same_session(bastion):
    sam = downgrade(Entity("User", "sam"))

    async def script(client, seen):
        bastion.apply([sam])
        await attempt(client, seen, "calls", "send_email", EMAIL)
        bastion.apply(deletes=[sam])
        await attempt(client, seen, "calls", "send_email", EMAIL)
        seen["tools"] = sorted(t.name for t in (await client.list_tools()).tools)

    seen = bastion.sdk("sam", "deskhttp", "legacy", script)
    (_, code, data), (ok, text) = seen["calls"]
    assert data["reason"] == "read_only"
    assert ok == "ok" and "ada@example.com" in text
    assert "send_email" in seen["tools"]
    assert len(seen["redirects"]) == 1  # one sign-in: no new token was needed


def test_the_downgrade_of_the_agent_binds_the_user_it_acts_for(bastion):
    """Any principal of the chain downgraded downgrades the request."""

    async def script(client, seen):
        await attempt(client, seen, "before", "search_customers", {"query": "a"})
        # The SDK registered an agent of its own: downgrade that agent only.
        client_id = seen["client_id"] = latest_agent(bastion)
        bastion.apply([downgrade(Entity("Agent", client_id))])
        await attempt(client, seen, "calls", "send_email", EMAIL)
        await attempt(client, seen, "calls", "search_customers", {"query": "a"})

    seen = bastion.sdk("sam", "deskhttp", "auto", script)
    bastion.apply(deletes=[downgrade(Entity("Agent", seen["client_id"]))])
    (_, code, data), (ok, _) = seen["calls"]
    assert data["reason"] == "read_only" and ok == "ok"


def test_a_downgrade_on_another_server_changes_nothing_here(bastion):
    other = downgrade(Entity("User", "sam"), "desk")
    bastion.apply([other])
    try:

        async def script(client, seen):
            seen["tools"] = sorted(t.name for t in (await client.list_tools()).tools)

        seen = bastion.sdk("sam", "deskhttp", "legacy", script)
    finally:
        bastion.apply(deletes=[other])
    assert "send_email" in seen["tools"]


def test_annotations_a_client_sends_do_not_make_a_write_a_read(bastion):
    """Only the upstream's own annotations count: a client claiming readOnlyHint is refused."""
    sam = downgrade(Entity("User", "sam"))
    token = bastion.token("sam", "deskhttp")
    call = {"name": "send_email", "arguments": EMAIL, "annotations": {"readOnlyHint": True}}
    bastion.apply([sam])
    try:
        answer = bastion.http.post(
            bastion.mcp_url("deskhttp"),
            json=modern_request(1, "tools/call", call),
            headers=modern_headers(token, "tools/call", "send_email"),
        )
    finally:
        bastion.apply(deletes=[sam])
    assert answer.json()["error"]["data"]["reason"] == "read_only"


def vendor_call(bastion, token: str, mode: str) -> dict:
    """``VENDOR`` sent to deskhttp by raw HTTP, stateless (2026-07-28) or in a 2025-11-25
    session; the JSON-RPC answer."""
    if mode == "modern":
        body = modern_request(7, VENDOR, {"scope": "all"})
        headers = modern_headers(token, VENDOR)
    else:
        body = {"jsonrpc": "2.0", "id": 7, "method": VENDOR, "params": {"scope": "all"}}
        headers = legacy_session(bastion, token, "deskhttp")
    answer = bastion.http.post(bastion.mcp_url("deskhttp"), json=body, headers=headers)
    assert answer.status_code == 200, answer.text
    return messages(answer)[-1]


@pytest.mark.parametrize("mode", ["legacy", "modern"])
def test_a_downgraded_caller_cannot_send_a_passed_through_method(bastion, mode):
    """A method in gateway.pass_methods may write, and bastion cannot tell: refused to a
    downgraded caller with reason read_only (recorded), before it reaches the upstream."""
    sam = downgrade(Entity("User", "sam"))
    token = bastion.token("sam", "deskhttp")
    before = bastion.recorder.count(VENDOR)
    bastion.apply([sam])
    try:
        answer = vendor_call(bastion, token, mode)
    finally:
        bastion.apply(deletes=[sam])
    assert answer["error"]["code"] == -32003, answer
    data = answer["error"]["data"]
    assert data["reason"] == "read_only"
    assert "downgraded to read-only" in answer["error"]["message"]
    assert bastion.recorder.count(VENDOR) == before  # it never reached the upstream
    bastion.flush()
    record = bastion.records.get(data["decision_id"])
    assert (record.result, record.reason, record.method) == ("deny", "read_only", VENDOR)


def test_a_passed_through_method_still_reaches_the_upstream_for_a_caller_not_downgraded(bastion):
    token = bastion.token("sam", "deskhttp")
    before = bastion.recorder.count(VENDOR)
    answer = vendor_call(bastion, token, "modern")
    # The upstream's own answer (it has no such method): what matters is that it got there.
    assert answer["error"]["code"] == -32601, answer
    assert "decision_id" not in (answer["error"].get("data") or {})
    assert bastion.recorder.count(VENDOR) == before + 1


def test_a_downgraded_caller_cannot_call_a_tool_that_became_a_write_unannounced(bastion):
    """Annotations are the upstream's, as it gives them when the downgraded caller calls: a tool
    read-only when its list was read, and a write since (no list_changed heard), is refused."""
    sam = downgrade(Entity("User", "sam"), "shifty")
    token = bastion.token("sam", "shifty")
    describe_tidy(read_only=True)
    bastion.apply([sam])
    try:
        first = call_tool(bastion, token, "shifty", "tidy", {})
        calls = len(TIDIED)
        describe_tidy(read_only=False)
        second = call_tool(bastion, token, "shifty", "tidy", {})
    finally:
        bastion.apply(deletes=[sam])
        describe_tidy(read_only=True)
    assert first["result"]["content"][0]["text"] == "tidied", first
    assert second["error"]["data"]["reason"] == "read_only", second
    assert len(TIDIED) == calls  # the write never reached the upstream


def test_only_a_downgraded_caller_pays_for_reading_a_tool_list_at_each_call(bastion):
    token = bastion.token("sam", "shifty")
    call_tool(bastion, token, "shifty", "tidy", {})  # the list is read once, if not before
    listed = bastion.shifty.count("tools/list")
    for request_id in (2, 3):
        assert "result" in call_tool(bastion, token, "shifty", "tidy", {}, request_id)
    assert bastion.shifty.count("tools/list") == listed
    sam = downgrade(Entity("User", "sam"), "shifty")
    bastion.apply([sam])
    try:
        for request_id in (4, 5):
            assert "result" in call_tool(bastion, token, "shifty", "tidy", {}, request_id)
    finally:
        bastion.apply(deletes=[sam])
    assert bastion.shifty.count("tools/list") == listed + 2


def test_a_tool_the_upstream_does_not_list_is_a_write_to_a_downgraded_caller(bastion):
    """sam may call any tool of shifty; downgraded, one it does not list is refused unsent."""
    sam = downgrade(Entity("User", "sam"), "shifty")
    token = bastion.token("sam", "shifty")
    bastion.apply([sam])
    try:
        answer = call_tool(bastion, token, "shifty", "purge_everything", {})
    finally:
        bastion.apply(deletes=[sam])
    assert answer["error"]["data"]["reason"] == "read_only", answer
    assert bastion.shifty.count("tools/call", name="purge_everything") == 0


@pytest.mark.parametrize("form", ["notification", "batch"])
def test_a_write_in_another_json_rpc_form_never_reaches_the_upstream(bastion, form):
    """2025-11-25: a tools/call sent as a notification is acknowledged and dropped, and a batch
    is refused whole (400); neither is forwarded undecided."""
    sam = downgrade(Entity("User", "sam"))
    headers = legacy_session(bastion, bastion.token("sam", "deskhttp"), "deskhttp")
    call = {
        "jsonrpc": "2.0",
        "method": "tools/call",
        "params": {"name": "send_email", "arguments": EMAIL},
    }
    body = call if form == "notification" else [{**call, "id": 1}, {**call, "id": 2}]
    before = sent_emails(bastion)
    bastion.apply([sam])
    try:
        answer = bastion.http.post(bastion.mcp_url("deskhttp"), json=body, headers=headers)
    finally:
        bastion.apply(deletes=[sam])
    assert answer.status_code == (202 if form == "notification" else 400), answer.text
    assert sent_emails(bastion) == before
