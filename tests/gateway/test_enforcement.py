"""Continuous evaluation, audience binding, step-up, progress, rate limits: through the SDK."""

from __future__ import annotations

import json

import anyio
import pytest
from mcp.shared.exceptions import MCPError

from bastion.audit.commands import _line
from bastion.audit.decisions import DecisionRecords
from bastion.db import Database
from bastion.decide import Authorizer
from bastion.facts.model import Entity
from bastion.gateway.enforce import Caller, Enforcer
from bastion.gateway.jsonrpc import RpcError
from bastion.policy.parser import parse_fact
from tests.waits import eventually

from .streams import legacy_session, messages


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

    from bastion.audit.decisions import DecisionRecord, new_decision_id

    records = bastion.records
    # How many records waited each time the thread was woken to write them ("journal": none,
    # but journal lines to force to the disk, as after the module's first calls).
    woken_with, flush = [], records.flush

    def counted() -> None:
        unsynced = records.journal is not None and records.journal.unsynced
        woken_with.append(records.waiting or ("journal" if unsynced else 0))
        flush()

    # Each round asks the upstream errors' clock once (twice in a round that logs their counts,
    # at most once a second) before it decides whether to wake a thread: rounds are counted so.
    upstream_errors = bastion.app.state.gateway.refusals.upstream_errors
    asked, clock = [], upstream_errors.clock

    def counted_clock() -> float:
        asked.append(None)
        return clock()

    records.flush = counted
    upstream_errors.clock = counted_clock
    try:
        # Three rounds decided or more, however long a busy machine makes them take.
        assert eventually(lambda: len(asked) >= 8, every=0.05), "the record writer never ran"
        assert 0 not in woken_with, "a thread was woken with no record to write"
        records.add(DecisionRecord(new_decision_id(), 1.0, "desk", "m", "T", (), "allow"))
        written = eventually(lambda: not records.waiting and woken_with, every=0.05)
        assert written, "the buffered record was never written"
        assert 0 not in woken_with
    finally:
        del records.flush
        upstream_errors.clock = clock


def test_a_calls_record_names_the_policy_version_and_facts_it_was_decided_on_and_its_grant(
    bastion,
):
    """Explainable months later: each record says which policy version decided and the change-log
    sequence of the facts, and whose grant and session the call came with. A policy put in force
    between two calls shows as two versions."""
    token = bastion.token("sam", "desk")
    headers = legacy_session(bastion, token, "desk")
    grant_id = bastion.app.state.gateway.tokens.verify(token, bastion.mcp_url("desk")).grant_id
    replica = bastion.app.state.replica

    def caught_up(done) -> None:
        assert eventually(done, every=0.01), "the replica did not catch up"

    # Signing in writes facts (the agent's identity): the first call is decided once they are in.
    head = bastion.store.head()
    caught_up(lambda: replica.applied >= head)

    def search(request_id: int) -> None:
        params = {"name": "search_customers", "arguments": {"query": "ada"}}
        message = {"jsonrpc": "2.0", "id": request_id, "method": "tools/call", "params": params}
        response = bastion.http.post(bastion.mcp_url("desk"), headers=headers, json=message)
        assert "result" in messages(response)[-1], response.text

    search(1)
    first_version, first_sequence = replica.policy_version, replica.applied
    policy = bastion.store.policy()
    version, seq = bastion.store.put_policy(policy.text, source=policy.source, actor="test")
    caught_up(lambda: replica.applied >= seq)
    search(2)
    bastion.flush()
    calls = [
        r
        for _, r in bastion.records.after(0, 100000)
        if r.session == headers["mcp-session-id"] and r.method == "tools/call"
    ]
    assert [(r.policy_version, r.sequence) for r in calls] == [
        (first_version, first_sequence),
        (version, seq),
    ]
    assert first_version is not None and version == first_version + 1
    assert {(r.grant_id, r.task) for r in calls} == {(grant_id, "")}
    assert f"policy={version} sequence={seq} grant={grant_id}" in _line(calls[1])


ALLOW_CALLS = """
actor User {}
actor Agent {}
resource Tool { permissions = ["call"]; }
allow(_actor, "call", _tool: Tool);
"""


def test_a_refusal_before_the_policy_is_recorded_with_the_same_fields_as_a_decision(tmp_path):
    """A refusal made before the policy is asked (facts too old here, a suspension likewise) is
    recorded as a decision is: the policy version and sequence in force, the grant, the task the
    token is bound to and the session."""
    records = DecisionRecords(Database(str(tmp_path / "records.db")))
    stale = [False]
    enforcer = Enforcer(
        lambda: Authorizer(ALLOW_CALLS),
        records,
        facts_stale=lambda: stale[0],
        position=lambda: (7, 1234),
    )
    caller = Caller(
        "sam", "agent", frozenset(), "127.0.0.1", "2025-11-25", "g-1", "s-1", task="task-9"
    )
    tool = Entity("Tool", "desk/search_customers")

    async def decide() -> None:
        context = enforcer.context(caller, "desk", "tools/call")
        verdict = await enforcer.decide(caller, "desk", "tools/call", "call", tool, context, {})
        enforcer.write(verdict.record)

    anyio.run(decide)
    stale[0] = True
    with pytest.raises(RpcError):
        anyio.run(decide)
    records.flush()
    written = [r for _, r in records.after(0)]
    assert [(r.result, r.reason) for r in written] == [
        ("allow", ""),
        ("unavailable", "facts_stale"),
    ]
    for r in written:
        assert (r.policy_version, r.sequence, r.grant_id, r.task, r.session) == (
            7,
            1234,
            "g-1",
            "task-9",
            "s-1",
        )
