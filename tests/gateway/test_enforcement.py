"""Continuous evaluation, audience binding, step-up, progress, rate limits: through the SDK."""

from __future__ import annotations

import json

import pytest
from mcp.shared.exceptions import MCPError

from bastion.policy.parser import parse_fact

from .streams import legacy_session


@pytest.mark.parametrize("mode", ["legacy", "auto"])
def test_deleting_a_role_fact_denies_the_next_call_with_the_same_token(bastion, mode):
    role = parse_fact('has_role(User{"sam"}, "member", Team{"support"})')

    async def script(client, seen):
        first = await client.call_tool("search_customers", {"query": "ada"})
        seen["first"] = first.is_error
        bastion.apply(deletes=[role])
        try:
            await client.call_tool("search_customers", {"query": "ada"})
        except MCPError as e:
            seen["second"] = e.error.data

    try:
        seen = bastion.sdk("sam", "deskhttp", mode, script)
    finally:
        bastion.apply(inserts=[role])
    assert seen["first"] is False
    assert seen["second"]["reason"] == "not_permitted"
    assert len(seen["redirects"]) == 1  # same token throughout


def test_a_token_issued_for_another_mcp_server_is_refused(bastion):
    token = bastion.token("sam", "desk")
    response = bastion.http.post(
        bastion.mcp_url("deskhttp"),
        headers={"authorization": f"Bearer {token}", "content-type": "application/json"},
        json={"jsonrpc": "2.0", "id": 1, "method": "ping"},
    )
    assert response.status_code == 401
    challenge = response.headers["www-authenticate"]
    assert 'error="invalid_token"' in challenge
    assert "oauth-protected-resource/mcp/deskhttp" in challenge
    # The same token works where it belongs (this asserts the session opens).
    assert legacy_session(bastion, token, "desk")["mcp-session-id"]


def test_no_token_gets_the_rfc9728_challenge_and_metadata(bastion):
    response = bastion.http.post(
        bastion.mcp_url("desk"), json={"jsonrpc": "2.0", "id": 1, "method": "ping"}
    )
    assert response.status_code == 401
    challenge = response.headers["www-authenticate"]
    assert challenge.startswith("Bearer ") and 'scope="customers:read"' in challenge
    url = challenge.split('resource_metadata="')[1].rstrip('"')
    metadata = bastion.http.get(url).json()
    assert metadata["resource"] == bastion.mcp_url("desk")
    assert metadata["authorization_servers"] == [bastion.url]
    assert "customers:write" in metadata["scopes_supported"]


@pytest.mark.parametrize("mode", ["legacy", "auto"])
def test_admin_steps_up_to_customers_write_and_deletes(bastion, mode):
    async def script(client, seen):
        result = await client.call_tool("search_customers", {"query": "grace"})
        seen["search"] = json.loads(result.content[0].text)
        result = await client.call_tool("delete_customer", {"customer_id": "c-102"})
        seen["delete"] = result.content[0].text

    # A client allowed both scopes starts with customers:read (the 401 challenge asks for it).
    seen = bastion.sdk("avery", "desk", mode, script, "customers:read customers:write")
    assert seen["search"]["customers"][0]["email"] == "grace@example.com"  # admins see emails
    assert seen["delete"] == "deleted c-102"
    assert len(seen["redirects"]) == 2  # the 403 insufficient_scope sent the person back once
    assert "customers%3Awrite" in seen["redirects"][1] or "customers:write" in seen["redirects"][1]
    assert "customers:write" in seen["tokens"].scope.split()
    bastion.flush()
    rows = [
        r for _, r in bastion.records.after(0, 100000) if r.target == 'Tool{"desk/delete_customer"}'
    ]
    assert {"step_up", "allow"} <= {r.result for r in rows if r.principals[0] == 'User{"avery"}'}


@pytest.mark.parametrize("server", ["desk", "deskhttp"])
def test_progress_notifications_reach_the_client(bastion, server):
    async def script(client, seen):
        events = []

        async def on_progress(progress, total, message):
            events.append((progress, total, message))

        result = await client.call_tool(
            "send_email",
            {"to": "ada@example.com", "subject": "hello", "body": "hi"},
            progress_callback=on_progress,
        )
        seen["result"] = result.content[0].text
        seen["events"] = events

    seen = bastion.sdk("sam", server, "legacy", script)
    assert seen["result"].startswith("sent 'hello'")
    assert [e[2] for e in seen["events"]] == ["queued", "sent"]


def test_rate_limit_refuses_the_sixth_email_in_a_minute(bastion):
    async def script(client, seen):
        outcomes = []
        for _ in range(6):
            try:
                await client.call_tool(
                    "send_email", {"to": "a@example.com", "subject": "s", "body": "b"}
                )
                outcomes.append("ok")
            except MCPError as e:
                outcomes.append(e.error.data["reason"])
        seen["outcomes"] = outcomes

    seen = bastion.sdk("sam", "deskhttp", "auto", script)
    assert seen["outcomes"] == ["ok"] * 5 + ["rate_limited"]


def test_the_record_writer_is_woken_only_when_a_record_waits(bastion):
    """The gateway writes its buffered decision records every 0.2 s from a worker thread; with
    none buffered it wakes no thread (an idle server's CPU), and one buffered is written at
    the next round."""
    import time

    from bastion.audit.decisions import DecisionRecord, new_decision_id

    records = bastion.records
    # How many records waited each time the thread was woken to write them.
    woken_with, flush = [], records.flush
    records.flush = lambda: woken_with.append(records.waiting) or flush()
    try:
        time.sleep(0.7)  # three rounds or more
        assert 0 not in woken_with, "a thread was woken with no record to write"
        records.add(DecisionRecord(new_decision_id(), 1.0, "desk", "m", "T", (), "allow"))
        deadline = time.monotonic() + 10
        while records.waiting or not woken_with:
            assert time.monotonic() < deadline, "the buffered record was never written"
            time.sleep(0.05)
        assert 0 not in woken_with
    finally:
        del records.flush
